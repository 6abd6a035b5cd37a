"""The ``maskrcnn`` detector backend: tiled Mask R-CNN inference on camera frames.

A frame (HxWx3 uint8 BGR) is scaled by the model's ``pixel_scale`` and cut into
overlapping square tiles of the model's ``input_size``; each tile runs through the
network, and detections of neighbouring tiles that cover the same pixels of their
common area are stitched into one flake (mask union, best score). The layer count of
every flake is then refined by the optical thickness estimator (thin-film contrast),
and each flake carries the model version it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import time

import cv2
import numpy as np
import torch

from flake_core.materials import LAYER_FEW, LAYER_MONO, LAYER_THICK, layer_class_of
from flake_detector.detection import (
    Detection,
    FrameResult,
    FunnelStage,
    region_quality,
    register_detector,
)
from flake_detector.maskrcnn.model import class_material_layer

MODELS_DIR = Path(__file__).resolve().parent.parent / 'models'
SHIPPED_MODEL = MODELS_DIR / 'maskrcnn_mobilenet_v2.pt'
_LAYER_CODES = {'mono': LAYER_MONO, 'few': LAYER_FEW, 'thick': LAYER_THICK}


@dataclass
class TileDetection:
    """One detection in frame coordinates (scaled frame) before stitching."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    mask: np.ndarray                # bool, box-sized
    label: int
    score: float
    window: tuple[int, int, int, int]  # the tile it came from: x0, y0, x1, y1

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start positions covering ``length`` with tiles of ``tile`` overlapping by >= ``overlap``."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    count = int(np.ceil((length - tile) / step)) + 1
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def _crop(det: TileDetection, region: tuple[int, int, int, int]) -> np.ndarray:
    """det's mask inside ``region`` (x0, y0, x1, y1) as a region-sized bool array."""
    rx0, ry0, rx1, ry1 = region
    out = np.zeros((max(0, ry1 - ry0), max(0, rx1 - rx0)), dtype=bool)
    x0, y0, x1, y1 = det.box
    ix0, iy0, ix1, iy1 = max(x0, rx0), max(y0, ry0), min(x1, rx1), min(y1, ry1)
    if ix0 < ix1 and iy0 < iy1:
        out[iy0 - ry0:iy1 - ry0, ix0 - rx0:ix1 - rx0] = det.mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
    return out


def _same_flake(a: TileDetection, b: TileDetection, min_iou: float) -> bool:
    """Two detections show one flake when their masks agree where both tiles saw the frame."""
    wx0, wy0 = max(a.window[0], b.window[0]), max(a.window[1], b.window[1])
    wx1, wy1 = min(a.window[2], b.window[2]), min(a.window[3], b.window[3])
    if wx0 >= wx1 or wy0 >= wy1:
        return False
    common = (wx0, wy0, wx1, wy1)
    ma, mb = _crop(a, common), _crop(b, common)
    union = np.logical_or(ma, mb).sum()
    return bool(union) and np.logical_and(ma, mb).sum() / union >= min_iou


def stitch(detections: list[TileDetection], min_iou: float = 0.3) -> list[TileDetection]:
    """Merge detections of one flake seen by several overlapping tiles.

    Pairs from different tiles are linked when their masks overlap by ``min_iou`` (IoU)
    inside the area both tiles cover; linked groups become one detection with the union
    mask, the best score and the label of the best-scoring member.
    """
    parent = list(range(len(detections)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(detections):
        for j in range(i + 1, len(detections)):
            b = detections[j]
            if a.window == b.window:
                continue
            if a.box[0] >= b.box[2] or b.box[0] >= a.box[2] or a.box[1] >= b.box[3] or b.box[1] >= a.box[3]:
                continue
            if _same_flake(a, b, min_iou):
                parent[root(i)] = root(j)
    groups: dict[int, list[TileDetection]] = {}
    for i, det in enumerate(detections):
        groups.setdefault(root(i), []).append(det)
    merged = []
    for members in groups.values():
        if len(members) == 1:
            merged.append(members[0])
            continue
        box = (min(m.box[0] for m in members), min(m.box[1] for m in members),
               max(m.box[2] for m in members), max(m.box[3] for m in members))
        mask = np.zeros((box[3] - box[1], box[2] - box[0]), dtype=bool)
        for m in members:
            mask |= _crop(m, box)
        best = max(members, key=lambda m: m.score)
        window = (min(m.window[0] for m in members), min(m.window[1] for m in members),
                  max(m.window[2] for m in members), max(m.window[3] for m in members))
        merged.append(TileDetection(box, mask, best.label, best.score, window))
    return merged


class MaskRCNNDetector:
    """Detector backend ``maskrcnn`` (see the module docstring)."""

    name = 'maskrcnn'

    def __init__(self, model_path: str | Path = '', score_threshold: float = 0.5, mask_threshold: float = 0.5,
                 overlap_px: int = 32, stitch_iou: float = 0.3, min_area_px: int = 12,
                 refine_thickness: bool = True, oxide_nm: float = 90.0, calibration: str = 'auto',
                 threads: int = 1, batch_tiles: int = 4, tile_size: int = 0, **_ignored):
        from flake_detector.maskrcnn.train import model_from_checkpoint

        path = Path(model_path) if model_path else SHIPPED_MODEL
        if not path.is_file():
            raise FileNotFoundError(f'Mask R-CNN checkpoint {path} not found; train one with '
                                    '`make train-maskrcnn` or pass model_path')
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f'score_threshold must be within 0..1, got {score_threshold}')
        if threads > 0:
            torch.set_num_threads(int(threads))
        self.model, self.config, self.model_version = model_from_checkpoint(path)
        self.model_path = path
        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self.overlap_px = int(overlap_px)
        self.stitch_iou = float(stitch_iou)
        self.min_area_px = int(min_area_px)
        self.refine_thickness = bool(refine_thickness)
        self.oxide_nm = float(oxide_nm)
        self.calibration_source = calibration
        self.batch_tiles = max(1, int(batch_tiles))
        self.tile_size = self._set_tile_size(int(tile_size) or self.config.input_size)
        self._calibrations: dict[str, object] = {}

    def _set_tile_size(self, tile: int) -> int:
        """Tiles larger than the training input are fine for the convolutional network (same pixel
        scale, fewer tiles): only the input resize and the proposal budget follow the tile area."""
        if tile < 64 or tile % 32:
            raise ValueError(f'tile_size must be a multiple of 32 and >= 64, got {tile}')
        self.model.transform.min_size = (tile,)
        self.model.transform.max_size = tile
        # More proposals and detections for larger tiles, capped: thousands of RoIs per frame cost
        # far more than they find.
        area = min(4.0, (tile / self.config.input_size) ** 2)
        self.model.rpn._post_nms_top_n['testing'] = round(self.config.rpn_proposals_test * max(1.0, area))
        self.model.rpn._pre_nms_top_n['testing'] = 2 * self.model.rpn._post_nms_top_n['testing']
        self.model.roi_heads.detections_per_img = round(self.config.detections_per_image * max(1.0, area))
        # The network's own cut must not hide detections a caller asked for (AP wants low scores).
        self.model.roi_heads.score_thresh = min(self.config.score_threshold, self.score_threshold)
        return tile

    # ------------------------------------------------------------------ network

    @torch.no_grad()
    def predict_tiles(self, image_rgb: np.ndarray) -> tuple[list[TileDetection], int]:
        """Run the network on every tile of an RGB frame already at model scale."""
        size = self.tile_size
        height, width = image_rgb.shape[:2]
        windows = [(x, y, min(x + size, width), min(y + size, height))
                   for y in tile_origins(height, size, self.overlap_px)
                   for x in tile_origins(width, size, self.overlap_px)]
        frame = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float() / 255.0
        found: list[TileDetection] = []
        for start in range(0, len(windows), self.batch_tiles):
            batch = windows[start:start + self.batch_tiles]
            tensors = []
            for x0, y0, x1, y1 in batch:
                tile = frame.new_zeros((3, size, size))  # zero padding past the frame edge (seed 001)
                tile[:, :y1 - y0, :x1 - x0] = frame[:, y0:y1, x0:x1]
                tensors.append(tile)
            for window, output in zip(batch, self.model(tensors), strict=True):
                found += self._tile_detections(output, window)
        return found, len(windows)

    def _tile_detections(self, output: dict, window) -> list[TileDetection]:
        x0, y0, x1, y1 = window
        keep = output['scores'] >= self.score_threshold
        out = []
        masks = (output['masks'][keep, 0] >= self.mask_threshold).numpy()
        for label, score, mask in zip(output['labels'][keep].tolist(), output['scores'][keep].tolist(), masks,
                                      strict=True):
            mask = mask[:y1 - y0, :x1 - x0]
            ys, xs = np.nonzero(mask)
            if len(xs) < self.min_area_px:
                continue
            bx0, by0, bx1, by1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            out.append(TileDetection((int(x0 + bx0), int(y0 + by0), int(x0 + bx1), int(y0 + by1)),
                                     mask[by0:by1, bx0:bx1].copy(), int(label), float(score), tuple(window)))
        return out

    # ------------------------------------------------------------------ backend API

    def detect(self, image_bgr: np.ndarray) -> FrameResult:
        image_bgr = np.asarray(image_bgr)
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise ValueError(f'expected an HxWx3 uint8 BGR frame, got {image_bgr.shape} {image_bgr.dtype}')
        timings = {}
        started = time.perf_counter()
        height, width = image_bgr.shape[:2]
        scale = self.config.pixel_scale or self.config.input_size / max(height, width)
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        if abs(scale - 1.0) > 1e-6:
            rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                             interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        raw, tiles = self.predict_tiles(rgb)
        timings['network'] = time.perf_counter() - started
        merged = stitch(raw, self.stitch_iou)
        timings['stitch'] = time.perf_counter() - started - timings['network']
        detections = [self._to_frame(d, scale, (height, width)) for d in merged]
        detections = [d for d in detections if d is not None]
        if self.refine_thickness and detections:
            self._refine(image_bgr, detections)
        timings['total'] = time.perf_counter() - started
        funnel = [FunnelStage('tile detections', len(raw)), FunnelStage('stitched', len(merged)),
                  FunnelStage('reported', len(detections))]
        return FrameResult(detections, candidates=len(raw), funnel=funnel,
                           timings=dict(timings, tiles=float(tiles)))

    def _to_frame(self, det: TileDetection, scale: float, shape) -> Detection | None:
        x0, y0, x1, y1 = det.box
        mask = det.mask
        if abs(scale - 1.0) > 1e-6:
            fx0, fy0 = int(np.floor(x0 / scale)), int(np.floor(y0 / scale))
            fx1, fy1 = min(shape[1], int(np.ceil(x1 / scale))), min(shape[0], int(np.ceil(y1 / scale)))
            if fx1 <= fx0 or fy1 <= fy0:
                return None
            mask = cv2.resize(mask.astype(np.uint8), (fx1 - fx0, fy1 - fy0), interpolation=cv2.INTER_NEAREST) > 0
            x0, y0, x1, y1 = fx0, fy0, fx1, fy1
        if not mask.any():
            return None
        material, layer_class = class_material_layer(det.label)
        quality = region_quality(mask)
        return Detection(bbox=(x0, y0, x1 - x0, y1 - y0), mask=mask, material=material, score=det.score,
                         detector=self.name, model_version=self.model_version,
                         layer_class=_LAYER_CODES[layer_class], edge_straightness=quality['edge_straightness'],
                         extra={'network_class': f'{material}/{layer_class}'})

    def _refine(self, image_bgr: np.ndarray, detections: list[Detection]) -> None:
        """Replace the network's coarse layer class by the optical estimate where it is trustworthy."""
        from flake_detector.optical import estimate_background, estimate_thickness, load_calibration

        background = estimate_background(image_bgr)
        for det in detections:
            calibration = self._calibrations.get(det.material)
            if calibration is None:
                try:
                    calibration = load_calibration(det.material, self.oxide_nm, self.calibration_source)
                except (ValueError, FileNotFoundError):
                    continue
                self._calibrations[det.material] = calibration
            try:
                estimate = estimate_thickness(image_bgr, det.mask, calibration, background, det.bbox)
            except ValueError:
                continue
            det.contrast = estimate.contrast
            det.extra['optical_probability'] = estimate.probability
            det.extra['optical_mahalanobis'] = estimate.mahalanobis
            # A contrast far from every calibrated class (bulk, residue, a wrong material)
            # says nothing about the layer count: keep the network's class then.
            if estimate.mahalanobis <= 4.0:
                det.layers, det.layers_std = estimate.layers, estimate.layers_std
                det.thickness_nm, det.thickness_nm_std = estimate.thickness_nm, estimate.thickness_nm_std
                det.layer_class = layer_class_of(estimate.layers)


@register_detector('maskrcnn')
def _make_maskrcnn(**params) -> MaskRCNNDetector:
    return MaskRCNNDetector(**params)

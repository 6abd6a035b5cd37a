"""The ``maskrcnn`` detector backend: Mask R-CNN on camera frames, on the CPU.

A frame (HxWx3 uint8 BGR) is scaled by the model's ``pixel_scale``. The network is
convolutional, so a frame up to ``max_tile_px`` on its longest side runs as one piece
(padded to a multiple of 32); only larger frames are cut into overlapping tiles, whose
detections are stitched where they cover the same pixels of the common area.

The dense part of the network (backbone, feature pyramid, RPN head with its embedding
and objectness folded into one convolution) runs in ONNX Runtime when it is installed
(``runtime='auto'``), exported from the checkpoint in memory when the detector is built;
torch runs it otherwise. Proposals, RoI heads and masks always run in torch, so both
runtimes share everything after the dense part. ``bench/bench_maskrcnn.py`` measures both.

Material and layer count: a class-agnostic model reports ``flake``; each mask's contrast is
then weighed against every material's calibration (the optical detector's thickness
estimator, ``optical.estimate_thickness``) over its whole optical range (beyond 40 layers:
bulk of that material), and a flake whose colour fits none of them within ``gate_sigma`` is
reported as material ``unknown``. A material x layer class model keeps its material and has
its layer count refined the same way. Every flake carries the model version it came from.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
import io
from pathlib import Path
import time

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from flake_core import materials as vocabulary
from flake_core.materials import LAYER_UNKNOWN, layer_class_of
from flake_detector.detection import (
    Detection,
    FrameResult,
    FunnelStage,
    region_quality,
    register_detector,
)
from flake_detector.maskrcnn.model import MATERIALS, class_material_layer

MODELS_DIR = Path(__file__).resolve().parent.parent / 'models'
SHIPPED_MODEL = MODELS_DIR / 'maskrcnn_mobilenet_v2.pt'
RUNTIMES = ('auto', 'onnxruntime', 'torch')
_LAYER_CODES = {name: code for code, name in vocabulary.LAYER_CLASS_NAMES.items()}


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


class DenseStage(nn.Module):
    """Backbone, feature pyramid and RPN head of a trained model, for inference.

    Input: RGB in [0, 1], (N, 3, H, W) with H and W multiples of 32. Output: the pyramid's
    feature maps, then objectness and box deltas per level (the RPN's embedding and
    objectness folded into one convolution: exact, both are linear)."""

    def __init__(self, model):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.rpn.head
        self.objectness = model.rpn.head.fused_objectness()
        transform = model.transform
        self.register_buffer('mean', torch.tensor(transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(transform.image_std).view(1, 3, 1, 1))
        with torch.no_grad():
            self.level_names = list(self.backbone(torch.zeros(1, 3, 64, 64)).keys())

    def forward(self, images: torch.Tensor):
        features = list(self.backbone((images - self.mean) / self.std).values())
        logits, deltas = self.head.dense(features, self.objectness)
        return (*features, *logits, *deltas)


def export_onnx(dense: DenseStage, opset: int = 17) -> bytes:
    """The dense stage as an ONNX model (batch, height and width dynamic)."""
    levels = len(dense.level_names)
    names = ([f'feature{i}' for i in range(levels)] + [f'objectness{i}' for i in range(levels)]
             + [f'deltas{i}' for i in range(levels)])
    axes = {'images': {0: 'batch', 2: 'height', 3: 'width'}}
    axes.update({name: {0: 'batch', 2: f'{name}_h', 3: f'{name}_w'} for name in names})
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(dense, (torch.zeros(1, 3, 128, 128),), buffer, input_names=['images'],
                          output_names=names, dynamic_axes=axes, opset_version=opset, dynamo=False)
    return buffer.getvalue()


class MaskRCNNDetector:
    """Detector backend ``maskrcnn`` (see the module docstring)."""

    name = 'maskrcnn'

    def __init__(self, model_path: str | Path = '', score_threshold: float = 0.5, mask_threshold: float = 0.5,
                 overlap_px: int = 32, stitch_iou: float = 0.3, min_area_px: int = 12,
                 refine_thickness: bool = True, oxide_nm: float = 90.0, calibration: str = 'auto',
                 threads: int = 1, batch_tiles: int = 1, tile_size: int = 0, max_tile_px: int = 2048,
                 runtime: str = 'auto', proposals: int = 0, materials: str = '', gate_sigma: float = 4.0,
                 input_scale: float = 0.0):
        from flake_detector.maskrcnn.train import model_from_checkpoint

        path = Path(model_path) if model_path else SHIPPED_MODEL
        if not path.is_file():
            raise FileNotFoundError(f'Mask R-CNN checkpoint {path} not found; train one with '
                                    '`make train-maskrcnn` or pass model_path')
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f'score_threshold must be within 0..1, got {score_threshold}')
        if runtime not in RUNTIMES:
            raise ValueError(f'runtime must be one of {RUNTIMES}, got {runtime!r}')
        if max_tile_px < 64 or max_tile_px % 32:
            raise ValueError(f'max_tile_px must be a multiple of 32 and >= 64, got {max_tile_px}')
        if tile_size and (tile_size < 64 or tile_size % 32):
            raise ValueError(f'tile_size must be a multiple of 32 and >= 64, got {tile_size}')
        if not 0.0 <= input_scale <= 16.0:
            raise ValueError(f'input_scale must be within 0..16 (0 = the model\'s pixel scale), got {input_scale}')
        if proposals < 0:
            raise ValueError(f'proposals must be >= 0 (0 = the model\'s own count), got {proposals}')
        if threads > 0:
            torch.set_num_threads(int(threads))
        self.threads = int(threads)
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
        self.gate_sigma = float(gate_sigma)
        self.batch_tiles = max(1, int(batch_tiles))
        self.max_tile_px = int(max_tile_px)
        self.tile_size = int(tile_size)
        # Model pixels per frame pixel: another objective or camera than the training one
        # (a 20x frame at 0.39 um/px into a model trained at 0.55 um/px: 0.71).
        self.input_scale = float(input_scale)
        # The network's own cut is the caller's: masks are only computed for what is reported.
        self.model.roi_heads.score_thresh = self.score_threshold
        self.proposals = int(proposals) or self.config.rpn_proposals_test
        self.model.rpn._post_nms_top_n['testing'] = self.proposals
        self.model.rpn._pre_nms_top_n['testing'] = 2 * self.proposals
        names = [m for m in str(materials).split(',') if m.strip()]
        self.materials = tuple(vocabulary.material(m).name for m in names) or _trained_materials(self.config)
        self._tables: list | None = None
        self.dense = DenseStage(self.model).eval()
        self.runtime, self._session = self._start_runtime(runtime)

    def _start_runtime(self, runtime: str):
        if runtime == 'torch':
            return 'torch', None
        try:
            import onnxruntime
        except ImportError:
            if runtime == 'onnxruntime':
                raise ValueError('runtime onnxruntime asked for, but onnxruntime is not installed') from None
            return 'torch', None
        options = onnxruntime.SessionOptions()
        if self.threads > 0:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(export_onnx(self.dense), options,
                                               providers=['CPUExecutionProvider'])
        return 'onnxruntime', session

    # ------------------------------------------------------------------ network

    def _dense_outputs(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if self._session is None:
            return list(self.dense(batch))
        return [torch.from_numpy(o) for o in self._session.run(None, {'images': batch.numpy()})]

    @torch.no_grad()
    def run_network(self, batch: torch.Tensor) -> tuple[list[dict], list[torch.Tensor]]:
        """Detections (boxes, labels, scores, 28 x 28 mask probabilities) and RPN proposals of a
        batch of RGB images in [0, 1], (N, 3, H, W) with H, W multiples of 32."""
        outputs = self._dense_outputs(batch)
        levels = len(self.dense.level_names)
        features = outputs[:levels]
        images = ImageList(batch, [tuple(batch.shape[-2:])] * batch.shape[0])
        proposals, *_ = self.model.rpn.proposals_from_dense(images, features, outputs[levels:2 * levels],
                                                            outputs[2 * levels:])
        detections, _ = self.model.roi_heads(OrderedDict(zip(self.dense.level_names, features, strict=True)),
                                             proposals, images.image_sizes)
        return detections, proposals

    def tile_windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Windows (x0, y0, x1, y1) of a frame at model scale: the whole frame when it fits."""
        if not self.tile_size and max(height, width) <= self.max_tile_px:
            return [(0, 0, width, height)]
        size = self.tile_size or self.max_tile_px
        return [(x, y, min(x + size, width), min(y + size, height))
                for y in tile_origins(height, size, self.overlap_px)
                for x in tile_origins(width, size, self.overlap_px)]

    def predict_tiles(self, image_rgb: np.ndarray) -> tuple[list[TileDetection], int]:
        """Run the network on every window of an RGB frame already at model scale."""
        height, width = image_rgb.shape[:2]
        windows = self.tile_windows(height, width)
        frame = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float() / 255.0
        found: list[TileDetection] = []
        # The RPN's proposals of the last frame, in frame pixels at model scale (for recall benches).
        self.last_proposals: list[torch.Tensor] = []
        for start in range(0, len(windows), self.batch_tiles):
            batch = windows[start:start + self.batch_tiles]
            # Zero padding past the frame edge, as Masubuchi et al. (2020) pad their input.
            pad_h = max(_multiple_of_32(y1 - y0) for _, y0, _, y1 in batch)
            pad_w = max(_multiple_of_32(x1 - x0) for x0, _, x1, _ in batch)
            tensor = frame.new_zeros((len(batch), 3, pad_h, pad_w))
            for k, (x0, y0, x1, y1) in enumerate(batch):
                tensor[k, :, :y1 - y0, :x1 - x0] = frame[:, y0:y1, x0:x1]
            outputs, proposals = self.run_network(tensor)
            for window, output, boxes in zip(batch, outputs, proposals, strict=True):
                found += self._tile_detections(output, window)
                self.last_proposals.append(boxes + torch.tensor(window[:2] * 2, dtype=boxes.dtype))
        return found, len(windows)

    def _tile_detections(self, output: dict, window) -> list[TileDetection]:
        x0, y0, x1, y1 = window
        keep = output['scores'] >= self.score_threshold
        out = []
        for box, label, score, probability in zip(output['boxes'][keep].numpy(), output['labels'][keep].tolist(),
                                                   output['scores'][keep].tolist(),
                                                   output['masks'][keep, 0].numpy(), strict=True):
            pasted = paste_mask(probability, box, self.mask_threshold, (y1 - y0, x1 - x0))
            if pasted is None:
                continue
            mask, (px, py) = pasted
            ys, xs = np.nonzero(mask)
            if len(xs) < self.min_area_px:
                continue
            local = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            bx0, by0 = x0 + px + int(xs.min()), y0 + py + int(ys.min())
            out.append(TileDetection((bx0, by0, bx0 + local.shape[1], by0 + local.shape[0]), local.copy(),
                                     int(label), float(score), tuple(window)))
        return out

    # ------------------------------------------------------------------ backend API

    def detect(self, image_bgr: np.ndarray) -> FrameResult:
        image_bgr = np.asarray(image_bgr)
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise ValueError(f'expected an HxWx3 uint8 BGR frame, got {image_bgr.shape} {image_bgr.dtype}')
        timings = {}
        started = time.perf_counter()
        height, width = image_bgr.shape[:2]
        scale = self.input_scale or self.config.pixel_scale or self.config.input_size / max(height, width)
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        if abs(scale - 1.0) > 1e-6:
            rgb = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                             interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        raw, tiles = self.predict_tiles(rgb)
        timings['network'] = time.perf_counter() - started
        merged = stitch(raw, self.stitch_iou) if tiles > 1 else raw
        timings['stitch'] = time.perf_counter() - started - timings['network']
        detections = [self._to_frame(d, scale, (height, width)) for d in merged]
        detections = [d for d in detections if d is not None]
        optics_started = time.perf_counter()
        if detections and (self.config.class_agnostic or self.refine_thickness):
            self._optical(image_bgr, detections)
        timings['optics'] = time.perf_counter() - optics_started
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
        material, layer_class = class_material_layer(det.label, self.config.class_names)
        quality = region_quality(mask)
        return Detection(bbox=(x0, y0, x1 - x0, y1 - y0), mask=mask, material=material, score=det.score,
                         detector=self.name, model_version=self.model_version,
                         layer_class=_LAYER_CODES[layer_class], edge_straightness=quality['edge_straightness'],
                         extra={'network_class': self.config.class_names[det.label]})

    # ------------------------------------------------------------------ optics

    def _material_tables(self) -> list:
        """The optical layer classes of every material (each over its whole optical range, so
        a flake thicker than 40 layers is told as bulk of its material)."""
        if self._tables is None:
            from flake_detector.optical import load_calibration

            tables = []
            for material in self.materials:
                try:
                    tables.append(load_calibration(material, self.oxide_nm, self.calibration_source))
                except (ValueError, FileNotFoundError):
                    continue
            self._tables = tables
        return self._tables

    def _optical(self, image_bgr: np.ndarray, detections: list[Detection]) -> None:
        """Material and layer count of every mask from its contrast.

        Class-agnostic model: the best-fitting class over every material; none within
        ``gate_sigma``: material 'unknown'. Material x layer class model: the layer count
        within the network's material, the network's class kept where the contrast fits
        none (bulk, residue, a wrong material)."""
        from flake_detector.optical import estimate_background, estimate_thickness

        background = estimate_background(image_bgr)
        tables = self._material_tables()
        agnostic = self.config.class_agnostic
        for det in detections:
            best = None
            for calibration in tables:
                if not agnostic and calibration.material != det.material:
                    continue
                try:
                    estimate = estimate_thickness(image_bgr, det.mask, calibration, background, det.bbox)
                except ValueError:
                    continue
                if best is None or estimate.mahalanobis < best.mahalanobis:
                    best = estimate
            if best is None:
                continue
            det.contrast = best.contrast
            det.extra['optical_probability'] = best.probability
            det.extra['optical_mahalanobis'] = best.mahalanobis
            if best.mahalanobis > self.gate_sigma:
                if agnostic:  # a colour no calibration explains is not forced into a material
                    det.material, det.layer_class = vocabulary.UNKNOWN, LAYER_UNKNOWN
                continue
            det.material = best.material
            det.layers, det.layers_std = best.layers, best.layers_std
            det.thickness_nm, det.thickness_nm_std = best.thickness_nm, best.thickness_nm_std
            det.layer_class = layer_class_of(best.layers)


def paste_mask(probability: np.ndarray, box, threshold: float, shape) -> tuple[np.ndarray, tuple] | None:
    """A mask head's M x M probability pasted into its box, as torchvision pastes it (the map
    padded by one cell so its border lands on the box edge): (bool mask over the padded box,
    clipped to a frame of ``shape``, and its top-left (x, y)); None when nothing passes."""
    height, width = shape
    cells = probability.shape[0]
    grow = (cells + 2) / cells
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half_w, half_h = (box[2] - box[0]) / 2 * grow, (box[3] - box[1]) / 2 * grow
    x0, y0 = int(np.floor(cx - half_w)), int(np.floor(cy - half_h))
    x1, y1 = int(np.ceil(cx + half_w)), int(np.ceil(cy + half_h))
    resized = cv2.resize(np.pad(probability, 1).astype(np.float32), (max(1, x1 - x0), max(1, y1 - y0)),
                         interpolation=cv2.INTER_LINEAR)
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    mask = resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] >= threshold
    return (mask, (cx0, cy0)) if mask.any() else None


def _multiple_of_32(value: int) -> int:
    return max(64, -(-int(value) // 32) * 32)


def _trained_materials(config) -> tuple[str, ...]:
    """The materials whose optics are weighed by default: those of the model's classes, or the
    simulator's four for a class-agnostic model."""
    names = {name.split('/')[0] for name in config.class_names if '/' in name}
    return tuple(m for m in MATERIALS if m in names) or MATERIALS


register_detector('maskrcnn')(MaskRCNNDetector)

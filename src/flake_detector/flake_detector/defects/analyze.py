"""The analysis pipeline: image -> lattice -> tiles in the lattice's frame -> hexagonal cells ->
unit cells -> self-calibration and masks -> classes -> counts and concentrations.

1. The lattice is measured on the image (lattice.find_lattice): no six-fold spots at the
   expected spacing means no atomic lattice of the material (an optical micrograph, a wrong
   pixel size or material); nothing is analysed and the analysis says why.
2. The frame is cut into tiles (central first); each tile is turned and resampled into the
   networks' frame, CNN-1 finds hexagonal cells and casting gives unit cells.
3. Self-calibration (calibrate.py): which column is the metal (decided on the central tile,
   kept for the frame), local references per sublattice, masks for contamination, holes,
   edges and odd contrast.
4. CNN-2 classifies every cell from its calibrated crop; the cell's centre and corners go back
   to image pixels and the tile whose core holds the centre keeps it (no double counting).

Concentrations are defects per cm^2 of analysed area: the number of analysed (unmasked)
unit cells times the area of one primitive cell of the material (sqrt(3)/2 a^2, one metal
and one chalcogen column). The 95 % interval is the exact (Garwood) Poisson interval on the
count divided by that area.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import math
from pathlib import Path
import threading
import time

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import chi2
import torch

from flake_core.materials import material as material_entry
from flake_core.materials import stem_lattice

from . import CLASS_COUNT, class_names
from .adf import AdfDetector, detector_from
from .calibrate import MASK_OK, MASK_REASONS, SublatticeDecision, calibrate_cells, calibrated_crops
from .casting import ALPHA, BETA, cast_unit_cells, merge_duplicates
from .lattice import CANONICAL_LATTICE_PX, CANONICAL_TILE_PX, LatticeFit, find_lattice, plan_tiles, to_canonical
from .models import (
    DETECTOR_INPUT,
    MODELS_DIR,
    ClassifierConfig,
    DetectorConfig,
    classify,
    crop_unit_cells,
    load_checkpoint,
    normalise,
    to_detector_tensor,
)

DETECTOR_CHECKPOINT = 'cnn1_hex.pt'
CLASSIFIER_CHECKPOINT = 'cnn2_2ch.pt'
MIN_IMAGE_PX = 64
MAX_IMAGE_PX = 8192
MIN_LATTICE_PX = 5.0          # below this the metal and chalcogen columns are not resolved
DETECTOR_EXPONENT_SPREAD = 0.3
ANY_DETECTOR_EXPONENTS = (0.7, 2.1)
SCALE_WARNING = 0.08          # measured / expected lattice constant off by more: warn
MASKED_WARNING = 0.5


class InvalidImageError(ValueError):
    """An input that is not a usable ADF-STEM image, with the reason."""


@dataclass
class DefectAnalysis:
    """Every unit cell found (analysed or masked) and what was assumed and measured."""

    material: str
    centres: np.ndarray                # (N, 2) cell centres in image pixels
    corners: np.ndarray                # (N, 4, 2) unit-cell box corners in image pixels
    classes: np.ndarray                # (N,)
    probabilities: np.ndarray          # (N, 6)
    mask: np.ndarray                   # (N,) calibrate.MASK_* (0: analysed)
    metal_level: np.ndarray            # (N,) normalised metal column signal
    chalcogen_level: np.ndarray        # (N,) normalised chalcogen column signal
    pixel_size: float                  # [m/px]
    image_shape: tuple[int, int]
    detector: str = ''                 # annular detector assumed, in words
    detector_source: str = 'default'   # 'file', 'request' or 'default' (any annular detector)
    lattice: LatticeFit | None = None
    sublattice: SublatticeDecision | None = None
    chalcogen_metal_ratio: float = float('nan')
    warnings: list[str] = field(default_factory=list)
    processing_time: float = 0.0       # [s]
    model_version: str = ''
    timings: dict = field(default_factory=dict)
    tiles: int = 0

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names(self.material)

    @property
    def cell_area(self) -> float:
        return stem_lattice(self.material).primitive_cell_area

    @property
    def analysed(self) -> np.ndarray:
        return self.mask == MASK_OK

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) axis-aligned hull of each unit cell in image pixels."""
        if len(self.corners) == 0:
            return np.zeros((0, 4))
        return np.concatenate([self.corners.min(axis=1), self.corners.max(axis=1)], 1)

    @property
    def counts(self) -> np.ndarray:
        """Analysed unit cells per class."""
        return np.bincount(self.classes[self.analysed].astype(np.int64), minlength=CLASS_COUNT)

    @property
    def analysed_area(self) -> float:
        """[m^2] covered by the analysed unit cells."""
        return int(self.analysed.sum()) * self.cell_area

    @property
    def masked_area(self) -> float:
        """[m^2] of unit cells found but not analysed (contamination, holes, edges)."""
        return int((~self.analysed).sum()) * self.cell_area

    @property
    def lattice_constant(self) -> float:
        """[m] measured in the image (the material's when no lattice was found)."""
        if self.lattice is None:
            return stem_lattice(self.material).lattice_a
        return self.lattice.lattice_px * self.pixel_size

    def concentrations(self, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(value, low, high) per class in cm^-2."""
        return poisson_concentration(self.counts, self.analysed_area * 1e4, confidence)

    def summary(self) -> dict:
        value, low, high = self.concentrations()
        masked = np.bincount(self.mask.astype(np.int64), minlength=len(MASK_REASONS))
        return {
            'material': self.material, 'material_label': material_entry(self.material).label,
            'detector': self.detector, 'detector_source': self.detector_source,
            'image_shape': list(self.image_shape), 'pixel_size_m': self.pixel_size,
            'lattice_found': bool(self.lattice.found) if self.lattice else False,
            'lattice_constant_m': self.lattice_constant,
            'lattice_constant_expected_m': stem_lattice(self.material).lattice_a,
            'lattice_rotation_deg': self.lattice.rotation_deg if self.lattice else 0.0,
            'lattice_spot_strength': self.lattice.strength if self.lattice else 0.0,
            'chalcogen_metal_ratio': (self.chalcogen_metal_ratio if math.isfinite(self.chalcogen_metal_ratio)
                                      else None),
            'sublattice_basis': self.sublattice.basis if self.sublattice else '',
            'sublattice_certain': bool(self.sublattice.certain) if self.sublattice else False,
            'expected_ratio_range': list(self.sublattice.expected_ratio) if self.sublattice else [],
            'cells_found': int(len(self.classes)), 'cells_total': int(self.analysed.sum()),
            'cells_masked': {MASK_REASONS[k]: int(masked[k]) for k in MASK_REASONS if k != MASK_OK},
            'analysed_area_m2': self.analysed_area, 'analysed_area_nm2': self.analysed_area * 1e18,
            'masked_area_nm2': self.masked_area * 1e18,
            'classes': [{'name': name, 'count': int(self.counts[k]), 'concentration_cm2': float(value[k]),
                         'concentration_low_cm2': float(low[k]), 'concentration_high_cm2': float(high[k])}
                        for k, name in enumerate(self.class_names)],
            'warnings': list(self.warnings), 'model_version': self.model_version,
            'processing_time_s': self.processing_time, 'tiles': self.tiles,
        }


def poisson_concentration(counts, area_cm2: float, confidence: float = 0.95):
    """Counts over an area -> (rate, low, high) per cm^2 with the exact Poisson interval."""
    counts = np.asarray(counts, dtype=np.float64)
    if area_cm2 <= 0:
        zeros = np.zeros_like(counts)
        return zeros, zeros, np.full_like(counts, np.inf)
    tail = (1.0 - confidence) / 2.0
    low = np.where(counts > 0, chi2.ppf(tail, 2 * counts) / 2.0, 0.0)
    high = chi2.ppf(1.0 - tail, 2 * counts + 2) / 2.0
    return counts / area_cm2, low / area_cm2, high / area_cm2


def validate_image(image) -> tuple[np.ndarray, list[str]]:
    """A 2-D numeric image (its own dtype, not copied when it need not be) and warnings; or InvalidImageError."""
    if image is None:
        raise InvalidImageError('no image given')
    array = np.asarray(image)
    warnings = []
    if array.size == 0:
        raise InvalidImageError('image is empty')
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InvalidImageError(f'image has non-numeric pixels ({array.dtype})')
    if np.iscomplexobj(array):
        raise InvalidImageError('image has complex pixels (a Fourier transform?), not intensities')
    if array.ndim == 3 and array.shape[2] in (3, 4):
        colour = array[..., :3].astype(np.float32)
        spread = float(np.abs(colour - colour.mean(axis=2, keepdims=True)).mean())
        if spread > 0.02 * (float(colour.max() - colour.min()) + 1e-6):
            warnings.append('the image is in colour; ADF-STEM frames are single-channel intensities '
                            '(is this an optical micrograph?)')
        array = colour.mean(axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise InvalidImageError(f'expected a single-channel 2-D image, got shape {array.shape}')
    H, W = array.shape
    if min(H, W) < MIN_IMAGE_PX or max(H, W) > MAX_IMAGE_PX:
        raise InvalidImageError(f'image is {W}x{H} px; supported sizes are {MIN_IMAGE_PX} to '
                                f'{MAX_IMAGE_PX} px per side')
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InvalidImageError('image contains NaN or infinite pixels')
    if float(array.max()) - float(array.min()) <= 0:
        raise InvalidImageError('image is blank (all pixels equal)')
    return array, warnings


def prepare_input(image, pixel_size: float | None, material: str = 'mote2') -> tuple[np.ndarray, float, list[str]]:
    """Validated image, pixel size [m/px] and warnings, or InvalidImageError / ValueError."""
    pixels, warnings = validate_image(image)
    if pixel_size is None or not math.isfinite(float(pixel_size)) or float(pixel_size) <= 0:
        raise InvalidImageError('no pixel size: the file carries none; give it (--pixel-size, in m/px, '
                                'or the request\'s pixel_size)')
    pixel_size = float(pixel_size)
    if not (1e-13 < pixel_size < 1e-9):
        raise InvalidImageError(f'pixel size {pixel_size} m/px is outside 1e-13..1e-9 m/px')
    lattice_px = stem_lattice(material).lattice_a / pixel_size
    if lattice_px < MIN_LATTICE_PX:
        raise InvalidImageError(f'at {pixel_size:.3g} m/px the lattice constant spans {lattice_px:.1f} px; '
                                f'at least {MIN_LATTICE_PX:g} px are needed to resolve the columns')
    if min(pixels.shape) < 2.5 * lattice_px:
        raise InvalidImageError(f'image of {pixels.shape[1]}x{pixels.shape[0]} px holds no whole '
                                f'hexagonal cell at {pixel_size:.3g} m/px (lattice {lattice_px:.0f} px)')
    return pixels, pixel_size, warnings


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def detect_boxes(model, config: DetectorConfig, normalised: np.ndarray,
                 tile: int = DETECTOR_INPUT) -> tuple[np.ndarray, np.ndarray]:
    """CNN-1 boxes (of ``config.target``) in the networks' frame with scores, over overlapping inputs."""
    H, W = normalised.shape
    # Overlap wider than two hexagonal cells so every cell lies whole inside some input's core.
    overlap = int(math.ceil(4 * config.lattice_px))
    boxes, scores = [], []
    for y0 in _tile_starts(H, tile, overlap):
        for x0 in _tile_starts(W, tile, overlap):
            patch = np.zeros((tile, tile), dtype=np.float32)
            view = normalised[y0:y0 + tile, x0:x0 + tile]
            patch[:view.shape[0], :view.shape[1]] = view
            output = model([to_detector_tensor(patch)])[0]
            b = output['boxes'].numpy().astype(np.float64)
            s = output['scores'].numpy().astype(np.float64)
            keep = s >= config.score_threshold
            b, s = b[keep], s[keep]
            # Keep a box only in the input whose core holds its centre (cores partition the image).
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            lo_x = 0 if x0 == 0 else overlap / 2
            lo_y = 0 if y0 == 0 else overlap / 2
            hi_x = tile if x0 + tile >= W else tile - overlap / 2
            hi_y = tile if y0 + tile >= H else tile - overlap / 2
            core = (cx >= lo_x) & (cx < hi_x) & (cy >= lo_y) & (cy < hi_y)
            boxes.append(b[core] + [x0, y0, x0, y0])
            scores.append(s[core])
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    scores = np.concatenate(scores) if scores else np.zeros(0)
    return boxes.reshape(-1, 4), scores


def consistent_size(boxes: np.ndarray, low: float = 0.75, high: float = 1.3) -> np.ndarray:
    """Mask of boxes whose width and height are near the median: a crystal's cells all share one size,
    so boxes around cells cut by the frame edge or spanning several cells are dropped."""
    if len(boxes) < 5:
        return np.ones(len(boxes), dtype=bool)
    size = boxes[:, 2:] - boxes[:, :2]
    ratio = size / np.median(size, axis=0)
    return ((ratio >= low) & (ratio <= high)).all(axis=1)


def merge_close_centres(boxes: np.ndarray, scores: np.ndarray, distance: float) -> np.ndarray:
    """Indices kept when boxes whose centres are closer than ``distance`` are one cell (best score kept).

    Unit-cell centres lie a lattice constant apart, so two boxes half of that apart are the same cell
    cast from two neighbouring hexagons whose boxes differ a little (IoU merging misses some of them).
    """
    if len(boxes) < 2:
        return np.arange(len(boxes))
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    pairs = cKDTree(centres).query_pairs(distance, output_type='ndarray')
    if len(pairs) == 0:
        return np.arange(len(boxes))
    neighbours = [[] for _ in range(len(boxes))]
    for i, j in pairs:
        neighbours[i].append(j)
        neighbours[j].append(i)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for index in np.argsort(-np.asarray(scores), kind='stable'):
        if suppressed[index]:
            continue
        keep.append(int(index))
        suppressed[neighbours[index]] = True
    return np.sort(np.asarray(keep, dtype=np.int64))


def detect_unit_cells(model, config: DetectorConfig, normalised: np.ndarray, valid: np.ndarray | None = None,
                      alpha: float = ALPHA, beta: float = BETA) -> tuple[np.ndarray, np.ndarray]:
    """Unit-cell boxes wholly inside the readable image, by casting (hex target) or directly (unit target)."""
    boxes, scores = detect_boxes(model, config, normalised)
    keep = consistent_size(boxes)
    boxes, scores = boxes[keep], scores[keep]
    if config.target == 'hex':
        boxes = cast_unit_cells(boxes, alpha, beta)
        scores = np.repeat(scores, 2)
    keep = merge_duplicates(boxes, scores, 0.5)
    boxes, scores = boxes[keep], scores[keep]
    keep = merge_close_centres(boxes, scores, 0.5 * config.lattice_px)
    boxes, scores = boxes[keep], scores[keep]
    H, W = normalised.shape
    # Cells cut by the frame edge are incomplete: like the ground truth, keep whole cells only.
    slack = 1.0
    inside = ((boxes[:, 0] >= -slack) & (boxes[:, 1] >= -slack)
              & (boxes[:, 2] <= W + slack) & (boxes[:, 3] <= H + slack))
    if valid is not None and inside.any():
        for xs, ys in ((0, 1), (2, 1), (0, 3), (2, 3)):
            x = np.clip(np.rint(boxes[:, xs]).astype(np.int64), 0, W - 1)
            y = np.clip(np.rint(boxes[:, ys]).astype(np.int64), 0, H - 1)
            inside &= valid[y, x]
    boxes, scores = boxes[inside], scores[inside]
    order = np.lexsort((boxes[:, 0], np.round(boxes[:, 1] / (0.1 * config.lattice_px))))
    return boxes[order], scores[order]


class DefectAnalyzer:
    """CNN-1 + casting + self-calibration + CNN-2 loaded from checkpoints; ``analyze`` is thread-safe."""

    def __init__(self, detector_path: Path | None = None, classifier_path: Path | None = None,
                 threads: int = 1, alpha: float = ALPHA, beta: float = BETA,
                 score_threshold: float | None = None):
        detector_path = Path(detector_path or MODELS_DIR / DETECTOR_CHECKPOINT)
        classifier_path = Path(classifier_path or MODELS_DIR / CLASSIFIER_CHECKPOINT)
        self.detector, self.detector_config = load_checkpoint(detector_path)
        self.classifier, self.classifier_config = load_checkpoint(classifier_path)
        if not isinstance(self.detector_config, DetectorConfig):
            raise ValueError(f'{detector_path} is not a detector checkpoint')
        if not isinstance(self.classifier_config, ClassifierConfig):
            raise ValueError(f'{classifier_path} is not a classifier checkpoint')
        if score_threshold is not None:
            self.detector_config = DetectorConfig(**{**self.detector_config.__dict__,
                                                     'score_threshold': score_threshold})
        self.alpha, self.beta, self.threads = alpha, beta, threads
        # Largest tile side in the networks' frame: bounds the memory of one tile's work (see docs/defects.md).
        self.canonical_tile = CANONICAL_TILE_PX
        self.model_version = f'{detector_path.stem}+{classifier_path.stem}'
        self._lock = threading.Lock()

    def analyze(self, image, pixel_size: float | None, material: str = 'mote2',
                detector: str | AdfDetector | None = None, detector_source: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> DefectAnalysis:
        """Analyse one frame of ``material`` (a name of flake_core.materials with a STEM lattice).

        ``detector``: an AdfDetector, a preset name or 'INNER-OUTER' mrad; None means any annular
        detector (the sublattices are then told apart by the image alone). ``progress(done, total)``
        is called after each tile.
        """
        lattice = stem_lattice(material)
        material = material_entry(material).name
        pixels, pixel_size, warnings = prepare_input(image, pixel_size, material)
        if detector is None or detector == '':
            adf, exponents, detector_label = None, ANY_DETECTOR_EXPONENTS, 'unknown (any annular detector)'
            detector_source = 'default'
        else:
            adf = detector_from(detector)
            exponents = (adf.exponent - DETECTOR_EXPONENT_SPREAD, adf.exponent + DETECTOR_EXPONENT_SPREAD)
            detector_label = adf.label
            detector_source = detector_source or 'request'
        with self._lock:
            torch.set_num_threads(self.threads)
            start = time.perf_counter()
            fit = find_lattice(pixels, lattice.lattice_a / pixel_size)
            result = DefectAnalysis(
                material=material, centres=np.zeros((0, 2)), corners=np.zeros((0, 4, 2)),
                classes=np.zeros(0, np.int64), probabilities=np.zeros((0, CLASS_COUNT)),
                mask=np.zeros(0, np.uint8), metal_level=np.zeros(0), chalcogen_level=np.zeros(0),
                pixel_size=pixel_size, image_shape=tuple(pixels.shape), detector=detector_label,
                detector_source=detector_source, lattice=fit, warnings=warnings, model_version=self.model_version)
            if not fit.found:
                result.warnings.append(
                    f'no atomic lattice of {lattice_label(material)} found at {fit.expected_px * pixel_size * 1e9:.3f} '
                    f'nm ({fit.expected_px:.1f} px; six-fold spot strength {fit.strength:.1f}, a lattice gives '
                    f'25 or more): this does not look like an atomic-resolution ADF-STEM image of this material, '
                    f'or the pixel size or material is wrong. Nothing was analysed.')
                result.processing_time = time.perf_counter() - start
                return result
            if abs(fit.scale_error) > SCALE_WARNING:
                result.warnings.append(
                    f'the lattice constant measured in the image is {fit.lattice_px * pixel_size * 1e9:.3f} nm, '
                    f'{100 * fit.scale_error:+.0f} % from {lattice_label(material)} '
                    f'({lattice.lattice_a * 1e9:.3f} nm): check the pixel size and the material')
            self._run_tiles(pixels, fit, lattice, exponents, result, progress)
            result.processing_time = time.perf_counter() - start
        self._check(result, adf)
        return result

    def _run_tiles(self, pixels, fit: LatticeFit, lattice, exponents, result: DefectAnalysis, progress) -> None:
        scale = CANONICAL_LATTICE_PX / fit.lattice_px
        tiles = plan_tiles(pixels.shape[0], pixels.shape[1], fit.lattice_px, scale, self.canonical_tile)
        parts = []
        decision = None
        ratio = float('nan')
        timings = {'detection_s': 0.0, 'calibration_s': 0.0, 'classification_s': 0.0}
        for index, tile in enumerate(tiles):
            x0, y0, x1, y1 = tile.region
            canonical, valid, transform = to_canonical(pixels[y0:y1, x0:x1], fit.rotation_deg, scale)
            started = time.perf_counter()
            normalised = normalise(canonical, valid)
            boxes, _ = detect_unit_cells(self.detector, self.detector_config, normalised, valid,
                                         self.alpha, self.beta)
            detected = time.perf_counter()
            calibration, tile_decision = calibrate_cells(canonical, boxes, CANONICAL_LATTICE_PX, lattice, exponents,
                                                         valid, decision)
            if decision is None and len(boxes) >= 20:
                decision = tile_decision   # the central tile decides for the whole frame
                ratio = calibration.ratio
            calibrated = time.perf_counter()
            config = self.classifier_config
            if config.calibrated:
                inputs = torch.from_numpy(calibrated_crops(canonical, boxes, calibration,
                                                           tile_decision.metal_site, config.input_size))
            else:
                inputs = crop_unit_cells(normalised, boxes, config.channels, config.input_size)
            probabilities = classify(self.classifier, inputs).numpy()
            finished = time.perf_counter()
            timings['detection_s'] += detected - started
            timings['calibration_s'] += calibrated - detected
            timings['classification_s'] += finished - calibrated
            del canonical, normalised, inputs
            corners_canonical = np.stack([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [2, 3]], boxes[:, [0, 3]]], 1)
            corners = transform.to_image(corners_canonical.reshape(-1, 2)).reshape(-1, 4, 2) + [x0, y0]
            centres = corners.mean(axis=1)
            cx0, cy0, cx1, cy1 = tile.core
            own = (centres[:, 0] >= cx0) & (centres[:, 0] < cx1) & (centres[:, 1] >= cy0) & (centres[:, 1] < cy1)
            parts.append((centres[own], corners[own], probabilities[own], calibration.mask[own],
                          calibration.metal[own], calibration.chalcogen[own]))
            if progress is not None:
                progress(index + 1, len(tiles))
        if parts:
            centres, corners, probabilities, mask, metal, chalcogen = (np.concatenate(p) for p in zip(*parts))
            if len(tiles) > 1 and len(centres):
                # A cell on the line between two cores may be seen by both tiles a pixel apart, once on each side.
                half = 0.25 * fit.lattice_px
                keep = merge_close_centres(np.concatenate([centres - half, centres + half], 1),
                                           probabilities.max(axis=1), 0.5 * fit.lattice_px)
                centres, corners, probabilities = centres[keep], corners[keep], probabilities[keep]
                mask, metal, chalcogen = mask[keep], metal[keep], chalcogen[keep]
            result.centres, result.corners, result.probabilities = centres, corners, probabilities
            result.classes = probabilities.argmax(1) if len(probabilities) else np.zeros(0, np.int64)
            result.mask, result.metal_level, result.chalcogen_level = mask.astype(np.uint8), metal, chalcogen
        result.sublattice = decision
        result.chalcogen_metal_ratio = ratio
        result.timings = timings
        result.tiles = len(tiles)

    @staticmethod
    def _check(result: DefectAnalysis, adf: AdfDetector | None) -> None:
        found = len(result.classes)
        if result.lattice is not None and result.lattice.found and found == 0:
            result.warnings.append('a lattice was seen in the spectrum but no unit cell was found in the image')
        if found and (~result.analysed).mean() > MASKED_WARNING:
            result.warnings.append(f'{100 * (~result.analysed).mean():.0f} % of the unit cells found were masked '
                                   '(contamination, holes, edges or odd contrast); concentrations rest on the rest')
        decision = result.sublattice
        if decision is not None and not decision.certain:
            result.warnings.append('metal and chalcogen columns could not be told apart with confidence (contrast '
                                   f'ratio {decision.measured_ratio:.2f}, few half-filled columns): assumed the '
                                   'expected contrast; name the detector to settle it')
        if decision is not None and adf is not None and math.isfinite(result.chalcogen_metal_ratio):
            low, high = decision.expected_ratio
            if not (0.7 * low <= result.chalcogen_metal_ratio <= high / 0.7):
                result.warnings.append(
                    f'chalcogen/metal column ratio {result.chalcogen_metal_ratio:.2f} is outside {low:.2f}-{high:.2f} '
                    f'expected for {lattice_label(result.material)} on {adf.label}: check the material and detector')


def lattice_label(material: str) -> str:
    return material_entry(material).label

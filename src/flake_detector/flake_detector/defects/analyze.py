"""The analysis pipeline: image -> hexagonal cells -> unit cells -> classes -> counts and concentrations.

Concentrations are defects per cm^2 of analysed area; the analysed area is the number
of classified unit cells times the area of one primitive cell of 2H-MoTe2
(sqrt(3)/2 a^2, one Mo and one Te2 column). The 95 % interval is the exact
(Garwood) Poisson interval on the count divided by that area.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from pathlib import Path
import threading
import time

import cv2
import numpy as np
from scipy.stats import chi2
import torch

from . import CLASS_NAMES
from .casting import ALPHA, BETA, cast_unit_cells, merge_duplicates
from .models import (
    DETECTOR_INPUT,
    MODELS_DIR,
    ClassifierConfig,
    DetectorConfig,
    classify,
    crop_unit_cells,
    detector_scale,
    load_checkpoint,
    normalise,
    to_detector_tensor,
)
from .simulate import LATTICE_A, PRIMITIVE_CELL_AREA, SEED_PIXEL_SIZE

DETECTOR_CHECKPOINT = 'cnn1_hex.pt'
CLASSIFIER_CHECKPOINT = 'cnn2_2ch.pt'
MIN_IMAGE_PX = 64
MAX_IMAGE_PX = 8192


class InvalidImageError(ValueError):
    """An input that is not a usable HAADF-STEM image, with the reason."""


@dataclass
class DefectAnalysis:
    boxes: np.ndarray                  # (N, 4) unit-cell boxes, xyxy [px]
    classes: np.ndarray                # (N,)
    probabilities: np.ndarray          # (N, 6)
    pixel_size: float                  # [m/px]
    image_shape: tuple[int, int]
    processing_time: float = 0.0       # [s]
    model_version: str = ''
    class_names: tuple[str, ...] = CLASS_NAMES
    timings: dict = field(default_factory=dict)

    @property
    def counts(self) -> np.ndarray:
        return np.bincount(self.classes.astype(np.int64), minlength=len(CLASS_NAMES))

    @property
    def analysed_area(self) -> float:
        """[m^2] covered by the classified unit cells."""
        return len(self.classes) * PRIMITIVE_CELL_AREA

    def concentrations(self, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(value, low, high) per class in cm^-2."""
        return poisson_concentration(self.counts, self.analysed_area * 1e4, confidence)

    def summary(self) -> dict:
        value, low, high = self.concentrations()
        return {
            'image_shape': list(self.image_shape), 'pixel_size_m': self.pixel_size,
            'cells_total': int(len(self.classes)), 'analysed_area_m2': self.analysed_area,
            'analysed_area_nm2': self.analysed_area * 1e18,
            'classes': [{'name': name, 'count': int(self.counts[k]), 'concentration_cm2': float(value[k]),
                         'concentration_low_cm2': float(low[k]), 'concentration_high_cm2': float(high[k])}
                        for k, name in enumerate(self.class_names)],
            'model_version': self.model_version, 'processing_time_s': self.processing_time,
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


def validate_image(image) -> np.ndarray:
    """Return a float32 (H, W) image or raise InvalidImageError saying what is wrong."""
    if image is None:
        raise InvalidImageError('no image given')
    array = np.asarray(image)
    if array.size == 0:
        raise InvalidImageError('image is empty')
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InvalidImageError(f'image has non-numeric pixels ({array.dtype})')
    if array.ndim == 3 and array.shape[2] in (3, 4):
        array = array[..., :3].astype(np.float32).mean(axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise InvalidImageError(f'expected a single-channel 2-D image, got shape {array.shape}')
    H, W = array.shape
    if min(H, W) < MIN_IMAGE_PX or max(H, W) > MAX_IMAGE_PX:
        raise InvalidImageError(f'image is {W}x{H} px; supported sizes are {MIN_IMAGE_PX} to '
                                f'{MAX_IMAGE_PX} px per side')
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidImageError('image contains NaN or infinite pixels')
    if float(array.max() - array.min()) <= 0:
        raise InvalidImageError('image is blank (all pixels equal)')
    return array


def prepare_input(image, pixel_size: float | None = None) -> tuple[np.ndarray, float]:
    """Validated float32 image and pixel size [m/px] (None or 0: seed 003 scale), or InvalidImageError."""
    pixels = validate_image(image)
    pixel_size = float(pixel_size) if pixel_size else SEED_PIXEL_SIZE
    if not (1e-13 < pixel_size < 1e-9):
        raise InvalidImageError(f'pixel size {pixel_size} m/px is outside 1e-13..1e-9 m/px')
    lattice_px = LATTICE_A / pixel_size
    if min(pixels.shape) < 2.5 * lattice_px:
        raise InvalidImageError(f'image of {pixels.shape[1]}x{pixels.shape[0]} px holds no whole '
                                f'hexagonal cell at {pixel_size:.3g} m/px (lattice {lattice_px:.0f} px)')
    return pixels, pixel_size


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def detect_boxes(model, config: DetectorConfig, normalised: np.ndarray, pixel_size: float,
                 tile: int = DETECTOR_INPUT) -> tuple[np.ndarray, np.ndarray]:
    """CNN-1 boxes (of ``config.target``) in image pixels with scores, over overlapping tiles."""
    scale = detector_scale(pixel_size, config.lattice_px)
    H, W = normalised.shape
    small = cv2.resize(normalised, (max(round(W * scale), 1), max(round(H * scale), 1)),
                       interpolation=cv2.INTER_AREA)
    h, w = small.shape
    # Overlap wider than two hexagonal cells so every cell lies whole inside some tile core.
    overlap = int(math.ceil(4 * config.lattice_px))
    boxes, scores = [], []
    for y0 in _tile_starts(h, tile, overlap):
        for x0 in _tile_starts(w, tile, overlap):
            patch = np.zeros((tile, tile), dtype=np.float32)
            view = small[y0:y0 + tile, x0:x0 + tile]
            patch[:view.shape[0], :view.shape[1]] = view
            output = model([to_detector_tensor(patch)])[0]
            b = output['boxes'].numpy().astype(np.float64)
            s = output['scores'].numpy().astype(np.float64)
            keep = s >= config.score_threshold
            b, s = b[keep], s[keep]
            # Keep a box only in the tile whose core holds its centre (cores partition the image).
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            lo_x = 0 if x0 == 0 else overlap / 2
            lo_y = 0 if y0 == 0 else overlap / 2
            hi_x = tile if x0 + tile >= w else tile - overlap / 2
            hi_y = tile if y0 + tile >= h else tile - overlap / 2
            core = (cx >= lo_x) & (cx < hi_x) & (cy >= lo_y) & (cy < hi_y)
            boxes.append(b[core] + [x0, y0, x0, y0])
            scores.append(s[core])
    boxes = np.concatenate(boxes) / scale if boxes else np.zeros((0, 4))
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


def detect_unit_cells(model, config: DetectorConfig, normalised: np.ndarray, pixel_size: float,
                      alpha: float = ALPHA, beta: float = BETA) -> tuple[np.ndarray, np.ndarray]:
    """Unit-cell boxes wholly inside the image, by casting (hex target) or directly (unit target)."""
    boxes, scores = detect_boxes(model, config, normalised, pixel_size)
    keep = consistent_size(boxes)
    boxes, scores = boxes[keep], scores[keep]
    if config.target == 'hex':
        boxes = cast_unit_cells(boxes, alpha, beta)
        scores = np.repeat(scores, 2)
    keep = merge_duplicates(boxes, scores, 0.5)
    boxes, scores = boxes[keep], scores[keep]
    H, W = normalised.shape
    # Cells cut by the frame edge are incomplete: like the ground truth, keep whole cells only.
    slack = 1.0
    inside = ((boxes[:, 0] >= -slack) & (boxes[:, 1] >= -slack)
              & (boxes[:, 2] <= W + slack) & (boxes[:, 3] <= H + slack))
    boxes, scores = boxes[inside], scores[inside]
    order = np.lexsort((boxes[:, 0], np.round(boxes[:, 1] * pixel_size / (0.1 * LATTICE_A))))
    return boxes[order], scores[order]


class DefectAnalyzer:
    """CNN-1 + casting + CNN-2 loaded from checkpoints; ``analyze`` is thread-safe."""

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
        self.model_version = f'{detector_path.stem}+{classifier_path.stem}'
        self._lock = threading.Lock()

    def analyze(self, image, pixel_size: float | None = None) -> DefectAnalysis:
        pixels, pixel_size = prepare_input(image, pixel_size)
        with self._lock:
            torch.set_num_threads(self.threads)
            start = time.perf_counter()
            normalised = normalise(pixels)
            boxes, _ = detect_unit_cells(self.detector, self.detector_config, normalised, pixel_size,
                                         self.alpha, self.beta)
            detected = time.perf_counter()
            inputs = crop_unit_cells(normalised, boxes, self.classifier_config.channels,
                                     self.classifier_config.input_size)
            probabilities = classify(self.classifier, inputs).numpy()
            finished = time.perf_counter()
        classes = probabilities.argmax(1) if len(probabilities) else np.zeros(0, dtype=np.int64)
        return DefectAnalysis(boxes=boxes, classes=classes, probabilities=probabilities,
                              pixel_size=pixel_size, image_shape=pixels.shape,
                              processing_time=finished - start, model_version=self.model_version,
                              timings={'detection_s': detected - start, 'classification_s': finished - detected})

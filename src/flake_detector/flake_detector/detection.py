"""What every detector backend returns, and the registry that builds backends by name.

A backend is any object with a ``name``, a ``model_version`` and a
``detect(image_bgr) -> FrameResult`` method; images are HxWx3 uint8 BGR frames
as the camera publishes them. Backends register a factory under a name:

    register_detector('contrast')(OpticalDetector)

and users build them with ``make_detector('contrast', material='graphene')``.
A backend that lives in a module which is expensive to import (torch models) is
listed in ``_LAZY_MODULES`` instead: its module is imported, and so registers
itself, the first time its name is asked for. The Mask R-CNN backend plugs in this
way from ``flake_detector.maskrcnn`` without this module importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
import importlib
import inspect
from typing import Any, Protocol

import numpy as np

from flake_core.materials import LAYER_CLASS_NAMES, LAYER_UNKNOWN, layer_class_of


@dataclass
class Detection:
    """One flake found in one frame. Pixel quantities are in the frame's pixels.

    ``bbox`` is (x, y, width, height); ``mask`` is a bool array of shape
    (height, width) covering ``bbox`` (True = flake).
    """

    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    material: str = 'unknown'
    layers: float = float('nan')
    layers_std: float = float('nan')
    thickness_nm: float = float('nan')
    thickness_nm_std: float = float('nan')
    score: float = 0.0
    detector: str = ''
    model_version: str = ''
    layer_class: int = LAYER_UNKNOWN
    contrast: tuple[float, float, float] = (float('nan'),) * 3  # mean (R, G, B) contrast
    homogeneity: float = float('nan')
    edge_straightness: float = float('nan')
    isolation_px: float = float('nan')  # distance to the nearest other detection [px]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.bbox = tuple(int(v) for v in self.bbox)
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.shape != (self.bbox[3], self.bbox[2]):
            raise ValueError(f'mask shape {self.mask.shape} does not cover bbox {self.bbox}')
        if self.layer_class == LAYER_UNKNOWN and np.isfinite(self.layers):
            self.layer_class = layer_class_of(self.layers)

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    def centroid_px(self) -> tuple[float, float]:
        """Centroid (u, v) of the mask in frame pixels."""
        vs, us = np.nonzero(self.mask)
        if len(us) == 0:
            x, y, w, h = self.bbox
            return x + (w - 1) / 2.0, y + (h - 1) / 2.0
        return self.bbox[0] + float(us.mean()), self.bbox[1] + float(vs.mean())

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask pasted into a frame of ``shape`` (height, width)."""
        out = np.zeros(shape[:2], dtype=bool)
        x, y, w, h = self.bbox
        out[y:y + h, x:x + w] = self.mask[:max(0, min(h, shape[0] - y)), :max(0, min(w, shape[1] - x))]
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly record; the mask as COCO RLE of the bbox-sized mask."""
        data = asdict(self)
        data.pop('mask')
        data['area_px'] = self.area_px
        data['layer_class_name'] = LAYER_CLASS_NAMES.get(self.layer_class, 'unknown')
        data['mask_rle'] = encode_rle(self.mask)
        return _finite_or_none(data)


@dataclass
class FunnelStage:
    """Candidates left after one stage of a detector (Greplova et al. (2020), Fig. 2)."""

    stage: str
    remaining: int


@dataclass
class FrameResult:
    """A backend's answer for one frame."""

    detections: list[Detection]
    candidates: int = 0  # candidates considered before the final decision
    funnel: list[FunnelStage] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step


class Detector(Protocol):
    name: str
    model_version: str

    def detect(self, image_bgr: np.ndarray) -> FrameResult: ...


_FACTORIES: dict[str, Callable[..., Detector]] = {}
_LAZY_MODULES = {
    'contrast': 'flake_detector.optical',
    'cascade': 'flake_detector.cascade',
    'maskrcnn': 'flake_detector.maskrcnn',
}


def register_detector(name: str):
    """Decorator: register ``factory(**params) -> Detector`` (usually the backend class) under ``name``;
    the factory's signature is the list of parameters the backend accepts."""

    def wrap(factory):
        _FACTORIES[name] = factory
        return factory

    return wrap


def available_detectors() -> list[str]:
    return sorted(set(_FACTORIES) | set(_LAZY_MODULES))


def make_detector(name: str, **params) -> Detector:
    """Build the backend registered as ``name`` with its keyword parameters."""
    if name not in _FACTORIES and name in _LAZY_MODULES:
        try:
            importlib.import_module(_LAZY_MODULES[name])
        except ModuleNotFoundError as exc:
            raise ValueError(f'detector backend {name!r} is not installed ({exc})') from exc
    if name not in _FACTORIES:
        raise ValueError(f'unknown detector backend {name!r}; available: {available_detectors()}')
    factory = _FACTORIES[name]
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as exc:  # a misspelled or foreign parameter: name it rather than drop it
        raise ValueError(f'detector backend {name!r}: {exc}') from None
    return factory(**params)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE (compressed counts as text) of a bool mask."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {'size': [int(v) for v in rle['size']], 'counts': rle['counts'].decode('ascii')}


def _finite_or_none(value):
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, np.generic):
        return _finite_or_none(value.item())
    return value


def region_quality(mask: np.ndarray, contrast: np.ndarray | None = None) -> dict[str, float]:
    """Homogeneity and edge straightness of a bool mask (bbox-sized).

    Homogeneity is 1 - (spread of the contrast inside the flake / its mean magnitude),
    clipped to [0, 1]; edge straightness is the share of the outline lying on long
    straight segments of its polygon approximation (cleaved edges are straight).
    """
    import cv2

    out = {'homogeneity': float('nan'), 'edge_straightness': float('nan')}
    if contrast is not None and mask.any():
        values = contrast[mask]
        magnitude = float(np.linalg.norm(values.mean(axis=0)))
        spread = float(np.linalg.norm(values.std(axis=0)))
        if magnitude > 1e-6:
            out['homogeneity'] = float(np.clip(1.0 - spread / magnitude, 0.0, 1.0))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if contours:
        contour = max(contours, key=cv2.contourArea)
        perimeter = cv2.arcLength(contour, True)
        if perimeter > 0:
            poly = cv2.approxPolyDP(contour, max(1.0, 0.02 * perimeter), True).reshape(-1, 2)
            seg = np.linalg.norm(np.roll(poly, -1, axis=0) - poly, axis=1)
            long_segments = seg[seg >= max(5.0, 0.1 * perimeter)].sum()
            out['edge_straightness'] = float(np.clip(long_segments / perimeter, 0.0, 1.0))
    return out


def add_isolation(detections: list[Detection]) -> None:
    """Distance from each detection's bbox to the nearest other one [px]."""
    if not detections:
        return
    boxes = np.array([d.bbox for d in detections], dtype=np.float64)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    dx = np.maximum(0.0, np.maximum(x0[:, None], x0[None, :]) - np.minimum(x1[:, None], x1[None, :]))
    dy = np.maximum(0.0, np.maximum(y0[:, None], y0[None, :]) - np.minimum(y1[:, None], y1[None, :]))
    distance = np.hypot(dx, dy)
    np.fill_diagonal(distance, np.inf)
    for detection, best in zip(detections, distance.min(axis=1), strict=True):
        detection.isolation_px = float(best)


@dataclass
class WaferGeometry:
    """Where a detection lies on the chip: what the registry keys a flake by."""

    centre: tuple[float, float]  # wafer frame [m]
    contour: np.ndarray  # (N, 2) outline, wafer frame [m]
    area_m2: float
    isolation_m: float  # distance to the nearest other detection (or frame edge) [m]


def wafer_geometry(detection: Detection, pixel_to_wafer, frame_shape: tuple[int, int],
                   max_points: int = 64) -> WaferGeometry:
    """Centre, outline, area and isolation of ``detection`` in the wafer frame.

    ``pixel_to_wafer`` is a flake_core.geometry.Affine2D (pixel centres at
    integers). The isolation is bounded by the distance to the frame edge when no
    other detection lies in the frame, since nothing beyond it was seen.
    """
    import cv2

    scale = pixel_to_wafer.scale  # metres per pixel
    u, v = detection.centroid_px()
    centre = pixel_to_wafer.apply(u, v)
    contours, _ = cv2.findContours(detection.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        contour = max(contours, key=cv2.contourArea)
        epsilon = 0.5
        while len(contour) > max_points:
            contour = cv2.approxPolyDP(contour, epsilon, True)
            epsilon *= 2.0
        points = contour.reshape(-1, 2).astype(np.float64) + np.array(detection.bbox[:2], dtype=np.float64)
    else:
        x, y, w, h = detection.bbox
        points = np.array([[x, y], [x + w - 1, y], [x + w - 1, y + h - 1], [x, y + h - 1]], dtype=np.float64)
    contour_wafer = pixel_to_wafer.apply_points(points)
    isolation_px = detection.isolation_px
    x, y, w, h = detection.bbox
    to_edge = float(min(x, y, frame_shape[1] - (x + w), frame_shape[0] - (y + h)))
    if not np.isfinite(isolation_px):
        isolation_px = max(0.0, to_edge)
    return WaferGeometry((float(centre[0]), float(centre[1])), contour_wafer,
                         float(detection.area_px) * scale * scale, float(isolation_px) * scale)

"""Greplova et al.'s candidate finder: a local standard-deviation map, a loose threshold,
fixed-size crops around what stands out, near-duplicates merged.

The threshold is loose on purpose (Greplova et al. (2020): "sufficiently loose ... such that no
good flake would be missed"); the classifier behind it removes the junk. The
standard deviation is taken relative to the frame's substrate level, so the same
threshold works at any illumination. The std filter fires on edges, so the outline
of a flake is filled to give one region per object.

Every candidate keeps its position in the frame and, given the frame's
pixel-to-wafer map, on the wafer: a flake is identified by its wafer coordinates
from this step on (Greplova et al. (2020)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math

import cv2
import numpy as np

from flake_core.geometry import Affine2D


@dataclass
class Candidate:
    centre_px: tuple[float, float]  # (u, v) centroid of the region in the frame
    bbox: tuple[int, int, int, int]  # region bounding box (x, y, w, h) in the frame
    mask: np.ndarray  # bool region covering bbox (outline filled)
    window: tuple[int, int, int]  # square crop (x, y, side) in the frame, may extend past the edges
    strength: float  # peak relative std inside the region
    wafer_xy: tuple[float, float] | None = None  # centre in the wafer frame [m]
    merged: int = 1  # raw regions merged into this one
    extra: dict = field(default_factory=dict)

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class CandidateFinder:
    """Parameters of the finder; ``find(image)`` returns the candidates of one frame."""

    crop_size: int = 80  # side of the crops handed to the classifier [px]
    window: int = 7  # side of the local std window [px]
    std_threshold: float = 0.02  # relative std (std / substrate level) that marks an edge
    min_area_px: int = 30  # smallest region kept, at full resolution
    merge_distance_px: float = 40.0  # candidates whose centres are closer merge
    fit_large: bool = True  # crop a flake larger than crop_size whole (then resize) rather than its centre
    margin: float = 0.25  # border around a large flake's box in its crop, relative to the box
    work_size: int = 512  # frames are searched at this many px on the long side (0: full resolution)

    def __post_init__(self):
        if self.crop_size < 8:
            raise ValueError(f'crop_size must be >= 8 px, got {self.crop_size}')
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f'window must be odd and >= 3, got {self.window}')
        if not self.std_threshold > 0:
            raise ValueError(f'std_threshold must be > 0, got {self.std_threshold}')

    def std_map(self, image: np.ndarray) -> np.ndarray:
        """Local standard deviation of the grey level relative to the substrate level."""
        gray = (cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY) if image.ndim == 3
                else image).astype(np.float32)
        mean = cv2.blur(gray, (self.window, self.window))
        mean_sq = cv2.blur(gray * gray, (self.window, self.window))
        std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
        level = max(1.0, float(np.median(gray)))
        return std / level

    def find(self, image: np.ndarray, pixel_to_wafer: Affine2D | None = None) -> list[Candidate]:
        image = np.asarray(image)
        if image.ndim not in (2, 3) or image.size == 0:
            raise ValueError(f'expected an HxW or HxWx3 image, got shape {image.shape}')
        h, w = image.shape[:2]
        scale = min(1.0, self.work_size / max(h, w)) if self.work_size > 0 else 1.0
        work = image if scale >= 1.0 else cv2.resize(
            image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        std = self.std_map(work)
        edges = (std > self.std_threshold).astype(np.uint8)
        # Close gaps in outlines, then fill them: one solid region per object.
        edges = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
        contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        filled = np.zeros_like(edges)
        cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(filled, connectivity=8)
        min_area = max(1, int(self.min_area_px * scale * scale))
        raw: list[Candidate] = []
        for i in range(1, count):
            if stats[i, cv2.CC_STAT_AREA] < min_area:
                continue
            x, y, bw, bh, _ = stats[i]
            region = labels[y:y + bh, x:x + bw] == i
            strength = float(std[y:y + bh, x:x + bw][region].max())
            if scale < 1.0:
                x0, y0 = int(math.floor(x / scale)), int(math.floor(y / scale))
                x1, y1 = min(w, int(math.ceil((x + bw) / scale))), min(h, int(math.ceil((y + bh) / scale)))
                region = cv2.resize(region.astype(np.uint8), (x1 - x0, y1 - y0),
                                    interpolation=cv2.INTER_NEAREST).astype(bool)
                x, y, bw, bh = x0, y0, x1 - x0, y1 - y0
            vs, us = np.nonzero(region)
            centre = (x + float(us.mean()), y + float(vs.mean())) if len(us) else (x + bw / 2, y + bh / 2)
            raw.append(Candidate(centre, (int(x), int(y), int(bw), int(bh)), region, (0, 0, 0), strength))
        merged = self._merge(raw)
        for c in merged:
            c.window = self._window(c)
            if pixel_to_wafer is not None:
                c.wafer_xy = pixel_to_wafer.apply(*c.centre_px)
        return merged

    def _window(self, c: Candidate) -> tuple[int, int, int]:
        side = self.crop_size
        if self.fit_large:
            side = max(side, int(math.ceil(max(c.bbox[2], c.bbox[3]) * (1.0 + self.margin))))
        cx = c.bbox[0] + c.bbox[2] / 2.0 if side > self.crop_size else c.centre_px[0]
        cy = c.bbox[1] + c.bbox[3] / 2.0 if side > self.crop_size else c.centre_px[1]
        return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side

    def _merge(self, candidates: list[Candidate]) -> list[Candidate]:
        """Merge candidates whose centres lie closer than ``merge_distance_px`` (largest first)."""
        pending = sorted(candidates, key=lambda c: -c.area_px)
        kept: list[Candidate] = []
        for c in pending:
            for k in kept:
                if math.dist(c.centre_px, k.centre_px) < self.merge_distance_px:
                    _absorb(k, c)
                    break
            else:
                kept.append(c)
        return kept

    def crop(self, image: np.ndarray, candidate: Candidate) -> np.ndarray:
        """The candidate's square crop, resized to crop_size; outside the frame is edge-replicated."""
        x, y, side = candidate.window
        h, w = image.shape[:2]
        pad = max(0, -x, -y, x + side - w, y + side - h)
        source = image
        if pad:
            source = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        patch = source[y + pad:y + pad + side, x + pad:x + pad + side]
        if side != self.crop_size:
            patch = cv2.resize(patch, (self.crop_size, self.crop_size), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(patch)

    def crops(self, image: np.ndarray, candidates: list[Candidate]) -> np.ndarray:
        if not candidates:
            shape = (0, self.crop_size, self.crop_size) + ((image.shape[2],) if image.ndim == 3 else ())
            return np.zeros(shape, dtype=image.dtype)
        return np.stack([self.crop(image, c) for c in candidates])


def _absorb(keeper: Candidate, other: Candidate) -> None:
    """Grow ``keeper`` to cover ``other`` (union of boxes and masks)."""
    x0 = min(keeper.bbox[0], other.bbox[0])
    y0 = min(keeper.bbox[1], other.bbox[1])
    x1 = max(keeper.bbox[0] + keeper.bbox[2], other.bbox[0] + other.bbox[2])
    y1 = max(keeper.bbox[1] + keeper.bbox[3], other.bbox[1] + other.bbox[3])
    mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for c in (keeper, other):
        x, y, w, h = c.bbox
        mask[y - y0:y - y0 + h, x - x0:x - x0 + w] |= c.mask
    area_k, area_o = keeper.area_px, other.area_px
    total = max(1, area_k + area_o)
    keeper.centre_px = ((keeper.centre_px[0] * area_k + other.centre_px[0] * area_o) / total,
                        (keeper.centre_px[1] * area_k + other.centre_px[1] * area_o) / total)
    keeper.bbox = (x0, y0, x1 - x0, y1 - y0)
    keeper.mask = mask
    keeper.strength = max(keeper.strength, other.strength)
    keeper.merged += other.merged

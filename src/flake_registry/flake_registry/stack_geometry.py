"""Outlines of a planned van der Waals stack and how well its layers cover each other.

Each layer is a flake's wafer-frame contour moved so that its centroid sits at the
stack origin, rotated by the layer's pick-up rotation and shifted by an optional
offset. Overlaps are measured on a raster of the union's bounding box: exact
polygon clipping is not needed to tell a lab whether graphene lies inside its hBN.
"""

from __future__ import annotations

from dataclasses import dataclass
import math

import cv2
import numpy as np

from flake_core.geometry import polygon_area

# Raster size along the longer side of the stack; 1024 px keeps the area error
# well under 1 % for outlines of a few hundred vertices.
RASTER_PIXELS = 1024


@dataclass(frozen=True)
class PlacedLayer:
    """A layer outline in the stack frame [m], bottom layer first."""

    flake_id: str
    outline: np.ndarray  # (N, 2)
    rotation: float
    offset: tuple[float, float]


def place_outline(contour, centre, rotation: float, offset=(0.0, 0.0)) -> np.ndarray:
    """The contour (wafer frame) moved to the stack origin, rotated by ``rotation`` rad, then shifted."""
    points = np.asarray(contour, dtype=np.float64).reshape(-1, 2)
    if len(points) < 3:
        raise ValueError('an outline needs at least 3 points')
    if not np.all(np.isfinite(points)):
        raise ValueError('an outline has non-finite points')
    cos, sin = math.cos(rotation), math.sin(rotation)
    relative = points - np.asarray(centre, dtype=np.float64).reshape(1, 2)
    rotated = np.stack([cos * relative[:, 0] - sin * relative[:, 1],
                        sin * relative[:, 0] + cos * relative[:, 1]], axis=1)
    return rotated + np.asarray(offset, dtype=np.float64).reshape(1, 2)


@dataclass(frozen=True)
class StackOverlap:
    """``covered[i][j]``: share of layer i's area that layer j also covers (1 on the diagonal)."""

    areas: list[float]
    covered: list[list[float]]
    common_area: float
    bounds: tuple[float, float, float, float]

    def as_dict(self) -> dict:
        return {'areas': self.areas, 'covered': self.covered, 'common_area': self.common_area,
                'bounds': list(self.bounds)}


def stack_overlap(outlines: list[np.ndarray], raster_pixels: int = RASTER_PIXELS) -> StackOverlap:
    """Pairwise coverage of the layers and the area all of them share."""
    if not outlines:
        raise ValueError('a stack needs at least one layer')
    every = np.concatenate(outlines, axis=0)
    min_x, min_y = every.min(axis=0)
    max_x, max_y = every.max(axis=0)
    span = max(max_x - min_x, max_y - min_y)
    if span <= 0:
        raise ValueError('stack outlines have no extent')
    pixel = span / (raster_pixels - 2)
    width = int(math.ceil((max_x - min_x) / pixel)) + 2
    height = int(math.ceil((max_y - min_y) / pixel)) + 2
    masks = []
    for outline in outlines:
        mask = np.zeros((height, width), np.uint8)
        # Sub-pixel vertices (shift=4) so that small flakes keep their shape on the raster.
        scaled = np.round((outline - [min_x, min_y]) / pixel * 16 + 8).astype(np.int32)
        cv2.fillPoly(mask, [scaled.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=4)
        masks.append(mask.astype(bool))
    counts = [int(m.sum()) for m in masks]
    covered = []
    for i, mask_i in enumerate(masks):
        row = []
        for j, mask_j in enumerate(masks):
            if i == j:
                row.append(1.0)
            else:
                row.append(float(np.logical_and(mask_i, mask_j).sum()) / counts[i] if counts[i] else 0.0)
        covered.append(row)
    common = np.logical_and.reduce(masks)
    return StackOverlap(areas=[polygon_area(o) for o in outlines], covered=covered,
                        common_area=float(common.sum()) * pixel * pixel,
                        bounds=(float(min_x), float(min_y), float(max_x), float(max_y)))

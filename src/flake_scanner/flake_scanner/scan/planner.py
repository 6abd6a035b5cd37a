"""Scan planning: a serpentine grid of camera fields over a region of the wafer frame.

Pure core (no ROS). Tiles are planned in the wafer frame, where the region is
given, and mapped to stage positions through the chip's measured wafer frame.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import math

from flake_core.geometry import Affine2D


@dataclass(frozen=True)
class Region:
    """Axis-aligned rectangle in the wafer frame [m]."""

    min_x: float
    min_y: float
    max_x: float
    max_y: float

    def __post_init__(self):
        values = (self.min_x, self.min_y, self.max_x, self.max_y)
        if not all(math.isfinite(v) for v in values):
            raise ValueError('region bounds must be finite')
        if self.max_x <= self.min_x or self.max_y <= self.min_y:
            raise ValueError(f'empty region: x {self.min_x}..{self.max_x}, y {self.min_y}..{self.max_y}')

    @property
    def width(self) -> float:
        return self.max_x - self.min_x

    @property
    def height(self) -> float:
        return self.max_y - self.min_y

    @property
    def area(self) -> float:
        return self.width * self.height


@dataclass(frozen=True)
class PlannedTile:
    index: int
    row: int
    col: int
    wafer_x: float  # field centre, wafer frame [m]
    wafer_y: float
    stage_x: float  # the same point in the stage frame [m]
    stage_y: float


def grid_steps(extent: float, field: float, overlap: float) -> list[float]:
    """Centres along one axis so fields of size ``field`` cover ``extent`` with ``overlap``."""
    step = field * (1.0 - overlap)
    if extent <= field:
        return [extent / 2.0]
    count = math.ceil((extent - field) / step - 1e-9) + 1
    # Spread the grid so the first and last fields touch the region's edges.
    span = extent - field
    return [field / 2.0 + span * i / (count - 1) for i in range(count)]


def plan_serpentine(region: Region, field_width: float, field_height: float, overlap: float,
                    wafer_to_stage: Affine2D) -> list[PlannedTile]:
    """Boustrophedon path: rows along wafer +x, alternate direction each row."""
    if not 0.0 <= overlap < 0.5:
        raise ValueError(f'overlap must be in [0, 0.5), got {overlap}')
    if field_width <= 0 or field_height <= 0:
        raise ValueError('field of view must be positive')
    xs = grid_steps(region.width, field_width, overlap)
    ys = grid_steps(region.height, field_height, overlap)
    tiles = []
    for row, y_off in enumerate(ys):
        cols = range(len(xs)) if row % 2 == 0 else range(len(xs) - 1, -1, -1)
        for col in cols:
            wx, wy = region.min_x + xs[col], region.min_y + y_off
            sx, sy = wafer_to_stage.apply(wx, wy)
            tiles.append(PlannedTile(len(tiles), row, col, wx, wy, sx, sy))
    return tiles


def focus_points(region: Region, count: int) -> list[tuple[float, float]]:
    """Well-spread points (wafer frame) at which to measure focus for a focus map.

    Three points make a triangle over the region (Greplova et al. (2020)); more fill a grid.
    """
    if count < 3:
        raise ValueError('a focus map needs at least three points')
    inset_x, inset_y = region.width * 0.1, region.height * 0.1
    x0, x1 = region.min_x + inset_x, region.max_x - inset_x
    y0, y1 = region.min_y + inset_y, region.max_y - inset_y
    if count == 3:
        return [(x0, y0), (x1, y0), ((x0 + x1) / 2.0, y1)]
    side = math.ceil(math.sqrt(count))
    points = []
    for i in range(side):
        for j in range(side):
            if len(points) == count:
                break
            fx = j / (side - 1) if side > 1 else 0.5
            fy = i / (side - 1) if side > 1 else 0.5
            points.append((x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)))
    return points


class EtaEstimator:
    """Remaining time from a moving average of the recent per-tile durations."""

    def __init__(self, window: int = 20):
        self._durations: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._durations.append(seconds)

    def eta(self, remaining: int) -> float:
        if not self._durations:
            return float('nan')
        return remaining * sum(self._durations) / len(self._durations)

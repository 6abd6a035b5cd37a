"""Frames of the system and the maps between them (REP 103/105, metres and radians).

- ``stage``: the controller's axes. A stage position (x, y) names the stage-frame
  point that lies at the centre of the camera image.
- ``wafer``: the chip's own frame, defined from three corner points measured in the
  stage frame (Greplova et al. (2020)). A flake's identity is its wafer position, so it is found
  again after the chip is remounted and the corners re-measured.
- ``camera_optical``: x right, y down, z into the sample. Pixel (u, v) has u along
  the image's x and v along its y; pixel centres sit at integer coordinates. With
  the camera aligned to the stage, image +u is stage +x and image +v is stage -y.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
import math
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Affine2D:
    """x' = a*x + b*y + c, y' = d*x + e*y + f."""

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0
    e: float = 1.0
    f: float = 0.0

    @classmethod
    def from_list(cls, values: Iterable[float]) -> Affine2D:
        values = [float(v) for v in values]
        if len(values) != 6:
            raise ValueError(f'an affine map needs 6 numbers, got {len(values)}')
        return cls(*values)

    @classmethod
    def rigid(cls, rotation: float, tx: float, ty: float) -> Affine2D:
        cos, sin = math.cos(rotation), math.sin(rotation)
        return cls(cos, -sin, tx, sin, cos, ty)

    def as_list(self) -> list[float]:
        return [self.a, self.b, self.c, self.d, self.e, self.f]

    def matrix(self) -> np.ndarray:
        return np.array([[self.a, self.b, self.c], [self.d, self.e, self.f], [0.0, 0.0, 1.0]])

    def apply(self, x: Any, y: Any) -> Any:
        """Map scalars or arrays; returns (x', y') of the same shape."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        xo = self.a * x + self.b * y + self.c
        yo = self.d * x + self.e * y + self.f
        if xo.ndim == 0:
            return float(xo), float(yo)
        return xo, yo

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """Map an (N, 2) array of points."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        xo, yo = self.apply(points[:, 0], points[:, 1])
        return np.stack([np.atleast_1d(xo), np.atleast_1d(yo)], axis=1)

    def then(self, other: Affine2D) -> Affine2D:
        """The map that applies ``self`` first and ``other`` second."""
        m = other.matrix() @ self.matrix()
        return Affine2D(m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2])

    def inverse(self) -> Affine2D:
        det = self.a * self.e - self.b * self.d
        if abs(det) < 1e-30:
            raise ValueError('affine map is singular')
        m = np.linalg.inv(self.matrix())
        return Affine2D(m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2])

    @property
    def rotation(self) -> float:
        return math.atan2(self.d, self.a)

    @property
    def scale(self) -> float:
        return math.sqrt(abs(self.a * self.e - self.b * self.d))


class DegenerateCornersError(ValueError):
    """Corner points that do not define a frame (coincident or collinear)."""


@dataclass(frozen=True)
class WaferFrame:
    """The wafer frame of one chip, from three corners measured in the stage frame.

    corners[0] is the origin, corners[1] lies on the wafer +x axis, corners[2] on the
    +y side. The frame is rigid (no scale); ``residual`` measures how far the third
    corner is from the y axis, i.e. how far the chip edges are from perpendicular.
    """

    stage_to_wafer: Affine2D
    residual: float
    chip_id: str = ''

    @classmethod
    def from_corners(cls, corners: Any, chip_id: str = '', min_edge: float = 1e-4) -> WaferFrame:
        pts = np.asarray(corners, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[0] != 3 or pts.shape[1] < 2:
            raise ValueError(f'need exactly three corner points (x, y), got shape {pts.shape}')
        pts = pts[:, :2]
        if not np.all(np.isfinite(pts)):
            raise ValueError('corner coordinates must be finite')
        origin, on_x, on_y = pts
        x_axis = on_x - origin
        length = float(np.hypot(*x_axis))
        if length < min_edge:
            raise DegenerateCornersError(
                f'first two corners are {length * 1e3:.3f} mm apart; need at least {min_edge * 1e3:.3f} mm')
        x_axis /= length
        y_axis = np.array([-x_axis[1], x_axis[0]])
        rel = on_y - origin
        along_y = float(rel @ y_axis)
        if abs(along_y) < min_edge:
            raise DegenerateCornersError('the three corners are collinear')
        if along_y < 0:
            raise DegenerateCornersError(
                'third corner lies on the -y side; give the corners counter-clockwise '
                '(origin, +x corner, +y corner)')
        rotation = math.atan2(x_axis[1], x_axis[0])
        wafer_to_stage = Affine2D.rigid(rotation, float(origin[0]), float(origin[1]))
        residual = abs(float(rel @ x_axis))
        return cls(stage_to_wafer=wafer_to_stage.inverse(), residual=residual, chip_id=chip_id)

    @property
    def wafer_to_stage(self) -> Affine2D:
        return self.stage_to_wafer.inverse()

    @property
    def rotation(self) -> float:
        """Rotation of the wafer frame in the stage frame [rad]."""
        return self.wafer_to_stage.rotation


def pixel_to_stage(stage_x: float, stage_y: float, pixel_size: float, width: int, height: int,
                   camera_rotation: float = 0.0) -> Affine2D:
    """Map from pixel (u, v) of an image taken at stage (x, y) to stage coordinates [m].

    ``camera_rotation`` is the angle of the image +u axis from stage +x [rad].
    """
    if pixel_size <= 0:
        raise ValueError(f'pixel size must be positive, got {pixel_size}')
    cu, cv = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = math.cos(camera_rotation), math.sin(camera_rotation)
    # u -> +x, v -> -y in camera axes, then rotate by camera_rotation.
    a, b = pixel_size * cos, pixel_size * sin
    d, e = pixel_size * sin, -pixel_size * cos
    return Affine2D(a, b, stage_x - a * cu - b * cv, d, e, stage_y - d * cu - e * cv)


def pixel_to_wafer(stage_x: float, stage_y: float, pixel_size: float, width: int, height: int,
                   stage_to_wafer: Affine2D, camera_rotation: float = 0.0) -> Affine2D:
    """Map from pixel (u, v) to the wafer frame [m], the ``ScanFrame.pixel_to_wafer`` map."""
    return pixel_to_stage(stage_x, stage_y, pixel_size, width, height, camera_rotation).then(
        stage_to_wafer)


def polygon_area(points: Any) -> float:
    """Area of a simple polygon from its (N, 2) vertices (shoelace), in the square of their unit."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))

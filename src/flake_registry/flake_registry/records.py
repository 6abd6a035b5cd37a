"""What the registry stores and answers with: plain dataclasses, no database code.

``Sighting`` is the input (one detection of a flake in the wafer frame of its chip,
as converted from a ``flake_msgs/Flake``); ``FlakeRecord`` is a flake as the registry
knows it after merging every sighting; the rest are the parts of a full record,
reservations and a chip's wafer frame.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
import math
import sys

from flake_core.materials import LAYER_UNKNOWN, MATERIAL_NAMES


@dataclass
class Sighting:
    """One sighting of a flake by the detector, in the wafer frame of its chip (what ``ingest`` stores)."""

    chip_id: str
    scan_id: str
    x: float                                    # centroid [m], wafer frame
    y: float
    material: str = 'unknown'
    tile_index: int = 0
    layer_class: int = LAYER_UNKNOWN
    layers: float = 0.0
    layers_std: float = 0.0
    thickness_nm: float = 0.0
    thickness_nm_std: float = 0.0
    score: float = 0.0
    detector: str = ''
    model_version: str = ''
    contour: Sequence[tuple[float, float]] = ()  # outline [m], wafer frame
    area: float = 0.0                           # [m^2]
    bbox_px: tuple[int, int, int, int] = (0, 0, 0, 0)  # x_offset, y_offset, width, height in the tile
    homogeneity: float = 0.0
    isolation_distance: float = 0.0
    edge_straightness: float = 0.0
    stamp: float = 0.0                          # capture time [s since the epoch]
    rejected: bool = False
    mask: bytes = b''                           # mono8 pixels covering bbox_px, row-major
    mask_width: int = 0
    mask_height: int = 0

    def check(self) -> str | None:
        """Why this sighting cannot be stored, or None."""
        if not self.chip_id:
            return 'chip_id is empty'
        for name in ('x', 'y', 'score', 'area', 'layers', 'thickness_nm'):
            if not math.isfinite(getattr(self, name)):
                return f'{name} is not finite'
        if not all(map(math.isfinite, chain.from_iterable(self.contour))):
            return 'contour has a non-finite point'
        if self.material not in MATERIAL_NAMES:
            return f'unknown material {self.material!r}'
        if self.mask and len(self.mask) != self.mask_width * self.mask_height:
            return f'mask has {len(self.mask)} bytes for {self.mask_width}x{self.mask_height}'
        return None

    def wafer_box(self) -> tuple[float, float, float, float]:
        """(min_x, min_y, max_x, max_y) of the outline, or of a square of the flake's area."""
        if len(self.contour) >= 3:
            xs = [p[0] for p in self.contour]
            ys = [p[1] for p in self.contour]
            return min(min(xs), self.x), min(min(ys), self.y), max(max(xs), self.x), max(max(ys), self.y)
        half = math.sqrt(max(self.area, 0.0)) / 2
        return self.x - half, self.y - half, self.x + half, self.y + half


@dataclass
class FlakeRecord:
    """A flake as the registry knows it. ``status`` is effective: a live lease reads RESERVED."""

    id: str
    chip_id: str
    scan_id: str                                # scan of the best observation
    tile_index: int
    material: str
    layer_class: int
    layers: float
    layers_std: float
    thickness_nm: float
    thickness_nm_std: float
    score: float
    detector: str
    model_version: str
    x: float
    y: float
    contour: list[tuple[float, float]]
    area: float
    bbox_px: tuple[int, int, int, int]
    homogeneity: float
    isolation_distance: float
    edge_straightness: float
    status: int
    n_observations: int
    created: float
    updated: float
    detected_at: float
    revisited_at: float | None = None
    reserved_by: str = ''
    lease_expires: float | None = None
    used_by: str = ''
    used_at: float | None = None
    used_note: str = ''
    mask: bytes = b''
    mask_width: int = 0
    mask_height: int = 0


@dataclass
class Observation:
    scan_id: str
    tile_index: int
    stamp: float
    x: float
    y: float
    bbox_px: tuple[int, int, int, int]
    score: float
    detector: str
    iou: float                                  # overlap with the flake it was merged into (1 when new)


@dataclass
class FlakeImageRecord:
    role: str
    path: str
    objective: str
    pixel_size: float
    stamp: float


@dataclass
class FlakeDetail:
    flake: FlakeRecord
    observations: list[Observation]
    images: list[FlakeImageRecord]


@dataclass
class Reservation:
    flake_id: str
    robot_id: str
    token: str
    created: float
    expires: float
    ended_by: str = ''                          # who ended it (release, mark used), when it has ended


@dataclass
class IngestOutcome:
    """What became of one sighting: its flake id, or why it was refused."""

    flake_id: str = ''
    chip_id: str = ''
    is_new: bool = False
    error: str = ''


@dataclass
class QueryResult:
    total: int                                  # matches before limit/offset
    flakes: list[FlakeRecord] = field(default_factory=list)


@dataclass
class ChipWaferFrame:
    """A chip's wafer frame as measured on a stage: three corners and the map they define.

    ``stage_to_wafer`` is the affine [a, b, c, d, e, f] (x_w = a*x + b*y + c,
    y_w = d*x + e*y + f) of ``flake_core.geometry.WaferFrame``; the newest
    measurement of a chip is its frame.
    """

    chip_id: str
    corners: list[tuple[float, float]]          # [m], stage frame: origin, +x corner, +y corner
    stage_to_wafer: list[float]
    rotation: float                             # [rad], wafer frame in the stage frame
    residual: float                             # [m], how far the chip edges are from perpendicular
    measured_by: str = ''
    measured_at: float = 0.0


def encode_contour(points: Iterable[tuple[float, float]]) -> bytes:
    """An outline as little-endian float64 x, y pairs: several times faster to read back than JSON."""
    points = points if isinstance(points, Sequence) else list(points)
    values = array('d', chain.from_iterable(points))
    if len(values) != 2 * len(points):          # points with more than x and y: keep those two
        values = array('d', (float(v) for point in points for v in point[:2]))
    if sys.byteorder == 'big':
        values.byteswap()
    return values.tobytes()


def decode_contour(blob: bytes | None) -> list[tuple[float, float]]:
    if not blob:
        return []
    values = array('d')
    values.frombytes(bytes(blob))
    if sys.byteorder == 'big':
        values.byteswap()
    return list(zip(values[0::2], values[1::2], strict=True))

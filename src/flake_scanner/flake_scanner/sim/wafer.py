"""A seeded virtual chip of exfoliated flakes on SiO2/Si.

The chip's own frame is the ``wafer`` frame of flake_core.geometry: origin at one
chip corner, +x along one edge, +y along the other, metres. Objects are generated
lazily per square cell of the chip, each cell from its own seeded generator, so a
10 x 10 mm chip costs nothing until a field of view looks at it and the same seed
always gives the same objects whatever order cells are visited in. The cells double
as the spatial index for field-of-view queries.

The chip sits on the stage with an unknown mount (offset and rotation): the scanning
software measures it through three chip corners (``corner_positions_stage``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import functools
import math

import cv2
import numpy as np

from flake_core.geometry import Affine2D
from flake_core.optics import LAYER_THICKNESS_NM, MATERIALS

# Drawing order: later kinds cover earlier ones where they overlap.
Z_ORDER = {'residue': 0, 'terrace': 1, 'flake': 2, 'fold': 3, 'crack': 4, 'bulk': 5, 'dust': 6}
CONTAMINANT_KINDS = ('residue', 'dust', 'bulk')
# Objects never reach further than this from their cell [m]; queries widen by it.
MAX_OBJECT_REACH_M = 250e-6
_IDS_PER_CELL = 100_000


@dataclass(frozen=True)
class WaferObject:
    """One region on the chip, in the wafer frame [m].

    ``polygon`` is the closed outline (N, 2); for ``shape == 'line'`` it is the path of a
    line ``line_width_m`` wide (tape residue, cracks). Terraces and folds name the flake
    they belong to in ``parent_id``; cracks carry no material and show the substrate.
    """

    object_id: int
    kind: str
    material: str
    layers: int
    thickness_nm: float
    polygon: np.ndarray
    shape: str = 'polygon'
    line_width_m: float = 0.0
    parent_id: int = -1

    @property
    def is_contaminant(self) -> bool:
        return self.kind in CONTAMINANT_KINDS

    @property
    def z_order(self) -> int:
        return Z_ORDER[self.kind]

    @functools.cached_property
    def bbox(self) -> tuple[float, float, float, float]:
        pad = self.line_width_m / 2
        lo, hi = self.polygon.min(axis=0), self.polygon.max(axis=0)
        return float(lo[0] - pad), float(lo[1] - pad), float(hi[0] + pad), float(hi[1] + pad)

    @functools.cached_property
    def centre(self) -> tuple[float, float]:
        """Area centroid of a polygon (mean of the path for a line) [m]."""
        pts = self.polygon
        if self.shape == 'line' or len(pts) < 3:
            c = pts.mean(axis=0)
            return float(c[0]), float(c[1])
        x, y = pts[:, 0], pts[:, 1]
        xs, ys = np.roll(x, -1), np.roll(y, -1)
        cross = x * ys - xs * y
        area = cross.sum() / 2
        if abs(area) < 1e-24:
            c = pts.mean(axis=0)
            return float(c[0]), float(c[1])
        return float(((x + xs) * cross).sum() / (6 * area)), float(((y + ys) * cross).sum() / (6 * area))

    @property
    def area_m2(self) -> float:
        if self.shape == 'line':
            seg = np.diff(self.polygon, axis=0)
            return float(np.hypot(seg[:, 0], seg[:, 1]).sum() * self.line_width_m)
        x, y = self.polygon[:, 0], self.polygon[:, 1]
        return float(abs((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()) / 2)


@dataclass(frozen=True)
class WaferConfig:
    """Everything that defines a virtual chip. Densities are per mm^2 of chip."""

    seed: int = 0
    chip_width_m: float = 10e-3
    chip_height_m: float = 10e-3
    oxide_nm: float = 90.0
    flake_density_per_mm2: float = 30.0
    material_mix: dict = field(
        default_factory=lambda: {'graphene': 0.4, 'hbn': 0.3, 'mos2': 0.2, 'wte2': 0.1})
    # Share of flakes forced to 1-10 layers (0 = natural statistics, where thin is rare).
    thin_fraction: float = 0.0
    residue_line_density_per_mm2: float = 3.0
    residue_network_density_per_mm2: float = 0.3
    dust_density_per_mm2: float = 15.0
    bulk_density_per_mm2: float = 6.0
    # Mount of the chip on the stage; None draws it from the seed.
    mount_offset_m: tuple[float, float] | None = None
    mount_rotation_rad: float | None = None
    cell_size_m: float = 0.5e-3

    def validate(self) -> None:
        if self.oxide_nm not in (90.0, 285.0) and not (0 < self.oxide_nm <= 2000):
            raise ValueError(f'oxide_nm must be 90, 285 or within 0..2000 nm, got {self.oxide_nm}')
        if not (1e-4 <= self.chip_width_m <= 0.3 and 1e-4 <= self.chip_height_m <= 0.3):
            raise ValueError('chip size must be between 0.1 mm and 300 mm')
        for name in ('flake_density_per_mm2', 'residue_line_density_per_mm2',
                     'residue_network_density_per_mm2', 'dust_density_per_mm2', 'bulk_density_per_mm2'):
            value = getattr(self, name)
            if not (0 <= value <= 1e4):
                raise ValueError(f'{name} must be within 0..1e4, got {value}')
        if not 0 <= self.thin_fraction <= 1:
            raise ValueError(f'thin_fraction must be within 0..1, got {self.thin_fraction}')
        unknown = set(self.material_mix) - set(MATERIALS)
        if unknown or not self.material_mix:
            raise ValueError(f'material_mix may name only {MATERIALS}, got {sorted(self.material_mix)}')
        if any(w < 0 for w in self.material_mix.values()) or sum(self.material_mix.values()) <= 0:
            raise ValueError('material_mix weights must be non-negative and not all zero')
        if not 50e-6 <= self.cell_size_m <= 5e-3:
            raise ValueError('cell_size_m must be within 50 um .. 5 mm')


def _clip_half_plane(poly: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """Keep the part of a convex polygon with ``normal . p <= offset``."""
    pts = np.asarray(poly, dtype=np.float64)
    if len(pts) == 0:
        return pts.reshape(0, 2)
    side = (pts @ np.asarray(normal, dtype=np.float64) - offset).tolist()
    xy = pts.tolist()
    out = []
    n = len(xy)
    # Plain floats: this runs for every cleavage cut of every flake.
    for i in range(n):
        (px, py), (qx, qy) = xy[i], xy[(i + 1) % n]
        dp, dq = side[i], side[(i + 1) % n]
        if dp <= 0:
            out.append((px, py))
        if (dp < 0 < dq) or (dq < 0 < dp):
            t = dp / (dp - dq)
            out.append((px + t * (qx - px), py + t * (qy - py)))
    return np.array(out) if out else np.zeros((0, 2))


def _cleaved_polygon(rng: np.random.Generator, centre, radius: float, lattice_angle: float,
                     elongation: float = 1.0) -> np.ndarray:
    """A convex fragment: a rough ellipse cut by cleavage planes at multiples of 30 deg."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, 14))
    radii = radius * rng.uniform(0.85, 1.15, angles.size)
    pts = np.stack([radii * np.cos(angles) * elongation, radii * np.sin(angles)], axis=1)
    # Long axis of the fragment along a crystal direction.
    rot = lattice_angle + (np.pi / 6) * rng.integers(0, 6)
    c, s = math.cos(rot), math.sin(rot)
    pts = pts @ np.array([[c, s], [-s, c]])
    for _ in range(rng.integers(3, 7)):
        theta = lattice_angle + (np.pi / 6) * rng.integers(0, 12)
        normal = np.array([math.cos(theta), math.sin(theta)])
        clipped = _clip_half_plane(pts, normal, radius * rng.uniform(0.35, 0.9))
        if len(clipped) >= 3:
            pts = clipped
    return pts + np.asarray(centre)


def _fragment_union(rng: np.random.Generator, centre, radius: float, lattice_angle: float,
                    pieces: int) -> np.ndarray:
    """Outline of several cleaved fragments stuck together: a non-convex flake with crystal edges."""
    centre = np.asarray(centre, dtype=np.float64)
    parts = [_cleaved_polygon(rng, centre, radius, lattice_angle, float(rng.uniform(1.0, 2.0)))]
    for _ in range(pieces - 1):
        anchor = parts[-1][rng.integers(len(parts[-1]))]
        parts.append(_cleaved_polygon(rng, centre + (anchor - centre) * 0.8, radius * float(rng.uniform(0.4, 0.8)),
                                      lattice_angle, float(rng.uniform(1.0, 2.0))))
    everything = np.vstack(parts)
    lo = everything.min(axis=0)
    step = (everything.max(axis=0) - lo).max() / 240.0
    canvas = np.zeros((310, 310), np.uint8)
    for part in parts:
        cv2.fillPoly(canvas, [np.round((part - lo) / step * 16).astype(np.int32) + 32], 1, shift=4)
    contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    # A tolerance of 1.5 grid cells removes the raster staircase but keeps the cleaved corners.
    outline = cv2.approxPolyDP(max(contours, key=cv2.contourArea), 1.5, True).reshape(-1, 2)
    if len(outline) < 3:
        return parts[0]
    return (outline.astype(np.float64) - 2.0) * step + lo


def _layers_for(rng: np.random.Generator, material: str, thin_fraction: float) -> int:
    if rng.random() < thin_fraction:
        # Enriched thin flakes: monolayers as common as each few-layer count.
        return int(rng.choice(np.arange(1, 11), p=np.array([3, 2, 2, 1, 1, 1, 1, 1, 1, 1]) / 14))
    if material == 'hbn':
        # Device hBN is 10-90 nm; the log-normal centres there and makes 1-3 layers rare.
        thickness = math.exp(rng.normal(math.log(30.0), 0.9))
        return int(np.clip(round(thickness / LAYER_THICKNESS_NM['hbn']), 1, 300))
    return int(np.clip(round(math.exp(rng.normal(math.log(40.0), 1.2))), 1, 300))


class VirtualWafer:
    """A chip of flakes and contaminants, generated cell by cell from ``config.seed``."""

    def __init__(self, config: WaferConfig):
        config.validate()
        self.config = config
        rng = np.random.default_rng([config.seed, 0xC41B])
        if config.mount_offset_m is None:
            offset = (float(rng.uniform(0.5e-3, 1.5e-3)), float(rng.uniform(0.5e-3, 1.5e-3)))
        else:
            offset = (float(config.mount_offset_m[0]), float(config.mount_offset_m[1]))
        rotation = (float(rng.uniform(-math.radians(2), math.radians(2)))
                    if config.mount_rotation_rad is None else float(config.mount_rotation_rad))
        self.mount_offset_m = offset
        self.mount_rotation_rad = rotation
        self.wafer_to_stage = Affine2D.rigid(rotation, offset[0], offset[1])
        self.stage_to_wafer = self.wafer_to_stage.inverse()
        self.cells_x = max(1, math.ceil(config.chip_width_m / config.cell_size_m))
        self.cells_y = max(1, math.ceil(config.chip_height_m / config.cell_size_m))
        self._cells: dict[tuple[int, int], list[WaferObject]] = {}
        # Bumped by add_object so renderers drop cached rasters.
        self.revision = 0

    @classmethod
    def generate(cls, config: WaferConfig | None = None, **overrides) -> VirtualWafer:
        """The wafer of ``config`` (or WaferConfig(**overrides))."""
        if config is None:
            config = WaferConfig(**overrides)
        elif overrides:
            raise TypeError('give either a WaferConfig or keyword overrides, not both')
        return cls(config)

    # -- geometry ---------------------------------------------------------------
    def corner_positions_stage(self, noise_m: float = 0.0, seed: int | None = None) -> np.ndarray:
        """True chip corners in the stage frame: origin, +x corner, +y corner (3, 2) [m].

        ``noise_m`` adds Gaussian measurement noise (seeded) as an operator's clicks would.
        """
        w, h = self.config.chip_width_m, self.config.chip_height_m
        corners = self.wafer_to_stage.apply_points(np.array([[0.0, 0.0], [w, 0.0], [0.0, h]]))
        if noise_m > 0:
            rng = np.random.default_rng([self.config.seed, 0xC0, 0 if seed is None else seed])
            corners = corners + rng.normal(0.0, noise_m, corners.shape)
        return corners

    def contains(self, wafer_x: float, wafer_y: float, margin_m: float = 0.0) -> bool:
        return (-margin_m <= wafer_x <= self.config.chip_width_m + margin_m
                and -margin_m <= wafer_y <= self.config.chip_height_m + margin_m)

    def chip_polygon(self) -> np.ndarray:
        w, h = self.config.chip_width_m, self.config.chip_height_m
        return np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])

    # -- spatial queries --------------------------------------------------------------
    def objects_in_rect(self, xmin: float, ymin: float, xmax: float, ymax: float) -> list[WaferObject]:
        """Objects whose bounding box meets the wafer-frame rectangle, in drawing order."""
        size = self.config.cell_size_m
        ix0 = max(0, int(math.floor((xmin - MAX_OBJECT_REACH_M) / size)))
        iy0 = max(0, int(math.floor((ymin - MAX_OBJECT_REACH_M) / size)))
        ix1 = min(self.cells_x - 1, int(math.floor((xmax + MAX_OBJECT_REACH_M) / size)))
        iy1 = min(self.cells_y - 1, int(math.floor((ymax + MAX_OBJECT_REACH_M) / size)))
        found = []
        for iy in range(iy0, iy1 + 1):
            for ix in range(ix0, ix1 + 1):
                for obj in self._cell(ix, iy):
                    bx0, by0, bx1, by1 = obj.bbox
                    if bx0 <= xmax and bx1 >= xmin and by0 <= ymax and by1 >= ymin:
                        found.append(obj)
        found.sort(key=lambda o: (o.z_order, o.object_id))
        return found

    def all_objects(self) -> list[WaferObject]:
        """Every object of the chip (generates all cells)."""
        return self.objects_in_rect(0.0, 0.0, self.config.chip_width_m, self.config.chip_height_m)

    def flakes(self) -> list[WaferObject]:
        return [o for o in self.all_objects() if o.kind == 'flake']

    def object_by_id(self, object_id: int) -> WaferObject:
        cell = object_id // _IDS_PER_CELL
        ix, iy = cell % self.cells_x, cell // self.cells_x
        if not (0 <= iy < self.cells_y):
            raise KeyError(object_id)
        for obj in self._cell(ix, iy):
            if obj.object_id == object_id:
                return obj
        raise KeyError(object_id)

    def add_object(self, kind: str, material: str, polygon, layers: int = 0, thickness_nm: float | None = None,
                   shape: str = 'polygon', line_width_m: float = 0.0, parent_id: int = -1) -> WaferObject:
        """Place a known object (e.g. a test flake) on the chip; returns it with its new id."""
        if kind not in Z_ORDER:
            raise ValueError(f'unknown object kind {kind!r}; known: {", ".join(Z_ORDER)}')
        polygon = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if len(polygon) < (2 if shape == 'line' else 3):
            raise ValueError('an object needs at least 3 vertices (2 for a line)')
        if kind in ('flake', 'terrace', 'fold', 'bulk') and material not in MATERIALS:
            raise ValueError(f'unknown material {material!r}; known: {", ".join(MATERIALS)}')
        if thickness_nm is None:
            thickness_nm = layers * LAYER_THICKNESS_NM.get(material, 0.0)
        cx, cy = polygon.mean(axis=0)
        size = self.config.cell_size_m
        ix = int(np.clip(cx // size, 0, self.cells_x - 1))
        iy = int(np.clip(cy // size, 0, self.cells_y - 1))
        cell = self._cell(ix, iy)
        base = (iy * self.cells_x + ix) * _IDS_PER_CELL
        # Placed objects count down from the top of the cell's id range.
        placed = [o.object_id for o in cell if o.object_id > base + _IDS_PER_CELL // 2]
        object_id = min(placed) - 1 if placed else base + _IDS_PER_CELL - 1
        obj = WaferObject(object_id=object_id, kind=kind, material=material, layers=int(layers),
                          thickness_nm=float(thickness_nm), polygon=polygon, shape=shape,
                          line_width_m=float(line_width_m), parent_id=parent_id)
        cell.append(obj)
        self.revision += 1
        return obj

    # -- generation -----------------------------------------------------------------
    def _cell(self, ix: int, iy: int) -> list[WaferObject]:
        key = (ix, iy)
        if key not in self._cells:
            self._cells[key] = _CellGenerator(self, ix, iy).run()
        return self._cells[key]


class _CellGenerator:
    def __init__(self, wafer: VirtualWafer, ix: int, iy: int):
        self.cfg = wafer.config
        self.rng = np.random.default_rng([self.cfg.seed, ix, iy, 0x5EED])
        size = self.cfg.cell_size_m
        self.x0, self.y0 = ix * size, iy * size
        self.x1 = min(self.x0 + size, self.cfg.chip_width_m)
        self.y1 = min(self.y0 + size, self.cfg.chip_height_m)
        self.area_mm2 = (self.x1 - self.x0) * (self.y1 - self.y0) * 1e6
        self.next_id = (iy * wafer.cells_x + ix) * _IDS_PER_CELL
        self.objects: list[WaferObject] = []
        # One crystal orientation per material per cell would be unphysical; each flake
        # gets its own, but all its cleaved edges share it.

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _point(self, margin: float = 0.0) -> np.ndarray:
        return np.array([self.rng.uniform(self.x0, self.x1), self.rng.uniform(self.y0, self.y1)])

    def _count(self, density: float) -> int:
        return int(self.rng.poisson(density * self.area_mm2))

    def _add(self, **kwargs) -> WaferObject:
        obj = WaferObject(object_id=self._new_id(), **kwargs)
        self.objects.append(obj)
        return obj

    def run(self) -> list[WaferObject]:
        cfg = self.cfg
        mix_names = list(cfg.material_mix)
        mix_p = np.array([cfg.material_mix[m] for m in mix_names], dtype=float)
        mix_p /= mix_p.sum()
        for _ in range(self._count(cfg.residue_line_density_per_mm2)):
            self._residue_line(self._point(), self.rng.uniform(40e-6, 220e-6))
        for _ in range(self._count(cfg.residue_network_density_per_mm2)):
            self._residue_network(self._point())
        for _ in range(self._count(cfg.flake_density_per_mm2)):
            self._flake(str(self.rng.choice(mix_names, p=mix_p)))
        for _ in range(self._count(cfg.bulk_density_per_mm2)):
            self._bulk(str(self.rng.choice(mix_names, p=mix_p)))
        for _ in range(self._count(cfg.dust_density_per_mm2)):
            self._dust()
        return self.objects

    def _residue_path(self, start, length, heading) -> np.ndarray:
        steps = max(3, int(length / 15e-6))
        headings = heading + np.cumsum(self.rng.normal(0, 0.25, steps))
        seg = length / steps
        pts = np.cumsum(np.stack([np.cos(headings), np.sin(headings)], axis=1) * seg, axis=0)
        return np.vstack([start, start + pts])

    def _residue_line(self, start, length, heading=None):
        heading = self.rng.uniform(0, 2 * np.pi) if heading is None else heading
        self._add(kind='residue', material='residue', layers=0,
                  thickness_nm=float(round(self.rng.uniform(5, 25))),
                  polygon=self._residue_path(start, length, heading), shape='line',
                  line_width_m=float(self.rng.uniform(0.8e-6, 3e-6)))

    def _residue_network(self, centre):
        # Adhesive left where the tape's bubbles met: lines meeting at junctions.
        junctions = centre + self.rng.normal(0, 45e-6, (int(self.rng.integers(4, 8)), 2))
        for j in junctions:
            for _ in range(int(self.rng.integers(2, 4))):
                self._residue_line(j, self.rng.uniform(30e-6, 90e-6))

    def _flake(self, material: str):
        cfg, rng = self.cfg, self.rng
        layers = _layers_for(rng, material, cfg.thin_fraction)
        median_um = 7.0 if layers <= 10 else 12.0
        radius = float(np.clip(math.exp(rng.normal(math.log(median_um), 0.6)), 2.0, 80.0)) * 1e-6 / 2
        lattice = float(rng.uniform(0, np.pi / 3))
        centre = self._point()
        t_layer = LAYER_THICKNESS_NM[material]
        fold = None
        if rng.random() < 0.5:
            body = _fragment_union(rng, centre, radius, lattice, int(rng.integers(2, 4)))
        else:
            # Folds are modelled on single convex fragments only.
            # Some flakes cleave into long ribbons along a crystal direction.
            elongation = float(rng.uniform(2.5, 5.0) if rng.random() < 0.15 else rng.uniform(1.0, 2.2))
            body = _cleaved_polygon(rng, centre, radius, lattice, elongation=elongation)
            if layers >= 2 and rng.random() < 0.3:
                body, fold = self._fold(body, lattice)
        if len(body) < 3:
            return
        body_obj = self._add(kind='flake', material=material, layers=layers, thickness_nm=layers * t_layer,
                             polygon=body)
        if layers >= 6 and rng.random() < 0.35:
            # A thinner terrace cleaved off next to the thick part.
            thin = int(max(1, layers // rng.integers(3, 12)))
            edge_pt = body[rng.integers(len(body))]
            t_radius = radius * float(rng.uniform(0.4, 0.9))
            terrace = _cleaved_polygon(rng, edge_pt + (edge_pt - centre) * 0.3, t_radius, lattice,
                                       elongation=float(rng.uniform(1.0, 1.8)))
            self._add(kind='terrace', material=material, layers=thin, thickness_nm=thin * t_layer,
                      polygon=terrace, parent_id=body_obj.object_id)
        if fold is not None and len(fold) >= 3:
            self._add(kind='fold', material=material, layers=2 * layers, thickness_nm=2 * layers * t_layer,
                      polygon=fold, parent_id=body_obj.object_id)
        if radius > 6e-6 and rng.random() < 0.12:
            theta = lattice + (np.pi / 6) * rng.integers(0, 12)
            direction = np.array([math.cos(theta), math.sin(theta)])
            path = np.array([centre - direction * radius * 1.2, centre + direction * radius * 1.2])
            self._add(kind='crack', material='', layers=0, thickness_nm=0.0, polygon=path, shape='line',
                      line_width_m=float(rng.uniform(0.4e-6, 1.2e-6)), parent_id=body_obj.object_id)

    def _fold(self, body: np.ndarray, lattice: float):
        """Flip the part of ``body`` beyond a line back over the rest: (kept body, fold region)."""
        rng = self.rng
        theta = lattice + (np.pi / 6) * rng.integers(0, 12)
        normal = np.array([math.cos(theta), math.sin(theta)])
        proj = body @ normal
        offset = proj.min() + (proj.max() - proj.min()) * float(rng.uniform(0.6, 0.85))
        kept = _clip_half_plane(body, normal, offset)
        flap = _clip_half_plane(body, -normal, -offset)
        if len(kept) < 3 or len(flap) < 3:
            return body, None
        mirrored = flap - 2 * ((flap @ normal) - offset)[:, None] * normal[None, :]
        # The flipped flap lies on the kept part; clip it to the kept outline (convex).
        fold = mirrored[::-1]
        n = len(kept)
        x, y = kept[:, 0], kept[:, 1]
        area_sign = np.sign(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
        for i in range(n):
            p, q = kept[i], kept[(i + 1) % n]
            edge = q - p
            outward = np.array([edge[1], -edge[0]]) * area_sign
            if np.hypot(*outward) == 0:
                continue
            fold = _clip_half_plane(fold, outward, float(outward @ p))
            if len(fold) < 3:
                return kept, None
        return kept, fold

    def _bulk(self, material: str):
        rng = self.rng
        radius = float(np.clip(math.exp(rng.normal(math.log(45.0), 0.6)), 15, 200)) * 1e-6 / 2
        thickness = float(round(math.exp(rng.uniform(math.log(300), math.log(3000))), -1))
        lattice = float(rng.uniform(0, np.pi / 3))
        centre = self._point()
        poly = _fragment_union(rng, centre, radius, lattice, int(rng.integers(1, 4)))
        t_layer = LAYER_THICKNESS_NM[material]
        bulk = self._add(kind='bulk', material=material, layers=int(round(thickness / t_layer)),
                         thickness_nm=thickness, polygon=poly)
        if rng.random() < 0.4:
            # Thin sheets peel off the edges of bulk crystals: the coloured rims seen in micrographs.
            layers = int(np.clip(round(math.exp(rng.uniform(math.log(8), math.log(200))) / t_layer), 1, 300))
            edge_pt = poly[rng.integers(len(poly))]
            rim = _cleaved_polygon(rng, edge_pt + (edge_pt - centre) * 0.15, radius * float(rng.uniform(0.3, 0.6)),
                                   lattice, elongation=float(rng.uniform(1.0, 2.0)))
            self._add(kind='terrace', material=material, layers=layers, thickness_nm=layers * t_layer,
                      polygon=rim, parent_id=bulk.object_id)

    def _dust(self):
        rng = self.rng
        radius = float(np.clip(math.exp(rng.normal(math.log(1.5e-6), 0.6)), 0.4e-6, 8e-6))
        angles = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        radii = radius * rng.uniform(0.7, 1.2, angles.size)
        poly = self._point() + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        self._add(kind='dust', material='dust', layers=0, thickness_nm=0.0, polygon=poly)

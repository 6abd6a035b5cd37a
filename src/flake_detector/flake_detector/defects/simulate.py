"""ADF-STEM images of 2H transition-metal dichalcogenide monolayers with point defects, and their truth.

Incoherent Z-contrast: every atomic column is a Gaussian probe image whose weight is
sum Z**n over its atoms, with n set by the detector's inner collection angle
(adf.z_exponent) and drawn around it per frame; the second chalcogen of a column adds
``stack_factor`` of the first (channelling makes a stacked pair less than twice one
atom). The material (lattice constant, metal and chalcogen) comes from
``flake_core.materials``. Projected along c the columns form a honeycomb.

Geometry in the lattice's own frame (a = lattice constant, d = a / sqrt(3)): a hexagon
centred on a hollow site c has its vertices at the top P = c + (0, -d), upper left
Q = c + (-a/2, -d/2), and so on round. The two sublattices alternate; in the usual
orientation the metal sits at P and the chalcogen pair at Q, and a crystal turned by
60 degrees (``swap``) has them the other way round. Every unit cell (one metal and one
chalcogen column; a "unit cell" of Yang et al. (2024)) is the pair {P, Q} of exactly one
hexagon; its box is the bounding box of the two column centres padded by
``column_radius_fraction`` a (0.214 a gives W_U / W_H = 0.65 as in Yang et al. (2024)).
The lattice is then turned by ``rotation`` in the image and drifts during the scan.

Imaging faults: Poisson shot noise with ``dose`` counts at the peak of the brighter
column type, Gaussian read noise, a smooth background, linear drift (ground truth
follows it), line-to-line scan jitter and gain noise (streaks), a per-column brightness
spread, amorphous contamination (smooth ``blobs`` or sharp-edged granular ``patches``
with adatoms) and holes (vacuum, no lattice). Cells under contamination or in a hole
are marked not clean in the truth: no method can read them. Everything is drawn from
one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import math

import cv2
import numpy as np

from flake_core.materials import StemLattice, stem_lattice

from . import CLASS_ATOMS, CLASS_COUNT
from .adf import z_exponent

LATTICE_A = stem_lattice('mote2').lattice_a  # [m], 2H-MoTe2, the material of Yang et al. (2024)
# Yang et al. (2024) at 20 M: a hexagonal cell ~120 px wide, i.e. the lattice constant spans 120 px.
SEED_PIXEL_SIZE = LATTICE_A / 120.0  # [m/px]
PRIMITIVE_CELL_AREA = stem_lattice('mote2').primitive_cell_area  # [m^2]
CONTAMINATION_STYLES = ('blobs', 'patches')


@dataclass(frozen=True)
class StemSimConfig:
    """Sample and imaging parameters; (low, high) ranges are drawn uniformly per image."""

    material: str = 'mote2'
    height: int = 1024
    width: int = 1024
    pixel_size: float = SEED_PIXEL_SIZE                   # [m/px]
    rotation_deg: tuple[float, float] = (0.0, 0.0)         # lattice rotation in the image
    swap_probability: float = 0.0                          # chance of a crystal turned by 60 degrees
    detector_inner_mrad: tuple[float, float] = (70.0, 90.0)
    exponent_spread: float = 0.05                          # std of n around the detector's value
    z_exponent: tuple[float, float] | None = None          # fixed n range; replaces the detector
    stack_factor: tuple[float, float] = (0.9, 1.0)         # second chalcogen of a column / first
    probe_fwhm: tuple[float, float] = (1.0e-10, 1.4e-10)   # [m]
    # Probability of each class per unit cell (index = class); Perfect takes the rest.
    defect_probabilities: tuple[float, ...] = (0.0, 0.08, 0.03, 0.03, 0.015, 0.015)
    dose: tuple[float, float] = (5.0, 20.0)    # Poisson counts at the brighter column's peak
    read_noise: float = 0.5                    # Gaussian read noise, std [counts]
    background: tuple[float, float] = (0.05, 0.2)  # smooth background / brighter column peak
    drift: float = 2.0e-11                     # max drift over one frame, per axis [m]
    jitter_px: float = 1.0                     # std of line-to-line scan jitter [px]
    line_gain_sigma: float = 0.0               # std of per-line gain (scan streaks)
    column_radius_fraction: float = 0.214      # ground-truth box padding, in units of a
    # Spread (log-normal sigma) of per-column brightness: residue and local tilt change the two
    # columns of a cell differently (Yang et al.'s reason for the 2-channel input).
    column_gain_sigma: float = 0.0
    contamination: tuple[float, float] = (0.0, 0.0)        # share of the frame covered
    contamination_style: str = 'blobs'
    contamination_level: tuple[float, float] = (0.3, 1.0)  # added signal / brighter column peak
    holes: tuple[float, float] = (0.0, 0.0)                # share of the frame that is vacuum

    def validate(self) -> None:
        stem_lattice(self.material)
        if not (16 <= self.height <= 8192 and 16 <= self.width <= 8192):
            raise ValueError(f'image size must be 16..8192 px, got {self.height}x{self.width}')
        if self.pixel_size <= 0:
            raise ValueError('pixel_size must be positive')
        if len(self.defect_probabilities) != CLASS_COUNT:
            raise ValueError(f'defect_probabilities needs {CLASS_COUNT} entries')
        if any(p < 0 for p in self.defect_probabilities) or sum(self.defect_probabilities[1:]) > 1:
            raise ValueError('defect probabilities must be >= 0 and sum to <= 1')
        if self.column_gain_sigma < 0 or self.line_gain_sigma < 0 or self.exponent_spread < 0:
            raise ValueError('column_gain_sigma, line_gain_sigma and exponent_spread must be >= 0')
        if self.dose[0] <= 0 or self.dose[1] < self.dose[0]:
            raise ValueError(f'dose range must be positive and ordered, got {self.dose}')
        if self.detector_inner_mrad[0] <= 0 or self.detector_inner_mrad[1] < self.detector_inner_mrad[0]:
            raise ValueError(f'detector_inner_mrad must be positive and ordered, got {self.detector_inner_mrad}')
        if self.contamination_style not in CONTAMINATION_STYLES:
            raise ValueError(f'contamination_style must be one of {CONTAMINATION_STYLES}')
        for name in ('contamination', 'holes'):
            low, high = getattr(self, name)
            if not (0 <= low <= high < 0.9):
                raise ValueError(f'{name} must be an ordered range within [0, 0.9), got {(low, high)}')


@dataclass
class StemSample:
    """One simulated image with its ground truth (boxes xyxy in pixels, in the image frame)."""

    image: np.ndarray              # float32 counts, (H, W)
    pixel_size: float              # [m/px]
    material: str
    hex_boxes: np.ndarray          # (N, 4) hexagonal cells fully inside the image
    unit_boxes: np.ndarray         # (M, 4) unit cells fully inside the image (axis-aligned hull)
    unit_classes: np.ndarray       # (M,) class index
    unit_clean: np.ndarray         # (M,) bool: not under contamination, not in or at a hole
    metal_xy: np.ndarray           # (M, 2) metal column of each unit cell [px]
    chalcogen_xy: np.ndarray       # (M, 2) chalcogen column of each unit cell [px]
    params: dict = field(default_factory=dict)

    @property
    def unit_centres(self) -> np.ndarray:
        return (self.metal_xy + self.chalcogen_xy) / 2.0

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.unit_classes, minlength=CLASS_COUNT)


def balanced_config(config: StemSimConfig) -> StemSimConfig:
    """Every defect class equally likely beside Perfect: the classifier's training distribution."""
    share = 1.0 / CLASS_COUNT
    return replace(config, defect_probabilities=(0.0,) + (share,) * (CLASS_COUNT - 1))


def simulate(config: StemSimConfig = StemSimConfig(), seed: int | np.random.Generator = 0) -> StemSample:
    """Render one image and its ground truth."""
    config.validate()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    lattice: StemLattice = stem_lattice(config.material)
    H, W = config.height, config.width
    a = lattice.lattice_a / config.pixel_size          # [px]
    d = a / math.sqrt(3.0)
    radius = config.column_radius_fraction * a
    fwhm = rng.uniform(*config.probe_fwhm) / config.pixel_size
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    inner = float(rng.uniform(*config.detector_inner_mrad))
    if config.z_exponent is not None:
        z_n = float(rng.uniform(*config.z_exponent))
    else:
        z_n = float(z_exponent(inner) + rng.normal(0.0, config.exponent_spread))
    stack = float(rng.uniform(*config.stack_factor))
    dose = float(rng.uniform(*config.dose))
    rotation = math.radians(rng.uniform(*config.rotation_deg))
    swap = bool(rng.random() < config.swap_probability)

    # Hexagon centres on the triangular lattice a1 = (a, 0), a2 = (a/2, 3d/2) in the lattice frame,
    # covering the whole (turned) frame with a margin.
    half = 0.5 * math.hypot(H, W) + 3 * a
    origin = rng.uniform(0, 1, size=2) * np.array([a, 1.5 * d])
    rows = np.arange(-int(half / (1.5 * d)) - 2, int(half / (1.5 * d)) + 3)
    cols = np.arange(-int(half / a) - len(rows) // 2 - 2, int(half / a) + len(rows) // 2 + 3)
    jj, ii = np.meshgrid(rows, cols, indexing='ij')
    centres = np.stack([origin[0] + ii * a + jj * a / 2, origin[1] + jj * 1.5 * d], -1).reshape(-1, 2)
    centres = centres[(np.abs(centres) <= half).all(axis=1)]

    probabilities = np.asarray(config.defect_probabilities, dtype=float).copy()
    probabilities[0] = 1.0 - probabilities[1:].sum()
    classes = rng.choice(CLASS_COUNT, size=len(centres), p=probabilities)

    drift = rng.uniform(-1, 1, size=2) * config.drift / config.pixel_size
    cos, sin = math.cos(rotation), math.sin(rotation)
    middle = np.array([W / 2.0, H / 2.0])

    def placed(points: np.ndarray) -> np.ndarray:
        """Lattice frame -> image: turn about the frame centre, then linear scan drift (grows with the row)."""
        turned = points @ np.array([[cos, sin], [-sin, cos]]) + middle
        return turned + drift[None, :] * (turned[:, 1:2] / H)

    top = placed(centres + [0.0, -d])
    upper_left = placed(centres + [-a / 2, -d / 2])
    metal, chalcogen = (upper_left, top) if swap else (top, upper_left)

    weight_metal = lattice.metal_z ** z_n
    weight_single = lattice.chalcogen_z ** z_n
    brighter = max(weight_metal, (1.0 + stack) * weight_single)
    atoms = np.array([CLASS_ATOMS[int(k)] for k in classes])
    chalcogen_weight = np.select([atoms[:, 1] == 2, atoms[:, 1] == 1], [(1.0 + stack) * weight_single,
                                                                         weight_single], 0.0)
    intensities = np.concatenate([atoms[:, 0] * weight_metal, chalcogen_weight]) / brighter
    if config.column_gain_sigma > 0:
        intensities = intensities * rng.lognormal(0.0, config.column_gain_sigma, size=len(intensities))
    positions = np.concatenate([metal, chalcogen])

    holes = _cover_mask(H, W, rng.uniform(*config.holes), rng, scale=max(6 * a, 32.0))
    contamination = _cover_mask(H, W, rng.uniform(*config.contamination), rng, scale=max(4 * a, 24.0))
    in_hole = _sample(holes, positions) > 0.5
    intensities = np.where(in_hole, 0.0, intensities)
    signal = _render_columns(positions, intensities, sigma, H, W)

    background_level = rng.uniform(*config.background)
    background = background_level * (1.0 + 0.3 * _smooth_field(H, W, rng))
    background *= 1.0 - 0.8 * holes                       # vacuum scatters almost nothing
    level = rng.uniform(*config.contamination_level)
    if contamination.any():
        texture = _contamination_texture(H, W, sigma, config.contamination_style, rng)
        # Amorphous carbon adds diffuse scattering and dims the columns beneath it a little.
        signal = signal * (1.0 - 0.3 * contamination) + level * contamination * texture
    signal = _scan_jitter(signal + background, config.jitter_px, rng)
    if config.line_gain_sigma > 0:
        signal = signal * (1.0 + rng.normal(0.0, config.line_gain_sigma, size=(H, 1))).astype(np.float32)
    expected = np.clip(dose * signal, 0, None)
    image = rng.poisson(expected).astype(np.float32)
    image += rng.normal(0.0, config.read_noise, size=image.shape).astype(np.float32)

    unit_boxes = np.concatenate([np.minimum(metal, chalcogen) - radius, np.maximum(metal, chalcogen) + radius], 1)
    offsets = ((0, -d), (a / 2, -d / 2), (a / 2, d / 2), (0, d), (-a / 2, d / 2), (-a / 2, -d / 2))
    hex_vertices = np.stack([placed(centres + off) for off in offsets], 1)
    hex_boxes = np.concatenate([hex_vertices.min(1) - radius, hex_vertices.max(1) + radius], 1)
    inside_units = _inside(unit_boxes, H, W)
    inside_hex = _inside(hex_boxes, H, W)
    # A cell is readable when both its columns and its surroundings are free of contamination and vacuum.
    blocked = np.maximum(holes, contamination)
    clean = ~(_near(blocked, metal, radius) | _near(blocked, chalcogen, radius))
    ratio = (1.0 + stack) * weight_single / weight_metal
    return StemSample(
        image=image, pixel_size=config.pixel_size, material=config.material,
        hex_boxes=hex_boxes[inside_hex].astype(np.float32),
        unit_boxes=unit_boxes[inside_units].astype(np.float32),
        unit_classes=classes[inside_units].astype(np.int64), unit_clean=clean[inside_units],
        metal_xy=metal[inside_units].astype(np.float32), chalcogen_xy=chalcogen[inside_units].astype(np.float32),
        params={'probe_fwhm_px': fwhm, 'detector_inner_mrad': inner, 'z_exponent': z_n, 'stack_factor': stack,
                'chalcogen_metal_ratio': ratio, 'dose': dose, 'rotation_deg': math.degrees(rotation),
                'swap': swap, 'drift_px': drift.tolist(), 'lattice_px': a,
                'background': background_level, 'contamination_level': level,
                'contaminated_fraction': float(contamination.mean()), 'hole_fraction': float(holes.mean())})


def _inside(boxes: np.ndarray, H: int, W: int) -> np.ndarray:
    return (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= W) & (boxes[:, 3] <= H)


def _near(mask: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """Whether ``mask`` exceeds 0.5 within ``radius`` px of each (x, y) point (on a coarser grid when large)."""
    if not (mask > 0.5).any():
        return np.zeros(len(points), dtype=bool)
    factor = max(radius / 4.0, 1.0)
    H, W = mask.shape
    small = cv2.resize((mask > 0.5).astype(np.uint8), (max(round(W / factor), 1), max(round(H / factor), 1)),
                       interpolation=cv2.INTER_AREA)
    size = 2 * int(math.ceil(radius / factor)) + 1
    grown = cv2.dilate(small, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)))
    return _sample(grown.astype(np.float32), points / factor) > 0


def _sample(field_: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Nearest-pixel values of ``field_`` at (x, y) points; 0 outside the frame."""
    H, W = field_.shape
    x = np.rint(points[:, 0]).astype(np.int64)
    y = np.rint(points[:, 1]).astype(np.int64)
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    values = np.zeros(len(points), dtype=np.float32)
    values[inside] = field_[y[inside], x[inside]]
    return values


def _render_columns(points: np.ndarray, intensities: np.ndarray, sigma: float, H: int, W: int) -> np.ndarray:
    """Sum of Gaussians of peak ``intensities`` at sub-pixel ``points`` (x, y).

    Each column is splatted bilinearly onto the pixel grid and the grid blurred once: a
    2048 px frame renders in well under a second however many columns it holds.
    """
    pad = int(math.ceil(4 * sigma)) + 2
    grid = np.zeros((H + 2 * pad, W + 2 * pad), dtype=np.float64)
    x = points[:, 0] + pad
    y = points[:, 1] + pad
    keep = (intensities > 0) & (x >= 0) & (x < W + 2 * pad - 1) & (y >= 0) & (y < H + 2 * pad - 1)
    x, y, weight = x[keep], y[keep], intensities[keep]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    for dy, dx, share in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(grid, (y0 + dy, x0 + dx), weight * share)
    blurred = cv2.GaussianBlur(grid.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    return blurred[pad:pad + H, pad:pad + W] * np.float32(2.0 * math.pi * sigma * sigma)


def _cover_mask(H: int, W: int, share: float, rng: np.random.Generator, scale: float) -> np.ndarray:
    """A soft 0..1 mask covering about ``share`` of the frame in smooth islands of size ~``scale`` px."""
    if share <= 0:
        rng.normal(size=1)  # keep the stream aligned whether or not the mask is used
        return np.zeros((H, W), dtype=np.float32)
    coarse = rng.normal(0, 1, size=(max(int(H / scale), 2) + 1, max(int(W / scale), 2) + 1)).astype(np.float32)
    smooth = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC)
    threshold = np.quantile(smooth, 1.0 - share)
    width = 0.15 * float(smooth.std()) + 1e-6
    return np.clip((smooth - threshold) / width + 0.5, 0.0, 1.0).astype(np.float32)


def _contamination_texture(H: int, W: int, sigma: float, style: str, rng: np.random.Generator) -> np.ndarray:
    """Brightness pattern of amorphous contamination, mean ~1.

    'blobs': fine speckle at the probe's scale; 'patches': coarser granules with heavy adatoms
    (bright points), a texture the training never draws.
    """
    grain = max(sigma, 1.0) if style == 'blobs' else max(3.0 * sigma, 2.0)
    texture = 1.0 + (0.5 if style == 'blobs' else 0.7) * _noise_at_scale(H, W, grain, rng)
    if style == 'patches':
        adatoms = np.zeros((H, W), dtype=np.float32)
        count = rng.poisson(2e-3 * H * W / max(sigma, 1.0) ** 2)
        adatoms[rng.integers(0, H, size=count), rng.integers(0, W, size=count)] = 1.0
        spread = max(sigma, 1.0)
        texture += 2.0 * cv2.GaussianBlur(adatoms, (0, 0), spread) * np.float32(2 * math.pi * spread ** 2)
    return np.clip(texture, 0.0, None)


def _noise_at_scale(H: int, W: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian noise correlated over ``scale`` px, drawn coarse and enlarged (fast for any scale)."""
    step = max(scale / 2.0, 1.0)
    coarse = rng.normal(0, 1, size=(int(H / step) + 2, int(W / step) + 2)).astype(np.float32)
    coarse = cv2.GaussianBlur(coarse, (0, 0), 1.0)
    noise = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC) if step > 1 else coarse[:H, :W]
    return (noise - float(noise.mean())) / max(float(noise.std()), 1e-6)


def _scan_jitter(image: np.ndarray, jitter_px: float, rng: np.random.Generator) -> np.ndarray:
    """Shift every scan line sideways by a correlated random amount (flyback jitter)."""
    if jitter_px <= 0:
        return image
    H, W = image.shape
    shifts = cv2.GaussianBlur(rng.normal(0, 1, size=(H, 1)).astype(np.float32), (1, 0), 2.0).ravel()
    shifts *= jitter_px / max(float(shifts.std()), 1e-6)
    map_x = (np.arange(W, dtype=np.float32)[None, :] + shifts[:, None]).astype(np.float32)
    map_y = np.repeat(np.arange(H, dtype=np.float32)[:, None], W, axis=1)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _smooth_field(H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-range low-frequency field (thickness changes, detector drift)."""
    coarse = rng.normal(0, 1, size=(8, 8)).astype(np.float32)
    field_ = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC)
    return field_ / max(float(np.abs(field_).max()), 1e-6)


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Counts as a 16-bit image for files and mono16 messages."""
    return np.clip(np.rint(image), 0, 65535).astype(np.uint16)

"""HAADF-STEM images of monolayer 2H-MoTe2 with point defects, and their ground truth.

The model is incoherent Z-contrast: every atomic column is a Gaussian probe image
whose weight is the sum of Z**n over its atoms (Mo: Z = 42, Te: Z = 52, n ~ 1.7, so a
Te2 column is ~2.9x a Mo column). Projected along c the columns form a honeycomb;
the image x axis runs along a lattice vector, so hexagonal cells stand "pointy-top".

Geometry (a = lattice constant, d = a / sqrt(3) the projected Mo-Te distance), for a
hexagon centred at c with vertices Mo (0, -d), Te2 (a/2, -d/2), Mo (a/2, d/2),
Te2 (0, d), Mo (-a/2, d/2), Te2 (-a/2, -d/2):
- every primitive cell (one Mo + one Te2 column = one "unit cell" of seed 003)
  belongs to exactly one hexagon: the top Mo and upper-left Te2 of that hexagon;
- the ground-truth unit-cell box is the bounding box of its two column centres,
  the hexagonal-cell box that of its six column centres, both padded by
  ``column_radius`` (default 0.214 a, for which W_U / W_H = 0.65 as in seed 003).

Imaging faults: Poisson shot noise at a peak dose of ``dose`` counts per pixel on a
Te2 column (seed 003's lambda), Gaussian read noise, a smooth background, linear
drift during the frame (applied to the column positions, so ground truth follows)
and line-to-line scan jitter. Everything is drawn from one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import math

import cv2
import numpy as np

from . import CLASS_NAMES

LATTICE_A = 3.519e-10  # [m], 2H-MoTe2
# Seed 003 at 20 M: a hexagonal cell ~120 px wide, i.e. the lattice constant spans 120 px.
SEED_PIXEL_SIZE = LATTICE_A / 120.0  # [m/px]
Z_MO, Z_TE = 42, 52
PRIMITIVE_CELL_AREA = math.sqrt(3.0) / 2.0 * LATTICE_A ** 2  # [m^2], one Mo + one Te2 column

# Atoms left in the (Mo, Te2) columns of a unit cell for each class.
CLASS_ATOMS = {0: (1, 2), 1: (1, 1), 2: (1, 0), 3: (0, 2), 4: (0, 1), 5: (0, 0)}


@dataclass(frozen=True)
class StemSimConfig:
    """Imaging and sample parameters; ranges are sampled per image."""

    height: int = 1024
    width: int = 1024
    pixel_size: float = SEED_PIXEL_SIZE           # [m/px]
    lattice_a: float = LATTICE_A                  # [m]
    probe_fwhm: tuple[float, float] = (1.0e-10, 1.4e-10)  # [m]
    z_exponent: tuple[float, float] = (1.6, 1.8)
    # Probability of each class per unit cell (index = CLASS_NAMES); Perfect takes the rest.
    defect_probabilities: tuple[float, ...] = (0.0, 0.08, 0.03, 0.03, 0.015, 0.015)
    dose: tuple[float, float] = (5.0, 20.0)       # Poisson lambda: counts at a Te2 column peak
    read_noise: float = 0.5                       # Gaussian read noise, std [counts]
    background: tuple[float, float] = (0.05, 0.2)  # background / Te2 peak
    drift: float = 2.0e-11                        # max drift over one frame, per axis [m]
    jitter_px: float = 1.0                        # std of line-to-line scan jitter [px]
    column_radius_fraction: float = 0.214         # ground-truth box padding, in units of a
    # Spread (log-normal sigma) of per-column brightness: contamination, residue and local tilt change
    # the two columns of a cell differently (seed 003's reason for the 2-channel input).
    column_gain_sigma: float = 0.0

    def validate(self) -> None:
        if not (16 <= self.height <= 8192 and 16 <= self.width <= 8192):
            raise ValueError(f'image size must be 16..8192 px, got {self.height}x{self.width}')
        if self.pixel_size <= 0 or self.lattice_a <= 0:
            raise ValueError('pixel_size and lattice_a must be positive')
        if len(self.defect_probabilities) != len(CLASS_NAMES):
            raise ValueError(f'defect_probabilities needs {len(CLASS_NAMES)} entries')
        if any(p < 0 for p in self.defect_probabilities) or sum(self.defect_probabilities[1:]) > 1:
            raise ValueError('defect probabilities must be >= 0 and sum to <= 1')
        if self.column_gain_sigma < 0:
            raise ValueError('column_gain_sigma must be >= 0')
        if self.dose[0] <= 0 or self.dose[1] < self.dose[0]:
            raise ValueError(f'dose range must be positive and ordered, got {self.dose}')


@dataclass
class StemSample:
    """One simulated image with its ground truth (boxes xyxy in pixels)."""

    image: np.ndarray              # float32 counts, (H, W)
    pixel_size: float              # [m/px]
    hex_boxes: np.ndarray          # (N, 4) hexagonal cells fully inside the image
    unit_boxes: np.ndarray         # (M, 4) unit cells fully inside the image
    unit_classes: np.ndarray       # (M,) class index into CLASS_NAMES
    params: dict = field(default_factory=dict)

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.unit_classes, minlength=len(CLASS_NAMES))


def balanced_config(config: StemSimConfig) -> StemSimConfig:
    """Every class equally likely: the classifier's training distribution."""
    share = 1.0 / len(CLASS_NAMES)
    return replace(config, defect_probabilities=(0.0,) + (share,) * (len(CLASS_NAMES) - 1))


def simulate(config: StemSimConfig = StemSimConfig(), seed: int | np.random.Generator = 0) -> StemSample:
    """Render one image and its ground truth."""
    config.validate()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    H, W = config.height, config.width
    a = config.lattice_a / config.pixel_size          # [px]
    d = a / math.sqrt(3.0)
    radius = config.column_radius_fraction * a
    fwhm = rng.uniform(*config.probe_fwhm) / config.pixel_size
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    z_n = rng.uniform(*config.z_exponent)
    dose = rng.uniform(*config.dose)

    # Hexagon centres on the triangular lattice a1 = (a, 0), a2 = (a/2, 3d/2), with margin.
    origin = rng.uniform(0, 1, size=2) * np.array([a, 1.5 * d])
    rows = np.arange(-2, int(H / (1.5 * d)) + 3)
    cols = np.arange(-int(len(rows) / 2) - 2, int(W / a) + 3)
    jj, ii = np.meshgrid(rows, cols, indexing='ij')
    centres = np.stack([origin[0] + ii * a + jj * a / 2, origin[1] + jj * 1.5 * d], -1).reshape(-1, 2)
    keep = ((centres[:, 0] > -2 * a) & (centres[:, 0] < W + 2 * a)
            & (centres[:, 1] > -2 * a) & (centres[:, 1] < H + 2 * a))
    centres = centres[keep]

    probabilities = np.asarray(config.defect_probabilities, dtype=float).copy()
    probabilities[0] = 1.0 - probabilities[1:].sum()
    classes = rng.choice(len(CLASS_NAMES), size=len(centres), p=probabilities)

    drift = rng.uniform(-1, 1, size=2) * config.drift / config.pixel_size

    def drifted(points: np.ndarray) -> np.ndarray:
        # Linear drift during a raster scan: displacement grows with the row (time).
        return points + drift[None, :] * (points[:, 1:2] / H)

    mo = drifted(centres + [0.0, -d])
    te = drifted(centres + [-a / 2, -d / 2])
    weight_mo = Z_MO ** z_n
    weight_te = Z_TE ** z_n
    atoms = np.array([CLASS_ATOMS[int(k)] for k in classes])
    intensities = np.concatenate([atoms[:, 0] * weight_mo, atoms[:, 1] * weight_te]) / (2 * weight_te)
    if config.column_gain_sigma > 0:
        intensities = intensities * rng.lognormal(0.0, config.column_gain_sigma, size=len(intensities))
    signal = _render_columns(np.concatenate([mo, te]), intensities, sigma, H, W)

    signal = _scan_jitter(signal, config.jitter_px, rng)
    background = rng.uniform(*config.background) * (1.0 + 0.3 * _smooth_field(H, W, rng))
    expected = np.clip(dose * (signal + background), 0, None)
    image = rng.poisson(expected).astype(np.float32)
    image += rng.normal(0.0, config.read_noise, size=image.shape).astype(np.float32)

    unit_boxes = np.concatenate([np.minimum(mo, te) - radius, np.maximum(mo, te) + radius], 1)
    hex_vertices = np.stack([centres + off for off in (
        (0, -d), (a / 2, -d / 2), (a / 2, d / 2), (0, d), (-a / 2, d / 2), (-a / 2, -d / 2))], 1)
    hex_vertices = drifted(hex_vertices.reshape(-1, 2)).reshape(-1, 6, 2)
    hex_boxes = np.concatenate([hex_vertices.min(1) - radius, hex_vertices.max(1) + radius], 1)
    inside_units = _inside(unit_boxes, H, W)
    inside_hex = _inside(hex_boxes, H, W)
    return StemSample(image=image, pixel_size=config.pixel_size,
                      hex_boxes=hex_boxes[inside_hex].astype(np.float32),
                      unit_boxes=unit_boxes[inside_units].astype(np.float32),
                      unit_classes=classes[inside_units].astype(np.int64),
                      params={'probe_fwhm_px': fwhm, 'z_exponent': z_n, 'dose': dose,
                              'drift_px': drift.tolist(), 'lattice_px': a})


def _inside(boxes: np.ndarray, H: int, W: int) -> np.ndarray:
    return (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= W) & (boxes[:, 3] <= H)


def _render_columns(points: np.ndarray, intensities: np.ndarray, sigma: float, H: int, W: int) -> np.ndarray:
    """Sum of Gaussians of peak ``intensities`` at sub-pixel ``points`` (x, y)."""
    image = np.zeros((H, W), dtype=np.float32)
    half = int(math.ceil(4 * sigma))
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    for (x, y), peak in zip(points, intensities):
        if peak <= 0:
            continue
        cx, cy = int(round(x)), int(round(y))
        x0, x1 = max(cx - half, 0), min(cx + half + 1, W)
        y0, y1 = max(cy - half, 0), min(cy + half + 1, H)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.exp(-0.5 * ((cx + offsets - x) / sigma) ** 2)[x0 - cx + half:x1 - cx + half]
        gy = np.exp(-0.5 * ((cy + offsets - y) / sigma) ** 2)[y0 - cy + half:y1 - cy + half]
        image[y0:y1, x0:x1] += peak * np.outer(gy, gx)
    return image


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
    """Zero-mean, unit-range low-frequency field (contamination, thickness changes)."""
    coarse = rng.normal(0, 1, size=(8, 8)).astype(np.float32)
    field_ = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC)
    return field_ / max(float(np.abs(field_).max()), 1e-6)


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Counts as a 16-bit image for files and mono16 messages."""
    return np.clip(np.rint(image), 0, 65535).astype(np.uint16)

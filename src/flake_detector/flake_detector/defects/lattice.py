"""The lattice found in the image: spacing and orientation from its Fourier transform, the
transform into the networks' frame, and the tiles a large frame is cut into.

A honeycomb's first-order Fourier spots lie on a circle of radius 2 / (sqrt(3) a) cycles per
pixel, six of them 60 degrees apart; in the networks' frame (lattice vector a1 along x, a
spanning ``CANONICAL_LATTICE_PX``) they sit at 30 degrees modulo 60. Measuring the spots
gives the lattice constant in pixels (which checks the pixel size and material given) and
the rotation modulo 60 degrees, reported in [-30, 30). An image without such spots is not
an atomic-resolution image of that lattice (an optical micrograph, vacuum, a wrong pixel
size) and is not analysed.

Large frames are processed tile by tile: each tile with a margin is turned and resampled
into the networks' frame on its own, so memory stays bounded whatever the frame size.
"""

from __future__ import annotations

from dataclasses import dataclass
import math

import cv2
import numpy as np

CANONICAL_LATTICE_PX = 30.0      # lattice constant in the networks' frame [px]
FFT_LATTICE_PX = 10.0            # lattice constant at which the spectrum is taken [px]
FFT_SIZE = 512                   # spectrum window side [px] (up to 51 lattice constants)
FFT_PAD = 2                      # zero padding factor of the spectrum window
SEARCH_RANGE = (0.7, 1.4)        # lattice constants searched, relative to the expected one
MIN_SPOT_STRENGTH = 25.0        # six-fold spot power / median power on their circle (optical micrographs: < 8)
CANONICAL_TILE_PX = 2048         # largest tile side in the networks' frame [px]
MAX_TILE_PX = 4096               # largest tile side in the image [px] (bounds its float copy)


@dataclass(frozen=True)
class LatticeFit:
    """What the spectrum says about the lattice."""

    found: bool
    lattice_px: float          # measured lattice constant [px] (expected one when not found)
    rotation_deg: float        # rotation of lattice vector a1 from the image x axis, in [-30, 30)
    strength: float            # mean power of the six spots over the median power on their circle
    expected_px: float

    @property
    def scale_error(self) -> float:
        """Measured / expected lattice constant - 1: a pixel size or material that does not fit the image."""
        return self.lattice_px / self.expected_px - 1.0


def find_lattice(image: np.ndarray, expected_px: float) -> LatticeFit:
    """Lattice constant and rotation from the spectrum of the frame's centre."""
    H, W = image.shape
    factor = min(FFT_LATTICE_PX / expected_px, 1.0)        # bring a to ~10 px (never enlarge)
    side = int(min(H, W, FFT_SIZE / factor))
    y0, x0 = (H - side) // 2, (W - side) // 2
    window = np.asarray(image[y0:y0 + side, x0:x0 + side], dtype=np.float32)
    if factor < 1.0:
        size = max(int(round(side * factor)), 16)
        window = cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA)
    n = window.shape[0]
    scale = n / side                                        # spectrum pixels per image pixel
    window = window - cv2.GaussianBlur(window, (0, 0), max(expected_px * scale, 2.0))
    hann = np.hanning(n).astype(np.float32)
    window = window * hann[:, None] * hann[None, :]
    padded = n * FFT_PAD
    power = np.abs(np.fft.fftshift(np.fft.fft2(window, s=(padded, padded)))) ** 2
    centre = padded / 2.0
    expected_radius = padded * 2.0 / (math.sqrt(3.0) * expected_px * scale)   # [spectrum px]

    # Six-fold sum over the circle of each radius, best angle per radius.
    radii = np.linspace(expected_radius / SEARCH_RANGE[1], expected_radius / SEARCH_RANGE[0], 64)
    angles = np.deg2rad(np.arange(0.0, 60.0, 0.5))
    spokes = angles[:, None] + np.deg2rad(np.arange(0, 360, 60))[None, :]          # (A, 6)
    best = (0.0, expected_radius, 0.0, 1.0)
    for radius in radii:
        xs = centre + radius * np.cos(spokes)
        ys = centre + radius * np.sin(spokes)
        # The weaker half of the six spots: a lattice shows all six, stripes or a JPEG block grid two or four.
        values = np.median(_bilinear(power, xs, ys), axis=1)                          # (A,)
        ring = _bilinear(power, centre + radius * np.cos(np.linspace(0, 2 * np.pi, 720)),
                         centre + radius * np.sin(np.linspace(0, 2 * np.pi, 720)))
        floor = float(np.median(ring)) + 1e-12
        k = int(np.argmax(values))
        strength = float(values[k]) / floor
        if strength > best[0]:
            best = (strength, radius, float(angles[k]), floor)
    strength, radius, angle, _ = best
    radius, angle = _refine_spots(power, centre, radius, angle)
    lattice_px = 2.0 / (math.sqrt(3.0) * radius / padded) / scale
    rotation = (math.degrees(angle) - 30.0 + 30.0) % 60.0 - 30.0
    found = strength >= MIN_SPOT_STRENGTH
    return LatticeFit(found=found, lattice_px=lattice_px if found else expected_px,
                      rotation_deg=rotation if found else 0.0, strength=strength, expected_px=expected_px)


def _bilinear(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    H, W = image.shape
    xs = np.clip(xs, 0, W - 1.001)
    ys = np.clip(ys, 0, H - 1.001)
    x0, y0 = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    fx, fy = xs - x0, ys - y0
    return ((1 - fx) * (1 - fy) * image[y0, x0] + fx * (1 - fy) * image[y0, x0 + 1]
            + (1 - fx) * fy * image[y0 + 1, x0] + fx * fy * image[y0 + 1, x0 + 1])


def _refine_spots(power: np.ndarray, centre: float, radius: float, angle: float) -> tuple[float, float]:
    """Power-weighted centroids of the six spots: sub-pixel radius and the six-fold mean angle."""
    half = max(int(round(radius * 0.12)), 2)
    radii, phases = [], []
    for k in range(6):
        theta = angle + k * math.pi / 3
        cx, cy = centre + radius * math.cos(theta), centre + radius * math.sin(theta)
        x0, y0 = int(round(cx)) - half, int(round(cy)) - half
        patch = power[max(y0, 0):y0 + 2 * half + 1, max(x0, 0):x0 + 2 * half + 1]
        if patch.size == 0:
            continue
        patch = np.clip(patch - np.median(patch), 0, None)
        total = float(patch.sum())
        if total <= 0:
            continue
        yy, xx = np.mgrid[max(y0, 0):max(y0, 0) + patch.shape[0], max(x0, 0):max(x0, 0) + patch.shape[1]]
        sx, sy = float((xx * patch).sum() / total) - centre, float((yy * patch).sum() / total) - centre
        radii.append(math.hypot(sx, sy))
        phases.append(6.0 * math.atan2(sy, sx))
    if not radii:
        return radius, angle
    mean_phase = math.atan2(float(np.mean(np.sin(phases))), float(np.mean(np.cos(phases))))
    return float(np.mean(radii)), (mean_phase / 6.0) % (math.pi / 3)


# ---------------------------------------------------------------- into the networks' frame

@dataclass(frozen=True)
class CanonicalTransform:
    """Image pixels -> the networks' frame: turn by -rotation about ``origin``, scale by ``scale``."""

    rotation_deg: float
    scale: float                  # canonical px per image px
    origin: tuple[float, float]   # image point that maps to ``offset``
    offset: tuple[float, float]

    @property
    def matrix(self) -> np.ndarray:
        """2 x 3 affine matrix of cv2.warpAffine (source = image, destination = canonical)."""
        t = math.radians(self.rotation_deg)
        c, s = math.cos(t) * self.scale, math.sin(t) * self.scale
        ox, oy = self.origin
        tx, ty = self.offset
        return np.array([[c, s, tx - c * ox - s * oy], [-s, c, ty + s * ox - c * oy]], dtype=np.float64)

    def to_image(self, points: np.ndarray) -> np.ndarray:
        inverse = cv2.invertAffineTransform(self.matrix)
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return points @ inverse[:, :2].T + inverse[:, 2]

    def to_canonical(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return points @ self.matrix[:, :2].T + self.matrix[:, 2]


def to_canonical(region: np.ndarray, rotation_deg: float, scale: float) -> tuple[np.ndarray, np.ndarray,
                                                                                   CanonicalTransform]:
    """Turn and resample ``region`` into the networks' frame.

    Returns the canonical image (float32), its validity mask (False where no image pixel
    maps) and the transform from ``region`` pixels. Shrinking is done by area averaging
    first, so shot noise is averaged rather than aliased.
    """
    pixels = np.asarray(region, dtype=np.float32)
    pre = 1.0
    if scale < 0.8:
        h, w = pixels.shape
        size = (max(int(round(w * scale)), 2), max(int(round(h * scale)), 2))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        pre = size[0] / w
    residual = scale / pre
    h, w = pixels.shape
    t = math.radians(rotation_deg)
    out_w = int(math.ceil((abs(math.cos(t)) * w + abs(math.sin(t)) * h) * residual))
    out_h = int(math.ceil((abs(math.sin(t)) * w + abs(math.cos(t)) * h) * residual))
    inner = CanonicalTransform(rotation_deg, residual, (w / 2.0, h / 2.0), (out_w / 2.0, out_h / 2.0))
    canonical = cv2.warpAffine(pixels, inner.matrix, (out_w, out_h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=float(np.median(pixels)))
    valid = cv2.warpAffine(np.ones(pixels.shape, np.uint8), inner.matrix, (out_w, out_h),
                           flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0
    H0, W0 = region.shape
    transform = CanonicalTransform(rotation_deg, scale, (W0 / 2.0, H0 / 2.0), (out_w / 2.0, out_h / 2.0))
    return canonical, valid, transform


# ---------------------------------------------------------------- tiles

@dataclass(frozen=True)
class Tile:
    """A rectangle of the image: ``core`` is what the tile answers for, ``region`` what it reads."""

    core: tuple[int, int, int, int]      # x0, y0, x1, y1 [px]
    region: tuple[int, int, int, int]


def plan_tiles(height: int, width: int, lattice_px: float, scale: float,
               canonical_tile: int = CANONICAL_TILE_PX, max_tile: int = MAX_TILE_PX) -> list[Tile]:
    """Tiles covering the image, the central one first (it decides the sublattices for all).

    The margin (three lattice constants and a little) holds every cell whose centre lies in
    the core wholly inside the region; the core size keeps the turned, resampled region within
    ``canonical_tile`` px per side.
    """
    margin = int(math.ceil(3.0 * lattice_px + 8))
    core = int(min(canonical_tile / (1.37 * scale) - 2 * margin, max_tile - 2 * margin))
    core = max(core, int(2 * lattice_px) + 1)
    if core >= height and core >= width:
        return [Tile((0, 0, width, height), (0, 0, width, height))]
    ny, nx = math.ceil(height / core), math.ceil(width / core)
    ys = np.linspace(0, height, ny + 1).round().astype(int)
    xs = np.linspace(0, width, nx + 1).round().astype(int)
    tiles = []
    for j in range(ny):
        for i in range(nx):
            x0, x1, y0, y1 = int(xs[i]), int(xs[i + 1]), int(ys[j]), int(ys[j + 1])
            tiles.append(Tile((x0, y0, x1, y1), (max(x0 - margin, 0), max(y0 - margin, 0),
                                                min(x1 + margin, width), min(y1 + margin, height))))
    centre = (width / 2.0, height / 2.0)
    tiles.sort(key=lambda t: (t.core[0] - centre[0] + (t.core[2] - t.core[0]) / 2) ** 2
               + (t.core[1] - centre[1] + (t.core[3] - t.core[1]) / 2) ** 2)
    return tiles

"""The bare substrate of a frame: its intensity everywhere, where the chip is, and which
camera channels it saturates.

Every contrast the detectors measure is a ratio to the substrate, so this estimate must
hold on the frames a real scan meets, not only on a clean centred one:

- **Off-chip areas.** A frame at the edge of the chip shows the dark holder or tape beside
  it; when that area is larger than the visible substrate, the most common colour of the
  frame is not the substrate. Pixels darker than a quarter of the frame's bright level
  are never taken for substrate (the bare chip reflects 10-40 %, the area beside it a few
  per cent), and dark areas joined to the frame border are marked off-chip so that no
  region is reported there.
- **Bulk crystals and crowded frames.** The substrate is the most common colour among the
  lit pixels, refined on pixels that lie close to a fitted smooth surface; crystals far
  from it do not pull the fit.
- **Vignetting and uneven illumination.** The surface is quadratic plus r^4 (vignetting);
  the fit starts from pixels close to the dominant colour and grows to every pixel close
  to the surface, so corners that are 15-30 % darker still join it. What the quadratic
  does not follow (a hot spot off centre, a flat-field that is not quite flat) is taken up
  by a smooth correction averaged from the substrate pixels around each point.
- **Saturated substrate.** A channel in which the substrate itself sits at the camera's
  full scale carries no contrast at all (a flake darker than the substrate may still read
  full scale); it is reported as ``blind`` so detectors leave it out instead of reading
  nonsense from it. Strongly white-balanced JPEGs (orange or purple looks) do this.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# A pixel this much darker than the frame's bright level is never substrate [fraction].
DARK_FRACTION = 0.25
# Every channel below this share of the substrate surface, joined to the frame border and
# covering at least OFF_CHIP_AREA of the frame: the chip is not there. Bare SiO2/Si reflects
# 10-40 %, what lies beside a chip a few per cent; a few flakes are as dark (NbSe2 of 6-9
# layers on 70-90 nm oxide reads 4-40 % of the substrate), hence the size.
OFF_CHIP_FRACTION = 0.3
OFF_CHIP_AREA = 0.02
# A channel is blind when this share of the substrate pixels reads full scale.
BLIND_SHARE = 0.2


@dataclass
class Substrate:
    """Substrate estimate of one frame on a copy ``step`` times smaller than the frame."""

    surface: np.ndarray  # (h, w, 3) float32 BGR substrate intensity, smooth, defined everywhere
    on_chip: np.ndarray  # (h, w) bool: False where the frame shows no chip
    substrate: np.ndarray  # (h, w) bool: the pixels the surface was fitted on
    colour: np.ndarray  # (3,) median substrate BGR
    blind: np.ndarray  # (3,) bool BGR: channels the substrate saturates
    step: int
    found: bool  # False when the frame holds no recognisable substrate (all dark, say)

    @property
    def coverage(self) -> float:
        """Share of the frame that is bare substrate."""
        return float(self.substrate.mean())

    def background(self, shape: tuple[int, int]) -> np.ndarray:
        """The substrate surface at ``shape`` (height, width): float32 BGR."""
        return cv2.resize(self.surface, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)

    def on_chip_at(self, shape: tuple[int, int]) -> np.ndarray:
        """The on-chip mask at ``shape`` (height, width)."""
        if self.on_chip.all():
            return np.ones(shape[:2], dtype=bool)
        return cv2.resize(self.on_chip.astype(np.uint8), (shape[1], shape[0]),
                          interpolation=cv2.INTER_NEAREST) > 0


def as_bgr(image: np.ndarray) -> np.ndarray:
    """An H x W x 3 BGR view of a grey, BGR or BGRA image; anything else is a ValueError."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f'expected an HxWx3 BGR image, got shape {image.shape}')
    return image[..., :3]


def full_scale(image: np.ndarray) -> float:
    """The camera's full-scale reading for this image type (inf for float images)."""
    return float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else float('inf')


def estimate_substrate(image_bgr: np.ndarray, step: int = 8, tolerance: float = 0.04,
                       raw: np.ndarray | None = None) -> Substrate:
    """The substrate of a BGR frame (see the module docstring). ``image_bgr`` is in linear
    light (a camera's decoded image, or its digital numbers for a linear camera); ``raw``,
    the camera's digital numbers of the same frame when they differ, tells which channels
    the substrate saturates."""
    image = np.asarray(image_bgr)
    raw = image if raw is None else np.asarray(raw)
    h, w = image.shape[:2]
    size = (max(8, w // step), max(8, h // step))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    sh, sw = small.shape[:2]
    top = full_scale(raw)
    floor_scale = full_scale(image) if np.isfinite(full_scale(image)) else 255.0
    gray = small.mean(axis=2)
    bright = float(np.percentile(gray, 99))
    floor = 0.02 * floor_scale
    lit = gray > max(DARK_FRACTION * bright, floor)
    if lit.sum() < 20:
        colour = np.median(small.reshape(-1, 3), axis=0)
        surface = np.broadcast_to(np.maximum(colour, 1.0).astype(np.float32), small.shape).copy()
        return Substrate(surface, np.ones((sh, sw), bool), np.zeros((sh, sw), bool), colour,
                         np.zeros(3, bool), step, False)
    values = gray[lit]
    hist, edges = np.histogram(values, bins=128, range=(0.0, float(values.max()) + 1.0))
    hist = np.convolve(hist, np.ones(3), mode='same')
    mode = 0.5 * (edges[np.argmax(hist)] + edges[np.argmax(hist) + 1])
    keep = lit & (np.abs(gray - mode) <= max(2.0, tolerance * mode))
    colour = np.median(small[keep], axis=0)
    surface = np.broadcast_to(colour.astype(np.float32), small.shape).copy()
    basis = _basis(sh, sw)
    # Grow the substrate from the dominant colour to every pixel near the fitted surface:
    # vignetted corners join once the surface has bent towards them.
    for _ in range(3):
        near = np.all(np.abs(small - surface) <= np.maximum(2.0, tolerance * surface), axis=2) & lit
        if near.sum() < 20:
            break
        keep = near
        surface = _fit_surface(small, keep, basis)
    # Illumination that a quadratic surface does not follow (a hot spot off centre, a lamp's
    # filament image, a flat-field that is not quite flat): a smooth correction from the
    # substrate pixels around each point (normalised convolution), then the substrate again.
    sigma = max(sh, sw) / 10.0
    for _ in range(2):
        weight = cv2.GaussianBlur(keep.astype(np.float32), (0, 0), sigma)
        ratio = np.where(keep[..., None], small / surface, 0.0).astype(np.float32)
        correction = cv2.GaussianBlur(ratio, (0, 0), sigma) / np.maximum(weight, 1e-6)[..., None]
        correction = np.where(weight[..., None] > 0.05, correction, 1.0)
        surface = np.maximum(surface * correction, 1.0).astype(np.float32)
        near = np.all(np.abs(small - surface) <= np.maximum(2.0, tolerance * surface), axis=2) & lit
        if near.sum() < 20:
            break
        keep = near
    colour = np.median(small[keep], axis=0)
    blind = np.zeros(3, dtype=bool)
    if np.isfinite(top):
        # The coarse copy averages 8 x 8 pixels: a reading this close to full scale means
        # most of them were clipped.
        raw_small = small if raw is image else cv2.resize(raw, size, interpolation=cv2.INTER_AREA)
        blind = (raw_small[keep] >= 0.985 * top).mean(axis=0) >= BLIND_SHARE
    on_chip = _on_chip(small, surface)
    return Substrate(surface, on_chip, keep, colour, blind, step, True)


def _basis(sh: int, sw: int) -> np.ndarray:
    vv, uu = np.mgrid[0:sh, 0:sw].astype(np.float32)
    uu = (uu - (sw - 1) / 2) / max(sw, sh)
    vv = (vv - (sh - 1) / 2) / max(sw, sh)
    r2 = uu ** 2 + vv ** 2
    return np.stack([np.ones_like(uu), uu, vv, uu * uu, uu * vv, vv * vv, r2 * r2], axis=-1)


def _fit_surface(small: np.ndarray, keep: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Quadratic + r^4 surface per channel through the ``keep`` pixels, refitted on the
    pixels that lie within 3 sigmas of it in every channel (one solve for all three)."""
    a = basis[keep].astype(np.float64)
    # With few or clustered pixels (a frame mostly off the chip), the r^4 and quadratic terms
    # are poorly pinned: a small ridge keeps them from swinging.
    ridge = 1e-9 if keep.mean() > 0.2 else 1e-3 * len(a)
    b = small[keep].astype(np.float64)  # (N, 3)
    coef = _least_squares(a, b, ridge)
    residual = np.abs(a @ coef - b)
    limit = np.maximum(1.0, 3.0 * 1.4826 * np.median(residual, axis=0))
    inliers = np.all(residual <= limit, axis=1)
    if inliers.sum() >= 20:
        coef = _least_squares(a[inliers], b[inliers], ridge)
    surface = (basis.reshape(-1, basis.shape[-1]) @ coef.astype(np.float32)).reshape(small.shape)
    return np.maximum(surface, 1.0).astype(np.float32)


def _least_squares(a: np.ndarray, b: np.ndarray, ridge: float) -> np.ndarray:
    # Normal equations: a has 7 well-scaled columns, and this is far cheaper than an SVD.
    # The ridge leaves the constant term free.
    penalty = ridge * np.eye(a.shape[1])
    penalty[0, 0] = 1e-9
    return np.linalg.solve(a.T @ a + penalty, a.T @ b)


def _on_chip(small: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """False on large dark areas joined to the frame border (see ``OFF_CHIP_FRACTION``)."""
    dark = np.all(small < OFF_CHIP_FRACTION * surface, axis=2).astype(np.uint8)
    if not dark.any():
        return np.ones(dark.shape, dtype=bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    large = np.nonzero(stats[:, cv2.CC_STAT_AREA] >= OFF_CHIP_AREA * dark.size)[0]
    off = np.isin(labels, np.intersect1d(border[border > 0], large))
    return ~off

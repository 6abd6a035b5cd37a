"""Training-free optical detector and thickness estimator.

A flake on SiO2/Si changes the reflected intensity by its optical contrast
C = (I_flake - I_background) / I_background per camera channel, which depends on
material, layer count and oxide thickness (thin-film interference) and not on the
lamp brightness or white balance, since both scale I_flake and I_background alike.

Pipeline for one frame: robust background (dominant substrate colour with a smooth
vignetting surface), a search for what stands out on a half-resolution copy, then
inside those windows only: per-pixel contrast, foreground where it stands out of the
background noise, pixels labelled with the nearest layer class of the calibrations,
regions per class, and per region the layer count and thickness with an uncertainty
from the posterior over the classes.

Several materials at once need three more things: channels clipped at the camera's
full scale count as lower bounds (censored likelihood), each region is weighed
against thicker flakes of every material (a thick flake of one is not a thin flake of
another), and line-shaped regions (tape residue, which has the colour of hBN) are
dropped by their shape. A region that clips two or three channels is measured by the
direction of its colour along its unclipped rim (the blur mixes flake and substrate
linearly) together with what its core still measures.

What a region whose colour fits no class of any listed material is, the detector cannot
say; it is reported as material ``unknown`` with its contrast (``report_unknown``), unless
it is a line, the rim of a thicker crystal or the area beside the chip. The rim of a bright
or dark crystal passes through the colours of thin flakes on its way to the substrate; a
narrow region that runs along a stronger neighbour, or one with no plateau inside, is
that rim and not a flake.

Classes come from the one calibration of the microscope (``flake_core.calibration``: the
thin-film model through the camera's bands, measured classes where there are any), and the
image is decoded with the calibration's camera (black level, gamma) before any contrast is
taken, so contrasts are physical on any camera. A channel in which the substrate itself
saturates carries no contrast and is left out of the frame (``flake_detector.substrate``).
``estimate_thickness`` is what other backends call to refine a mask's thickness.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
import math
import time

import cv2
import numpy as np
from scipy import ndimage

from flake_core import materials, optics
from flake_core.calibration import Calibration, LayerClasses
from flake_core.calibration import load_calibration as load_microscope
from flake_core.camera_response import CameraResponse
from flake_core.materials import layer_class_of, parse_materials
from flake_detector.detection import (
    Detection,
    FrameResult,
    FunnelStage,
    add_isolation,
    region_quality,
    register_detector,
)
from flake_detector.substrate import Substrate, as_bgr, estimate_substrate

# What the detector weighs a region against besides the reported classes (flake_core.materials).
ALTERNATIVE_LAYERS = {m.name: m.alternative_layers for m in materials.MATERIALS.values()}
# Spread of real flakes around the model contrast (per channel, contrast units), as in
# flake_core.calibration.
MODEL_SIGMA = 0.02
# What the rim of a clipped flake tells of its colour's direction at best (radians):
# the blend with a neighbour the substrate test lets through.
DIRECTION_FLOOR = 0.01
# Beyond this many foreground windows a frame is processed in one piece.
BUSY_WINDOWS = 12
# Where a flake's outline is drawn: the share of its own contrast a pixel must show (half:
# the edge of a blurred step; see _half_contrast_edge).
EDGE_FRACTION = 0.5
# Variance added to a channel the substrate saturates: the Gaussian classes become their
# marginals over the other channels.
BLIND_VARIANCE = 1e4


def thin_film_contrast(material: str, layers: int, oxide_nm: float) -> tuple[float, float, float]:
    """Model contrast (R, G, B) of ``layers`` layers of ``material`` on SiO2(oxide_nm)/Si.

    The band-averaged transfer-matrix model of the simulated microscope
    (flake_core.optics, B, G, R order there), so simulated frames and this
    detector share one physics.
    """
    key = materials.material(material).name
    bgr = optics.model_contrast(key, layers * optics.layer_thickness_nm(key), oxide_nm)
    return tuple(float(v) for v in bgr[::-1])


def load_calibration(material: str, oxide_nm: float = 90.0, source: str = 'auto') -> LayerClasses:
    """The layer classes of one material from the microscope calibration ``source`` (a shipped
    name, 'auto', 'measured', 'model', or a calibration file; see flake_core.calibration)."""
    return load_microscope(source, oxide_nm).layer_classes(material)


class Linearizer:
    """Digital numbers -> linear light, scaled to 0..255, with the calibration's camera (black
    level and gamma): contrast is a ratio of linear intensities. The identity for a linear
    camera, where frames are used as they are."""

    def __init__(self, camera: CameraResponse | None = None):
        camera = camera or CameraResponse()
        self.identity = camera.gamma == 1.0 and camera.black_level_dn == 0.0
        self._table = (255.0 * camera.decode(np.arange(256.0))).astype(np.float32)
        self._camera = camera

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.identity:
            return image
        if image.dtype == np.uint8:
            return cv2.LUT(image, self._table)
        return (255.0 * self._camera.decode(np.asarray(image, dtype=np.float64))).astype(np.float32)


# --------------------------------------------------------------------------- background


def estimate_background(image_bgr: np.ndarray, step: int = 8, tolerance: float = 0.04) -> np.ndarray:
    """Substrate intensity per pixel (float32 HxWx3, BGR) without the flakes: the smooth
    surface of ``flake_detector.substrate.estimate_substrate`` (off-chip areas, bulk crystals
    and vignetting survive it)."""
    image = as_bgr(image_bgr)
    return estimate_substrate(image, step, tolerance).background(image.shape[:2])


def background_surface(image_bgr: np.ndarray, step: int = 8, tolerance: float = 0.04) -> np.ndarray:
    """The substrate surface of ``estimate_background`` on a copy ``step`` times smaller
    (float32, BGR); resizing it to any size gives the background at that size."""
    return estimate_substrate(as_bgr(image_bgr), step, tolerance).surface


def mahalanobis_sq(x: np.ndarray, means: np.ndarray, covariances: np.ndarray | None = None,
                   precisions: np.ndarray | None = None) -> np.ndarray:
    """Squared Mahalanobis distances (N, K) of (N, 3) points to K Gaussians (give the
    covariances, or their inverses when they are reused).

    Expanded as x'Px - 2 x'Pm + m'Pm so the work is two small matrix products.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1, 3)
    if precisions is None:
        precisions = np.linalg.inv(covariances)  # (K, 3, 3)
    quad = np.stack([x[:, 0] ** 2, x[:, 1] ** 2, x[:, 2] ** 2, 2 * x[:, 0] * x[:, 1],
                     2 * x[:, 0] * x[:, 2], 2 * x[:, 1] * x[:, 2]], axis=1)
    p = precisions
    coef = np.stack([p[:, 0, 0], p[:, 1, 1], p[:, 2, 2], p[:, 0, 1], p[:, 0, 2], p[:, 1, 2]], axis=0)
    pm = np.einsum('kij,kj->ki', p, means)  # (K, 3)
    mpm = np.einsum('ki,ki->k', means, pm)
    return np.maximum(quad @ coef - 2.0 * (x @ pm.T) + mpm[None, :], 0.0)


def contrast_map(image_bgr: np.ndarray, background: np.ndarray | None = None,
                 smooth: int = 3) -> np.ndarray:
    """Per-pixel contrast (float32 HxWx3 in R, G, B order), box-smoothed over ``smooth`` px."""
    image = as_bgr(image_bgr)
    if background is None:
        background = estimate_background(image)
    # cv2 does the channel swaps, the division and the subtraction in single passes.
    image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2RGB).astype(np.float32)
    if smooth > 1:
        image = cv2.blur(image, (smooth, smooth))
    contrast = cv2.divide(image, cv2.cvtColor(np.ascontiguousarray(background, dtype=np.float32),
                                               cv2.COLOR_BGR2RGB))
    return cv2.subtract(contrast, 1.0)


# --------------------------------------------------------------------------- thickness


@dataclass(frozen=True)
class ThicknessEstimate:
    material: str
    layers: float
    layers_std: float
    thickness_nm: float
    thickness_nm_std: float
    best_layers: float  # most probable layer count
    probability: float  # posterior of the most probable layer count
    mahalanobis: float  # distance of the mean contrast to that class
    contrast: tuple[float, float, float]
    version: str

    @property
    def layer_class(self) -> int:
        return layer_class_of(self.best_layers)


def _log_likelihoods(calibration: LayerClasses, contrast: np.ndarray, extra_cov: np.ndarray | None = None,
                     censored: np.ndarray | None = None):
    """Gaussian log-likelihood of (N, 3) contrasts under each class: (N, K), plus d^2 (N, K).

    ``censored`` (3 bools, R, G, B) marks saturated channels, whose contrast is only a
    lower bound (see ``censored_mahalanobis_sq``).
    """
    return _class_log_likelihoods(calibration.means, calibration.covariances, contrast, extra_cov, censored)


def _class_log_likelihoods(means: np.ndarray, covariances: np.ndarray, contrast: np.ndarray,
                           extra_cov: np.ndarray | None = None, censored: np.ndarray | None = None):
    covs = covariances if extra_cov is None else covariances + extra_cov
    _, logdet = np.linalg.slogdet(covs)
    contrast = np.asarray(contrast, dtype=np.float64).reshape(-1, 3)
    if censored is not None and np.any(censored):
        flags = np.broadcast_to(np.asarray(censored, dtype=bool).reshape(-1, 3), contrast.shape)
        d2 = censored_mahalanobis_sq(contrast, means, np.linalg.inv(covs), flags)
    else:
        d2 = mahalanobis_sq(contrast, means, covs)
    return -0.5 * (d2 + logdet[None, :]), d2


def censored_mahalanobis_sq(x: np.ndarray, means: np.ndarray, precisions: np.ndarray,
                            censored: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances (N, K) when some channels are saturated.

    A saturated channel only says the true contrast is at least what was read: a class
    whose mean lies above the reading fits that channel perfectly, a class below it
    misses by the difference. This is the profile of the censored Gaussian, which keeps
    bright flakes (MoS2 from 5 layers, WTe2 from about 15 and thick hBN on 90 nm oxide
    at the usual exposure) measurable from their unsaturated channels.
    """
    residual = np.asarray(x, dtype=np.float64).reshape(-1, 1, 3) - means[None, :, :]
    flags = np.asarray(censored, dtype=bool).reshape(-1, 1, 3)
    residual = np.where(flags, np.maximum(residual, 0.0), residual)
    return np.einsum('nki,kij,nkj->nk', residual, precisions, residual)


def estimate_from_contrast(calibration: LayerClasses, contrast: np.ndarray,
                           pixel_count: int = 1, pixel_noise: float = 0.0,
                           censored: np.ndarray | None = None,
                           blind: np.ndarray | None = None) -> ThicknessEstimate:
    """Layer count and thickness from a region's mean (R, G, B) contrast; ``censored``
    (3 bools) marks channels saturated in the camera (their contrast is a lower bound),
    ``blind`` (3 bools) channels that carry nothing (the substrate saturates them)."""
    contrast = np.asarray(contrast, dtype=np.float64).reshape(1, 3)
    extra = np.eye(3) * (pixel_noise ** 2 / max(1, pixel_count))
    if blind is not None:
        extra = extra + np.diag(np.where(np.asarray(blind, dtype=bool), BLIND_VARIANCE, 0.0))
    loglik, d2 = _log_likelihoods(calibration, contrast, extra, censored)
    loglik = loglik[0] - loglik[0].max()
    posterior = np.exp(loglik)
    posterior /= posterior.sum()
    layers = calibration.layers
    mean = float(posterior @ layers)
    std = float(math.sqrt(max(0.0, posterior @ (layers - mean) ** 2)))
    best = int(np.argmax(posterior))
    # The std of a discrete posterior is 0 when one class dominates; the spacing of
    # neighbouring classes keeps a floor on what the contrast can resolve.
    spacing = float(np.median(np.diff(layers))) if len(layers) > 1 else 1.0
    std = max(std, spacing * (1.0 - float(posterior[best])) * 0.5)
    return ThicknessEstimate(
        material=calibration.material, layers=float(layers[best]), layers_std=std,
        thickness_nm=float(layers[best] * calibration.layer_nm), thickness_nm_std=std * calibration.layer_nm,
        best_layers=float(layers[best]), probability=float(posterior[best]),
        mahalanobis=float(math.sqrt(d2[0, best])), contrast=tuple(float(v) for v in contrast[0]),
        version=calibration.version)


def estimate_thickness(image_bgr: np.ndarray, mask: np.ndarray, calibration: LayerClasses,
                       background: np.ndarray | None = None, bbox: tuple[int, int, int, int] | None = None,
                       erode: int = 2) -> ThicknessEstimate:
    """Refine the thickness of one flake given its mask: what every backend calls.

    ``mask`` is a bool mask over the whole frame, or over ``bbox`` (x, y, w, h) when
    given. The edge pixels are eroded away first (blurred in the optics). ``background``
    (the substrate in the frame's digital numbers, as ``estimate_background`` gives it) and
    the frame are decoded with the calibration's camera before the contrast is taken.
    """
    image = as_bgr(image_bgr)
    linear = Linearizer(calibration.camera)
    if background is None:
        background = estimate_background(image)
    if bbox is not None:
        # Only the flake's box is needed: keep the work proportional to the flake.
        x, y, w, h = (int(v) for v in bbox)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(image.shape[1], x + w), min(image.shape[0], y + h)
        crop = image[y0:y1, x0:x1]
        background = background[y0:y1, x0:x1]
        full = np.asarray(mask, dtype=bool)[y0 - y:y1 - y, x0 - x:x1 - x]
    else:
        crop = image
        full = np.asarray(mask, dtype=bool)
    if linear.identity:
        contrast = contrast_map(crop, background, smooth=1)
    else:
        contrast = contrast_map(linear(crop), linear(np.asarray(background, dtype=np.float32)), smooth=1)
    inner = full
    if erode > 0:
        eroded = cv2.erode(full.astype(np.uint8), np.ones((2 * erode + 1, 2 * erode + 1), np.uint8)) > 0
        if eroded.sum() >= 4:
            inner = eroded
    if not inner.any():
        raise ValueError('empty mask: nothing to estimate a thickness from')
    values = contrast[inner]
    noise = float(np.mean(1.4826 * np.median(np.abs(values - np.median(values, axis=0)), axis=0)))
    saturated = _saturated(crop, 1)
    censored = None if saturated is None else saturated[..., ::-1][inner].mean(axis=0) > 0.5
    return estimate_from_contrast(calibration, np.median(values, axis=0), len(values), noise, censored)


def _saturated(raw: np.ndarray, smooth: int) -> np.ndarray | None:
    """Channels (BGR) where a pixel, or one it is smoothed with (``smooth`` x ``smooth``),
    sits at the camera's full scale: the contrast there is only a lower bound. None for
    float images, which have no full scale."""
    if not np.issubdtype(raw.dtype, np.integer):
        return None
    if smooth > 1:
        raw = cv2.dilate(raw, np.ones((smooth, smooth), np.uint8))
    return raw >= np.iinfo(raw.dtype).max


def _pixel_noise(contrast: np.ndarray, stride: int = 4, channels: np.ndarray | None = None,
                 where: np.ndarray | None = None) -> float:
    """Robust noise (mean MAD-sigma over ``channels``, B, G, R flags of the map's order) of a
    contrast map, from every ``stride``-th pixel of ``where`` (default: all)."""
    sample = contrast[::stride, ::stride]
    sample = sample[where] if where is not None and where.sum() >= 20 else sample.reshape(-1, 3)
    mad = np.median(np.abs(sample - np.median(sample, axis=0)), axis=0)
    sigma = 1.4826 * mad
    if channels is not None and np.any(channels):
        sigma = sigma[np.asarray(channels, dtype=bool)]
    return float(np.mean(sigma))


def _sampled_noise(work: np.ndarray, background: np.ndarray, smooth: int, stride: int = 8,
                   channels: np.ndarray | None = None, substrate: np.ndarray | None = None) -> float:
    """Noise of the box-smoothed contrast (what ``_pixel_noise`` measures on the full map),
    from every ``stride``-th pixel: the smoothing is summed from shifted strided views,
    so no full-resolution pass is needed. ``substrate`` (a bool map at any resolution)
    restricts the sample to the bare substrate: crystals or an off-chip half of the frame
    would widen it."""
    h, w = work.shape[:2]
    r = smooth // 2 if smooth > 1 else 0
    rows, cols = len(range(r, h - r, stride)), len(range(r, w - r, stride))
    if rows < 4 or cols < 4:
        return _pixel_noise(contrast_map(work, background, smooth), channels=channels)
    total = np.zeros((rows, cols, 3), np.float32)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            total += work[r + dy:h - r + dy:stride, r + dx:w - r + dx:stride][:rows, :cols]
    total /= float((2 * r + 1) ** 2)
    where = None
    if substrate is not None:
        where = cv2.resize(substrate.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST) > 0
    return _pixel_noise(total / background[r:h - r:stride, r:w - r:stride][:rows, :cols] - 1.0, stride=1,
                        channels=channels, where=where)


class _PixelClassifier:
    """Nearest class (squared Mahalanobis distance) of many pixels against fixed Gaussians,
    gated at ``gate`` sigma.

    The distance is expanded as x'Px - 2 x'Pm + m'Pm so the classes cost two small
    float32 matrix products per batch of pixels; pixels outside the box that bounds every
    class's gate ellipsoid (bulk crystals, dust, saturated spots) are settled first.
    """

    def __init__(self, means: np.ndarray, covariances: np.ndarray, gate: float, active: np.ndarray | None = None):
        # Only ``active`` classes compete; their indices are mapped back to the full table.
        self._index = np.arange(len(means)) if active is None else np.nonzero(active)[0]
        if not len(self._index):  # nothing can be reported: every class looks like the substrate
            self._index = np.arange(len(means))
            means = np.full_like(means, 1e6)
        else:
            means, covariances = means[self._index], covariances[self._index]
        precisions = np.linalg.inv(covariances)  # (K, 3, 3)
        self._means, self._precisions = means, precisions
        self._quadratic = precisions.reshape(len(means), 9).T.astype(np.float32)  # (9, K)
        pm = np.einsum('kij,kj->ki', precisions, means)
        self._linear = (-2.0 * pm).T.astype(np.float32)  # (3, K)
        self._constant = np.einsum('ki,ki->k', means, pm).astype(np.float32)
        self._gate_sq = gate * gate
        reach = gate * np.sqrt(np.diagonal(covariances, axis1=1, axis2=2))  # (K, 3)
        self._low = (means - reach).min(axis=0).astype(np.float32)
        self._high = (means + reach).max(axis=0).astype(np.float32)

    def distances(self, values: np.ndarray) -> np.ndarray:
        x = np.asarray(values, dtype=np.float32).reshape(-1, 3)
        outer = (x[:, :, None] * x[:, None, :]).reshape(-1, 9)
        d2 = outer @ self._quadratic
        d2 += x @ self._linear
        d2 += self._constant
        return np.maximum(d2, 0.0, out=d2)

    def classify(self, values: np.ndarray, censored: np.ndarray | None = None) -> np.ndarray:
        """Index of the nearest class per pixel, -1 where no class lies within the gate.

        ``censored`` (N, 3) marks saturated channels: a pixel with one is matched by the
        censored distance; a pixel with two or three stays -1, since a single measured
        channel is met by every material's thickness curve somewhere and so names none.
        """
        x = np.asarray(values, dtype=np.float32).reshape(-1, 3)
        labels = np.full(len(x), -1, dtype=np.int32)
        plain = np.ones(len(x), dtype=bool)
        if censored is not None:
            flags = np.asarray(censored, dtype=bool).reshape(-1, 3)
            plain = ~flags.any(axis=1)
            partly = flags.sum(axis=1) == 1
            # As below, but a saturated channel bounds the class means from below only.
            partly &= np.all((x <= self._high) & (flags | (x >= self._low)), axis=1)
            partly = np.nonzero(partly)[0]
            if len(partly):
                d2 = censored_mahalanobis_sq(x[partly], self._means, self._precisions, flags[partly])
                best = np.argmin(d2, axis=1)
                ok = np.take_along_axis(d2, best[:, None], axis=1)[:, 0] <= self._gate_sq
                labels[partly[ok]] = best[ok]
        inside = np.nonzero(plain & np.all((x >= self._low) & (x <= self._high), axis=1))[0]
        if len(inside):
            d2 = self.distances(x[inside])
            best = np.argmin(d2, axis=1)
            ok = np.take_along_axis(d2, best[:, None], axis=1)[:, 0] <= self._gate_sq
            labels[inside[ok]] = best[ok]
        return np.where(labels >= 0, self._index[np.maximum(labels, 0)], -1).astype(np.int32)


# --------------------------------------------------------------------------- detector


@dataclass
class _FrameTables:
    """The class tables of one frame: the detector's tables with the channels the substrate
    saturates marginalised out."""

    covariances: np.ndarray  # reported classes
    all_precisions: np.ndarray  # reported and thicker classes
    all_logdet: np.ndarray
    clip_precisions: np.ndarray  # and bulk hBN (the clipped-region families)
    blind_rgb: np.ndarray  # (3,) bool, R, G, B
    # Reported classes the substrate itself fits within the gate: a region of their colour cannot
    # be told from bare substrate (a faint thick rung, hBN of 1-3 layers), so none is reported.
    visible: np.ndarray


class OpticalDetector:
    """The ``contrast`` backend: segmentation by calibrated contrast, no training.

    ``materials`` lists the materials to match against (each region goes to the
    best-fitting class of any of them), ``calibration`` the microscope calibration
    (flake_core.calibration: 'auto', 'measured', 'model' or a file); ``max_layers``
    drops regions thicker than the range one wants reported; regions whose contrast fits
    no class within ``gate_sigma`` are reported as material ``unknown`` with their contrast
    (``report_unknown``) unless they are lines, rims of crystals or the area beside the chip.
    """

    name = 'contrast'

    def __init__(self, materials='graphene', oxide_nm: float = 90.0, calibration: str = 'auto',
                 min_area_px: int = 60, max_layers: float = 40.0, gate_sigma: float = 4.0,
                 foreground_sigma: float = 4.0, min_contrast: float = 0.03, smooth: int = 3,
                 background_step: int = 8, edge_px: int = 2, work_size: int = 1024,
                 max_elongation: float = 5.0, rim_direction: bool = True, min_clipped_probability: float = 0.9,
                 report_unknown: bool = True, rim_width_px: float = 6.0, score_map=None):
        names = parse_materials(materials)
        self.microscope: Calibration = load_microscope(calibration, oxide_nm)
        oxide_nm = self.microscope.oxide_nm
        self.linearize = Linearizer(self.microscope.camera)
        self.calibrations = [self.microscope.layer_classes(m).restrict(max_layers) for m in names]
        if not 0.0 <= float(min_clipped_probability) <= 1.0:
            raise ValueError(f'min_clipped_probability must be in [0, 1], got {min_clipped_probability}')
        for key, value in (('min_area_px', min_area_px), ('max_layers', max_layers), ('gate_sigma', gate_sigma),
                           ('foreground_sigma', foreground_sigma), ('smooth', smooth),
                           ('background_step', background_step), ('max_elongation', max_elongation)):
            if not float(value) > 0:
                raise ValueError(f'{key} must be positive, got {value}')
        self.min_area_px = int(min_area_px)
        self.gate_sigma = float(gate_sigma)
        self.foreground_sigma = float(foreground_sigma)
        self.min_contrast = float(min_contrast)
        self.smooth = int(smooth)
        self.background_step = int(background_step)
        self.edge_px = int(edge_px)
        self.work_size = int(work_size)
        self.max_elongation = float(max_elongation)
        self.rim_direction = bool(rim_direction)
        self.min_clipped_probability = float(min_clipped_probability)
        self.report_unknown = bool(report_unknown)
        # Raw scores to probabilities (flake_detector.score_calibration); an object of your own
        # (a ScoreMap) or None for the shipped map.
        self.score_map = score_map if score_map is not None else _shipped_score_map()
        self.rim_width_px = float(rim_width_px)
        self.model_version = '+'.join(c.version for c in self.calibrations)
        # One stacked class table across materials: (material index, layers) per class.
        self._owner = np.concatenate([np.full(len(c.layers), i) for i, c in enumerate(self.calibrations)])
        self._means = np.concatenate([c.means for c in self.calibrations])
        self._covs = np.concatenate([c.covariances for c in self.calibrations])
        # Every class a region is weighed against: the reported ones, then thicker flakes of
        # each material (thin-film model), which are never reported.
        thicker = [self.microscope.layer_classes(c.material, [n for n in ALTERNATIVE_LAYERS[c.material]
                                                              if n > c.layers.max()])
                   for c in self.calibrations]
        thicker = [c for c in thicker if len(c.layers)]
        self._all_owner = np.concatenate([self._owner] + [np.full(len(c.layers), -1) for c in thicker])
        self._all_means = np.concatenate([self._means] + [c.means for c in thicker])
        self._all_covs = np.concatenate([self._covs] + [c.covariances for c in thicker])
        # A region that clips two or three channels is weighed by its colour's direction
        # (see _clipped_regions), which bulk crystals (0.3-3 um) can share: transparent hBN
        # keeps changing colour that thick, the opaque materials have settled by 200 nm.
        # Classes come in families (a material's reported range, each material's thicker
        # flakes, bulk hBN) with a prior uniform in log thickness: a family that meets any
        # colour somewhere over its thousand thicknesses gains nothing by the count.
        bulk_hbn = self.microscope.layer_classes('hbn', range(903, 9001, 9))
        families = [np.full(len(c.layers), i) for i, c in enumerate(self.calibrations)]
        families += [np.full(len(c.layers), len(self.calibrations) + j) for j, c in enumerate(thicker)]
        families.append(np.full(len(bulk_hbn.layers), len(self.calibrations) + len(thicker)))
        self._clip_family = np.concatenate(families)
        tables = [c.layers for c in self.calibrations] + [c.layers for c in thicker] + [bulk_hbn.layers]
        self._clip_prior = np.concatenate([np.gradient(t) / t if len(t) > 1 else np.ones(1) for t in tables])
        self._clip_means = np.concatenate([self._all_means, bulk_hbn.means])
        self._clip_covs = np.concatenate([self._all_covs, bulk_hbn.covariances])
        self._clip_layers = np.concatenate([c.layers for c in self.calibrations]
                                           + [np.full(len(self._clip_family) - len(self._owner), np.nan)])
        self._frame_tables: dict[tuple[bool, ...], _FrameTables] = {}

    def tables(self, blind_bgr=(False, False, False)) -> _FrameTables:
        """Class tables with the channels ``blind_bgr`` (B, G, R) marginalised out."""
        key = tuple(bool(v) for v in blind_bgr)
        found = self._frame_tables.get(key)
        if found is None:
            blind_rgb = np.array(key[::-1])
            extra = np.diag(np.where(blind_rgb, BLIND_VARIANCE, 0.0))
            all_covs = self._all_covs + extra
            covariances = self._covs + extra
            to_substrate = mahalanobis_sq(np.zeros((1, 3)), self._means, covariances)[0]
            found = _FrameTables(covariances, np.linalg.inv(all_covs), np.linalg.slogdet(all_covs)[1],
                                 np.linalg.inv(self._clip_covs + extra), blind_rgb,
                                 to_substrate > self.gate_sigma ** 2)
            self._frame_tables[key] = found
        return found

    def detect(self, image_bgr: np.ndarray, background: np.ndarray | None = None) -> FrameResult:
        """Flakes in one frame. ``background``: the substrate in the frame's digital numbers
        (HxWx3), when known; estimated from the frame otherwise."""
        t0 = time.perf_counter()
        raw = as_bgr(image_bgr)
        h, w = raw.shape[:2]
        linear = self.linearize(raw)
        # Large frames are segmented at reduced resolution (the blur of the optics is
        # wider than a pixel anyway); masks come back at full resolution.
        scale = min(1.0, self.work_size / max(h, w)) if self.work_size > 0 else 1.0
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            work = cv2.resize(linear, size, interpolation=cv2.INTER_AREA)
            raw_work = work if self.linearize.identity else cv2.resize(raw, size, interpolation=cv2.INTER_AREA)
        else:
            work, raw_work = linear, raw
        work = np.ascontiguousarray(work)
        hw, ww = work.shape[:2]
        # The foreground is searched on a half-resolution copy (see _foreground_windows).
        factor = 2 if min(hw, ww) >= 64 else 1
        coarse = work if factor == 1 else cv2.resize(work, (ww // factor, hw // factor),
                                                     interpolation=cv2.INTER_AREA)
        if background is None:
            # A smooth surface needs no more than ~100 coarse pixels a side, whatever the frame.
            step = max(1, round(self.background_step * scale), math.ceil(max(hw, ww) / 100))
            substrate = estimate_substrate(work, step=step, raw=raw_work)
            if not substrate.found:
                return FrameResult([], funnel=[FunnelStage('no substrate in view', 0)],
                                   timings={'contrast': time.perf_counter() - t0})
            surface = substrate.surface
            background = cv2.resize(surface, (ww, hw), interpolation=cv2.INTER_LINEAR)
            coarse_background = cv2.resize(surface, (coarse.shape[1], coarse.shape[0]),
                                           interpolation=cv2.INTER_LINEAR)
        else:
            background = np.asarray(background, dtype=np.float32)
            if background.shape[:2] != (hw, ww):
                background = cv2.resize(background, (ww, hw), interpolation=cv2.INTER_AREA)
            blind = np.zeros(3, bool)
            if np.issubdtype(raw.dtype, np.integer):
                blind = np.median(background.reshape(-1, 3), axis=0) >= 0.985 * np.iinfo(raw.dtype).max
            background = self.linearize(background)
            substrate = Substrate(background[::8, ::8], np.ones((1, 1), bool), np.ones((1, 1), bool),
                                  np.median(background.reshape(-1, 3), axis=0), blind, 8, True)
            coarse_background = cv2.resize(background, (coarse.shape[1], coarse.shape[0]),
                                            interpolation=cv2.INTER_AREA)
        tables = self.tables(substrate.blind)
        # Beside the chip (and along its edge, which the optics blur) nothing is reported.
        off_chip = ~substrate.on_chip_at((hw, ww))
        if off_chip.any():
            off_chip = cv2.dilate(off_chip.astype(np.uint8), np.ones((3, 3), np.uint8),
                                  iterations=self.edge_px + 2) > 0
        noise = max(_sampled_noise(work, background, self.smooth, channels=~substrate.blind,
                                   substrate=substrate.substrate if substrate.substrate.any() else None), 1e-3)
        threshold = max(self.min_contrast, self.foreground_sigma * noise * math.sqrt(3.0))
        min_area = max(4, int(self.min_area_px * scale * scale))
        windows = self._foreground_windows(coarse, coarse_background, factor, (hw, ww), threshold, min_area,
                                           substrate.blind, off_chip)
        if len(windows) > BUSY_WINDOWS:
            # A busy frame (real chips carry debris everywhere): one pass over the whole frame
            # costs less than many windows.
            owned = np.zeros((hw, ww), dtype=bool)
            for x0, y0, x1, y1, part in windows:
                owned[y0:y1, x0:x1] |= part
            windows = [(0, 0, ww, hw, owned)]
        t1 = time.perf_counter()
        detections: list[Detection] = []
        pixel_cov = np.eye(3) * noise ** 2
        classifier = _PixelClassifier(self._means, tables.covariances + pixel_cov, self.gate_sigma, tables.visible)
        candidates = unknown = rims = 0
        for x0, y0, x1, y1, owned in windows:
            contrast, saturated = self._window_contrast(work, raw_work, background, x0, y0, x1, y1, tables.blind_rgb)
            magnitude_sq = cv2.transform(contrast * contrast, np.ones((1, 3), np.float32))
            inside = owned & ~off_chip[y0:y1, x0:x1]
            foreground = ((magnitude_sq > threshold * threshold) & inside).astype(np.uint8)
            foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
            count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
            areas = stats[:, cv2.CC_STAT_AREA]
            valid = np.nonzero(areas[1:] >= min_area)[0] + 1
            candidates += len(valid)
            small = valid[areas[valid] < 4 * min_area]
            # Small components (most are debris) are settled together: one class each from their
            # deepest pixels; those of no class that clip nothing are done with.
            small_class = self._small_classes(labels, small, foreground, contrast, saturated, classifier)
            for index in valid:
                known = small_class.get(int(index))
                if known is not None and known[0] < 0 and not known[1]:
                    continue
                x, y, bw, bh, _ = stats[index]
                window = contrast[y:y + bh, x:x + bw]
                censored = None if saturated is None else saturated[y:y + bh, x:x + bw]
                component = labels[y:y + bh, x:x + bw] == index
                magnitude = np.sqrt(magnitude_sq[y:y + bh, x:x + bw])
                beside = off_chip[y0 + y:y0 + y + bh, x0 + x:x0 + x + bw]
                region_map, region_class, core = self._segments(window, component, censored, classifier, noise,
                                                                min_area, scale)
                found = self._regions(region_map, region_class, core, window, censored, (x0 + x, y0 + y), noise,
                                      min_area, tables)
                if censored is not None and self.rim_direction:
                    found += self._clipped_regions(component, window, censored, (x0 + x, y0 + y),
                                                   noise, threshold, min_area, tables)
                kept = []
                for det in found:
                    offset = (det.bbox[0] - x0 - x, det.bbox[1] - y0 - y)
                    if _is_rim(det.mask, offset, component, magnitude, beside, window, noise,
                               self.rim_width_px * scale):
                        rims += 1
                    else:
                        kept.append(det)
                detections.extend(kept)
                if self.report_unknown:
                    new = self._unknown_regions(region_map, region_class, core, component, window, censored,
                                                magnitude, beside, (x0 + x, y0 + y), noise, min_area, scale, tables)
                    unknown += len(new)
                    detections.extend(new)
        if scale < 1.0:
            detections = [_rescale(d, 1.0 / scale, (h, w)) for d in detections]
        t2 = time.perf_counter()
        add_isolation(detections)
        known = len(detections) - unknown
        return FrameResult(detections, candidates=candidates,
                           funnel=[FunnelStage('foreground regions', candidates),
                                   FunnelStage('calibrated regions', known + rims),
                                   FunnelStage('not rims of crystals', known),
                                   FunnelStage('unknown colour', unknown)],
                           timings={'contrast': t1 - t0, 'segment': t2 - t1})

    def _foreground_windows(self, coarse: np.ndarray, coarse_background: np.ndarray, factor: int,
                            shape: tuple[int, int], threshold: float, min_area: int,
                            blind_bgr: np.ndarray, off_chip: np.ndarray):
        """Frame windows (x0, y0, x1, y1, owned mask) around everything that stands out.

        The search runs on a copy ``factor`` times smaller: averaging 2 x 2 pixels keeps
        any region of ``min_area_px`` visible while the full-resolution passes (contrast,
        threshold, labelling) are only paid inside the windows. ``owned`` keeps each
        window to its own region where windows overlap. Blind channels and the area beside
        the chip are left out.
        """
        hw, ww = shape
        ch, cw = coarse.shape[:2]
        ratio = cv2.divide(coarse.astype(np.float32), coarse_background)
        ratio = cv2.subtract(ratio, 1.0)
        weights = np.where(np.asarray(blind_bgr, bool), 0.0, 1.0).reshape(1, 3).astype(np.float32)
        magnitude_sq = cv2.transform(ratio * ratio, weights)
        # A little looser than the full-resolution threshold: the windows must hold every
        # region that threshold keeps.
        coarse_foreground = (magnitude_sq > (0.8 * threshold) ** 2).astype(np.uint8)
        if off_chip.any():
            coarse_foreground[cv2.resize(off_chip.astype(np.uint8), (cw, ch), interpolation=cv2.INTER_AREA) > 0] = 0
        count, labels, stats, _ = cv2.connectedComponentsWithStats(coarse_foreground, connectivity=8)
        min_coarse_area = max(2, min_area // (2 * factor * factor))
        pad = 2  # coarse pixels around a region: its blurred rim and the opening's reach
        kernel = np.ones((3, 3), np.uint8)
        windows = []
        for index in range(1, count):
            x, y, bw, bh, area = stats[index]
            if area < min_coarse_area:
                continue
            cx0, cy0 = max(0, x - pad), max(0, y - pad)
            cx1, cy1 = min(cw, x + bw + pad), min(ch, y + bh + pad)
            crop = labels[cy0:cy1, cx0:cx1]
            owned = cv2.dilate((crop == index).astype(np.uint8), kernel, iterations=pad) > 0
            owned &= (crop == 0) | (crop == index)
            if factor > 1:
                owned = np.repeat(np.repeat(owned, factor, axis=0), factor, axis=1)
            x0, y0 = cx0 * factor, cy0 * factor
            # The last row/column of an odd-sized frame has no coarse pixel: windows at the
            # edge reach it.
            x1 = ww if cx1 == cw else cx1 * factor
            y1 = hw if cy1 == ch else cy1 * factor
            if owned.shape != (y1 - y0, x1 - x0):
                owned = np.pad(owned, ((0, y1 - y0 - owned.shape[0]), (0, x1 - x0 - owned.shape[1])), mode='edge')
            windows.append((x0, y0, x1, y1, owned))
        return windows

    def _window_contrast(self, work: np.ndarray, raw_work: np.ndarray, background: np.ndarray,
                         x0: int, y0: int, x1: int, y1: int,
                         blind_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Contrast (float32, R, G, B) of frame pixels [x0, x1) x [y0, y1), box-smoothed like
        ``contrast_map`` over the whole frame (the rim the box filter needs is read too),
        and which of its channels are saturated (read on the camera's digital numbers
        ``raw_work``; None for float frames). Blind channels read 0 and never saturate."""
        hw, ww = work.shape[:2]
        r = self.smooth // 2 if self.smooth > 1 else 0
        px0, py0, px1, py1 = max(0, x0 - r), max(0, y0 - r), min(ww, x1 + r), min(hw, y1 + r)
        patch = work[py0:py1, px0:px1].astype(np.float32)
        if self.smooth > 1:
            patch = cv2.blur(patch, (self.smooth, self.smooth))
        patch = patch[y0 - py0:y1 - py0, x0 - px0:x1 - px0]
        saturated = _saturated(raw_work[py0:py1, px0:px1], self.smooth)
        if saturated is not None:
            saturated = saturated[y0 - py0:y1 - py0, x0 - px0:x1 - px0]
        contrast = cv2.divide(patch, background[y0:y1, x0:x1])
        np.subtract(contrast, 1.0, out=contrast)
        contrast = cv2.cvtColor(contrast, cv2.COLOR_BGR2RGB)  # BGR -> RGB: several times numpy's strided copy
        if saturated is not None:
            saturated = np.ascontiguousarray(saturated[..., ::-1])
        if blind_rgb.any():
            contrast[..., blind_rgb] = 0.0
            if saturated is not None:
                saturated[..., blind_rgb] = False
        return contrast, saturated

    def _segments(self, window: np.ndarray, component: np.ndarray, censored: np.ndarray | None,
                  classifier: _PixelClassifier, noise: float, min_area: int,
                  scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The regions of a component and their classes: ``region_map`` (region id per pixel,
        -1 outside any), ``region_class`` (class per id, -1 for none) and ``core`` (the
        plateau pixels of each region, without the edge that joined it).

        The component is cut along its edges: plateaus (flat parts, where the contrast of a
        copy smoothed once more changes by less than the noise plus 5 % of its value per
        pixel) seed a watershed flood over the colour, and so does the substrate around the
        component, so that every boundary (flake to substrate, terrace to terrace, flake to
        flake across a crack) falls on the steepest change, as the eye places it, however
        wide the blur and the halo of the optics are. Each part gets the class of its
        plateau's median colour: pixel by pixel, layer counts whose colours differ little
        against the noise (3 and 4 layers of a dark material through a JPEG camera) would
        cut a flake into salt and pepper. Neighbouring parts of one class are one region;
        parts whose colour fits no class stay out (bulk crystals, residue). A sliver too thin
        for any plateau gets one class from its deepest pixels.
        """
        if np.count_nonzero(component) < 4 * min_area:
            return self._one_region(window, component, censored, classifier)
        smooth = cv2.GaussianBlur(window, (0, 0), 1.5)
        magnitude = np.sqrt(np.einsum('ijk,ijk->ij', smooth, smooth))
        slope = np.zeros(component.shape, np.float32)
        for c in range(3):
            channel = np.ascontiguousarray(smooth[..., c])
            slope = np.maximum(slope, np.abs(cv2.Sobel(channel, cv2.CV_32F, 1, 0, ksize=3))
                               + np.abs(cv2.Sobel(channel, cv2.CV_32F, 0, 1, ksize=3)))
        # The smoothed noise's slope stays under the noise of the box-smoothed contrast 99 % of the
        # time; a flake's own shading adds a little in proportion to its contrast.
        flat = component & (slope / 8.0 <= noise + 0.02 * magnitude)
        count, seeds, stats, _ = cv2.connectedComponentsWithStats(flat.astype(np.uint8), connectivity=4)
        smallest = max(8, min_area // 4)
        large = np.nonzero(stats[1:, cv2.CC_STAT_AREA] >= smallest)[0] + 1
        if not len(large):
            return self._one_region(window, component, censored, classifier)
        # Each plateau's class from its median colour.
        index = seeds.ravel()
        order = np.argsort(index, kind='stable')
        bounds = np.searchsorted(index[order], np.concatenate([large, large + 1]))
        values = smooth.reshape(-1, 3)
        flags = None if censored is None else censored.reshape(-1, 3)
        medians, votes = [], []
        for k in range(len(large)):
            members = order[bounds[k]:bounds[k + len(large)]]
            medians.append(np.median(values[members], axis=0))
            if flags is not None:
                votes.append(flags[members].mean(axis=0) > 0.5)
        part_class = np.full(len(large) + 2, -1, dtype=np.int32)
        part_class[2:] = classifier.classify(np.array(medians), None if flags is None else np.array(votes))
        keep = np.zeros(count, np.int32)
        keep[large] = np.arange(2, len(large) + 2)
        if (part_class < 0).all():
            # No plateau of any class (a bulk crystal, debris): one region of no class, no flood.
            return np.where(component, 0, -1).astype(np.int32), np.array([-1], dtype=np.int32), keep[seeds] > 0
        # Seeds: 1 the substrate round the component, 2.. the plateaus.
        markers = np.zeros(component.shape, np.int32)
        markers[~cv2.dilate(component.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)] = 1
        markers = np.where(keep[seeds] > 0, keep[seeds], markers)
        if not (markers == 1).any():
            markers = np.pad(markers, 1, constant_values=1)
            padded = True
        else:
            padded = False
        low, high = float(smooth.min()), float(smooth.max())
        picture = np.clip((smooth - low) * (255.0 / max(high - low, 1e-6)), 0, 255).astype(np.uint8)
        if padded:
            picture = np.pad(picture, ((1, 1), (1, 1), (0, 0)), mode='edge')
        cv2.watershed(np.ascontiguousarray(picture), markers)
        if padded:
            markers = markers[1:-1, 1:-1]
        pairs = _touching_parts(markers)
        # The flood's boundary lines (-1) run on the steepest change: a flake's own edge pixel
        # goes to the flake (the half-contrast trim below decides), a line between two parts
        # to the larger id.
        lines = markers == -1
        if lines.any():
            grown = cv2.dilate(markers.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int32)
            markers = np.where(lines, grown, markers)
        # Neighbouring parts are one region when they share a class and their colours agree
        # (a flake cut by a wrinkle or by noise); touching flakes of distinctly different
        # colour stay apart even when the calibration puts them in one class.
        part_median = np.zeros((len(large) + 2, 3))
        part_median[2:] = medians
        group = np.arange(len(large) + 2)

        def root(k):
            while group[k] != k:
                group[k] = group[group[k]]
                k = group[k]
            return k

        # A part smaller than the smallest flake, or narrower than a rim, is a transition (a strip
        # along a fold or a terrace step that happened to be flat): it joins the neighbour
        # nearest in colour, so that what it parted comes together again.
        sizes = np.bincount(np.maximum(markers, 0).ravel(), minlength=len(large) + 2)
        # Width of each part: twice its deepest pixel's distance to another part or the outside.
        inside = np.zeros(markers.shape, np.uint8)
        centre = markers[1:-1, 1:-1]
        inside[1:-1, 1:-1] = ((centre == markers[:-2, 1:-1]) & (centre == markers[2:, 1:-1])
                              & (centre == markers[1:-1, :-2]) & (centre == markers[1:-1, 2:]))
        depth = cv2.distanceTransform(inside, cv2.DIST_L2, 3)
        deepest = np.zeros(len(large) + 2, np.float32)
        np.maximum.at(deepest, np.maximum(markers, 0).ravel(), depth.ravel())
        width = 2.0 * deepest + 1.0
        minor = (sizes < min_area) | (width <= self.rim_width_px * max(scale, 0.5))
        neighbours: dict[int, list[int]] = {}
        for a, b in pairs:
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
        for part in np.argsort(sizes):
            if part < 2 or not minor[part] or part not in neighbours:
                continue
            major = [n for n in neighbours[part] if not minor[n]]
            if major:
                nearest = min(major, key=lambda n: float(np.linalg.norm(part_median[n] - part_median[part])))
                group[root(part)] = root(nearest)
        for a, b in pairs:
            a, b = root(a), root(b)
            if a == b or part_class[a] != part_class[b]:
                continue
            difference = float(np.linalg.norm(part_median[a] - part_median[b]))
            if difference <= 2.0 * noise + 0.03 + 0.05 * float(np.linalg.norm(part_median[a])):
                group[root(a)] = root(b)
        merged = np.array([root(k) for k in range(len(group))])
        parts = np.where((markers >= 2) & component, merged[np.maximum(markers, 0)], -1)
        core = (keep[seeds] > 0) & (parts >= 0)
        region_map = np.full(component.shape, -1, dtype=np.int32)
        classes = []
        for part in np.unique(parts[parts >= 0]):
            region_count, labels = cv2.connectedComponents((parts == part).astype(np.uint8), connectivity=4)
            for i in range(1, region_count):
                region_map[labels == i] = len(classes)
                classes.append(int(part_class[part]))
        return region_map, np.array(classes, dtype=np.int32), core

    @staticmethod
    def _small_classes(labels: np.ndarray, small: np.ndarray, foreground: np.ndarray, contrast: np.ndarray,
                       saturated: np.ndarray | None, classifier: _PixelClassifier) -> dict[int, tuple[int, bool]]:
        """(class, clips two or more channels) of each small component, from the median of its
        deepest pixels, all components at once."""
        if not len(small):
            return {}
        depth = cv2.distanceTransform(foreground, cv2.DIST_L2, 3)
        deepest = np.zeros(int(labels.max()) + 1, np.float32)
        np.maximum.at(deepest, labels.ravel(), depth.ravel())  # ufunc.at: far faster than a sort
        chosen = np.zeros(len(deepest), dtype=bool)
        chosen[small] = True
        deep = chosen[labels] & (depth >= deepest[labels] - 1.0)
        ids = labels[deep]
        order = np.argsort(ids, kind='stable')
        ids = ids[order]
        values = contrast[deep][order]
        flags = None if saturated is None else saturated[deep][order]
        starts = np.searchsorted(ids, small)
        ends = np.searchsorted(ids, small, side='right')
        medians = np.array([np.median(values[a:b], axis=0) for a, b in zip(starts, ends, strict=True)])
        votes = None
        clipped = np.zeros(len(small), dtype=bool)
        if flags is not None:
            votes = np.array([flags[a:b].mean(axis=0) > 0.5 for a, b in zip(starts, ends, strict=True)])
            clipped = votes.sum(axis=1) >= 2
        classes = classifier.classify(medians, votes)
        return {int(k): (int(c), bool(b)) for k, c, b in zip(small, classes, clipped, strict=True)}

    @staticmethod
    def _one_region(window: np.ndarray, component: np.ndarray, censored: np.ndarray | None,
                    classifier: _PixelClassifier) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A component as one region, of the class of its deepest pixels (least mixed with the
        substrate): a sliver too thin for a plateau, or a speck too small for two terraces."""
        depth = cv2.distanceTransform(component.astype(np.uint8), cv2.DIST_L2, 3)
        deep = component & (depth >= depth.max() - 1.0)
        flags = None if censored is None else (censored[deep].mean(axis=0) > 0.5)[None]
        best = int(classifier.classify(np.median(window[deep], axis=0), flags)[0])
        return np.where(component, 0, -1).astype(np.int32), np.array([best], dtype=np.int32), deep

    def _regions(self, region_map: np.ndarray, region_class: np.ndarray, core: np.ndarray, window: np.ndarray,
                 censored: np.ndarray | None, origin, noise: float, min_area: int,
                 tables: _FrameTables) -> list[Detection]:
        out = []
        present = np.unique(region_map[region_map >= 0])
        present = present[region_class[present] >= 0]  # regions of no class: _unknown_regions
        if not len(present):
            return out
        objects = ndimage.find_objects(np.where(region_map >= 0, region_map + 1, 0))
        for material_index, calibration in enumerate(self.calibrations):
            mine = present[self._owner[region_class[present]] == material_index]
            if not len(mine):
                continue
            in_material = self._without_lines(np.isin(region_map, mine))
            for region_id in mine:
                box = objects[region_id]
                if box is None:
                    continue
                sub = (region_map[box] == region_id) & in_material[box]
                area = int(sub.sum())
                if area < min_area:
                    continue
                ry, rx = box[0].start, box[1].start
                crop = window[box]
                inner = sub & core[box]
                mask = _half_contrast_edge(sub, crop, crop[inner] if inner.sum() >= 8 else None)
                # The trimmed edge may part flakes that touched through their blurred rims.
                pieces, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
                for i in range(1, pieces):
                    px, py, pw, ph, piece_area = stats[i]
                    if piece_area < min_area:
                        continue
                    piece = (slice(py, py + ph), slice(px, px + pw))
                    found = self._region_detection(calibration, material_index, labels[piece] == i, inner[piece],
                                                   crop[piece], None if censored is None else censored[box][piece],
                                                   (origin[0] + rx + px, origin[1] + ry + py), noise, min_area,
                                                   tables)
                    if found is not None:
                        out.append(found)
        return out

    def _region_detection(self, calibration: LayerClasses, material_index: int, mask: np.ndarray,
                          inner: np.ndarray, crop: np.ndarray, censored: np.ndarray | None, origin, noise: float,
                          min_area: int, tables: _FrameTables) -> Detection | None:
        """The detection of one region of a material's class (``mask`` over ``crop`` at
        ``origin``), or None when its shape or colour says it is no flake of it."""
        area = int(mask.sum())
        deep, depth = _deep_pixels(mask)
        if area > self.max_elongation * (2.0 * depth) ** 2:
            return None  # a thin line (tape residue) or the ring round a bright crystal
        # The plateau's own pixels, deep inside: the edge blends in the neighbour.
        measured = deep & inner if (deep & inner).sum() >= 5 else deep
        values = crop[measured]
        flags = None
        if censored is not None:
            flags = censored[measured].mean(axis=0) > 0.5
            if flags.sum() >= 2:
                return None  # one channel left: any material reaches its value somewhere
        median = np.median(values, axis=0)
        estimate = estimate_from_contrast(calibration, median, area, noise, flags, tables.blind_rgb)
        if estimate.mahalanobis > self.gate_sigma:
            return None  # the region as a whole fits no class of this calibration
        material_probability, thicker = self._weigh_alternatives(median, flags, material_index, tables)
        if thicker:
            return None  # a thicker flake (of any material) explains the colour best
        quality = region_quality(mask, crop)
        fit = math.exp(-0.5 * max(0.0, estimate.mahalanobis - 1.0) ** 2 / 4.0)
        size = 1.0 - math.exp(-area / (4.0 * min_area))
        rh, rw = mask.shape
        return Detection(
            bbox=(origin[0], origin[1], rw, rh), mask=mask,
            material=calibration.material, layers=estimate.layers, layers_std=estimate.layers_std,
            thickness_nm=estimate.thickness_nm, thickness_nm_std=estimate.thickness_nm_std,
            score=self.score_map(float(np.clip(fit * size * material_probability, 0.0, 1.0))),
            detector=self.name, model_version=calibration.version,
            contrast=estimate.contrast, homogeneity=quality['homogeneity'],
            edge_straightness=quality['edge_straightness'],
            extra={'mahalanobis': estimate.mahalanobis, 'probability': estimate.probability,
                   'raw_score': float(np.clip(fit * size * material_probability, 0.0, 1.0)),
                   'material_probability': material_probability,
                   'saturated_channels': int(0 if flags is None else flags.sum())})

    def _clipped_regions(self, component: np.ndarray, window: np.ndarray, censored: np.ndarray, origin,
                         noise: float, threshold: float, min_area: int, tables: _FrameTables) -> list[Detection]:
        """Regions that clip two or three channels: measured by the direction of their colour.

        The optics blur an edge linearly, so across the rim of a flake the contrast is
        a * C with a running from 0 (substrate) to 1 (flake): the rim pixels that clip no
        channel lie on a line from the origin towards the flake's contrast C. Their
        direction, with the channel the core may still measure and the lower bounds of
        the clipped ones, names material and thickness where the clipped core alone
        would fit any bright flake. MoS2 from 8 layers clips blue and green on 90 nm
        oxide at 10 ms, and from 13 layers all three. Direction and low bounds leave
        13-40 layer MoS2, 25-40 nm hBN, 35-50 nm graphite and 25-40 layer WTe2 within a
        few degrees of each other, so a region is reported only when its material is
        nearly certain (``min_clipped_probability``).
        """
        bright = (component & (censored.sum(axis=2) >= 2)).astype(np.uint8)
        if int(bright.sum()) < min_area:
            return []
        clean = component & ~censored.any(axis=2)
        # Only the rim facing the substrate blends the flake with the substrate; where a
        # thinner terrace of the same flake lies alongside, the blend is with the terrace.
        to_substrate = _inner_distance(component)
        clean &= to_substrate <= self.edge_px + 2
        magnitude = np.sqrt(np.einsum('ijk,ijk->ij', window, window))
        reach = np.ones((3, 3), np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
        out = []
        for i in range(1, count):
            if stats[i, cv2.CC_STAT_AREA] < min_area:
                continue
            core = labels == i
            # Rim: unclipped pixels just outside the core, bright enough to carry a direction.
            near = cv2.dilate(core.astype(np.uint8), reach, iterations=self.edge_px + 2) > 0
            rim = near & clean & (magnitude > max(threshold, 6.0 * noise))
            direction, direction_var = _rim_direction(window[rim])
            if direction is None:
                continue
            deep, depth = _deep_pixels(core)
            if core.sum() > self.max_elongation * (2.0 * depth) ** 2:
                continue  # the ring of clipped pixels round a thicker crystal
            flags = censored[deep].mean(axis=0) > 0.5
            reading = np.median(window[deep], axis=0)
            d2 = censored_mahalanobis_sq(reading, self._clip_means, tables.clip_precisions, flags)[0]
            norms = np.linalg.norm(self._clip_means, axis=1)
            angle_sq = np.sum((self._clip_means / np.maximum(norms, 1e-6)[:, None] - direction) ** 2, axis=1)
            d2 = d2 + angle_sq / ((MODEL_SIGMA / np.maximum(norms, 1e-6)) ** 2 + direction_var)
            likelihood = np.exp(-0.5 * (d2 - d2.min()))
            family_likelihood = np.bincount(self._clip_family, likelihood * self._clip_prior)
            owner = int(np.argmax(family_likelihood))
            mine = self._clip_family == owner
            best = int(np.nonzero(mine)[0][np.argmin(d2[mine])])
            if owner >= len(self.calibrations) or math.sqrt(float(d2[best])) > self.gate_sigma:
                continue  # a thicker flake or a bulk crystal explains it best, or nothing does
            material_probability = float(family_likelihood[owner] / family_likelihood.sum())
            if material_probability < self.min_clipped_probability:
                continue  # thick flakes of other materials share the colour's direction
            layers, weights = self._clip_layers[mine], likelihood[mine] / likelihood[mine].sum()
            mean = float(weights @ layers)
            std = float(math.sqrt(max(0.0, weights @ (layers - mean) ** 2)))
            calibration = self.calibrations[owner]
            best_layers = float(self._clip_layers[best])
            probability = float(weights.max())
            ys, xs = np.nonzero(core)
            ry, rx = int(ys.min()), int(xs.min())
            mask = core[ry:int(ys.max()) + 1, rx:int(xs.max()) + 1]
            rh, rw = mask.shape
            region_window = window[ry:ry + rh, rx:rx + rw]
            quality = region_quality(mask, region_window)
            area = int(mask.sum())
            size = 1.0 - math.exp(-area / (4.0 * min_area))
            out.append(Detection(
                bbox=(origin[0] + rx, origin[1] + ry, rw, rh), mask=mask,
                material=calibration.material, layers=best_layers, layers_std=std,
                thickness_nm=best_layers * calibration.layer_nm, thickness_nm_std=std * calibration.layer_nm,
                score=self.score_map(float(np.clip(probability * size * material_probability, 0.0, 1.0))),
                detector=self.name, model_version=calibration.version,
                contrast=tuple(float(v) for v in reading), homogeneity=quality['homogeneity'],
                edge_straightness=quality['edge_straightness'],
                extra={'mahalanobis': math.sqrt(float(d2[best])), 'probability': probability,
                       'material_probability': material_probability,
                       'saturated_channels': int(flags.sum()), 'rim_pixels': int(rim.sum())}))
        return out

    def _unknown_regions(self, region_map: np.ndarray, region_class: np.ndarray, core: np.ndarray,
                         component: np.ndarray, window: np.ndarray, censored: np.ndarray | None,
                         magnitude: np.ndarray, beside: np.ndarray, origin, noise: float, min_area: int,
                         scale: float, tables: _FrameTables) -> list[Detection]:
        """Regions of a component whose colour no class of any listed material (thicker ones
        included) explains within the gate: material ``unknown``, with their contrast, when
        they look like a flake of some material: flat inside, not a line, not the rim of a
        crystal, not beside the chip, and in a component at least four times the smallest
        flake (a speck of unknown colour cannot be told from dust)."""
        out = []
        if np.count_nonzero(component) < 4 * min_area or not (region_class < 0).any():
            return out
        rim_width = self.rim_width_px * scale
        # Each region's box once, not a comparison over the whole component per region.
        objects = ndimage.find_objects(region_map + 1)
        for region_id in np.nonzero(region_class < 0)[0]:
            box = objects[region_id] if region_id < len(objects) else None
            if box is None:
                continue
            where = region_map[box] == region_id
            if np.count_nonzero(where) < min_area:
                continue
            ry, rx = box[0].start, box[1].start
            inner = where & core[box]
            crop = window[box]
            mask = _half_contrast_edge(where & ~beside[box], crop, crop[inner] if inner.sum() >= 8 else None)
            area = int(mask.sum())
            if area < min_area:
                continue
            deep, depth = _deep_pixels(mask)
            if 2.0 * depth <= rim_width or area > self.max_elongation * (2.0 * depth) ** 2:
                continue  # too thin to have an inside, or a line: a scratch, residue, a crystal's ring
            measured = deep & inner if (deep & inner).sum() >= 5 else deep
            flags = np.zeros(3, dtype=bool)
            if censored is not None:
                flags = censored[box][measured].mean(axis=0) > 0.5
            median = np.median(crop[measured], axis=0)
            d2 = censored_mahalanobis_sq(median, self._all_means, tables.all_precisions, flags)[0]
            nearest = int(np.argmin(d2))
            if math.sqrt(float(d2[nearest])) <= self.gate_sigma:
                continue  # a known class explains it (thicker than reported, or dropped for its shape)
            if inner.sum() < max(8, min_area // 4) and _flat_share(mask, crop, median, noise) < 0.5:
                continue  # no plateau: a speck, a smear, a gradient - not a flake of any colour
            if _is_rim(mask, (rx, ry), component, magnitude, beside, window, noise, rim_width):
                continue
            # Homogeneity from the pixels already measured (candidates are many on a real chip).
            values = crop[measured]
            strength = float(np.linalg.norm(median))
            homogeneity = float(np.clip(1.0 - float(np.linalg.norm(values.std(axis=0))) / max(strength, 1e-6), 0, 1))
            size = 1.0 - math.exp(-area / (4.0 * min_area))
            owner = int(self._all_owner[nearest])
            rh, rw = mask.shape
            out.append(Detection(
                bbox=(origin[0] + rx, origin[1] + ry, rw, rh), mask=mask, material=materials.UNKNOWN,
                score=float(0.5 * size), detector=self.name, model_version=self.model_version,
                contrast=tuple(float(v) for v in median), homogeneity=homogeneity,
                extra={'mahalanobis': math.sqrt(float(d2[nearest])),
                       'nearest_material': self.calibrations[owner].material if owner >= 0 else 'thicker',
                       'saturated_channels': int(flags.sum()),
                       'blind_channels': int(tables.blind_rgb.sum())}))
        return out

    def _without_lines(self, in_material: np.ndarray) -> np.ndarray:
        """Drop the connected parts of one material's pixels that are lines: the network
        of tape residue falls into pieces of several thickness classes, each too short
        to look like a line on its own, but together they are one."""
        count, labels, stats, _ = cv2.connectedComponentsWithStats(in_material.astype(np.uint8), connectivity=8)
        if count <= 1:
            return in_material
        depth = _inner_distance(in_material)
        deepest = ndimage.maximum(depth, labels, index=np.arange(1, count))
        lines = np.nonzero(stats[1:, cv2.CC_STAT_AREA] > self.max_elongation * (2.0 * deepest) ** 2)[0] + 1
        if not len(lines):
            return in_material
        return in_material & ~np.isin(labels, lines)

    def _weigh_alternatives(self, contrast: np.ndarray, censored: np.ndarray | None, material_index: int,
                            tables: _FrameTables) -> tuple[float, bool]:
        """The posterior of the region's material over every class of every material, thicker
        ones included (equal prior per class), and whether a class thicker than those
        reported is the most probable. Where two materials' colours meet (3-layer
        graphene and a WTe2 monolayer differ by 0.04 in blue), the score says so."""
        # The pixel noise of a region's median (noise^2 / pixels) is far below the class
        # spread, so the class tables' own precisions serve every region.
        flags = np.zeros(3, dtype=bool) if censored is None else np.asarray(censored, dtype=bool)
        d2 = censored_mahalanobis_sq(contrast, self._all_means, tables.all_precisions, flags)[0]
        loglik = -0.5 * (d2 + tables.all_logdet)
        posterior = np.exp(loglik - loglik.max())
        material_probability = float(posterior[self._all_owner == material_index].sum() / posterior.sum())
        return material_probability, bool(self._all_owner[int(np.argmax(loglik))] < 0)


@functools.lru_cache(maxsize=1)
def _shipped_score_map():
    from flake_detector.score_calibration import SHIPPED, ScoreMap

    return ScoreMap.load(SHIPPED) if SHIPPED.is_file() else ScoreMap.identity()


def _rim_direction(values: np.ndarray, min_pixels: int = 12) -> tuple[np.ndarray | None, float]:
    """Unit direction of rim contrasts (N, 3) that lie along a line through the origin, and
    the variance of that direction per perpendicular axis; (None, inf) when too few
    pixels. Pixels far off the line (a neighbouring flake blended in) are left out."""
    if len(values) < min_pixels:
        return None, math.inf
    x = np.asarray(values, dtype=np.float64)
    keep = np.ones(len(x), dtype=bool)
    for _ in range(2):
        _, vectors = np.linalg.eigh(x[keep].T @ x[keep])
        direction = vectors[:, -1]
        direction = direction if direction @ x[keep].sum(axis=0) >= 0 else -direction
        along = x @ direction
        perpendicular = np.linalg.norm(x - along[:, None] * direction, axis=1)
        spread = 1.4826 * float(np.median(perpendicular[keep])) + 1e-6
        keep = (perpendicular <= 3.0 * spread) & (along > 0)
        if keep.sum() < min_pixels:
            return None, math.inf
    # Least squares through the origin: each perpendicular axis carries half the residual.
    residual_var = float(np.mean(perpendicular[keep] ** 2)) / 2.0
    return direction, residual_var / float(np.sum(along[keep] ** 2)) + DIRECTION_FLOOR ** 2


def _touching_parts(markers: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of watershed parts (ids >= 2) that meet across a boundary pixel (-1)."""
    line = markers[1:-1, 1:-1] == -1
    pairs: set[tuple[int, int]] = set()
    if not line.any():
        return pairs
    m = markers
    for first, second in ((m[1:-1, :-2], m[1:-1, 2:]), (m[:-2, 1:-1], m[2:, 1:-1]),
                          (m[:-2, :-2], m[2:, 2:]), (m[:-2, 2:], m[2:, :-2])):
        a, b = first[line], second[line]
        ok = (a >= 2) & (b >= 2) & (a != b)
        pairs.update(zip(np.minimum(a[ok], b[ok]).tolist(), np.maximum(a[ok], b[ok]).tolist(), strict=True))
    return pairs


def _is_rim(mask: np.ndarray, offset: tuple[int, int], component: np.ndarray, magnitude: np.ndarray,
            beside: np.ndarray, window: np.ndarray, noise: float, rim_width: float) -> bool:
    """Whether a region (``mask`` at ``offset`` (x, y) in the component's window) is the rim of
    a stronger neighbour rather than a flake.

    The optics blur the edge of a thick crystal (or of the chip) over a few pixels, and on
    its way from the crystal's colour to the substrate's the rim passes through the colours
    of thin flakes; real images add a dark fringe round bright crystals. Such a rim runs
    along the neighbour (a third of its outline or more touches pixels at least 1.5 times
    its contrast, or the area beside the chip) and is either narrow (at most ``rim_width``
    px across) or all slope: under a third of its inner pixels lie on a plateau, where a
    flake of its own, whatever its size, has a flat inside.
    """
    pad = 3
    h, w = mask.shape
    ox, oy = offset
    x0, y0 = max(0, ox - pad), max(0, oy - pad)
    x1, y1 = min(component.shape[1], ox + w + pad), min(component.shape[0], oy + h + pad)
    region = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    region[oy - y0:oy - y0 + h, ox - x0:ox - x0 + w] = mask
    crop = window[y0:y1, x0:x1]
    values = crop[region]
    if not len(values):
        return False
    median = np.median(values, axis=0)
    strength = float(np.linalg.norm(median))
    stronger = (component[y0:y1, x0:x1] & ~region & (magnitude[y0:y1, x0:x1] > 1.5 * strength)) | beside[y0:y1, x0:x1]
    if not stronger.any():
        return False
    region_u8 = region.astype(np.uint8)
    boundary = region & (cv2.erode(region_u8, np.ones((3, 3), np.uint8)) == 0)
    near = cv2.dilate(stronger.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2) > 0
    if (boundary & near).sum() < 0.3 * max(1, boundary.sum()):
        return False
    depth = _inner_distance(region_u8)
    if 2.0 * float(depth.max()) <= rim_width:
        return True
    return _flat_share(region, crop, median, noise, depth) < 0.3


def _flat_share(region: np.ndarray, window: np.ndarray, median: np.ndarray, noise: float,
                depth: np.ndarray | None = None) -> float:
    """Share of a region's inner pixels (1.5 px or more inside) that lie on a plateau: where the
    contrast along the region's own colour changes by less than 3 noise sigmas plus 5 % of
    its value per pixel. A flake is flat inside; a rim, a blurred speck or a gradient is not."""
    strength = float(np.linalg.norm(median))
    if depth is None:
        depth = _inner_distance(region)
    inner = region & (depth >= 1.5)
    if strength < 1e-6 or not inner.any():
        return 0.0
    profile = np.ascontiguousarray(window @ (median / strength), dtype=np.float32)
    slope = np.hypot(cv2.Sobel(profile, cv2.CV_32F, 1, 0, ksize=3),
                     cv2.Sobel(profile, cv2.CV_32F, 0, 1, ksize=3)) / 8.0
    return float((slope[inner] <= 3.0 * noise + 0.05 * strength).mean())


def _inner_distance(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``mask`` to its outside, the frame of the array counting as
    outside (a one-pixel border, added by OpenCV: far cheaper than numpy's pad)."""
    padded = cv2.copyMakeBorder(np.ascontiguousarray(mask, dtype=np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]


def _deep_pixels(mask: np.ndarray, depth_px: float = 2.0) -> tuple[np.ndarray, float]:
    """The pixels at least ``depth_px`` inside a region (the deepest ones of a region too
    thin for that): the rim is a blend of the flake and what surrounds it. Also the
    region's largest depth (half the width of its widest part)."""
    depth = _inner_distance(mask)
    deepest = float(depth.max())
    deep = mask & (depth > depth_px)
    if deep.sum() < 5:
        deep = mask & (depth >= deepest - 0.5)
    return deep, deepest


def _half_contrast_edge(mask: np.ndarray, window: np.ndarray, reference: np.ndarray | None = None,
                        fraction: float | None = None) -> np.ndarray:
    """Trim a region to where its contrast reaches ``fraction`` (``EDGE_FRACTION``) of the
    region's own (the median of ``reference`` values when given, e.g. its flat core): the
    edge of a blurred step sits at half height, while a noise threshold lets the blur tail
    in. (People tend to outline a flake inside the blur, where it shows its own colour; at
    150x, with a blur of 8-10 px, that is a few pixels inside the half-height edge.)"""
    fraction = EDGE_FRACTION if fraction is None else fraction
    values = window[mask] if reference is None else reference
    if len(values) < 8:
        return mask
    mean = np.median(values, axis=0)
    norm = float(mean @ mean)
    if norm < 1e-8:
        return mask
    trimmed = mask & ((window @ mean) / norm >= fraction)
    return trimmed if trimmed.sum() >= 0.25 * mask.sum() else mask


def _rescale(detection: Detection, factor: float, shape: tuple[int, int]) -> Detection:
    """The detection of a downscaled frame, in the pixels of the full frame."""
    x, y, w, h = detection.bbox
    x0, y0 = int(math.floor(x * factor)), int(math.floor(y * factor))
    x1 = min(shape[1], int(math.ceil((x + w) * factor)))
    y1 = min(shape[0], int(math.ceil((y + h) * factor)))
    mask = cv2.resize(detection.mask.astype(np.uint8), (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
    detection.bbox = (x0, y0, x1 - x0, y1 - y0)
    detection.mask = mask.astype(bool)
    return detection


register_detector('contrast')(OpticalDetector)

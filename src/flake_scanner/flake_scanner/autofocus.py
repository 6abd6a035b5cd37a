"""Autofocus: focus measures, a frame-budgeted search in z, and the focal-plane map.

The search is written ask-and-tell (``FocusSearch.next_z`` / ``report``) so the same
code drives a camera synchronously (``run_focus_search``) or from an asynchronous ROS
action that moves the stage and waits for frames between the steps.

Search strategy: a coarse grid over the range finds the peak's neighbourhood, then
successive parabolic interpolation on the logarithm of the measure (a Gaussian-like
peak is a parabola there) refines it, falling back to bisection of the wider side of
the bracket whenever the parabola is unusable. The best measured z is the answer.

``FocusMap`` is the focal plane of Greplova et al. (2020): three (x, y, z) points define the
plane z = a x + b y + c exactly; more points are fitted by least squares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
import math

import cv2
import numpy as np

# --- focus measures -------------------------------------------------------------------------


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        else:
            image = cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_BGR2GRAY)
    if image.ndim != 2 or image.shape[0] < 3 or image.shape[1] < 3:
        raise ValueError(f'focus measures need an image of at least 3x3 pixels, got shape {image.shape}')
    scale = 1.0 / 255.0 if image.dtype == np.uint8 else (1.0 / 65535.0 if image.dtype == np.uint16 else 1.0)
    return image.astype(np.float32) * np.float32(scale)


def variance_of_laplacian(image: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image (Pech-Pacheco et al.)."""
    return float(cv2.Laplacian(_grey(image), cv2.CV_32F, ksize=3).var())


def tenengrad(image: np.ndarray) -> float:
    """Mean squared Sobel gradient magnitude (Tenenbaum)."""
    grey = _grey(image)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.mean(gx * gx + gy * gy))


def brenner(image: np.ndarray) -> float:
    """Mean squared difference of pixels two columns apart (Brenner)."""
    grey = _grey(image)
    diff = grey[:, 2:] - grey[:, :-2]
    return float(np.mean(diff * diff))


FOCUS_MEASURES: dict[str, Callable[[np.ndarray], float]] = {
    'laplacian': variance_of_laplacian,
    'tenengrad': tenengrad,
    'brenner': brenner,
}


def focus_measure(image: np.ndarray, name: str = 'laplacian') -> float:
    """Focus measure ``name`` of an image (larger is sharper)."""
    try:
        measure = FOCUS_MEASURES[name]
    except KeyError:
        raise ValueError(f'unknown focus measure {name!r}; choose one of {sorted(FOCUS_MEASURES)}') from None
    return measure(image)


def depth_of_field(numerical_aperture: float, wavelength: float = 550e-9, refractive_index: float = 1.0,
                   pixel_size_at_sample: float = 0.0) -> float:
    """Depth of field [m]: diffraction term n*lambda/NA^2 plus the detector term n*e/NA
    (e = pixel size referred to the sample)."""
    if not 0 < numerical_aperture < refractive_index:
        raise ValueError(f'numerical aperture must lie in (0, n), got {numerical_aperture}')
    return (refractive_index * wavelength / numerical_aperture ** 2
            + refractive_index * pixel_size_at_sample / numerical_aperture)


# --- search ---------------------------------------------------------------------------------


@dataclass
class FocusResult:
    z: float
    score: float
    frames_used: int
    samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def peak_ratio(self) -> float:
        """Best score over the lowest: near 1 when the field holds nothing to focus on
        (bare substrate, a saturated crystal), and the "best" z is then only noise."""
        lowest = min(score for _, score in self.samples)
        return math.inf if lowest <= 0 else self.score / lowest


class FocusSearch:
    """Frame-budgeted search for the z of the sharpest image.

    ``next_z()`` gives the next z to image (None when done); ``report(z, score)``
    feeds back the measure of the frame taken there. ``next_batch()`` gives every z
    that can be imaged before any of their scores is known (the rest of the coarse
    sweep, then one refinement step at a time), so a caller can move to the next z
    while the previous frame is still being read out and measured.
    """

    def __init__(self, z_center: float, search_range: float, max_frames: int = 15,
                 coarse_frames: int | None = None, tolerance: float = 0.0,
                 z_limits: tuple[float, float] | None = None):
        if not math.isfinite(z_center):
            raise ValueError(f'z_center must be finite, got {z_center}')
        if not search_range > 0:
            raise ValueError(f'search_range must be positive, got {search_range}')
        if max_frames < 3:
            raise ValueError(f'max_frames must be at least 3, got {max_frames}')
        if coarse_frames is None:
            coarse_frames = max(3, min(7, (max_frames + 1) // 2))
        if not 3 <= coarse_frames <= max_frames:
            raise ValueError(f'coarse_frames must lie in [3, max_frames], got {coarse_frames}')
        low, high = z_center - search_range / 2, z_center + search_range / 2
        if z_limits is not None:
            low, high = max(low, z_limits[0]), min(high, z_limits[1])
            if not low < high:
                raise ValueError(f'search range around {z_center} lies outside the z limits {z_limits}')
        self.max_frames = max_frames
        self.tolerance = tolerance
        self._coarse = list(np.linspace(low, high, coarse_frames))
        # Refinement steps closer than this to an existing sample teach nothing new.
        self._min_spacing = max(tolerance / 4, (high - low) * 1e-4)
        self.samples: list[tuple[float, float]] = []
        self._pending: list[float] = []
        self._done = False

    @property
    def frames_used(self) -> int:
        return len(self.samples)

    @property
    def done(self) -> bool:
        return self._done

    def best(self) -> tuple[float, float]:
        if not self.samples:
            raise RuntimeError('no frame measured yet')
        return max(self.samples, key=lambda s: s[1])

    def result(self) -> FocusResult:
        z, score = self.best()
        return FocusResult(z, score, self.frames_used, list(self.samples))

    def report(self, z: float, score: float) -> None:
        match = next((k for k, pending in enumerate(self._pending)
                      if math.isclose(z, pending, rel_tol=0, abs_tol=1e-12)), None)
        if match is None:
            raise RuntimeError(f'report for z={z} does not answer a requested z ({self._pending})')
        if not math.isfinite(score):
            raise ValueError(f'focus score must be finite, got {score}')
        self.samples.append((float(z), float(score)))
        del self._pending[match]

    def next_z(self) -> float | None:
        batch = self.next_batch()
        return batch[0] if batch else None

    def next_batch(self) -> list[float]:
        if self._pending:
            return list(self._pending)
        if self._done or self.frames_used >= self.max_frames:
            self._done = True
            return []
        if self.frames_used < len(self._coarse):
            self._pending = [float(z) for z in self._coarse[self.frames_used:]]
            return list(self._pending)
        z = self._refine()
        if z is None:
            self._done = True
            return []
        self._pending = [z]
        return [z]

    def _refine(self) -> float | None:
        ordered = sorted(self.samples)
        zs = [s[0] for s in ordered]
        k = max(range(len(ordered)), key=lambda i: ordered[i][1])
        if k == 0 or k == len(ordered) - 1:
            # Peak at the edge of the range: look just inside it, the focus may lie at the edge.
            neighbour = zs[1] if k == 0 else zs[-2]
            candidate = (zs[k] + neighbour) / 2
            return candidate if abs(candidate - zs[k]) >= self._min_spacing else None
        (z_l, s_l), (z_m, s_m), (z_r, s_r) = ordered[k - 1], ordered[k], ordered[k + 1]
        if z_r - z_l <= self.tolerance:
            return None
        candidate = _parabola_vertex(z_l, z_m, z_r, *(_log(s) for s in (s_l, s_m, s_r)))
        usable = (candidate is not None and z_l < candidate < z_r
                  and min(abs(candidate - z) for z in zs) >= self._min_spacing)
        if not usable:
            # Bisect the wider side of the bracket.
            candidate = (z_l + z_m) / 2 if z_m - z_l > z_r - z_m else (z_m + z_r) / 2
            if min(abs(candidate - z) for z in zs) < self._min_spacing:
                return None
        return candidate


def _log(score: float) -> float:
    return math.log(max(score, 1e-300))


def _parabola_vertex(x0: float, x1: float, x2: float, y0: float, y1: float, y2: float) -> float | None:
    """Abscissa of the vertex of the parabola through three points, None if not a maximum."""
    denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    numerator = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    curvature = (y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)
    if denominator == 0 or curvature >= 0:
        return None
    return x1 - 0.5 * numerator / denominator


def run_focus_search(search: FocusSearch, score_at: Callable[[float], float],
                     progress: Callable[[float, float, FocusSearch], None] | None = None) -> FocusResult:
    """Drive ``search`` with a synchronous ``score_at(z)`` (move, capture, measure)."""
    while (z := search.next_z()) is not None:
        score = score_at(z)
        search.report(z, score)
        if progress is not None:
            progress(z, score, search)
    return search.result()


# --- focal plane ----------------------------------------------------------------------------


class FocusMapError(ValueError):
    """Points that do not define a focal plane (too few, or all on one line)."""


class FocusMap:
    """Focal plane z = a x + b y + c through (x, y, z) focus points [m], stage frame."""

    def __init__(self, points: Iterable[tuple[float, float, float]]):
        array = np.asarray(list(points), dtype=float)
        if array.ndim != 2 or array.shape[1] != 3:
            raise FocusMapError(f'focus points must be (x, y, z) triples, got shape {array.shape}')
        if len(array) < 3:
            raise FocusMapError(f'a focal plane needs at least three points, got {len(array)}')
        if not np.all(np.isfinite(array)):
            raise FocusMapError('focus points must be finite')
        xy = array[:, :2]
        centred = xy - xy.mean(axis=0)
        singular = np.linalg.svd(centred, compute_uv=False)
        extent = max(float(np.ptp(xy[:, 0])), float(np.ptp(xy[:, 1])), 1e-12)
        # The smaller spread must be a real fraction of the larger one, or the tilt across
        # the line is undetermined.
        if singular[1] < 1e-3 * extent * math.sqrt(len(array)):
            raise FocusMapError('focus points lie (nearly) on one line: the plane tilt is undetermined')
        design = np.column_stack([xy, np.ones(len(array))])
        coefficients, *_ = np.linalg.lstsq(design, array[:, 2], rcond=None)
        self.a, self.b, self.c = (float(v) for v in coefficients)
        self.points = array
        self.residuals = array[:, 2] - design @ coefficients

    @property
    def rms_residual(self) -> float:
        return float(np.sqrt(np.mean(self.residuals ** 2)))

    @property
    def tilt(self) -> float:
        """Angle between the focal plane and the stage xy plane [rad]."""
        return math.atan(math.hypot(self.a, self.b))

    def predict(self, x, y):
        """Focus z [m] at stage (x, y); accepts scalars or arrays."""
        result = self.a * np.asarray(x, dtype=float) + self.b * np.asarray(y, dtype=float) + self.c
        return float(result) if np.ndim(result) == 0 else result

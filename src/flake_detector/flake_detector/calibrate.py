"""``flake-calibrate``: a microscope's calibration from a folder of its own images.

    flake-calibrate IMAGES_OR_FOLDERS --material nbse2 --out my_microscope.json
    flake-calibrate FOLDER --material graphene --labels labelled.json --out cal.json   # refine with labels
    flake-calibrate FOLDER --material graphene --flake 'img3.png:412,230:2' --out cal.json

No labels are needed. Per image, the substrate's colour and vignetting are estimated
(``flake_detector.substrate``) and every region that stands out of it with a flat inside
(a plateau: a flake, a terrace, a crystal, debris) is measured: its median digital
numbers, the substrate's under it, which channels clip. Flakes of the chosen material(s)
lie on a ladder in physical contrast, ``R(n layers) / R_substrate - 1`` from the thin-film
model, whose shape depends on the oxide thickness and the camera's bands; the camera's
black level and gamma decide how digital numbers map onto it (``CameraResponse.decode``).
The fit searches oxide x gamma (x black level) on a grid and refines the best points,
scoring each candidate setting by how close the measured regions come to the ladder with
a robust (Cauchy) loss, so debris and foreign crystals, which lie anywhere, weigh little.
White balance and exposure then follow per image from the substrate's digital numbers and
its model reflectance.

Flakes of known layer count (Raman, AFM; ``--labels`` a COCO file whose annotations carry
``attributes.layers`` or a category named like ``3L``, ``>5L``; ``--flake IMAGE:X,Y:LAYERS``)
pin the ladder: their distance to their own rung weighs ten times an unlabelled region's,
and layer counts with two or more labelled flakes become measured classes of the file.

The result is one calibration file (``flake_core.calibration``) that every backend and the
simulator read, a report of how well it fits (printed), and a scatter of the measured
contrasts over the fitted ladder (``--plot``). ``calibrate`` is the function behind the
command (the web app's calibration page calls it).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field, replace
import json
import math
from pathlib import Path
import sys
import time

import cv2
import numpy as np

from flake_core import materials as vocabulary
from flake_core import optics
from flake_core.calibration import Calibration, MeasuredClass, _model_table
from flake_core.camera_response import CameraResponse
from flake_detector.evaluation import layer_range_of_name
from flake_detector.substrate import as_bgr, estimate_substrate

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
# Search ranges: oxides labs use (thermal SiO2 on Si) and camera encodings.
OXIDE_RANGE_NM = (50.0, 350.0)
GAMMA_RANGE = (1.0, 2.8)
# Spread of a region around its rung [physical contrast]: model error plus a share of the
# contrast (camera curves are not exact power laws).
FIT_SIGMA = 0.02
FIT_RELATIVE_SIGMA = 0.08
# Weight of a labelled flake against an unlabelled region.
LABEL_WEIGHT = 10.0
# Cauchy scale of the robust loss [squared sigmas].
ROBUST_SCALE = 4.0


@dataclass
class LabelledFlake:
    """A flake whose layer count someone knows: by its mask (frame-sized bool) or by a point
    (x, y) [px] inside it, in the image called ``image``."""

    image: str
    material: str
    layers: tuple[float, float]  # inclusive range; (n, n) for an exact count, (6, inf) for '>5L'
    mask: np.ndarray | None = None
    point: tuple[float, float] | None = None


@dataclass
class RegionSample:
    """One measured region: its median digital numbers and the substrate's under it (B, G, R)."""

    image: int
    digital: np.ndarray  # (3,) B, G, R
    substrate: np.ndarray  # (3,) B, G, R
    area_px: int
    saturated: np.ndarray  # (3,) bool: the region reads full scale there
    blind: np.ndarray  # (3,) bool: the substrate reads full scale there
    label: LabelledFlake | None = None


@dataclass
class ImageSample:
    name: str
    substrate: np.ndarray  # (3,) median substrate B, G, R [DN]
    blind: np.ndarray  # (3,) bool
    shape: tuple[int, int]
    regions: int = 0


@dataclass
class CalibrationResult:
    """What ``calibrate`` returns: the calibration, the samples it was fitted on, a report."""

    calibration: Calibration
    images: list[ImageSample]
    samples: list[RegionSample]
    report: dict = field(default_factory=dict)

    def summary(self) -> str:
        r = self.report
        lines = [f'oxide {r["oxide_nm"]:.1f} nm, gamma {r["gamma"]:.2f}, black level {r["black_level_dn"]:.1f} DN, '
                 f'colour bands {r["band_width_nm"]:.1f} nm wide (1 sigma)',
                 f'{r["regions"]} regions in {r["images"]} images, {r["labelled"]} labelled; '
                 f'{100 * r["inlier_share"]:.0f} % lie on the ladder (within 3 sigma), '
                 f'spread round the ladder {r["model_sigma"]:.3f} + {100 * r["relative_sigma"]:.0f} % of the contrast']
        if r.get('labelled'):
            lines.append(f'labelled flakes: {r["labelled_on_rung"]} of {r["labelled"]} on their own rung '
                         f'(nearest rung within their layer range)')
        if r.get('runner_up'):
            ru = r['runner_up']
            lines.append(f'next best fit: oxide {ru["oxide_nm"]:.0f} nm, gamma {ru["gamma"]:.2f} '
                         f'(loss {ru["loss_ratio"]:.2f} x the best)')
        balance = np.array([im['white_balance'] for im in self.calibration.images])
        if len(balance):
            lines.append('white balance (B, G, R gains, median over images): '
                         + ', '.join(f'{v:.2f}' for v in np.median(balance, axis=0)))
        return '\n'.join(lines)


# --------------------------------------------------------------------------- measuring


class ImageFiles:
    """(file name, BGR image) of each path, each read only when its turn comes (a folder of
    micrographs need not fit in memory), with the count for progress; a file OpenCV cannot read
    is a ValueError."""

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for path in self.paths:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f'cannot read image {path}')
            yield path.name, image


def measure_image(image_bgr: np.ndarray, index: int = 0, name: str = '', labels: list[LabelledFlake] = (),
                  min_area_px: int = 200, work_size: int = 1024) -> tuple[ImageSample, list[RegionSample]]:
    """The substrate of one image and its plateaus: every region that stands out of the
    substrate and is flat inside (see the module text). Labelled flakes of the image become
    labelled samples (their mask, or the plateau under their point)."""
    raw = as_bgr(image_bgr)
    if raw.dtype != np.uint8:
        raise ValueError(f'{name or "image"}: flake-calibrate reads 8-bit images, got {raw.dtype}')
    h, w = raw.shape[:2]
    scale = min(1.0, work_size / max(h, w)) if work_size > 0 else 1.0
    work = raw if scale >= 1.0 else cv2.resize(raw, (round(w * scale), round(h * scale)),
                                               interpolation=cv2.INTER_AREA)
    hw, ww = work.shape[:2]
    substrate = estimate_substrate(work, step=max(1, round(8 * scale)))
    image_sample = ImageSample(name, substrate.colour.astype(float), substrate.blind.copy(), (h, w))
    if not substrate.found:
        return image_sample, []
    background = substrate.background((hw, ww))
    smooth = cv2.blur(work.astype(np.float32), (3, 3))
    ratio = smooth / background - 1.0
    ratio[..., substrate.blind] = 0.0
    sample = ratio[::4, ::4][cv2.resize(substrate.substrate.astype(np.uint8), (len(range(0, ww, 4)),
                                        len(range(0, hw, 4))), interpolation=cv2.INTER_NEAREST) > 0]
    noise = float(np.mean(1.4826 * np.median(np.abs(sample - np.median(sample, axis=0)), axis=0)[~substrate.blind])
                  ) if len(sample) > 20 else 0.01
    noise = max(noise, 1e-3)
    magnitude = np.sqrt((ratio ** 2).sum(axis=2))
    on_chip = substrate.on_chip_at((hw, ww))
    foreground = (magnitude > max(0.03, 4.0 * math.sqrt(3.0) * noise)) & on_chip
    slope = np.zeros((hw, ww), np.float32)
    for c in range(3):
        if not substrate.blind[c]:
            channel = np.ascontiguousarray(ratio[..., c])
            slope = np.maximum(slope, np.hypot(cv2.Sobel(channel, cv2.CV_32F, 1, 0, ksize=3),
                                               cv2.Sobel(channel, cv2.CV_32F, 0, 1, ksize=3)) / 8.0)
    flat = slope <= 3.0 * noise + 0.05 * magnitude
    plateau = cv2.morphologyEx((foreground & flat).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels_map, stats, _ = cv2.connectedComponentsWithStats(plateau, connectivity=8)
    min_area = max(8, int(min_area_px * scale * scale))
    saturated = work >= 254
    samples = []
    for i in range(1, count):
        if stats[i, cv2.CC_STAT_AREA] < min_area:
            continue
        x, y, bw, bh, area = stats[i]
        mask = labels_map[y:y + bh, x:x + bw] == i
        samples.append(_region_sample(index, work[y:y + bh, x:x + bw], background[y:y + bh, x:x + bw],
                                      saturated[y:y + bh, x:x + bw], mask, substrate.blind, int(area / scale ** 2)))
    for label in labels:
        if label.mask is not None:
            mask = np.asarray(label.mask, dtype=bool)
            if mask.shape != (h, w):
                raise ValueError(f'{name}: a labelled mask of shape {mask.shape} does not fit the image {(h, w)}')
            if scale < 1.0:
                mask = cv2.resize(mask.astype(np.uint8), (ww, hw), interpolation=cv2.INTER_AREA) > 0
            inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            mask = inner if inner.sum() >= 8 else mask
            if mask.sum() < 4:
                continue
            found = _region_sample(index, work, background, saturated, mask, substrate.blind,
                                   int(mask.sum() / scale ** 2))
        else:
            px, py = (int(round(v * scale)) for v in label.point)
            if not (0 <= px < ww and 0 <= py < hw):
                raise ValueError(f'{name}: the labelled point {label.point} lies outside the image')
            ids = labels_map[max(0, py - 3):py + 4, max(0, px - 3):px + 4]
            ids = ids[ids > 0]
            if not len(ids):
                raise ValueError(f'{name}: no flat region stands out of the substrate at {label.point}; '
                                 'label a mask instead (a COCO file)')
            i = int(np.bincount(ids).argmax())
            x, y, bw, bh, area = stats[i]
            found = _region_sample(index, work[y:y + bh, x:x + bw], background[y:y + bh, x:x + bw],
                                   saturated[y:y + bh, x:x + bw], labels_map[y:y + bh, x:x + bw] == i,
                                   substrate.blind, int(area / scale ** 2))
        found.label = label
        samples.append(found)
    image_sample.regions = len(samples)
    return image_sample, samples


def _region_sample(index: int, work: np.ndarray, background: np.ndarray, saturated: np.ndarray,
                   mask: np.ndarray, blind: np.ndarray, area_px: int) -> RegionSample:
    return RegionSample(index, np.median(work[mask], axis=0).astype(float),
                        np.median(background[mask], axis=0).astype(float), area_px,
                        saturated[mask].mean(axis=0) > 0.5, blind.copy())


# --------------------------------------------------------------------------- fitting


# Tape residue (a polymer film of a few to tens of nm) covers parts of most exfoliated chips:
# its plateaus are fitted too (owner -1), so that they do not pull the flakes' ladder.
RESIDUE_NM = tuple(float(t) for t in range(2, 81, 2))


@dataclass(frozen=True)
class _Ladder:
    materials: tuple[str, ...]
    owner: np.ndarray  # (K,) index into materials; -1: tape residue
    layers: np.ndarray  # (K,) layers (residue: thickness [nm])


def _ladder_layers(names: tuple[str, ...]) -> _Ladder:
    owner, layers = [], []
    for k, name in enumerate(names):
        entry = vocabulary.material(name)
        reported = set(entry.optical_layers)
        # Thicker flakes matter for their colour, not their count: every fifth rung.
        thicker = {n for n in entry.alternative_layers if n not in reported and n % 5 == 0}
        counts = sorted(reported | thicker)
        owner += [k] * len(counts)
        layers += counts
    owner += [-1] * len(RESIDUE_NM)
    layers += list(RESIDUE_NM)
    return _Ladder(names, np.array(owner), np.array(layers, dtype=float))


def ladder_contrast(ladder: _Ladder, oxide_nm: float, spectral: optics.SpectralResponse) -> np.ndarray:
    """(K, 3) physical contrast, B, G, R, of every rung."""
    out = np.empty((len(ladder.layers), 3))
    oxide = round(float(oxide_nm), 1)
    for k, name in enumerate(ladder.materials):
        mine = ladder.owner == k
        out[mine] = _model_table(name, tuple(ladder.layers[mine]), oxide, spectral)[:, ::-1]
    residue = ladder.owner == -1
    out[residue] = (optics.band_reflectance('residue', ladder.layers[residue], oxide, spectral)
                    / optics.substrate_reflectance(oxide, spectral) - 1.0)
    return out


def _decode(digital: np.ndarray, gamma: float, black: float) -> np.ndarray:
    level = np.clip((digital - black) / (255.0 - black), 1e-6, 1.0)
    return level ** gamma


def spectral_with_width(camera: CameraResponse, width_nm: float) -> optics.SpectralResponse:
    """The camera's bands with one common 1-sigma width [nm] (sampled finely enough for it)."""
    width = round(float(width_nm) * 2.0) / 2.0
    samples = max(optics.BAND_SAMPLES, 2 * math.ceil(1.5 * width / 10.0) + 1)
    return optics.SpectralResponse(camera.channel_centres_nm, (width,) * 3, samples)


class _Objective:
    """Robust loss of the regions against the ladder for one camera and oxide."""

    def __init__(self, samples: list[RegionSample], ladder: _Ladder, camera: CameraResponse):
        self.ladder = ladder
        self.camera = camera
        self.digital = np.array([s.digital for s in samples])
        self.substrate = np.array([s.substrate for s in samples])
        self.saturated = np.array([s.saturated for s in samples])
        self.use = ~np.array([s.blind for s in samples])
        # Larger regions are measured better and are less often debris: weight sqrt(area), up
        # to ten times the smallest region's; labelled flakes weigh LABEL_WEIGHT more.
        area = np.array([s.area_px for s in samples], dtype=float)
        self.weights = np.clip(np.sqrt(area / max(1.0, float(area.min()))), 1.0, 10.0)
        self.weights *= np.array([LABEL_WEIGHT if s.label is not None else 1.0 for s in samples])
        # Rungs each labelled sample may take (all, for unlabelled ones).
        self.allowed = np.ones((len(samples), len(ladder.layers)), dtype=bool)
        for i, s in enumerate(samples):
            if s.label is not None:
                lo, hi = s.label.layers
                material = vocabulary.material(s.label.material).name
                if material not in ladder.materials:
                    raise ValueError(f'a labelled flake is {material}, which is not among the fitted materials '
                                     f'{", ".join(ladder.materials)}')
                mine = ladder.owner == ladder.materials.index(material)
                self.allowed[i] = mine & (ladder.layers >= lo) & (ladder.layers <= hi)
                if not self.allowed[i].any():
                    raise ValueError(f'no rung of {material} within the labelled layers {lo:g}-{hi:g}')

    def spectral(self, width: float | None) -> optics.SpectralResponse:
        return self.camera.spectral if width is None else spectral_with_width(self.camera, width)

    def contrast(self, gamma: float, black: float) -> np.ndarray:
        return _decode(self.digital, gamma, black) / _decode(self.substrate, gamma, black) - 1.0

    def distances(self, oxide: float, gamma: float, black: float = 0.0,
                  width: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances in sigmas (N, K) of every region to every rung, and the regions'
        physical contrasts. The distance is taken where the noise is, on the digital numbers:
        each rung is encoded as the camera would show it over the region's substrate, and
        the difference counts relative to the substrate's reading."""
        contrast = self.contrast(gamma, black)
        rungs = ladder_contrast(self.ladder, oxide, self.spectral(width))
        substrate = _decode(self.substrate, gamma, black)  # (N, 3)
        linear = np.clip(substrate[:, None, :] * (1.0 + rungs[None, :, :]), 0.0, 1.0)
        predicted = black + (255.0 - black) * linear ** (1.0 / gamma)  # (N, K, 3)
        residual = (self.digital[:, None, :] - predicted) / self.substrate[:, None, :]
        residual = np.where(self.saturated[:, None, :], np.maximum(residual, 0.0), residual)
        expected = predicted / self.substrate[:, None, :] - 1.0
        sigma_sq = FIT_SIGMA ** 2 + (FIT_RELATIVE_SIGMA * expected) ** 2
        d2 = (residual ** 2 / sigma_sq * self.use[:, None, :]).sum(axis=2)
        return np.where(self.allowed, d2, np.inf), contrast

    def __call__(self, oxide: float, gamma: float, black: float = 0.0, width: float | None = None) -> float:
        d2, _ = self.distances(oxide, gamma, black, width)
        best = d2.min(axis=1)
        return float((self.weights * np.log1p(best / ROBUST_SCALE)).sum())


# Widths of the colour bands tried (1 sigma) [nm], and regions fitted at most.
WIDTH_RANGE_NM = (15.0, 60.0)
MAX_FIT_REGIONS = 400


def _refine(objective: _Objective, start: dict, free: tuple[str, ...], bounds: dict) -> tuple[dict, float]:
    from scipy.optimize import minimize

    steps = {'oxide': 4.0, 'gamma': 0.08, 'width': 4.0, 'black': 3.0}

    def unpack(x):
        point = dict(start)
        point.update(zip(free, (float(v) for v in x), strict=True))
        return point

    def loss(x):
        point = unpack(x)
        if any(not bounds[k][0] <= point[k] <= bounds[k][1] for k in free):
            return 1e12
        return objective(point['oxide'], point['gamma'], point['black'], point['width'])

    x0 = np.array([start[k] for k in free], dtype=float)
    simplex = np.vstack([x0] + [x0 + np.eye(len(x0))[k] * steps[name] for k, name in enumerate(free)])
    result = minimize(loss, x0, method='Nelder-Mead',
                      options={'initial_simplex': simplex, 'xatol': 0.05, 'fatol': 1e-3, 'maxiter': 300})
    return unpack(result.x), float(result.fun)


def fit_camera(samples: list[RegionSample], material_names: tuple[str, ...], camera: CameraResponse | None = None,
               oxide_range: tuple[float, float] = OXIDE_RANGE_NM, gamma_range: tuple[float, float] = GAMMA_RANGE,
               fit_black: bool = False, fit_bands: bool = True, oxide_step: float = 10.0,
               gamma_step: float = 0.15) -> dict:
    """Oxide, gamma, the bands' width (and black level) that put the regions on the ladder:
    a grid over oxide, gamma and width, then the best three grid points refined together.
    Returns the best and the runner-up that lies apart from it (another oxide)."""
    camera = camera or CameraResponse()
    if len(samples) > MAX_FIT_REGIONS:
        # The largest regions and every labelled one: the fit's cost grows with the count.
        order = sorted(range(len(samples)), key=lambda i: (samples[i].label is None, -samples[i].area_px))
        samples = [samples[i] for i in sorted(order[:MAX_FIT_REGIONS])]
    ladder = _ladder_layers(material_names)
    objective = _Objective(samples, ladder, camera)
    oxides = np.arange(oxide_range[0], oxide_range[1] + 1e-9, oxide_step)
    gammas = np.arange(gamma_range[0], gamma_range[1] + 1e-9, gamma_step)
    widths = [20.0, 32.0, 45.0] if fit_bands else [None]
    grid = np.array([[[objective(ox, g, 0.0, w) for w in widths] for g in gammas] for ox in oxides])
    order = np.argsort(grid, axis=None)
    starts = []
    for flat in order:
        i, j, k = np.unravel_index(flat, grid.shape)
        point = {'oxide': float(oxides[i]), 'gamma': float(gammas[j]), 'black': 0.0, 'width': widths[k]}
        if all(abs(point['oxide'] - s['oxide']) > 3 * oxide_step or abs(point['gamma'] - s['gamma']) > 3 * gamma_step
               for s in starts):
            starts.append(point)
        if len(starts) == 3:
            break
    free = ('oxide', 'gamma') + (('width',) if fit_bands else ()) + (('black',) if fit_black else ())
    bounds = {'oxide': oxide_range, 'gamma': gamma_range, 'width': WIDTH_RANGE_NM, 'black': (0.0, 40.0)}
    refined = sorted((_refine(objective, s, free, bounds) for s in starts), key=lambda r: r[1])
    best, best_loss = refined[0]
    runner = next((r for r in refined[1:] if abs(r[0]['oxide'] - best['oxide']) > 15.0), None)
    spectral = objective.spectral(best['width'])
    return {'oxide_nm': best['oxide'], 'gamma': best['gamma'], 'black_level_dn': best['black'],
            'spectral': spectral, 'loss': best_loss, 'objective': objective, 'grid': grid,
            'grid_axes': (oxides, gammas, widths),
            'runner_up': None if runner is None else {'oxide_nm': runner[0]['oxide'], 'gamma': runner[0]['gamma'],
                                                      'loss_ratio': float(runner[1] / max(best_loss, 1e-9))}}


def calibrate(images, material_names, labels: list[LabelledFlake] = (), camera: CameraResponse | None = None,
              oxide_range: tuple[float, float] = OXIDE_RANGE_NM, gamma_range: tuple[float, float] = GAMMA_RANGE,
              fit_black: bool = False, min_area_px: int = 200, name: str = 'flake-calibrate',
              progress=None, fit_bands: bool = True) -> CalibrationResult:
    """Fit a calibration from ``images`` (an iterable of (name, BGR uint8 image)) of flakes of
    ``material_names``; ``labels`` (LabelledFlake) refine it. ``camera`` holds the spectral
    bands and lamp assumed (default: the shipped bands). ``progress(done, total, name)`` is
    called after each image. Raises ValueError when nothing can be fitted."""
    names = vocabulary.parse_materials(material_names)
    camera = camera or CameraResponse()
    by_image: dict[str, list[LabelledFlake]] = {}
    for label in labels:
        by_image.setdefault(label.image, []).append(label)
    # Images are measured one at a time and let go: only their regions are kept for the fit.
    total = len(images) if isinstance(images, Sized) else 0
    image_samples, samples = [], []
    for index, (image_name, image) in enumerate(images):
        info, found = measure_image(image, index, image_name, by_image.pop(image_name, []), min_area_px)
        image_samples.append(info)
        samples += found
        if progress is not None:
            progress(index + 1, max(total, index + 1), image_name)
    if not image_samples:
        raise ValueError('no images to calibrate from')
    if by_image:
        raise ValueError(f'labelled flakes name images that were not given: {", ".join(sorted(by_image))}')
    return fit_calibration(image_samples, samples, names, camera, oxide_range, gamma_range, fit_black, name,
                           fit_bands)


def fit_calibration(image_samples: list[ImageSample], samples: list[RegionSample], names: tuple[str, ...],
                    camera: CameraResponse | None = None, oxide_range: tuple[float, float] = OXIDE_RANGE_NM,
                    gamma_range: tuple[float, float] = GAMMA_RANGE, fit_black: bool = False,
                    name: str = 'flake-calibrate', fit_bands: bool = True) -> CalibrationResult:
    """The calibration of regions ``measure_image`` found (the second half of ``calibrate``)."""
    camera = camera or CameraResponse()
    images = image_samples
    if len(samples) < 3:
        raise ValueError(f'only {len(samples)} regions stand out of the substrate in {len(images)} images: '
                         'too few to fit a calibration (are the images in focus, with flakes?)')
    fit = fit_camera(samples, names, camera, oxide_range, gamma_range, fit_black, fit_bands)
    oxide, gamma, black = fit['oxide_nm'], fit['gamma'], fit['black_level_dn']
    spectral = fit['spectral']
    camera = replace(camera, gamma=gamma, black_level_dn=black, channel_centres_nm=spectral.centres_nm,
                     channel_widths_nm=spectral.widths_nm, band_samples=spectral.samples)
    # Every region (the fit may have used the largest only), through the fitted camera.
    objective = _Objective(samples, fit['objective'].ladder, camera)
    fit['objective'] = objective
    d2, contrast = objective.distances(oxide, gamma, black)
    nearest = d2.argmin(axis=1)
    best = d2[np.arange(len(samples)), nearest]
    inliers = best <= 9.0
    rungs = ladder_contrast(objective.ladder, oxide, camera.spectral)
    model_sigma, relative_sigma = _spread(contrast - rungs[nearest], rungs[nearest],
                                          objective.use & ~objective.saturated, inliers)
    measured = _measured_classes(samples, contrast, objective, nearest, oxide, model_sigma, relative_sigma)
    per_image = []
    for info in image_samples:
        per_image.append(_image_camera(info, camera, oxide))
    labelled = [i for i, s in enumerate(samples) if s.label is not None]
    # Where a labelled flake would fall with every rung allowed: on one of its own, or not.
    allowed, objective.allowed = objective.allowed, np.ones_like(objective.allowed)
    free_d2 = objective.distances(oxide, gamma, black)[0]
    objective.allowed = allowed
    on_rung = sum(bool(allowed[i, int(free_d2[i].argmin())]) for i in labelled)
    report = {'oxide_nm': oxide, 'gamma': gamma, 'black_level_dn': black, 'band_width_nm': spectral.widths_nm[1],
              'images': len(images),
              'regions': len(samples), 'labelled': len(labelled), 'labelled_on_rung': on_rung,
              'inlier_share': float(inliers.mean()), 'median_sigmas': float(np.median(np.sqrt(best))),
              'model_sigma': model_sigma, 'relative_sigma': relative_sigma, 'loss': fit['loss'],
              'runner_up': fit['runner_up'],
              'materials': list(names), 'measured_classes': {m: [c.layers for c in v] for m, v in measured.items()}}
    calibration = Calibration(oxide_nm=oxide, camera=camera, materials=measured, model_sigma=model_sigma,
                              relative_sigma=relative_sigma,
                              name=name, source=f'flake-calibrate on {len(images)} images of '
                                                f'{", ".join(names)} ({len(labelled)} labelled flakes)',
                              images=tuple(per_image),
                              fit={k: v for k, v in report.items() if k not in ('materials',)})
    result = CalibrationResult(calibration, image_samples, samples, report)
    result._fit = fit  # for the scatter plot
    return result


def _spread(residual: np.ndarray, rung: np.ndarray, use: np.ndarray, inliers: np.ndarray) -> tuple[float, float]:
    """How far regions on the ladder lie from their rung in physical contrast, as
    ``sqrt(sigma^2 + (relative * C)^2)``: sigma from the regions of small contrast, the
    relative part from the rest (robust medians; the floor is the shipped model's 0.02)."""
    use = use & inliers[:, None]
    r, c = np.abs(residual[use]), np.abs(rung[use])
    if len(r) < 10:
        return 0.05, 0.1
    small = c < 0.15
    sigma = float(1.4826 * np.median(r[small])) if small.sum() >= 10 else 0.02
    sigma = float(np.clip(sigma, 0.02, 0.2))
    large = ~small
    relative = 0.0
    if large.sum() >= 10:
        excess = np.maximum((1.4826 * r[large]) ** 2 - sigma ** 2, 0.0)
        relative = float(np.sqrt(np.median(excess / c[large] ** 2)))
    return sigma, float(np.clip(relative, 0.0, 0.5))


def _measured_classes(samples, contrast, objective: _Objective, nearest, oxide: float, model_sigma: float,
                      relative_sigma: float) -> dict:
    """Classes measured on labelled flakes, one per (material, rung): each labelled flake goes
    to its own layer count, or (a range such as '>5L') to the rung of its range that fits it
    best. The class mean is the flakes' mean physical contrast per channel where they measure
    it (channels the substrate or the flake saturates are left out); a channel no flake of the
    class measures keeps the model's value with four times its variance. The variance is no
    tighter than the model's spread (R, G, B)."""
    rungs = ladder_contrast(objective.ladder, oxide, objective.camera.spectral)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(samples):
        if s.label is None:
            continue
        k = int(nearest[i])
        groups.setdefault((vocabulary.material(s.label.material).name, int(objective.ladder.layers[k])), []).append(i)
    out: dict[str, list[MeasuredClass]] = {}
    for (material, layers), members in sorted(groups.items()):
        k = int(nearest[members[0]])
        model = rungs[k][::-1]  # R, G, B
        model_var = model_sigma ** 2 + (relative_sigma * model) ** 2
        values = contrast[members][:, ::-1]
        usable = (objective.use & ~objective.saturated)[members][:, ::-1]
        mean, var = model.copy(), 4.0 * model_var
        for c in range(3):
            seen = values[usable[:, c], c]
            if len(seen):
                mean[c] = float(seen.mean())
                var[c] = max(float(seen.var()) if len(seen) > 1 else 0.0, 0.25 * model_var[c])
        out.setdefault(material, []).append(MeasuredClass(layers, tuple(mean), tuple(map(tuple, np.diag(var))),
                                                          len(members)))
    return {m: tuple(v) for m, v in out.items()}


def _image_camera(info: ImageSample, camera: CameraResponse, oxide: float) -> dict:
    """White balance and exposure of one image: the substrate's linear signal over its model
    reflectance gives the three channel gains (blind channels: only a lower bound)."""
    linear = camera.decode(info.substrate)
    reflectance = optics.substrate_reflectance(oxide, camera.spectral)
    gain = np.maximum(linear / reflectance, 1e-6)
    fitted = camera.with_channel_gain(gain)
    return {'name': info.name, 'substrate_bgr': [round(float(v), 2) for v in info.substrate],
            'white_balance': [round(float(v), 4) for v in fitted.white_balance],
            'exposure': round(float(fitted.exposure), 5), 'blind_channels': [bool(b) for b in info.blind]}


# --------------------------------------------------------------------------- picture


def plot_scatter(result: CalibrationResult, path: Path | str, max_layers_marked: int = 12) -> Path:
    """The regions' physical contrast (G against B, and R against G) over the fitted ladder,
    labelled flakes in their own colour: to judge the fit by eye."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cal = result.calibration
    fit = result._fit
    objective: _Objective = fit['objective']
    _, contrast = objective.distances(cal.oxide_nm, cal.camera.gamma, cal.camera.black_level_dn)
    rungs = ladder_contrast(objective.ladder, cal.oxide_nm, cal.camera.spectral)
    labelled = np.array([s.label is not None for s in result.samples])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (cx, cy, nx, ny) in zip(axes, ((0, 1, 'B', 'G'), (1, 2, 'G', 'R')), strict=True):
        use = objective.use[:, cx] & objective.use[:, cy]
        ax.scatter(contrast[use & ~labelled, cx], contrast[use & ~labelled, cy], s=6, c='0.5', alpha=0.5,
                   label='regions (no label)')
        if (use & labelled).any():
            layers = np.array([s.label.layers[0] for s in result.samples])
            points = ax.scatter(contrast[use & labelled, cx], contrast[use & labelled, cy], s=22,
                                c=np.minimum(layers[use & labelled], 12), cmap='viridis', edgecolors='k',
                                linewidths=0.4, label='labelled flakes (colour: layers)')
            fig.colorbar(points, ax=ax, shrink=0.7)
        for k, name in enumerate(objective.ladder.materials):
            mine = objective.ladder.owner == k
            colour = vocabulary.colour(name)
            ax.plot(rungs[mine, cx], rungs[mine, cy], '-', color=colour, lw=1.2, label=f'{name} ladder')
            for n, point in zip(objective.ladder.layers[mine], rungs[mine], strict=True):
                if n <= max_layers_marked:
                    ax.plot(point[cx], point[cy], 'o', color=colour, ms=3)
                    ax.annotate(f'{n:.0f}', (point[cx], point[cy]), fontsize=7, xytext=(3, 2),
                                textcoords='offset points')
        residue = objective.ladder.owner == -1
        ax.plot(rungs[residue, cx], rungs[residue, cy], '--', color='0.4', lw=0.8, label='tape residue')
        ax.axhline(0, color='0.85', lw=0.6)
        ax.axvline(0, color='0.85', lw=0.6)
        ax.set_xlabel(f'contrast {nx}')
        ax.set_ylabel(f'contrast {ny}')
        span = np.percentile(np.abs(contrast[use][:, [cx, cy]]), 98) if use.any() else 1.0
        ax.set_xlim(-1.1 * span - 0.05, 1.1 * span + 0.05)
        ax.set_ylim(-1.1 * span - 0.05, 1.1 * span + 0.05)
        if use.sum() < len(use):
            ax.set_title(f'{len(use) - use.sum()} regions on images where {nx} or {ny} clips', fontsize=8)
    axes[0].legend(fontsize=7, loc='best')
    fig.suptitle(f'{", ".join(result.report["materials"])}: oxide {cal.oxide_nm:.0f} nm, gamma '
                 f'{cal.camera.gamma:.2f}; {result.report["regions"]} regions, '
                 f'{100 * result.report["inlier_share"]:.0f} % on the ladder', fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- labels


def labels_from_coco(coco: dict, root: Path, material: str | None = None) -> tuple[list[tuple[str, Path]],
                                                                               list[LabelledFlake]]:
    """Images and labelled flakes of a COCO file: layers from ``attributes.layers`` or a
    category named like '3L'; material from ``attributes.material``, the category's name,
    or ``material``."""
    from pycocotools import mask as mask_utils

    categories = {int(c['id']): str(c['name']) for c in coco.get('categories', [])}
    images = {int(im['id']): im for im in coco.get('images', [])}
    flakes = []
    for ann in coco.get('annotations', []):
        image = images.get(int(ann['image_id']))
        if image is None:
            raise ValueError(f'annotation {ann.get("id")} names image {ann["image_id"]}, which the file lacks')
        attributes = ann.get('attributes') or {}
        category = categories.get(int(ann.get('category_id', -1)), '')
        layers = attributes.get('layers')
        span = (float(layers), float(layers)) if layers is not None else layer_range_of_name(category)
        if span is None:
            continue
        name = attributes.get('material') or (category if category.lower() in vocabulary.MATERIALS else material)
        if name is None:
            raise ValueError(f'annotation {ann.get("id")}: no material (give --material)')
        h, w = int(image['height']), int(image['width'])
        segmentation = ann.get('segmentation')
        if isinstance(segmentation, list) and segmentation:
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        elif isinstance(segmentation, dict):
            rle = dict(segmentation)
            if isinstance(rle.get('counts'), list):
                rle = mask_utils.frPyObjects(rle, h, w)
            elif isinstance(rle.get('counts'), str):
                rle['counts'] = rle['counts'].encode('ascii')
        else:
            x, y, bw, bh = ann['bbox']
            rle = mask_utils.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)[0]
        flakes.append(LabelledFlake(str(image['file_name']), vocabulary.material(name).name, span,
                                    mask=mask_utils.decode(rle).astype(bool)))
    named = sorted({f.image for f in flakes})
    return [(n, root / n) for n in named], flakes


def _parse_flake(text: str) -> LabelledFlake:
    """'IMAGE:X,Y:LAYERS[:MATERIAL]' from the command line."""
    parts = text.rsplit(':', 3)
    try:
        if len(parts) == 4 and not parts[3].strip().replace('.', '').isdigit() and ',' in parts[1]:
            image, point, layers, material = parts
        else:
            image, point, layers = text.rsplit(':', 2)
            material = None
        x, y = (float(v) for v in point.split(','))
        span = layer_range_of_name(layers)
        if span is None:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected IMAGE:X,Y:LAYERS[:MATERIAL] (e.g. a.png:412,230:2), '
                                         f'got {text!r}') from None
    return LabelledFlake(Path(image).name, material or '', span, point=(x, y))


# --------------------------------------------------------------------------- command


def _collect_images(paths: list[Path]) -> list[Path]:
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f'no such file or folder: {path}')
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-calibrate', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='\n\n'.join(__doc__.split('\n\n')[1:3]))
    parser.add_argument('images', nargs='*', type=Path, help='image files or folders of them (8-bit colour)')
    parser.add_argument('--material', action='append', required=True,
                        help='material of the flakes (repeatable, or comma-separated): '
                             + ', '.join(vocabulary.FLAKE_MATERIALS))
    parser.add_argument('--out', type=Path, required=True, help='calibration file to write (JSON)')
    parser.add_argument('--labels', type=Path, default=None,
                        help='COCO file of flakes of known layer count (images are looked up beside it)')
    parser.add_argument('--flake', action='append', type=_parse_flake, default=[],
                        help='a flake of known layer count: IMAGE:X,Y:LAYERS[:MATERIAL] (repeatable)')
    parser.add_argument('--plot', type=Path, default=None, help='write the contrast scatter with the ladder (PNG)')
    parser.add_argument('--oxide-range', default=f'{OXIDE_RANGE_NM[0]:g},{OXIDE_RANGE_NM[1]:g}',
                        help='oxide thicknesses to search [nm] (LOW,HIGH)')
    parser.add_argument('--gamma-range', default=f'{GAMMA_RANGE[0]:g},{GAMMA_RANGE[1]:g}',
                        help='camera gammas to search (LOW,HIGH; 1,1 for a linear camera)')
    parser.add_argument('--fit-black-level', action='store_true', help='fit the camera black level too')
    parser.add_argument('--fixed-bands', action='store_true',
                        help="keep the shipped colour bands (460/535/610 nm, 20-22 nm wide) instead of fitting "
                             "their width (broad Bayer filters are 30-50 nm)")
    parser.add_argument('--lamp-k', type=float, default=3200.0,
                        help='lamp colour temperature [K], for the white balance reported')
    parser.add_argument('--min-area-px', type=int, default=200, help='smallest region measured [px]')
    parser.add_argument('--name', default=None, help='name of the calibration (default: the output file name)')
    return parser


def _range(text: str, what: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(','))
    except ValueError:
        raise ValueError(f'{what} must be LOW,HIGH, got {text!r}') from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f'{what} must be LOW,HIGH with LOW <= HIGH, got {text!r}')
    return low, high


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = vocabulary.parse_materials(','.join(args.material))
        oxide_range = _range(args.oxide_range, '--oxide-range')
        gamma_range = _range(args.gamma_range, '--gamma-range')
        if not (1.0 <= oxide_range[0] and oxide_range[1] <= 2000.0):
            raise ValueError('--oxide-range must lie within 1..2000 nm')
        if not (0.2 <= gamma_range[0] and gamma_range[1] <= 5.0):
            raise ValueError('--gamma-range must lie within 0.2..5')
        camera = CameraResponse(lamp_temperature_k=args.lamp_k)
        paths = _collect_images(args.images)
        labels = []
        if args.labels is not None:
            if not args.labels.is_file():
                raise ValueError(f'no such file: {args.labels}')
            coco = json.loads(args.labels.read_text())
            labelled_paths, labels = labels_from_coco(coco, args.labels.parent, names[0] if len(names) == 1 else None)
            known = {p.name for p in paths}
            paths += [p for _, p in labelled_paths if p.name not in known]
        for flake in args.flake:
            labels.append(replace(flake, material=flake.material or names[0]))
        if not paths:
            raise ValueError('no images given (files or folders of .png, .jpg, .tif)')
    except (ValueError, json.JSONDecodeError) as exc:
        parser.error(str(exc))

    def progress(done, total, name):
        print(f'[flake-calibrate] {done}/{total} {name}', file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        result = calibrate(ImageFiles(paths), names, labels, camera, oxide_range, gamma_range, args.fit_black_level,
                           args.min_area_px, args.name or args.out.stem, progress, not args.fixed_bands)
    except ValueError as exc:
        print(f'flake-calibrate: error: {exc}', file=sys.stderr)
        return 2
    result.calibration.save(args.out)
    print(result.summary())
    if args.plot is not None:
        plot_scatter(result, args.plot)
        print(f'wrote {args.plot}')
    print(f'wrote {args.out} ({time.perf_counter() - started:.1f} s); use it with '
          f'flake-detect --param calibration={args.out} --param materials={",".join(names)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

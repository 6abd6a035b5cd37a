"""Self-calibration on the image: column intensities measured on the lattice found, normalised
per sublattice, and the regions that do not fit the lattice masked.

Every unit cell (in the networks' frame, see lattice.py) holds two columns: P at the upper
right of its box (the top vertex of its hexagon) and Q at the lower left; its hexagon's
hollow site (no atom) lies a / sqrt(3) below P and gives the local background. Which of P
and Q is the metal depends on how the crystal lies (a turn by 60 degrees swaps them), so it
is decided on the image:

1. by contrast, when the detector's Z-contrast (adf.py) makes one column type brighter for
   every plausible exponent and the image agrees clearly (|log ratio| >= 0.1);
2. otherwise by the half-filled columns: only a chalcogen column can lose one of its two
   atoms, so the sublattice with more columns at about half the typical signal holds the
   chalcogens (single chalcogen vacancies are the commonest point defect of these crystals);
3. otherwise the nearer expected ratio is assumed and the decision is reported as uncertain.

Because the perfect lattice dominates, the typical signal of each sublattice's full columns
(``filled_level``: a median in a window about the full columns' level, which is the plain
median when most columns are full) over a neighbourhood of about six lattice constants is the
reference of that sublattice there;
every column is divided by it, so a perfect cell reads (1, 1), a single chalcogen vacancy
(1, ~0.5), a metal vacancy (0, 1), whatever the material, detector, dose or contamination
gradient. The classifier sees crops normalised the same way.

Masked (not analysed, not counted in the area): cells whose hollow site is brighter than the
clean lattice's background by a quarter of the brighter column (amorphous contamination) and
their neighbours; cells with few neighbouring cells where the lattice continues (holes,
edges); clusters of empty cells (vacuum); neighbourhoods whose references are far from the
frame's (a different contrast: thicker regions, residue).
"""

from __future__ import annotations

from dataclasses import dataclass
import math

import cv2
import numpy as np

from flake_core.materials import StemLattice

from .adf import column_ratio

COLUMN_RADIUS_FRACTION = 0.214    # column centre inset in a unit-cell box, in units of a
MEASURE_SIGMA_FRACTION = 0.10     # Gaussian weight of a column measurement, in units of a
BIN_LATTICES = 6.0                # side of a calibration neighbourhood, in lattice constants
MIN_BIN_CELLS = 6
CONTAMINATION_STEP = 0.25         # hollow-site excess over the clean background / brighter column
CLEAR_LOG_RATIO = 0.10            # |log(chalcogen / metal)| above which contrast decides
EMPTY_LEVEL = 0.35                # normalised signal below which a column counts as empty
HALF_BAND = (0.3, 0.72)           # normalised signal of a column with one of two atoms
REFERENCE_RANGE = (0.5, 2.0)      # local reference / frame reference outside which a region is masked

MASK_OK, MASK_CONTAMINATION, MASK_EDGE, MASK_VACUUM, MASK_CONTRAST = 0, 1, 2, 3, 4
MASK_REASONS = {MASK_OK: 'analysed', MASK_CONTAMINATION: 'contamination', MASK_EDGE: 'edge or hole rim',
                MASK_VACUUM: 'vacuum', MASK_CONTRAST: 'contrast unlike the lattice'}


@dataclass(frozen=True)
class SublatticeDecision:
    metal_site: str                  # 'P' (upper right of each unit-cell box) or 'Q' (lower left)
    basis: str                       # 'contrast', 'half-filled columns' or 'assumed'
    measured_ratio: float            # chalcogen / metal column signal, frame medians
    expected_ratio: tuple[float, float]  # over the detector's plausible exponents
    certain: bool


@dataclass
class CellCalibration:
    """Per unit cell: normalised column signals, references, background and mask reason."""

    metal: np.ndarray                # (N,) metal column signal / local metal reference
    chalcogen: np.ndarray            # (N,) chalcogen column signal / local chalcogen reference
    background: np.ndarray           # (N,) local background [counts]
    metal_reference: np.ndarray      # (N,) [counts above background], at least 5 % of the brighter sublattice's
    chalcogen_reference: np.ndarray
    mask: np.ndarray                 # (N,) MASK_* codes; MASK_OK cells are analysed
    metal_signal: float              # frame reference of the metal column [counts above background]
    chalcogen_signal: float

    @property
    def analysed(self) -> np.ndarray:
        return self.mask == MASK_OK

    @property
    def ratio(self) -> float:
        """Chalcogen / metal column signal of the clean lattice."""
        return self.chalcogen_signal / self.metal_signal if self.metal_signal > 0 else float('nan')


def column_sites(boxes: np.ndarray, lattice_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P, Q and hollow-site positions (x, y) of unit-cell boxes in the networks' frame."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inset = COLUMN_RADIUS_FRACTION * lattice_px
    p = np.stack([boxes[:, 2] - inset, boxes[:, 1] + inset], 1)
    q = np.stack([boxes[:, 0] + inset, boxes[:, 3] - inset], 1)
    hollow = p + [0.0, lattice_px / math.sqrt(3.0)]
    return p, q, hollow


def measure_columns(canonical: np.ndarray, boxes: np.ndarray, lattice_px: float):
    """Gaussian-weighted signal at P, Q and the hollow site of every unit cell [counts]."""
    smooth = cv2.GaussianBlur(np.asarray(canonical, dtype=np.float32), (0, 0), MEASURE_SIGMA_FRACTION * lattice_px)
    return tuple(_bilinear(smooth, sites) for sites in column_sites(boxes, lattice_px))


def _bilinear(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    H, W = image.shape
    x = np.clip(points[:, 0], 0, W - 1.001)
    y = np.clip(points[:, 1], 0, H - 1.001)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    return ((1 - fx) * (1 - fy) * image[y0, x0] + fx * (1 - fy) * image[y0, x0 + 1]
            + (1 - fx) * fy * image[y0 + 1, x0] + fx * fy * image[y0 + 1, x0 + 1])


def expected_ratio_range(lattice: StemLattice, exponents: tuple[float, float]) -> tuple[float, float]:
    ratios = [column_ratio(lattice.metal_z, lattice.chalcogen_z, n, lattice.chalcogens_per_column)
              for n in exponents]
    return min(ratios), max(ratios)


def decide_sublattice(p_signal: np.ndarray, q_signal: np.ndarray, lattice: StemLattice,
                      exponents: tuple[float, float]) -> SublatticeDecision:
    """Which column of each unit cell is the metal (see the module text)."""
    low, high = expected_ratio_range(lattice, exponents)
    p_ref, q_ref = filled_level(p_signal), filled_level(q_signal)
    if p_ref <= 0 or q_ref <= 0:
        return SublatticeDecision('P', 'assumed', float('nan'), (low, high), False)
    measured = math.log(q_ref / p_ref)               # log(chalcogen / metal) if the metal is at P
    sign = 1 if low > 1 else (-1 if high < 1 else 0)
    if sign and abs(measured) >= CLEAR_LOG_RATIO:
        site = 'P' if (measured > 0) == (sign > 0) else 'Q'
        return _decision(site, 'contrast', p_ref, q_ref, (low, high), True)
    half_p = _half_share(p_signal / p_ref)
    half_q = _half_share(q_signal / q_ref)
    spread = math.sqrt(max(half_p + half_q, 1e-9) / len(p_signal))
    if abs(half_q - half_p) > 3 * spread:
        return _decision('P' if half_q > half_p else 'Q', 'half-filled columns', p_ref, q_ref, (low, high), True)
    middle = math.sqrt(low * high)
    site = 'P' if abs(measured - math.log(middle)) <= abs(-measured - math.log(middle)) else 'Q'
    return _decision(site, 'assumed', p_ref, q_ref, (low, high), False)


def _decision(site, basis, p_ref, q_ref, expected, certain) -> SublatticeDecision:
    ratio = q_ref / p_ref if site == 'P' else p_ref / q_ref
    return SublatticeDecision(site, basis, ratio, expected, certain)


def filled_level(values: np.ndarray) -> float:
    """Typical signal of a full column.

    Start from the median of the values above 0.6 of the upper quartile (which skips empty and
    half-filled columns even where they are many, as in the classifier's balanced training
    frames), then take the median within +-40 % of it until it settles: a window symmetric about
    the answer, so shot noise on faint columns does not bias it upwards.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float('nan')
    top = float(np.percentile(values, 75))
    if top <= 0:
        return float(np.median(values))
    centre = float(np.median(values[values >= 0.6 * top]))
    for _ in range(4):
        window = values[(values > 0.6 * centre) & (values < 1.4 * centre)]
        if len(window) < 3:
            break
        centre = float(np.median(window))
    return centre


def _half_share(normalised: np.ndarray) -> float:
    return float(((normalised > HALF_BAND[0]) & (normalised < HALF_BAND[1])).mean())


def calibrate_cells(canonical: np.ndarray, boxes: np.ndarray, lattice_px: float, lattice: StemLattice,
                    exponents: tuple[float, float], valid: np.ndarray | None = None,
                    decision: SublatticeDecision | None = None) -> tuple[CellCalibration, SublatticeDecision]:
    """Measure, decide the sublattices (unless ``decision`` is given), normalise and mask."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if n == 0:
        empty = np.zeros(0)
        return (CellCalibration(empty, empty, empty, empty, empty, np.zeros(0, np.uint8), float('nan'),
                                float('nan')), decision or SublatticeDecision('P', 'assumed', float('nan'),
                                                                              (0.0, 0.0), False))
    p_raw, q_raw, hollow = measure_columns(canonical, boxes, lattice_px)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    bins = _bins(centres, BIN_LATTICES * lattice_px)

    # Background of the clean lattice: the darker neighbourhoods (contamination only adds signal).
    bin_hollow = _bin_medians(bins, hollow, np.ones(n, bool))
    filled = np.isfinite(bin_hollow)
    clean_background = float(np.percentile(bin_hollow[filled], 20)) if filled.any() else float(np.median(hollow))
    brighter = max(filled_level(p_raw), filled_level(q_raw)) - clean_background
    brighter = max(brighter, 1e-6)
    for _ in range(2):
        contaminated = hollow - clean_background > CONTAMINATION_STEP * brighter
        good = ~contaminated
        if good.sum() < 3:
            good = np.ones(n, bool)
        brighter = max(filled_level(p_raw[good]), filled_level(q_raw[good])) - clean_background
        brighter = max(brighter, 1e-6)
    contaminated = _spread_to_neighbours(contaminated, centres, lattice_px)

    if decision is None:
        use = ~contaminated if (~contaminated).sum() >= 10 else np.ones(n, bool)
        decision = decide_sublattice(p_raw[use] - clean_background, q_raw[use] - clean_background, lattice, exponents)
    metal_raw, chalcogen_raw = (p_raw, q_raw) if decision.metal_site == 'P' else (q_raw, p_raw)

    good = ~contaminated
    background = _lookup(bins, _bin_medians(bins, hollow, good), clean_background)
    metal_signal = metal_raw - background
    chalcogen_signal = chalcogen_raw - background
    use = good if good.any() else np.ones(n, bool)
    frame_metal = filled_level(metal_signal[use])
    frame_chalcogen = filled_level(chalcogen_signal[use])
    metal_reference = _lookup(bins, _bin_medians(bins, metal_signal, good, filled_level), frame_metal)
    chalcogen_reference = _lookup(bins, _bin_medians(bins, chalcogen_signal, good, filled_level), frame_chalcogen)
    floor = 0.05 * brighter
    metal = metal_signal / np.maximum(metal_reference, floor)
    chalcogen = chalcogen_signal / np.maximum(chalcogen_reference, floor)

    mask = np.zeros(n, dtype=np.uint8)
    off_contrast = ((metal_reference < REFERENCE_RANGE[0] * frame_metal)
                    | (metal_reference > REFERENCE_RANGE[1] * frame_metal)
                    | (chalcogen_reference < REFERENCE_RANGE[0] * frame_chalcogen)
                    | (chalcogen_reference > REFERENCE_RANGE[1] * frame_chalcogen))
    mask[off_contrast] = MASK_CONTRAST
    empty = (metal < EMPTY_LEVEL) & (chalcogen < EMPTY_LEVEL)
    mask[_empty_clusters(empty, centres, lattice_px)] = MASK_VACUUM
    mask[_few_neighbours(centres, lattice_px, valid, boxes)] = MASK_EDGE
    mask[contaminated] = MASK_CONTAMINATION
    # The crops are divided by the same floored references as the levels: a neighbourhood whose reference
    # is near zero or negative (empty columns, a faint sublattice at low dose) must not scale a crop by 1e6.
    return (CellCalibration(metal=metal, chalcogen=chalcogen, background=background,
                            metal_reference=np.maximum(metal_reference, floor),
                            chalcogen_reference=np.maximum(chalcogen_reference, floor), mask=mask,
                            metal_signal=frame_metal, chalcogen_signal=frame_chalcogen), decision)


def _bins(centres: np.ndarray, size: float) -> np.ndarray:
    """Integer bin of each centre on a square grid of side ``size``, as one index."""
    ij = np.floor(centres / size).astype(np.int64)
    ij -= ij.min(axis=0)
    return ij[:, 1] * (int(ij[:, 0].max()) + 1) + ij[:, 0]


def _bin_medians(bins: np.ndarray, values: np.ndarray, use: np.ndarray, statistic=np.median) -> np.ndarray:
    """``statistic`` (median) of ``values`` over the used cells of each bin (NaN where fewer than MIN_BIN_CELLS)."""
    out = np.full(int(bins.max()) + 1, np.nan)
    order = np.argsort(bins[use], kind='stable')
    sorted_bins = bins[use][order]
    sorted_values = values[use][order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_bins) > 0])
    ends = np.r_[starts[1:], len(sorted_bins)]
    for start, end in zip(starts, ends):
        if end - start >= MIN_BIN_CELLS:
            out[sorted_bins[start]] = float(statistic(sorted_values[start:end]))
    return out


def _lookup(bins: np.ndarray, medians: np.ndarray, fallback: float) -> np.ndarray:
    values = medians[bins]
    return np.where(np.isfinite(values), values, fallback)


def _neighbour_pairs(centres: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j, of centres closer than ``radius`` (grid hashing, no tree)."""
    cell = np.floor(centres / radius).astype(np.int64)
    key = cell[:, 0] * 1_000_003 + cell[:, 1]
    order = np.argsort(key, kind='stable')
    sorted_keys = key[order]
    firsts, seconds = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            target = (cell[:, 0] + dx) * 1_000_003 + (cell[:, 1] + dy)
            lo = np.searchsorted(sorted_keys, target, 'left')
            hi = np.searchsorted(sorted_keys, target, 'right')
            counts = hi - lo
            if not counts.any():
                continue
            i = np.repeat(np.arange(len(centres)), counts)
            j = order[np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])]
            firsts.append(i)
            seconds.append(j)
    i = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    j = np.concatenate(seconds) if seconds else np.zeros(0, np.int64)
    close = (i != j) & (np.hypot(*(centres[i] - centres[j]).T) < radius)
    return i[close], j[close]


def _spread_to_neighbours(flags: np.ndarray, centres: np.ndarray, lattice_px: float) -> np.ndarray:
    if not flags.any():
        return flags
    i, j = _neighbour_pairs(centres, 1.25 * lattice_px)
    spread = flags.copy()
    spread[i[flags[j]]] = True
    return spread


def _empty_clusters(empty: np.ndarray, centres: np.ndarray, lattice_px: float) -> np.ndarray:
    """Empty cells with at least two empty neighbours: vacuum, not a double vacancy."""
    if not empty.any():
        return empty
    i, j = _neighbour_pairs(centres, 1.25 * lattice_px)
    counts = np.bincount(i[empty[j]], minlength=len(empty))
    return empty & (counts >= 2)


def _few_neighbours(centres: np.ndarray, lattice_px: float, valid: np.ndarray | None, boxes: np.ndarray) -> np.ndarray:
    """Cells with under 60 % of their six lattice neighbours found, counting only neighbours whose
    cell would lie inside the readable frame (so the frame's own border is not an edge)."""
    i, _ = _neighbour_pairs(centres, 1.25 * lattice_px)
    found = np.bincount(i, minlength=len(centres))
    steps = lattice_px * np.array([[1, 0], [-1, 0], [0.5, math.sqrt(3) / 2], [-0.5, math.sqrt(3) / 2],
                                   [0.5, -math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])
    size = np.median(boxes[:, 2:] - boxes[:, :2], axis=0) / 2 if len(boxes) else np.zeros(2)
    possible = np.zeros(len(centres))
    for step in steps:
        other = centres + step
        if valid is None:
            possible += 1
            continue
        H, W = valid.shape
        inside = np.ones(len(centres), bool)
        for corner in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
            x = np.rint(other[:, 0] + corner[0] * size[0]).astype(np.int64)
            y = np.rint(other[:, 1] + corner[1] * size[1]).astype(np.int64)
            ok = (x >= 0) & (x < W) & (y >= 0) & (y < H)
            inside &= ok
            inside[ok] &= valid[y[ok], x[ok]]
        possible += inside
    return found < 0.6 * possible


def calibrated_crops(canonical: np.ndarray, boxes: np.ndarray, calibration: CellCalibration, metal_site: str,
                     size: int) -> np.ndarray:
    """Classifier input (N, 2, size, size): chalcogen half then metal half of each unit cell, background
    removed and each half divided by its sublattice's local reference (a perfect cell peaks near 1 in both).

    A cell whose metal is at Q is turned by 180 degrees first, so the chalcogen column always lies in the
    left half at the bottom and the metal in the right half at the top.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    H, W = canonical.shape
    out = np.zeros((len(boxes), 2, size, size), dtype=np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        xa, ya = int(np.clip(np.floor(x0), 0, W - 2)), int(np.clip(np.floor(y0), 0, H - 2))
        xb, yb = int(np.clip(np.ceil(x1), xa + 2, W)), int(np.clip(np.ceil(y1), ya + 2, H))
        crop = canonical[ya:yb, xa:xb] - np.float32(calibration.background[k])
        if metal_site == 'Q':
            crop = crop[::-1, ::-1]
        middle = crop.shape[1] // 2
        floor = 1e-6
        chalcogen = crop[:, :middle] / np.float32(max(calibration.chalcogen_reference[k], floor))
        metal = crop[:, middle:] / np.float32(max(calibration.metal_reference[k], floor))
        out[k, 0] = cv2.resize(np.ascontiguousarray(chalcogen), (size, size), interpolation=cv2.INTER_AREA)
        out[k, 1] = cv2.resize(np.ascontiguousarray(metal), (size, size), interpolation=cv2.INTER_AREA)
    return out

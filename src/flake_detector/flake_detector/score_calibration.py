"""Scores of the optical detector that are probabilities.

The detector's raw score multiplies how well a region's colour fits its material's classes,
its size and the material's posterior against every other material; it orders detections
well but promises nothing. ``ScoreMap`` turns it into the probability that a detection is
right (a flake of that material, mask IoU >= 0.5 with it): an isotonic (monotone) fit of
correctness against the raw score, made on simulated frames of seeds that no bench scores
on (``fit_score_map``), shipped as ``models/contrast_score.json`` and applied by the
detector. ``reliability_table`` checks it on fresh seeds: within each band of scores the
share of right detections should match the band's mean score.

    python bench/bench_score_reliability.py --write    # refits the shipped map, prints the table
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).resolve().parent / 'models' / 'contrast_score.json'


@dataclass(frozen=True)
class ScoreMap:
    """Piecewise-linear monotone map from raw score to probability."""

    raw: tuple[float, ...]
    probability: tuple[float, ...]
    source: str = ''

    def __call__(self, raw_score: float) -> float:
        return float(np.interp(raw_score, self.raw, self.probability))

    def save(self, path: Path | str = SHIPPED, **about) -> Path:
        path = Path(path)
        path.write_text(json.dumps({'raw': list(self.raw), 'probability': list(self.probability),
                                    'source': self.source, **about}, indent=1) + '\n')
        return path

    @classmethod
    def load(cls, path: Path | str = SHIPPED) -> ScoreMap:
        try:
            data = json.loads(Path(path).read_text())
            raw, probability = tuple(map(float, data['raw'])), tuple(map(float, data['probability']))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f'cannot read score map {path}: {exc}') from None
        if len(raw) != len(probability) or len(raw) < 2 or list(raw) != sorted(raw):
            raise ValueError(f'score map {path}: raw scores must be increasing, one probability each')
        return cls(raw, probability, str(data.get('source', '')))

    @classmethod
    def identity(cls) -> ScoreMap:
        return cls((0.0, 1.0), (0.0, 1.0), 'identity')


def isotonic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing fit of ``y`` (ordered by ``x``) with least squares."""
    order = np.argsort(x, kind='stable')
    values, weights, counts = [], [], []
    for v in np.asarray(y, dtype=float)[order]:
        values.append(v)
        weights.append(1.0)
        counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            weights[-2] = w
            counts[-2] += counts[-1]
            del values[-1], weights[-1], counts[-1]
    fitted = np.repeat(values, counts)
    out = np.empty(len(fitted))
    out[order] = fitted
    return out


def fit_score_map(raw: np.ndarray, correct: np.ndarray, knots: int = 12, source: str = '') -> ScoreMap:
    """The monotone map from ``raw`` scores to the share of ``correct`` detections, at knots
    spread by quantile (each knot averages the isotonic fit around it), from 0 to 1."""
    raw = np.asarray(raw, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if len(raw) < 20:
        raise ValueError(f'{len(raw)} detections are too few to fit a score map')
    fitted = isotonic(raw, correct)
    edges = np.unique(np.quantile(raw, np.linspace(0.0, 1.0, knots + 1)))
    xs, ys = [0.0], [0.0]
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (raw >= low) & (raw <= high)
        if inside.any():
            xs.append(float(raw[inside].mean()))
            ys.append(float(fitted[inside].mean()))
    xs.append(1.0)
    ys.append(max(ys[-1], float(fitted[raw >= edges[-2]].mean()) if len(edges) > 1 else ys[-1]))
    ys = np.maximum.accumulate(ys)
    keep = np.concatenate([[True], np.diff(xs) > 1e-9])
    return ScoreMap(tuple(np.asarray(xs)[keep]), tuple(float(v) for v in np.asarray(ys)[keep]), source)


def reliability_table(score: np.ndarray, correct: np.ndarray, edges=(0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9, 1.0001)
                      ) -> list[dict]:
    """Per band of scores: detections, mean score (what the score promises) and the share right."""
    score = np.asarray(score, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    rows = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (score >= low) & (score < high)
        rows.append({'band': (low, min(high, 1.0)), 'detections': int(inside.sum()),
                     'mean_score': float(score[inside].mean()) if inside.any() else None,
                     'right': float(correct[inside].mean()) if inside.any() else None})
    return rows

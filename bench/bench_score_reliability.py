"""Are the optical detector's scores probabilities? A reliability table on fresh simulator seeds.

A detection is right when its mask overlaps a true flake of its material with IoU >= 0.5. The
score map (flake_detector/models/contrast_score.json) is fitted on seeds 31-33 (simulated
chips of the four materials, half the flakes thin, frames centred near flakes, the default
microscope and three randomised looks read through their own calibration); the table is made
on seeds 41-42, which nothing was fitted on: per band of scores, the share of right detections
against the band's mean score, and precision and recall at the default cut (0.5) against what
the scores above it promise (their mean).

    python bench/bench_score_reliability.py [--write] [--frames N] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

FIT_SEEDS = (31, 32, 33)
FRESH_SEEDS = (41, 42)
MATERIALS = ('graphene', 'hbn', 'mos2', 'wte2')
MIN_AREA_PX = 60


def _scored(seed: int, frames: int, raw: bool) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Scores and rightness of every detection on ``frames`` frames of ``seed`` (a default
    microscope for even seeds, a randomised look otherwise), and flakes found / present."""
    from flake_core.calibration import Calibration
    from flake_detector.cascade_train import simulated_frames
    from flake_detector.optical import OpticalDetector
    from flake_detector.score_calibration import ScoreMap
    from flake_scanner.sim.randomise import SimLook, random_look

    look = SimLook('default') if seed % 2 == 0 else random_look(seed)
    scores, right = [], []
    found = total = 0
    detector = None
    for image, _, truth in simulated_frames(seed, frames, 768, 0.5, look.oxide_nm, '10x', chip_mm=3.0,
                                            material_mix={m: 1.0 for m in MATERIALS}, look=look, with_truth=True):
        if detector is None:
            # The look's own calibration: its oxide and camera (what flake-calibrate would fit).
            from flake_scanner.sim.camera import CameraSettings

            settings = look.camera_settings(CameraSettings())
            calibration = Calibration(oxide_nm=look.oxide_nm, camera=settings.response(1.0), name=look.name)
            detector = OpticalDetector(materials=','.join(MATERIALS), calibration=str(_save(calibration)),
                                       max_layers=40, min_area_px=MIN_AREA_PX, work_size=0,
                                       score_map=ScoreMap.identity() if raw else None)
        flakes = [o for o in truth.flakes if o.area_px >= MIN_AREA_PX and o.layers <= 40]
        detections = [d for d in detector.detect(image).detections if d.material != 'unknown']
        hit = set()
        for det in detections:
            full = det.full_mask(image.shape[:2])
            best = None
            for k, flake in enumerate(flakes):
                if flake.material != det.material:
                    continue
                if (full & flake.mask).sum() >= 0.5 * (full | flake.mask).sum():
                    best = k
                    break
            scores.append(det.score)
            right.append(best is not None)
            if best is not None:
                hit.add(best)
        found += len(hit)
        total += len(flakes)
    return np.array(scores), np.array(right), found, total


def _save(calibration):
    from pathlib import Path
    import tempfile

    path = Path(tempfile.mkdtemp(prefix='score-')) / 'look.json'
    return calibration.save(path)


def main() -> int:
    from flake_detector.score_calibration import SHIPPED, ScoreMap, fit_score_map, reliability_table

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--write', action='store_true', help='refit the shipped score map on seeds 31-33')
    parser.add_argument('--frames', type=int, default=40, help='frames per seed')
    parser.add_argument('--quick', action='store_true', help='10 frames per seed')
    args = parser.parse_args()
    frames = 10 if args.quick else args.frames
    started = time.perf_counter()
    if args.write:
        raw, right = [], []
        for seed in FIT_SEEDS:
            s, r, _, _ = _scored(seed, frames, raw=True)
            raw.append(s)
            right.append(r)
        fitted = fit_score_map(np.concatenate(raw), np.concatenate(right),
                               source=f'bench/bench_score_reliability.py --write: seeds {FIT_SEEDS}, {frames} '
                                      f'frames each, {len(np.concatenate(raw))} detections')
        fitted.save(SHIPPED, materials=list(MATERIALS), fit_seeds=list(FIT_SEEDS))
        print(f'[bench] wrote {SHIPPED} ({time.perf_counter() - started:.0f} s)', file=sys.stderr)
    mapped = ScoreMap.load(SHIPPED)
    lines = ['### Reliability of the optical detector\'s scores, fresh seeds ' + ', '.join(map(str, FRESH_SEEDS)), '',
             f'Map: {mapped.source}.', '',
             '| scores | detections | mean score (promised) | right |', '|---|---|---|---|']
    scores, right, found, total = [], [], 0, 0
    for seed in FRESH_SEEDS:
        s, r, f, t = _scored(seed, frames, raw=False)
        scores.append(s)
        right.append(r)
        found += f
        total += t
    scores, right = np.concatenate(scores), np.concatenate(right)
    for row in reliability_table(scores, right):
        low, high = row['band']
        promised = '-' if row['mean_score'] is None else f'{row["mean_score"]:.2f}'
        share = '-' if row['right'] is None else f'{row["right"]:.2f}'
        lines.append(f'| {low:.1f}-{high:.1f} | {row["detections"]} | {promised} | {share} |')
    cut = scores >= 0.5
    lines += ['', f'At the default cut 0.5: {int(cut.sum())} detections, precision {right[cut].mean():.2f} '
                  f'(the scores promise {scores[cut].mean():.2f}); all {len(scores)} detections: '
                  f'{right.mean():.2f} right, scores promise {scores.mean():.2f}; '
                  f'{found} of {total} flakes of 1-40 layers found by some detection.',
              f'({time.perf_counter() - started:.0f} s)']
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())

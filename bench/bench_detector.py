"""Detector bench: optical (contrast) detector and cascade on a fresh simulator seed, and
both on the real micrographs of ../shared/data/real_images_2dmatgmm.

Prints Markdown tables:
- optical: graphene 1-3 layers on 90 nm SiO2, COCO AP50 (boxes and masks); exact layer
  count on matched graphene 1-5 layer flakes; frames/s at 1024 x 1024;
- cascade: the funnel of Greplova et al. (2020), Fig. 2 (candidates left and truly good after each
  net) on a natural scan (the simulator's default chip, where thin flakes are rare; three
  times as many frames, for the rare good ones) and on frames centred on flakes; the
  share of candidates removed (Greplova et al.'s figure, which depends on how rare good ones
  are), of bad candidates removed and of good ones kept (which do not); frames/s with
  candidate finding;
- real micrographs: detections per image; overlays written to docs/img/.

Speeds are given per CPU second (process time, what one dedicated core would give;
torch and OpenCV threads add up into it) and in wall time on this machine as it was.

The simulator seeds used for training the shipped cascades are 1, 2, 3; this bench
evaluates on seed 7 (and 8 for the natural scan), which no model saw.

    python bench/bench_detector.py [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
import time

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REAL_DIR = ROOT.parent / 'shared' / 'data' / 'real_images_2dmatgmm'
IMG_DIR = ROOT / 'docs' / 'img'
EVAL_SEED = 7
SCAN_SEED = 8
MIN_AREA_PX = 60  # flakes smaller than this (about 20 um^2 at 10x) are of no use and not scored


def _frames(seed, count, thin_fraction, material_mix=None, centred=True):
    from flake_detector.cascade_train import simulated_frames

    if centred:
        yield from simulated_frames(seed, count, 1024, thin_fraction, 90.0, '10x', chip_mm=3.0,
                                    material_mix=material_mix)
        return
    # A natural scan: a raster of adjacent frames over part of the chip.
    from flake_detector.cascade_train import TruthObject, _mask_centre
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    side = int(np.ceil(np.sqrt(count)))
    chip = 4e-3
    while True:
        # Cells are generated from their own seeds: a larger chip only adds cells.
        wafer = VirtualWafer.generate(WaferConfig(seed=seed, thin_fraction=thin_fraction, chip_width_m=chip,
                                                  chip_height_m=chip))
        camera = CameraModel(wafer, CameraSettings(width=1024, height=1024, seed=seed))
        fov = camera.field_of_view[0]
        if 1e-3 + side * fov <= chip:
            break
        chip = 1e-3 + side * fov
    for k in range(count):
        row, col = divmod(k, side)
        wx, wy = 0.5e-3 + (col + 0.5) * fov, 0.5e-3 + (row + 0.5) * fov
        x, y = wafer.wafer_to_stage.apply(wx, wy)
        truth = camera.ground_truth(x, y)
        objects = [TruthObject(o.material, float(o.layers), float(o.thickness_nm), float(o.area_px),
                               _mask_centre(o.mask)) for o in truth.flakes]
        yield camera.render(x, y), objects, truth


def _coco_from(frames_with_truth):
    """COCO ground truth dict from simulator FrameTruths (flakes only)."""
    from flake_detector.detection import encode_rle

    images, annotations = [], []
    for image_id, (image, truth) in enumerate(frames_with_truth, start=1):
        images.append({'id': image_id, 'width': image.shape[1], 'height': image.shape[0]})
        for obj in truth.flakes:
            annotations.append({
                'id': len(annotations) + 1, 'image_id': image_id, 'category_id': 1, 'iscrowd': 0,
                'bbox': [float(v) for v in obj.bbox], 'area': float(obj.area_px),
                'segmentation': encode_rle(obj.mask), 'is_contaminant': False,
                'attributes': {'material': obj.material, 'layers': int(obj.layers)}})
    return {'images': images, 'annotations': annotations, 'categories': [{'id': 1, 'name': 'flake'}]}


def _sim_with_truth(seed, count, material_mix, thin_fraction):
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    extra = {'material_mix': material_mix} if material_mix else {}
    wafer = VirtualWafer.generate(WaferConfig(seed=seed, thin_fraction=thin_fraction, chip_width_m=3e-3,
                                              chip_height_m=3e-3, **extra))
    camera = CameraModel(wafer, CameraSettings(width=1024, height=1024, seed=seed))
    rng = np.random.default_rng([seed, 0xBE7C])
    flakes = [o for o in wafer.flakes() if 0.2e-3 < o.centre[0] < 2.8e-3 and 0.2e-3 < o.centre[1] < 2.8e-3]
    out = []
    for _ in range(count):
        centre = np.array(flakes[int(rng.integers(len(flakes)))].centre)
        centre = centre + rng.uniform(-0.3, 0.3, 2) * np.array(camera.field_of_view)
        x, y = wafer.wafer_to_stage.apply(float(centre[0]), float(centre[1]))
        out.append((camera.render(x, y), camera.ground_truth(x, y)))
    return out


def bench_optical(frames: int) -> list[str]:
    from flake_detector.evaluation import (
        coco_ap,
        detections_to_predictions,
        match_image,
        select_predictions,
        select_truth,
    )
    from flake_detector.optical import OpticalDetector

    lines = ['### Optical detector (contrast backend, no training), simulator seed '
             f'{EVAL_SEED}, 90 nm SiO2, 1024 x 1024 frames at 10x', '',
             '| chip | frames | GT graphene 1-3L | box AP50 | mask AP50 | mask AP | '
             'exact layers (1-5L matched) | frames/s (CPU time) | frames/s (wall) |',
             '|---|---|---|---|---|---|---|---|---|']
    # A chip of one material is matched against its calibration; a chip of mixed materials
    # against all four (a thin WTe2 or MoS2 flake would pass for few-layer graphene otherwise).
    for label, mix, materials in (('graphene only', {'graphene': 1.0}, ['graphene']),
                                  ('all four materials', None, ['graphene', 'hbn', 'mos2', 'wte2'])):
        data = _sim_with_truth(EVAL_SEED, frames, mix, 0.5)
        detector = OpticalDetector(materials=materials, oxide_nm=90.0, calibration='auto', max_layers=10,
                                   min_area_px=40, work_size=0)
        gt = _coco_from(data)
        detector.detect(data[0][0])  # warm-up (lazy imports, caches): steady-state speed below
        predictions, seconds, cpu = [], 0.0, 0.0
        for image_id, (image, _) in enumerate(data, start=1):
            t0, c0 = time.perf_counter(), time.process_time()
            result = detector.detect(image)
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            predictions += detections_to_predictions(image_id, result.detections, image.shape[0], image.shape[1])
        truth = select_truth(gt, 'graphene', 1, 3, MIN_AREA_PX)
        preds = select_predictions(predictions, 'graphene', 1, 3, MIN_AREA_PX)
        box, segm = coco_ap(gt, truth, preds, 'bbox'), coco_ap(gt, truth, preds, 'segm')
        # Layer count: every detection against graphene flakes of 1-5 layers.
        thin = select_truth(gt, 'graphene', 1, 5, MIN_AREA_PX)
        exact = matched = 0
        for image in gt['images']:
            t = [a for a in thin if a['image_id'] == image['id']]
            p = [q for q in predictions if q['image_id'] == image['id']]
            for ti, pi, _ in match_image(t, p, image['height'], image['width'], 0.5):
                matched += 1
                exact += round(p[pi]['layers']) == t[ti]['attributes']['layers']
        lines.append(f'| {label} | {len(data)} | {len(truth)} | {box["AP50"]:.3f} | {segm["AP50"]:.3f} | '
                     f'{segm["AP"]:.3f} | {exact}/{matched} = {exact / max(1, matched):.1%} | '
                     f'{len(data) / cpu:.1f} | {len(data) / seconds:.1f} |')
        print(f'[bench] optical {label} done', file=sys.stderr, flush=True)
    return lines


def _funnel(detector, frames) -> tuple[list[int], list[int], float, int]:
    from flake_detector.cascade_train import label_candidates

    left_total = None
    good_total = None
    seconds = cpu = 0.0
    count = 0
    all_scores, all_labels = [], []
    frames = list(frames)
    detector.classify(frames[0][0])  # warm-up
    for image, objects, truth in frames:
        to_wafer = getattr(truth, 'pixel_to_wafer', truth)
        t0, c0 = time.perf_counter(), time.process_time()
        candidates, accepted, scores, funnel = detector.classify(image, to_wafer)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        count += 1
        labels = label_candidates(candidates, objects, detector.cascade.target)
        all_scores.append(np.where(accepted, scores, 0.0))
        all_labels.append(labels)
        # Good left after each stage: rerun the nets' order on this frame's verdicts.
        alive = np.ones(len(candidates), dtype=bool)
        goods = [int(labels.sum())]
        crops = detector.finder.crops(image, candidates)
        for k in range(len(detector.cascade.nets)):
            if alive.any():
                p = detector.cascade.probabilities(crops[alive], k)
                idx = np.nonzero(alive)[0]
                alive[idx[p < detector.cascade.threshold]] = False
            goods.append(int(labels[alive].sum()))
        lefts = [f.remaining for f in funnel]
        left_total = lefts if left_total is None else [a + b for a, b in zip(left_total, lefts, strict=True)]
        good_total = goods if good_total is None else [a + b for a, b in zip(good_total, goods, strict=True)]
    sweep = (np.concatenate(all_scores), np.concatenate(all_labels))
    return left_total, good_total, (seconds, cpu), count, sweep


def _summary_row(label, threshold, candidates, good, left, good_left, speed) -> str:
    """One line of the funnel summary: removed (Greplova et al.'s figure, which depends on how
    rare the good candidates are), and the two shares that do not: bad removed, good kept."""
    bad, bad_left = candidates - good, left - good_left
    return (f'| {label} | {threshold} | {1 - left / max(1, candidates):.1%} | {1 - bad_left / max(1, bad):.1%} | '
            f'{good_left / max(1, good):.1%} ({good_left}/{good}) | {good_left / max(1, left):.1%} | {speed} |')


def bench_cascade(frames: int) -> list[str]:
    import torch

    from flake_detector.cascade import CascadeDetector, shipped_model

    torch.set_num_threads(2)
    lines = []
    for target in ('graphene-1-10L', 'hbn-10-90nm'):
        if not shipped_model(target).is_file():
            lines.append(f'(no shipped weights for {target}; train them with flake-train-cascade)')
            continue
        detector = CascadeDetector(target=target)
        lines += ['', f'### Cascade `{target}` ({detector.model_version}), fresh simulator seeds', '',
                  '| frames | stage | candidates left | truly good |', '|---|---|---|---|']
        summary = []
        for label, seed, thin, centred, count in (('natural scan', SCAN_SEED, 0.0, False, 3 * frames),
                                                  ('centred on flakes', EVAL_SEED, 0.5, True, frames)):
            left, good, seconds, count, (scores, labels) = _funnel(detector, _frames(seed, count, thin,
                                                                                       centred=centred))
            names = ['candidates'] + [f'after net {k + 1}' for k in range(len(left) - 1)]
            for name, n_left, n_good in zip(names, left, good, strict=True):
                lines.append(f'| {label} ({count}) | {name} | {n_left} | {n_good} |')
            summary.append(_summary_row(label, 0.5, left[0], good[0], left[-1], good[-1],
                                        f'{count / seconds[1]:.1f} | {count / seconds[0]:.1f}'))
            # A stricter threshold (every net must be surer) trades kept good flakes for removal.
            for threshold in (0.8, 0.95):
                passed = scores >= threshold
                summary.append(_summary_row(label, threshold, len(scores), int((labels == 1).sum()),
                                            int(passed.sum()), int((passed & (labels == 1)).sum()), ' | '))
            print(f'[bench] cascade {target} {label} done', file=sys.stderr, flush=True)
        lines += ['', '| frames | threshold | candidates removed | bad candidates removed | good kept | '
                      'precision after the cascade | frames/s finder + nets (CPU time) | (wall) |',
                  '|---|---|---|---|---|---|---|---|', *summary,
                  '| Greplova et al. (2020) (hBN, real scans) | - | 99 % | - | - | 55 % | - | - |']
    return lines


def bench_real() -> list[str]:
    from flake_detector.cascade import CascadeDetector, shipped_model
    from flake_detector.cli import draw_overlay
    from flake_detector.optical import OpticalDetector

    files = sorted(REAL_DIR.glob('*.jpg'))
    if not files:
        return [f'(no real micrographs in {REAL_DIR})']
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    optical = OpticalDetector(materials=['graphene'], calibration='measured', max_layers=10, work_size=0)
    cascade = CascadeDetector(target='graphene-1-10L') if shipped_model('graphene-1-10L').is_file() else None
    lines = ['', '### Real micrographs (2DMatGMM, graphene on SiO2/Si, 1920 x 1200)', '',
             '| image | optical: flakes (1L / 2L / 3L+) | ms | cascade: candidates -> accepted | ms | overlay |',
             '|---|---|---|---|---|---|']
    for k, path in enumerate(files):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        t0 = time.perf_counter()
        result = optical.detect(image)
        t_opt = time.perf_counter() - t0
        layers = [round(d.layers) for d in result.detections]
        split = f'{len(layers)} ({layers.count(1)} / {layers.count(2)} / {sum(n >= 3 for n in layers)})'
        overlay = draw_overlay(image, [d for d in result.detections if d.score >= 0.3])
        cascade_text, t_cas = '-', 0.0
        if cascade is not None:
            t0 = time.perf_counter()
            cres = cascade.detect(image)
            t_cas = time.perf_counter() - t0
            cascade_text = f'{cres.candidates} -> {len(cres.detections)}'
            for det in cres.detections:
                x, y, w, h = det.bbox
                cv2.rectangle(overlay, (x, y), (x + w, y + h), (255, 0, 255), 2)
        name = f'detector_real_{k}.jpg'
        small = cv2.resize(overlay, (overlay.shape[1] // 2, overlay.shape[0] // 2), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(IMG_DIR / name), small, [cv2.IMWRITE_JPEG_QUALITY, 80])
        lines.append(f'| {path.name[:8]} | {split} | {t_opt * 1e3:.0f} | {cascade_text} | {t_cas * 1e3:.0f} | '
                     f'![](img/{name}) |')
    print('[bench] real micrographs done', file=sys.stderr, flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='fewer frames (a smoke run)')
    parser.add_argument('--frames', type=int, default=None, help='simulated frames per table')
    parser.add_argument('--only', choices=('optical', 'cascade', 'real'), default=None, help='one part of the bench')
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    frames = args.frames or (6 if args.quick else 30)
    lines = ['## Detector bench', '']
    if args.only in (None, 'optical'):
        lines += bench_optical(frames)
    print('\n'.join(lines), flush=True)  # tables as they complete: the bench is long
    rest = []
    if args.only in (None, 'cascade'):
        rest += bench_cascade(frames)
    if args.only in (None, 'real'):
        rest += bench_real()
    print('\n'.join(rest))
    return 0


if __name__ == '__main__':
    sys.exit(main())

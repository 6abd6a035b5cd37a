"""Mask R-CNN bench: seed 002 Table 1, seed 001 illumination robustness, CPU speed, real overlays.

Prints Markdown tables:
1. COCO AP, AP50, AP75 of boxes and masks per material on a fresh simulator seed, in the
   layout of seed 002 Table 1: the baseline RPN against the soft-label RPN, both trained
   on the same data with 30 % of the flake annotations removed at random;
2. AP50 (boxes) on graphene at illumination intensity 1.0, 0.8 and 0.4 for the
   shipped maskrcnn, the optical (contrast) detector and the cascade (seed 001 Fig. 2);
3. milliseconds per 1024 x 1024 frame on the CPU (one thread), at the model's tile
   size and with the whole frame as one tile;
4. detections on the real micrographs of ../shared/data/real_images_2dmatgmm, with an
   overlay picture written to docs/img/maskrcnn_real.jpg.

The two Table 1 models come from `make train-maskrcnn-ablation` (data/maskrcnn/runs/
base30 and soft30; see docs/maskrcnn.md); the shipped model from `make train-maskrcnn`.
Training data are simulator seeds 11 (train) and 12 (validation); this bench renders
seed 99, which no model saw.

    python bench/bench_maskrcnn.py [--frames 8] [--robust-frames 6] [--runs data/maskrcnn/runs] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
import time

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
REAL_DIR = ROOT.parent / 'shared' / 'data' / 'real_images_2dmatgmm'
IMG_DIR = ROOT / 'docs' / 'img'
EVAL_SEED = 99
MATERIALS = ['graphene', 'hbn', 'mos2', 'wte2']
SHORT = {'graphene': 'G', 'hbn': 'BN', 'mos2': 'M', 'wte2': 'W'}
MIN_AREA_PX = 60  # as bench_detector: smaller flakes are of no use and not scored
INTENSITIES = (1.0, 0.8, 0.4)


def render_frames(seed: int, count: int, intensities=(1.0,), size: int = 1024):
    """COCO ground truth and {intensity: [BGR frames]} of a fresh simulated chip."""
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.cli import dataset_positions
    from flake_scanner.sim.coco import FrameRecord, frames_to_coco
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    wafer = VirtualWafer.generate(WaferConfig(seed=seed, thin_fraction=0.5))
    camera = CameraModel(wafer, CameraSettings(width=size, height=size, seed=seed))
    positions = dataset_positions(camera, count, 0.0, seed)
    records, frames = [], {s: [] for s in intensities}
    for index, x, y in positions:
        records.append(FrameRecord(f'{index:04d}.png', camera.ground_truth(x, y)))
        for scale in intensities:
            camera.with_settings(intensity=scale)
            frames[scale].append(camera.render(x, y))
    return frames_to_coco(records), frames


def predictions_of(detector, frames) -> tuple[list[dict], float]:
    from flake_detector.evaluation import detections_to_predictions

    predictions, seconds = [], 0.0
    for image_id, frame in enumerate(frames, start=1):
        started = time.perf_counter()
        detections = detector.detect(frame).detections
        seconds += time.perf_counter() - started
        predictions += detections_to_predictions(image_id, detections, *frame.shape[:2])
    return predictions, seconds / max(len(frames), 1)


def evaluate(gt, predictions, materials):
    """COCO metrics on flakes of 1-40 layers; the range is applied to the truth only, since a
    detection without a refined layer count (or a Mask R-CNN class) has no count to filter on."""
    from flake_detector.evaluation import evaluate as coco_evaluate

    flakes = dict(gt, annotations=[a for a in gt['annotations'] if a.get('is_contaminant')
                                   or (a.get('attributes') or {}).get('layers', 0) <= 40])
    return coco_evaluate(flakes, predictions, materials=materials, min_area=MIN_AREA_PX)


def _pct(value) -> str:
    return '-' if value is None or value < 0 else f'{100 * value:.1f}'


def table1(runs: Path, frames: int, tile_size: int) -> str:
    from flake_detector.maskrcnn.infer import MaskRCNNDetector

    models = [('Baseline', runs / 'base30' / 'final.pt'), ('Ours (t = 0.8)', runs / 'soft30' / 'final.pt')]
    missing = [str(p) for _, p in models if not p.is_file()]
    if missing:
        return ('Table 1 skipped: missing ' + ', '.join(missing)
                + ' (train them with `make train-maskrcnn-ablation`).\n')
    gt, rendered = render_frames(EVAL_SEED, frames)
    results = {}
    for name, path in models:
        detector = MaskRCNNDetector(path, score_threshold=0.01, tile_size=tile_size, refine_thickness=False)
        predictions, _ = predictions_of(detector, rendered[1.0])
        results[name] = evaluate(gt, predictions, MATERIALS)
    lines = [f'Seed 002 Table 1 layout: simulator seed {EVAL_SEED}, {frames} frames of 1024 x 1024, flakes of '
             f'1-40 layers and >= {MIN_AREA_PX} px; both models trained with 30 % of the annotations removed.',
             '', '| Type | Method | GT | box AP50 | box AP75 | box AP | mask AP50 | mask AP75 | mask AP |',
             '|---|---|---|---|---|---|---|---|---|']
    for material in [*MATERIALS, 'all']:
        for name, metrics in results.items():
            m = metrics['materials'][material]
            box, segm = m['bbox'], m['segm'] or {}
            lines.append(f'| {SHORT.get(material, "all")} | {name} | {m["ground_truth"]} | '
                         f'{_pct(box["AP50"])} | {_pct(box["AP75"])} | {_pct(box["AP"])} | '
                         f'{_pct(segm.get("AP50"))} | {_pct(segm.get("AP75"))} | {_pct(segm.get("AP"))} |')
    return '\n'.join(lines) + '\n'


def robustness(frames: int, tile_size: int, model: str) -> str:
    from flake_detector.detection import make_detector

    gt, rendered = render_frames(EVAL_SEED + 1, frames, INTENSITIES)
    detectors = [('maskrcnn', lambda: make_detector('maskrcnn', model_path=model, tile_size=tile_size,
                                                       score_threshold=0.01)),
                 ('optical (contrast)', lambda: make_detector('contrast', materials='graphene')),
                 ('cascade', lambda: make_detector('cascade'))]
    lines = [f'Seed 001 Fig. 2: graphene box AP50 (1-40 layers, >= {MIN_AREA_PX} px) under a dimmer lamp; '
             f'simulator seed {EVAL_SEED + 1}, {frames} frames; every detector keeps its settings.', '',
             '| detector | ' + ' | '.join(f'I = {s:.1f}' for s in INTENSITIES) + ' |',
             '|---|' + '---|' * len(INTENSITIES)]
    for name, build in detectors:
        try:
            detector = build()
        except (FileNotFoundError, ValueError) as exc:
            lines.append(f'| {name} | ' + ' | '.join('-' for _ in INTENSITIES) + f' | ({exc})')
            continue
        row = []
        for scale in INTENSITIES:
            predictions, _ = predictions_of(detector, rendered[scale])
            row.append(_pct(evaluate(gt, predictions, ['graphene'])['materials']['graphene']['bbox']['AP50']))
        lines.append(f'| {name} | ' + ' | '.join(row) + ' |')
    return '\n'.join(lines) + '\n'


def speed(repeats: int, model: str) -> str:
    from flake_detector.maskrcnn.infer import MaskRCNNDetector

    _, rendered = render_frames(EVAL_SEED + 2, repeats)
    lines = ['CPU ms is the process time of one thread (what a dedicated core takes); wall ms also counts '
             'waiting for a busy machine.', '',
             '| model | tile [px] | tiles per frame | CPU ms per 1024 x 1024 frame | wall ms |',
             '|---|---|---|---|---|']
    base = MaskRCNNDetector(model)
    for tile in (base.config.input_size, 512, 1024):
        detector = MaskRCNNDetector(model, tile_size=tile)
        detector.detect(rendered[1.0][0])  # warm-up
        cpu, wall, tiles = [], [], 0
        for frame in rendered[1.0]:
            started_cpu, started = time.process_time(), time.perf_counter()
            tiles = int(detector.detect(frame).timings['tiles'])
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started)
        lines.append(f'| {detector.model_version} | {tile} | {tiles} | {1000 * np.median(cpu):.0f} | '
                     f'{1000 * np.median(wall):.0f} |')
    return '\n'.join(lines) + '\n'


def real_overlays(tile_size: int, model: str, threshold: float) -> str:
    from flake_detector.maskrcnn.infer import MaskRCNNDetector

    paths = sorted(REAL_DIR.glob('*.jpg'))
    if not paths:
        return f'No real micrographs in {REAL_DIR}.\n'
    detector = MaskRCNNDetector(model, tile_size=tile_size, score_threshold=threshold)
    lines = [f'Score threshold {threshold}.', '', '| image | size | flakes found | by class |', '|---|---|---|---|']
    panels = []
    for path in paths:
        image = cv2.imread(str(path))
        detections = detector.detect(image).detections
        classes: dict[str, int] = {}
        overlay = image.copy()
        for det in detections:
            name = det.extra.get('network_class', det.material)
            classes[name] = classes.get(name, 0) + 1
            contours, _ = cv2.findContours(det.full_mask(image.shape[:2]).astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(overlay, contours, -1, (0, 0, 255), 3)
            x, y, _, _ = det.bbox
            cv2.putText(overlay, f'{name} {det.score:.2f}', (x, max(20, y - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.9,
                        (0, 0, 255), 2)
        lines.append(f'| {path.name[:8]} | {image.shape[1]}x{image.shape[0]} | {len(detections)} | '
                     + (', '.join(f'{k} {v}' for k, v in sorted(classes.items())) or '-') + ' |')
        panels.append(cv2.resize(overlay, (480, 300), interpolation=cv2.INTER_AREA))
    while len(panels) % 3:
        panels.append(np.full_like(panels[0], 255))
    grid = np.vstack([np.hstack(panels[i:i + 3]) for i in range(0, len(panels), 3)])
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(IMG_DIR / 'maskrcnn_real.jpg'), grid, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return '\n'.join(lines) + f'\n\nOverlays: docs/img/maskrcnn_real.jpg ({detector.model_version}).\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--frames', type=int, default=8, help='frames for Table 1')
    parser.add_argument('--robust-frames', type=int, default=6, help='frames per intensity for robustness')
    parser.add_argument('--speed-frames', type=int, default=2)
    parser.add_argument('--runs', type=Path, default=ROOT / 'data' / 'maskrcnn' / 'runs')
    parser.add_argument('--tile-size', type=int, default=1024,
                        help='inference tile for the AP tables (1024 = whole frame; the model is convolutional)')
    parser.add_argument('--model', default='', help='checkpoint for robustness/speed/real (default: shipped)')
    parser.add_argument('--real-threshold', type=float, default=0.15, help='score cut for the real overlays')
    parser.add_argument('--quick', action='store_true', help='2 frames each (smoke run)')
    parser.add_argument('--only', choices=('table1', 'robustness', 'speed', 'real'), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.frames = args.robust_frames = 2
        args.speed_frames = 1
    sections = {'table1': lambda: table1(args.runs, args.frames, args.tile_size),
                'robustness': lambda: robustness(args.robust_frames, args.tile_size, args.model),
                'speed': lambda: speed(args.speed_frames, args.model),
                'real': lambda: real_overlays(args.tile_size, args.model, args.real_threshold)}
    for name, section in sections.items():
        if args.only and name != args.only:
            continue
        started = time.monotonic()
        print(f'### Mask R-CNN: {name}\n', flush=True)
        print(section())
        print(f'({time.monotonic() - started:.0f} s)\n', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

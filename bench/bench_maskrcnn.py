"""Mask R-CNN bench: accuracy on fresh simulated chips, learning curve, proposal recall, CPU speed
(torch against ONNX Runtime), the soft-label ablation of Nguyen et al. (2022), the illumination
table of Masubuchi et al. (2020), and real micrographs.

Prints Markdown tables (each section on its own with ``--only``):
- ``ap``: box and mask AP, AP50, AP75 on two fresh simulator seeds (101, 102; no training or
  validation set uses them), flakes of 1-40 layers and >= 60 px, all materials: class-agnostic
  (is every flake found and outlined) and per material as the backend names them (the optical
  estimator's material); the material named right on matched flakes; the model before
  (``--before``, the previous shipped checkpoint) and after, with proposal recall at 300;
- ``curve``: box and mask AP50 of every kept epoch of the shipped run against iterations and
  CPU-minutes (``data/maskrcnn/runs/ship/epoch_*.pt``, from ``make train-maskrcnn``);
- ``speed``: milliseconds per 1024 x 1024 frame, torch and ONNX Runtime interleaved in one run;
- ``ablation``: Table 1 layout of Nguyen et al. (2022), baseline against soft-label RPN, both
  trained with 30 % of the annotations removed (``make train-maskrcnn-ablation``), mean and
  spread over the training seeds, on fresh seeds 103 and 104;
- ``illumination``: AP50 at lamp intensity 1.0, 0.8 and 0.4 for maskrcnn, the optical detector
  and the cascade on the same frames (seed 105);
- ``real``: overlays on ../shared/data/real_images_2dmatgmm (MIT, 2DMatGMM) and on
  ../shared/data/real_annotated_nbse2 (GPL-3.0, flakedetectron), with recall at IoU 0.5 on the
  annotated NbSe2 flakes.

    python bench/bench_maskrcnn.py [--frames 8] [--only ap|curve|speed|ablation|illumination|real]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / 'shared' / 'data'
REAL_DIR = SHARED_DATA / 'real_images_2dmatgmm'
NBSE2_DIR = SHARED_DATA / 'real_annotated_nbse2'
IMG_DIR = ROOT / 'docs' / 'img'
RUNS = ROOT / 'data' / 'maskrcnn' / 'runs'
BEFORE = ROOT / 'data' / 'maskrcnn' / 'before.pt'
AP_SEEDS = (101, 102)
ABLATION_SEEDS = (103, 104)
ILLUMINATION_SEED = 105
SPEED_SEED = 106
MATERIALS = ['graphene', 'hbn', 'mos2', 'wte2']
SHORT = {'graphene': 'G', 'hbn': 'BN', 'mos2': 'M', 'wte2': 'W', 'all': 'all'}
MIN_AREA_PX = 60  # as bench_detector: smaller flakes are of no use and not scored
MAX_LAYERS = 40
INTENSITIES = (1.0, 0.8, 0.4)
# Model pixels per frame pixel for the real sets: 2DMatGMM's 20x frames at about 0.39 um/px into
# a model trained at 0.55 um/px; the 150x NbSe2 frames so that their flakes (150-400 px) take
# the 30-80 px the simulated flakes have at 10x.
SCALE_2DMATGMM = 0.39 / 0.55
SCALE_NBSE2 = 0.2


def render_frames(seed: int, count: int, intensities=(1.0,), size: int = 1024, look=None):
    """COCO ground truth and {intensity: [BGR frames]} of a fresh simulated chip."""
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.cli import dataset_positions
    from flake_scanner.sim.coco import FrameRecord, frames_to_coco
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    if look is None:
        wafer = VirtualWafer.generate(WaferConfig(seed=seed, thin_fraction=0.5))
        camera = CameraModel(wafer, CameraSettings(width=size, height=size, seed=seed))
    else:
        wafer = VirtualWafer.generate(look.wafer_config(seed=seed, thin_fraction=0.5))
        camera = CameraModel(wafer, look.camera_settings(CameraSettings(width=size, height=size, seed=seed)))
    records, frames = [], {s: [] for s in intensities}
    for index, x, y in dataset_positions(camera, count, 0.0, seed):
        records.append(FrameRecord(f'{index:04d}.png', camera.ground_truth(x, y)))
        for scale in intensities:
            camera.with_settings(intensity=scale)
            frames[scale].append(camera.render(x, y))
    return frames_to_coco(records), frames


def merge_sets(sets):
    """One COCO dict and frame list from several (gt, list of frames) pairs, image ids renumbered."""
    gt = {'images': [], 'annotations': [], 'categories': sets[0][0]['categories']}
    frames = []
    for coco, rendered in sets:
        offset = len(gt['images'])
        gt['images'] += [dict(im, id=im['id'] + offset) for im in coco['images']]
        gt['annotations'] += [dict(a, id=len(gt['annotations']) + k + 1, image_id=a['image_id'] + offset)
                              for k, a in enumerate(coco['annotations'])]
        frames += rendered
    return gt, frames


def predictions_of(detector, frames) -> list[dict]:
    from flake_detector.evaluation import detections_to_predictions

    predictions = []
    for image_id, frame in enumerate(frames, start=1):
        predictions += detections_to_predictions(image_id, detector.detect(frame).detections, *frame.shape[:2])
    return predictions


def scored_truth(gt) -> list[dict]:
    from flake_detector.evaluation import select_truth

    return select_truth(gt, None, None, MAX_LAYERS, MIN_AREA_PX)


def agnostic_ap(gt, predictions, truth=None) -> dict:
    """Box and mask AP of every prediction against flakes of 1-40 layers, whatever the material."""
    from flake_detector.evaluation import coco_ap, select_predictions

    truth = scored_truth(gt) if truth is None else truth
    preds = select_predictions(predictions, min_area=MIN_AREA_PX)
    return {'bbox': coco_ap(gt, truth, preds, 'bbox'), 'segm': coco_ap(gt, truth, preds, 'segm'),
            'ground_truth': len(truth)}


def material_ap(gt, predictions, material) -> dict:
    """AP of one material: its flakes against the predictions the backend names that material."""
    from flake_detector.evaluation import annotation_material

    categories = {int(c['id']): c['name'] for c in gt['categories']}
    truth = [a for a in scored_truth(gt) if annotation_material(a, categories) == material]
    return agnostic_ap(gt, [p for p in predictions if p.get('material') == material], truth)


def material_accuracy(gt, predictions, score_threshold=0.5) -> tuple[int, int, int]:
    """(matched flakes, of them with the right material, of them called 'unknown')."""
    from flake_detector.evaluation import annotation_material, match_image

    categories = {int(c['id']): c['name'] for c in gt['categories']}
    truth = scored_truth(gt)
    matched = right = unknown = 0
    for image in gt['images']:
        t = [a for a in truth if a['image_id'] == image['id']]
        p = [q for q in predictions if q['image_id'] == image['id'] and q['score'] >= score_threshold]
        for ti, pi, _ in match_image(t, p, image['height'], image['width']):
            matched += 1
            right += p[pi].get('material') == annotation_material(t[ti], categories)
            unknown += p[pi].get('material') == 'unknown'
    return matched, right, unknown


def predictions_and_recall(detector, gt, frames, top=300, iou=0.5) -> tuple[list[dict], float]:
    """COCO predictions of every frame, and the share of scored flakes with a proposal at IoU >= ``iou``
    among the network's first ``top`` (from the same pass)."""
    from torchvision.ops import box_iou

    from flake_detector.evaluation import detections_to_predictions

    truth = scored_truth(gt)
    predictions, hit, total = [], 0, 0
    scale = detector.input_scale or detector.config.pixel_scale or 1.0
    for image_id, frame in enumerate(frames, start=1):
        predictions += detections_to_predictions(image_id, detector.detect(frame).detections, *frame.shape[:2])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                              (a['bbox'] for a in truth if a['image_id'] == image_id)], dtype=torch.float32)
        found = torch.cat([p[:top] for p in detector.last_proposals]) / scale
        total += len(boxes)
        if len(boxes) and len(found):
            hit += int((box_iou(boxes, found).max(dim=1).values >= iou).sum())
    return predictions, hit / max(total, 1)


def _pct(value) -> str:
    return '-' if value is None or value < 0 else f'{100 * value:.1f}'


def ap_section(frames: int, model: str, before: Path) -> str:
    from flake_detector.maskrcnn.infer import SHIPPED_MODEL, MaskRCNNDetector

    sets = {seed: render_frames(seed, frames) for seed in AP_SEEDS}
    models = [('after', Path(model) if model else SHIPPED_MODEL)]
    if before.is_file():
        models.insert(0, ('before', before))
    lines = [f'Simulator seeds {", ".join(map(str, AP_SEEDS))} (never used in training or validation), {frames} '
             f'frames of 1024 x 1024 each, default camera, flakes of 1-{MAX_LAYERS} layers and >= {MIN_AREA_PX} px '
             'of all four materials; the whole frame as one piece; score threshold 0.01 for AP. Class-agnostic: '
             'every flake against every detection. Recall@300: scored flakes with a proposal at IoU >= 0.5 '
             'among the first 300.', '',
             '| model | seed | GT | box AP50 | box AP75 | box AP | mask AP50 | mask AP75 | mask AP | recall@300 |',
             '|---|---|---|---|---|---|---|---|---|---|']
    per_material = {}
    for name, path in models:
        detector = MaskRCNNDetector(path, score_threshold=0.01, threads=2)
        version = detector.model_version
        for seed, (gt, rendered) in sets.items():
            predictions, recall = predictions_and_recall(detector, gt, rendered[1.0])
            metrics = agnostic_ap(gt, predictions)
            box, segm = metrics['bbox'], metrics['segm']
            lines.append(f'| {name} ({version}) | {seed} | {metrics["ground_truth"]} | {_pct(box["AP50"])} | '
                         f'{_pct(box["AP75"])} | {_pct(box["AP"])} | {_pct(segm["AP50"])} | {_pct(segm["AP75"])} | '
                         f'{_pct(segm["AP"])} | {_pct(recall)} |')
            if name == 'after':
                per_material[seed] = (gt, predictions)
    lines += ['', 'Per material, as the backend names them (the optical estimator\'s material on the class-agnostic '
              'model; a flake it calls by another material, or unknown, counts as missed):', '',
              '| seed | material | GT | box AP50 | mask AP50 | matched (score >= 0.5) | material right | unknown |',
              '|---|---|---|---|---|---|---|---|']
    for seed, (gt, predictions) in per_material.items():
        for material in MATERIALS:
            metrics = material_ap(gt, predictions, material)
            lines.append(f'| {seed} | {material} | {metrics["ground_truth"]} | {_pct(metrics["bbox"]["AP50"])} | '
                         f'{_pct(metrics["segm"]["AP50"])} | | | |')
        matched, right, unknown = material_accuracy(gt, predictions)
        lines.append(f'| {seed} | all | | | | {matched} | {right} ({_pct(right / max(matched, 1))} %) | '
                     f'{unknown} |')
    return '\n'.join(lines) + '\n'


def curve_section(frames: int, run: Path) -> str:
    from flake_detector.maskrcnn.infer import MaskRCNNDetector

    checkpoints = sorted(run.glob('epoch_*.pt'))
    if not checkpoints:
        return f'No epoch checkpoints in {run} (make train-maskrcnn keeps them).\n'
    gt, rendered = merge_sets([(g, f[1.0]) for g, f in (render_frames(seed, frames) for seed in AP_SEEDS)])
    lines = [f'Box and mask AP50 (class-agnostic, flakes of 1-{MAX_LAYERS} layers, >= {MIN_AREA_PX} px) on seeds '
             f'{", ".join(map(str, AP_SEEDS))}, {frames} frames each, of every kept epoch of {run.name}; CPU-minutes '
             'are the training process\'s CPU time (all its threads).', '',
             '| epoch | iterations | CPU-minutes | training loss | validation loss | box AP50 | mask AP50 |',
             '|---|---|---|---|---|---|---|']
    for path in checkpoints:
        card = json.loads(path.with_suffix('.json').read_text())
        metrics = card['metrics']
        detector = MaskRCNNDetector(path, score_threshold=0.01, threads=2, refine_thickness=False)
        result = agnostic_ap(gt, predictions_of(detector, rendered))
        lines.append(f'| {card["epochs_done"]} | {metrics.get("iterations", "-")} | '
                     f'{metrics.get("cpu_seconds", 0) / 60:.1f} | {metrics["loss"]:.3f} | '
                     f'{metrics.get("val_loss", float("nan")):.3f} | {_pct(result["bbox"]["AP50"])} | '
                     f'{_pct(result["segm"]["AP50"])} |')
    return '\n'.join(lines) + '\n'


def speed_section(repeats: int, model: str, threads: int) -> str:
    from flake_detector.maskrcnn.infer import MaskRCNNDetector

    _, rendered = render_frames(SPEED_SEED, repeats)
    frames = rendered[1.0]
    variants = [('torch', dict(runtime='torch')), ('onnxruntime', dict(runtime='onnxruntime')),
                ('onnxruntime, 150 proposals', dict(runtime='onnxruntime', proposals=150))]
    detectors = []
    for name, options in variants:
        detector = MaskRCNNDetector(model or '', threads=threads, **options)
        detector.detect(frames[0])  # warm-up
        detectors.append((name, detector, [], [], []))
    for frame in frames:  # interleaved: every runtime sees the same load
        for _, detector, wall, cpu, found in detectors:
            started_cpu, started = time.process_time(), time.perf_counter()
            found.append(len(detector.detect(frame).detections))
            cpu.append(time.process_time() - started_cpu)
            wall.append(time.perf_counter() - started)
    base = np.median(detectors[0][2])
    lines = [f'{len(frames)} frames of 1024 x 1024 (seed {SPEED_SEED}), score threshold 0.5, {threads} threads, '
             'whole frame as one piece, optics included; runtimes interleaved frame by frame. CPU ms counts all '
             'threads of the process; wall ms also waits for a busy machine.', '',
             '| runtime | wall ms per frame (median) | CPU ms per frame | flakes per frame | wall vs torch |',
             '|---|---|---|---|---|']
    for name, _, wall, cpu, found in detectors:
        lines.append(f'| {name} | {1000 * np.median(wall):.0f} | {1000 * np.median(cpu):.0f} | '
                     f'{np.mean(found):.1f} | {np.median(wall) / base:.2f} |')
    return '\n'.join(lines) + '\n'


def ablation_section(frames: int) -> str:
    from flake_detector.maskrcnn.infer import MaskRCNNDetector

    kinds = {'Baseline': sorted(RUNS.glob('base30-s*/final.pt')),
             'Ours (t = 0.8)': sorted(RUNS.glob('soft30-s*/final.pt'))}
    if not all(kinds.values()):
        return 'Ablation skipped: no runs in data/maskrcnn/runs (make train-maskrcnn-ablation).\n'
    gt, rendered = merge_sets([(g, f[1.0]) for g, f in (render_frames(seed, frames) for seed in ABLATION_SEEDS)])
    results = {}
    soft_share = {}
    for kind, paths in kinds.items():
        for path in paths:
            detector = MaskRCNNDetector(path, score_threshold=0.01, threads=2)
            predictions = predictions_of(detector, rendered)
            run = {m: material_ap(gt, predictions, m) for m in MATERIALS}
            run['all'] = agnostic_ap(gt, predictions)
            results.setdefault(kind, []).append(run)
            card = json.loads(path.with_suffix('.json').read_text())
            soft_share.setdefault(kind, []).append(card['history'][-1].get('soft_fraction', 0.0))
    runs = {kind: len(v) for kind, v in results.items()}
    lines = [f'Layout of Nguyen et al. (2022), Table 1: simulator seeds {", ".join(map(str, ABLATION_SEEDS))}, '
             f'{frames} frames each, flakes of 1-{MAX_LAYERS} layers and >= {MIN_AREA_PX} px. Both methods trained '
             'with the same schedule on the same 400 frames with 30 % of the annotations removed at random; '
             f'runs per method: {runs}; each cell the mean over runs, +- half their range. Rows per material '
             'use the material the backend names; "all" is class-agnostic.', '',
             '| Type | Method | GT | box AP50 | box AP75 | box AP | mask AP50 | mask AP75 | mask AP |',
             '|---|---|---|---|---|---|---|---|---|']
    for material in [*MATERIALS, 'all']:
        for kind, per_run in results.items():
            cells = []
            for iou_type in ('bbox', 'segm'):
                for key in ('AP50', 'AP75', 'AP'):
                    values = [r[material][iou_type][key] for r in per_run if r[material][iou_type][key] is not None]
                    if not values:
                        cells.append('-')
                        continue
                    cells.append(f'{100 * np.mean(values):.1f} +- {50 * (max(values) - min(values)):.1f}')
            lines.append(f'| {SHORT[material]} | {kind} | {per_run[0][material]["ground_truth"]} | '
                         + ' | '.join(cells) + ' |')
    lines += ['', 'Share of sampled negative anchors with a soft label in the last epoch: '
              + ', '.join(f'{kind} {", ".join(f"{100 * s:.1f} %" for s in shares)}'
                          for kind, shares in soft_share.items()) + '.']
    return '\n'.join(lines) + '\n'


def illumination_section(frames: int, model: str, which: tuple[str, ...] = ('maskrcnn', 'contrast', 'cascade')) -> str:
    from flake_detector.detection import make_detector

    gt, rendered = render_frames(ILLUMINATION_SEED, frames, INTENSITIES)
    detectors = [('maskrcnn', lambda: make_detector('maskrcnn', model_path=model, score_threshold=0.01,
                                                       threads=2)),
                 ('optical (contrast)', lambda: make_detector('contrast', materials=','.join(MATERIALS))),
                 ('cascade (graphene 1-10 layers)', lambda: make_detector('cascade'))]
    lines = [f'Simulator seed {ILLUMINATION_SEED}, {frames} frames of 1024 x 1024 rendered at every lamp '
             f'intensity I; flakes of 1-{MAX_LAYERS} layers and >= {MIN_AREA_PX} px. Box AP50 of all flakes '
             '(class-agnostic) and of graphene (the detector\'s graphene against graphene flakes); every detector '
             'keeps its settings.', '',
             '| detector | ' + ' | '.join(f'all, I = {s:.1f}' for s in INTENSITIES) + ' | '
             + ' | '.join(f'graphene, I = {s:.1f}' for s in INTENSITIES) + ' |',
             '|---|' + '---|' * (2 * len(INTENSITIES))]
    for name, build in detectors:
        if name.split()[0] not in which and not (name.startswith('optical') and 'contrast' in which):
            continue
        try:
            detector = build()
        except (FileNotFoundError, ValueError) as exc:
            lines.append(f'| {name} | ' + ' | '.join('-' for _ in range(2 * len(INTENSITIES))) + f' | ({exc})')
            continue
        everything, graphene = [], []
        for scale in INTENSITIES:
            predictions = predictions_of(detector, rendered[scale])
            everything.append(_pct(agnostic_ap(gt, predictions)['bbox']['AP50']))
            graphene.append(_pct(material_ap(gt, predictions, 'graphene')['bbox']['AP50']))
        lines.append(f'| {name} | ' + ' | '.join(everything + graphene) + ' |')
    return '\n'.join(lines) + '\n'


def _overlay(image, detections, names=None):
    from flake_core.materials import colour_bgr

    overlay = image.copy()
    for det in detections:
        contours, _ = cv2.findContours(det.full_mask(image.shape[:2]).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(overlay, contours, -1, colour_bgr(det.material), 3)
        x, y, _, _ = det.bbox
        cv2.putText(overlay, f'{det.material} {det.score:.2f}', (x, max(20, y - 6)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.8, colour_bgr(det.material), 2)
    return overlay


def _grid(panels, path: Path, caption: str) -> None:
    while len(panels) % 4:
        panels.append(np.full_like(panels[0], 255))
    grid = np.vstack([np.hstack(panels[i:i + 4]) for i in range(0, len(panels), 4)])
    band = np.full((28, grid.shape[1], 3), 255, np.uint8)
    cv2.putText(band, caption, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack([grid, band]), [cv2.IMWRITE_JPEG_QUALITY, 80])


def _nbse2_truth():
    """(image path, [(polygon mask, label)]) of every annotated NbSe2 image (set_a's full file, set_b)."""
    from pycocotools import mask as mask_utils

    out = []
    for folder in ('set_a', 'set_b'):
        files = sorted((NBSE2_DIR / folder).glob('labels_*.json'))
        if not files:
            continue
        coco = json.loads(files[0].read_text())
        names = {c['id']: c['name'] for c in coco['categories']}
        for image in coco['images']:
            path = NBSE2_DIR / folder / image['file_name']
            if not path.is_file():
                continue
            flakes = []
            for ann in coco['annotations']:
                if ann['image_id'] != image['id']:
                    continue
                rle = mask_utils.merge(mask_utils.frPyObjects(ann['segmentation'], image['height'], image['width']))
                flakes.append((mask_utils.decode(rle).astype(bool), names.get(ann['category_id'], '?')))
            out.append((folder, path, flakes))
    return out


def real_section(model: str, threshold: float) -> str:
    from flake_detector.maskrcnn.infer import MaskRCNNDetector

    lines = []
    paths = sorted(REAL_DIR.glob('*.jpg'))
    if paths:
        detector = MaskRCNNDetector(model or '', score_threshold=threshold, threads=2, input_scale=SCALE_2DMATGMM)
        lines += [f'2DMatGMM micrographs (20x, about 0.39 um/px, scaled by {SCALE_2DMATGMM:.2f} to the model\'s '
                  f'0.55 um/px), score threshold {threshold}; materials from the optics on 90 nm SiO2.', '',
                  '| image | flakes found | by material |', '|---|---|---|']
        panels = []
        for path in paths:
            image = cv2.imread(str(path))
            detections = detector.detect(image).detections
            counts: dict[str, int] = {}
            for det in detections:
                counts[det.material] = counts.get(det.material, 0) + 1
            lines.append(f'| {path.name[:8]} | {len(detections)} | '
                         + (', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or '-') + ' |')
            panels.append(cv2.resize(_overlay(image, detections), (480, 300), interpolation=cv2.INTER_AREA))
        _grid(panels, IMG_DIR / 'maskrcnn_real.jpg',
              f'{detector.model_version}; micrographs: 2DMatGMM (MIT licence, J.-L. Uslu et al.)')
        lines += ['', f'Overlays: docs/img/maskrcnn_real.jpg ({detector.model_version}).', '']
    annotated = _nbse2_truth()
    if annotated:
        from flake_detector.evaluation import match_image

        detector = MaskRCNNDetector(model or '', score_threshold=threshold, threads=2, input_scale=SCALE_NBSE2,
                                    materials='graphene,hbn,mos2,wte2,nbse2')
        found = total = detections_total = 0
        by_class: dict[str, list[int]] = {}
        panels = []
        for folder, path, flakes in annotated:
            image = cv2.imread(str(path))
            detections = detector.detect(image).detections
            detections_total += len(detections)
            h, w = image.shape[:2]
            truth = [{'image_id': 1, 'bbox': list(cv2.boundingRect(m.astype(np.uint8))), 'segmentation':
                      _rle(m)} for m, _ in flakes]
            preds = [{'image_id': 1, 'bbox': list(d.bbox), 'segmentation': _rle(d.full_mask((h, w))),
                      'score': d.score} for d in detections]
            hits = {t for t, _, _ in match_image(truth, preds, h, w, 0.5)}
            for k, (_, label) in enumerate(flakes):
                by_class.setdefault(label, [0, 0])
                by_class[label][0] += k in hits
                by_class[label][1] += 1
            found += len(hits)
            total += len(flakes)
            if len(panels) < 8 and folder == 'set_a' and ' ' not in path.name:
                overlay = _overlay(image, detections)
                for mask, _ in flakes:
                    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                    cv2.drawContours(overlay, contours, -1, (255, 255, 255), 2)
                panels.append(cv2.resize(overlay, (400, 300), interpolation=cv2.INTER_AREA))
        if panels:
            _grid(panels, IMG_DIR / 'maskrcnn_nbse2.jpg',
                  f'{detector.model_version}; white: annotation. NbSe2 micrographs: flakedetectron (GPL-3.0)')
        lines += [f'Annotated NbSe2 micrographs (flakedetectron, GPL-3.0; 150x, scaled by {SCALE_NBSE2}): '
                  f'{len(annotated)} images, {detections_total} detections at score >= {threshold}; recall at mask '
                  'IoU 0.5 per annotated class:', '', '| class | annotated | found | recall |', '|---|---|---|---|']
        for label, (hit, count) in sorted(by_class.items()):
            lines.append(f'| {label} | {count} | {hit} | {_pct(hit / count)} |')
        lines.append(f'| all | {total} | {found} | {_pct(found / max(total, 1))} |')
        lines += ['', 'Overlays: docs/img/maskrcnn_nbse2.jpg (data: flakedetectron, GPL-3.0).']
    return '\n'.join(lines) + '\n'


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    return rle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--frames', type=int, default=8, help='frames per simulator seed')
    parser.add_argument('--curve-frames', type=int, default=4, help='frames per seed for the learning curve')
    parser.add_argument('--speed-frames', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2, help='CPU threads for the speed table')
    parser.add_argument('--model', default='', help='checkpoint to judge (default: shipped)')
    parser.add_argument('--before', type=Path, default=BEFORE, help='the previous checkpoint, for before/after')
    parser.add_argument('--run', type=Path, default=RUNS / 'ship', help='training run with epoch checkpoints')
    parser.add_argument('--real-threshold', type=float, default=0.5, help='score cut for the real overlays')
    parser.add_argument('--only', choices=('ap', 'curve', 'speed', 'ablation', 'illumination', 'real'),
                        default=None)
    parser.add_argument('--detectors', default='maskrcnn,contrast,cascade',
                        help='illumination table: which detectors (comma list)')
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    sections = {'ap': lambda: ap_section(args.frames, args.model, args.before),
                'curve': lambda: curve_section(args.curve_frames, args.run),
                'speed': lambda: speed_section(args.speed_frames, args.model, args.threads),
                'ablation': lambda: ablation_section(args.frames),
                'illumination': lambda: illumination_section(args.frames, args.model,
                                                             tuple(args.detectors.split(','))),
                'real': lambda: real_section(args.model, args.real_threshold)}
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

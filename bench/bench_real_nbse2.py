"""Real NbSe2 micrographs from a microscope the system never saw: the optical detector with
a calibration fitted by ``flake-calibrate``, zero-shot and few-shot.

Data: ../shared/data/real_annotated_nbse2 (48 JPEGs at 150x of exfoliated NbSe2 from the
flakedetectron project, GPL-3.0; 327 flakes labelled 1L-5L and >5L / >=5L). Several images
are views of the same flakes, so data are held out by flake name (flake1, flake2, ...; the
same name in both sets counts as the same flakes).

- zero-shot: ``flake-calibrate`` on the 48 images without their labels, then the detector;
- few-shot: for each flake name in turn, the calibration also gets the labels of at most five
  images of that flake, and the detector is scored on the images of every other flake.

Scores: a flake is found when a detection of material nbse2 scoring at least the cut overlaps
it with mask IoU >= 0.5 (one to one); precision counts detections of nbse2; layer-label
accuracy is the share of found flakes whose detected layer count lies within the label
('>5L': 6 or more). Regions of unknown colour are counted apart. A second row leaves flakes
and detections under 1 um^2 out on both sides (the labels skip most crumbs that small, and
a lab has no use for them). Overlays go to docs/img/.

    python bench/bench_real_nbse2.py [--quick] [--folds N] [--no-overlays]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import re
import sys
import tempfile
import time

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / 'shared' / 'data' / 'real_annotated_nbse2'
SETS = {'set_a': 'labels_my-project-name_2025-01-10-04-51-39.json',
        'set_b': 'labels_my-project-name_2024-12-17-12-04-35.json'}
IMG_DIR = ROOT / 'docs' / 'img'
MATERIAL = 'nbse2'
# What the detector reports here: every thickness (the labels include bulk crystals as '>5L')
# and regions of at least 200 px (the smallest labelled flakes are 220-340 px), segmented at
# the default working size.
DETECTOR = {'materials': MATERIAL, 'max_layers': 300, 'min_area_px': 200}
# 1 um^2 in pixels: the scale bar of these images (5 um) spans 197 px at 150x.
USABLE_PX = (197 / 5.0) ** 2
SCORE_CUT = 0.5


def flake_name(file_name: str) -> str:
    match = re.match(r'(flake\d+)', Path(file_name).name, re.IGNORECASE)
    return match.group(1).lower() if match else Path(file_name).stem


def load() -> tuple[dict, dict[int, Path]]:
    """Both sets as one COCO dict (image ids renumbered) with layer labels as attributes."""
    from flake_detector.evaluation import with_layer_labels

    images, annotations, paths = [], [], {}
    for folder, labels in SETS.items():
        coco = with_layer_labels(json.loads((DATA / folder / labels).read_text()), MATERIAL)
        remap = {}
        for image in coco['images']:
            remap[image['id']] = len(images) + 1
            images.append({**image, 'id': remap[image['id']], 'file_name': f'{folder}/{image["file_name"]}'})
            paths[remap[image['id']]] = DATA / folder / image['file_name']
        for ann in coco['annotations']:
            annotations.append({**ann, 'id': len(annotations) + 1, 'image_id': remap[ann['image_id']],
                                'category_id': 1})
    return {'images': images, 'annotations': annotations, 'categories': [{'id': 1, 'name': MATERIAL}]}, paths


class Calibrator:
    """flake-calibrate's two halves, with the images measured once for every fold."""

    def __init__(self, paths: dict[int, Path], gt: dict):
        from flake_detector.calibrate import measure_image

        self.paths, self.gt = paths, gt
        self.order = sorted(paths)
        self.measured = {}
        for index, image_id in enumerate(self.order):
            self.measured[image_id] = measure_image(cv2.imread(str(paths[image_id])), index, self.name(image_id))

    def name(self, image_id: int) -> str:
        return f'{self.paths[image_id].parent.name}/{self.paths[image_id].name}'

    def fit(self, labelled_ids: list[int], out: Path, name: str):
        """The calibration of every image, with the labels of ``labelled_ids``."""
        from flake_detector.calibrate import fit_calibration, labels_from_coco, measure_image

        started = time.perf_counter()
        infos, samples = [], []
        labels = {}
        if labelled_ids:
            chosen = {'images': [im for im in self.gt['images']
                                 if im['id'] in labelled_ids],
                      'annotations': [a for a in self.gt['annotations'] if a['image_id'] in labelled_ids],
                      'categories': [{'id': 1, 'name': MATERIAL}]}
            for flake in labels_from_coco(chosen, DATA, MATERIAL)[1]:
                labels.setdefault(flake.image, []).append(flake)
        for index, image_id in enumerate(self.order):
            mine = labels.get(self.name(image_id))
            if mine:
                info, found = measure_image(cv2.imread(str(self.paths[image_id])), index, self.name(image_id), mine)
            else:
                info, found = self.measured[image_id]
            infos.append(info)
            samples += found
        result = fit_calibration(infos, samples, (MATERIAL,), name=name)
        result.calibration.save(out)
        return result, time.perf_counter() - started


def detect(calibration: Path, paths: dict[int, Path], ids) -> tuple[list[dict], dict[int, list], float, list[dict]]:
    """Predictions of material nbse2, the regions of unknown colour per image (and as
    predictions), and the seconds per image."""
    from flake_detector.evaluation import detections_to_predictions
    from flake_detector.optical import OpticalDetector

    detector = OpticalDetector(calibration=str(calibration), **DETECTOR)
    predictions, unknown, unknown_predictions, seconds = [], {}, [], 0.0
    for image_id in ids:
        image = cv2.imread(str(paths[image_id]))
        t0 = time.perf_counter()
        result = detector.detect(image)
        seconds += time.perf_counter() - t0
        known = [d for d in result.detections if d.material == MATERIAL]
        unknown[image_id] = [d for d in result.detections if d.material != MATERIAL]
        predictions += detections_to_predictions(image_id, known, image.shape[0], image.shape[1])
        unknown_predictions += detections_to_predictions(image_id, unknown[image_id], image.shape[0], image.shape[1])
    return predictions, unknown, seconds / max(1, len(ids)), unknown_predictions


def score(gt: dict, predictions: list[dict], ids, min_area_px: float = 0.0) -> dict:
    """Flake-level scores on images ``ids``; ``min_area_px`` leaves smaller flakes and smaller
    detections out on both sides (the project's convention for flakes too small to use)."""
    from flake_detector.evaluation import instance_precision_recall, select_predictions, select_truth

    ids = set(ids)
    subset = {**gt, 'images': [im for im in gt['images'] if im['id'] in ids]}
    truth = [a for a in select_truth(gt, None, None, None, min_area_px) if a['image_id'] in ids]
    chosen = [p for p in select_predictions(predictions, None, None, None, min_area_px) if p['image_id'] in ids]
    return instance_precision_recall(subset, truth, chosen, SCORE_CUT)


def overlays(gt: dict, paths: dict[int, Path], predictions: list[dict], unknown: dict, ids, prefix: str) -> list[str]:
    """Truth outlines (white) and detections (coloured by layers) of a few images, halved."""
    from pycocotools import mask as mask_utils

    names = []
    for k, image_id in enumerate(ids):
        image = cv2.imread(str(paths[image_id]))
        h, w = image.shape[:2]
        for ann in (a for a in gt['annotations'] if a['image_id'] == image_id):
            for poly in ann['segmentation']:
                cv2.polylines(image, [np.round(np.array(poly).reshape(-1, 2)).astype(np.int32)], True,
                              (255, 255, 255), 2)
        for pred in (p for p in predictions if p['image_id'] == image_id and p['score'] >= SCORE_CUT):
            rle = dict(pred['segmentation'])
            rle['counts'] = rle['counts'].encode('ascii')
            mask = mask_utils.decode(rle).astype(np.uint8)
            layers = pred['layers'] or 0
            colour = (0, 255, 255) if layers <= 3 else (0, 200, 0) if layers <= 5 else (255, 128, 0)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image, contours, -1, colour, 3)
            x, y = int(pred['bbox'][0]), int(pred['bbox'][1])
            cv2.putText(image, f'{layers:.0f}L {pred["score"]:.2f}', (x, max(14, y - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.8, colour, 2, cv2.LINE_AA)
        for det in unknown.get(image_id, []):
            mask = det.full_mask((h, w)).astype(np.uint8)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image, contours, -1, (255, 0, 255), 2)
        cv2.putText(image, 'NbSe2: flakedetectron (GPL-3.0)', (10, h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.7,
                    (255, 255, 255), 2, cv2.LINE_AA)
        name = f'{prefix}_{k}.jpg'
        small = cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(IMG_DIR / name), small, [cv2.IMWRITE_JPEG_QUALITY, 80])
        names.append(name)
    return names


def _row(name: str, m: dict, extra, ms: float) -> str:
    """A table row of flake-level scores; ``extra`` fills the second-last column (unknown
    regions here, fine-tuning CPU seconds in bench_real_nbse2_maskrcnn)."""
    def f(v):
        return '-' if v is None else f'{v:.2f}'
    return (f'| {name} | {m["flakes"]} | {m["detections"]} | {m["matched"]} | {f(m["recall"])} | '
            f'{f(m["precision"])} | {f(m["layer_accuracy"])} | {extra} | {ms:.0f} |')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='two few-shot folds only')
    parser.add_argument('--folds', type=int, default=None, help='few-shot folds (flake names) to run')
    parser.add_argument('--no-overlays', action='store_true')
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f'(no NbSe2 micrographs in {DATA})')
        return 0
    gt, paths = load()
    ids = sorted(paths)
    names = {i: flake_name(paths[i].name) for i in ids}
    header = ['| run | flakes | detections | found | recall | precision | layer label right | unknown regions | '
              'ms per image |', '|---|---|---|---|---|---|---|---|---|']
    lines = ['### Real NbSe2 micrographs (150x, flakedetectron, GPL-3.0)', '', *header]
    work = Path(tempfile.mkdtemp(prefix='nbse2-bench-'))
    started = time.perf_counter()
    calibrator = Calibrator(paths, gt)
    measuring = time.perf_counter() - started
    result, seconds = calibrator.fit([], work / 'zero.json', 'nbse2-zero-shot')
    seconds += measuring
    print(f'[bench] zero-shot calibration ({seconds:.0f} s): {result.summary()}', file=sys.stderr, flush=True)
    predictions, unknown, per_image, unknown_predictions = detect(work / 'zero.json', paths, ids)
    zero = score(gt, predictions, ids)
    lines.append(_row('zero-shot (48 images, no labels)', zero, sum(map(len, unknown.values())), 1e3 * per_image))
    usable = score(gt, predictions, ids, USABLE_PX)
    lines.append(_row('zero-shot, flakes and detections of 1 um^2 or more', usable, 0, float('nan'))
                 .replace('| nan |', '| - |'))
    # Where the class gate fails rather than the segmentation: regions of unknown colour count
    # as NbSe2 too, whatever their score (a flake-likeness for sorting, not a probability).
    agnostic = score(gt, predictions + [{**p, 'score': 1.0} for p in unknown_predictions], ids)
    lines.append(_row('zero-shot, unknown-colour regions counted as NbSe2', {**agnostic, 'layer_accuracy': None},
                      0, float('nan')).replace('| nan |', '| - |'))
    per_label = [('zero-shot', zero)]
    if not args.no_overlays:
        IMG_DIR.mkdir(parents=True, exist_ok=True)
        shown = [i for i in ids if paths[i].name in ('flake1-150x 2.jpg', 'flake3-150x 4.jpg', 'flake4-150x.jpg')]
        overlays(gt, paths, predictions, unknown, shown, 'nbse2_zero')
    calibration_notes = [f'zero-shot: oxide {result.report["oxide_nm"]:.0f} nm, gamma {result.report["gamma"]:.2f}, '
                         f'{result.report["regions"]} regions, {100 * result.report["inlier_share"]:.0f} % on the '
                         f'ladder, {seconds:.0f} s']
    # Few-shot: labels of at most five images of one flake name; scored on the other names.
    groups = sorted(set(names.values()), key=lambda n: int(re.sub(r'\D', '', n) or 0))
    groups = groups[:2] if args.quick else groups[:args.folds] if args.folds else groups
    pooled = {'flakes': 0, 'detections': 0, 'matched': 0, 'right': 0}
    pooled_labels: dict[str, list[int]] = {}
    pooled_unknown = 0
    pooled_usable = {'flakes': 0, 'detections': 0, 'matched': 0}
    for group in groups:
        labelled = [i for i in ids if names[i] == group][:5]
        held = [i for i in ids if names[i] != group]
        fold, seconds = calibrator.fit(labelled, work / f'few_{group}.json', f'nbse2-few-shot-{group}')
        print(f'[bench] few-shot {group} ({len(labelled)} labelled images, {seconds:.0f} s): {fold.summary()}',
              file=sys.stderr, flush=True)
        predictions, unknown, per_image, _ = detect(work / f'few_{group}.json', paths, held)
        m = score(gt, predictions, held)
        big = score(gt, predictions, held, USABLE_PX)
        for key in ('flakes', 'detections', 'matched'):
            pooled_usable[key] += big[key]
        count = sum(map(len, unknown.values()))
        lines.append(_row(f'few-shot: labels of {len(labelled)} images of {group}, scored on the other '
                          f'{len(held)}', m, count, 1e3 * per_image))
        calibration_notes.append(f'few-shot {group}: oxide {fold.report["oxide_nm"]:.0f} nm, gamma '
                                 f'{fold.report["gamma"]:.2f}, {fold.report["labelled"]} labelled flakes '
                                 f'({fold.report["labelled_on_rung"]} on their rung)')
        pooled['flakes'] += m['flakes']
        pooled['detections'] += m['detections']
        pooled['matched'] += m['matched']
        pooled['right'] += round((m['layer_accuracy'] or 0) * m['matched'])
        pooled_unknown += count
        for label, v in m['per_label'].items():
            acc = pooled_labels.setdefault(label, [0, 0, 0])
            acc[0] += v['flakes']
            acc[1] += v['found']
            acc[2] += v['layers_right']
        if not args.no_overlays and group == groups[0]:
            shown = [i for i in held if paths[i].name in ('flake1-150x 2.jpg', 'flake3-150x 4.jpg',
                                                          'flake4-150x.jpg')]
            overlays(gt, paths, predictions, unknown, shown, 'nbse2_few')
    if groups:
        few = {'flakes': pooled['flakes'], 'detections': pooled['detections'], 'matched': pooled['matched'],
               'recall': pooled['matched'] / max(1, pooled['flakes']),
               'precision': pooled['matched'] / pooled['detections'] if pooled['detections'] else None,
               'layer_accuracy': pooled['right'] / pooled['matched'] if pooled['matched'] else None}
        lines.append(_row(f'few-shot, pooled over {len(groups)} held-out folds', few, pooled_unknown, float('nan'))
                     .replace('| nan |', '| - |'))
        big = {**pooled_usable, 'recall': pooled_usable['matched'] / max(1, pooled_usable['flakes']),
               'precision': pooled_usable['matched'] / max(1, pooled_usable['detections']), 'layer_accuracy': None}
        lines.append(_row('few-shot pooled, flakes and detections of 1 um^2 or more', big, 0, float('nan'))
                     .replace('| nan |', '| - |'))
        per_label.append(('few-shot (pooled)', {'per_label': {k: {'flakes': v[0], 'found': v[1], 'layers_right': v[2]}
                                                              for k, v in pooled_labels.items()}}))
    lines += ['', 'Per layer label: flakes found (recall) and layer count right among them; detections whose '
              'layer count falls in the label and the share of them that are right (precision).', '',
              '| label | ' + ' | '.join(f'{name}: found' for name, _ in per_label)
              + ' | zero-shot: detections, right |', '|---' * (len(per_label) + 2) + '|']
    labels = sorted({k for _, m in per_label for k in m['per_label']} | set(zero['per_predicted_label']),
                    key=lambda k: (len(k), k))
    for label in labels:
        cells = []
        for _, m in per_label:
            v = m['per_label'].get(label)
            cells.append('-' if v is None else f'{v["found"]}/{v["flakes"]} ({v["found"] / max(1, v["flakes"]):.2f}), '
                                               f'{v["layers_right"]} layers right')
        p = zero['per_predicted_label'].get(label)
        cells.append('-' if p is None else f'{p["detections"]}, {p["right"]} ({(p["precision"] or 0):.2f})')
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Calibrations: ' + '; '.join(calibration_notes) + '.']
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())

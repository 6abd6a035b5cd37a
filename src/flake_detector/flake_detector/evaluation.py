"""Evaluation every detector is judged with.

- COCO AP, AP50 and AP75 for boxes and masks (pycocotools), over all flakes and per
  material; a material's AP treats its flakes as one class.
- Per-image precision and recall as Masubuchi et al. (2020) defines them: an image is a true
  positive when at least one flake in it is correctly detected (IoU >= 0.5), a
  false positive when it has detections but none is correct, a false negative when
  it holds a flake and none is correctly detected.
- Layer-class confusion of matched flakes (mono / few / thick / bulk), with missed
  flakes and spurious detections.
- The cascade funnel when the predictions carry one.

Ground truth is a COCO instances dict as ``flake-sim dataset`` writes it: flake
annotations carry ``attributes`` (material, layers) and contaminants
``is_contaminant``. Predictions are COCO results (image_id, bbox, segmentation,
score) plus ``material``, ``layers`` and ``layer_class`` per entry.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
from typing import Any

import numpy as np

from flake_core.materials import CONTAMINANT_CATEGORY_MIN, LAYER_CLASS_NAMES, layer_class_name

LAYER_CLASSES = tuple(name for name in LAYER_CLASS_NAMES.values() if name != 'unknown')


def is_flake(annotation: dict) -> bool:
    if 'is_contaminant' in annotation:
        return not annotation['is_contaminant']
    return int(annotation.get('category_id', 0)) < CONTAMINANT_CATEGORY_MIN


def annotation_material(annotation: dict, categories: dict[int, str]) -> str:
    attributes = annotation.get('attributes') or {}
    return str(attributes.get('material') or categories.get(int(annotation.get('category_id', -1)), 'unknown'))


def annotation_layers(annotation: dict) -> float:
    attributes = annotation.get('attributes') or {}
    value = attributes.get('layers', annotation.get('layers'))
    return float(value) if value is not None else float('nan')


def select_truth(gt: dict, material: str | None = None, min_layers: float | None = None,
                 max_layers: float | None = None, min_area: float = 0.0) -> list[dict]:
    """Flake annotations of ``material`` (all when None) within a layer range and of at least
    ``min_area`` pixels."""
    categories = {int(c['id']): c['name'] for c in gt.get('categories', [])}
    out = []
    for ann in gt['annotations']:
        if not is_flake(ann):
            continue
        if material is not None and annotation_material(ann, categories) != material:
            continue
        layers = annotation_layers(ann)
        if min_layers is not None and not layers >= min_layers:
            continue
        if max_layers is not None and not layers <= max_layers:
            continue
        if float(ann.get('area', ann['bbox'][2] * ann['bbox'][3])) < min_area:
            continue
        out.append(ann)
    return out


def select_predictions(predictions: list[dict], material: str | None = None, min_layers: float | None = None,
                       max_layers: float | None = None, min_area: float = 0.0) -> list[dict]:
    out = []
    for p in predictions:
        if material is not None and p.get('material', 'unknown') != material:
            continue
        layers = float(p['layers']) if p.get('layers') is not None else float('nan')
        if min_layers is not None and not layers >= min_layers:
            continue
        if max_layers is not None and not layers <= max_layers:
            continue
        if min_area > 0 and _prediction_area(p) < min_area:
            continue
        out.append(p)
    return out


def _prediction_area(prediction: dict) -> float:
    from pycocotools import mask as mask_utils

    segmentation = prediction.get('segmentation')
    if isinstance(segmentation, dict) and 'counts' in segmentation and 'size' in segmentation:
        rle = dict(segmentation)
        if isinstance(rle['counts'], str):
            rle['counts'] = rle['counts'].encode('ascii')
        return float(mask_utils.area(rle))
    return float(prediction['bbox'][2] * prediction['bbox'][3])


def _single_class(gt: dict, truth: list[dict], predictions: list[dict]) -> tuple[dict, list[dict]]:
    gt_out = {'images': copy.deepcopy(gt['images']), 'categories': [{'id': 1, 'name': 'flake'}],
              'annotations': []}
    for k, ann in enumerate(truth, start=1):
        a = {key: ann[key] for key in ('image_id', 'bbox', 'segmentation', 'area') if key in ann}
        a.update(id=k, category_id=1, iscrowd=int(ann.get('iscrowd', 0)))
        if 'area' not in a:
            a['area'] = float(a['bbox'][2] * a['bbox'][3])
        gt_out['annotations'].append(a)
    preds = []
    for p in predictions:
        q = {key: p[key] for key in ('image_id', 'bbox', 'segmentation', 'score') if key in p}
        q['category_id'] = 1
        preds.append(q)
    return gt_out, preds


def coco_ap(gt: dict, truth: list[dict], predictions: list[dict], iou_type: str = 'bbox') -> dict[str, float | None]:
    """AP, AP50, AP75 (COCO, 101-point interpolation) of ``predictions`` against ``truth``.

    None where there is nothing to judge (no ground truth). No predictions at all give 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not truth:
        return {'AP': None, 'AP50': None, 'AP75': None}
    if not predictions:
        return {'AP': 0.0, 'AP50': 0.0, 'AP75': 0.0}
    gt_dict, preds = _single_class(gt, truth, predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(preds)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {name: (float(stats[i]) if stats[i] >= 0 else None) for i, name in enumerate(('AP', 'AP50', 'AP75'))}


def _rle(item: dict, height: int, width: int):
    from pycocotools import mask as mask_utils

    segmentation = item.get('segmentation')
    if segmentation is None:
        x, y, w, h = item['bbox']
        return mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width)[0]
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get('counts'), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    rle = dict(segmentation)
    if isinstance(rle['counts'], str):
        rle['counts'] = rle['counts'].encode('ascii')
    return rle


def match_image(truth: list[dict], predictions: list[dict], height: int, width: int,
                iou_threshold: float = 0.5, iou_type: str = 'segm') -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by descending score: (truth index, prediction index, IoU)."""
    from pycocotools import mask as mask_utils

    if not truth or not predictions:
        return []
    order = sorted(range(len(predictions)), key=lambda k: -float(predictions[k].get('score', 0.0)))
    if iou_type == 'segm':
        dt = [_rle(predictions[k], height, width) for k in order]
        gt = [_rle(t, height, width) for t in truth]
    else:
        dt = [list(predictions[k]['bbox']) for k in order]
        gt = [list(t['bbox']) for t in truth]
    ious = np.asarray(mask_utils.iou(dt, gt, [0] * len(gt)))
    taken: set[int] = set()
    matches = []
    for row, k in enumerate(order):
        best, best_iou = -1, iou_threshold
        for j in range(len(truth)):
            if j not in taken and ious[row, j] >= best_iou:
                best, best_iou = j, float(ious[row, j])
        if best >= 0:
            taken.add(best)
            matches.append((best, k, best_iou))
    return matches


def per_image_precision_recall(gt: dict, truth: list[dict], predictions: list[dict],
                               score_threshold: float = 0.5, iou_threshold: float = 0.5) -> dict[str, Any]:
    """Masubuchi et al.'s image-level precision and recall."""
    tp = fp = fn = 0
    by_image_truth = _group(truth)
    by_image_pred = _group([p for p in predictions if float(p.get('score', 1.0)) >= score_threshold])
    for image in gt['images']:
        image_id = image['id']
        t = by_image_truth.get(image_id, [])
        p = by_image_pred.get(image_id, [])
        correct = bool(match_image(t, p, image['height'], image['width'], iou_threshold))
        if correct:
            tp += 1
        else:
            fp += bool(p)
            fn += bool(t)
    return {'tp': tp, 'fp': fp, 'fn': fn,
            'precision': tp / (tp + fp) if tp + fp else None,
            'recall': tp / (tp + fn) if tp + fn else None,
            'score_threshold': score_threshold}


def layer_confusion(gt: dict, truth: list[dict], predictions: list[dict], score_threshold: float = 0.5,
                    iou_threshold: float = 0.5) -> dict[str, Any]:
    """Confusion of layer classes over matched flakes; 'missed' and 'spurious' for the rest."""
    names = list(LAYER_CLASSES)
    table = {t: dict.fromkeys([*names, 'missed'], 0) for t in names}
    table['spurious'] = dict.fromkeys([*names, 'missed'], 0)
    exact = matched = 0
    by_image_truth = _group(truth)
    by_image_pred = _group([p for p in predictions if float(p.get('score', 1.0)) >= score_threshold])
    for image in gt['images']:
        t = by_image_truth.get(image['id'], [])
        p = by_image_pred.get(image['id'], [])
        matches = match_image(t, p, image['height'], image['width'], iou_threshold)
        hit_t = {m[0] for m in matches}
        hit_p = {m[1] for m in matches}
        for ti, pi, _ in matches:
            true_layers = annotation_layers(t[ti])
            pred_layers = float(p[pi]['layers']) if p[pi].get('layers') is not None else float('nan')
            true_class, pred_class = layer_class_name(true_layers), layer_class_name(pred_layers)
            if true_class in table and pred_class in table[true_class]:
                table[true_class][pred_class] += 1
            matched += 1
            exact += bool(np.isfinite(pred_layers) and round(pred_layers) == round(true_layers))
        for ti in set(range(len(t))) - hit_t:
            cls = layer_class_name(annotation_layers(t[ti]))
            if cls in table:
                table[cls]['missed'] += 1
        for pi in set(range(len(p))) - hit_p:
            cls = layer_class_name(float(p[pi]['layers']) if p[pi].get('layers') is not None else float('nan'))
            if cls in table['spurious']:
                table['spurious'][cls] += 1
    return {'table': table, 'matched': matched, 'exact_layers': exact,
            'exact_layer_fraction': exact / matched if matched else None}


_LAYER_NAME = re.compile(r'^\s*(>=|>|<=|<)?\s*(\d+)\s*(l|layers?)?\s*$', re.IGNORECASE)


def layer_range_of_name(name: str) -> tuple[float, float] | None:
    """Layer range of a label name as labelling tools write them: '3L' -> (3, 3), '>5L' ->
    (6, inf), '>=5L' -> (5, inf), '<3' -> (1, 2); None when the name is not a layer count."""
    match = _LAYER_NAME.match(str(name))
    if not match:
        return None
    op, n = match.group(1), int(match.group(2))
    return {None: (n, n), '>': (n + 1, math.inf), '>=': (n, math.inf), '<': (1, n - 1), '<=': (1, n)}[op]


def with_layer_labels(coco: dict, material: str) -> dict:
    """A COCO file whose categories name layer counts ('3L', '>5L', as labelling tools write
    them) with ``attributes`` the evaluation reads: material, layers (the lower bound),
    layers_max (None: no bound) and the label. Annotations of other categories are dropped."""
    categories = {int(c['id']): str(c['name']) for c in coco.get('categories', [])}
    out = {**coco, 'annotations': []}
    for ann in coco.get('annotations', []):
        name = categories.get(int(ann.get('category_id', -1)), '')
        span = layer_range_of_name(name)
        if span is None:
            continue
        attributes = {**(ann.get('attributes') or {}), 'material': material, 'layers': span[0],
                      'layers_max': span[1] if math.isfinite(span[1]) else None, 'label': name}
        out['annotations'].append({**ann, 'attributes': attributes})
    return out


def annotation_layer_range(annotation: dict) -> tuple[float, float]:
    """(lowest, highest) layer count an annotation allows (an exact count gives (n, n))."""
    attributes = annotation.get('attributes') or {}
    low = annotation_layers(annotation)
    high = attributes.get('layers_max', low) if 'layers_max' in attributes else low
    return low, (math.inf if high is None else float(high))


def instance_precision_recall(gt: dict, truth: list[dict], predictions: list[dict], score_threshold: float = 0.5,
                              iou_threshold: float = 0.5) -> dict[str, Any]:
    """Flake-level precision and recall: each flake matched one-to-one (greedy by score, mask
    IoU >= ``iou_threshold``) to a detection scoring at least ``score_threshold``; recall per
    label (``attributes.label``, or the layer class), and the share of matched flakes whose
    detected layer count lies within the flake's layer range (layer-label accuracy)."""
    by_image_truth = _group(truth)
    by_image_pred = _group([p for p in predictions if float(p.get('score', 1.0)) >= score_threshold])
    per_label: dict[str, list[int]] = {}
    # Detections sorted into the labels the truth uses, by their layer count (precision per label).
    spans = {}
    for ann in truth:
        label = (ann.get('attributes') or {}).get('label') or layer_class_name(annotation_layers(ann))
        spans.setdefault(label, annotation_layer_range(ann))
    per_predicted: dict[str, list[int]] = {}

    def predicted_label(prediction) -> str:
        layers = prediction.get('layers')
        for label, (low, high) in sorted(spans.items(), key=lambda item: item[1][1] - item[1][0]):
            if layers is not None and low - 0.5 <= float(layers) < high + 0.5:
                return label
        return 'other'

    matched = right = predicted = 0
    for image in gt['images']:
        t = by_image_truth.get(image['id'], [])
        p = by_image_pred.get(image['id'], [])
        predicted += len(p)
        matches = match_image(t, p, image['height'], image['width'], iou_threshold)
        hit = {ti: pi for ti, pi, _ in matches}
        found = {pi for _, pi, _ in matches}
        for pi, prediction in enumerate(p):
            counts = per_predicted.setdefault(predicted_label(prediction), [0, 0])
            counts[0] += 1
            counts[1] += pi in found
        for ti, ann in enumerate(t):
            label = (ann.get('attributes') or {}).get('label') or layer_class_name(annotation_layers(ann))
            counts = per_label.setdefault(label, [0, 0, 0])
            counts[0] += 1
            if ti in hit:
                counts[1] += 1
                matched += 1
                layers = p[hit[ti]].get('layers')
                low, high = annotation_layer_range(ann)
                ok = layers is not None and low - 0.5 <= float(layers) < high + 0.5
                counts[2] += ok
                right += ok
    total = sum(c[0] for c in per_label.values())
    return {'flakes': total, 'detections': predicted, 'matched': matched,
            'recall': matched / total if total else None,
            'precision': matched / predicted if predicted else None,
            'layer_accuracy': right / matched if matched else None,
            'per_label': {label: {'flakes': c[0], 'found': c[1], 'recall': c[1] / c[0] if c[0] else None,
                                  'layers_right': c[2]} for label, c in sorted(per_label.items())},
            'per_predicted_label': {label: {'detections': c[0], 'right': c[1],
                                            'precision': c[1] / c[0] if c[0] else None}
                                    for label, c in sorted(per_predicted.items())},
            'score_threshold': score_threshold, 'iou_threshold': iou_threshold}


def _group(items: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for item in items:
        out.setdefault(item['image_id'], []).append(item)
    return out


def evaluate(gt: dict, predictions: list[dict], materials: list[str] | None = None,
             min_layers: float | None = None, max_layers: float | None = None, score_threshold: float = 0.5,
             funnel: list[dict] | None = None, min_area: float = 0.0) -> dict[str, Any]:
    """All metrics of ``predictions`` against ``gt`` (COCO dicts), as one JSON-ready dict.

    ``min_layers`` / ``max_layers`` restrict both sides to a layer range (a detector
    that reports a 5-layer flake is not penalised in a 1-3 layer evaluation);
    ``min_area`` [px] leaves out flakes too small to use on both sides.
    """
    categories = {int(c['id']): c['name'] for c in gt.get('categories', [])}
    if materials is None:
        found = {annotation_material(a, categories) for a in gt['annotations'] if is_flake(a)}
        materials = sorted(found)
    result: dict[str, Any] = {'images': len(gt['images']), 'predictions': len(predictions),
                              'layer_range': [min_layers, max_layers], 'min_area_px': min_area,
                              'materials': {}}
    scopes: list[tuple[str, str | None]] = [('all', None)] + [(m, m) for m in materials]
    for name, material in scopes:
        truth = select_truth(gt, material, min_layers, max_layers, min_area)
        preds = select_predictions(predictions, material, min_layers, max_layers, min_area)
        if material is None and materials:
            preds = [p for p in preds if p.get('material', 'unknown') in materials] or preds
            truth = [t for t in truth if annotation_material(t, categories) in materials]
        result['materials'][name] = {
            'ground_truth': len(truth), 'predictions': len(preds),
            'bbox': coco_ap(gt, truth, preds, 'bbox'),
            'segm': coco_ap(gt, truth, preds, 'segm') if all('segmentation' in p for p in preds) else None,
            'per_image': per_image_precision_recall(gt, truth, preds, score_threshold),
        }
    truth_all = select_truth(gt, None, min_layers, max_layers, min_area)
    truth_all = [t for t in truth_all if annotation_material(t, categories) in materials]
    preds_all = [p for p in select_predictions(predictions, None, min_layers, max_layers, min_area)
                 if p.get('material', 'unknown') in materials]
    result['layer_confusion'] = layer_confusion(gt, truth_all, preds_all, score_threshold)
    if funnel:
        result['funnel'] = funnel
    return result


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def markdown_report(metrics: dict[str, Any]) -> str:
    """The metrics as Markdown tables."""
    lines = ['| scope | GT | pred | box AP | AP50 | AP75 | mask AP | AP50 | AP75 | img P | img R |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for name, m in metrics['materials'].items():
        segm = m['segm'] or {}
        lines.append('| ' + ' | '.join([
            name, str(m['ground_truth']), str(m['predictions']),
            _fmt(m['bbox']['AP']), _fmt(m['bbox']['AP50']), _fmt(m['bbox']['AP75']),
            _fmt(segm.get('AP')), _fmt(segm.get('AP50')), _fmt(segm.get('AP75')),
            _fmt(m['per_image']['precision']), _fmt(m['per_image']['recall'])]) + ' |')
    confusion = metrics.get('layer_confusion')
    if confusion:
        cols = [*LAYER_CLASSES, 'missed']
        lines += ['', f'Layer classes (rows: truth, columns: prediction); exact layer count on '
                      f'{confusion["exact_layers"]}/{confusion["matched"]} matched flakes.', '',
                  '| truth \\ pred | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
        for row, counts in confusion['table'].items():
            lines.append(f'| {row} | ' + ' | '.join(str(counts[c]) for c in cols) + ' |')
    funnel = metrics.get('funnel')
    if funnel:
        lines += ['', '| stage | candidates left | truly good |', '|---|---|---|']
        for stage in funnel:
            lines.append(f"| {stage['stage']} | {stage['remaining']} | {_fmt(stage.get('good'))} |")
    return '\n'.join(lines) + '\n'


def detections_to_predictions(image_id: int, detections, height: int, width: int) -> list[dict]:
    """COCO results entries (frame-sized RLE masks, material, layers) for one image's detections."""
    from flake_detector.detection import encode_rle

    out = []
    for det in detections:
        x, y, w, h = det.bbox
        out.append({
            'image_id': int(image_id), 'category_id': 1, 'bbox': [float(x), float(y), float(w), float(h)],
            'segmentation': encode_rle(det.full_mask((height, width))),
            'score': float(det.score), 'material': det.material,
            'layers': float(det.layers) if np.isfinite(det.layers) else None,
            'layers_std': float(det.layers_std) if np.isfinite(det.layers_std) else None,
            'thickness_nm': float(det.thickness_nm) if np.isfinite(det.thickness_nm) else None,
            'layer_class': LAYER_CLASS_NAMES.get(det.layer_class, 'unknown'),
            'detector': det.detector, 'model_version': det.model_version,
        })
    return out

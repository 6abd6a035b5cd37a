"""Evaluation metrics on hand-made cases whose values are computed by hand."""

import json

import numpy as np
import pytest

from flake_detector.detection import Detection, encode_rle
from flake_detector.evaluation import (
    coco_ap,
    detections_to_predictions,
    evaluate,
    instance_precision_recall,
    layer_confusion,
    markdown_report,
    per_image_precision_recall,
    select_truth,
    with_layer_labels,
)
from flake_detector.evaluation_cli import main as eval_main

H = W = 100


def _rect_rle(x, y, w, h):
    mask = np.zeros((H, W), bool)
    mask[y:y + h, x:x + w] = True
    return encode_rle(mask)


def _gt_ann(ann_id, image_id, box, material='graphene', layers=1, contaminant=False):
    x, y, w, h = box
    return {'id': ann_id, 'image_id': image_id, 'category_id': 101 if contaminant else 1,
            'bbox': [x, y, w, h], 'area': float(w * h), 'iscrowd': 0, 'segmentation': _rect_rle(*box),
            'is_contaminant': contaminant, 'attributes': {'material': material, 'layers': layers}}


def _pred(image_id, box, score, material='graphene', layers=1.0):
    return {'image_id': image_id, 'category_id': 1, 'bbox': list(map(float, box)), 'score': score,
            'segmentation': _rect_rle(*box), 'material': material, 'layers': layers}


def _gt(annotations, images=1):
    return {'images': [{'id': i, 'width': W, 'height': H, 'file_name': f'{i}.png'} for i in range(1, images + 1)],
            'categories': [{'id': 1, 'name': 'graphene'}, {'id': 101, 'name': 'dust'}],
            'annotations': annotations}


def test_ap_of_two_flakes_and_three_detections_matches_the_hand_computation():
    # Truth A and B; detections by score: hit A (0.9), miss (0.8), hit B (0.7).
    # Precision/recall after each: (1, 0.5), (0.5, 0.5), (2/3, 1). Interpolated precision is
    # 1 for recall 0..0.5 (51 of COCO's 101 recall points) and 2/3 for 0.51..1 (50 points).
    gt = _gt([_gt_ann(1, 1, (10, 10, 20, 20)), _gt_ann(2, 1, (60, 60, 30, 30)),
              _gt_ann(3, 1, (40, 5, 5, 5), material='dust', contaminant=True)])
    preds = [_pred(1, (10, 10, 20, 20), 0.9), _pred(1, (40, 40, 10, 10), 0.8), _pred(1, (60, 60, 30, 30), 0.7)]
    truth = select_truth(gt)
    assert len(truth) == 2  # the dust annotation is not a flake
    expected = (51 * 1.0 + 50 * 2.0 / 3.0) / 101
    for iou_type in ('bbox', 'segm'):
        ap = coco_ap(gt, truth, preds, iou_type)
        assert ap['AP50'] == pytest.approx(expected, abs=1e-6)
        assert ap['AP75'] == pytest.approx(expected, abs=1e-6)
        assert ap['AP'] == pytest.approx(expected, abs=1e-6)  # exact boxes: every IoU threshold agrees


def test_ap_drops_when_localisation_is_poor():
    gt = _gt([_gt_ann(1, 1, (10, 10, 40, 40))])
    # IoU of a 40x40 box shifted by 10 px: 30*40 / (2*1600 - 1200) = 0.6 -> counts at 0.5, not at 0.75.
    ap = coco_ap(gt, select_truth(gt), [_pred(1, (20, 10, 40, 40), 0.9)], 'bbox')
    assert ap['AP50'] == pytest.approx(1.0)
    assert ap['AP75'] == pytest.approx(0.0)


def test_per_image_precision_recall_as_masubuchi_2020_defines_it():
    gt = _gt([_gt_ann(1, 1, (10, 10, 20, 20)),  # image 1: found
              _gt_ann(2, 2, (10, 10, 20, 20)),  # image 2: detection in the wrong place
              _gt_ann(3, 3, (10, 10, 20, 20))],  # image 3: nothing detected
             images=4)  # image 4: no flake, one detection
    preds = [_pred(1, (10, 10, 20, 20), 0.9), _pred(1, (70, 70, 10, 10), 0.9),
             _pred(2, (60, 60, 20, 20), 0.9), _pred(4, (5, 5, 10, 10), 0.8),
             _pred(3, (10, 10, 20, 20), 0.1)]  # below the score threshold
    result = per_image_precision_recall(gt, select_truth(gt), preds, score_threshold=0.5)
    # TP: image 1. FP: images 2 and 4. FN: images 2 and 3.
    assert (result['tp'], result['fp'], result['fn']) == (1, 2, 2)
    assert result['precision'] == pytest.approx(1 / 3)
    assert result['recall'] == pytest.approx(1 / 3)


def test_layer_confusion_counts_matches_misses_and_spurious():
    gt = _gt([_gt_ann(1, 1, (10, 10, 20, 20), layers=1), _gt_ann(2, 1, (50, 50, 20, 20), layers=3),
              _gt_ann(3, 1, (10, 60, 20, 20), layers=20)])
    preds = [_pred(1, (10, 10, 20, 20), 0.9, layers=1), _pred(1, (50, 50, 20, 20), 0.9, layers=2),
             _pred(1, (75, 5, 10, 10), 0.9, layers=1)]
    confusion = layer_confusion(gt, select_truth(gt), preds)
    table = confusion['table']
    assert table['mono']['mono'] == 1
    assert table['few']['few'] == 1  # 3 layers read as 2: same class, not the exact count
    assert table['thick']['missed'] == 1
    assert table['spurious']['mono'] == 1
    assert confusion['exact_layers'] == 1 and confusion['matched'] == 2


def test_layer_range_and_materials_restrict_both_sides():
    gt = _gt([_gt_ann(1, 1, (10, 10, 20, 20), layers=2), _gt_ann(2, 1, (50, 50, 20, 20), layers=8),
              _gt_ann(3, 1, (10, 60, 20, 20), material='hbn', layers=60)])
    preds = [_pred(1, (10, 10, 20, 20), 0.9, layers=2), _pred(1, (50, 50, 20, 20), 0.8, layers=8)]
    metrics = evaluate(gt, preds, materials=['graphene'], min_layers=1, max_layers=3)
    assert metrics['materials']['graphene']['ground_truth'] == 1
    assert metrics['materials']['graphene']['bbox']['AP50'] == pytest.approx(1.0)
    assert 'hbn' not in metrics['materials']
    assert '| graphene | 1 | 1 |' in markdown_report(metrics)


def test_detections_convert_to_predictions_with_frame_sized_masks():
    mask = np.ones((5, 8), bool)
    det = Detection(bbox=(3, 4, 8, 5), mask=mask, material='graphene', layers=2.0, layers_std=0.1, score=0.7)
    (entry,) = detections_to_predictions(7, [det], H, W)
    assert entry['segmentation']['size'] == [H, W]
    assert entry['bbox'] == [3.0, 4.0, 8.0, 5.0] and entry['layer_class'] == 'few'


def test_cli_writes_json_and_markdown(tmp_path):
    gt = _gt([_gt_ann(1, 1, (10, 10, 20, 20))])
    (tmp_path / 'gt.json').write_text(json.dumps(gt))
    (tmp_path / 'pred.json').write_text(json.dumps({'predictions': [_pred(1, (10, 10, 20, 20), 0.9)],
                                                    'funnel': [{'stage': 'candidates', 'remaining': 4}]}))
    assert eval_main(['--gt', str(tmp_path / 'gt.json'), '--pred', str(tmp_path / 'pred.json'),
                      '--out', str(tmp_path / 'metrics')]) == 0
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert metrics['materials']['all']['segm']['AP'] == pytest.approx(1.0)
    assert '| candidates | 4 |' in (tmp_path / 'metrics.md').read_text()
    (tmp_path / 'bad.json').write_text(json.dumps([_pred(9, (1, 1, 2, 2), 0.5)]))
    with pytest.raises(SystemExit):
        eval_main(['--gt', str(tmp_path / 'gt.json'), '--pred', str(tmp_path / 'bad.json'),
                   '--out', str(tmp_path / 'x')])


def test_flake_level_precision_recall_with_layer_labels_as_labelling_tools_write_them():
    # A labelling tool's file: categories named by layer count, '>5L' open-ended.
    coco = {'images': [{'id': 1, 'width': 100, 'height': 100}],
            'categories': [{'id': 1, 'name': '3L'}, {'id': 2, 'name': '>5L'}, {'id': 3, 'name': 'scratch'}],
            'annotations': [
                {'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 20, 20], 'area': 400,
                 'segmentation': [[0, 0, 20, 0, 20, 20, 0, 20]]},
                {'id': 2, 'image_id': 1, 'category_id': 2, 'bbox': [50, 50, 30, 30], 'area': 900,
                 'segmentation': [[50, 50, 80, 50, 80, 80, 50, 80]]},
                {'id': 3, 'image_id': 1, 'category_id': 3, 'bbox': [0, 60, 10, 10], 'area': 100,
                 'segmentation': [[0, 60, 10, 60, 10, 70, 0, 70]]}]}
    gt = with_layer_labels(coco, 'nbse2')
    assert [a['attributes']['label'] for a in gt['annotations']] == ['3L', '>5L']  # the scratch is no flake
    open_ended = gt['annotations'][1]['attributes']
    assert open_ended['layers'] == 6 and open_ended['layers_max'] is None
    predictions = [_pred(1, [0, 0, 20, 20], 0.9, layers=4),       # found, wrong count
                   _pred(1, [50, 50, 30, 30], 0.8, layers=40),    # found, within '>5L'
                   _pred(1, [30, 0, 10, 10], 0.7, layers=3),      # nothing there
                   _pred(1, [0, 60, 10, 10], 0.2, layers=3)]      # below the cut
    m = instance_precision_recall(gt, gt['annotations'], predictions, score_threshold=0.5)
    assert (m['flakes'], m['detections'], m['matched']) == (2, 3, 2)
    assert m['recall'] == 1.0 and m['precision'] == pytest.approx(2 / 3) and m['layer_accuracy'] == 0.5
    assert m['per_label']['3L'] == {'flakes': 1, 'found': 1, 'recall': 1.0, 'layers_right': 0}
    assert m['per_predicted_label']['3L'] == {'detections': 1, 'right': 0, 'precision': 0.0}
    assert m['per_predicted_label']['>5L']['precision'] == 1.0

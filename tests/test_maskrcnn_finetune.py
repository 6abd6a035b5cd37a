"""Few-shot fine-tuning of the class-agnostic Mask R-CNN on a lab's labels of a material it never saw."""

import json

import cv2
import numpy as np
import pytest
from test_maskrcnn_train import tiny_config
import torch

from flake_detector import finetune as finetune_cli
from flake_detector.maskrcnn import train
from flake_detector.maskrcnn.data import CocoFlakeDataset, is_flake_target
from flake_detector.maskrcnn.finetune import finetune, learning_rate_at
from flake_detector.maskrcnn.model import build_model

SIZE = 96


def lab_coco(root, images=3):
    """NbSe2 as a lab labels it: categories named by layer count, no material, a dust speck."""
    rng = np.random.default_rng(4)
    categories = [{'id': 1, 'name': '3L'}, {'id': 2, 'name': '>5L'},
                  {'id': 3, 'name': 'dust', 'supercategory': 'contaminant'}]
    coco = {'images': [], 'annotations': [], 'categories': categories}
    for image_id in range(1, images + 1):
        image = np.full((SIZE, SIZE, 3), (90, 170, 240), np.uint8)
        for category in (1, 2, 3):
            x, y = (int(v) for v in rng.integers(10, SIZE - 40, 2))
            w = 6 if category == 3 else 24
            cv2.rectangle(image, (x, y), (x + w, y + w), (70, 120, 200) if category == 1 else (150, 90, 120), -1)
            coco['annotations'].append({'id': len(coco['annotations']) + 1, 'image_id': image_id,
                                        'category_id': category, 'iscrowd': 0, 'bbox': [x, y, w, w],
                                        'area': float(w * w),
                                        'segmentation': [[x, y, x + w, y, x + w, y + w, x, y + w]]})
        cv2.imwrite(str(root / f'{image_id}.png'), image)
        coco['images'].append({'id': image_id, 'file_name': f'{image_id}.png', 'width': SIZE, 'height': SIZE})
    path = root / 'labels.json'
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture()
def base(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(class_agnostic=True)
    model = build_model(config, pretrained_backbone=False)
    path = tmp_path / 'base.pt'
    train.save_checkpoint(path, model, config, {'note': 'untrained'})
    return path


def test_every_labelled_flake_of_any_material_is_a_target_but_no_contaminant_or_bulk():
    assert is_flake_target({'attributes': {'material': 'nbse2', 'layers': 6}}, {'name': '>5L'})
    assert is_flake_target({}, {'name': '3L'})
    assert not is_flake_target({'is_contaminant': True}, {'name': 'dust'})
    assert not is_flake_target({}, {'name': 'dust', 'supercategory': 'contaminant'})
    assert not is_flake_target({'attributes': {'layers': 300}}, {'name': 'graphite'})
    assert not is_flake_target({'attributes': {'layer_class': 'bulk'}}, {'name': 'hbn'})


def test_the_class_agnostic_dataset_takes_a_lab_material_the_class_heads_cannot(tmp_path):
    path = lab_coco(tmp_path)
    assert CocoFlakeDataset(path, input_size=SIZE, pixel_scale=1.0, class_agnostic=True).total_annotations == 6
    with pytest.raises(ValueError, match='no usable images'):
        CocoFlakeDataset(path, input_size=SIZE, pixel_scale=1.0, materials=('graphene',))


def test_finetuning_learns_from_the_labels_and_writes_the_lab_scale_into_the_checkpoint(tmp_path, base):
    path = lab_coco(tmp_path)
    out = finetune([str(path)], str(tmp_path / 'lab.pt'), base=str(base), steps=4, lr=1e-3, input_scale=0.5,
                   threads=1, material='nbse2', log=lambda text: None)
    before, _, before_version = train.model_from_checkpoint(base)
    after, config, after_version = train.model_from_checkpoint(out)
    assert config.pixel_scale == 0.5 and config.class_agnostic
    assert after_version != before_version
    changed = [name for name, value in after.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, before.state_dict()[name])]
    assert changed
    card = json.loads(out.with_suffix('.json').read_text())
    assert card['data_annotations'] == 6 and card['steps'] == 4 and card['material'] == 'nbse2'
    assert card['base_version'] == before_version and card['input_scale'] == 0.5


def test_schedule_warms_up_and_ends_at_a_tenth():
    rates = [learning_rate_at(step, 100, 1e-2) for step in range(100)]
    assert rates[0] == pytest.approx(1e-3) and rates[9] == pytest.approx(1e-2)
    assert rates[50] == pytest.approx(1e-2) and rates[80] == pytest.approx(1e-3) and rates[99] == pytest.approx(1e-3)


def test_the_command_refuses_a_class_heads_model_and_crops_with_clear_errors(tmp_path):
    path = lab_coco(tmp_path)
    config = tiny_config(class_agnostic=False)
    heads = tmp_path / 'heads.pt'
    train.save_checkpoint(heads, build_model(config, pretrained_backbone=False), config, {})
    with pytest.raises(SystemExit, match='class-agnostic'):
        finetune_cli.main(['--backend', 'maskrcnn', '--coco', str(path), '--base', str(heads), '--steps', '1',
                           '--out', str(tmp_path / 'x.pt')])
    (tmp_path / 'crops' / 'good').mkdir(parents=True)
    with pytest.raises(SystemExit, match='not --crops'):
        finetune_cli.main(['--backend', 'maskrcnn', '--crops', str(tmp_path / 'crops'), '--out',
                           str(tmp_path / 'x.pt')])

"""flake-finetune: a tiny cascade goes on training from a lab's labelled crops or COCO images and
writes a model card; the maskrcnn backend dispatches to its hook. Mechanism only, no scores."""

import json

import cv2
from detector_synth import make_frame
import numpy as np
import pytest
import torch

from flake_detector import finetune
from flake_detector.candidates import CandidateFinder
from flake_detector.cascade import Cascade, Target
from flake_detector.cascade_train import (
    TruthObject,
    coco_frames,
    crops_from_frames,
    layers_from_name,
    train_cascade,
)

TARGET = Target('graphene-thin-test', 'graphene', min_layers=1, max_layers=3, min_area_px=60)


def _frames(seeds):
    for seed in seeds:
        rng = np.random.default_rng(seed)
        layers = [int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(15, 40))]
        image, truths = make_frame(seed, 192, flakes=[('graphene', n) for n in layers])
        yield image, [TruthObject(t.material, t.layers, t.layers * 0.335, float(t.mask.sum()), t.centre)
                      for t in truths], None


@pytest.fixture(scope='module')
def base_cascade(tmp_path_factory):
    torch.set_num_threads(1)
    finder = CandidateFinder(crop_size=40, merge_distance_px=20)
    data = crops_from_frames(_frames(range(0, 12)), finder, TARGET)
    cascade = train_cascade(data, TARGET, nets=2, seed=0, width=0.125, crop_size=40, net_input=20, batch=32,
                            max_steps=6, stop_accuracy=0.0, eval_every=3)
    path = tmp_path_factory.mktemp('base') / 'base.pt'
    cascade.save(path, {'command': 'test'})
    return path, data


def _write_crops(folder, data):
    for label, name in ((1, 'good'), (0, 'bad')):
        (folder / name).mkdir(parents=True)
        for k, crop in enumerate(data.crops[data.labels == label][:12]):
            cv2.imwrite(str(folder / name / f'{k}.png'), crop)


def test_finetune_from_labelled_crops_writes_weights_and_a_card(tmp_path, base_cascade, capsys):
    base_path, data = base_cascade
    _write_crops(tmp_path / 'crops', data)
    out = tmp_path / 'lab' / 'cascade.pt'
    assert finetune.main(['--base', str(base_path), '--crops', str(tmp_path / 'crops'), '--out', str(out),
                          '--steps', '4', '--batch', '16', '--threads', '1', '--holdout', '0.3']) == 0
    card = json.loads(out.with_suffix('.json').read_text())
    assert card['finetuned_from']['weights'] == 'base.pt'
    assert card['finetuned_from']['target']['name'] == TARGET.name
    assert card['training']['steps'] == 4 and len(card['training']['nets_report']) == 2
    assert card['data']['training_good'] + card['data']['held_out_good'] == min(12, data.good)
    assert set(card['held_out']) == {'before', 'after'}
    assert card['command'].startswith('flake-finetune --base')
    tuned = Cascade.load(out)
    assert 'finetuned' in tuned.version and len(tuned.nets) == 2
    # The nets moved: fine-tuning changed what they say about the same crops.
    base = Cascade.load(base_path)
    assert not np.allclose(base.probabilities(data.crops[:20], 0), tuned.probabilities(data.crops[:20], 0))
    assert '| fine-tuned' in capsys.readouterr().out


def test_finetune_from_a_lab_coco_with_layer_categories_and_another_material(tmp_path, base_cascade):
    base_path, _ = base_cascade
    images, annotations = [], []
    for k, seed in enumerate(range(100, 106)):
        image, truths = make_frame(seed, 192, flakes=[('graphene', 2), ('graphene', 3), ('graphene', 30)])
        name = f'flake{k // 2 + 1}-150x {k % 2 + 1}.png'
        cv2.imwrite(str(tmp_path / name), image)
        images.append({'id': k + 1, 'file_name': name, 'width': 192, 'height': 192})
        for truth in truths:
            contours, _ = cv2.findContours(truth.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            polygon = max(contours, key=cv2.contourArea).reshape(-1).astype(float).tolist()
            category = 1 if truth.layers == 2 else 2 if truth.layers == 3 else 3
            x, y, w, h = cv2.boundingRect(truth.mask.astype(np.uint8))
            annotations.append({'id': len(annotations) + 1, 'image_id': k + 1, 'category_id': category,
                                'segmentation': [polygon], 'bbox': [x, y, w, h], 'area': float(truth.mask.sum()),
                                'iscrowd': 0})
    coco = tmp_path / 'labels.json'
    coco.write_text(json.dumps({'images': images, 'annotations': annotations,
                                'categories': [{'id': 1, 'name': '2L'}, {'id': 2, 'name': '3L'},
                                               {'id': 3, 'name': '>5L'}]}))
    # Layers come from the category names, the material from --material.
    objects = [o for _, truths, _ in coco_frames(coco, material='nbse2') for o in truths]
    assert {o.material for o in objects} == {'nbse2'}
    assert sorted({o.layers for o in objects}) == [2.0, 3.0, float('inf')]
    assert all(np.isfinite(o.centre_px).all() for o in objects)
    out = tmp_path / 'nbse2.pt'
    assert finetune.main(['--base', str(base_path), '--coco', str(coco), '--material', 'nbse2', '--layers', '1-5',
                          '--group-pattern', r'flake\d+', '--holdout', '0.34', '--steps', '3', '--batch', '16',
                          '--threads', '1', '--out', str(out)]) == 0
    card = json.loads(out.with_suffix('.json').read_text())
    tuned = Cascade.load(out)
    assert tuned.target.material == 'nbse2' and tuned.target.max_layers == 5
    # Views of one flake are held out together.
    assert len(card['data']['held_out_groups']) == 1 and card['data']['held_out_groups'][0].endswith(('flake1',
                                                                                                     'flake2',
                                                                                                     'flake3'))


def test_layer_names_of_labelling_tools():
    assert layers_from_name('3L') == 3 and layers_from_name('1 layer') == 1
    assert layers_from_name('>5L') == float('inf') and layers_from_name('>=5L') == float('inf')
    assert np.isnan(layers_from_name('graphene'))


def test_bad_input_is_a_message_not_a_traceback(tmp_path, base_cascade):
    base_path, _ = base_cascade
    with pytest.raises(SystemExit) as exc:
        finetune.main(['--base', str(base_path), '--out', str(tmp_path / 'x.pt')])
    assert exc.value.code == 2
    (tmp_path / 'empty' / 'good').mkdir(parents=True)
    (tmp_path / 'empty' / 'bad').mkdir()
    with pytest.raises(SystemExit, match='flake-finetune: error: no crops'):
        finetune.main(['--base', str(base_path), '--crops', str(tmp_path / 'empty'), '--out', str(tmp_path / 'x.pt')])
    with pytest.raises(SystemExit, match='neither a weights file nor a shipped target'):
        finetune.main(['--base', 'nonsense', '--crops', str(tmp_path / 'empty'), '--out', str(tmp_path / 'x.pt')])


def test_maskrcnn_backend_passes_the_command_line_to_its_fine_tuning(tmp_path, monkeypatch):
    from flake_detector.maskrcnn import finetune as maskrcnn_finetune

    coco = tmp_path / 'labels.json'
    coco.write_text('{"images": [], "annotations": [], "categories": []}')
    calls = []
    monkeypatch.setattr(maskrcnn_finetune, 'finetune', lambda **kwargs: calls.append(kwargs) or kwargs['out'])
    assert finetune.main(['--backend', 'maskrcnn', '--coco', str(coco), '--steps', '7', '--material', 'nbse2',
                          '--input-scale', '0.2', '--out', str(tmp_path / 'm.pt')]) == 0
    assert calls[0]['coco'] == [str(coco)] and calls[0]['steps'] == 7 and calls[0]['material'] == 'nbse2'
    assert calls[0]['input_scale'] == 0.2 and '--input-scale 0.2' in calls[0]['command']
    assert calls[0]['lr'] == 2e-3  # the Mask R-CNN's own default, not the cascade's

"""Mask R-CNN training pipeline on a tiny synthetic COCO set of coloured polygons."""

import json

import cv2
import numpy as np
import pytest
import torch

from flake_detector.maskrcnn import train
from flake_detector.maskrcnn.data import Augmentation, CocoFlakeDataset, collate, resolve_label
from flake_detector.maskrcnn.model import ModelConfig, build_model, class_index, set_trainable

SIZE = 96
# (category name, attributes, BGR colour): a sim-style category with attributes, and
# lab-style categories that carry the layer class in their name.
KINDS = [
    ('graphene', {'material': 'graphene', 'layers': 1}, (150, 120, 110)),
    ('hBN_thick', {}, (60, 200, 90)),
    ('MoS2-few', {}, (40, 40, 160)),
]


def make_dataset(root, images=6, seed=0):
    rng = np.random.default_rng(seed)
    (root / 'images').mkdir(parents=True)
    categories = [{'id': i + 1, 'name': name, 'supercategory': 'flake'} for i, (name, _, _) in enumerate(KINDS)]
    categories.append({'id': 101, 'name': 'dust', 'supercategory': 'contaminant'})
    coco = {'images': [], 'annotations': [], 'categories': categories}
    for image_id in range(1, images + 1):
        image = np.full((SIZE, SIZE, 3), (120, 110, 140), np.uint8)
        for k in rng.choice(len(KINDS), size=2, replace=False):
            centre = rng.uniform(25, SIZE - 25, 2)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
            radii = rng.uniform(10, 18, 6)
            polygon = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
            polygon = polygon.round().astype(np.int32)
            cv2.fillPoly(image, [polygon], KINDS[k][2])
            x, y, w, h = cv2.boundingRect(polygon)
            coco['annotations'].append({
                'id': len(coco['annotations']) + 1, 'image_id': image_id, 'category_id': int(k) + 1,
                'segmentation': [polygon.flatten().astype(float).tolist()], 'bbox': [x, y, w, h],
                'area': float(w * h), 'iscrowd': 0, 'attributes': KINDS[k][1]})
        coco['annotations'].append({'id': len(coco['annotations']) + 1, 'image_id': image_id, 'category_id': 101,
                                    'segmentation': [[5, 5, 9, 5, 9, 9]], 'bbox': [5, 5, 4, 4], 'area': 8.0,
                                    'iscrowd': 0, 'is_contaminant': True})
        name = f'images/{image_id:03d}.png'
        cv2.imwrite(str(root / name), image)
        coco['images'].append({'id': image_id, 'file_name': name, 'width': SIZE, 'height': SIZE})
    (root / 'annotations.json').write_text(json.dumps(coco))
    return root / 'annotations.json'


def tiny_config(**overrides):
    values = dict(input_size=SIZE, pixel_scale=1.0, fpn_channels=32, embedding_dim=32, box_head_dim=64,
                  mask_head_channels=(32,), anchor_sizes=(16, 32, 64, 128), rpn_proposals_train=100,
                  rpn_proposals_test=50, roi_batch_per_image=32)
    values.update(overrides)
    return ModelConfig(**values)


def test_label_mapping_from_attributes_and_category_names():
    assert resolve_label({'attributes': {'material': 'graphene', 'layers': 1}}, {'name': 'graphene'}) \
        == class_index('graphene', 'mono')
    assert resolve_label({}, {'name': 'hBN_thick'}) == class_index('hbn', 'thick')
    assert resolve_label({}, {'name': 'MoS2-few'}) == class_index('mos2', 'few')
    assert resolve_label({'attributes': {'material': 'wte2', 'layer_class': 'bulk'}}, {'name': 'wte2'}) is None
    assert resolve_label({'attributes': {'material': 'wte2', 'layers': 80}}, {'name': 'wte2'}) is None
    assert resolve_label({'is_contaminant': True}, {'name': 'dust'}) is None
    assert resolve_label({}, {'name': 'graphene'}) is None  # no thickness information at all


def test_dataset_geometry_dropping_and_augmentation(tmp_path):
    annotations = make_dataset(tmp_path)
    plain = CocoFlakeDataset(annotations, input_size=128, pixel_scale=0.0)
    image, target = plain[0]
    assert image.shape == (3, 128, 128)
    # Masubuchi et al. (2020) resize: 96 px image scaled to 128, nothing left to pad for a square image.
    assert float(image[:, -1, -1].sum()) > 0
    assert target['masks'].shape[1:] == (128, 128) and len(target['labels']) == 2
    assert plain.total_annotations == 12
    padded = CocoFlakeDataset(annotations, input_size=128, pixel_scale=1.0)
    image, _ = padded[0]
    assert float(image[:, 100:, 100:].abs().sum()) == 0.0  # zero padding beyond the 96 px image
    dropped = CocoFlakeDataset(annotations, input_size=SIZE, pixel_scale=1.0, drop_fraction=0.3, seed=3)
    assert sum(dropped.class_counts().values()) == 12 - round(0.3 * 12)
    again = CocoFlakeDataset(annotations, input_size=SIZE, pixel_scale=1.0, drop_fraction=0.3, seed=3)
    assert again.class_counts() == dropped.class_counts()
    augmented = CocoFlakeDataset(annotations, input_size=SIZE, pixel_scale=1.0, seed=1,
                                 augment=Augmentation(probability=1.0, rotation_deg=30.0))
    image, target = augmented[0]
    for mask, box in zip(target['masks'], target['boxes'], strict=True):
        ys, xs = np.nonzero(mask.numpy())
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    only_hbn = CocoFlakeDataset(annotations, input_size=SIZE, pixel_scale=1.0, materials=('hbn',))
    assert set(only_hbn.class_counts()) == {class_index('hbn', 'thick')}


def test_a_few_training_steps_lower_the_loss(tmp_path):
    torch.set_num_threads(1)  # more threads thrash on shared, busy cores
    torch.manual_seed(0)
    dataset = CocoFlakeDataset(make_dataset(tmp_path), input_size=SIZE, pixel_scale=1.0, seed=0)
    images, targets = collate([dataset[i] for i in range(2)])
    model = build_model(tiny_config(), pretrained_backbone=False)
    set_trainable(model, 'all')
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                                weight_decay=1e-4)

    def loss_now():
        torch.manual_seed(123)  # same proposal sampling for both measurements
        with torch.no_grad():
            return float(train.weighted_loss(model(list(images), list(targets))))

    before = loss_now()
    for _ in range(25):
        losses = train.train_step(model, optimizer, images, targets)
        assert set(losses) >= {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'total'}
    after = loss_now()
    assert after < 0.7 * before, (before, after)


def test_weighted_loss_uses_masubuchi_2020_weights():
    losses = {'loss_classifier': torch.tensor(1.0), 'loss_box_reg': torch.tensor(2.0),
              'loss_mask': torch.tensor(3.0), 'loss_objectness': torch.tensor(4.0)}
    assert float(train.weighted_loss(losses)) == pytest.approx(0.6 + 2 + 3 + 4)
    assert train.parse_stages(train.MASUBUCHI_2020_STAGES) == [
        train.Stage('heads', 1e-3), train.Stage('layer4', 1e-3), train.Stage('all', 1e-4),
        train.Stage('all', 1e-5)]
    assert train.parse_stages('heads:4e-3,all:1e-3:3') == [train.Stage('heads', 4e-3), train.Stage('all', 1e-3, 3)]
    with pytest.raises(ValueError):
        train.parse_stages('backbone:1e-3')


def test_stage_freezing():
    model = build_model(tiny_config(), pretrained_backbone=False)
    heads = set_trainable(model, 'heads')
    layer4 = set_trainable(model, 'layer4')
    everything = set_trainable(model, 'all')
    assert heads < layer4 < everything == len(list(model.parameters()))
    set_trainable(model, 'heads')
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith('backbone.body.'))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith('roi_heads.'))


def test_cli_checkpoints_card_resume_and_export(tmp_path, capsys):
    annotations = make_dataset(tmp_path / 'data', images=3)
    out = tmp_path / 'run'
    common = ['--data', str(annotations.parent), '--out', str(out), '--input-size', '96', '--pixel-scale', '1',
              '--fpn-channels', '16', '--anchor-sizes', '16,32,64,128', '--iterations-per-epoch', '1',
              '--epochs-per-stage', '1', '--batch-size', '1', '--no-imagenet', '--threads', '1']
    assert train.main(common + ['--stages', 'heads:1e-3']) == 0
    card = json.loads((out / 'last.json').read_text())
    assert card['epochs_done'] == 1 and card['seed'] == 0 and card['commit']
    assert card['command'].startswith('flake-train-maskrcnn --data')
    assert np.isfinite(card['metrics']['loss'])
    # Resume with a longer schedule continues at stage 2 instead of starting over.
    assert train.main(common + ['--stages', 'heads:1e-3,all:1e-4', '--resume',
                                '--export', str(tmp_path / 'ship.pt')]) == 0
    assert 'resuming at stage 2 epoch 1' in capsys.readouterr().out
    final = json.loads((out / 'final.json').read_text())
    assert [h['trainable'] for h in final['history']] == ['heads', 'all']
    assert '--resume' in final['command'] and '--resume' not in final['first_command']
    assert final['history'][-1]['iterations'] == 2 and final['history'][-1]['cpu_seconds'] > 0
    card = train.annotate_card(tmp_path / 'ship.pt', validation_seeds=[12])
    assert json.loads((tmp_path / 'ship.json').read_text())['validation_seeds'] == [12] == card['validation_seeds']
    model, config, version = train.model_from_checkpoint(tmp_path / 'ship.pt')
    assert config.input_size == 96 and version.startswith('maskrcnn-mobilenet_v2_fpn-96-mxc-soft-')
    shipped = torch.load(tmp_path / 'ship.pt', weights_only=False)
    assert shipped['model']['roi_heads.box_predictor.cls_score.weight'].dtype == torch.float16
    # Bad input is reported, not a traceback.
    assert train.main(['--data', str(tmp_path / 'missing'), '--out', str(out)]) == 2


def test_paper_backbones_build_offline_and_local_weights_load_by_shape(tmp_path):
    resnet = build_model(ModelConfig(backbone='resnet50_fpn', fpn_channels=256, input_size=256),
                         pretrained_backbone=False)
    assert sum(p.numel() for p in resnet.backbone.body.parameters()) > 20_000_000
    with pytest.raises(ValueError, match='no offline ImageNet weights'):
        build_model(ModelConfig(backbone='resnet101_fpn', fpn_channels=256), pretrained_backbone=True)
    # A local weights file of another class count (like a COCO model): everything but the
    # class-specific predictors is taken over.
    source = build_model(tiny_config(class_names=('background', 'a', 'b')), pretrained_backbone=False)
    weights = tmp_path / 'coco_like.pth'
    torch.save(source.state_dict(), weights)
    from flake_detector.maskrcnn.model import load_matching_weights
    target = build_model(tiny_config(), pretrained_backbone=False)
    skipped = load_matching_weights(target, weights)
    assert skipped and all('predictor' in name for name in skipped)
    torch.testing.assert_close(target.backbone.body['0'][0].weight, source.backbone.body['0'][0].weight)


def test_per_material_transfer_starts_from_the_all_material_weights(tmp_path):
    annotations = make_dataset(tmp_path / 'data', images=3)
    common = ['--data', str(annotations), '--input-size', '96', '--pixel-scale', '1', '--fpn-channels', '16',
              '--anchor-sizes', '16,32,64,128', '--iterations-per-epoch', '1', '--epochs-per-stage', '1',
              '--batch-size', '1', '--no-imagenet', '--threads', '1']
    assert train.main(common + ['--out', str(tmp_path / 'all'), '--stages', 'heads:1e-3']) == 0
    assert train.main(common + ['--out', str(tmp_path / 'hbn'), '--stages', 'all:1e-4', '--materials', 'hbn',
                                '--init', str(tmp_path / 'all' / 'final.pt')]) == 0
    card = json.loads((tmp_path / 'hbn' / 'final.json').read_text())
    assert card['materials'] == ['hbn'] and card['init'].endswith('(0 tensors not matched)')
    hbn_annotations = sum(a['category_id'] == 2 for a in json.loads(annotations.read_text())['annotations'])
    assert card['data_annotations'] == hbn_annotations > 0


def shipped_design(**overrides):
    """The shipped model's design (Makefile MASKRCNN_MODEL) at test size."""
    values = dict(input_size=SIZE, pixel_scale=1.0, fpn_channels=32, box_head_dim=64, mask_head_channels=(32,),
                  class_agnostic=True, anchor_sizes='12/16/24,28/36/48,64/80/96,128/160/192', anchor_offsets=2,
                  rpn_fg_iou=0.5, rpn_bg_iou=0.3, embedding_dim=16, rpn_proposals_train=100,
                  rpn_proposals_test=50, roi_batch_per_image=32, soft_labels={'enabled': False})
    values.update(overrides)
    return ModelConfig(**values)


def test_a_few_training_steps_lower_the_loss_of_the_class_agnostic_design(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dataset = CocoFlakeDataset(make_dataset(tmp_path), input_size=SIZE, pixel_scale=1.0, seed=0, class_agnostic=True)
    images, targets = collate([dataset[i] for i in range(2)])
    assert all(set(t['labels'].tolist()) == {1} for t in targets)  # one class: every flake
    # The shipped initialisation: the offline ImageNet MobileNetV2 (a dependency of the project).
    model = build_model(shipped_design(), pretrained_backbone=None)
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    set_trainable(model, 'all')
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                                weight_decay=1e-4)

    def losses_now():
        torch.manual_seed(123)
        with torch.no_grad():
            return {name: float(value) for name, value in model(list(images), list(targets)).items()}

    before = losses_now()
    for iteration in range(40):
        model.rpn.iteration = iteration
        train.train_step(model, optimizer, images, targets)
    after = losses_now()
    # The two terms the class-agnostic design changes (one class, dense small anchors) learn first.
    for name in ('loss_objectness', 'loss_classifier'):
        assert after[name] < 0.8 * before[name], (name, before, after)


def test_model_config_expresses_the_cpu_design_and_rejects_nonsense():
    config = shipped_design()
    assert config.anchor_sizes == ((12, 16, 24), (28, 36, 48), (64, 80, 96), (128, 160, 192))
    assert config.anchors_per_location == 3 * 3 * 4  # sizes x aspect ratios x offsets^2
    assert config.class_names == ('background', 'flake')
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config and not again.embedding_relu
    # A checkpoint written before the linear embedding keeps its ReLU.
    legacy = {k: v for k, v in config.to_dict().items() if k != 'embedding_relu'}
    assert ModelConfig.from_dict(legacy).embedding_relu
    model = build_model(config, pretrained_backbone=False)
    assert model.rpn.proposal_matcher.high_threshold == 0.5 and model.rpn.proposal_matcher.low_threshold == 0.3
    assert model.rpn.head.embedding.out_channels == 36 * 16
    for bad in (dict(rpn_fg_iou=0.2, rpn_bg_iou=0.3), dict(anchor_sizes='12/16,28'), dict(anchor_offsets=0),
                dict(class_agnostic=True, class_names=('background', 'a', 'b')), dict(embedding_dim=0)):
        with pytest.raises(ValueError):
            build_model(shipped_design(**bad), pretrained_backbone=False)

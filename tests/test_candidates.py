"""Greplova et al. (2020) candidate finder: recall on synthetic and simulated frames, crops, wafer coordinates."""

from detector_synth import make_frame, sim_frames
import numpy as np
import pytest

from flake_core.geometry import Affine2D
from flake_detector.candidates import Candidate, CandidateFinder


def _covered(candidates, centre):
    for c in candidates:
        x, y, side = c.window
        if x <= centre[0] < x + side and y <= centre[1] < y + side:
            return True
    return False


def test_finder_recalls_every_synthetic_flake_including_faint_monolayers():
    finder = CandidateFinder()
    missed = total = 0
    for seed in range(6):
        image, truths = make_frame(seed, 256, flakes=[('graphene', n) for n in (1, 1, 2, 3, 5)])
        candidates = finder.find(image)
        total += len(truths)
        missed += sum(not _covered(candidates, t.centre) for t in truths)
    assert missed == 0, f'missed {missed} of {total} flakes'


def test_finder_recall_on_simulated_frames():
    finder = CandidateFinder()
    found = total = 0
    for image, truth in sim_frames(seed=31, count=4, size=512):
        candidates = finder.find(image)
        for obj in truth.flakes:
            if obj.area_px < 60 or obj.kind != 'flake':
                continue
            total += 1
            vs, us = np.nonzero(obj.mask)
            found += _covered(candidates, (us.mean(), vs.mean()))
    assert total >= 5
    assert found / total >= 0.95


def test_crops_are_fixed_size_and_large_flakes_fit_whole():
    finder = CandidateFinder(crop_size=80)
    image, truths = make_frame(2, 512, flakes=[('graphene', 2)], clutter=False, radius=(90, 100))
    (candidate,) = [c for c in finder.find(image) if c.area_px > 1000]
    assert candidate.window[2] > 80  # larger than the crop: the window grows, the crop is resized
    crops = finder.crops(image, [candidate])
    assert crops.shape == (1, 80, 80, 3) and crops.dtype == np.uint8
    small = CandidateFinder(crop_size=80, fit_large=False)
    (c2,) = [c for c in small.find(image) if c.area_px > 1000]
    assert c2.window[2] == 80


def test_crop_near_the_border_is_padded_not_shifted():
    finder = CandidateFinder(crop_size=40)
    image = np.full((100, 100, 3), 120, np.uint8)
    image[0:10, 0:10] = 60
    candidate = Candidate((4.5, 4.5), (0, 0, 10, 10), np.ones((10, 10), bool), (-15, -15, 40), 1.0)
    crop = finder.crop(image, candidate)
    assert crop.shape == (40, 40, 3)
    assert crop[20, 20, 0] == 60 and crop[39, 39, 0] == 120


def test_near_duplicates_merge_and_wafer_coordinates_follow_the_pixel_map():
    image = np.full((200, 200, 3), 130, np.uint8)
    image[50:60, 50:60] = 70
    image[50:60, 75:85] = 70  # 25 px away: the same object for a 40 px merge distance
    image[150:165, 150:165] = 60
    to_wafer = Affine2D(1e-6, 0.0, 2e-3, 0.0, -1e-6, 3e-3)
    candidates = CandidateFinder(merge_distance_px=40, min_area_px=20, work_size=0).find(image, to_wafer)
    assert len(candidates) == 2
    pair = min(candidates, key=lambda c: c.centre_px[0])
    assert pair.merged == 2
    u, v = pair.centre_px
    assert u == pytest.approx(67.0, abs=1.5) and v == pytest.approx(54.5, abs=1.5)
    assert pair.wafer_xy == pytest.approx((2e-3 + u * 1e-6, 3e-3 - v * 1e-6))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        CandidateFinder(window=4)
    with pytest.raises(ValueError):
        CandidateFinder(crop_size=2)
    with pytest.raises(ValueError):
        CandidateFinder().find(np.zeros((0, 0, 3), np.uint8))

"""The lattice found on the image and the self-calibration: spacing and rotation from the spectrum,
the sublattices told apart, column ratios recovered across detectors, contamination masked, tiles."""

from dataclasses import replace

import cv2
import numpy as np
import pytest

from flake_core.materials import stem_lattice
from flake_detector.defects.adf import column_ratio, z_exponent
from flake_detector.defects.calibrate import (
    MASK_CONTAMINATION,
    MASK_OK,
    calibrate_cells,
    calibrated_crops,
    decide_sublattice,
)
from flake_detector.defects.lattice import CanonicalTransform, find_lattice, plan_tiles, to_canonical
from flake_detector.defects.simulate import StemSimConfig, balanced_config, simulate

ANY = (0.7, 2.1)


def _frame(material='mote2', lattice_px=30.0, size=512, **changes):
    a = stem_lattice(material).lattice_a
    config = StemSimConfig(material=material, height=size, width=size, pixel_size=a / lattice_px, dose=(8.0, 8.0),
                           defect_probabilities=(0.0, 0.1, 0.04, 0.04, 0.02, 0.02))
    return replace(config, **changes)


@pytest.mark.parametrize('material, lattice_px, rotation', [('mote2', 120.0, 0.0), ('wse2', 8.2, -17.0),
                                                             ('ws2', 16.0, 28.0), ('mos2', 30.0, 5.0)])
def test_lattice_constant_and_rotation_come_from_the_spectrum(material, lattice_px, rotation):
    size = 1024 if lattice_px > 60 else 512
    sample = simulate(_frame(material, lattice_px, size, rotation_deg=(rotation, rotation)), seed=1)
    fit = find_lattice(sample.image, lattice_px * 1.1)      # a pixel size 10 % off is still found
    assert fit.found and fit.strength > 100
    assert fit.lattice_px == pytest.approx(lattice_px, rel=0.01)
    assert fit.rotation_deg == pytest.approx(rotation, abs=0.3)
    assert fit.scale_error == pytest.approx(-1 / 11, abs=0.01)


def test_no_lattice_in_noise_or_in_an_optical_looking_picture():
    rng = np.random.default_rng(0)
    noise = rng.poisson(5.0, size=(512, 512)).astype(np.float32)
    blobs = cv2.GaussianBlur(rng.random((512, 512)).astype(np.float32), (0, 0), 12) * 1000
    for image in (noise, blobs):
        fit = find_lattice(image, 30.0)
        assert not fit.found and fit.strength < 10


def test_canonical_transform_round_trips_and_turns_the_lattice_straight():
    sample = simulate(_frame(lattice_px=15.0, size=400, rotation_deg=(12.0, 12.0)), seed=2)
    canonical, valid, transform = to_canonical(sample.image, 12.0, 2.0)
    points = np.array([[10.0, 20.0], [399.0, 0.0], [200.0, 300.0]])
    np.testing.assert_allclose(transform.to_image(transform.to_canonical(points)), points, atol=1e-6)
    assert valid.mean() > 0.6 and not valid.all()          # the turned frame leaves empty corners
    step = transform.to_canonical(sample.chalcogen_xy) - transform.to_canonical(sample.metal_xy)
    # metal -> chalcogen of a unit cell is (-a/2, a/(2 sqrt 3)) with a = 30 px in the networks' frame.
    np.testing.assert_allclose(np.median(step, axis=0), [-15.0, 15.0 / np.sqrt(3)], atol=0.5)
    assert CanonicalTransform(0.0, 1.0, (0, 0), (0, 0)).matrix.tolist() == [[1, 0, 0], [0, 1, 0]]


def test_tiles_partition_the_frame_central_first():
    tiles = plan_tiles(8192, 8192, 10.0, 3.0)
    cover = np.zeros((8192 // 64, 8192 // 64), int)
    for tile in tiles:
        x0, y0, x1, y1 = tile.core
        cover[y0 // 64:(y1 + 63) // 64, x0 // 64:(x1 + 63) // 64] += 1
        rx0, ry0, rx1, ry1 = tile.region
        assert rx0 <= x0 and ry0 <= y0 and rx1 >= x1 and ry1 >= y1
        assert (rx1 - rx0) * 3.0 * 1.37 <= 2048 + 1 and (ry1 - ry0) * 3.0 * 1.37 <= 2048 + 1
    cores = sum((t.core[2] - t.core[0]) * (t.core[3] - t.core[1]) for t in tiles)
    assert cores == 8192 * 8192 and cover.min() >= 1
    first = tiles[0].core
    assert first[0] <= 4096 <= first[2] + 1 and first[1] <= 4096 <= first[3] + 1
    assert len(plan_tiles(512, 512, 10.0, 2.0)) == 1


@pytest.mark.parametrize('material, inner, swap, basis', [
    ('mote2', 80.0, False, 'contrast'), ('mose2', 50.0, True, 'contrast'), ('ws2', 60.0, True, 'contrast'),
    ('wse2', 15.0, True, 'half-filled columns'), ('mos2', 10.0, False, 'half-filled columns')])
def test_self_calibration_finds_the_metal_and_the_column_ratio(material, inner, swap, basis):
    lattice = stem_lattice(material)
    config = _frame(material, detector_inner_mrad=(inner, inner), exponent_spread=0.0,
                    swap_probability=1.0 if swap else 0.0, dose=(10.0, 10.0))
    sample = simulate(config, seed=3)
    calibration, decision = calibrate_cells(sample.image, sample.unit_boxes, 30.0, lattice, ANY)
    assert decision.metal_site == ('Q' if swap else 'P') and decision.basis == basis and decision.certain
    truth = sample.params['chalcogen_metal_ratio']
    assert truth == pytest.approx(column_ratio(lattice.metal_z, lattice.chalcogen_z, z_exponent(inner), 2)
                                  * (1 + sample.params['stack_factor']) / 2)
    assert calibration.ratio == pytest.approx(truth, rel=0.08)
    ok = calibration.mask == MASK_OK
    k = sample.unit_classes
    # A perfect cell reads (1, 1), one chalcogen missing (1, 0.5), the metal missing (0, ~1): any material, any
    # detector (a faint sulphur pair beside a missing tungsten loses the tail of its bright neighbour).
    for cls, (metal, chalcogen, tolerance) in ((0, (1.0, 1.0, 0.1)), (1, (1.0, 0.5, 0.1)), (3, (0.0, 1.0, 0.2))):
        chosen = ok & (k == cls)
        assert np.median(calibration.metal[chosen]) == pytest.approx(metal, abs=0.1)
        assert np.median(calibration.chalcogen[chosen]) == pytest.approx(chalcogen, abs=tolerance)


def test_without_half_filled_columns_a_contrast_near_one_is_reported_uncertain():
    lattice = stem_lattice('wse2')
    rng = np.random.default_rng(0)
    p = rng.normal(100.0, 3.0, 400)
    q = rng.normal(98.0, 3.0, 400)
    decision = decide_sublattice(p, q, lattice, ANY)
    assert not decision.certain and decision.basis == 'assumed'


def test_contamination_is_masked_and_clean_lattice_kept():
    config = _frame('wse2', contamination=(0.25, 0.25), contamination_level=(0.5, 1.0), dose=(10.0, 10.0),
                    detector_inner_mrad=(80.0, 80.0))
    sample = simulate(config, seed=4)
    calibration, _ = calibrate_cells(sample.image, sample.unit_boxes, 30.0, stem_lattice('wse2'), ANY)
    masked = calibration.mask != MASK_OK
    unclean = ~sample.unit_clean
    assert (calibration.mask[unclean] == MASK_CONTAMINATION).mean() > 0.85
    assert masked[sample.unit_clean].mean() < 0.3              # neighbours of contamination go too
    assert (~masked & unclean).sum() <= 0.05 * unclean.sum()


def test_calibrated_crops_put_the_chalcogen_left_and_the_metal_right_either_way_round():
    crops = []
    for swap in (0.0, 1.0):
        config = balanced_config(_frame('wse2', swap_probability=swap, detector_inner_mrad=(80.0, 80.0),
                                        dose=(1e4, 1e4), read_noise=0.0))
        sample = simulate(config, seed=5)
        calibration, decision = calibrate_cells(sample.image, sample.unit_boxes, 30.0, stem_lattice('wse2'), ANY)
        inputs = calibrated_crops(sample.image, sample.unit_boxes, calibration, decision.metal_site, 16)
        perfect = inputs[sample.unit_classes == 0].mean(axis=0)
        no_metal = inputs[sample.unit_classes == 3].mean(axis=0)
        assert perfect[0].max() == pytest.approx(perfect[1].max(), rel=0.25)   # both columns normalised
        assert no_metal[1].max() < 0.3 * perfect[1].max()
        crops.append(perfect)
    # Turned by 180 degrees, the swapped crystal's cell is the plain one's (up to a pixel of crop rounding).
    for channel in (0, 1):
        peaks = [np.unravel_index(np.argmax(c[channel]), c[channel].shape) for c in crops]
        assert np.abs(np.subtract(*peaks)).max() <= 2
        assert crops[0][channel].max() == pytest.approx(crops[1][channel].max(), rel=0.15)


def test_crops_stay_bounded_where_a_sublattice_is_empty():
    # Every chalcogen column gone: the chalcogen references are noise about zero (or below it), and a crop
    # divided by them would reach 1e6 and wreck a classifier's batch statistics. They are floored instead.
    config = _frame('ws2', detector_inner_mrad=(120.0, 120.0), dose=(4.0, 4.0), swap_probability=0.0,
                    defect_probabilities=(0.0, 0.0, 1.0, 0.0, 0.0, 0.0))
    sample = simulate(config, seed=6)
    lattice = stem_lattice('ws2')
    decision = replace(decide_sublattice(np.ones(3), np.ones(3), lattice, ANY), metal_site='P')
    calibration, _ = calibrate_cells(sample.image, sample.unit_boxes, 30.0, lattice, ANY, decision=decision)
    floor = calibration.chalcogen_reference.min()
    assert floor > 0 and (calibration.chalcogen_reference == floor).mean() > 0.5
    assert calibration.metal_reference.min() >= floor
    inputs = calibrated_crops(sample.image, sample.unit_boxes, calibration, 'P', 16)
    assert np.isfinite(inputs).all() and np.abs(inputs).max() < 60

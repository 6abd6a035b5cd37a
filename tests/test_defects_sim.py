"""ADF-STEM simulator of 2H monolayers: ground truth consistent with the lattice, the material and the detector."""

from dataclasses import replace
import math

import numpy as np
import pytest

from flake_core.materials import STEM_MATERIALS, stem_lattice
from flake_detector.defects import CLASS_COUNT, class_names
from flake_detector.defects.adf import AdfDetector, column_ratio, detector_from, z_exponent
from flake_detector.defects.simulate import LATTICE_A, SEED_PIXEL_SIZE, StemSimConfig, balanced_config, simulate

CLEAN = StemSimConfig(height=512, width=512, pixel_size=LATTICE_A / 30, dose=(1e5, 1e5), read_noise=0.0,
                      background=(0.0, 0.0), drift=0.0, jitter_px=0.0, z_exponent=(1.7, 1.7), stack_factor=(1.0, 1.0))


def test_every_2h_material_has_its_lattice_and_class_names():
    assert {'mote2', 'mos2', 'mose2', 'ws2', 'wse2'} <= set(STEM_MATERIALS)
    assert class_names('wse2') == ('Perfect', 'V_Se', 'V_Se2', 'V_W', 'V_W+V_Se', 'V_W+V_Se2')
    assert class_names('mote2')[1:4] == ('V_Te', 'V_Te2', 'V_Mo')
    # In-plane lattice constants of the bulk 2H crystals (Wilson and Yoffe 1969), in angstrom.
    for name, a in (('mos2', 3.16), ('mose2', 3.29), ('mote2', 3.52), ('ws2', 3.15), ('wse2', 3.28)):
        assert stem_lattice(name).lattice_a * 1e10 == pytest.approx(a, abs=0.01)
    with pytest.raises(ValueError, match='no 2H monolayer lattice'):
        stem_lattice('graphene')


def test_exponent_rises_with_the_inner_angle_and_sets_the_ratio():
    angles = [8, 20, 40, 80, 150]
    exponents = [z_exponent(a) for a in angles]
    assert exponents == sorted(exponents) and 0.8 < exponents[0] < 0.9 and 1.9 < exponents[-1] < 2.0
    # WSe2's chalcogen pair outshines tungsten on a low-angle detector and is half as bright on a HAADF one.
    assert column_ratio(74, 34, z_exponent(8)) > 1.0 > 0.6 > column_ratio(74, 34, z_exponent(80))
    assert detector_from('haadf').inner_mrad == 80 and detector_from('68-280') == AdfDetector(68, 280)
    with pytest.raises(ValueError, match='INNER-OUTER'):
        detector_from('bright field')
    with pytest.raises(ValueError):
        AdfDetector(100, 50)


def test_cell_count_matches_area():
    sample = simulate(StemSimConfig(height=2048, width=2048), seed=3)
    cell_area_px = stem_lattice('mote2').primitive_cell_area / sample.pixel_size ** 2
    for boxes in (sample.unit_boxes, sample.hex_boxes):
        w, h = np.median(boxes[:, 2] - boxes[:, 0]), np.median(boxes[:, 3] - boxes[:, 1])
        # One cell per primitive cell area; a box must fit whole, so its size comes off each side.
        expected = (2048 - w) * (2048 - h) / cell_area_px
        assert abs(len(boxes) - expected) < 0.05 * expected
    assert len(sample.unit_classes) == len(sample.unit_boxes) == len(sample.metal_xy)
    assert (sample.unit_boxes >= 0).all() and (sample.unit_boxes <= 2048).all()


def test_box_geometry_is_seed_scale():
    sample = simulate(replace(CLEAN, pixel_size=SEED_PIXEL_SIZE, height=768, width=768), seed=1)
    assert LATTICE_A / SEED_PIXEL_SIZE == pytest.approx(120.0)
    hex_w = np.median(sample.hex_boxes[:, 2] - sample.hex_boxes[:, 0])
    unit_w = np.median(sample.unit_boxes[:, 2] - sample.unit_boxes[:, 0])
    unit_h = np.median(sample.unit_boxes[:, 3] - sample.unit_boxes[:, 1])
    hex_h = np.median(sample.hex_boxes[:, 3] - sample.hex_boxes[:, 1])
    # Yang et al. (2024) at 20 M: W_U / W_H = 0.65.
    assert 150 < hex_w < 180 and 170 < hex_h < 200
    assert unit_w / hex_w == pytest.approx(0.65, abs=0.01)
    assert 0.4 < unit_h / hex_h < 0.5


def _column_peaks(sample):
    image = sample.image / 1e5
    def at(points):
        return image[np.rint(points[:, 1]).astype(int), np.rint(points[:, 0]).astype(int)]
    return at(sample.metal_xy), at(sample.chalcogen_xy)


@pytest.mark.parametrize('material, inner', [('mote2', 80.0), ('wse2', 80.0), ('wse2', 10.0), ('mos2', 40.0)])
def test_column_intensities_follow_z_contrast_of_material_and_detector(material, inner):
    lattice = stem_lattice(material)
    config = replace(balanced_config(CLEAN), material=material, pixel_size=lattice.lattice_a / 30,
                     z_exponent=None, exponent_spread=0.0, detector_inner_mrad=(inner, inner))
    sample = simulate(config, seed=2)
    metal, chalcogen = _column_peaks(sample)
    k = sample.unit_classes
    expected = column_ratio(lattice.metal_z, lattice.chalcogen_z, z_exponent(inner))
    assert sample.params['chalcogen_metal_ratio'] == pytest.approx(expected)
    ratio = np.median(chalcogen[k == 0]) / np.median(metal[k == 0])
    assert ratio == pytest.approx(expected, rel=0.08)       # tails of neighbouring columns add a little
    assert max(np.median(metal[k == 0]), np.median(chalcogen[k == 0])) == pytest.approx(1.0, abs=0.08)
    # One chalcogen left is half a full column; an empty column keeps only neighbours' tails.
    assert np.median(chalcogen[k == 1]) == pytest.approx(0.5 * np.median(chalcogen[k == 0]), rel=0.15)
    assert np.median(chalcogen[k == 2]) < 0.2 * np.median(chalcogen[k == 0])
    assert np.median(metal[k == 3]) < 0.2 * np.median(metal[k == 0])


def test_a_crystal_turned_by_60_degrees_swaps_the_sublattices_in_the_lattice_frame():
    plain = simulate(replace(CLEAN, swap_probability=0.0), seed=4)
    swapped = simulate(replace(CLEAN, swap_probability=1.0), seed=4)
    assert not plain.params['swap'] and swapped.params['swap']
    # Same cells, same boxes; the metal sits at the top-right column in one and bottom-left in the other.
    np.testing.assert_allclose(plain.unit_boxes, swapped.unit_boxes)
    assert (plain.metal_xy[:, 1] < plain.chalcogen_xy[:, 1]).all()
    assert (swapped.metal_xy[:, 1] > swapped.chalcogen_xy[:, 1]).all()


def test_rotation_turns_the_lattice_about_the_frame_centre():
    turned = simulate(replace(CLEAN, rotation_deg=(20.0, 20.0)), seed=5)
    step = turned.chalcogen_xy - turned.metal_xy   # metal -> chalcogen: (-a/2, d/2) in the lattice frame
    angle = math.degrees(np.median(np.arctan2(step[:, 1], step[:, 0])))
    assert angle == pytest.approx(math.degrees(math.atan2(0.5 / math.sqrt(3), -0.5)) + 20.0, abs=0.5)


def test_contamination_and_holes_mark_cells_unreadable():
    config = replace(CLEAN, contamination=(0.25, 0.25), holes=(0.1, 0.1), dose=(20.0, 20.0))
    sample = simulate(config, seed=6)
    assert 0.15 < sample.params['contaminated_fraction'] < 0.35 and 0.05 < sample.params['hole_fraction'] < 0.15
    assert 0.4 < sample.unit_clean.mean() < 0.85
    clean = simulate(replace(config, contamination=(0.0, 0.0), holes=(0.0, 0.0)), seed=6)
    assert clean.unit_clean.all()
    # Under contamination the hollow sites are bright; in holes the columns are gone.
    metal, _ = _column_peaks(replace(sample, image=sample.image * 1e5 / 20.0))
    assert np.median(metal[~sample.unit_clean]) != pytest.approx(np.median(metal[sample.unit_clean]), rel=0.1)


def test_classes_follow_configured_probabilities():
    config = StemSimConfig(height=2048, width=2048, pixel_size=LATTICE_A / 30,
                           defect_probabilities=(0.0, 0.3, 0.1, 0.1, 0.05, 0.05))
    counts = simulate(config, seed=3).class_counts
    shares = counts / counts.sum()
    expected = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    sigma = np.sqrt(expected * (1 - expected) / counts.sum())
    assert (np.abs(shares - expected) < 4 * sigma).all(), (shares, expected)
    assert len(counts) == CLASS_COUNT


def test_noise_is_poisson_at_the_configured_dose():
    config = replace(CLEAN, dose=(10.0, 10.0), background=(0.1, 0.1))
    noisy = simulate(config, seed=5).image
    clean = simulate(replace(config, dose=(1e6, 1e6)), seed=5).image * (10.0 / 1e6)
    residual = noisy - clean
    # Poisson: variance equals the mean count, pixel by pixel.
    assert np.var(residual) == pytest.approx(np.mean(clean), rel=0.05)
    assert float(noisy.min()) >= 0 and np.allclose(noisy, np.rint(noisy))


def test_seeded_and_drift_moves_ground_truth():
    a = simulate(StemSimConfig(height=512, width=512), seed=11)
    b = simulate(StemSimConfig(height=512, width=512), seed=11)
    c = simulate(StemSimConfig(height=512, width=512), seed=12)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.unit_boxes, b.unit_boxes)
    assert not np.array_equal(a.image, c.image)
    drifted = simulate(replace(CLEAN, drift=5e-11), seed=4)
    still = simulate(CLEAN, seed=4)
    dx, dy = drifted.params['drift_px']
    assert math.hypot(dx, dy) > 0.5
    bottom = np.argmax(still.metal_xy[:, 1])
    moved = np.hypot(*(drifted.metal_xy - still.metal_xy).T) if len(drifted.metal_xy) == len(still.metal_xy) else None
    assert moved is None or moved[bottom] > moved[np.argmin(still.metal_xy[:, 1])]


@pytest.mark.parametrize('change', [dict(height=8), dict(dose=(0.0, 5.0)), dict(pixel_size=-1.0),
                                    dict(defect_probabilities=(0, 0.5, 0.5, 0.5, 0, 0)),
                                    dict(column_gain_sigma=-0.1), dict(material='graphene'),
                                    dict(contamination=(0.5, 0.2)), dict(contamination_style='soot'),
                                    dict(detector_inner_mrad=(0.0, 10.0))])
def test_bad_configuration_is_refused(change):
    with pytest.raises(ValueError):
        simulate(replace(StemSimConfig(), **change), seed=0)

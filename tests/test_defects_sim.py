"""HAADF-STEM simulator of 2H-MoTe2: ground truth consistent with the lattice and the imaging model."""

from dataclasses import replace
import math

import numpy as np
import pytest

from flake_detector.defects import CLASS_NAMES
from flake_detector.defects.simulate import (
    LATTICE_A,
    PRIMITIVE_CELL_AREA,
    SEED_PIXEL_SIZE,
    Z_MO,
    Z_TE,
    StemSimConfig,
    balanced_config,
    simulate,
)

CLEAN = StemSimConfig(height=768, width=768, dose=(1e5, 1e5), read_noise=0.0, background=(0.0, 0.0),
                      drift=0.0, jitter_px=0.0, z_exponent=(1.7, 1.7))


def test_cell_count_matches_area():
    sample = simulate(StemSimConfig(height=2048, width=2048), seed=3)
    cell_area_px = PRIMITIVE_CELL_AREA / sample.pixel_size ** 2
    for boxes in (sample.unit_boxes, sample.hex_boxes):
        w, h = np.median(boxes[:, 2] - boxes[:, 0]), np.median(boxes[:, 3] - boxes[:, 1])
        # One cell per primitive cell area; a box must fit whole, so its size comes off each side.
        expected = (2048 - w) * (2048 - h) / cell_area_px
        assert abs(len(boxes) - expected) < 0.05 * expected
    assert len(sample.unit_classes) == len(sample.unit_boxes)
    assert (sample.unit_boxes >= 0).all() and (sample.unit_boxes <= 2048).all()


def test_box_geometry_is_seed_scale():
    sample = simulate(CLEAN, seed=1)
    lattice_px = LATTICE_A / SEED_PIXEL_SIZE
    assert lattice_px == pytest.approx(120.0)
    hex_w = np.median(sample.hex_boxes[:, 2] - sample.hex_boxes[:, 0])
    unit_w = np.median(sample.unit_boxes[:, 2] - sample.unit_boxes[:, 0])
    unit_h = np.median(sample.unit_boxes[:, 3] - sample.unit_boxes[:, 1])
    hex_h = np.median(sample.hex_boxes[:, 3] - sample.hex_boxes[:, 1])
    # Seed 003 at 20 M: hexagonal cell ~120 x 130 px, unit cell ~75 x 65 px, W_U / W_H = 0.65.
    assert 150 < hex_w < 180 and 170 < hex_h < 200
    assert unit_w / hex_w == pytest.approx(0.65, abs=0.01)
    assert 0.4 < unit_h / hex_h < 0.5
    assert 75 < unit_w < 115 and 70 < unit_h < 95


def test_column_intensities_follow_z_contrast():
    sample = simulate(balanced_config(CLEAN), seed=2)
    radius = 0.214 * LATTICE_A / SEED_PIXEL_SIZE
    image = sample.image / 1e5
    boxes, classes = sample.unit_boxes, sample.unit_classes
    te = image[np.rint(boxes[:, 3] - radius).astype(int), np.rint(boxes[:, 0] + radius).astype(int)]
    mo = image[np.rint(boxes[:, 1] + radius).astype(int), np.rint(boxes[:, 2] - radius).astype(int)]
    perfect = classes == 0
    ratio = np.median(te[perfect] / mo[perfect])
    expected = 2 * (Z_TE / Z_MO) ** 1.7
    assert ratio == pytest.approx(expected, rel=0.1)  # tails of neighbouring columns add a little
    assert np.median(te[perfect]) == pytest.approx(1.0, abs=0.1)
    # One Te left is half a Te2 column; an empty column keeps only neighbours' tails.
    assert np.median(te[classes == 1]) == pytest.approx(0.5 * np.median(te[perfect]), rel=0.15)
    assert np.median(te[classes == 2]) < 0.25 * np.median(te[perfect])
    assert np.median(mo[classes == 3]) < 0.5 * np.median(mo[perfect])


def test_classes_follow_configured_probabilities():
    config = StemSimConfig(height=2048, width=2048, defect_probabilities=(0.0, 0.3, 0.1, 0.1, 0.05, 0.05))
    counts = sum(simulate(config, seed=s).class_counts for s in range(3))
    shares = counts / counts.sum()
    expected = np.array([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    sigma = np.sqrt(expected * (1 - expected) / counts.sum())
    assert (np.abs(shares - expected) < 4 * sigma).all(), (shares, expected)
    assert len(counts) == len(CLASS_NAMES)


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
    # Boxes at the top of the frame barely move; drift accumulates down the scan.
    assert not np.allclose(drifted.unit_boxes[-1], still.unit_boxes[-1], atol=0.1) or len(
        drifted.unit_boxes) != len(still.unit_boxes)


@pytest.mark.parametrize('change', [dict(height=8), dict(dose=(0.0, 5.0)), dict(pixel_size=-1.0),
                                    dict(defect_probabilities=(0, 0.5, 0.5, 0.5, 0, 0)),
                                    dict(column_gain_sigma=-0.1)])
def test_bad_configuration_is_refused(change):
    with pytest.raises(ValueError):
        simulate(replace(StemSimConfig(), **change), seed=0)

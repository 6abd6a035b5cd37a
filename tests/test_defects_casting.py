"""Hexagonal-net casting (Yang et al. (2024), Fig. 2b) and the unit-cell accuracy measure."""

import numpy as np
import pytest

from flake_detector.defects.casting import ALPHA, BETA, box_iou, cast_unit_cells, match_accuracy, merge_duplicates
from flake_detector.defects.simulate import StemSimConfig, simulate


def test_casting_on_a_hand_made_box():
    cells = cast_unit_cells(np.array([[10.0, 20.0, 110.0, 220.0]]))  # W_H = 100, H_H = 200
    assert (ALPHA, BETA) == (0.65, 0.5)
    # A (x_min, y_min) - B (x_min + 0.65 W, y_min + 0.5 H); C (x_max - 0.65 W, y_max - 0.5 H) - D (x_max, y_max)
    np.testing.assert_allclose(cells, [[10, 20, 75, 120], [45, 120, 110, 220]])
    other = cast_unit_cells(np.array([[0, 0, 40, 10]]), alpha=0.5, beta=0.6)
    np.testing.assert_allclose(other, [[0, 0, 20, 6], [20, 4, 40, 10]])
    assert cast_unit_cells(np.zeros((0, 4))).shape == (0, 4)


def test_bad_ratios_are_refused():
    with pytest.raises(ValueError):
        cast_unit_cells(np.array([[0, 0, 1, 1]]), alpha=0.0)
    with pytest.raises(ValueError):
        cast_unit_cells(np.array([[0, 0, 1, 1]]), beta=1.5)


def test_iou_and_matching():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 0.0]])
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    predicted = np.array([[1, 0, 11, 10], [20, 21, 30, 31], [20, 20, 30, 30], [80, 80, 90, 90]])
    accuracy, matches = match_accuracy(predicted, truth)
    assert accuracy == pytest.approx(2 / 3)
    assert matches.tolist() == [0, 2, -1]  # one prediction per true cell, best IoU first


def test_merge_duplicates_keeps_best_of_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40]])
    keep = merge_duplicates(boxes, np.array([0.6, 0.9, 0.5]))
    assert keep.tolist() == [1, 2]


def test_casting_true_hexagons_recovers_true_unit_cells():
    sample = simulate(StemSimConfig(height=1024, width=1024), seed=7)
    cells = cast_unit_cells(sample.hex_boxes)
    assert len(cells) == 2 * len(sample.hex_boxes)
    # Neighbouring hexagons share unit cells: merging halves the count.
    kept = cells[merge_duplicates(cells, np.ones(len(cells)))]
    assert len(kept) < 0.75 * len(cells)
    accuracy, matches = match_accuracy(kept, sample.unit_boxes)
    # Every true cell with its hexagon inside the frame is recovered; the rest sit at the frame edge.
    assert accuracy > 0.85
    ious = box_iou(sample.unit_boxes[matches >= 0], kept[matches[matches >= 0]]).diagonal()
    assert np.median(ious) > 0.85

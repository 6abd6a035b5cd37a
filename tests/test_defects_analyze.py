"""The whole analysis on simulated frames: tiles give the same cells as one piece, contamination is
masked out of the analysed area, concentrations rest on the analysed cells only."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from flake_core.materials import stem_lattice
from flake_detector.defects.analyze import DefectAnalyzer, poisson_concentration
from flake_detector.defects.simulate import StemSimConfig, simulate

LATTICE_PX = 12.0


@pytest.fixture(scope='module')
def analyzer():
    return DefectAnalyzer()


def _frame(material, **changes):
    config = dict(material=material, height=320, width=320, pixel_size=stem_lattice(material).lattice_a / LATTICE_PX,
                  dose=(20.0, 20.0), rotation_deg=(5.0, 5.0), detector_inner_mrad=(80.0, 80.0))
    config.update(changes)
    return StemSimConfig(**config)


def test_tiles_find_the_same_cells_as_one_piece_and_count_none_twice(analyzer):
    sample = simulate(_frame('mos2'), seed=8)
    whole = analyzer.analyze(sample.image, sample.pixel_size, 'mos2')
    analyzer.canonical_tile = 900
    try:
        tiled = analyzer.analyze(sample.image, sample.pixel_size, 'mos2')
    finally:
        analyzer.canonical_tile = 2048
    assert whole.tiles == 1 and tiled.tiles >= 4
    pairs = cKDTree(tiled.centres).query_pairs(0.5 * LATTICE_PX)
    assert len(pairs) == 0
    distance, _ = cKDTree(whole.centres).query(tiled.centres)
    assert (distance < 0.25 * LATTICE_PX).mean() > 0.97
    assert abs(len(tiled.centres) - len(whole.centres)) <= 0.03 * len(whole.centres)


def test_contaminated_cells_are_not_counted_and_leave_the_analysed_area(analyzer):
    sample = simulate(_frame('mose2', contamination=(0.25, 0.25), contamination_level=(0.6, 1.0)), seed=9)
    analysis = analyzer.analyze(sample.image, sample.pixel_size, 'mose2')
    distance, index = cKDTree(analysis.centres).query(sample.unit_centres)
    found = distance < 0.25 * LATTICE_PX
    dirty = found & ~sample.unit_clean
    assert (~analysis.analysed[index[dirty]]).mean() > 0.85
    assert analysis.masked_area > 0.15 * (analysis.masked_area + analysis.analysed_area)
    cell = stem_lattice('mose2').primitive_cell_area
    assert analysis.analysed_area == pytest.approx(analysis.analysed.sum() * cell)
    assert analysis.counts.sum() == analysis.analysed.sum()
    value, low, high = analysis.concentrations()
    assert (low <= value).all() and (value <= high).all()


def test_poisson_interval_is_exact_and_refuses_no_area():
    value, low, high = poisson_concentration([0, 10], 1e-12)
    assert value.tolist() == [0.0, 1e13] and low[0] == 0.0
    assert low[1] == pytest.approx(4.795e12, rel=1e-3) and high[1] == pytest.approx(1.8390e13, rel=1e-3)
    value, low, high = poisson_concentration([3], 0.0)
    assert value[0] == 0.0 and np.isinf(high[0])

"""flake-defects: simulate and analyze write the documented files; bad input gets a clear error."""

import csv
import json

import cv2
import numpy as np
import pytest

from flake_detector.defects import CLASS_NAMES
from flake_detector.defects.cli import main


@pytest.fixture(scope='module')
def simulated(tmp_path_factory):
    directory = tmp_path_factory.mktemp('stem')
    image = directory / 'frame.png'
    assert main(['simulate', str(image), '--size', '768', '--seed', '21', '--dose', '15', '20',
                 '--defects', '0.15', '0.05', '0.05', '0.03', '0.03']) == 0
    return image, json.loads(image.with_suffix('.json').read_text())


def test_simulate_writes_16_bit_image_and_truth(simulated):
    image_path, truth = simulated
    image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint16 and image.shape == (768, 768)
    assert truth['class_names'] == list(CLASS_NAMES)
    assert sum(truth['counts']) == len(truth['unit_boxes']) == len(truth['unit_classes'])


def test_analyze_writes_overlay_csv_and_json(simulated, tmp_path, capsys):
    image_path, truth = simulated
    assert main(['analyze', str(image_path), '--report', str(tmp_path)]) == 0
    assert 'unit cells' in capsys.readouterr().out
    summary = json.loads((tmp_path / 'frame_report.json').read_text())
    with open(tmp_path / 'frame_cells.csv') as handle:
        rows = list(csv.DictReader(handle))
    overlay = cv2.imread(str(tmp_path / 'frame_overlay.png'))
    assert overlay.shape == (768, 768, 3)
    counts = [c['count'] for c in summary['classes']]
    assert len(rows) == summary['cells_total'] == sum(counts)
    assert [c['name'] for c in summary['classes']] == list(CLASS_NAMES)
    # The trained pipeline finds (nearly) every unit cell of the frame.
    assert abs(summary['cells_total'] - len(truth['unit_boxes'])) <= 0.1 * len(truth['unit_boxes'])
    for entry in summary['classes']:
        assert entry['concentration_low_cm2'] <= entry['concentration_cm2'] <= entry['concentration_high_cm2']
    assert {row['class'] for row in rows} <= set(CLASS_NAMES)
    # Defective cells are drawn in their class colour, not grey.
    defective = [row for row in rows if row['class'] != 'Perfect']
    if defective:
        row = defective[0]
        x0, y0 = round(float(row['x_min_px'])), round(float(row['y_min_px']))
        x1 = round(float(row['x_max_px']))
        edge = overlay[max(y0, 0), max(x0, 0):min(x1, 767)].astype(int)
        assert (np.abs(edge[:, 2] - edge[:, 0]) > 40).any() or (np.abs(edge[:, 1] - edge[:, 0]) > 40).any()


@pytest.mark.parametrize('content, suffix, message', [
    (b'this is not an image', '.png', 'not a readable image'),
    (b'', '.png', 'is empty'),
])
def test_bad_files_get_a_clear_error(tmp_path, capsys, content, suffix, message):
    path = tmp_path / f'bad{suffix}'
    path.write_bytes(content)
    assert main(['analyze', str(path), '--report', str(tmp_path / 'out')]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_wrong_size_and_blank_images_are_refused(tmp_path, capsys):
    small = tmp_path / 'small.png'
    cv2.imwrite(str(small), np.full((20, 20), 7, np.uint8))
    assert main(['analyze', str(small), '--report', str(tmp_path / 'o1')]) == 2
    assert 'supported sizes' in capsys.readouterr().err
    blank = tmp_path / 'blank.npy'
    np.save(blank, np.zeros((600, 600), np.float32))
    assert main(['analyze', str(blank), '--report', str(tmp_path / 'o2')]) == 2
    assert 'blank' in capsys.readouterr().err
    no_cell = tmp_path / 'narrow.npy'
    np.save(no_cell, np.random.default_rng(0).random((200, 200)).astype(np.float32))
    assert main(['analyze', str(no_cell), '--report', str(tmp_path / 'o3')]) == 2
    assert 'no whole hexagonal cell' in capsys.readouterr().err
    assert main(['analyze', str(tmp_path / 'missing.png'), '--report', str(tmp_path / 'o4')]) == 2
    assert 'no such image file' in capsys.readouterr().err


def test_pipeline_tiles_large_frames_at_another_magnification():
    from flake_detector.defects.analyze import DefectAnalyzer
    from flake_detector.defects.casting import match_accuracy
    from flake_detector.defects.simulate import SEED_PIXEL_SIZE, StemSimConfig, simulate

    # Half seed 003's magnification: 1280 px become 640 px at the detector's scale, four tiles.
    config = StemSimConfig(height=1280, width=1280, pixel_size=2 * SEED_PIXEL_SIZE,
                           probe_fwhm=(1.1e-10, 1.3e-10), dose=(15.0, 20.0))
    sample = simulate(config, seed=31)
    analysis = DefectAnalyzer().analyze(sample.image, sample.pixel_size)
    accuracy, matches = match_accuracy(analysis.boxes, sample.unit_boxes)
    assert accuracy >= 0.95
    # No cell is counted twice where tiles overlap.
    assert len(analysis.boxes) <= len(sample.unit_boxes) + 0.03 * len(sample.unit_boxes)

"""flake-defects: simulate writes a microscope file, analyze reads it with its pixel size and detector and
writes the documented files; an optical micrograph is flagged, bad input gets a clear error."""

import csv
import json

from conftest import SHARED_DIR
import cv2
import numpy as np
import pytest

from flake_detector.defects import class_names
from flake_detector.defects.cli import main

LATTICE_PX = 12.0


@pytest.fixture(scope='module')
def simulated(tmp_path_factory):
    directory = tmp_path_factory.mktemp('stem')
    image = directory / 'wse2.emd'
    pixel_size = 3.282e-10 / LATTICE_PX
    assert main(['simulate', str(image), '--material', 'wse2', '--detector', 'haadf', '--pixel-size', str(pixel_size),
                 '--size', '384', '--seed', '21', '--dose', '20', '20', '--rotation', '9',
                 '--defects', '0.06', '0.03', '0.03', '0.02', '0.02']) == 0
    return image, json.loads(image.with_suffix('.json').read_text())


def test_simulate_writes_a_calibrated_file_and_truth(simulated):
    image_path, truth = simulated
    assert truth['class_names'] == list(class_names('wse2')) and truth['detector'] == 'HAADF 80-250 mrad'
    assert sum(truth['counts']) == len(truth['unit_boxes']) == len(truth['unit_classes'])


def test_analyze_reads_pixel_size_and_detector_from_the_file(simulated, tmp_path, capsys):
    image_path, truth = simulated
    assert main(['analyze', str(image_path), '--material', 'wse2', '--report', str(tmp_path)]) == 0
    assert 'unit cells of WSe2' in capsys.readouterr().out
    summary = json.loads((tmp_path / 'wse2_report.json').read_text())
    assert summary['material'] == 'wse2' and summary['detector'] == 'HAADF 80-250 mrad'
    assert summary['detector_source'] == 'file'
    assert summary['pixel_size_m'] == pytest.approx(3.282e-10 / LATTICE_PX, rel=1e-5)
    assert summary['lattice_found'] and summary['lattice_rotation_deg'] == pytest.approx(9.0, abs=0.5)
    assert summary['lattice_constant_m'] == pytest.approx(3.282e-10, rel=0.02)
    assert summary['sublattice_basis'] == 'contrast'
    assert summary['chalcogen_metal_ratio'] == pytest.approx(truth['params']['chalcogen_metal_ratio'], rel=0.1)
    with open(tmp_path / 'wse2_cells.csv') as handle:
        rows = list(csv.DictReader(handle))
    overlay = cv2.imread(str(tmp_path / 'wse2_overlay.png'))
    assert overlay.shape == (384, 384, 3)
    counts = [c['count'] for c in summary['classes']]
    assert [c['name'] for c in summary['classes']] == list(class_names('wse2'))
    assert sum(counts) == summary['cells_total'] == sum(int(r['analysed']) for r in rows)
    # The shipped pipeline finds (nearly) every unit cell of the frame.
    assert abs(summary['cells_found'] - len(truth['unit_boxes'])) <= 0.1 * len(truth['unit_boxes'])
    for entry in summary['classes']:
        assert entry['concentration_low_cm2'] <= entry['concentration_cm2'] <= entry['concentration_high_cm2']
    assert {row['class'] for row in rows} <= set(class_names('wse2'))


def test_optical_micrograph_is_flagged_and_nothing_counted(tmp_path, capsys):
    pictures = sorted((SHARED_DIR / 'data' / 'real_images_2dmatgmm').glob('*.jpg'))[:1]
    if pictures:
        path = pictures[0]
    else:  # a colourful smooth picture stands in where the shared micrographs are absent
        rng = np.random.default_rng(0)
        path = tmp_path / 'optical.png'
        cv2.imwrite(str(path), (cv2.GaussianBlur(rng.random((600, 800, 3)), (0, 0), 15) * 255 * 4).clip(0, 255)
                    .astype(np.uint8))
    assert main(['analyze', str(path), '--pixel-size', '4e-11', '--material', 'wse2', '--report', str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert 'does not look like an atomic-resolution ADF-STEM image' in captured.err
    assert 'colour' in captured.err
    summary = json.loads((tmp_path / f'{path.stem}_report.json').read_text())
    assert summary['cells_total'] == 0 and not summary['lattice_found'] and summary['warnings']


@pytest.mark.parametrize('content, suffix, message', [
    (b'this is not an image', '.png', 'not a readable image'),
    (b'', '.png', 'is empty'),
    (b'\x00' * 64, '.dm4', 'could not be read'),
])
def test_bad_files_get_a_clear_error(tmp_path, capsys, content, suffix, message):
    path = tmp_path / f'bad{suffix}'
    path.write_bytes(content)
    assert main(['analyze', str(path), '--report', str(tmp_path / 'out'), '--pixel-size', '4e-11']) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


def test_missing_pixel_size_unknown_material_and_bad_sizes_are_refused(tmp_path, capsys):
    frame = tmp_path / 'frame.png'
    cv2.imwrite(str(frame), (np.random.default_rng(1).random((300, 300)) * 60000).astype(np.uint16))
    assert main(['analyze', str(frame), '--report', str(tmp_path / 'o1')]) == 2
    assert 'no pixel size' in capsys.readouterr().err
    assert main(['analyze', str(frame), '--material', 'graphene', '--pixel-size', '4e-11',
                 '--report', str(tmp_path / 'o2')]) == 2
    assert 'no 2H monolayer lattice' in capsys.readouterr().err
    assert main(['analyze', str(frame), '--material', 'unobtainium', '--report', str(tmp_path / 'o3')]) == 2
    assert 'unknown material' in capsys.readouterr().err
    assert main(['analyze', str(frame), '--pixel-size', '4e-12', '--detector', 'bright field',
                 '--report', str(tmp_path / 'o4')]) == 2
    assert 'INNER-OUTER' in capsys.readouterr().err
    small = tmp_path / 'small.npy'
    np.save(small, np.full((20, 20), 7.0, np.float32))
    assert main(['analyze', str(small), '--pixel-size', '4e-11', '--report', str(tmp_path / 'o5')]) == 2
    assert 'supported sizes' in capsys.readouterr().err
    blank = tmp_path / 'blank.npy'
    np.save(blank, np.zeros((600, 600), np.float32))
    assert main(['analyze', str(blank), '--pixel-size', '4e-11', '--report', str(tmp_path / 'o6')]) == 2
    assert 'blank' in capsys.readouterr().err
    assert main(['analyze', str(frame), '--pixel-size', '2e-10', '--material', 'wse2',
                 '--report', str(tmp_path / 'o7')]) == 2
    assert 'needed to resolve the columns' in capsys.readouterr().err
    assert main(['analyze', str(tmp_path / 'missing.dm4'), '--report', str(tmp_path / 'o8')]) == 2
    assert 'no such image file' in capsys.readouterr().err
    assert not any((tmp_path / f'o{k}').exists() for k in range(1, 9))

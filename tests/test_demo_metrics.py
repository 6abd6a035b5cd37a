"""Wafer-level precision/recall against the simulator's ground truth."""

import math

import numpy as np
import pytest

from flake_scanner.demo.metrics import FoundFlake, score_scan, truth_in_region
from flake_scanner.sim.wafer import VirtualWafer, WaferConfig


def square(cx, cy, half):
    return np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]])


@pytest.fixture()
def wafer():
    config = WaferConfig(seed=3, flake_density_per_mm2=0.0, residue_line_density_per_mm2=0.0,
                         residue_network_density_per_mm2=0.0, dust_density_per_mm2=0.0,
                         bulk_density_per_mm2=0.0)
    wafer = VirtualWafer.generate(config)
    wafer.add_object('flake', 'graphene', square(1e-3, 1e-3, 20e-6), layers=1)
    wafer.add_object('flake', 'hbn', square(2e-3, 1e-3, 30e-6), layers=60)
    wafer.add_object('flake', 'mos2', square(1.5e-3, 2e-3, 15e-6), layers=3)
    wafer.add_object('flake', 'graphene', square(5e-3, 5e-3, 20e-6), layers=2)  # outside the region
    return wafer


def test_truth_is_limited_to_the_region_and_to_findable_sizes(wafer):
    truth = truth_in_region(wafer, 0.5e-3, 0.5e-3, 3e-3, 3e-3)
    assert sorted(t.material for t in truth) == ['graphene', 'hbn', 'mos2']
    assert {t.layer_class for t in truth} == {'mono', 'bulk', 'few'}
    assert truth_in_region(wafer, 0.5e-3, 0.5e-3, 3e-3, 3e-3, min_area=2000e-12)[0].material == 'hbn'


def test_precision_recall_and_layer_class_accuracy(wafer):
    truth = truth_in_region(wafer, 0.5e-3, 0.5e-3, 3e-3, 3e-3)
    found = [
        FoundFlake('a', 'graphene', 'mono', (1.005e-3, 0.998e-3), 1.6e-9),   # right
        FoundFlake('b', 'hbn', 'thick', (2.01e-3, 1.01e-3), 3.6e-9),         # right flake, wrong class
        FoundFlake('c', 'graphene', 'few', (2.5e-3, 2.5e-3), 1e-9),          # nothing there
        FoundFlake('d', 'graphene', 'mono', (8e-3, 8e-3), 1e-9),             # outside the region: ignored
    ]
    score = score_scan(found, truth, region=(0.5e-3, 0.5e-3, 3e-3, 3e-3))
    total = score.total()
    assert (total.found, total.matched_found, total.true, total.matched_true) == (3, 2, 3, 2)
    assert total.precision == pytest.approx(2 / 3) and total.recall == pytest.approx(2 / 3)
    assert total.layer_class_correct == 1
    assert score.per_material['mos2'].recall == 0.0
    assert math.isnan(score.per_material['wte2'].precision)
    assert score.matches['a'] != score.matches['b']


def test_report_page_mosaic_gallery_and_metrics(tmp_path, wafer):
    import json

    import cv2

    from flake_scanner.demo.report import ReportFlake, text_summary, write_report

    frames = tmp_path / 'frames'
    frames.mkdir()
    cv2.imwrite(str(frames / '00000.jpg'), np.full((100, 100, 3), 200, np.uint8))
    mosaic = tmp_path / 'mosaic.png'
    cv2.imwrite(str(mosaic), np.full((50, 80, 3), 255, np.uint8))
    mosaic.with_suffix('.json').write_text(json.dumps({'wafer_to_mosaic': [1e4, 0, 0, 0, -1e4, 50]}))
    flakes = [ReportFlake('f1', 'graphene', 'mono', 1.0, 0.34, 0.05, 1.6e-9, 0.9, (1e-3, 1e-3), 0, (40, 40, 20, 10)),
              ReportFlake('f2', 'hbn', 'thick', 30.0, 10.0, 1.0, 3.6e-9, 0.8, (2e-3, 1e-3), 0, (10, 10, 5, 5))]
    truth = truth_in_region(wafer, 0.5e-3, 0.5e-3, 3e-3, 3e-3)
    from flake_scanner.demo.metrics import FoundFlake
    score = score_scan([FoundFlake(f.flake_id, f.material, f.layer_class, f.centre, f.area) for f in flakes], truth)
    page = write_report(tmp_path / 'report', flakes, frames, mosaic, score, {'scan': '12.0 s'})
    text = page.read_text()
    assert 'graphene' in text and 'thumbnails/f1.png' in text and 'mosaic.png' in text
    assert (tmp_path / 'report' / 'thumbnails' / 'f1.png').exists()
    annotated = cv2.imread(str(tmp_path / 'report' / 'mosaic.png'))
    assert annotated[40, 14].tolist() != [255, 255, 255]  # the ring (radius 4 px) around the graphene flake at (10, 40)
    metrics = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
    assert metrics['by_class']['graphene']['mono'] == 1
    overall = [row for row in metrics['metrics'] if row['material'] == 'all'][0]
    assert overall['found'] == 2 and overall['precision'] == pytest.approx(1.0)
    summary = text_summary(flakes, score, {'scan': '12.0 s'})
    assert '| graphene | 1 | 0 | 0 | 0 | 1 |' in summary


def test_targets_leave_out_bulk_and_ignore_detections_on_flakes_too_small_to_count():
    from flake_scanner.demo.metrics import TruthFlake

    def truth(object_id, layers, half, cx=1e-3, material='graphene'):
        from flake_core.materials import layer_class_name
        return TruthFlake(object_id, 'flake', material, layers, layer_class_name(layers), (cx, 1e-3), (2 * half) ** 2,
                          square(cx, 1e-3, half), 0)

    thin, thick, tiny = truth(1, 2, 5e-6), truth(2, 30, 5e-6, cx=1.2e-3), truth(3, 3, 1e-6, cx=1.4e-3)
    found = [FoundFlake('a', 'graphene', 'few', (1e-3, 1e-3), 1e-10),
             FoundFlake('b', 'graphene', 'thick', (1.2e-3, 1e-3), 1e-10),
             FoundFlake('c', 'graphene', 'few', (1.4e-3, 1e-3), 4e-12),     # on the too-small flake: left out
             FoundFlake('d', 'graphene', 'few', (1.6e-3, 1e-3), 1e-10)]     # on nothing (or bulk): wrong
    score = score_scan(found, [thin, thick], ignored=[tiny]).per_material['graphene']
    assert (score.found, score.matched_found, score.true, score.matched_true) == (3, 2, 2, 2)
    assert (score.thin_true, score.thin_matched) == (1, 1)


def test_monolayer_and_thin_recall_count_flakes_called_what_they_are():
    from flake_scanner.demo.metrics import TruthFlake

    def truth(object_id, layers, cx, material='graphene'):
        from flake_core.materials import layer_class_name
        return TruthFlake(object_id, 'flake', material, layers, layer_class_name(layers), (cx, 1e-3), 1e-10,
                          square(cx, 1e-3, 5e-6), 0)

    mono_right, mono_as_few, mono_missed = truth(1, 1, 1.0e-3), truth(2, 1, 1.1e-3), truth(3, 1, 1.2e-3)
    few_right, few_as_thick = truth(4, 4, 1.3e-3), truth(5, 7, 1.4e-3)
    wte2_mono = truth(6, 1, 1.5e-3, material='wte2')
    found = [FoundFlake('a', 'graphene', 'few', (1.0e-3, 1e-3), 1e-10),   # a 10x sighting of the monolayer ...
             FoundFlake('b', 'graphene', 'mono', (1.0e-3 + 1e-6, 1e-3), 1e-10),  # ... and its 50x revisit
             FoundFlake('c', 'graphene', 'few', (1.1e-3, 1e-3), 1e-10),
             FoundFlake('d', 'graphene', 'few', (1.3e-3, 1e-3), 1e-10),
             FoundFlake('e', 'graphene', 'thick', (1.4e-3, 1e-3), 1e-10),
             FoundFlake('f', 'graphene', 'mono', (1.5e-3, 1e-3), 1e-10)]  # WTe2 taken for graphene
    score = score_scan(found, [mono_right, mono_as_few, mono_missed, few_right, few_as_thick, wte2_mono])
    graphene, wte2 = score.per_material['graphene'], score.per_material['wte2']
    assert (graphene.mono_true, graphene.mono_matched, graphene.mono_right) == (3, 2, 1)
    assert graphene.mono_recall == pytest.approx(1 / 3)
    assert (graphene.thin_true, graphene.thin_matched, graphene.thin_right) == (5, 4, 3)
    assert graphene.thin_recall == pytest.approx(3 / 5)
    # Called mono, but of the wrong material: a hunter of WTe2 monolayers would not find it under WTe2.
    assert (wte2.mono_true, wte2.mono_matched, wte2.mono_right) == (1, 1, 0)
    assert math.isnan(score.per_material['hbn'].mono_recall)


def test_targets_in_region_splits_by_thickness_and_size(wafer):
    from flake_scanner.demo.metrics import TARGET_MAX_LAYERS, targets_in_region

    targets, too_small = targets_in_region(wafer, 0.5e-3, 0.5e-3, 3e-3, 3e-3)
    every = truth_in_region(wafer, 0.5e-3, 0.5e-3, 3e-3, 3e-3, min_area=0.0)
    assert all(t.layers <= TARGET_MAX_LAYERS and t.area >= 20e-12 for t in targets)
    assert all(t.layers <= TARGET_MAX_LAYERS and t.area < 20e-12 for t in too_small)
    assert {t.object_id for t in targets} | {t.object_id for t in too_small} == {
        t.object_id for t in every if t.layers <= TARGET_MAX_LAYERS}
    assert any(t.layer_class == 'bulk' for t in every)  # the fixture's bulk flake is no target


def test_report_pictures_carry_scale_bars_legends_and_honest_uncertainties(tmp_path, wafer):
    import json

    import cv2

    from flake_core.geometry import Affine2D, pixel_to_wafer
    from flake_scanner.demo.report import ReportFlake, ScanFrameFile, write_report

    # A 400 x 300 px frame at 0.5 um/px centred on (1 mm, 1 mm), a dark 20 x 20 um flake in it.
    frame = np.full((300, 400, 3), 180, np.uint8)
    frame[130:170, 180:220] = 90
    to_wafer = pixel_to_wafer(1e-3, 1e-3, 0.5e-6, 400, 300, Affine2D())
    cv2.imwrite(str(tmp_path / 'frame.jpg'), frame)
    corners = to_wafer.apply_points(np.array([[180.0, 130.0], [220.0, 130.0], [220.0, 170.0], [180.0, 170.0]]))
    centre = tuple(to_wafer.apply(200.0, 150.0))
    flakes = [ReportFlake('mono-1', 'graphene', 'mono', 1.0, 0.34, 0.0, 400e-12, 0.95, centre, 0, (180, 130, 40, 40),
                          contour=tuple(map(tuple, corners))),
              ReportFlake('few-1', 'hbn', 'few', 30.0, 10.0, 0.42, 900e-12, 0.9, centre, 0, (180, 130, 40, 40)),
              # Found by a 50x revisit (its best sighting is no scan frame): cut from the frame that holds it.
              ReportFlake('revisit-1', 'wte2', 'mono', 1.0, 0.7, 0.0, 30e-12, 0.9, centre, 40, (10, 10, 50, 50))]
    page = write_report(tmp_path / 'report', flakes, None, None, None, {'scan': '1.0 s'},
                        frames={0: ScanFrameFile(tmp_path / 'frame.jpg', to_wafer, 400, 300)}, created=1.7e9)
    assert (tmp_path / 'report' / 'thumbnails' / 'revisit-1.png').exists()
    text = page.read_text()
    assert text.index('Thin flakes found') < text.index('<h2>Mosaic')
    assert '0.34 nm' in text and '0.34 ± 0.00' not in text and '&plusmn;' not in text  # no uncertainty: none shown
    assert '10.00 ± 0.42 nm' in text and 'µm' in text and ' mm' not in text
    thumbnail = cv2.imread(str(tmp_path / 'report' / 'thumbnails' / 'mono-1.png'))
    white = np.all(thumbnail == 255, axis=-1)
    bar_rows = [row for row in range(thumbnail.shape[0] // 2, thumbnail.shape[0]) if white[row].sum() >= 10]
    assert bar_rows, 'a scale bar (a white bar at the bottom) on the thumbnail'
    from flake_core import materials
    # The legend's colour box and the outline are in graphene's one colour.
    assert np.any(np.all(np.abs(thumbnail.astype(int) - materials.colour_bgr('graphene')) <= 2, axis=-1))
    assert (tmp_path / 'report' / 'distributions.png').exists()
    metrics = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
    assert metrics['units'] == {'area': 'um^2', 'thickness': 'nm', 'position': 'um'}

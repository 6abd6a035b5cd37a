"""What the scanner-side tools write for people and programs: units named in every JSON header,
materials given one way (comma-separated, flake_core.materials.parse_materials), overlays with a
legend and a scale bar."""

import json

import cv2
from detector_synth import make_frame
import numpy as np
import pytest

from flake_detector.cli import main as flake_detect


def scale_bar_rows(picture: np.ndarray) -> list[int]:
    """Rows of the lower half holding a white bar at least 10 px long (the scale bar)."""
    white = np.all(picture == 255, axis=-1)
    return [row for row in range(picture.shape[0] // 2, picture.shape[0]) if white[row].sum() >= 10]


@pytest.fixture(scope='module')
def frame_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp('frames')
    image, _ = make_frame(8, 256, flakes=[('graphene', 1), ('graphene', 2)], clutter=False, radius=(24, 30))
    cv2.imwrite(str(folder / 'frame.png'), image)
    return folder / 'frame.png'


def test_flake_detect_names_its_units_and_draws_scale_bars(tmp_path, frame_file):
    out = tmp_path / 'out'
    assert flake_detect(['--backend', 'contrast', '--materials', 'graphene', '--param', 'calibration=model',
                         '--pixel-size', '0.5 um', '--out', str(out), str(frame_file)]) == 0
    records = json.loads((out / 'detections.json').read_text())
    assert records['units']['thickness_nm'] == 'nm' and records['units']['area_um2'] == 'um^2'
    assert records['params']['materials'] == 'graphene'
    frame = records['frames'][0]
    assert frame['pixel_size_um'] == pytest.approx(0.5)
    for detection in frame['detections']:
        assert detection['area_um2'] == pytest.approx(detection['area_px'] * 0.25)
    assert json.loads((out / 'predictions.json').read_text())['units'] == records['units']
    assert scale_bar_rows(cv2.imread(str(out / 'overlays' / 'frame.png')))

    # Without a pixel size: areas in pixels only, and the overlay says why it has no scale bar.
    assert flake_detect(['--param', 'calibration=model', '--out', str(tmp_path / 'bare'), str(frame_file)]) == 0
    bare = json.loads((tmp_path / 'bare' / 'detections.json').read_text())['frames'][0]
    assert bare['pixel_size_um'] is None and all('area_um2' not in d for d in bare['detections'])


@pytest.mark.parametrize('arguments, words', [
    (['--materials', 'graphene,unobtainium'], "unknown material 'unobtainium'"),
    (['--backend', 'cascade', '--materials', 'graphene'], '--materials is a parameter of the contrast backend'),
    (['--pixel-size', '3 kg'], "'kg' in '3 kg' is not a unit of length"),
])
def test_flake_detect_refuses_bad_options_without_a_traceback(tmp_path, frame_file, capsys, arguments, words):
    with pytest.raises(SystemExit) as stop:
        flake_detect([*arguments, '--out', str(tmp_path / 'out'), str(frame_file)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert words in error and 'Traceback' not in error


def test_flake_eval_names_its_units(tmp_path):
    from flake_detector.evaluation_cli import main as flake_eval

    gt = {'images': [{'id': 1, 'width': 64, 'height': 64, 'file_name': 'a.png'}], 'annotations': [],
          'categories': [{'id': 1, 'name': 'graphene'}]}
    (tmp_path / 'gt.json').write_text(json.dumps(gt))
    (tmp_path / 'pred.json').write_text('[]')
    assert flake_eval(['--gt', str(tmp_path / 'gt.json'), '--pred', str(tmp_path / 'pred.json'),
                       '--materials', 'graphene', '--out', str(tmp_path / 'metrics')]) == 0
    assert json.loads((tmp_path / 'metrics.json').read_text())['units']['area'] == 'px'
    with pytest.raises(SystemExit):
        flake_eval(['--gt', str(tmp_path / 'gt.json'), '--pred', str(tmp_path / 'pred.json'),
                    '--materials', 'graphene+hbn', '--out', str(tmp_path / 'metrics')])


def test_flake_bag_eval_reads_materials_like_every_tool_and_draws_overlays(ros, tmp_path, capsys):
    from rclpy.serialization import serialize_message

    from flake_core.ros_image import numpy_to_image
    from flake_detector.bag_evaluate import evaluate_bag, main
    from flake_msgs.msg import ScanFrame
    from flake_scanner.bag.io import GROUND_TRUTH_FILE, SCAN_FRAME_TYPE, BagWriter

    pixel = 0.5e-6
    image, _ = make_frame(8, 256, flakes=[('graphene', 1), ('graphene', 2)], clutter=False, radius=(24, 30))
    bag = tmp_path / 'scan'
    with BagWriter(bag) as writer:
        writer.add_topic('/scan/frames', SCAN_FRAME_TYPE)
        frame = ScanFrame(scan_id='scan-units', tile_index=0, pixel_size=pixel)
        frame.image = numpy_to_image(image, 'bgr8')
        frame.pixel_to_wafer = [pixel, 0.0, 1e-3, 0.0, -pixel, 2e-3]
        writer.write('/scan/frames', 10**9, serialize_message(frame))
    (bag / GROUND_TRUTH_FILE).write_text(json.dumps({
        'images': [{'id': 1, 'width': 256, 'height': 256, 'file_name': '00000.jpg',
                    'pixel_to_wafer': list(frame.pixel_to_wafer)}],
        'annotations': [], 'categories': [{'id': 1, 'name': 'graphene'}]}))
    report = evaluate_bag(bag, [('contrast', {'materials': 'graphene', 'calibration': 'model'})], tmp_path / 'report',
                          overlays=1)
    assert report['units']['bbox'] == 'px'
    assert json.loads((tmp_path / 'report' / 'report.json').read_text())['units'] == report['units']
    overlay = cv2.imread(str(tmp_path / 'report' / 'overlays' / '0_contrast' / 'frame_00001.png'))
    assert overlay.shape == image.shape and scale_bar_rows(overlay)

    assert main([str(bag), '--backends', 'contrast:materials=graphene+hbn']) == 2
    assert 'give materials with --materials' in capsys.readouterr().err
    assert main([str(bag), '--backends', 'contrast:calibration=model', '--materials', 'graphene,hbn',
                 '--overlays', '0', '--output', str(tmp_path / 'second')]) == 0
    second = json.loads((tmp_path / 'second' / 'report.json').read_text())
    assert second['backends']['contrast(calibration=model, materials=graphene,hbn)']['params']['materials'] == \
        'graphene,hbn'
    assert not (tmp_path / 'second' / 'overlays').exists()

"""flake-calibrate: a microscope's calibration from its own unlabelled frames, one file that the
detector reads, labels that refine it, and a command line that says what is wrong."""

import json

import cv2
import numpy as np
import pytest

from flake_core.calibration import Calibration, load_calibration
from flake_core.camera_response import lamp_band_power
from flake_detector.calibrate import LabelledFlake, calibrate, main, plot_scatter
from flake_detector.evaluation import layer_range_of_name

# Tolerances flake-calibrate promises on a simulated microscope from ten unlabelled frames of
# graphene (docs/detector.md): oxide within 10 nm, gamma within 0.25, each white-balance gain
# within 6 %.
OXIDE_TOLERANCE_NM = 10.0
GAMMA_TOLERANCE = 0.25
WHITE_BALANCE_TOLERANCE = 0.06


def _simulated_microscope(oxide_nm, gamma, white_balance_k, frames=10, seed=21, size=384):
    """Unlabelled frames of a simulated microscope whose chips, camera gamma and white balance
    the calibration does not know; and the camera's true response."""
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    wafer = VirtualWafer.generate(WaferConfig(seed=seed, oxide_nm=oxide_nm, thin_fraction=0.5, chip_width_m=2e-3,
                                              chip_height_m=2e-3, material_mix={'graphene': 1.0}))
    camera = CameraModel(wafer, CameraSettings(width=size, height=size, objective='20x', seed=seed, gamma=gamma,
                                               white_balance_k=white_balance_k))
    rng = np.random.default_rng(seed)
    flakes = [o for o in wafer.flakes() if 0.2e-3 < o.centre[0] < 1.8e-3 and 0.2e-3 < o.centre[1] < 1.8e-3]
    images = []
    for k in rng.permutation(len(flakes))[:frames]:
        x, y = wafer.wafer_to_stage.apply(*flakes[int(k)].centre)
        images.append((f'frame{k}.png', camera.render(x, y)))
    return images, camera.response


@pytest.fixture(scope='module')
def microscope():
    images, truth = _simulated_microscope(270.0, 2.2, 4500.0)
    return images, truth, calibrate(images, 'graphene', min_area_px=60)


def test_recovers_the_oxide_gamma_and_white_balance_of_a_simulated_microscope(microscope):
    _, truth, result = microscope
    cal = result.calibration
    assert abs(cal.oxide_nm - 270.0) <= OXIDE_TOLERANCE_NM
    assert abs(cal.camera.gamma - 2.2) <= GAMMA_TOLERANCE
    # The white balance as the camera applies it, relative to green, for the lamp assumed (3200 K).
    expected = truth.balance() / lamp_band_power(truth.lamp_temperature_k, truth.spectral)
    expected = expected / expected[1]
    for image in cal.images:
        np.testing.assert_allclose(image['white_balance'], expected, rtol=WHITE_BALANCE_TOLERANCE)
    assert result.report['inlier_share'] > 0.8 and result.report['regions'] >= 10
    assert 'oxide' in result.summary() and 'white balance' in result.summary()


def test_the_file_it_writes_is_the_one_calibration_the_detector_reads(microscope, tmp_path):
    from flake_detector.optical import OpticalDetector

    images, _, result = microscope
    path = result.calibration.save(tmp_path / 'scope.json')
    again = load_calibration(path)
    assert again == Calibration.load(path)
    assert again.oxide_nm == result.calibration.oxide_nm and again.camera == result.calibration.camera
    detector = OpticalDetector(materials='graphene', calibration=str(path), max_layers=10, min_area_px=60, work_size=0)
    assert detector.microscope.oxide_nm == again.oxide_nm
    unaware = OpticalDetector(materials='graphene', calibration='model', max_layers=10, min_area_px=60, work_size=0)

    def found(d):
        return sum(len([x for x in d.detect(image).detections if x.material == 'graphene']) for _, image in images)

    # Frames centred on graphene flakes (half of them thin): read through the fitted calibration
    # most of the thin ones are found; read as a linear camera on 90 nm oxide, few.
    assert found(detector) >= len(images) // 2 > found(unaware)
    png = plot_scatter(result, tmp_path / 'scatter.png')
    assert cv2.imread(str(png)).shape[1] > 500


def test_labelled_flakes_pin_the_ladder_and_become_measured_classes():
    images, _ = _simulated_microscope(90.0, 1.0, 3200.0, frames=4, seed=5, size=256)
    # Two labelled bilayers (made up here: their colour is then whatever the frames show).
    rng = np.random.default_rng(0)
    labels = []
    for name, image in images[:2]:
        mask = np.zeros(image.shape[:2], bool)
        y, x = (int(v) for v in rng.integers(40, 200, 2))
        mask[y:y + 12, x:x + 12] = True
        labels.append(LabelledFlake(name, 'graphene', (2, 2), mask=mask))
    result = calibrate(images, 'graphene', labels, min_area_px=40)
    assert result.report['labelled'] == 2
    assert [c.layers for c in result.calibration.materials['graphene']] == [2]
    assert result.calibration.materials['graphene'][0].regions == 2
    with pytest.raises(ValueError, match='not among the fitted materials'):
        calibrate(images, 'graphene', [LabelledFlake(images[0][0], 'hbn', (30, 30), mask=labels[0].mask)])
    with pytest.raises(ValueError, match='were not given'):
        calibrate(images, 'graphene', [LabelledFlake('elsewhere.png', 'graphene', (1, 1), point=(5, 5))])


def test_layer_label_names():
    assert layer_range_of_name('3L') == (3, 3)
    assert layer_range_of_name('>5L') == (6, float('inf'))
    assert layer_range_of_name('>=5L') == (5, float('inf'))
    assert layer_range_of_name(' 2 layers') == (2, 2)
    assert layer_range_of_name('bulk') is None


def test_command_line_writes_the_calibration_and_the_scatter(tmp_path, capsys):
    images, _ = _simulated_microscope(90.0, 1.0, 3200.0, frames=4, seed=5, size=256)
    folder = tmp_path / 'frames'
    folder.mkdir()
    for name, image in images:
        cv2.imwrite(str(folder / name), image)
    out = tmp_path / 'scope.json'
    assert main([str(folder), '--material', 'graphene', '--out', str(out), '--plot', str(tmp_path / 'fit.png'),
                 '--min-area-px', '40', '--fixed-bands']) == 0
    data = json.loads(out.read_text())
    assert data['format'] == 'flake-calibration/1' and 60.0 <= data['oxide_nm'] <= 120.0
    assert len(data['images']) == 4 and (tmp_path / 'fit.png').is_file()
    assert 'oxide' in capsys.readouterr().out


@pytest.mark.parametrize('argv, message', [
    (['--material', 'graphne'], "unknown material 'graphne'"),
    (['--material', 'graphene', '--oxide-range', '300,100'], 'LOW <= HIGH'),
    (['--material', 'graphene', '--labels', 'missing.json'], 'no such file'),
])
def test_command_line_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message):
    image = np.full((64, 64, 3), 120, np.uint8)
    cv2.imwrite(str(tmp_path / 'a.png'), image)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / 'a.png'), '--out', str(tmp_path / 'x.json'), *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_command_line_says_when_there_is_nothing_to_fit(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / 'blank.png'), np.full((64, 64, 3), 120, np.uint8))
    assert main([str(tmp_path / 'blank.png'), '--material', 'graphene', '--out', str(tmp_path / 'x.json')]) == 2
    assert 'too few to fit' in capsys.readouterr().err
    assert not (tmp_path / 'x.json').exists()


def test_flake_detect_self_calibrates_on_the_images_it_is_given(microscope, tmp_path):
    from flake_detector.cli import main as detect_main

    images, _, _ = microscope
    paths = []
    for name, image in images:
        cv2.imwrite(str(tmp_path / name), image)
        paths.append(str(tmp_path / name))
    out = tmp_path / 'out'
    assert detect_main(['--self-calibrate', '--materials', 'graphene', '--param', 'min_area_px=60', '--no-overlays',
                        '--out', str(out), *paths]) == 0
    fitted = Calibration.load(out / 'calibration.json')
    assert abs(fitted.oxide_nm - 270.0) <= OXIDE_TOLERANCE_NM
    detections = json.loads((out / 'detections.json').read_text())
    assert detections['params']['calibration'] == str(out / 'calibration.json')
    assert sum(d['material'] == 'graphene' for f in detections['frames'] for d in f['detections']) >= len(images)


def test_flake_detect_refuses_self_calibration_beside_a_given_calibration(tmp_path, capsys):
    from flake_detector.cli import main as detect_main

    with pytest.raises(SystemExit):
        detect_main(['--self-calibrate', '--param', 'calibration=model', '--out', str(tmp_path), 'a.png'])
    assert '--self-calibrate fits the calibration' in capsys.readouterr().err

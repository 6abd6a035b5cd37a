"""Thin-film optics of the simulator, checked against measured graphene contrast."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from flake_core import calibration, optics
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.wafer import VirtualWafer, WaferConfig


def measured_graphene(layers: int) -> np.ndarray:
    """Measured contrast (B, G, R) of the shipped graphene calibration (2DMatGMM, 90 nm SiO2)."""
    data = json.loads(calibration.MEASURED_FILE.read_text())
    entry = next(c for c in data['materials']['graphene']['classes'] if c['layers'] == layers)
    return np.array(entry['contrast_rgb'][::-1])


def write_calibration(path: Path, material: str, classes: list) -> Path:
    path.write_text(json.dumps({'format': calibration.FORMAT, 'oxide_nm': 90.0,
                                'materials': {material: {'classes': classes}}}))
    return path


@pytest.mark.parametrize('layers', [1, 2, 3])
def test_transfer_matrix_model_alone_matches_measured_graphene(layers):
    model = optics.model_contrast('graphene', layers * optics.layer_thickness_nm('graphene'), 90.0)
    assert np.all(model < 0), 'graphene on 90 nm SiO2 is darker than the substrate'
    np.testing.assert_allclose(model, measured_graphene(layers), atol=0.03)


def test_contrast_grows_with_layer_count_and_thick_graphite_is_bright():
    green = [calibration.flake_contrast('graphene', n, 90.0)[1] for n in (1, 2, 3, 4)]
    assert green == sorted(green, reverse=True)
    assert optics.model_contrast('graphene', 300.0, 90.0).min() > 0.5


def test_hbn_monolayer_nearly_invisible_but_10nm_strongly_coloured():
    assert np.abs(calibration.flake_contrast('hbn', 1, 90.0)).max() < 0.04
    ten_nm = optics.model_contrast('hbn', 10.0, 90.0)
    assert ten_nm[0] > 0.8 and ten_nm[2] < 0.0  # blue up, red down: the blue look of thin hBN


def test_calibration_overrides_model_only_for_its_layer_counts(tmp_path):
    path = write_calibration(tmp_path / 'mos2.json', 'mos2', [
        {'layers': 1, 'contrast_rgb': [-0.4, -0.5, -0.6], 'covariance_rgb': np.eye(3).tolist()}])
    model = calibration.OpticsModel([calibration.Calibration.load(path)])
    np.testing.assert_allclose(model.flake_contrast('mos2', 1, 90.0), [-0.6, -0.5, -0.4])
    np.testing.assert_allclose(model.flake_contrast('mos2', 2, 90.0),
                               optics.model_contrast('mos2', 1.3, 90.0))
    np.testing.assert_allclose(model.flake_contrast('mos2', 1, 285.0),
                               optics.model_contrast('mos2', 0.65, 285.0))


def test_bad_inputs_are_rejected_clearly(tmp_path):
    with pytest.raises(ValueError, match='unknown material'):
        calibration.flake_contrast('unobtainium', 1, 90.0)
    with pytest.raises(ValueError, match='layer count'):
        calibration.flake_contrast('graphene', 0, 90.0)
    bad = write_calibration(tmp_path / 'bad.json', 'graphene', [{'layers': 1, 'contrast_rgb': [1]}])
    with pytest.raises(ValueError, match='cannot read calibration'):
        calibration.Calibration.load(bad)


def _contrast_on_rendered_frame(layers: int) -> np.ndarray:
    wafer = VirtualWafer.generate(WaferConfig(
        seed=5, chip_width_m=1e-3, chip_height_m=1e-3, flake_density_per_mm2=0,
        residue_line_density_per_mm2=0, residue_network_density_per_mm2=0, dust_density_per_mm2=0,
        bulk_density_per_mm2=0, mount_offset_m=(0.0, 0.0), mount_rotation_rad=0.0))
    centre = np.array([0.5e-3, 0.5e-3])
    square = centre + np.array([[-20e-6, -20e-6], [20e-6, -20e-6], [20e-6, 20e-6], [-20e-6, 20e-6]])
    flake = wafer.add_object('flake', 'graphene', square, layers=layers)
    camera = CameraModel(wafer, CameraSettings(width=384, height=384, objective='20x', seed=2))
    x, y = wafer.wafer_to_stage.apply(*centre)
    image = camera.render(x, y).astype(np.float64)  # in focus, with shot and read noise
    truth = {o.object_id: o for o in camera.ground_truth(x, y).objects}
    mask = truth[flake.object_id].mask
    inner = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
    ring &= ~cv2.dilate(mask.astype(np.uint8), np.ones((13, 13), np.uint8)).astype(bool)
    flake_mean, background = image[inner].mean(axis=0), image[ring].mean(axis=0)
    return flake_mean / background - 1.0


@pytest.mark.parametrize('layers', [1, 2, 3])
def test_rendered_graphene_contrast_on_90nm_matches_measured(layers):
    np.testing.assert_allclose(_contrast_on_rendered_frame(layers), measured_graphene(layers), atol=0.03)


@pytest.mark.parametrize('material', ['graphene', 'hbn', 'mos2', 'wte2', 'residue'])
def test_vectorised_transfer_matrix_equals_the_tmm_package(material):
    thicknesses = np.array([0.335, 3.0, 27.0, 150.0, 900.0])
    for oxide in optics.OXIDE_THICKNESSES_NM:
        for wavelength in (440.0, 535.0, 640.0):
            fast = optics.stack_reflectance(material, thicknesses, oxide, wavelength)
            reference = [optics.tmm_reflectance(material, d, oxide, wavelength) for d in thicknesses]
            np.testing.assert_allclose(fast, reference, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(optics.stack_reflectance(None, 0.0, oxide, 500.0),
                                   optics.tmm_reflectance(None, 0.0, oxide, 500.0), rtol=1e-9)


def test_contrast_table_is_consistent_with_single_lookups():
    model = calibration.default_model()
    table = model.contrast_table('mos2', 285.0)
    assert table.shape == (300, 3)
    np.testing.assert_allclose(table[6], optics.model_contrast('mos2', 7 * 0.65, 285.0))
    np.testing.assert_allclose(model.contrast_table('graphene', 90.0)[0], measured_graphene(1))

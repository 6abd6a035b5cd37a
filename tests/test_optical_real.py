"""The optical detector on frames as a real microscope gives them: half off the chip, a colour
no calibration explains, a channel the substrate saturates, bright crystals with blurred rims,
a gamma-encoded camera, a wrong material name."""

from detector_synth import SUBSTRATE_BGR, make_frame, random_polygon
import numpy as np
import pytest

from flake_core.calibration import Calibration
from flake_core.camera_response import CameraResponse
from flake_detector.cli import main as flake_detect
from flake_detector.detection import make_detector
from flake_detector.optical import OpticalDetector, thin_film_contrast


def _iou(det, mask):
    full = det.full_mask(mask.shape)
    return (full & mask).sum() / max(1, (full | mask).sum())


def _half_off_chip_frame(frac_off: float, seed: int = 3):
    """A 10x frame of the simulated microscope whose left ``frac_off`` lies beside the chip,
    with graphene flakes of 1, 2, 3 and 5 layers on the chip's part."""
    import cv2  # noqa: F401  (the simulator's renderer)

    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    wafer = VirtualWafer.generate(WaferConfig(
        seed=seed, chip_width_m=2e-3, chip_height_m=2e-3, flake_density_per_mm2=0,
        residue_line_density_per_mm2=0, residue_network_density_per_mm2=0, dust_density_per_mm2=0,
        bulk_density_per_mm2=0, mount_offset_m=(1e-3, 1e-3), mount_rotation_rad=0.0))
    camera = CameraModel(wafer, CameraSettings(width=512, height=512, objective='10x', seed=seed))
    fov = camera.field_of_view[0]
    centre_x = (0.5 - frac_off) * fov  # the chip starts at wafer x = 0
    on_chip = centre_x + fov / 2
    flakes = []
    for k, layers in enumerate((1, 2, 3, 5)):
        centre = np.array([max(25e-6, (0.25 + 0.15 * k) * on_chip), 1e-3 + (k - 1.5) * 0.22 * fov])
        square = centre + 15e-6 * np.array([[-1, -1], [1, -0.8], [0.9, 1], [-1, 0.7]])
        flakes.append(wafer.add_object('flake', 'graphene', square, layers=layers))
    x, y = wafer.wafer_to_stage.apply(centre_x, 1e-3)
    truth = {o.object_id: o for o in camera.ground_truth(x, y).objects}
    return camera.render(x, y), [truth[f.object_id] for f in flakes]


@pytest.mark.parametrize('frac_off', [0.5, 0.7])
def test_a_frame_half_off_the_chip_still_finds_its_flakes(frac_off):
    image, truths = _half_off_chip_frame(frac_off)
    # The dark area beside the chip is most of the frame: its most common colour is not the substrate.
    assert (image[:, : int(512 * frac_off) - 8].mean(axis=2) < 0.25 * image[:, -8:].mean()).all()
    detector = make_detector('contrast', materials='graphene', max_layers=10, work_size=0)
    detections = detector.detect(image).detections
    for truth in truths:
        best = max(detections, key=lambda d: _iou(d, truth.mask))
        assert _iou(best, truth.mask) >= 0.8 and best.layers == truth.layers
    # Nothing is reported beside the chip or along its edge.
    edge = int(512 * frac_off)
    assert all(d.bbox[0] >= edge for d in detections)


def _painted_frame(seed, contrast_rgb, size=256):
    """A vignetted substrate with graphene flakes of 1 and 2 layers and one region painted in
    ``contrast_rgb`` (a colour chosen by the test)."""
    import cv2

    image, truths = make_frame(seed, size, flakes=[('graphene', 1), ('graphene', 2)], clutter=False)
    rng = np.random.default_rng(seed)
    # The spot farthest from the flakes and the frame's edge.
    free = np.ones((size, size), np.uint8)
    free[[0, -1], :] = free[:, [0, -1]] = 0
    for t in truths:
        free[t.mask] = 0
    distance = cv2.distanceTransform(free, cv2.DIST_L2, 5)
    cy, cx = np.unravel_index(int(np.argmax(distance)), distance.shape)
    radius = min(26.0, 0.8 * float(distance.max()))
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(random_polygon(rng, (cx, cy), radius)).astype(np.int32)], 1)
    mask = mask.astype(bool)
    assert mask.sum() > 600
    painted = image.astype(np.float64)
    painted[mask] *= 1.0 + np.array(contrast_rgb)[::-1]
    return np.clip(np.round(painted), 0, 255).astype(np.uint8), truths, mask


def test_a_region_whose_colour_fits_no_class_is_reported_as_unknown_with_its_contrast():
    colour = (0.30, -0.25, 0.45)  # brighter in red and blue, darker in green: no graphene, any thickness
    image, truths, mask = _painted_frame(7, colour)
    detections = make_detector('contrast', materials='graphene', calibration='model', max_layers=10,
                               work_size=0).detect(image).detections
    unknown = [d for d in detections if d.material == 'unknown']
    assert len(unknown) == 1
    assert _iou(unknown[0], mask) >= 0.7
    np.testing.assert_allclose(unknown[0].contrast, colour, atol=0.04)
    assert unknown[0].extra['mahalanobis'] > 4.0 and np.isnan(unknown[0].layers)
    # The graphene flakes are still graphene, with their layer counts.
    for truth in truths:
        best = max((d for d in detections if d.material == 'graphene'), key=lambda d: _iou(d, truth.mask))
        assert _iou(best, truth.mask) >= 0.7 and best.layers == truth.layers
    # Asked not to, the detector drops the region as before.
    quiet = OpticalDetector(materials='graphene', calibration='model', max_layers=10, work_size=0,
                            report_unknown=False).detect(image).detections
    assert not [d for d in quiet if d.material == 'unknown']


def test_a_channel_the_substrate_saturates_is_left_out_and_flakes_keep_their_layers():
    # Red at full scale on the bare substrate (a strongly white-balanced JPEG camera): red says
    # nothing of a flake, green and blue still tell 1, 2 and 3 layers of graphene apart.
    image, truths = make_frame(12, 256, flakes=[('graphene', n) for n in (1, 2, 3)], clutter=False, noise=1.0)
    red = image[..., 2].astype(np.float64) * (300.0 / SUBSTRATE_BGR[2])
    image[..., 2] = np.clip(red, 0, 255).astype(np.uint8)
    assert np.median(image[..., 2]) == 255
    detections = make_detector('contrast', materials='graphene', calibration='model', max_layers=10,
                               work_size=0).detect(image).detections
    for truth in truths:
        best = max(detections, key=lambda d: _iou(d, truth.mask))
        assert _iou(best, truth.mask) >= 0.7 and best.layers == truth.layers


def test_the_blurred_rim_of_a_bright_crystal_is_not_a_thin_flake():
    import cv2

    # A bulk crystal four times brighter than the substrate, blurred over a few pixels, next
    # to a real bilayer: its rim passes through every thin graphene colour.
    size = 256
    rng = np.random.default_rng(5)
    vv, uu = np.mgrid[0:size, 0:size].astype(np.float64)
    substrate = SUBSTRATE_BGR * (1.0 - 0.06 * ((uu - 128) ** 2 + (vv - 128) ** 2) / 128 ** 2)[..., None]
    scale = np.ones((size, size, 3))
    crystal = np.zeros((size, size), np.uint8)
    cv2.fillPoly(crystal, [np.array([[30, 40], [120, 30], [140, 120], [50, 140]], np.int32)], 1)
    scale[crystal.astype(bool)] = (3.0, 3.2, 2.8)
    bilayer = np.zeros((size, size), np.uint8)
    cv2.fillPoly(bilayer, [np.array([[170, 160], [220, 150], [230, 210], [175, 220]], np.int32)], 1)
    scale[bilayer.astype(bool)] = 1.0 + np.array(thin_film_contrast('graphene', 2, 90.0))[::-1]
    scale = cv2.GaussianBlur(scale, (0, 0), 2.5)
    image = np.clip(substrate * scale * 0.3 + rng.normal(0, 1.0, (size, size, 3)), 0, 255).astype(np.uint8)
    detections = make_detector('contrast', materials='graphene', calibration='model', max_layers=10,
                               work_size=0).detect(image).detections
    graphene = [d for d in detections if d.material == 'graphene']
    assert len(graphene) == 1 and graphene[0].layers == 2 and _iou(graphene[0], bilayer.astype(bool)) >= 0.7


def test_a_gamma_encoded_camera_is_read_through_its_calibration(tmp_path):
    # Frames of a camera with gamma 2.2: its digital numbers are no longer linear in light, and
    # the contrast read off them is too weak; decoded with the calibration's camera, the layer
    # counts are right again.
    camera = CameraResponse(gamma=2.2)
    calibration = Calibration(oxide_nm=90.0, camera=camera, name='gamma22')
    path = calibration.save(tmp_path / 'cal.json')
    linear, truths = make_frame(21, 256, flakes=[('graphene', n) for n in (1, 2, 3, 4)], clutter=False, noise=0.5)
    encoded = np.clip(np.round(camera.encode(linear / 255.0)), 0, 255).astype(np.uint8)
    right = OpticalDetector(materials='graphene', calibration=str(path), max_layers=10, work_size=0)
    wrong = OpticalDetector(materials='graphene', calibration='model', max_layers=10, work_size=0)
    assert right.model_version.startswith('gamma22-sio2-90nm')
    found_right = found_wrong = 0
    for detector, counter in ((right, 'right'), (wrong, 'wrong')):
        detections = detector.detect(encoded).detections
        hits = sum(any(_iou(d, t.mask) >= 0.7 and d.layers == t.layers for d in detections) for t in truths)
        if counter == 'right':
            found_right = hits
        else:
            found_wrong = hits
    assert found_right == 4 and found_wrong <= 2


def test_flake_detect_refuses_a_wrong_material_in_one_line(tmp_path, capsys):
    import cv2

    image, _ = make_frame(3, 64, flakes=[('graphene', 1)], clutter=False)
    cv2.imwrite(str(tmp_path / 'a.png'), image)
    with pytest.raises(SystemExit) as stop:
        flake_detect(['--backend', 'contrast', '--param', 'materials=graphne', '--out', str(tmp_path / 'out'),
                      str(tmp_path / 'a.png')])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unknown material 'graphne'" in err and 'Traceback' not in err
    with pytest.raises(SystemExit):
        flake_detect(['--param', 'calibration=no/such/file.json', '--out', str(tmp_path / 'out'),
                      str(tmp_path / 'a.png')])
    assert 'no such file' in capsys.readouterr().err

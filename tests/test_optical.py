"""Optical (contrast) detector and thickness estimator against synthetic ground truth."""

from detector_synth import make_frame
import numpy as np
import pytest

from flake_core.materials import LAYER_FEW, LAYER_MONO
from flake_detector.detection import make_detector
from flake_detector.optical import (
    OpticalDetector,
    contrast_map,
    estimate_background,
    estimate_thickness,
    load_calibration,
    thin_film_contrast,
)


def test_thin_film_model_matches_the_notes_table():
    # notes/optics-and-stem.md: graphene 1L on 90 nm SiO2 is -0.133 / -0.132 / -0.074 (R/G/B).
    r, g, b = thin_film_contrast('graphene', 1, 90.0)
    assert r == pytest.approx(-0.133, abs=0.006)
    assert g == pytest.approx(-0.132, abs=0.006)
    assert b == pytest.approx(-0.074, abs=0.006)
    # On 285 nm the blue channel turns slightly positive.
    assert thin_film_contrast('graphene', 1, 285.0)[2] > -0.01


def test_measured_calibration_keeps_measured_classes_and_extends_with_the_model():
    calibration = load_calibration('graphene', 90.0, 'measured')
    assert calibration.version == '2dmatgmm-sio2-90nm-graphene-measured'
    one = int(np.nonzero(calibration.layers == 1)[0][0])
    assert calibration.means[one].tolist() == pytest.approx([-0.137, -0.140, -0.071])
    assert 10 in calibration.layers  # beyond the measured 1-4 layers: thin-film model


def test_background_recovers_vignetted_substrate():
    image, _ = make_frame(3, 256, noise=1.0)
    background = estimate_background(image)
    # Corner vs centre of the synthetic vignetting (8 % at the edge midpoints).
    assert background[128, 128, 1] > background[5, 128, 1]
    contrast = contrast_map(image, background, smooth=1)
    assert abs(float(np.median(contrast[..., 1]))) < 0.01


@pytest.mark.parametrize('seed', [11, 12])
def test_thickness_of_a_known_mask_matches_ground_truth(seed):
    calibration = load_calibration('graphene', 90.0, 'model').restrict(10)
    image, truths = make_frame(seed, 256, flakes=[('graphene', n) for n in (1, 2, 3, 4, 5)], noise=2.0)
    for truth in truths:
        estimate = estimate_thickness(image, truth.mask, calibration)
        assert estimate.layers == truth.layers
        assert estimate.thickness_nm == pytest.approx(truth.layers * 0.335, abs=1e-6)
        assert 0.0 <= estimate.layers_std < 0.5
        assert estimate.probability > 0.9


def test_thickness_uncertainty_grows_between_classes():
    calibration = load_calibration('graphene', 90.0, 'model').restrict(10)
    c1 = np.array(thin_film_contrast('graphene', 1, 90.0))
    c2 = np.array(thin_film_contrast('graphene', 2, 90.0))
    from flake_detector.optical import estimate_from_contrast
    sure = estimate_from_contrast(calibration, c1)
    torn = estimate_from_contrast(calibration, 0.5 * (c1 + c2))
    assert sure.layers == 1 and sure.layers_std < 0.05
    assert torn.layers_std > 0.3
    assert torn.probability < 0.8


def test_hbn_thickness_from_the_model():
    calibration = load_calibration('hbn', 285.0, 'model')
    # hBN 10-90 nm is up to 5x brighter than the substrate in green: a camera exposed
    # for it shows a dim substrate.
    image, truths = make_frame(4, 256, flakes=[('hbn', 60), ('hbn', 150)], oxide_nm=285.0, noise=1.0,
                               clutter=False, brightness=0.3)
    assert image.max() < 255
    for truth in truths:
        estimate = estimate_thickness(image, truth.mask, calibration)
        assert estimate.thickness_nm == pytest.approx(truth.layers * 0.333, abs=3.0)


def _match(detections, truths, min_iou=0.5):
    found = {}
    for k, truth in enumerate(truths):
        for det in detections:
            full = det.full_mask(truth.mask.shape)
            iou = (full & truth.mask).sum() / max(1, (full | truth.mask).sum())
            if iou >= min_iou:
                found[k] = det
    return found


def test_optical_detector_finds_graphene_with_exact_layers_and_ignores_clutter():
    detector = make_detector('contrast', materials='graphene', calibration='model', max_layers=10)
    assert isinstance(detector, OpticalDetector)
    exact = total = false_positives = 0
    for seed in range(20, 26):
        image, truths = make_frame(seed, 256, flakes=[('graphene', n) for n in (1, 2, 3, 4, 5)])
        result = detector.detect(image)
        found = _match(result.detections, truths)
        total += len(truths)
        exact += sum(found[k].layers == truths[k].layers for k in found)
        false_positives += len(result.detections) - len(found)
        for det in result.detections:
            assert det.detector == 'contrast' and det.model_version == 'model-sio2-90nm-graphene'
    assert exact / total >= 0.9
    assert false_positives <= 3


def test_layer_class_and_full_resolution_masks_on_a_large_frame():
    detector = OpticalDetector(materials=['graphene'], calibration='model', max_layers=10, work_size=512)
    image, truths = make_frame(7, 1024, flakes=[('graphene', 1), ('graphene', 3)], clutter=False,
                               radius=(60, 90))
    result = detector.detect(image)
    found = _match(result.detections, truths, min_iou=0.8)
    assert set(found) == {0, 1}
    assert found[0].layer_class == LAYER_MONO and found[1].layer_class == LAYER_FEW
    assert found[0].to_json()['mask_rle']['size'] == [found[0].bbox[3], found[0].bbox[2]]


def test_flake_detect_cli_writes_overlays_and_json(tmp_path):
    import json

    import cv2

    from flake_detector.cli import main as detect_main

    image, truths = make_frame(8, 256, flakes=[('graphene', 1), ('graphene', 2)], clutter=False, radius=(24, 30))
    cv2.imwrite(str(tmp_path / 'frame.png'), image)
    assert detect_main(['--backend', 'contrast', '--param', 'calibration=model', '--param', 'max_layers=10',
                        '--out', str(tmp_path / 'out'), str(tmp_path / 'frame.png')]) == 0
    overlay = cv2.imread(str(tmp_path / 'out' / 'overlays' / 'frame.png'))
    assert overlay.shape == image.shape and not np.array_equal(overlay, image)
    records = json.loads((tmp_path / 'out' / 'detections.json').read_text())
    layers = sorted(d['layers'] for d in records['frames'][0]['detections'])
    assert layers == [1.0, 2.0]
    predictions = json.loads((tmp_path / 'out' / 'predictions.json').read_text())
    assert len(predictions['predictions']) == 2 and predictions['funnel'][0]['stage'] == 'foreground regions'
    with pytest.raises(SystemExit):
        detect_main(['--backend', 'nonsense', '--out', str(tmp_path / 'x'), str(tmp_path / 'frame.png')])


def test_sampled_noise_matches_the_noise_of_the_full_contrast_map():
    from flake_detector.optical import _pixel_noise, _sampled_noise

    for seed, noise in ((30, 1.0), (31, 3.0)):
        image, _ = make_frame(seed, 512, noise=noise)
        background = estimate_background(image)
        full = _pixel_noise(contrast_map(image, background, smooth=3))
        assert _sampled_noise(image, background, smooth=3) == pytest.approx(full, rel=0.1)
    # More camera noise, more contrast noise: the estimate follows the frame.
    assert full > 0.004


def test_odd_sized_frames_and_flakes_on_the_frame_edge_keep_their_full_resolution_masks():
    detector = OpticalDetector(materials=['graphene'], calibration='model', max_layers=10, work_size=0)
    image, truths = make_frame(40, 256, flakes=[('graphene', 1), ('graphene', 2), ('graphene', 3)],
                               clutter=False, radius=(26, 34))
    whole = _match(detector.detect(image).detections, truths, min_iou=0.8)
    assert set(whole) == {0, 1, 2}
    # Cut the frame through the first flake, to an odd size: what is left of it is still found,
    # with a mask that reaches the last row and column of the frame.
    u, v = (int(c) for c in truths[0].centre)
    cropped = np.ascontiguousarray(image[:v + 1, :u + 1])
    cut = [t for t in truths if t.mask[:v + 1, :u + 1].sum() >= 60]
    for t in cut:
        t.mask = t.mask[:v + 1, :u + 1]
    result = detector.detect(cropped)
    found = _match(result.detections, cut, min_iou=0.7)
    assert 0 in found and found[0].layers == 1
    assert found[0].full_mask(cropped.shape)[-1].any() and found[0].full_mask(cropped.shape)[:, -1].any()
    for det in result.detections:
        x, y, w, h = det.bbox
        assert x >= 0 and y >= 0 and x + w <= cropped.shape[1] and y + h <= cropped.shape[0]


def _simulated_chip_frame(objects, size=384, seed=5, exposure_s=0.01):
    """A frame of the simulated microscope (10x, 90 nm SiO2) holding only ``objects``:
    (kind, material, layers, thickness_nm, (x, y) offset from the frame centre [um], radius [um])."""
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    wafer = VirtualWafer.generate(WaferConfig(
        seed=seed, chip_width_m=2e-3, chip_height_m=2e-3, flake_density_per_mm2=0.0,
        residue_line_density_per_mm2=0.0, residue_network_density_per_mm2=0.0, dust_density_per_mm2=0.0,
        bulk_density_per_mm2=0.0))
    centre = np.array([1e-3, 1e-3])
    rng = np.random.default_rng(seed)
    for kind, material, layers, thickness_nm, offset, radius in objects:
        at = centre + np.array(offset) * 1e-6
        if kind == 'residue':
            path = at + np.stack([np.linspace(-radius, radius, 12), 6 * np.sin(np.linspace(0, 3, 12))], axis=1) * 1e-6
            wafer.add_object('residue', 'residue', path, thickness_nm=thickness_nm, shape='line', line_width_m=2e-6)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
            radii = radius * rng.uniform(0.75, 1.0, 7) * 1e-6
            polygon = at + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
            wafer.add_object(kind, material, polygon, layers=layers)
    camera = CameraModel(wafer, CameraSettings(width=size, height=size, seed=seed, exposure_s=exposure_s))
    x, y = wafer.wafer_to_stage.apply(*centre)
    truth = camera.ground_truth(x, y)
    # In the order given (each material and layer count is placed once).
    by_kind = {(o.material, o.layers): o for o in truth.objects if o.kind == 'flake'}
    flakes = [by_kind[(m, n)] for kind, m, n, *_ in objects if kind == 'flake' and (m, n) in by_kind]
    return camera.render(x, y), flakes, truth


def test_few_layer_mos2_and_wte2_are_found_with_their_material_among_all_four():
    # MoS2 5 layers saturates the blue channel at the simulator's exposure; the tape residue
    # line has the colour of 10-20 nm hBN.
    flakes = [('flake', 'mos2', 2, None, (-90, -80), 14), ('flake', 'mos2', 5, None, (0, -80), 14),
              ('flake', 'wte2', 3, None, (80, -70), 14), ('flake', 'wte2', 1, None, (-80, 50), 13),
              ('flake', 'graphene', 2, None, (0, 30), 14), ('residue', '', 0, 15.0, (70, 60), 40)]
    image, truths, _ = _simulated_chip_frame(flakes)
    assert len(truths) == 5
    blue_of_mos2_5l = image[truths[1].mask, 0]
    assert (blue_of_mos2_5l == 255).mean() > 0.5
    detector = make_detector('contrast', materials='graphene,hbn,mos2,wte2', max_layers=10, work_size=0)
    result = detector.detect(image)
    found = _match(result.detections, truths, min_iou=0.5)
    assert set(found) == {0, 1, 2, 3, 4}
    for k, truth in enumerate(truths):
        assert (found[k].material, found[k].layers) == (truth.material, truth.layers)
        assert found[k].extra['material_probability'] > 0.5
    assert found[1].extra['saturated_channels'] == 1
    # Nothing else: the residue line is not taken for hBN.
    assert len(result.detections) == 5


def test_residue_lines_are_rejected_by_shape_and_thick_flakes_do_not_pass_for_thin_ones():
    # 60 nm hBN saturates green and blue: one channel left, which every material reaches at
    # some thickness, so it is not reported as anything (MoS2 8 layers has its red contrast).
    flakes = [('residue', '', 0, 10.0, (-60, -60), 60), ('residue', '', 0, 20.0, (40, 60), 50),
              ('flake', 'hbn', 180, None, (60, -60), 16), ('flake', 'hbn', 30, None, (-70, 60), 16)]
    image, truths, _ = _simulated_chip_frame(flakes, seed=6)
    detector = make_detector('contrast', materials='graphene,hbn,mos2,wte2', max_layers=40, work_size=0)
    result = detector.detect(image)
    found = _match(result.detections, truths, min_iou=0.5)
    assert set(found) == {1}  # the 10 nm hBN flake, with its material
    assert found[1].material == 'hbn' and abs(found[1].layers - 30) <= 3
    assert len(result.detections) == 1
    # Without the shape test, the lines come back as hBN.
    loose = make_detector('contrast', materials='graphene,hbn,mos2,wte2', max_layers=40, work_size=0,
                          max_elongation=1e9)
    assert sum(d.material == 'hbn' for d in loose.detect(image).detections) >= 2


def test_small_flakes_that_clip_blue_keep_their_rim():
    # MoS2 of 5-6 layers and about 90 px: blue clips, and the blurred rim (clipped blue, red
    # and green halfway to the substrate) fits no class; it must stay part of the flake.
    flakes = [('flake', 'mos2', 6, None, (-60, 0), 4.0), ('flake', 'mos2', 5, None, (60, 0), 4.0)]
    image, truths, _ = _simulated_chip_frame(flakes, size=256, seed=9)
    assert all(80 <= t.area_px <= 100 for t in truths)
    detector = make_detector('contrast', materials='graphene,hbn,mos2,wte2', max_layers=10, min_area_px=40,
                             work_size=0)
    # A pixel of rim is a large share of so small a flake: IoU 0.45.
    found = _match(detector.detect(image).detections, truths, min_iou=0.45)
    assert {k: (d.material, d.layers) for k, d in found.items()} == {0: ('mos2', 6), 1: ('mos2', 5)}


def test_mos2_of_twenty_layers_that_clips_two_channels_is_measured_by_its_rim():
    # MoS2 20 layers is 4-6x brighter than the substrate. At 5 ms blue and green clip, red
    # does not: the clipped core alone fits any bright flake; the unclipped rim gives the
    # direction of its colour, red its magnitude. A 100 nm hBN flake (clipped as well,
    # thicker than reported) stays out.
    flakes = [('flake', 'mos2', 20, None, (-60, 0), 12), ('flake', 'hbn', 300, None, (60, 0), 12)]
    image, truths, _ = _simulated_chip_frame(flakes, size=256, seed=12, exposure_s=0.005)
    assert len(truths) == 2
    core = image[truths[0].mask]
    assert (core[:, 0] == 255).mean() > 0.5 and (core[:, 1] == 255).mean() > 0.5 and (core[:, 2] < 255).all()
    detector = make_detector('contrast', materials='graphene,hbn,mos2,wte2', max_layers=40, work_size=0)
    result = detector.detect(image)
    found = _match(result.detections, truths, min_iou=0.5)
    assert set(found) == {0}
    assert found[0].material == 'mos2' and abs(found[0].layers - 20) <= 2
    assert found[0].extra['saturated_channels'] == 2
    assert found[0].extra['material_probability'] > 0.9
    assert len(result.detections) == 1
    # From the clipped core alone it is nothing.
    blind = make_detector('contrast', materials='graphene,hbn,mos2,wte2', max_layers=40, work_size=0,
                          rim_direction=False)
    assert not _match(blind.detect(image).detections, truths, min_iou=0.5)


def test_mos2_that_clips_every_channel_is_not_reported():
    # At 10 ms all three channels of MoS2 20 layers clip: the direction of its colour and
    # low bounds are left, which 37 nm graphite and 25 nm WTe2 meet as well. The layer
    # count is the likeliest, the material far from certain: not reported by default.
    flakes = [('flake', 'mos2', 20, None, (0, 0), 12)]
    image, truths, _ = _simulated_chip_frame(flakes, size=256, seed=12)
    assert (image[truths[0].mask] == 255).all(axis=1).mean() > 0.5
    detector = make_detector('contrast', materials='graphene,hbn,mos2,wte2', max_layers=40, work_size=0)
    assert not detector.detect(image).detections
    eager = make_detector('contrast', materials='graphene,hbn,mos2,wte2', max_layers=40, work_size=0,
                          min_clipped_probability=0.0)
    found = _match(eager.detect(image).detections, truths, min_iou=0.5)
    assert found[0].material == 'mos2' and abs(found[0].layers - 20) <= 2
    assert 0.2 < found[0].extra['material_probability'] < 0.6

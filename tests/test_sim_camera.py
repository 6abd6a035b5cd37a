"""Camera model of the simulated microscope: determinism, focus, geometry, saturation."""

import cv2
import numpy as np
import pytest

from flake_core.geometry import pixel_to_wafer
from flake_core.objectives import OBJECTIVES
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

CLEAN = dict(flake_density_per_mm2=0, residue_line_density_per_mm2=0, residue_network_density_per_mm2=0,
             dust_density_per_mm2=0, bulk_density_per_mm2=0)


def chip_centre_stage(wafer):
    return wafer.wafer_to_stage.apply(wafer.config.chip_width_m / 2, wafer.config.chip_height_m / 2)


def camera_for(seed=1, camera_seed=0, size=256, **wafer_changes):
    wafer = VirtualWafer.generate(WaferConfig(seed=seed, chip_width_m=2e-3, chip_height_m=2e-3,
                                              flake_density_per_mm2=80, **wafer_changes))
    return CameraModel(wafer, CameraSettings(width=size, height=size, objective='10x', seed=camera_seed))


def test_same_seed_renders_identically_other_seeds_differ():
    cam = camera_for()
    x, y = chip_centre_stage(cam.wafer)
    frame = cam.render(x, y)
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, camera_for().render(x, y))
    assert np.array_equal(frame, cam.render(x, y))
    next_frame = cam.render(x, y, noise_seed=1)
    assert 0 < np.abs(frame.astype(int) - next_frame).mean() < 3  # fresh noise, same scene
    other_noise = camera_for(camera_seed=1).render(x, y)
    assert not np.array_equal(frame, other_noise)
    assert np.abs(frame.astype(int) - other_noise).mean() < 3  # only the noise differs
    other_wafer = camera_for(seed=2)
    assert np.abs(other_wafer.render(*chip_centre_stage(other_wafer.wafer)).astype(int) - frame).mean() > 3


def test_defocus_lowers_sharpness_monotonically():
    # A fixed scene of strong edges: thick MoS2 triangles spread over the field.
    wafer = VirtualWafer.generate(WaferConfig(seed=3, chip_width_m=1e-3, chip_height_m=1e-3, **CLEAN))
    triangle = np.array([[-12e-6, -8e-6], [12e-6, -8e-6], [0.0, 12e-6]])
    for i in range(3):
        for j in range(2):
            wafer.add_object('flake', 'mos2', triangle + [0.45e-3 + i * 40e-6, 0.48e-3 + j * 40e-6], layers=12)
    cam = CameraModel(wafer, CameraSettings(width=256, height=256, objective='10x'))
    x, y = wafer.wafer_to_stage.apply(0.49e-3, 0.5e-3)
    focus = cam.focal_plane_z(x, y)
    dof = cam.objective.depth_of_field_m

    def grey(dz):
        return cv2.cvtColor(cam.render(x, y, focus + dz), cv2.COLOR_BGR2GRAY).astype(np.float64)

    def sharpness(dz):
        return cv2.Laplacian(grey(dz), cv2.CV_64F).var()

    # Short exposure: nothing saturates, so blurring can only lower the contrast.
    cam.with_settings(shot_noise=False, read_noise_dn=0.0, exposure_s=0.003)
    clean = [sharpness(steps * dof) for steps in (0, 0.5, 1, 2, 4)]
    assert all(a > b for a, b in zip(clean, clean[1:], strict=False)), clean
    # Far out of focus the Laplacian hits the 8-bit floor; the image contrast keeps falling.
    spread = [grey(steps * dof).std() for steps in (4, 8, 16, 32)]
    assert all(a > b for a, b in zip(spread, spread[1:], strict=False)), spread
    # With noise the curve still peaks at the focal plane, on either side.
    cam.with_settings(shot_noise=True, read_noise_dn=1.2, exposure_s=0.01)
    noisy = [sharpness(steps * dof) for steps in (-2, -1, 0, 1, 2)]
    assert np.argmax(noisy) == 2 and noisy[1] > noisy[0] and noisy[3] > noisy[4], noisy
    # The plane is tilted: best focus differs between chip corners.
    cam = camera_for()
    corners = cam.wafer.corner_positions_stage()
    assert abs(cam.focal_plane_z(*corners[1]) - cam.focal_plane_z(*corners[2])) > 0.1e-6


def test_known_flake_mask_follows_the_geometry_convention():
    wafer = VirtualWafer.generate(WaferConfig(seed=3, chip_width_m=1e-3, chip_height_m=1e-3, **CLEAN))
    centre = np.array([0.4e-3, 0.6e-3])
    square = centre + np.array([[-8e-6, -5e-6], [8e-6, -5e-6], [8e-6, 5e-6], [-8e-6, 5e-6]])
    flake = wafer.add_object('flake', 'mos2', square, layers=3)
    cam = CameraModel(wafer, CameraSettings(width=320, height=240, objective='20x'))
    x, y = wafer.wafer_to_stage.apply(*centre)
    x += 20e-6  # the flake sits left of the image centre
    expected_u, expected_v = pixel_to_wafer(x, y, cam.pixel_size, 320, 240, wafer.stage_to_wafer).inverse().apply(
        *centre)
    truth = {o.object_id: o for o in cam.ground_truth(x, y).objects}
    mask = truth[flake.object_id].mask
    vs, us = np.nonzero(mask)
    assert abs(us.mean() - expected_u) < 0.5 and abs(vs.mean() - expected_v) < 0.5
    assert expected_u < 160 - 20e-6 / cam.pixel_size + 1
    assert mask.sum() == pytest.approx(160e-12 / cam.pixel_size ** 2, rel=0.05)
    # Stage +x by dx moves the flake by -dx / pixel_size in u; stage +y moves it by +dy / pixel_size in v.
    dx, dy = 6e-6, -4e-6
    moved = {o.object_id: o for o in cam.ground_truth(x + dx, y + dy).objects}[flake.object_id].mask
    mv, mu = np.nonzero(moved)
    rot = wafer.mount_rotation_rad
    assert abs(rot) < 0.05
    assert mu.mean() - us.mean() == pytest.approx(-dx / cam.pixel_size, abs=0.6)
    assert mv.mean() - vs.mean() == pytest.approx(dy / cam.pixel_size, abs=0.6)
    # The rendered image shows the flake where the mask says (MoS2 3L is much darker in red).
    image = cam.render(x, y).astype(float)
    assert image[mask][:, 2].mean() < 0.8 * image[~mask][:, 2].mean()


def test_bulk_crystals_saturate_and_thin_graphene_is_faint():
    wafer = VirtualWafer.generate(WaferConfig(seed=3, chip_width_m=1e-3, chip_height_m=1e-3, **CLEAN))
    c = np.array([0.5e-3, 0.5e-3])
    box = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 12e-6
    bulk = wafer.add_object('bulk', 'graphene', c + box - [20e-6, 0], thickness_nm=1500.0)
    mono = wafer.add_object('flake', 'graphene', c + box + [20e-6, 0], layers=1)
    cam = CameraModel(wafer, CameraSettings(width=256, height=256, objective='20x'))
    x, y = wafer.wafer_to_stage.apply(*c)
    image = cam.render(x, y)
    truth = {o.object_id: o for o in cam.ground_truth(x, y).objects}
    assert truth[bulk.object_id].is_contaminant
    assert image[truth[bulk.object_id].mask].max(axis=0).max() == 255
    substrate = np.median(image.reshape(-1, 3), axis=0)
    mono_mean = image[truth[mono.object_id].mask].mean(axis=0)
    assert np.all(mono_mean < substrate) and np.all(mono_mean > 0.8 * substrate)


def test_settings_change_pixel_size_exposure_and_reject_bad_values():
    cam = camera_for()
    x, y = chip_centre_stage(cam.wafer)
    size_10x = cam.pixel_size
    cam.with_settings(objective='50x')
    assert cam.pixel_size == pytest.approx(size_10x * 10 / 50)
    dim = cam.render(x, y).mean()
    cam.with_settings(exposure_s=0.02)
    assert cam.render(x, y).mean() > 1.5 * dim
    assert set(OBJECTIVES) == {'5x', '10x', '20x', '50x', '100x', '150x'}
    with pytest.raises(ValueError, match='unknown objective'):
        cam.with_settings(objective='7x')
    with pytest.raises(ValueError, match='exposure_s'):
        cam.with_settings(exposure_s=-1.0)
    with pytest.raises(ValueError, match='finite'):
        cam.render(float('nan'), 0.0)
    assert cam.settings.exposure_s == 0.02  # a rejected change leaves the settings alone


def test_off_chip_is_dark_and_has_no_truth():
    cam = camera_for()
    corner = cam.wafer.corner_positions_stage()[0]
    image = cam.render(*corner)
    off_chip = image.mean(axis=2) < 15
    for obj in cam.ground_truth(*corner).objects:
        assert not (obj.mask & off_chip).any()
    # The origin corner sits at the image centre: part of the frame is off the chip and dark.
    assert image[:100, -100:].mean() > 40 and image[-100:, :100].mean() < 15


def test_flake_corner_in_view_centres_a_flake_corner():
    import numpy as np

    wafer = VirtualWafer.generate(seed=3)
    camera = CameraModel(wafer, CameraSettings(width=128, height=128, seed=3))
    x, y = camera.flake_corner_in_view(np.random.default_rng(5))
    assert camera.ground_truth(x, y).flakes
    corners = [wafer.wafer_to_stage.apply(*o.polygon[0]) for o in wafer.objects_in_rect(0, 0, 1, 1)
               if o.kind == 'flake']
    assert min(np.hypot(cx - x, cy - y) for cx, cy in corners) < 1e-12
    assert camera.flake_corner_in_view(np.random.default_rng(5)) == (x, y)

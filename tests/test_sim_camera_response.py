"""The camera model (flake_core.camera_response) and the simulator rendering with it: round trips,
the default camera's colours, the seeded randomiser and its held-out intervals."""

from dataclasses import replace

import numpy as np
import pytest

from flake_core import optics
from flake_core.camera_response import (
    HELD_OUT,
    RANGES,
    CameraResponse,
    default_camera,
    in_held_out,
    lamp_band_power,
    random_camera,
    white_balance_for,
)
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.randomise import (
    HELD_OUT_OXIDE_NM,
    LOOK_RANGES,
    held_out_looks,
    look_by_name,
    look_groups,
    random_look,
)
from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

CLEAN = dict(flake_density_per_mm2=0, residue_line_density_per_mm2=0, residue_network_density_per_mm2=0,
             dust_density_per_mm2=0, bulk_density_per_mm2=0)
QUIET = dict(vignetting=0.0, shot_noise=False, read_noise_dn=0.0)
SUBSTRATE_90 = optics.substrate_reflectance(90.0)


def _substrate(oxide_nm):
    return lambda spectral: optics.substrate_reflectance(oxide_nm, spectral)


def _cameras():
    return [default_camera(), *(random_camera(seed, substrate=_substrate(90.0)) for seed in range(12))]


@pytest.mark.parametrize('camera', _cameras(), ids=lambda c: f'gamma{c.gamma:.2f}-black{c.black_level_dn:.1f}')
def test_reflectance_digital_round_trip(camera):
    rng = np.random.default_rng(0)
    # Reflectances that stay below full scale: 5 % to 95 % of it in every channel.
    reflectance = rng.uniform(0.05, 0.95, (200, 3)) / camera.channel_gain()
    digital = camera.to_digital(reflectance)
    assert np.all((digital > camera.black_level_dn) & (digital < 255.0))
    np.testing.assert_allclose(camera.to_reflectance(digital), reflectance, rtol=1e-9)
    # Digital numbers -> reflectance -> digital numbers, over every level above the black level.
    levels = np.arange(np.ceil(camera.black_level_dn + 1e-6), 255.0)
    grid = np.stack([levels] * 3, axis=1)
    np.testing.assert_allclose(camera.to_digital(camera.to_reflectance(grid)), grid, atol=1e-9)


def test_saturated_levels_are_lower_bounds_and_below_black_reads_zero():
    camera = CameraResponse(black_level_dn=8.0, gamma=2.0, exposure=2.0)
    bright = camera.to_reflectance([[255.0, 255.0, 255.0]])
    assert np.all(camera.to_digital(bright * 3) == 255.0)  # more light still reads full scale
    assert camera.saturated(np.array([255, 254])).tolist() == [True, False]
    assert np.all(camera.to_reflectance([[0.0, 4.0, 8.0]]) == 0.0)
    assert np.all(np.diff(camera.encode(np.linspace(0, 1, 50))) > 0)  # monotone: invertible


def test_contrast_is_physical_whatever_the_tone_curve():
    film = optics.film_reflectance('graphene', 3 * 0.335, 90.0)
    physical = film / SUBSTRATE_90 - 1.0
    for camera in _cameras()[:6]:
        measured = camera.contrast(camera.to_digital(film), camera.to_digital(SUBSTRATE_90))
        np.testing.assert_allclose(measured, physical, atol=1e-9)


def test_gains_white_balance_and_files_round_trip():
    camera = random_camera(3, substrate=_substrate(285.0))
    again = camera.with_channel_gain(camera.channel_gain())
    np.testing.assert_allclose(again.channel_gain(), camera.channel_gain(), rtol=1e-12)
    # Balanced on the substrate: the substrate reads grey.
    grey = camera.balanced_on(optics.substrate_reflectance(285.0, camera.spectral))
    reading = grey.to_digital(optics.substrate_reflectance(285.0, camera.spectral))
    assert np.ptp(reading) < 1e-9
    # Set for the lamp's own temperature: neutral, as no white balance at all.
    lamp = 4100.0
    neutral = CameraResponse(lamp_temperature_k=lamp, white_balance=white_balance_for(lamp))
    np.testing.assert_allclose(neutral.balance(), 1.0, rtol=1e-12)
    assert lamp_band_power(2800.0)[0] < lamp_band_power(6500.0)[0]  # a warm lamp is short of blue
    assert CameraResponse.from_dict(camera.as_dict()) == camera
    with pytest.raises(ValueError, match='unknown camera fields'):
        CameraResponse.from_dict({**camera.as_dict(), 'colour': 1})
    for bad in ({'gamma': 0.0}, {'black_level_dn': 200.0}, {'white_balance': (1.0, 0.0, 1.0)},
                {'channel_centres_nm': (460.0, 535.0)}, {'lamp_temperature_k': 100.0}, {'jpeg_quality': 101}):
        with pytest.raises(ValueError):
            replace(CameraResponse(), **bad)


def test_default_bands_and_camera_are_those_of_before():
    wavelengths, weights = optics.DEFAULT_RESPONSE.bands()
    np.testing.assert_allclose(wavelengths[:, 2], [460.0, 535.0, 610.0])
    np.testing.assert_allclose(wavelengths[0, [0, -1]], [430.0, 490.0])  # +-1.5 sigma of 20 nm
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    camera = default_camera()
    assert camera.gamma == 1.0 and camera.black_level_dn == 0.0 and camera.white_balance is None
    np.testing.assert_allclose(camera.to_digital(SUBSTRATE_90).max(), 0.55 * 255)


# Centre pixels of noise-free 50x frames (no vignetting) as the simulator rendered them before the
# camera model existed: bare substrate, then graphene 1L and 3L, hBN 30 layers, MoS2 1L, WTe2 5L.
BEFORE = {
    (90.0, 1.0): ([140, 95, 95], [[130, 82, 82], [110, 60, 62], [255, 156, 83], [122, 66, 48], [94, 28, 4]]),
    (90.0, 2.2): ([194, 163, 163], [[188, 152, 152], [174, 132, 134], [255, 204, 153], [182, 138, 119],
                                    [162, 93, 40]]),
    (285.0, 1.0): ([140, 52, 61], [[141, 48, 55], [143, 42, 45], [182, 99, 32], [156, 52, 34], [156, 38, 9]]),
    (285.0, 2.2): ([194, 124, 133], [[195, 119, 127], [196, 112, 116], [219, 166, 100], [204, 123, 102],
                                     [204, 107, 55]]),
}


@pytest.mark.parametrize('oxide, gamma', sorted(BEFORE))
def test_default_camera_reproduces_the_colours_rendered_before(oxide, gamma):
    wafer = VirtualWafer.generate(WaferConfig(seed=1, chip_width_m=1e-3, chip_height_m=1e-3, oxide_nm=oxide,
                                              **CLEAN))
    square = np.array([[-20e-6, -20e-6], [20e-6, -20e-6], [20e-6, 20e-6], [-20e-6, 20e-6]])
    flakes = [('graphene', 1), ('graphene', 3), ('hbn', 30), ('mos2', 1), ('wte2', 5)]
    for i, (material, layers) in enumerate(flakes):
        wafer.add_object('flake', material, square + [0.2e-3 + i * 0.12e-3, 0.5e-3], layers=layers)
    camera = CameraModel(wafer, CameraSettings(width=32, height=32, objective='50x', gamma=gamma, **QUIET))
    substrate, expected = BEFORE[(oxide, gamma)]
    assert camera.render(*wafer.wafer_to_stage.apply(0.5e-3, 0.8e-3))[16, 16].tolist() == substrate
    for i, colour in enumerate(expected):
        assert camera.render(*wafer.wafer_to_stage.apply(0.2e-3 + i * 0.12e-3, 0.5e-3))[16, 16].tolist() == colour
    # The camera model says the same: what the simulator renders is the response's to_digital.
    np.testing.assert_allclose(camera.response.to_digital(camera._reflectance(None)), substrate, atol=0.6)


@pytest.mark.parametrize('seed', range(6))
def test_simulator_renders_what_its_camera_response_says(seed):
    look = random_look(seed)
    wafer = VirtualWafer.generate(look.wafer_config(seed=seed, chip_width_m=1e-3, chip_height_m=1e-3, **CLEAN))
    settings = look.camera_settings(CameraSettings(width=48, height=48, seed=seed))
    camera = CameraModel(wafer, replace(settings, flat_field_error=0.0, illumination_gradient=0.0, optics_dirt=0,
                                        substrate_texture=0.0, jpeg_quality=0, **QUIET))
    frame = camera.render(*wafer.wafer_to_stage.apply(0.5e-3, 0.5e-3))
    expected = camera.response.to_digital(optics.substrate_reflectance(look.oxide_nm, camera.response.spectral))
    np.testing.assert_allclose(frame.reshape(-1, 3).mean(axis=0), expected, atol=0.6)
    # ... and decoding the frame with it gives back the substrate's reflectance.
    np.testing.assert_allclose(camera.response.to_reflectance(frame[24, 24].astype(float)),
                               optics.substrate_reflectance(look.oxide_nm, camera.response.spectral), rtol=0.02)


def test_randomiser_is_seeded_and_stays_in_range():
    assert random_camera(5) == random_camera(5)
    assert random_camera(5) != random_camera(6)
    cameras = [random_camera(seed, substrate=_substrate(90.0)) for seed in range(300)]
    r = RANGES
    for camera in cameras:
        shifts = np.subtract(camera.channel_centres_nm, optics.CHANNEL_CENTRES_NM)
        assert np.all((shifts >= r.centre_shift_nm[0]) & (shifts <= r.centre_shift_nm[1]))
        assert all(r.width_nm[0] <= w <= r.width_nm[1] for w in camera.channel_widths_nm)
        assert r.lamp_temperature_k[0] <= camera.lamp_temperature_k <= r.lamp_temperature_k[1]
        assert camera.gamma == 1.0 or r.gamma[0] <= camera.gamma <= r.gamma[1]
        assert r.black_level_dn[0] <= camera.black_level_dn <= r.black_level_dn[1]
        assert camera.jpeg_quality == 0 or r.jpeg_quality[0] <= camera.jpeg_quality <= r.jpeg_quality[1]
        level = (camera.channel_gain() * optics.substrate_reflectance(90.0, camera.spectral)).max()
        assert r.substrate_level[0] - 1e-9 <= level <= r.substrate_level[1] + 1e-9
        assert in_held_out(camera) == []
    # The ranges are used, not one corner of them.
    gammas = [c.gamma for c in cameras if c.gamma != 1.0]
    assert min(gammas) < 1.3 and max(gammas) > 2.1
    assert 0.2 < np.mean([c.gamma == 1.0 for c in cameras]) < 0.4
    assert 0.35 < np.mean([c.jpeg_quality > 0 for c in cameras]) < 0.65
    # Held-out intervals are drawn from only when asked.
    free = [random_camera(seed, held_out=None) for seed in range(300)]
    low, high = HELD_OUT['gamma']
    assert any(low < c.gamma < high for c in free)


def test_random_looks_are_seeded_in_range_and_never_held_out():
    assert random_look(4) == random_look(4) and random_look(4) != random_look(5)
    looks = [random_look([3, g]) for g in range(200)]
    for look in looks:
        assert LOOK_RANGES.oxide_nm[0] <= look.oxide_nm <= LOOK_RANGES.oxide_nm[1]
        assert not HELD_OUT_OXIDE_NM[0] < look.oxide_nm < HELD_OUT_OXIDE_NM[1]
        CameraSettings(**look.camera).validate()
        WaferConfig(**look.wafer).validate()
        assert 0 <= look.camera['optics_dirt'] <= LOOK_RANGES.optics_dirt[1]
    oxides = [look.oxide_nm for look in looks]
    assert min(oxides) < 100 and max(oxides) > 280
    assert any(HELD_OUT_OXIDE_NM[0] < random_look(s, held_out=False).oxide_nm < HELD_OUT_OXIDE_NM[1]
               for s in range(200))
    groups = look_groups(2, 25, 10)
    assert [count for _, _, count in groups] == [10, 10, 5]
    assert [seed for _, seed, _ in groups] == [2000, 2001, 2002]


def test_held_out_looks_lie_where_training_never_draws():
    for look in held_out_looks():
        assert look_by_name(look.name) == look
        settings = look.camera_settings()
        wafer = VirtualWafer.generate(look.wafer_config(seed=1, chip_width_m=1e-3, chip_height_m=1e-3))
        response = CameraModel(wafer, settings).response
        inside = in_held_out(response, settings.white_balance_k if settings.white_balance_gains is None else None)
        oxide_inside = HELD_OUT_OXIDE_NM[0] < look.oxide_nm < HELD_OUT_OXIDE_NM[1]
        assert inside or oxide_inside, look.name
    with pytest.raises(ValueError, match='unknown look'):
        look_by_name('nonsense')
    assert look_by_name('random:7') == random_look(7)


def test_thin_graphene_vanishes_on_oxide_between_the_usual_two():
    visible = {}
    for oxide in (90.0, 155.0, 235.0, 285.0):
        wafer = VirtualWafer.generate(WaferConfig(seed=1, chip_width_m=1e-3, chip_height_m=1e-3, oxide_nm=oxide,
                                                  **CLEAN))
        flake = wafer.add_object('flake', 'graphene', [[0, 0], [2e-5, 0], [0, 2e-5]], layers=1)
        visible[oxide] = float(np.abs(CameraModel(wafer, CameraSettings(width=32, height=32)).contrast(flake)).max())
    assert visible[155.0] < 0.02 < 0.05 < min(visible[90.0], visible[235.0], visible[285.0])

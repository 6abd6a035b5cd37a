"""Autofocus core: focus measures, the frame-budgeted z search, and the focal-plane map."""

import math

import cv2
import numpy as np
import pytest

from flake_scanner.autofocus import (
    FOCUS_MEASURES,
    FocusMap,
    FocusMapError,
    FocusSearch,
    depth_of_field,
    focus_measure,
    run_focus_search,
)
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.wafer import VirtualWafer


def _scene(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 120, np.uint8)
    for _ in range(5):
        corners = rng.integers(0, size, (5, 2)).astype(np.int32)
        cv2.fillPoly(image, [cv2.convexHull(corners)], tuple(int(v) for v in rng.integers(60, 200, 3)))
    return image


def _defocused(image: np.ndarray, dz: float, na: float, pixel_size: float, seed: int) -> np.ndarray:
    """Geometric defocus blur (radius ~ NA |dz|) plus camera noise."""
    sigma = math.hypot(0.5, na * abs(dz) / pixel_size)
    out = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
    out += np.random.default_rng(seed).normal(0.0, 2.0, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize('name', sorted(FOCUS_MEASURES))
def test_measures_fall_with_defocus(name):
    scene = _scene(3)
    scores = [focus_measure(_defocused(scene, dz, 0.3, 0.5e-6, 0), name) for dz in (0, 3e-6, 10e-6, 30e-6)]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] > 3 * scores[-1]


def test_measures_accept_grey_and_16_bit_and_reject_bad_input():
    grey = cv2.cvtColor(_scene(1), cv2.COLOR_BGR2GRAY)
    assert focus_measure(grey, 'brenner') == pytest.approx(focus_measure(grey.astype(np.uint16) * 257,
                                                                         'brenner'), rel=1e-4)
    with pytest.raises(ValueError, match='unknown focus measure'):
        focus_measure(grey, 'sharpness')
    with pytest.raises(ValueError, match='at least 3x3'):
        focus_measure(np.zeros((2, 2), np.uint8))


def test_depth_of_field_formula():
    assert depth_of_field(0.5, 500e-9) == pytest.approx(2e-6)
    assert depth_of_field(0.5, 500e-9, 1.0, 1e-6) == pytest.approx(4e-6)
    with pytest.raises(ValueError):
        depth_of_field(1.2)


def test_search_finds_the_peak_of_a_smooth_curve_exactly():
    search = FocusSearch(0.0, 40e-6, max_frames=15, tolerance=0.05e-6)
    result = run_focus_search(search, lambda z: math.exp(-((z - 7.3e-6) / 4e-6) ** 2))
    assert result.frames_used <= 15
    assert result.z == pytest.approx(7.3e-6, abs=0.05e-6)


def test_peak_ratio_tells_a_focus_signal_from_a_flat_field():
    peaked = run_focus_search(FocusSearch(0.0, 40e-6), lambda z: 1.0 + 9.0 * math.exp(-(z / 4e-6) ** 2))
    assert peaked.peak_ratio == pytest.approx(10.0, rel=0.05)
    noise = iter(np.random.default_rng(0).normal(1.0, 0.01, 100))
    flat = run_focus_search(FocusSearch(0.0, 40e-6), lambda z: float(next(noise)))
    assert 1.0 <= flat.peak_ratio < 1.1


def test_search_at_the_edge_of_the_range_and_z_limits():
    search = FocusSearch(0.0, 20e-6, max_frames=10, z_limits=(-5e-6, 1.0))
    first = search.next_z()
    assert first == pytest.approx(-5e-6)
    search = FocusSearch(0.0, 20e-6, max_frames=10)
    result = run_focus_search(search, lambda z: 1.0 / (1.0 + ((z - 30e-6) / 5e-6) ** 2))
    assert result.z == pytest.approx(10e-6)  # focus beyond the range: the nearest edge wins


def test_search_validates_its_arguments_and_reports():
    with pytest.raises(ValueError):
        FocusSearch(0.0, 0.0)
    with pytest.raises(ValueError):
        FocusSearch(float('nan'), 1e-5)
    with pytest.raises(ValueError):
        FocusSearch(0.0, 1e-5, max_frames=2)
    search = FocusSearch(0.0, 1e-5)
    z = search.next_z()
    with pytest.raises(RuntimeError):
        search.report(z + 1e-6, 1.0)
    with pytest.raises(ValueError):
        search.report(z, float('nan'))


def _camera_at_a_flake(seed: int, objective: str, rng: np.random.Generator):
    """A small simulated camera on wafer ``seed`` (its own tilted, curved focal plane) and a
    stage position showing a flake's edge."""
    wafer = VirtualWafer.generate(seed=seed)
    camera = CameraModel(wafer, CameraSettings(width=192, height=192, objective=objective, seed=seed))
    # Centre the view on a corner of a flake: its edges are what focus is judged on.
    x, y = camera.flake_corner_in_view(rng)
    return camera, float(x), float(y)


@pytest.mark.parametrize('objective,search_range,centre_error', [
    ('10x', 50e-6, None),   # DOF 6.1 um, searched blind around z = 0
    ('50x', 8e-6, 3e-6),    # DOF 0.86 um, searched around a focus-map guess that is off by up to 3 um
])
def test_focus_within_depth_of_field_on_random_tilted_planes(objective, search_range, centre_error):
    rng = np.random.default_rng(42)
    for seed in range(4):
        camera, x, y = _camera_at_a_flake(seed, objective, rng)
        focal_z = camera.focal_plane_z(x, y)
        dof = camera.objective.depth_of_field_m
        centre = 0.0 if centre_error is None else focal_z + rng.uniform(-centre_error, centre_error)
        search = FocusSearch(centre, search_range, max_frames=15, tolerance=dof / 4)
        result = run_focus_search(search, lambda z, c=camera, x=x, y=y: focus_measure(c.render(x, y, z),
                                                                                       'tenengrad'))
        assert result.frames_used <= 15
        assert abs(result.z - focal_z) <= dof / 2, (seed, result.z, focal_z, dof)


def test_measures_peak_at_the_simulated_focal_plane():
    camera, x, y = _camera_at_a_flake(1, '20x', np.random.default_rng(3))
    focal_z = camera.focal_plane_z(x, y)
    zs = focal_z + np.linspace(-6e-6, 6e-6, 13)
    for name in FOCUS_MEASURES:
        scores = [focus_measure(camera.render(x, y, z), name) for z in zs]
        assert abs(zs[int(np.argmax(scores))] - focal_z) <= 0.5e-6, name


def test_focus_map_through_three_points_is_exact():
    plane = lambda x, y: 1.5e-3 * x - 0.7e-3 * y + 2e-6  # noqa: E731
    points = [(x, y, plane(x, y)) for x, y in ((0.0, 0.0), (0.01, 0.0), (0.0, 0.008))]
    focus_map = FocusMap(points)
    assert (focus_map.a, focus_map.b, focus_map.c) == pytest.approx((1.5e-3, -0.7e-3, 2e-6))
    assert focus_map.predict(0.004, 0.006) == pytest.approx(plane(0.004, 0.006))
    grid = focus_map.predict(np.array([0.0, 0.01]), np.array([0.01, 0.0]))
    assert grid == pytest.approx([plane(0.0, 0.01), plane(0.01, 0.0)])
    assert focus_map.rms_residual == pytest.approx(0.0, abs=1e-15)
    assert focus_map.tilt == pytest.approx(math.atan(math.hypot(1.5e-3, 0.7e-3)))


def test_focus_map_least_squares_over_noisy_points():
    rng = np.random.default_rng(5)
    xy = rng.uniform(-0.01, 0.01, (25, 2))
    z = 1e-3 * xy[:, 0] + 2e-3 * xy[:, 1] - 3e-6 + rng.normal(0, 0.2e-6, 25)
    focus_map = FocusMap(np.column_stack([xy, z]))
    assert focus_map.a == pytest.approx(1e-3, abs=5e-5)
    assert focus_map.b == pytest.approx(2e-3, abs=5e-5)
    assert focus_map.rms_residual == pytest.approx(0.2e-6, rel=0.4)


def test_focus_map_rejects_too_few_or_collinear_points():
    with pytest.raises(FocusMapError, match='at least three'):
        FocusMap([(0, 0, 0), (1, 0, 0)])
    with pytest.raises(FocusMapError, match='one line'):
        FocusMap([(0, 0, 0), (0.01, 0.01, 1e-6), (0.02, 0.02, 2e-6)])
    with pytest.raises(FocusMapError):
        FocusMap([(0, 0, 0), (1, 0, float('nan')), (0, 1, 0)])


def test_batched_search_images_the_coarse_sweep_at_once_and_finds_the_same_focus():
    def sharpness(z):
        return 1.0 / (1.0 + ((z - 7e-6) / 4e-6) ** 2)

    sequential = run_focus_search(FocusSearch(0.0, 40e-6, max_frames=15, coarse_frames=7), sharpness)
    search = FocusSearch(0.0, 40e-6, max_frames=15, coarse_frames=7)
    batches = []
    while batch := search.next_batch():
        batches.append(batch)
        for z in reversed(batch):  # scores may come back in any order
            search.report(z, sharpness(z))
    assert len(batches[0]) == 7
    assert batches[0] == pytest.approx(list(np.linspace(-20e-6, 20e-6, 7)))
    assert all(len(batch) == 1 for batch in batches[1:])
    assert search.result().z == pytest.approx(sequential.z)
    assert search.frames_used == sequential.frames_used

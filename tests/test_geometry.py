"""Frames: wafer frame from three corners, pixel -> stage -> wafer maps."""

import math

import numpy as np
import pytest

from flake_core.geometry import (
    Affine2D,
    DegenerateCornersError,
    WaferFrame,
    pixel_to_stage,
    pixel_to_wafer,
    polygon_area,
)


def test_wafer_frame_recovers_a_rotated_and_shifted_chip():
    rotation, origin = math.radians(3.0), np.array([12e-3, -4e-3])
    chip_to_stage = Affine2D.rigid(rotation, *origin)
    corners_chip = [(0, 0), (10e-3, 0), (0, 10e-3)]
    corners_stage = chip_to_stage.apply_points(np.array(corners_chip))
    frame = WaferFrame.from_corners(corners_stage)
    assert frame.rotation == pytest.approx(rotation)
    assert frame.residual == pytest.approx(0.0, abs=1e-12)
    flake_chip = np.array([[3.2e-3, 7.7e-3]])
    flake_stage = chip_to_stage.apply_points(flake_chip)
    assert frame.stage_to_wafer.apply_points(flake_stage) == pytest.approx(flake_chip, abs=1e-12)


def test_remounted_chip_gives_the_same_wafer_position():
    flake_chip = np.array([[4e-3, 5e-3]])
    positions = []
    for rotation, shift in [(0.01, (1e-3, 2e-3)), (-0.05, (7e-3, -3e-3))]:
        mount = Affine2D.rigid(rotation, *shift)
        corners = mount.apply_points(np.array([(0, 0), (10e-3, 0), (0, 10e-3)]))
        frame = WaferFrame.from_corners(corners)
        positions.append(frame.stage_to_wafer.apply_points(mount.apply_points(flake_chip)))
    assert positions[0] == pytest.approx(positions[1], abs=1e-12)


def test_non_perpendicular_corner_shows_in_the_residual():
    frame = WaferFrame.from_corners([(0, 0), (10e-3, 0), (0.2e-3, 10e-3)])
    assert frame.residual == pytest.approx(0.2e-3)


@pytest.mark.parametrize('corners,match', [
    ([(0, 0), (0, 0), (0, 1e-2)], 'apart'),
    ([(0, 0), (1e-2, 0), (2e-2, 0)], 'collinear'),
    ([(0, 0), (1e-2, 0), (0, -1e-2)], 'counter-clockwise'),
])
def test_degenerate_corners_are_refused(corners, match):
    with pytest.raises(DegenerateCornersError, match=match):
        WaferFrame.from_corners(corners)


def test_pixel_convention_centre_axes_and_scale():
    to_stage = pixel_to_stage(1e-3, 2e-3, 1e-6, width=101, height=51)
    assert to_stage.apply(50, 25) == pytest.approx((1e-3, 2e-3))
    x, y = to_stage.apply(60, 25)
    assert (x - 1e-3, y - 2e-3) == pytest.approx((10e-6, 0.0), abs=1e-15)
    x, y = to_stage.apply(50, 35)
    assert (x - 1e-3, y - 2e-3) == pytest.approx((0.0, -10e-6), abs=1e-15)


def test_pixel_to_wafer_composes_and_inverts():
    frame = WaferFrame.from_corners([(1e-3, 1e-3), (11e-3, 1.5e-3), (0.5e-3, 11e-3)])
    to_wafer = pixel_to_wafer(5e-3, 5e-3, 0.5e-6, 1024, 1024, frame.stage_to_wafer)
    u, v = 700.0, 123.0
    wafer = to_wafer.apply(u, v)
    assert to_wafer.inverse().apply(*wafer) == pytest.approx((u, v))
    assert to_wafer.scale == pytest.approx(0.5e-6)
    assert Affine2D.from_list(to_wafer.as_list()) == to_wafer


def test_wafer_transform_for_tf_matches_the_frame():
    from builtin_interfaces.msg import Time

    from flake_scanner.nodes.tf_publishing import wafer_transform

    frame = WaferFrame.from_corners([(2e-3, 1e-3), (12e-3, 1.5e-3), (1.5e-3, 11e-3)])
    message = wafer_transform(frame, 'chip-7', Time())
    assert (message.header.frame_id, message.child_frame_id) == ('stage', 'wafer_chip-7')
    transform = message.transform
    assert (transform.translation.x, transform.translation.y) == pytest.approx((2e-3, 1e-3))
    angle = 2 * math.atan2(transform.rotation.z, transform.rotation.w)
    assert angle == pytest.approx(math.atan2(0.5e-3, 10e-3))


def test_polygon_area_of_either_winding_and_any_point_type():
    square = [(45.0, 45.0), (55.0, 45.0), (55.0, 55.0), (45.0, 55.0)]
    assert polygon_area(square) == 100.0 and polygon_area(square[::-1]) == 100.0
    triangle = np.array([[0.0, 0.0], [4e-6, 0.0], [0.0, 3e-6]])
    assert polygon_area(triangle) == pytest.approx(6e-12, rel=1e-12)
    assert polygon_area([(0, 0), (1, 1)]) == 0.0

"""Scan path planning, focus points, tiles and the mosaic (pure core)."""

import math

import numpy as np
import pytest

from flake_core.geometry import Affine2D, pixel_to_wafer
from flake_scanner.scan.planner import EtaEstimator, Region, focus_points, plan_serpentine
from flake_scanner.scan.tiler import Mosaic, split_frame


def test_serpentine_covers_the_region_with_the_requested_overlap():
    region = Region(0.0, 0.0, 2.0e-3, 1.0e-3)
    tiles = plan_serpentine(region, 0.5e-3, 0.4e-3, 0.1, Affine2D())
    rows = max(t.row for t in tiles) + 1
    cols = max(t.col for t in tiles) + 1
    assert len(tiles) == rows * cols
    # Serpentine: the second row runs backwards, so consecutive tiles are neighbours.
    steps = [math.hypot(b.wafer_x - a.wafer_x, b.wafer_y - a.wafer_y) for a, b in zip(tiles, tiles[1:])]
    assert max(steps) <= 0.5e-3 + 1e-12
    assert [t.col for t in tiles if t.row == 1] == sorted((t.col for t in tiles if t.row == 1), reverse=True)
    xs = sorted({round(t.wafer_x, 12) for t in tiles})
    assert xs[0] - 0.25e-3 == pytest.approx(0.0) and xs[-1] + 0.25e-3 == pytest.approx(2.0e-3)
    assert all(b - a <= 0.5e-3 * 0.9 + 1e-12 for a, b in zip(xs, xs[1:]))


def test_tiles_are_mapped_to_the_stage_through_the_wafer_frame():
    wafer_to_stage = Affine2D.rigid(0.1, 5e-3, 6e-3)
    tiles = plan_serpentine(Region(0, 0, 1e-3, 1e-3), 0.3e-3, 0.3e-3, 0.0, wafer_to_stage)
    for tile in tiles:
        assert (tile.stage_x, tile.stage_y) == pytest.approx(wafer_to_stage.apply(tile.wafer_x, tile.wafer_y))


@pytest.mark.parametrize('bad', [dict(overlap=0.5), dict(overlap=-0.1)])
def test_invalid_overlap_is_refused(bad):
    with pytest.raises(ValueError, match='overlap'):
        plan_serpentine(Region(0, 0, 1e-3, 1e-3), 1e-4, 1e-4, bad['overlap'], Affine2D())


def test_empty_region_is_refused():
    with pytest.raises(ValueError, match='empty region'):
        Region(1e-3, 0, 1e-3, 1e-3)


def test_focus_points_spread_over_the_region():
    region = Region(0, 0, 4e-3, 2e-3)
    three = focus_points(region, 3)
    assert len(three) == 3 and len(set(three)) == 3
    nine = focus_points(region, 9)
    assert len(nine) == 9
    assert all(region.min_x < x < region.max_x and region.min_y < y < region.max_y for x, y in nine)


def test_eta_is_remaining_times_mean_duration():
    eta = EtaEstimator(window=3)
    assert math.isnan(eta.eta(5))
    for seconds in [1.0, 2.0, 3.0, 4.0]:
        eta.add(seconds)
    assert eta.eta(10) == pytest.approx(30.0)


def test_split_frame_tiles_cover_the_frame_and_keep_wafer_coordinates():
    image = np.random.default_rng(0).integers(0, 255, (100, 130, 3), dtype=np.uint8)
    to_wafer = pixel_to_wafer(1e-3, 1e-3, 1e-6, 130, 100, Affine2D.rigid(0.2, 0, 0))
    tiles = split_frame(image, to_wafer, tile_size=64, overlap=16)
    covered = np.zeros(image.shape[:2], bool)
    for tile in tiles:
        h, w = tile.pixels.shape[:2]
        covered[tile.v0:tile.v0 + h, tile.u0:tile.u0 + w] = True
        assert np.array_equal(tile.pixels, image[tile.v0:tile.v0 + h, tile.u0:tile.u0 + w])
        assert tile.pixel_to_wafer.apply(5, 7) == pytest.approx(to_wafer.apply(tile.u0 + 5, tile.v0 + 7))
    assert covered.all()
    assert len(split_frame(image, to_wafer, tile_size=0, overlap=0)) == 1


def test_mosaic_places_a_frame_at_its_wafer_position():
    frame = np.full((200, 200, 3), 255, np.uint8)
    frame[90:110, 90:110] = (0, 0, 255)  # a red square at the frame centre
    to_wafer = pixel_to_wafer(1.0e-3, 0.5e-3, 1e-6, 200, 200, Affine2D())
    mosaic = Mosaic(0.0, 0.0, 2e-3, 1e-3, metres_per_pixel=4e-6)
    mosaic.add(frame, to_wafer)
    u, v = mosaic.wafer_to_pixel(1.0e-3, 0.5e-3)
    assert mosaic.canvas[v, u].tolist() == [0, 0, 255]
    far_u, far_v = mosaic.wafer_to_pixel(1.8e-3, 0.1e-3)
    assert mosaic.canvas[far_v, far_u].tolist() == [255, 255, 255]


def test_mosaic_builder_grows_with_the_frames_it_receives():
    from flake_scanner.scan.tiler import MosaicBuilder

    builder = MosaicBuilder(metres_per_pixel=8e-6)
    for i, x in enumerate([0.5e-3, 1.3e-3]):
        frame = np.full((200, 200, 3), 60 * (i + 1), np.uint8)
        builder.add(frame, pixel_to_wafer(x, 0.5e-3, 4e-6, 200, 200, Affine2D()))
    mosaic = builder.render()
    assert mosaic.width == pytest.approx((1.3e-3 + 0.4e-3 - 0.1e-3) / 8e-6, abs=2)
    u0, v0 = mosaic.wafer_to_pixel(0.5e-3, 0.5e-3)
    u1, v1 = mosaic.wafer_to_pixel(1.3e-3, 0.5e-3)
    assert mosaic.canvas[v0, u0].tolist() == [60, 60, 60]
    assert mosaic.canvas[v1, u1].tolist() == [120, 120, 120]


def test_hardware_model_times_focus_steps_with_the_z_axis_profile():
    from flake_scanner.scan.session import HardwareModel

    hardware = HardwareModel(settle=0.02, z_speed=1e-3, z_acceleration=0.05)
    # 8 um never reaches full speed (ramping up and down takes 20 um): 2 sqrt(d / a), then the settle.
    assert hardware.z_move_time(8e-6) == pytest.approx(2 * math.sqrt(8e-6 / 0.05) + 0.02)
    # 30 um: 20 ms up, 20 ms down, 10 um at 1 mm/s; the direction does not matter.
    assert hardware.z_move_time(-30e-6) == pytest.approx(0.04 + 0.01 + 0.02)
    assert hardware.z_move_time(0.0) == 0.0


def test_blended_mosaic_shows_no_seams_where_pasted_frames_do():
    from flake_scanner.scan.tiler import MosaicBuilder

    # Nine frames of bare substrate through optics that darken the corners by a third (vignetting),
    # overlapping by 20 %: pasted edge to edge, every field boundary is a step in brightness.
    side, pixel = 200, 2e-6
    u = (np.arange(side) - (side - 1) / 2) / (side / 2)
    vignette = 1.0 - 0.33 * (u[None, :] ** 2 + u[:, None] ** 2) / 2
    rng = np.random.default_rng(5)
    builders = {'pasted': MosaicBuilder(4e-6), 'blended': MosaicBuilder(4e-6, blend_px=30)}
    for row in range(3):
        for col in range(3):
            frame = np.clip(150 * vignette[..., None] + rng.normal(0, 1.0, (side, side, 3)), 0, 255).astype(np.uint8)
            to_wafer = pixel_to_wafer(col * 0.8 * side * pixel, row * 0.8 * side * pixel, pixel, side, side, Affine2D())
            for builder in builders.values():
                builder.add(frame, to_wafer)
    step, spread = {}, {}
    for name, builder in builders.items():
        inner = builder.render().canvas[10:-10, 10:-10].astype(float).mean(axis=2)
        step[name] = max(np.abs(np.diff(inner, axis=1)).max(), np.abs(np.diff(inner, axis=0)).max())
        spread[name] = inner.std()
    # The largest step between neighbouring mosaic pixels: a seam pasted, the noise blended.
    assert step['pasted'] > 12 and step['blended'] < 5
    # The shading the frames share is divided out: the mosaic of bare substrate is flat.
    assert spread['pasted'] > 5 and spread['blended'] < 1.5

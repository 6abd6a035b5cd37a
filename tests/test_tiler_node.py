"""tiler_node with real rclpy: scan frames are kept at full resolution, the registry records them,
and the mosaic is written blended."""

import json

import cv2
import numpy as np
import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from registry_helpers import running_registry
from ros_helpers import spin_until

from flake_core.data_files import frame_file
from flake_core.geometry import Affine2D, pixel_to_wafer
from flake_core.node_tools import PIPELINE_QOS
from flake_core.ros_image import numpy_to_image
from flake_registry.store import FlakeStore
from flake_scanner.nodes.tiler_node import TilerNode

pytestmark = pytest.mark.ros

PIXEL = 2e-6        # [m] per frame pixel
SIDE = 160          # frame side [px]
STEP = 140 * PIXEL  # 20 px overlap between neighbouring frames


def scan_frame(scan_id, tile_index, x, y, tiles_total=4, revisit=False):
    from flake_msgs.msg import ScanFrame

    rng = np.random.default_rng(tile_index)
    pixels = np.clip(rng.normal(150, 3, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    msg = ScanFrame(scan_id=scan_id, chip_id='chip-tiler', tile_index=tile_index, tiles_total=tiles_total,
                    pixel_size=PIXEL, objective='10x', magnification=10.0, revisit=revisit)
    msg.header.stamp.sec = 1_700_000_000 + tile_index
    msg.image = numpy_to_image(pixels, 'bgr8')
    msg.pixel_to_wafer = pixel_to_wafer(x, y, PIXEL, SIDE, SIDE, Affine2D()).as_list()
    return msg, pixels


def test_frames_are_kept_recorded_by_the_registry_and_bounded(ros, tmp_path):
    from flake_msgs.msg import ScanFrame

    data = tmp_path / 'data'
    with running_registry(data / 'registry.sqlite'):
        tiler = TilerNode(parameter_overrides=[Parameter('data_dir', value=str(data)),
                                               Parameter('mosaic_resolution', value=4e-6),
                                               Parameter('frame_jpeg_quality', value=95)])
        peer = ros.create_node('tiler_test_peer')
        frames_publisher = peer.create_publisher(ScanFrame, '/scan/frames', PIPELINE_QOS)
        announced = []
        peer.create_subscription(ScanFrame, '/registry/frames', announced.append, PIPELINE_QOS)
        executor = SingleThreadedExecutor()
        executor.add_node(tiler)
        executor.add_node(peer)
        try:
            assert spin_until(executor, lambda: frames_publisher.get_subscription_count() > 0, timeout=30)
            sent = {}
            for index, (x, y) in enumerate([(1e-3, 1e-3), (1e-3 + STEP, 1e-3), (1e-3 + STEP, 1e-3 + STEP),
                                            (1e-3, 1e-3 + STEP)]):
                msg, pixels = scan_frame('scan-tiler', index, x, y)
                sent[index] = (msg, pixels)
                frames_publisher.publish(msg)
            revisit, _ = scan_frame('scan-tiler', 4, 1e-3, 1e-3, revisit=True)
            frames_publisher.publish(revisit)  # a revisit capture is no scan frame: not kept
            assert spin_until(executor, lambda: len(announced) >= 4, timeout=30)
            store = FlakeStore(data / 'registry.sqlite')
            assert spin_until(executor, lambda: len(store.frames('scan-tiler')) == 4, timeout=30)
            recorded = store.frames('scan-tiler')
            store.close()
        finally:
            executor.shutdown()
            tiler.close()
            tiler.destroy_node()
            peer.destroy_node()

    for index, (msg, pixels) in sent.items():
        row = recorded[index]
        assert row['path'] == frame_file('scan-tiler', index).as_posix()
        assert (row['width'], row['height'], row['pixel_size']) == (SIDE, SIDE, PIXEL)
        assert row['pixel_to_wafer'] == pytest.approx(list(msg.pixel_to_wafer))
        assert row['stamp'] == pytest.approx(1_700_000_000 + index)
        kept = cv2.imread(str(data / row['path']))
        assert kept.shape == pixels.shape and np.abs(kept.astype(int) - pixels).mean() < 3  # JPEG, full resolution
    assert all(not a.image.data for a in announced), 'the announcement carries the geometry, not the pixels'
    assert not (data / frame_file('scan-tiler', 4)).exists()
    meta = json.loads((data / 'scans' / 'scan-tiler' / 'mosaic.json').read_text())
    assert meta['frames'] == 4 and meta['written_local_time']


def test_frames_beyond_the_disk_budget_are_not_kept(ros, tmp_path):
    from flake_msgs.msg import ScanFrame

    data = tmp_path / 'data'
    old = data / 'scans' / 'older-scan' / 'frames'
    old.mkdir(parents=True)
    (old / '00000.jpg').write_bytes(b'\xff' * 1_200_000)  # an earlier scan already fills the budget
    tiler = TilerNode(parameter_overrides=[Parameter('data_dir', value=str(data)),
                                           Parameter('frames_max_megabytes', value=1.0)])
    peer = ros.create_node('tiler_budget_peer')
    frames_publisher = peer.create_publisher(ScanFrame, '/scan/frames', PIPELINE_QOS)
    executor = SingleThreadedExecutor()
    executor.add_node(tiler)
    executor.add_node(peer)
    try:
        assert spin_until(executor, lambda: frames_publisher.get_subscription_count() > 0, timeout=30)
        frames_publisher.publish(scan_frame('scan-full', 0, 1e-3, 1e-3, tiles_total=1)[0])
        assert spin_until(executor, lambda: tiler.frames_not_kept == 1, timeout=30)
    finally:
        executor.shutdown()
        tiler.close()
        tiler.destroy_node()
        peer.destroy_node()
    assert tiler.frames_kept == 0 and not (data / frame_file('scan-full', 0)).exists()
    assert (old / '00000.jpg').exists(), 'frames already kept are never deleted'
    assert (data / 'scans' / 'scan-full' / 'mosaic.png').exists(), 'the mosaic is still written'

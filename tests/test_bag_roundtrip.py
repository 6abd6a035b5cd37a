"""A live scan recorded and replayed: the replay fills a fresh registry with the same flakes.

Live run: simulated frames -> detector_node -> registry_node, with flake-record's
node recording /scan/tiles and /detections. Replay: only the recorded frames, at
unlimited rate, into a fresh detector_node and registry_node (new database).
"""

from __future__ import annotations

import os

import numpy as np
from ros_helpers import spin_until

from flake_scanner.bag.io import BagReader

# Topics unique to this test process: other runs of this suite may share the DDS domain.
NAMESPACE = f'/bagrt_{os.getpid()}'
TILES = f'{NAMESPACE}/scan/tiles'
DETECTIONS = f'{NAMESPACE}/detections'
SEED = 3
FRAMES = 6
CHIP = 'chip-bag'
SCAN = 'scan-bag-0001'


def _simulated_frames():
    from flake_core.ros_image import numpy_to_image
    from flake_msgs.msg import ScanFrame
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.cli import dataset_positions
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    camera = CameraModel(VirtualWafer.generate(WaferConfig(seed=SEED)),
                         CameraSettings(width=480, height=360, objective='10x', seed=SEED))
    frames = []
    for tile, (_, x, y) in enumerate(dataset_positions(camera, FRAMES + 2, 0.0, SEED)[2:]):
        frame = ScanFrame(scan_id=SCAN, chip_id=CHIP, tile_index=tile, tiles_total=FRAMES, objective='10x',
                          magnification=10.0, pixel_size=camera.pixel_size)
        frame.header.frame_id = 'camera_optical'
        frame.image = numpy_to_image(camera.render(x, y), 'bgr8')
        frame.pixel_to_wafer = [float(v) for v in camera.pixel_to_wafer(x, y).as_list()]
        frame.stage_position.x, frame.stage_position.y = float(x), float(y)
        frames.append(frame)
    return frames


def _pipeline(tmp_path, name: str):
    from rclpy.parameter import Parameter

    from flake_detector.nodes.detector_node import DetectorNode
    from flake_registry.nodes.registry_node import RegistryNode

    detector = DetectorNode(parameter_overrides=[Parameter('spill_dir', value=str(tmp_path / f'{name}_spill')),
                                                 Parameter('input_topic', value=TILES),
                                                 Parameter('output_topic', value=DETECTIONS)])
    registry = RegistryNode(namespace=NAMESPACE, parameter_overrides=[
        Parameter('database_path', value=str(tmp_path / f'{name}.sqlite'))])
    return detector, registry


def _flakes(path):
    from flake_registry.store import FlakeStore

    store = FlakeStore(path)
    try:
        return sorted((f.material, f.layer_class, round(f.x * 1e7), round(f.y * 1e7), round(f.area * 1e12),
                       f.n_observations) for f in store.iter_flakes())
    finally:
        store.close()


def _close(executor, *nodes):
    for node in nodes:
        executor.remove_node(node)
        node.close()
        node.destroy_node()


def test_replayed_scan_fills_a_fresh_registry_with_the_same_flakes(ros, tmp_path):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from flake_core.node_tools import PIPELINE_QOS
    from flake_msgs.msg import ScanFrame
    from flake_scanner.bag.record import BagRecorder
    from flake_scanner.bag.replay import BagReplayer

    frames = _simulated_frames()
    executor = SingleThreadedExecutor()
    bag = tmp_path / 'live_scan'
    # -- the live run, recorded ------------------------------------------------------------
    source = Node('bag_roundtrip_source')
    frame_publisher = source.create_publisher(ScanFrame, TILES, PIPELINE_QOS)
    detector, registry = _pipeline(tmp_path, 'live')
    recorder = BagRecorder(parameter_overrides=[Parameter('topics', value=f'{TILES},{DETECTIONS}'),
                                                Parameter('output', value=str(bag))])
    for node in (source, detector, registry, recorder):
        executor.add_node(node)
    try:
        assert spin_until(executor, lambda: frame_publisher.get_subscription_count() == 2
                          and len(recorder.subscriptions_by_topic) == 2, timeout=30)
        assert spin_until(executor, lambda: detector.publisher.get_subscription_count() == 2, timeout=30)
        for frame in frames:
            frame_publisher.publish(frame)
        assert spin_until(executor, lambda: registry.stats['batches_stored'] == FRAMES
                          and recorder.received == 2 * FRAMES, timeout=90)
    finally:
        _close(executor, recorder, detector, registry)
        executor.remove_node(source)
        source.destroy_node()
    live = _flakes(tmp_path / 'live.sqlite')
    assert len(live) >= 3, 'the simulated frames must hold flakes the detector finds'
    with BagReader(bag) as reader:
        assert reader.topics[TILES].count == FRAMES
        assert reader.topics[DETECTIONS].count == FRAMES
        recorded = [reader.deserialize(m) for m in reader.messages([TILES])]
    assert [f.tile_index for f in recorded] == list(range(FRAMES))
    assert np.array_equal(recorded[2].image.data, np.frombuffer(frames[2].image.data, np.uint8))

    # -- the replay into a fresh detector and registry -----------------------------------
    detector, registry = _pipeline(tmp_path, 'replayed')
    replayer = BagReplayer(parameter_overrides=[
        Parameter('bag', value=str(bag)), Parameter('rate', value=0.0), Parameter('topics', value=TILES),
        Parameter('start_paused', value=True), Parameter('start_delay', value=0.0),
        Parameter('clock_topic', value=f'{NAMESPACE}/clock')])
    for node in (detector, registry, replayer):
        executor.add_node(node)
    try:
        assert spin_until(executor, lambda: replayer.publishers_by_topic[TILES].get_subscription_count() == 1
                          and detector.publisher.get_subscription_count() == 1, timeout=30)
        detector_input = [s for s in detector.subscriptions if s.topic_name == TILES]
        assert spin_until(executor, lambda: detector_input[0].get_publisher_count() == 1, timeout=30)
        replayer.resume()
        assert spin_until(executor, lambda: registry.stats['batches_stored'] == FRAMES, timeout=90)
        assert replayer.error is None and replayer.published == FRAMES
    finally:
        _close(executor, replayer, detector, registry)
        executor.shutdown()
    assert _flakes(tmp_path / 'replayed.sqlite') == live

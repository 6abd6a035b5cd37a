"""detector_node with real rclpy: ScanFrames in, FlakeArrays with wafer coordinates out."""

from detector_synth import make_frame
import numpy as np
import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from ros_helpers import spin_until

from flake_core.geometry import Affine2D
from flake_core.node_tools import PIPELINE_QOS
from flake_core.ros_image import image_to_numpy, numpy_to_image
from flake_detector.nodes.detector_node import DetectorNode

pytestmark = pytest.mark.ros

PIXEL = 2e-7  # m per pixel
# Image +u along wafer +x, +v along wafer -y, frame origin at (1 mm, 2 mm), a slight rotation.
TO_WAFER = Affine2D(PIXEL * np.cos(0.01), PIXEL * np.sin(0.01), 1e-3,
                    PIXEL * np.sin(0.01), -PIXEL * np.cos(0.01), 2e-3)


def _frame_msg(image, tile_index):
    from flake_msgs.msg import ScanFrame

    msg = ScanFrame()
    msg.image = numpy_to_image(image, 'bgr8')
    msg.scan_id, msg.chip_id, msg.tile_index = 'scan-test', 'chip-test', tile_index
    msg.pixel_size = PIXEL
    msg.pixel_to_wafer = TO_WAFER.as_list()
    return msg


@pytest.fixture
def graph(ros, tmp_path):
    from flake_msgs.msg import FlakeArray, ScanFrame

    node = DetectorNode(parameter_overrides=[
        Parameter('input_topic', value='/test_detector/tiles'),
        Parameter('output_topic', value='/test_detector/detections'),
        Parameter('calibration', value='model'),
        Parameter('max_layers', value=10.0),
        Parameter('queue_size', value=1),
        Parameter('spill_dir', value=str(tmp_path / 'spill')),
        Parameter('diagnostics_period', value=0.2),
    ])
    peer = ros.create_node('detector_test_peer')
    received = []
    diagnostics = []
    publisher = peer.create_publisher(ScanFrame, '/test_detector/tiles', PIPELINE_QOS)
    peer.create_subscription(FlakeArray, '/test_detector/detections', received.append, PIPELINE_QOS)
    from diagnostic_msgs.msg import DiagnosticArray
    peer.create_subscription(DiagnosticArray, '/diagnostics', diagnostics.append, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    executor.add_node(peer)
    assert spin_until(executor, lambda: publisher.get_subscription_count() > 0, timeout=10)
    yield node, publisher, received, diagnostics, executor
    executor.shutdown()
    node.close()
    node.destroy_node()
    peer.destroy_node()


def test_frames_in_flakes_out_with_wafer_coordinates(graph):
    node, publisher, received, diagnostics, executor = graph
    frames = [make_frame(seed, 256, flakes=[('graphene', 1), ('graphene', 3)], clutter=False, radius=(24, 30))
              for seed in (40, 41, 42)]
    for index, (image, _) in enumerate(frames):
        publisher.publish(_frame_msg(image, index))
    assert spin_until(executor, lambda: len(received) == 3, timeout=60)
    by_tile = {msg.tile_index: msg for msg in received}
    for index, (_, truths) in enumerate(frames):
        msg = by_tile[index]
        assert msg.scan_id == 'scan-test' and msg.header.frame_id == 'wafer'
        assert len(msg.flakes) == len(truths)
        for truth in truths:
            expected = TO_WAFER.apply(*truth.centre)
            flake = min(msg.flakes, key=lambda f: np.hypot(f.centre.x - expected[0], f.centre.y - expected[1]))
            assert np.hypot(flake.centre.x - expected[0], flake.centre.y - expected[1]) < 2 * PIXEL
            assert flake.layers == truth.layers
            assert flake.thickness_nm == pytest.approx(truth.layers * 0.335, abs=1e-4)
            assert flake.material == 'graphene' and flake.detector == 'contrast'
            assert flake.model_version == 'model-sio2-90nm-graphene'  # the thin-film model's calibration at 90 nm
            assert flake.chip_id == 'chip-test' and flake.tile_index == index
            assert flake.area == pytest.approx(truth.mask.sum() * PIXEL ** 2, rel=0.2)
            # The outline is in the wafer frame around the centre.
            xs = [p.x for p in flake.contour.points]
            assert min(xs) < flake.centre.x < max(xs)
            mask = image_to_numpy(flake.mask)
            assert mask.shape == (flake.bbox.height, flake.bbox.width) and mask.max() == 255
    # Nothing lost: every frame was processed, queued in memory or spilled and worked off.
    def settled():
        return node.counts['processed'] == 3 and not list(node.spill_dir.glob('*.cdr'))
    assert spin_until(executor, settled, timeout=30)
    assert node.counts['received'] == 3 and node.counts['failed'] == 0

    def has_counts():
        for array in diagnostics:
            for status in array.status:
                values = {kv.key: kv.value for kv in status.values}
                if status.name == 'detector_node: detector' and values.get('processed') == '3':
                    return True
        return False
    assert spin_until(executor, has_counts, timeout=10)


def test_invalid_backend_is_refused(graph):
    node = graph[0]
    result = node.set_parameters([Parameter('backend', value='nonsense')])[0]
    assert not result.successful and 'backend must be one of' in result.reason
    assert node.params.backend == 'contrast'
    result = node.set_parameters([Parameter('backend_params', value='[1, 2]')])[0]
    assert not result.successful and 'JSON object' in result.reason


def test_backend_keywords_come_from_parameters():
    from flake_core.parameters import view
    from flake_detector.nodes.detector_node import backend_kwargs
    from flake_detector.parameters import DetectorNodeParameters

    params = view(DetectorNodeParameters, {'backend': 'cascade', 'target': 'hbn-10-90nm', 'cascade_threshold': 0.7,
                                           'oxide_nm': 285.0, 'backend_params': '{"std_threshold": 0.05}'})
    kwargs = backend_kwargs(params)
    assert kwargs['threshold'] == 0.7 and kwargs['target'] == 'hbn-10-90nm' and kwargs['oxide_nm'] == 285.0
    assert kwargs['std_threshold'] == 0.05 and 'materials' not in kwargs

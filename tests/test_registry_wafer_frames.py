"""Chip wafer frames kept by the registry: the services a scan coordinator uses, over real rclpy."""

import math
import threading

from geometry_msgs.msg import Point
import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from ros_helpers import spin_future

from flake_core.geometry import WaferFrame
from flake_core.node_tools import SERVICE_QOS
from flake_msgs.srv import GetWaferFrames, SaveWaferFrame
from flake_registry.nodes.registry_node import RegistryNode
from flake_registry.store import FlakeStore

pytestmark = pytest.mark.ros


class Coordinator:
    """What a scan coordinator needs: two clients on the registry's frame services."""

    def __init__(self, ros, name):
        self.node = ros.create_node(name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.save = self.node.create_client(SaveWaferFrame, '/registry/save_wafer_frame', qos_profile=SERVICE_QOS)
        self.get = self.node.create_client(GetWaferFrames, '/registry/get_wafer_frames', qos_profile=SERVICE_QOS)

    def call(self, client, request):
        assert client.wait_for_service(timeout_sec=30.0)
        return spin_future(self.executor, client.call_async(request), timeout=30.0)

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()


def start_registry(path):
    node = RegistryNode(parameter_overrides=[Parameter('database_path', value=str(path))])
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    return node, executor, spinner


def stop_registry(node, executor, spinner):
    executor.shutdown()
    spinner.join(timeout=10)
    node.close()
    node.destroy_node()


def corners_msg(points):
    return [Point(x=x, y=y) for x, y in points]


def test_frames_saved_by_one_coordinator_are_found_by_another_after_a_registry_restart(ros, tmp_path):
    path = tmp_path / 'registry.sqlite'
    turned = 0.02
    corners = [(1e-3, 2e-3), (1e-3 + 8e-3 * math.cos(turned), 2e-3 + 8e-3 * math.sin(turned)), (0.8e-3, 9e-3)]
    registry = start_registry(path)
    first = Coordinator(ros, 'coordinator_one')
    try:
        saved = first.call(first.save, SaveWaferFrame.Request(chip_id='chip-A', corners=corners_msg(corners),
                                                              measured_by='/scope1/scan_coordinator'))
        assert saved.success and saved.error_code == ''
        expected = WaferFrame.from_corners(corners)
        assert list(saved.frame.stage_to_wafer) == pytest.approx(expected.stage_to_wafer.as_list())
        assert saved.frame.rotation == pytest.approx(turned)
        assert saved.frame.measured_by == '/scope1/scan_coordinator' and saved.frame.measured_at.sec > 0
        refused = first.call(first.save, SaveWaferFrame.Request(
            chip_id='chip-B', corners=corners_msg([(0, 0), (1e-2, 0), (2e-2, 0)])))
        assert not refused.success and refused.error_code == SaveWaferFrame.Response.ERROR_DEGENERATE
        refused = first.call(first.save, SaveWaferFrame.Request(chip_id='', corners=corners_msg(corners)))
        assert refused.error_code == SaveWaferFrame.Response.ERROR_INVALID_ARGUMENT
    finally:
        first.close()
        stop_registry(*registry)

    registry = start_registry(path)
    second = Coordinator(ros, 'coordinator_two')
    try:
        answer = second.call(second.get, GetWaferFrames.Request())
        assert answer.success and [f.chip_id for f in answer.frames] == ['chip-A']
        frame = answer.frames[0]
        assert [(p.x, p.y) for p in frame.corners] == corners
        assert list(frame.stage_to_wafer) == list(saved.frame.stage_to_wafer)
        # A coordinator can rebuild the same WaferFrame from the corners it gets back.
        assert WaferFrame.from_corners([(p.x, p.y) for p in frame.corners]).rotation == pytest.approx(turned)
        only = second.call(second.get, GetWaferFrames.Request(chip_ids=['chip-B', 'chip-A']))
        assert [f.chip_id for f in only.frames] == ['chip-A']
        none = second.call(second.get, GetWaferFrames.Request(chip_ids=['chip-B']))
        assert none.success and list(none.frames) == []
    finally:
        second.close()
        stop_registry(*registry)
    with FlakeStore(path) as store:
        assert [f.measured_by for f in store.wafer_frame_history('chip-A')] == ['/scope1/scan_coordinator']

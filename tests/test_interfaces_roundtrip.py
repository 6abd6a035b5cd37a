"""flake_msgs between two processes with real rclpy: topics, a service, an action."""

from helpers.sample_messages import sample_flake
import numpy as np
import pytest
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from ros_helpers import spin_future, spin_until, start_helper, stop_helper

from flake_core.ros_image import image_to_numpy
from flake_msgs.action import Scan
from flake_msgs.msg import Flake
from flake_msgs.srv import QueryFlakes

pytestmark = pytest.mark.ros


@pytest.fixture(scope='module')
def peer(ros):
    process = start_helper('interface_peer')
    node = ros.create_node('interface_test_client')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    yield node, executor
    executor.shutdown()
    node.destroy_node()
    output = stop_helper(process)
    assert 'Traceback' not in output, output


def test_flake_with_mask_and_contour_crosses_processes_unchanged(peer):
    node, executor = peer
    received = []
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    subscription = node.create_subscription(Flake, '/peer/flake', received.append, latched)
    try:
        assert spin_until(executor, lambda: received, timeout=60), 'no Flake from the peer process'
    finally:
        node.destroy_subscription(subscription)
    expected = sample_flake(0)
    got = received[0]
    # Equal on the wire: float32 fields of the local message are not rounded until serialised.
    assert serialize_message(got) == serialize_message(expected)
    assert got.id == expected.id and got.layer_class == Flake.LAYER_FEW
    assert np.array_equal(image_to_numpy(got.mask), image_to_numpy(expected.mask))
    assert len(got.contour.points) == 12
    assert got.contour.points[3].x == pytest.approx(expected.contour.points[3].x)


def test_query_flakes_service_answers_and_reports_errors(peer):
    node, executor = peer
    client = node.create_client(QueryFlakes, '/peer/query_flakes')
    try:
        assert spin_until(executor, lambda: client.service_is_ready(), timeout=60)
        response = spin_future(executor, client.call_async(QueryFlakes.Request(limit=4)))
        assert response.success and response.total == 42
        assert [f.id for f in response.flakes] == [f'flake-{i:04d}' for i in range(4)]
        bad = spin_future(executor, client.call_async(QueryFlakes.Request(layers_min=5.0, layers_max=2.0)))
        assert not bad.success
        assert bad.error_code == QueryFlakes.Response.ERROR_INVALID_RANGE
    finally:
        node.destroy_client(client)


def test_scan_goal_gives_feedback_and_a_second_goal_is_cancelled(peer):
    node, executor = peer
    client = ActionClient(node, Scan, '/peer/scan')
    try:
        assert spin_until(executor, lambda: client.server_is_ready(), timeout=60)
        feedback = []
        goal = spin_future(executor, client.send_goal_async(
            Scan.Goal(chip_id='chip-A'), feedback_callback=lambda msg: feedback.append(msg.feedback)))
        assert goal.accepted
        result = spin_future(executor, goal.get_result_async(), timeout=60).result
        assert result.success and result.scan_id == 'chip-A-scan' and result.tiles_done == 5
        assert [f.tiles_done for f in feedback] == [1, 2, 3, 4, 5]
        assert all(f.tiles_total == 5 for f in feedback)

        second_feedback = []
        second = spin_future(executor, client.send_goal_async(
            Scan.Goal(chip_id='chip-B'), feedback_callback=lambda msg: second_feedback.append(msg)))
        assert second.accepted
        assert spin_until(executor, lambda: second_feedback, timeout=30)
        cancel = spin_future(executor, second.cancel_goal_async())
        assert len(cancel.goals_canceling) == 1
        outcome = spin_future(executor, second.get_result_async(), timeout=60)
        assert outcome.result.error_code == Scan.Result.ERROR_CANCELED
        assert outcome.result.tiles_done < 5
    finally:
        client.destroy()

"""stage_node over real rclpy: lifecycle, MoveStage, /stage/state and /diagnostics."""

import threading

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Point
import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from ros_helpers import spin_future, spin_until

from flake_msgs.msg import StageState
from flake_msgs.srv import MoveStage
from flake_scanner.nodes.stage_node import StageNode

pytestmark = pytest.mark.ros


@pytest.fixture
def graph(ros):
    stage = StageNode(parameter_overrides=[Parameter('emulator_time_scale', value=20.0),
                                           Parameter('timeout', value=0.5),
                                           Parameter('poll_rate', value=50.0),
                                           Parameter('diagnostics_period', value=0.2)])
    # The stage node spins on its own executor in its own thread, as in its own process:
    # a service answered from a worker thread must wake a blocking spin() by itself.
    stage_executor = SingleThreadedExecutor()
    stage_executor.add_node(stage)
    spinner = threading.Thread(target=stage_executor.spin, daemon=True)
    spinner.start()
    client = ros.create_node('stage_test_client')
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    states: list[StageState] = []
    diagnostics: list[DiagnosticArray] = []
    client.create_subscription(StageState, '/stage/state', states.append, 10)
    client.create_subscription(DiagnosticArray, '/diagnostics', diagnostics.append, 10)
    move = client.create_client(MoveStage, '/stage/move')
    yield stage, executor, move, states, diagnostics
    stage_executor.shutdown()
    spinner.join(timeout=10.0)
    executor.remove_node(client)
    stage.close()
    stage.destroy_node()
    client.destroy_node()
    executor.shutdown()


def _call(executor, client, request, timeout=20.0):
    assert spin_until(executor, client.service_is_ready, 10.0)
    return spin_future(executor, client.call_async(request), timeout)


def test_move_inactive_is_refused_then_moves_and_state_follows(graph):
    stage, executor, move, states, diagnostics = graph
    response = _call(executor, move, MoveStage.Request(target=Point(x=0.001), wait=True))
    assert not response.success and response.error_code == MoveStage.Response.ERROR_INACTIVE

    assert stage.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert stage.trigger_activate() == TransitionCallbackReturn.SUCCESS
    target = Point(x=0.0021, y=-0.0013, z=4.2e-5)
    response = _call(executor, move, MoveStage.Request(target=target, wait=True))
    assert response.success, response.message
    assert (response.position.x, response.position.y, response.position.z) == pytest.approx(
        (0.0021, -0.0013, 4.2e-5), abs=1e-7)

    def settled_at_target():
        return bool(states) and not states[-1].moving and abs(states[-1].position.x - 0.0021) < 1e-7
    assert spin_until(executor, settled_at_target, 10.0)
    last = states[-1]
    assert last.header.frame_id == 'stage'
    assert (last.position.y, last.position.z) == pytest.approx((-0.0013, 4.2e-5), abs=1e-7)
    assert (last.target.x, last.target.y) == pytest.approx((0.0021, -0.0013))
    assert not last.fault

    response = _call(executor, move, MoveStage.Request(target=Point(x=-0.0001), relative=True, wait=True))
    assert response.success and response.position.x == pytest.approx(0.0020, abs=1e-7)

    response = _call(executor, move, MoveStage.Request(home=True, wait=True))
    assert response.success and response.position.x == pytest.approx(0.0, abs=1e-7)
    assert spin_until(executor, lambda: states[-1].homed, 5.0)

    assert spin_until(executor, lambda: any(
        s.hardware_id == stage.driver.port for d in diagnostics for s in d.status), 5.0)
    status = next(s for d in diagnostics for s in d.status if s.hardware_id == stage.driver.port)
    keys = {kv.key: kv.value for kv in status.values}
    assert {'port', 'retries', 'reconnects', 'faults', 'lost_replies', 'resyncs'} <= set(keys)


def test_move_errors_map_to_codes_and_faults_recover(graph):
    stage, executor, move, states, _ = graph
    stage.trigger_configure()
    stage.trigger_activate()
    response = _call(executor, move, MoveStage.Request(target=Point(x=0.2), wait=True))
    assert not response.success and response.error_code == MoveStage.Response.ERROR_OUT_OF_LIMITS
    assert '200.0000 mm is outside' in response.message
    response = _call(executor, move, MoveStage.Request(target=Point(x=float('nan'))))
    assert response.error_code == MoveStage.Response.ERROR_INVALID_ARGUMENT

    stage.emulator.drop_next_replies(1)
    stage.emulator.disconnect(down_for=0.2)
    response = _call(executor, move, MoveStage.Request(target=Point(x=0.001, y=0.001), wait=True))
    assert response.success, response.message
    assert spin_until(executor, lambda: states and states[-1].reconnects >= 1, 5.0)

    stage.emulator.disconnect(down_for=None)
    response = _call(executor, move, MoveStage.Request(target=Point(x=0.002), wait=True))
    assert response.error_code == MoveStage.Response.ERROR_DEVICE
    assert 'lost the stage controller' in response.message
    assert spin_until(executor, lambda: states and states[-1].fault, 10.0)


def test_refusals_answer_the_current_position_and_speeds_are_bounded(graph):
    stage, executor, move, states, _ = graph
    stage.trigger_configure()
    stage.trigger_activate()
    assert _call(executor, move, MoveStage.Request(target=Point(x=0.0012, y=-0.0007), wait=True)).success
    for request in (MoveStage.Request(target=Point(x=0.2), wait=True),
                    MoveStage.Request(target=Point(x=float('nan'))),
                    MoveStage.Request(target=Point(x=0.001), speed=1e9, wait=True),
                    MoveStage.Request(target=Point(x=0.001), speed=-1.0, wait=True)):
        response = _call(executor, move, request)
        assert not response.success and response.error_code in (
            MoveStage.Response.ERROR_OUT_OF_LIMITS, MoveStage.Response.ERROR_INVALID_ARGUMENT), response.message
        assert (response.position.x, response.position.y) == pytest.approx((0.0012, -0.0007), abs=1e-7)
    response = _call(executor, move, MoveStage.Request(target=Point(x=0.001), speed=1e9, wait=True))
    assert 'outside' in response.message and 'm/s' in response.message
    assert stage.emulator.position()[0] == pytest.approx(0.0012, abs=1e-7)  # nothing was sent


def test_a_lost_move_acknowledgement_is_resolved_by_asking_the_controller(graph):
    stage, executor, move, states, _ = graph
    stage.trigger_configure()
    stage.trigger_activate()
    stage.emulator.drop_next_replies(1)  # the MOVE is carried out, its ":A" never comes
    response = _call(executor, move, MoveStage.Request(target=Point(x=0.003, y=0.001), wait=True))
    assert response.success, response.message
    assert response.position.x == pytest.approx(0.003, abs=1e-7)
    assert stage.emulator.position()[:2] == pytest.approx((0.003, 0.001), abs=1e-7)
    assert stage.driver.counters.moves_resent == 0  # decided from WHERE/STATUS, not resent blindly
    assert spin_until(executor, lambda: states and abs(states[-1].target.x - 0.003) < 1e-9
                      and not states[-1].fault, 10.0)


def test_state_is_latched_for_late_subscribers(graph, ros):
    stage, executor, move, states, _ = graph
    assert stage.set_parameters([Parameter('poll_rate', value=0.5)])[0].successful
    stage.trigger_configure()
    stage.trigger_activate()
    assert spin_until(executor, lambda: bool(states), 10.0)
    from flake_core.node_tools import STATE_QOS

    late = ros.create_node('late_state_subscriber')
    received = []
    late.create_subscription(StageState, '/stage/state', received.append, STATE_QOS)
    executor.add_node(late)
    try:
        # Polled every 2 s now: a message within much less than that is the stored one.
        assert spin_until(executor, lambda: bool(received), 10.0)
    finally:
        executor.remove_node(late)
        late.destroy_node()


def test_a_burst_of_concurrent_moves_with_default_client_qos_is_all_answered(graph):
    stage, executor, move, states, _ = graph
    stage.trigger_configure()
    stage.trigger_activate()
    assert spin_until(executor, move.service_is_ready, 10.0)
    futures = [move.call_async(MoveStage.Request(target=Point(x=i * 1e-5), wait=True)) for i in range(40)]
    assert spin_until(executor, lambda: all(f.done() for f in futures), 120.0), \
        f'{sum(not f.done() for f in futures)} of 40 calls never answered'
    assert all(f.result().success for f in futures), [f.result().message for f in futures if not f.result().success]


def test_waiting_move_does_not_block_the_executor(graph):
    stage, executor, move, states, _ = graph
    stage.trigger_configure()
    stage.trigger_activate()
    # 20 mm at 1 mm/s is 20 emulated s = 1 s real: state messages must keep flowing meanwhile.
    future = move.call_async(MoveStage.Request(target=Point(x=0.02), speed=1e-3, wait=True))
    assert spin_until(executor, lambda: bool(states) and states[-1].moving, 10.0)
    moving_x = states[-1].position.x
    response = spin_future(executor, future, 20.0)
    assert response.success
    assert 0.0 <= moving_x < 0.02


def test_configure_fails_clearly_without_a_port(ros):
    node = StageNode(parameter_overrides=[Parameter('emulate', value=False)])
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    finally:
        node.close()
        node.destroy_node()


def test_camera_frames_follow_rep_103():
    from flake_scanner.nodes.tf_publishing import camera_transform, optical_transform

    moved = camera_transform((0.001, 0.002, 3e-6), None).transform
    assert (moved.translation.x, moved.translation.y, moved.translation.z) == (0.001, 0.002, 3e-6)
    assert (moved.rotation.x, moved.rotation.y, moved.rotation.z, moved.rotation.w) == (0.0, 0.0, 0.0, 1.0)
    optical = optical_transform(None)
    assert (optical.header.frame_id, optical.child_frame_id) == ('camera', 'camera_optical')
    q = optical.transform.rotation
    assert (q.x, q.y, q.z, q.w) == (1.0, 0.0, 0.0, 0.0)  # half turn about x: y -> -y, z -> -z

"""autofocus_node over real rclpy with stage_node (emulated controller) and camera_node (sim)."""

import threading

from action_msgs.msg import GoalStatus
from geometry_msgs.msg import Point
import numpy as np
import pytest
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from ros_helpers import spin_future, spin_until

from flake_msgs.action import Autofocus
from flake_msgs.msg import StageState
from flake_msgs.srv import MoveStage
from flake_scanner.nodes.autofocus_node import AutofocusNode
from flake_scanner.nodes.camera_node import CameraNode
from flake_scanner.nodes.stage_node import StageNode
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.wafer import VirtualWafer

pytestmark = pytest.mark.ros
SIZE = 192
SEED = 6


@pytest.fixture
def graph(ros):
    stage = StageNode(parameter_overrides=[Parameter('emulator_time_scale', value=100.0),
                                           Parameter('emulator_settle_time', value=0.0),
                                           Parameter('poll_rate', value=100.0)])
    camera = CameraNode(parameter_overrides=[Parameter('width', value=SIZE), Parameter('height', value=SIZE),
                                             Parameter('rate', value=0.0), Parameter('sim_seed', value=SEED)])
    focus = AutofocusNode()
    for node in (stage, camera):
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    # The system spins on its own executor in its own thread, as in its own processes.
    system = SingleThreadedExecutor()
    for node in (stage, camera, focus):
        system.add_node(node)
    spinner = threading.Thread(target=system.spin, daemon=True)
    spinner.start()
    client = ros.create_node('autofocus_test_client')
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    reference = CameraModel(VirtualWafer.generate(seed=SEED), CameraSettings(width=SIZE, height=SIZE, seed=SEED))
    x, y = reference.flake_corner_in_view(np.random.default_rng(0), 2e-3, 8e-3)
    states: list[StageState] = []
    client.create_subscription(StageState, '/stage/state', states.append, 10)
    move = client.create_client(MoveStage, '/stage/move')
    assert spin_until(executor, move.service_is_ready, 10.0)
    assert spin_future(executor, move.call_async(MoveStage.Request(target=Point(x=x, y=y), wait=True))).success
    assert spin_until(executor, lambda: focus.stage_state is not None
                      and abs(focus.stage_state.position.x - x) < 1e-6, 10.0)
    action = ActionClient(client, Autofocus, '/autofocus')
    yield executor, action, reference, (x, y), states, focus, move
    action.destroy()
    system.shutdown()
    spinner.join(timeout=10.0)
    executor.remove_node(client)
    client.destroy_node()
    executor.shutdown()
    for node in (stage, camera, focus):
        node.close()
        node.destroy_node()


def test_autofocus_action_reaches_focus_within_the_frame_budget(graph):
    executor, action, reference, (x, y), states, _, _ = graph
    assert spin_until(executor, action.server_is_ready, 10.0)
    feedback: list[Autofocus.Feedback] = []
    goal = Autofocus.Goal(use_current=True, search_range=50e-6, measure='tenengrad', max_frames=15)
    handle = spin_future(executor, action.send_goal_async(goal, feedback_callback=lambda f: feedback.append(
        f.feedback)), 10.0)
    assert handle.accepted
    outcome = spin_future(executor, handle.get_result_async(), 60.0)
    result = outcome.result
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, result.message
    assert result.success and result.frames_used <= 15
    focal_z = reference.focal_plane_z(x, y)
    assert abs(result.z - focal_z) <= reference.objective.depth_of_field_m / 2
    assert [f.frames_used for f in feedback] == list(range(1, result.frames_used + 1))
    assert feedback[-1].best_z == pytest.approx(result.z)
    # The coarse sweep (7 frames by default) steps on while each frame is read out and measured;
    # every refinement frame is waited for.
    assert result.frames_overlapped == 6
    # One z move per frame, then the move to the best z.
    assert len(result.z_visited) == result.frames_used + 1
    assert result.z_visited[-1] == pytest.approx(result.z)
    # The stage is left at the best focus.
    assert spin_until(executor, lambda: abs(states[-1].position.z - result.z) < 2e-7, 10.0)


def test_autofocus_cancel_and_invalid_goal(graph):
    executor, action, _, _, _, _, _ = graph
    assert spin_until(executor, action.server_is_ready, 10.0)
    invalid = spin_future(executor, action.send_goal_async(Autofocus.Goal(use_current=True, measure='blur')))
    outcome = spin_future(executor, invalid.get_result_async(), 20.0)
    assert outcome.status == GoalStatus.STATUS_ABORTED
    assert outcome.result.error_code == Autofocus.Result.ERROR_INVALID_ARGUMENT

    feedback: list[Autofocus.Feedback] = []
    handle = spin_future(executor, action.send_goal_async(
        Autofocus.Goal(use_current=True), feedback_callback=lambda f: feedback.append(f.feedback)), 10.0)
    assert spin_until(executor, lambda: len(feedback) >= 2, 30.0)
    spin_future(executor, handle.cancel_goal_async(), 10.0)
    outcome = spin_future(executor, handle.get_result_async(), 30.0)
    assert outcome.status == GoalStatus.STATUS_CANCELED
    assert outcome.result.error_code == Autofocus.Result.ERROR_CANCELED
    assert 2 <= outcome.result.frames_used < 15


def test_autofocus_on_an_empty_field_keeps_the_search_centre(graph):
    executor, action, _, _, _, focus, move = graph
    # Far off the chip the camera sees a uniform field: nothing to focus on.
    assert spin_future(executor, move.call_async(MoveStage.Request(
        target=Point(x=-0.02, y=-0.02, z=3e-6), wait=True))).success
    assert spin_until(executor, lambda: abs(focus.stage_state.position.x + 0.02) < 1e-6, 10.0)
    assert spin_until(executor, action.server_is_ready, 10.0)
    handle = spin_future(executor, action.send_goal_async(Autofocus.Goal(use_current=True, max_frames=9)))
    outcome = spin_future(executor, handle.get_result_async(), 60.0)
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED
    assert 'no focus signal' in outcome.result.message
    assert outcome.result.z == pytest.approx(3e-6, abs=1e-9)


def test_autofocus_follows_an_objective_switch_of_the_camera(graph):
    executor, action, reference, (x, y), _, focus, _ = graph
    client = executor.get_nodes()[0]
    camera_parameters = client.create_client(SetParameters, '/camera_node/set_parameters')
    assert spin_until(executor, camera_parameters.service_is_ready, 10.0)
    switch = SetParameters.Request(parameters=[Parameter('objective', value='50x').to_parameter_msg()])
    assert spin_future(executor, camera_parameters.call_async(switch)).results[0].successful
    assert spin_until(executor, lambda: focus.objective == '50x', 10.0)

    reference.with_settings(objective='50x')
    focal_z = reference.focal_plane_z(x, y)
    dof = reference.objective.depth_of_field_m
    assert spin_until(executor, action.server_is_ready, 10.0)
    # Centred 2.5 um off focus, as a focus map's prediction may be; the default range is 8 DOF.
    handle = spin_future(executor, action.send_goal_async(Autofocus.Goal(z_center=focal_z + 2.5e-6)))
    outcome = spin_future(executor, handle.get_result_async(), 60.0)
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, outcome.result.message
    assert outcome.result.frames_used <= 15
    assert abs(outcome.result.z - focal_z) <= dof / 2, (outcome.result.z, focal_z, dof)

"""Node ``autofocus_node``: the ``/autofocus`` action (flake_msgs/action/Autofocus).

For each z the search asks for (flake_scanner.autofocus.FocusSearch), the node moves
the stage z through ``/stage/move`` (waiting for it to settle), takes the first frame
of ``/camera/image_raw`` exposed after that (asking ``/camera/capture`` for one when
the service exists), computes the focus measure in a worker thread, and publishes
feedback. Everything is awaited: no callback blocks the executor. Cancelling stops
after the current frame; the stage is left at the best z found so far.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import math
import time

from geometry_msgs.msg import Point
from rcl_interfaces.msg import ParameterEvent
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger

from flake_core.node_tools import (
    ACTION_QOS,
    IMAGE_SUBSCRIBER_QOS,
    SERVICE_QOS,
    STATE_QOS,
    FrameWaiters,
    declare_parameters,
    run_node,
    sleep_future,
    wake_executor,
    with_timeout,
)
from flake_core.objectives import OBJECTIVES, objective_by_name
from flake_core.ros_image import image_to_numpy
from flake_msgs.action import Autofocus
from flake_msgs.msg import StageState
from flake_msgs.srv import MoveStage
from flake_scanner.autofocus import FOCUS_MEASURES, FocusSearch, focus_measure
from flake_scanner.parameters import AutofocusNodeParameters


class AutofocusError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class AutofocusNode(Node):
    def __init__(self, **kwargs):
        super().__init__('autofocus_node', **kwargs)
        self.params = declare_parameters(self, AutofocusNodeParameters)
        self.group = ReentrantCallbackGroup()
        self.move_client = self.create_client(MoveStage, 'stage/move', qos_profile=SERVICE_QOS,
                                              callback_group=self.group)
        self.capture_client = self.create_client(Trigger, 'camera/capture', qos_profile=SERVICE_QOS,
                                                 callback_group=self.group)
        self.create_subscription(StageState, 'stage/state', self._on_stage_state, STATE_QOS,
                                 callback_group=self.group)
        self.create_subscription(Image, 'camera/image_raw', self._on_image, IMAGE_SUBSCRIBER_QOS,
                                 callback_group=self.group)
        self.stage_state: StageState | None = None
        self.objective = self.params.objective
        self.create_subscription(ParameterEvent, '/parameter_events', self._on_parameter_event, 100,
                                 callback_group=self.group)
        self._frames = FrameWaiters()
        self._measure_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='focus-measure')
        self._busy = False
        self.action_server = ActionServer(
            self, Autofocus, 'autofocus', execute_callback=self._execute,
            goal_callback=self._on_goal, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            callback_group=self.group, **ACTION_QOS)
        self.get_logger().info(f'autofocus ready: action {self.resolve_topic_name("autofocus")}')

    def close(self) -> None:
        self._measure_pool.shutdown(wait=True, cancel_futures=True)
        self.action_server.destroy()

    # ------------------------------------------------------------------ inputs
    def _on_stage_state(self, msg: StageState) -> None:
        self.stage_state = msg

    def _on_parameter_event(self, event: ParameterEvent) -> None:
        if event.node.rstrip('/').split('/')[-1] != self.params.camera_node:
            return
        for parameter in (*event.new_parameters, *event.changed_parameters):
            if parameter.name == 'objective' and parameter.value.string_value in OBJECTIVES:
                self.objective = parameter.value.string_value
                self.get_logger().info(f'following the camera: objective {self.objective}')

    def _on_image(self, msg: Image) -> None:
        self._frames.offer(msg)

    def _sleep(self, seconds: float) -> Future:
        return sleep_future(self, seconds, self.group)

    async def _await(self, future: Future, seconds: float, what: str):
        """``future``'s result, or AutofocusError(DEVICE) after ``seconds``."""
        try:
            return await with_timeout(self, future, seconds, what, self.group)
        except TimeoutError:
            raise AutofocusError(Autofocus.Result.ERROR_DEVICE, f'{what}: no answer within {seconds} s') from None

    def _in_thread(self, function, *args) -> Future:
        future = Future()

        def finish(done):
            if done.exception() is not None:
                future.set_exception(done.exception())
            else:
                future.set_result(done.result())
            wake_executor(self)

        self._measure_pool.submit(function, *args).add_done_callback(finish)
        return future

    async def _move_z(self, x: float, y: float, z: float) -> None:
        if not self.move_client.service_is_ready():
            raise AutofocusError(Autofocus.Result.ERROR_DEVICE,
                                 f'stage service {self.move_client.srv_name} is not available')
        request = MoveStage.Request(target=Point(x=x, y=y, z=float(z)), wait=True)
        response = await self._await(self.move_client.call_async(request), self.params.move_timeout,
                                     'stage move')
        if not response.success:
            raise AutofocusError(Autofocus.Result.ERROR_DEVICE,
                                 f'stage refused z = {z * 1e6:.2f} um: {response.error_code} {response.message}')

    async def _expose(self) -> Future:
        """The future of the first frame exposed after now, returned once its exposure has ended.

        The camera answers ``/camera/capture`` when the exposure is over, so the stage may move
        on while the frame is read out, transferred and measured. A camera that streams on its
        own (no capture service) gives no such signal: then the frame itself is waited for.
        """
        frame = self._frames.expect(self.get_clock().now().nanoseconds)
        if self.capture_client.service_is_ready():
            response = await self._await(self.capture_client.call_async(Trigger.Request()),
                                         self.params.frame_timeout, 'camera capture')
            if not response.success:
                raise AutofocusError(Autofocus.Result.ERROR_DEVICE, f'camera capture failed: {response.message}')
        else:
            await self._await(frame, self.params.frame_timeout, 'camera frame (is camera_node active?)')
        return frame

    def _score(self, frame: Future, measure: str) -> Future:
        """The focus measure of ``frame`` once it has arrived, computed in the measuring thread.

        Chained by callbacks rather than run as an executor task: a task with its own timeouts
        took two timers and extra executor rounds per frame, 0.6 s more per 3-point focus map.
        """
        scored = Future()

        def measured(done: Future) -> None:
            if done.exception() is not None:
                scored.set_exception(done.exception())
            else:
                scored.set_result(done.result())

        def arrived(done: Future) -> None:
            if done.exception() is not None:
                scored.set_exception(done.exception())
                wake_executor(self)
                return
            self._in_thread(lambda: focus_measure(image_to_numpy(done.result()), measure)).add_done_callback(measured)

        frame.add_done_callback(arrived)
        return scored

    # ------------------------------------------------------------------ action
    def _on_goal(self, goal: Autofocus.Goal) -> GoalResponse:
        if self._busy:
            self.get_logger().warning('autofocus goal rejected: another one is running')
            return GoalResponse.REJECT
        self._busy = True
        return GoalResponse.ACCEPT

    async def _execute(self, goal_handle) -> Autofocus.Result:
        result = Autofocus.Result()
        try:
            return await self._focus(goal_handle, result)
        except AutofocusError as error:
            result.error_code, result.message = error.code, str(error)
            self.get_logger().error(f'autofocus failed: {error}')
            goal_handle.abort()
            return result
        finally:
            self._busy = False

    def _search_for(self, goal: Autofocus.Goal, current_z: float) -> tuple[FocusSearch, str, float]:
        measure = goal.measure or self.params.measure
        if measure not in FOCUS_MEASURES:
            raise AutofocusError(Autofocus.Result.ERROR_INVALID_ARGUMENT,
                                 f'unknown measure {measure!r}; choose one of {sorted(FOCUS_MEASURES)}')
        depth_of_field = objective_by_name(self.objective).depth_of_field_m
        search_range = (goal.search_range or self.params.search_range
                        or self.params.search_range_dof * depth_of_field)
        tolerance = self.params.tolerance or depth_of_field / 4
        max_frames = goal.max_frames or self.params.max_frames
        centre = current_z if goal.use_current or not math.isfinite(goal.z_center) else goal.z_center
        try:
            search = FocusSearch(centre, search_range, max_frames=max_frames,
                                 coarse_frames=min(self.params.coarse_frames, max_frames),
                                 tolerance=tolerance)
        except ValueError as error:
            raise AutofocusError(Autofocus.Result.ERROR_INVALID_ARGUMENT, str(error)) from None
        return search, measure, centre

    async def _focus(self, goal_handle, result: Autofocus.Result) -> Autofocus.Result:
        deadline = time.monotonic() + self.params.move_timeout
        while self.stage_state is None:
            if time.monotonic() > deadline:
                raise AutofocusError(Autofocus.Result.ERROR_DEVICE, 'no /stage/state received: is stage_node active?')
            await self._sleep(0.02)
        position = self.stage_state.position
        x, y = position.x, position.y
        search, measure, centre = self._search_for(goal_handle.request, position.z)
        feedback = Autofocus.Feedback()
        overlapped = 0
        while batch := search.next_batch():
            if not self.params.step_during_readout:
                batch = batch[:1]
            # A batch's z values need no score to be chosen: step on as soon as each exposure ends.
            scores = []
            for z in batch:
                if goal_handle.is_cancel_requested:
                    break
                await self._move_z(x, y, z)
                result.z_visited.append(float(z))
                scores.append((z, self._score(await self._expose(), measure)))
            overlapped += max(0, len(scores) - 1)
            for z, scored in scores:
                score = await self._await(scored, self.params.frame_timeout,
                                          'camera frame (is camera_node active?)')
                search.report(z, score)
                best_z, _ = search.best()
                feedback.frames_used, feedback.z, feedback.score, feedback.best_z = (
                    search.frames_used, float(z), float(score), float(best_z))
                goal_handle.publish_feedback(feedback)
            if goal_handle.is_cancel_requested:
                break
        result.frames_used = search.frames_used
        result.frames_overlapped = overlapped
        flat = False
        if search.frames_used:
            found = search.result()
            flat = found.peak_ratio < self.params.min_peak_ratio
            # With no focus signal the sharpest frame is noise: the search centre is the better guess.
            best_z = centre if flat else found.z
            await self._move_z(x, y, best_z)
            result.z_visited.append(float(best_z))
            result.z, result.score = float(best_z), float(found.score)
        if goal_handle.is_cancel_requested:
            result.error_code, result.message = Autofocus.Result.ERROR_CANCELED, 'canceled'
            goal_handle.canceled()
            return result
        result.success = True
        if search.frames_used and flat:
            result.message = (f'no focus signal (best/lowest score {found.peak_ratio:.2f} < '
                              f'{self.params.min_peak_ratio}): kept z = {result.z * 1e6:.2f} um')
            self.get_logger().warning(result.message)
        else:
            result.message = f'focus at z = {result.z * 1e6:.2f} um after {result.frames_used} frames ({measure})'
            self.get_logger().info(result.message)
        goal_handle.succeed()
        return result


def main(args=None) -> None:
    run_node(AutofocusNode, args=args)


if __name__ == '__main__':
    main()

"""scan_coordinator: the `Scan` action, the wafer frame, and revisits.

Moves the stage tile by tile along a serpentine path, focuses (fixed, focus map,
or autofocus per tile), captures a frame at each stop and publishes it as a
`ScanFrame` on /scan/frames. Detection runs beside it (tiler -> detector ->
registry): the stage never waits for the detector. When the path is done it waits
for detection to drain, then revisits the registry's most promising flakes at a
higher magnification and stores those images with the flakes.

Everything runs as coroutines on one executor thread; no callback blocks.
"""

from __future__ import annotations

import math
import threading
import time

from geometry_msgs.msg import Point
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger

from flake_core.geometry import WaferFrame, pixel_to_wafer
from flake_core.node_tools import (
    ACTION_QOS,
    IMAGE_SUBSCRIBER_QOS,
    PIPELINE_QOS,
    SERVICE_QOS,
    STATE_QOS,
    FrameWaiters,
    declare_parameters,
    run_node,
    sleep_future,
    with_timeout,
)
from flake_core.objectives import objective_by_name
from flake_msgs.action import Autofocus, Scan
from flake_msgs.msg import FlakeArray, FlakeImage, ScanFrame, StageState
from flake_msgs.srv import AddFlakeImage, GetRevisitList, GetWaferFrames, MoveStage, SaveWaferFrame, SetWaferFrame
from flake_scanner.nodes.tf_publishing import TfPublisher, wafer_transform
from flake_scanner.parameters import FOCUS_STRATEGIES, ScanCoordinatorParameters
from flake_scanner.scan.planner import EtaEstimator, PlannedTile, Region, focus_points, plan_serpentine
from flake_scanner.scan.session import HardwareModel, ScanProgress


class ScanError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ScanCoordinator(Node):
    def __init__(self):
        super().__init__('scan_coordinator')
        self.params = declare_parameters(self, ScanCoordinatorParameters)
        self.group = ReentrantCallbackGroup()
        # Every client and server with the deep service QoS: a burst of calls (or a reply sent
        # while discovery still matches the reply endpoint) must not fall out of a 10-deep queue.
        client = dict(qos_profile=SERVICE_QOS, callback_group=self.group)
        self.move_client = self.create_client(MoveStage, 'stage/move', **client)
        self.capture_client = self.create_client(Trigger, 'camera/capture', **client)
        self.autofocus_client = ActionClient(self, Autofocus, 'autofocus', callback_group=self.group, **ACTION_QOS)
        self.revisit_client = self.create_client(GetRevisitList, 'registry/get_revisit_list', **client)
        self.add_image_client = self.create_client(AddFlakeImage, 'registry/add_flake_image', **client)
        self.save_frame_client = self.create_client(SaveWaferFrame, 'registry/save_wafer_frame', **client)
        self.get_frames_client = self.create_client(GetWaferFrames, 'registry/get_wafer_frames', **client)
        camera = self.params.camera_node
        self.camera_params_client = self.create_client(SetParameters, f'{camera}/set_parameters',
                                                       callback_group=self.group)
        self.camera_get_params_client = self.create_client(GetParameters, f'{camera}/get_parameters',
                                                           callback_group=self.group)
        self.detector_params_client = self.create_client(
            SetParameters, f'{self.params.detector_node}/set_parameters', callback_group=self.group)
        self.camera_pixel_pitch = 0.0
        self.frame_publisher = self.create_publisher(ScanFrame, 'scan/frames', PIPELINE_QOS)
        self.create_subscription(StageState, 'stage/state', self._on_stage_state, STATE_QOS,
                                 callback_group=self.group)
        self.create_subscription(Image, 'camera/image_raw', self._on_image, IMAGE_SUBSCRIBER_QOS,
                                 callback_group=self.group)
        self.create_subscription(FlakeArray, 'detections', self._on_detections, PIPELINE_QOS,
                                 callback_group=self.group)
        self.create_service(SetWaferFrame, 'scan/set_wafer_frame', self._on_set_wafer_frame,
                            qos_profile=SERVICE_QOS, callback_group=self.group)
        self.action_server = ActionServer(
            self, Scan, 'scan', execute_callback=self._execute,
            goal_callback=self._on_goal, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            callback_group=self.group, **ACTION_QOS)
        self.stage_state: StageState | None = None
        self.latest_image: Image | None = None
        self._frames = FrameWaiters()
        self.progress: ScanProgress | None = None
        # Set when a goal is accepted (not when it starts executing), so a second goal that
        # arrives in between is refused; cleared when the accepted goal ends.
        self._scan_slot = threading.Lock()
        self._goal_plans: dict[bytes, tuple] = {}
        self.current_objective = self.params.objective
        # Chip frames as last read from (or saved to) the registry; the registry is the truth.
        self.wafer_frames: dict[str, WaferFrame] = {}
        self.frame_owners: dict[str, str] = {}
        self.tf = TfPublisher(self, static=True)
        self.get_logger().info(
            f'scan coordinator ready: action {self.resolve_topic_name("scan")}, service '
            f'{self.resolve_service_name("scan/set_wafer_frame")}; wafer frames kept by '
            f'{self.resolve_service_name("registry/save_wafer_frame")}')

    # ------------------------------------------------------------------ wafer frame
    async def _on_set_wafer_frame(self, request, response):
        if not request.chip_id:
            response.error_code = response.ERROR_INVALID_ARGUMENT
            response.message = 'chip_id is empty'
            return response
        corners = [(p.x, p.y) for p in request.corners]
        try:
            frame = WaferFrame.from_corners(corners, request.chip_id)
        except ValueError as error:
            degenerate = 'collinear' in str(error) or 'apart' in str(error) or 'clockwise' in str(error)
            response.error_code = response.ERROR_DEGENERATE if degenerate else response.ERROR_INVALID_ARGUMENT
            response.message = str(error)
            return response
        note = ''
        try:
            saved = await self._call(
                self.save_frame_client,
                SaveWaferFrame.Request(chip_id=request.chip_id, corners=list(request.corners),
                                       measured_by=self.get_fully_qualified_name()),
                self.params.registry_timeout, 'saving the wafer frame in the registry')
        except ScanError as error:
            note = f' (kept in memory only, not in the registry: {error})'
            self.get_logger().warning(f'wafer frame of {request.chip_id} not saved: {error}')
        else:
            if not saved.success:
                known = (response.ERROR_DEGENERATE, response.ERROR_INVALID_ARGUMENT)
                response.error_code = saved.error_code if saved.error_code in known else \
                    response.ERROR_INVALID_ARGUMENT
                response.message = f'registry refused the wafer frame: {saved.error_code} {saved.message}'
                return response
        self._remember_frame(request.chip_id, frame, self.get_fully_qualified_name())
        response.success = True
        response.stage_to_wafer = frame.stage_to_wafer.as_list()
        response.rotation = frame.rotation
        response.residual = frame.residual
        response.message = (f'chip {request.chip_id}: rotation {math.degrees(frame.rotation):.3f} deg, '
                            f'corner residual {frame.residual * 1e6:.1f} um{note}')
        self.get_logger().info(response.message)
        return response

    def _remember_frame(self, chip_id: str, frame: WaferFrame, owner: str) -> None:
        """Cache the frame and broadcast stage -> wafer_<chip> on tf_static (replacing an earlier one)."""
        changed = chip_id not in self.wafer_frames or \
            self.wafer_frames[chip_id].stage_to_wafer.as_list() != frame.stage_to_wafer.as_list()
        self.wafer_frames[chip_id] = frame
        self.frame_owners[chip_id] = owner
        if changed and owner == self.get_fully_qualified_name():
            self.tf.send_static(wafer_transform(frame, chip_id, self.get_clock().now().to_msg()))

    async def _wafer_frame(self, chip_id: str) -> WaferFrame:
        """The chip's current frame from the registry (another coordinator or an earlier run may
        have measured it); the cached one when the registry cannot be reached."""
        try:
            response = await self._call(self.get_frames_client, GetWaferFrames.Request(chip_ids=[chip_id]),
                                        self.params.registry_timeout, 'reading wafer frames from the registry')
        except ScanError as error:
            response = None
            if chip_id in self.wafer_frames:
                self.get_logger().warning(f'using the cached wafer frame of {chip_id}: {error}')
        if response is not None and response.success:
            for stored in response.frames:
                if stored.chip_id == chip_id:
                    corners = [(p.x, p.y) for p in stored.corners]
                    self._remember_frame(chip_id, WaferFrame.from_corners(corners, chip_id), stored.measured_by)
        frame = self.wafer_frames.get(chip_id)
        if frame is None:
            raise ScanError(Scan.Result.ERROR_NO_WAFER_FRAME,
                            f'no wafer frame for chip {chip_id!r}: call '
                            f'{self.resolve_service_name("scan/set_wafer_frame")} with three corners first')
        owner = self.frame_owners.get(chip_id, '')
        if owner and owner != self.get_fully_qualified_name():
            raise ScanError(Scan.Result.ERROR_NO_WAFER_FRAME,
                            f'chip {chip_id!r} was last measured by {owner}, so it is mounted on that microscope; '
                            f'measure its corners here ({self.resolve_service_name("scan/set_wafer_frame")}) '
                            'after moving it')
        return frame

    # ------------------------------------------------------------------ inputs
    def _on_stage_state(self, msg: StageState) -> None:
        self.stage_state = msg

    def _on_image(self, msg: Image) -> None:
        self.latest_image = msg
        self._frames.offer(msg)

    def _on_detections(self, msg: FlakeArray) -> None:
        progress = self.progress
        if progress is None or msg.scan_id != progress.scan_id:
            return
        progress.tiles_detected.add(msg.tile_index)
        if msg.tile_index < progress.tiles_total:  # revisit captures come after the scan's tiles
            progress.flakes_found += len(msg.flakes)
            progress.last_detection = time.monotonic()

    # ------------------------------------------------------------------ async helpers
    def _with_timeout(self, future: Future, seconds: float, what: str) -> Future:
        return with_timeout(self, future, seconds, what, self.group)

    def _sleep(self, seconds: float) -> Future:
        return sleep_future(self, seconds, self.group)

    async def _call(self, client, request, timeout: float, what: str):
        if not client.service_is_ready():
            deadline = time.monotonic() + min(timeout, 10.0)
            while not client.service_is_ready():
                if time.monotonic() > deadline:
                    raise ScanError(Scan.Result.ERROR_DEVICE, f'{what}: service {client.srv_name} not available')
                await self._sleep(0.05)
        try:
            return await self._with_timeout(client.call_async(request), timeout, what)
        except TimeoutError as error:
            raise ScanError(Scan.Result.ERROR_DEVICE, str(error)) from None

    async def _move(self, x: float, y: float, z: float) -> Point:
        request = MoveStage.Request(target=Point(x=float(x), y=float(y), z=float(z)), wait=True)
        response = await self._call(self.move_client, request, self.params.move_timeout, 'stage move')
        if not response.success:
            raise ScanError(Scan.Result.ERROR_DEVICE,
                            f'stage refused move to ({x * 1e3:.3f}, {y * 1e3:.3f}) mm: '
                            f'{response.error_code} {response.message}')
        return response.position

    async def _expose(self) -> Future:
        """Expose one frame; returns once the stage may move again, with a future for the image.

        A camera with /camera/capture answers when its exposure has ended; its image may
        still be on the way (readout overlaps the next move). A free-running camera
        without it is simply waited for.
        """
        image = self._frames.expect(self.get_clock().now().nanoseconds)
        image = self._with_timeout(image, self.params.capture_timeout, 'frame capture')
        if self.capture_client.service_is_ready():
            try:
                response = await self._with_timeout(self.capture_client.call_async(Trigger.Request()),
                                                    self.params.capture_timeout, 'camera trigger')
            except TimeoutError as error:
                raise ScanError(Scan.Result.ERROR_DEVICE, f'{error}: is {self.params.camera_node} active?') from None
            if not response.success:
                raise ScanError(Scan.Result.ERROR_DEVICE, f'camera refused the capture: {response.message}')
        else:
            await self._image(image)
        return image

    async def _image(self, image: Future) -> Image:
        try:
            return await image
        except TimeoutError as error:
            raise ScanError(Scan.Result.ERROR_DEVICE, f'{error}: is {self.params.camera_node} active?') from None

    async def _capture(self) -> Image:
        """The first frame exposed after now, waited for (revisits)."""
        return await self._image(await self._expose())

    async def _autofocus(self, z_center: float, progress: ScanProgress | None = None) -> float:
        if not self.autofocus_client.server_is_ready():
            deadline = time.monotonic() + 10.0
            while not self.autofocus_client.server_is_ready():
                if time.monotonic() > deadline:
                    raise ScanError(Scan.Result.ERROR_DEVICE,
                                    f'autofocus action {self.resolve_topic_name("autofocus")} not available')
                await self._sleep(0.05)
        z_before = self._stage_xyz()[2]
        goal = Autofocus.Goal(z_center=float(z_center), use_current=False)
        timeout = self.params.autofocus_timeout
        handle = await self._with_timeout(self.autofocus_client.send_goal_async(goal), timeout, 'autofocus')
        if not handle.accepted:
            raise ScanError(Scan.Result.ERROR_DEVICE, 'autofocus goal rejected')
        outcome = await self._with_timeout(handle.get_result_async(), timeout, 'autofocus')
        if not outcome.result.success:
            raise ScanError(Scan.Result.ERROR_DEVICE, f'autofocus failed: {outcome.result.message}')
        if progress is not None:
            # Every focus frame is a z step with its settle and an exposure of the hardware; the
            # readout counts only where the search waited for it before stepping on.
            hardware = self._hardware()
            frames, overlapped = outcome.result.frames_used, outcome.result.frames_overlapped
            path = [z_before, *outcome.result.z_visited]
            progress.hardware_time += (sum(hardware.z_move_time(b - a) for a, b in zip(path, path[1:]))
                                       + frames * hardware.exposure + (frames - overlapped) * hardware.readout)
        return outcome.result.z

    async def _set_objective(self, objective: str) -> None:
        if objective == self.current_objective:
            return
        if not self.camera_params_client.service_is_ready():
            self.get_logger().warning(f'camera parameters not reachable; objective stays {self.current_objective}')
            return
        parameter = ParameterMsg(name='objective', value=ParameterValue(
            type=ParameterType.PARAMETER_STRING, string_value=objective))
        response = await self._call(self.camera_params_client, SetParameters.Request(parameters=[parameter]),
                                    10.0, 'objective switch')
        result = response.results[0]
        if not result.successful:
            raise ScanError(Scan.Result.ERROR_DEVICE, f'camera refused objective {objective}: {result.reason}')
        self.current_objective = objective

    async def _read_camera_pixel_pitch(self) -> None:
        """The camera node's pixel_pitch, the one place it is declared; the pixel size at the sample
        (ScanFrame.pixel_size, pixel_to_wafer) is pitch / magnification."""
        response = await self._call(self.camera_get_params_client,
                                    GetParameters.Request(names=['pixel_pitch']), 10.0, 'camera pixel pitch')
        if not response.values or response.values[0].type != ParameterType.PARAMETER_DOUBLE:
            raise ScanError(Scan.Result.ERROR_DEVICE,
                            f'camera node {self.params.camera_node!r} has no pixel_pitch parameter')
        self.camera_pixel_pitch = response.values[0].double_value

    def _pixel_size(self, objective: str) -> float:
        return self.camera_pixel_pitch / objective_by_name(objective).magnification

    async def _select_detector(self, backend: str) -> None:
        """Switch the detector node to the goal's backend for this scan (empty keeps the configured one)."""
        if not backend:
            return
        parameter = ParameterMsg(name='backend', value=ParameterValue(
            type=ParameterType.PARAMETER_STRING, string_value=backend))
        response = await self._call(self.detector_params_client, SetParameters.Request(parameters=[parameter]),
                                    10.0, 'detector backend switch')
        result = response.results[0]
        if not result.successful:
            raise ScanError(Scan.Result.ERROR_INVALID_ARGUMENT,
                            f'detector refused backend {backend!r}: {result.reason}')

    def _hardware(self) -> HardwareModel:
        return HardwareModel(speed=self.params.hardware_speed,
                             acceleration=self.params.hardware_acceleration,
                             settle=self.params.hardware_settle,
                             z_speed=self.params.hardware_z_speed,
                             z_acceleration=self.params.hardware_z_acceleration,
                             exposure=self.params.hardware_exposure,
                             readout=self.params.hardware_readout)

    def _stage_xyz(self) -> tuple[float, float, float]:
        if self.stage_state is None:
            return 0.0, 0.0, self.params.default_z
        p = self.stage_state.position
        return p.x, p.y, p.z

    # ------------------------------------------------------------------ the action
    async def _on_goal(self, goal) -> GoalResponse:
        """Accept a goal only when no scan holds the slot and the goal can be carried out; a refusal
        is logged with its reason (the action protocol carries none)."""
        if not self._scan_slot.acquire(blocking=False):
            self.get_logger().warning(f'{self.resolve_topic_name("scan")}: a scan is already running; goal for '
                                      f'chip {goal.chip_id!r} rejected')
            return GoalResponse.REJECT
        try:
            frame = await self._wafer_frame(goal.chip_id)
            plan = self._validate(goal, frame)
        except ScanError as error:
            self._scan_slot.release()
            self.get_logger().warning(f'{self.resolve_topic_name("scan")}: goal rejected: {error.code}: {error}')
            return GoalResponse.REJECT
        except BaseException:
            self._scan_slot.release()
            raise
        self._goal_plans[id(goal)] = plan
        return GoalResponse.ACCEPT

    def _validate(self, goal, frame: WaferFrame) -> tuple[WaferFrame, Region, str, float, str, int]:
        try:
            region = Region(goal.region_min_x, goal.region_min_y, goal.region_max_x, goal.region_max_y)
            objective = goal.objective or self.params.objective
            objective_by_name(objective)
        except ValueError as error:
            raise ScanError(Scan.Result.ERROR_INVALID_ARGUMENT, str(error)) from None
        overlap = goal.overlap if goal.overlap > 0 else self.params.overlap
        if not 0.0 <= overlap < 0.5:
            raise ScanError(Scan.Result.ERROR_INVALID_ARGUMENT, f'overlap must be in [0, 0.5), got {overlap}')
        strategy = goal.focus_strategy or self.params.focus_strategy
        if strategy not in FOCUS_STRATEGIES:
            raise ScanError(Scan.Result.ERROR_INVALID_ARGUMENT,
                            f'focus_strategy must be one of {FOCUS_STRATEGIES}, got {strategy!r}')
        points = goal.focus_points or self.params.focus_points
        if strategy == 'focus_map' and points < 3:
            raise ScanError(Scan.Result.ERROR_INVALID_ARGUMENT, 'a focus map needs at least 3 points')
        return frame, region, objective, overlap, strategy, points

    async def _execute(self, goal_handle):
        try:
            return await self._run_scan(goal_handle)
        finally:
            self._goal_plans.pop(id(goal_handle.request), None)
            self.progress = None
            self._scan_slot.release()

    async def _run_scan(self, goal_handle):
        goal = goal_handle.request
        result = Scan.Result()
        frame, region, objective, overlap, strategy, n_points = self._goal_plans[id(goal)]
        scan_id = f'{goal.chip_id}-{time.strftime("%Y%m%dT%H%M%S", time.gmtime())}'
        try:
            await self._read_camera_pixel_pitch()
            await self._select_detector(goal.detector)
        except ScanError as error:
            goal_handle.abort()
            result.error_code, result.message = error.code, str(error)
            self.get_logger().error(result.message)
            return result
        width, height = self._image_size()
        pixel_size = self._pixel_size(objective)
        tiles = plan_serpentine(region, width * pixel_size, height * pixel_size, overlap,
                                frame.wafer_to_stage)
        progress = ScanProgress(scan_id=scan_id, tiles_total=len(tiles))
        self.progress = progress
        result.scan_id = scan_id
        result.tiles_total = len(tiles)
        hardware = self._hardware()
        eta = EtaEstimator()
        self.get_logger().info(f'scan {scan_id}: {len(tiles)} tiles of {width * pixel_size * 1e3:.3f} x '
                               f'{height * pixel_size * 1e3:.3f} mm at {objective}, focus {strategy}')
        try:
            await self._set_objective(objective)
            focus = await self._focus_model(goal_handle, progress, frame, region, strategy, n_points)
            position = self._stage_xyz()
            in_flight: list[Future] = []
            for tile in tiles:
                if goal_handle.is_cancel_requested:
                    raise ScanError(Scan.Result.ERROR_CANCELED, 'scan cancelled')
                tile_started = time.monotonic()
                z = focus(tile.stage_x, tile.stage_y)
                progress.hardware_time += hardware.move_time(position[:2], (tile.stage_x, tile.stage_y))
                moved = time.monotonic()
                reached = await self._move(tile.stage_x, tile.stage_y, z)
                progress.move_time += time.monotonic() - moved
                position = (reached.x, reached.y, reached.z)
                if strategy == 'autofocus':
                    focused = time.monotonic()
                    z = await self._autofocus(z, progress)
                    progress.focus_time += time.monotonic() - focused
                    reached = await self._move(tile.stage_x, tile.stage_y, z)
                    position = (reached.x, reached.y, reached.z)
                captured = time.monotonic()
                image = await self._expose()
                progress.capture_time += time.monotonic() - captured
                progress.hardware_time += hardware.frame_time()
                progress.exposure_time += hardware.exposure
                pose = (tile, position)
                image.add_done_callback(
                    lambda done, pose=pose: self._frame_arrived(done, progress, *pose, objective, pixel_size,
                                                                frame, goal.chip_id))
                in_flight.append(image)
                eta.add(time.monotonic() - tile_started)
                goal_handle.publish_feedback(Scan.Feedback(
                    phase='scanning', tiles_done=progress.tiles_done, tiles_total=progress.tiles_total,
                    flakes_so_far=progress.flakes_found, eta=eta.eta(progress.tiles_total - progress.tiles_done),
                    stage_position=Point(x=position[0], y=position[1], z=position[2])))
            for image in in_flight:
                await self._image(image)
            await self._drain(goal_handle, progress)
            if goal.revisit:
                await self._revisit(goal_handle, progress, goal, frame)
        except ScanError as error:
            result = self._fill_result(result, progress)
            result.error_code, result.message = error.code, str(error)
            if error.code == Scan.Result.ERROR_CANCELED:
                goal_handle.canceled()
                self.get_logger().info(f'scan {scan_id} cancelled after {progress.tiles_done} tiles')
            else:
                goal_handle.abort()
                self.get_logger().error(f'scan {scan_id} aborted: {error}')
            self.progress = None
            return result
        finally:
            if self.current_objective != objective:
                try:
                    await self._set_objective(objective)
                except ScanError as error:
                    self.get_logger().warning(str(error))
        goal_handle.succeed()
        result = self._fill_result(result, progress)
        result.success = True
        result.message = (f'{progress.tiles_done} tiles, {progress.flakes_found} detections, '
                          f'{progress.flakes_revisited} revisited in {progress.elapsed:.1f} s '
                          f'(hardware {progress.hardware_time:.1f} s)')
        self.get_logger().info(f'scan {scan_id} done: {result.message}')
        self.progress = None
        return result

    def _image_size(self) -> tuple[int, int]:
        if self.latest_image is not None:
            return self.latest_image.width, self.latest_image.height
        return 1024, 1024

    def _fill_result(self, result, progress: ScanProgress):
        result.tiles_done = progress.tiles_done
        result.flakes_found = progress.flakes_found
        result.flakes_revisited = progress.flakes_revisited
        result.duration = progress.elapsed
        result.hardware_time = progress.hardware_time
        result.move_time = progress.move_time
        result.focus_time = progress.focus_time
        result.exposure_time = progress.exposure_time
        result.detection_lag = progress.detection_lag
        return result

    def _frame_arrived(self, done: Future, progress: ScanProgress, tile, position, objective: str,
                       pixel_size: float, frame: WaferFrame, chip_id: str) -> None:
        if done.exception() is None:
            self._publish_frame(done.result(), progress, tile, position, objective, pixel_size, frame, chip_id)

    def _publish_revisit_frame(self, image: Image, progress: ScanProgress, flake_id: str, number: int, position,
                               objective: str, pixel_size: float, frame: WaferFrame, chip_id: str) -> None:
        """A revisit capture on scan/frames (``revisit``, numbered after the scan's tiles)."""
        tile = PlannedTile(progress.tiles_total + number, 0, 0, 0.0, 0.0, position.x, position.y)
        msg = self._frame_message(image, progress, tile, (position.x, position.y, position.z), objective,
                                  pixel_size, frame, chip_id)
        msg.revisit, msg.revisit_flake_id = True, flake_id
        self.frame_publisher.publish(msg)
        progress.frames_published += 1

    def _publish_frame(self, image: Image, progress: ScanProgress, tile, position, objective: str,
                       pixel_size: float, frame: WaferFrame, chip_id: str) -> None:
        msg = self._frame_message(image, progress, tile, position, objective, pixel_size, frame, chip_id)
        self.frame_publisher.publish(msg)
        progress.tiles_done += 1
        progress.frames_published += 1
        progress.last_capture = time.monotonic()

    def _frame_message(self, image: Image, progress: ScanProgress, tile, position, objective: str,
                       pixel_size: float, frame: WaferFrame, chip_id: str) -> ScanFrame:
        msg = ScanFrame()
        msg.header.stamp = image.header.stamp
        msg.header.frame_id = 'camera_optical'
        msg.image = image
        msg.scan_id = progress.scan_id
        msg.chip_id = chip_id
        msg.tile_index, msg.tile_row, msg.tile_col = tile.index, tile.row, tile.col
        msg.tiles_total = progress.tiles_total
        msg.objective = objective
        msg.magnification = objective_by_name(objective).magnification
        msg.pixel_size = pixel_size
        msg.stage_position = Point(x=position[0], y=position[1], z=position[2])
        to_wafer = pixel_to_wafer(position[0], position[1], pixel_size, image.width, image.height,
                                  frame.stage_to_wafer)
        centre = to_wafer.apply((image.width - 1) / 2.0, (image.height - 1) / 2.0)
        msg.wafer_position = Point(x=centre[0], y=centre[1], z=0.0)
        msg.pixel_to_wafer = to_wafer.as_list()
        msg.focus_z = position[2]
        return msg

    async def _focus_model(self, goal_handle, progress, frame: WaferFrame, region: Region, strategy: str,
                           n_points: int):
        """A function (x, y) -> z in the stage frame for the chosen strategy."""
        current_z = self._stage_xyz()[2]
        if strategy in ('fixed', 'autofocus'):
            return lambda _x, _y: current_z
        from flake_scanner.autofocus import FocusMap

        measured = []
        z = current_z
        for wx, wy in focus_points(region, n_points):
            if goal_handle.is_cancel_requested:
                raise ScanError(Scan.Result.ERROR_CANCELED, 'scan cancelled')
            sx, sy = frame.wafer_to_stage.apply(wx, wy)
            started = time.monotonic()
            here = self._stage_xyz()
            progress.hardware_time += self._hardware().move_time(here[:2], (sx, sy))
            await self._move(sx, sy, z)
            z = await self._autofocus(z, progress)
            progress.focus_time += time.monotonic() - started
            measured.append((sx, sy, z))
            goal_handle.publish_feedback(Scan.Feedback(phase='focus_map', tiles_total=progress.tiles_total))
        focus_map = FocusMap(measured)
        self.get_logger().info(f'focus map from {len(measured)} points')
        return focus_map.predict

    async def _drain(self, goal_handle, progress: ScanProgress) -> None:
        """Wait until the detector has reported on every published frame."""
        deadline = time.monotonic() + self.params.drain_timeout
        while not progress.detection_complete():
            if goal_handle.is_cancel_requested:
                raise ScanError(Scan.Result.ERROR_CANCELED, 'scan cancelled while detection drained')
            if time.monotonic() > deadline:
                missing = progress.frames_published - len(progress.tiles_detected)
                self.get_logger().warning(f'detection did not catch up: {missing} frame(s) without results')
                return
            goal_handle.publish_feedback(Scan.Feedback(
                phase='draining', tiles_done=progress.tiles_done, tiles_total=progress.tiles_total,
                flakes_so_far=progress.flakes_found))
            await self._sleep(0.1)

    async def _revisit(self, goal_handle, progress: ScanProgress, goal, frame: WaferFrame) -> None:
        if not self.revisit_client.service_is_ready():
            self.get_logger().warning(f'registry revisit list {self.revisit_client.srv_name} not available; '
                                      'skipping revisits')
            return
        # Let the registry ingest the last detections before asking what to revisit.
        await self._sleep(0.5)
        limit = goal.revisit_max or self.params.revisit_max
        response = await self._call(self.revisit_client,
                                    GetRevisitList.Request(chip_id=goal.chip_id, scan_id=progress.scan_id,
                                                           limit=limit),
                                    10.0, 'revisit list')
        if not response.success:
            self.get_logger().warning(f'revisit list refused: {response.message}')
            return
        objective = goal.revisit_objective or self.params.revisit_objective
        await self._set_objective(objective)
        pixel_size = self._pixel_size(objective)
        for number, flake in enumerate(response.flakes[:limit]):
            if goal_handle.is_cancel_requested:
                raise ScanError(Scan.Result.ERROR_CANCELED, 'scan cancelled during revisits')
            sx, sy = frame.wafer_to_stage.apply(flake.centre.x, flake.centre.y)
            z = self._stage_xyz()[2]
            await self._move(sx, sy, z)
            z = await self._autofocus(z)
            reached = await self._move(sx, sy, z)
            image = await self._capture()
            # The detector sees the revisit too: its detections refine the flake in the registry.
            self._publish_revisit_frame(image, progress, flake.id, number, reached, objective, pixel_size, frame,
                                        goal.chip_id)
            request = AddFlakeImage.Request(flake_id=flake.id, pixels=image)
            request.image = FlakeImage(role='revisit', objective=objective, pixel_size=pixel_size,
                                       stamp=image.header.stamp)
            stored = await self._call(self.add_image_client, request, 30.0, 'store revisit image')
            if stored.success:
                progress.flakes_revisited += 1
            else:
                self.get_logger().warning(f'revisit image of {flake.id} not stored: {stored.message}')
            goal_handle.publish_feedback(Scan.Feedback(
                phase='revisit', tiles_done=progress.tiles_done, tiles_total=progress.tiles_total,
                flakes_so_far=progress.flakes_found, eta=float(len(response.flakes) - number - 1),
                stage_position=reached))
        # Until the detector has reported on every revisit capture, the registry does not know them.
        await self._drain(goal_handle, progress)


def main(args=None):
    run_node(ScanCoordinator, args=args)


if __name__ == '__main__':
    main()

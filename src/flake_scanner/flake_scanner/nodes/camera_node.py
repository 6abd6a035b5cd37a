"""Lifecycle node ``camera_node``: microscope camera frames on ``/camera/image_raw``.

Backends: ``sim`` (the simulated microscope, rendering where ``/stage/state`` says the
stage is), ``opencv`` (cv2.VideoCapture device index or URL), ``folder`` (images from
a directory, looping). Frames are bgr8 in frame ``camera_optical`` with a matching
``/camera/camera_info``; they are grabbed and published by a worker thread, free
running at ``rate`` and on demand through ``/camera/capture`` (std_srvs/Trigger),
which answers once a frame exposed after the request has been published. The simulated
sensor latches the stage pose at the trigger and answers when the exposure has ended, so
its readout and transfer overlap the next stage move as a frame-transfer camera's would.
"""

from __future__ import annotations

import threading
import time

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.task import Future
from sensor_msgs.msg import CameraInfo, Image
from std_srvs.srv import Trigger

from flake_core.node_tools import (
    ERROR,
    IMAGE_PUBLISHER_QOS,
    OK,
    SERVICE_QOS,
    STATE_QOS,
    declare_parameters,
    diagnostic_status,
    diagnostics_publisher,
    publish_diagnostics,
    run_node,
    sleep_future,
    wake_executor,
)
from flake_core.objectives import objective_by_name
from flake_core.ros_image import numpy_to_image
from flake_msgs.msg import StageState
from flake_scanner.camera_sources import CameraError, FolderSource, OpenCVSource, SimulatedSource, StagePose
from flake_scanner.nodes.tf_publishing import TfPublisher, optical_transform
from flake_scanner.parameters import CameraNodeParameters

FRAME_ID = 'camera_optical'

class CameraNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__('camera_node', **kwargs)
        self.params = declare_parameters(self, CameraNodeParameters, on_change=self._on_params)
        self.group = ReentrantCallbackGroup()
        self.source = None
        self.active = False
        self.frames = 0
        self.failures = 0
        self.last_error = ''
        self._stage: list[StageState] = []  # the last two states, for the velocity
        self._stage_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._waiters: list[Future] = []
        self._exposed: list[tuple[StagePose, object]] = []  # (pose, stamp) of triggered sim frames
        self._waiters_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.image_publisher = None
        self.info_publisher = None
        self.tf_static: TfPublisher | None = None
        self.diagnostics = diagnostics_publisher(self)
        self.create_subscription(StageState, 'stage/state', self._on_stage_state, STATE_QOS,
                                 callback_group=self.group)
        self.create_service(Trigger, 'camera/capture', self._on_capture, qos_profile=SERVICE_QOS,
                            callback_group=self.group)
        self.context.on_shutdown(self._on_context_shutdown)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state) -> TransitionCallbackReturn:
        p = self.params
        try:
            if p.backend == 'sim':
                self.source = SimulatedSource(p.width, p.height, p.objective, p.exposure, p.gain,
                                              p.pixel_pitch, p.sim_seed, p.sim_oxide_nm,
                                              p.motion_blur)
            elif p.backend == 'opencv':
                self.source = OpenCVSource(p.device, p.width, p.height, p.exposure, p.gain)
            else:
                self.source = FolderSource(p.folder)
        except (CameraError, ValueError) as error:
            self.get_logger().error(f'cannot configure the camera: {error}')
            return TransitionCallbackReturn.FAILURE
        # Reliable publisher (REP 2003); the scanner's subscribers are reliable too (docs/system.md).
        self.image_publisher = self.create_lifecycle_publisher(Image, 'camera/image_raw', IMAGE_PUBLISHER_QOS)
        self.info_publisher = self.create_lifecycle_publisher(CameraInfo, 'camera/camera_info',
                                                              IMAGE_PUBLISHER_QOS)
        if self.tf_static is None:
            self.tf_static = TfPublisher(self, static=True)
            self.tf_static.send_static(optical_transform(self.get_clock().now().to_msg()))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name='camera-grab', daemon=True)
        self._thread.start()
        self.get_logger().info(f'camera configured: backend {p.backend}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        result = super().on_activate(state)
        self.active = True
        self._wake.set()
        return result

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self.active = False
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self.close()
        for publisher in (self.image_publisher, self.info_publisher):
            if publisher is not None:
                self.destroy_lifecycle_publisher(publisher)
        self.image_publisher = self.info_publisher = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self.active = False
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def _on_context_shutdown(self) -> None:
        # Ctrl-C shuts the context down before the node is closed: stop grabbing and publishing first.
        self.active = False
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self.source is not None:
            self.source.close()
            self.source = None
        self._fail_waiters('camera shut down')

    def _on_params(self, changes: dict) -> None:
        if self.source is not None:
            try:
                self.source.configure(**changes)
            except ValueError as error:
                self.get_logger().error(f'camera settings not applied: {error}')
        if 'objective' in changes:
            self.get_logger().info(f'objective now {changes["objective"]}')
        self._wake.set()

    # ------------------------------------------------------------------ inputs
    def _on_stage_state(self, msg: StageState) -> None:
        with self._stage_lock:
            self._stage = [*self._stage[-1:], msg]

    def pose(self) -> StagePose:
        """The stage pose to expose at, with the velocity when the stage is moving."""
        with self._stage_lock:
            states = list(self._stage)
        if not states:
            if self.params.backend == 'sim':
                self.get_logger().warning('no /stage/state yet: rendering at the stage origin',
                                          throttle_duration_sec=10.0)
            return StagePose()
        last = states[-1]
        p = last.position
        vx = vy = 0.0
        if last.moving and len(states) == 2:
            previous = states[0]
            dt = ((last.header.stamp.sec - previous.header.stamp.sec)
                  + (last.header.stamp.nanosec - previous.header.stamp.nanosec) * 1e-9)
            if dt > 0:
                vx = (p.x - previous.position.x) / dt
                vy = (p.y - previous.position.y) / dt
        return StagePose(p.x, p.y, p.z, vx, vy)

    async def _on_capture(self, request, response):
        if not self.active:
            response.success, response.message = False, 'camera_node is not active'
            return response
        if isinstance(self.source, SimulatedSource):
            stamp = self.get_clock().now().to_msg()
            with self._waiters_lock:
                self._exposed.append((self.pose(), stamp))
            self._wake.set()
            await sleep_future(self, self.params.exposure, self.group)
            response.success = True
            response.message = f'exposed, stamp {stamp.sec}.{stamp.nanosec:09d}; frame follows'
            return response
        future = Future()
        with self._waiters_lock:
            self._waiters.append(future)
        self._wake.set()
        try:
            stamp = await future
        except CameraError as error:
            response.success, response.message = False, str(error)
            return response
        response.success = True
        response.message = f'frame published, stamp {stamp.sec}.{stamp.nanosec:09d}'
        return response

    def _fail_waiters(self, reason: str) -> None:
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_exception(CameraError(reason))
        if waiters:
            wake_executor(self)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        next_frame = time.monotonic()
        last_diagnostics = 0.0
        while not self._stop.is_set():
            rate = self.params.rate
            timeout = max(0.0, next_frame - time.monotonic()) if rate > 0 else 0.5
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                break
            now = time.monotonic()
            with self._waiters_lock:
                waiters, self._waiters = self._waiters, []
                exposed, self._exposed = self._exposed, []
            for pose, stamp in exposed:
                if self.active:
                    self._grab_and_publish([], pose, stamp)
            due = rate > 0 and now >= next_frame
            if self.active and (waiters or due):
                self._grab_and_publish(waiters)
                if rate > 0:
                    next_frame = max(next_frame + 1.0 / rate, now) if due else next_frame
            elif waiters:
                with self._waiters_lock:
                    self._waiters = waiters + self._waiters
            if now - last_diagnostics >= self.params.diagnostics_period and self.context.ok():
                self._publish_diagnostics()
                last_diagnostics = now

    def _grab_and_publish(self, waiters: list[Future], pose: StagePose | None = None, stamp=None) -> None:
        if pose is None:
            stamp = self.get_clock().now().to_msg()  # exposure starts now, at the stage pose known now
            pose = self.pose()
        try:
            frame = self.source.grab(pose)
            msg = numpy_to_image(frame, 'bgr8')
            msg.header.stamp = stamp
            msg.header.frame_id = FRAME_ID
            info = self._camera_info(msg.width, msg.height)
            info.header = msg.header
            self.image_publisher.publish(msg)
            self.info_publisher.publish(info)
        except Exception as error:  # noqa: BLE001 - a bad frame must not end the grab loop
            if not self.context.ok():
                return  # shutting down: the publishers are gone
            self.failures += 1
            self.last_error = str(error)
            self.get_logger().error(f'frame not published: {error}', throttle_duration_sec=5.0)
            for future in waiters:
                future.set_exception(CameraError(str(error)))
            wake_executor(self)
            return
        self.frames += 1
        self.last_error = ''
        for future in waiters:
            future.set_result(stamp)
        if waiters:
            wake_executor(self)

    def pixel_size(self) -> float:
        return self.params.pixel_pitch / objective_by_name(self.params.objective).magnification

    def _camera_info(self, width: int, height: int) -> CameraInfo:
        """Pinhole model that reproduces the pixel size at the focal plane (an objective is near
        telecentric; f [px] = working distance / pixel size keeps 1 px = pixel_size there)."""
        objective = objective_by_name(self.params.objective)
        focal_px = objective.working_distance_m / self.pixel_size()
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        info = CameraInfo(width=width, height=height, distortion_model='plumb_bob')
        info.d = [0.0] * 5
        info.k = [focal_px, 0.0, cx, 0.0, focal_px, cy, 0.0, 0.0, 1.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [focal_px, 0.0, cx, 0.0, 0.0, focal_px, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
        return info

    def _publish_diagnostics(self) -> None:
        p = self.params
        hardware = {'sim': 'simulated microscope', 'opencv': f'opencv:{p.device}',
                    'folder': f'folder:{p.folder}'}[p.backend]
        level, message = (ERROR, self.last_error) if self.last_error else (OK, 'ok')
        values = {'backend': p.backend, 'frames': self.frames, 'failures': self.failures,
                  'objective': p.objective, 'pixel_size_m': f'{self.pixel_size():.4g}',
                  'rate_hz': p.rate, 'active': self.active}
        publish_diagnostics(self, self.diagnostics, [diagnostic_status(
            f'{self.get_name()}: camera', hardware, level, message, values)])


def main(args=None) -> None:
    run_node(CameraNode, args=args)


if __name__ == '__main__':
    main()

"""Lifecycle node ``stage_node``: the XYZ stage over a serial line (ASI MS-2000 protocol).

- configure: open the serial port (or start an in-process emulator on a pty when
  ``emulate`` is true), set the speed;
- activate: publish ``/stage/state`` (flake_msgs/StageState, metres, transient local so
  a late subscriber gets the last state at once) at ``poll_rate``; ``target`` is the
  target of the last move sent, ``fault`` is set while the position is not confirmed;
- service ``/stage/move`` (flake_msgs/srv/MoveStage, deep request queue for bursts):
  absolute/relative moves and homing; serial I/O runs in a worker thread and the async
  callback awaits it, so a waiting move never blocks the executor; every answer, refusals
  included, carries the last measured position;
- tf: ``stage -> camera`` at the stage position with every state (nodes/tf_publishing.py);
- ``/diagnostics``: port, position, retries, lost replies, resyncs, reconnects, faults.

All logic lives in flake_scanner.stage; this module converts messages and wires callbacks.
"""

from __future__ import annotations

import math
import queue
import threading
import time

from geometry_msgs.msg import Point
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.task import Future

from flake_core.node_tools import (
    ERROR,
    OK,
    SERVICE_QOS,
    STATE_QOS,
    WARN,
    declare_parameters,
    diagnostic_status,
    diagnostics_publisher,
    publish_diagnostics,
    run_node,
    wake_executor,
)
from flake_msgs.msg import StageState
from flake_msgs.srv import MoveStage
from flake_scanner.nodes.tf_publishing import TfPublisher, camera_transform
from flake_scanner.parameters import StageNodeParameters
from flake_scanner.stage.driver import (
    SpeedLimits,
    StageDriver,
    StageError,
    StageLimitError,
    StageNotHomedError,
    StageSpeedError,
    TravelLimits,
)
from flake_scanner.stage.emulator import EmulatorConfig, StageEmulator


class StageNode(LifecycleNode):
    def __init__(self, **kwargs):
        super().__init__('stage_node', **kwargs)
        self.params = declare_parameters(self, StageNodeParameters, on_change=self._on_params)
        self.group = ReentrantCallbackGroup()
        self.driver: StageDriver | None = None
        self.emulator: StageEmulator | None = None
        self.active = False
        self.fault_message = ''
        # Deep enough for a robot's burst of calls (each waits its turn on the one serial line).
        self._jobs: queue.Queue = queue.Queue(maxsize=256)
        self._worker: threading.Thread | None = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._position = (math.nan, math.nan, math.nan)
        self._moving = False
        self.state_publisher = None
        self.tf_broadcaster = None
        self.diagnostics = diagnostics_publisher(self)
        self.create_service(MoveStage, 'stage/move', self._on_move, qos_profile=SERVICE_QOS,
                            callback_group=self.group)
        self.context.on_shutdown(self._on_context_shutdown)

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state) -> TransitionCallbackReturn:
        p = self.params
        try:
            port = p.port
            if p.emulate:
                travel = p.limits
                config = EmulatorConfig(
                    speed_xy=p.speed, speed_z=p.z_speed, settle_time=p.emulator_settle_time,
                    time_scale=p.emulator_time_scale,
                    limits={'X': tuple(travel[0:2]), 'Y': tuple(travel[2:4]), 'Z': tuple(travel[4:6])})
                self.emulator = StageEmulator(config)
                port = self.emulator.start()
                self.get_logger().info(f'stage emulator serving on {port}')
            elif not port:
                raise StageError('parameter port is empty: set it to the controller\'s serial device '
                                 '(e.g. /dev/ttyUSB0) or set emulate:=true')
            limits = p.limits
            speed_limits = SpeedLimits(xy=(1e-6, p.max_speed), z=(1e-7, p.max_z_speed))
            speed_limits.check(p.speed, p.z_speed)
            self.driver = StageDriver(
                port, baudrate=p.baudrate, timeout=p.timeout, retries=p.retries,
                reconnect_attempts=p.reconnect_attempts, reconnect_delay=p.reconnect_delay,
                limits=TravelLimits(tuple(limits[0:2]), tuple(limits[2:4]), tuple(limits[4:6])),
                require_homing=p.require_homing, tolerance=p.position_tolerance, speed_limits=speed_limits)
            self.driver.open()
            self.driver.set_speed(p.speed, p.z_speed)
            if p.home_on_configure:
                self.driver.home(timeout=p.move_timeout)
            self._position = self.driver.where()
        except (StageError, ValueError) as error:
            self.get_logger().error(f'cannot configure the stage: {error}')
            self._close_devices()
            return TransitionCallbackReturn.FAILURE
        self.state_publisher = self.create_lifecycle_publisher(StageState, 'stage/state', STATE_QOS)
        self.tf_broadcaster = TfPublisher(self, dynamic=True)
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name='stage-io', daemon=True)
        self._poller = threading.Thread(target=self._poll, name='stage-poll', daemon=True)
        self._worker.start()
        self._poller.start()
        self.get_logger().info(f'stage configured on {self.driver.port} at {p.baudrate} Bd')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        self.active = True
        return super().on_activate(state)

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self.active = False
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self._shutdown_threads()
        self._close_devices()
        if self.state_publisher is not None:
            self.destroy_lifecycle_publisher(self.state_publisher)
            self.state_publisher = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self.active = False
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        self.active = False
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        self._shutdown_threads()
        self._close_devices()

    def _on_context_shutdown(self) -> None:
        # Ctrl-C shuts the context down before the node is closed: stop publishing first.
        self.active = False
        self._stop.set()

    def _shutdown_threads(self) -> None:
        self._stop.set()
        for thread in (self._worker, self._poller):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5.0)
        self._worker = self._poller = None
        while not self._jobs.empty():
            _, future = self._jobs.get_nowait()
            if not future.done():
                future.set_exception(StageError('stage node shut down'))

    def _close_devices(self) -> None:
        if self.driver is not None:
            self.driver.close()
            self.driver = None
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None

    def _on_params(self, changes: dict) -> None:
        driver = self.driver
        if driver is None:
            return
        for name in ('timeout', 'retries', 'reconnect_attempts', 'reconnect_delay'):
            if name in changes:
                setattr(driver, name, changes[name])
        if 'position_tolerance' in changes:
            driver.tolerance = changes['position_tolerance']
        if 'speed' in changes or 'z_speed' in changes:
            future = self._submit(lambda d: d.set_speed(self.params.speed, self.params.z_speed))
            future.add_done_callback(lambda f: f.exception() and self.get_logger().error(
                f'speed not changed: {f.exception()}'))

    # ------------------------------------------------------------------ worker threads
    def _submit(self, job) -> Future:
        """Run ``job(driver)`` on the serial worker; the returned future completes there."""
        future = Future()
        try:
            self._jobs.put_nowait((job, future))
        except queue.Full:
            future.set_exception(StageError('stage command queue is full; the controller is not keeping up'))
        return future

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job, future = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            driver = self.driver
            try:
                if driver is None:
                    raise StageError('stage is not configured')
                result = job(driver)
            except Exception as error:  # noqa: BLE001 - every failure goes back to the caller
                future.set_exception(error)
            else:
                future.set_result(result)
            wake_executor(self)

    def _poll(self) -> None:
        last_diagnostics = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            driver = self.driver
            if driver is None:
                break
            try:
                position = driver.where()
                moving = driver.is_busy()
                driver.observe(position, moving)
                with self._state_lock:
                    self._position, self._moving = position, moving
                self.fault_message = ''
            except StageError as error:
                self.fault_message = str(error)
                if self.context.ok():
                    self.get_logger().error(f'stage poll failed: {error}', throttle_duration_sec=5.0)
            if self._stop.is_set() or not self.context.ok():
                break
            try:
                self.publish_state()
                if started - last_diagnostics >= self.params.diagnostics_period:
                    self._publish_diagnostics()
                    last_diagnostics = started
            except Exception as error:  # noqa: BLE001 - the poll loop must outlive one bad message
                if not self.context.ok():
                    break  # shutting down: the publishers are gone
                self.get_logger().error(f'stage state not published: {error}', throttle_duration_sec=5.0)
            self._stop.wait(max(0.0, 1.0 / self.params.poll_rate - (time.monotonic() - started)))

    def publish_state(self) -> None:
        driver = self.driver
        if not self.active or driver is None or self.state_publisher is None:
            return
        with self._state_lock:
            position, moving = self._position, self._moving
        msg = StageState()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = 'stage'
        msg.position = Point(x=position[0], y=position[1], z=position[2])
        target = driver.target or position
        msg.target = Point(x=float(target[0]), y=float(target[1]), z=float(target[2]))
        msg.moving = bool(moving)
        msg.homed = driver.homed
        fault = '; '.join(m for m in (self.fault_message, driver.fault) if m)
        msg.fault = bool(fault)
        msg.fault_message = fault
        msg.retries = driver.counters.retries
        msg.reconnects = driver.counters.reconnects
        self.state_publisher.publish(msg)
        if self.tf_broadcaster is not None and all(math.isfinite(v) for v in position):
            self.tf_broadcaster.send(camera_transform(position, msg.header.stamp))

    def _publish_diagnostics(self) -> None:
        driver = self.driver
        if driver is None:
            return
        counters = driver.counters.as_dict()
        fault = '; '.join(m for m in (self.fault_message, driver.fault) if m)
        if fault:
            level, message = ERROR, fault
        elif counters['retries'] or counters['reconnects']:
            level, message = WARN, 'recovered from serial errors'
        else:
            level, message = OK, 'ok'
        with self._state_lock:
            position = self._position
        values = {'port': driver.port, 'baudrate': driver.baudrate, 'homed': driver.homed,
                  'position_m': ' '.join(f'{v:.7f}' for v in position), **counters}
        if self.emulator is not None:
            values['emulated'] = True
        publish_diagnostics(self, self.diagnostics, [
            diagnostic_status(f'{self.get_name()}: stage controller', driver.port, level,
                              message, values)])

    # ------------------------------------------------------------------ service
    async def _on_move(self, request: MoveStage.Request, response: MoveStage.Response):
        try:
            await self._move(request, response)
        finally:
            with self._state_lock:
                position = self._position
            response.position = Point(x=float(position[0]), y=float(position[1]), z=float(position[2]))
        return response

    async def _move(self, request: MoveStage.Request, response: MoveStage.Response) -> None:
        if not self.active or self.driver is None:
            response.error_code = MoveStage.Response.ERROR_INACTIVE
            response.message = 'stage_node is not active'
            return
        target = (request.target.x, request.target.y, request.target.z)
        if not all(math.isfinite(v) for v in (*target, request.speed)) or request.speed < 0:
            response.error_code = MoveStage.Response.ERROR_INVALID_ARGUMENT
            response.message = f'target and speed must be finite (speed >= 0), got {target}, {request.speed}'
            return
        if request.speed > 0:
            try:
                self.driver.speed_limits.check(request.speed, None)
            except StageSpeedError as error:
                response.error_code, response.message = MoveStage.Response.ERROR_INVALID_ARGUMENT, str(error)
                return
        timeout = self.params.move_timeout

        def move(driver: StageDriver):
            if request.speed > 0:
                driver.set_speed(request.speed)
            try:
                if request.home:
                    driver.home(wait=request.wait, timeout=timeout)
                elif request.relative:
                    driver.move_by(*target, wait=request.wait, timeout=timeout)
                else:
                    driver.move_to(*target, wait=request.wait, timeout=timeout)
            finally:
                if request.speed > 0:
                    driver.set_speed(self.params.speed, self.params.z_speed)
            position = driver.where()
            moving = driver.is_busy()
            with self._state_lock:
                self._position, self._moving = position, moving
            # Publish before answering, so a frame requested after the answer sees this pose.
            self.publish_state()
            return position

        try:
            await self._submit(move)
        except StageLimitError as error:
            response.error_code, response.message = MoveStage.Response.ERROR_OUT_OF_LIMITS, str(error)
        except StageNotHomedError as error:
            response.error_code, response.message = MoveStage.Response.ERROR_NOT_HOMED, str(error)
        except StageSpeedError as error:
            response.error_code, response.message = MoveStage.Response.ERROR_INVALID_ARGUMENT, str(error)
        except (StageError, ValueError) as error:
            response.error_code, response.message = MoveStage.Response.ERROR_DEVICE, str(error)
            self.get_logger().error(f'stage move failed: {error}')
            self.publish_state()  # the fault and the true target, now
        else:
            response.success = True
            response.message = 'homed' if request.home else 'moved'


def main(args=None) -> None:
    run_node(StageNode, args=args)


if __name__ == '__main__':
    main()

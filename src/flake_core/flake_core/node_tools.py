"""Shared plumbing for every node of the system: declared parameters with
descriptors and validation, QoS profiles, diagnostics and the ``main`` runner.

Nodes import from here rather than re-implementing these pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
import gc
import math
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.task import Future

# Images: publishers reliable (REP 2003), subscribers best effort (sensor data).
IMAGE_PUBLISHER_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                                 reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.VOLATILE)
SENSOR_SUBSCRIBER_QOS = qos_profile_sensor_data
# Data that must not be lost between pipeline stages (frames to the detector,
# detections to the registry): reliable with a deep queue.
PIPELINE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
# Latched state such as the wafer frame or a revisit list.
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


def image_publisher(node, msg_type, topic: str, qos: QoSProfile = IMAGE_PUBLISHER_QOS):
    """An image publisher whose QoS a user may override with parameters."""
    return node.create_publisher(msg_type, topic, qos,
                                 qos_overriding_options=QoSOverridingOptions.with_default_policies())


@dataclass(frozen=True)
class Param:
    """A node parameter: default, description, and the constraints it is validated against."""

    name: str
    default: Any
    description: str
    minimum: float | int | None = None
    maximum: float | int | None = None
    choices: Sequence[Any] | None = None
    read_only: bool = False
    validator: Callable[[Any], str | None] | None = None  # returns an error text or None

    def check(self, value: Any) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f'{self.name} must be finite, got {value}'
        if self.minimum is not None and value < self.minimum:
            return f'{self.name} must be >= {self.minimum}, got {value}'
        if self.maximum is not None and value > self.maximum:
            return f'{self.name} must be <= {self.maximum}, got {value}'
        if self.choices is not None and value not in self.choices:
            return f'{self.name} must be one of {list(self.choices)}, got {value!r}'
        if self.validator is not None:
            return self.validator(value)
        return None

    def descriptor(self) -> ParameterDescriptor:
        constraints = ''
        if self.choices is not None:
            constraints = 'one of: ' + ', '.join(str(c) for c in self.choices)
        descriptor = ParameterDescriptor(description=self.description, read_only=self.read_only,
                                         additional_constraints=constraints)
        has_range = self.minimum is not None and self.maximum is not None
        if has_range and isinstance(self.default, bool):
            has_range = False
        if has_range and isinstance(self.default, int):
            descriptor.integer_range = [IntegerRange(from_value=int(self.minimum),
                                                     to_value=int(self.maximum), step=0)]
        elif has_range and isinstance(self.default, float):
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(self.minimum), to_value=float(self.maximum), step=0.0)]
        return descriptor


def declare_parameters(node, params: Iterable[Param],
                       on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Declare ``params`` on ``node``, validate every later change, return the current values.

    Invalid values given at start-up (from a YAML file or overrides) raise ValueError
    so a misconfigured node fails loudly; invalid runtime changes are refused with a
    reason. ``on_change`` receives the accepted changes as a dict.
    """
    params = list(params)
    by_name = {p.name: p for p in params}
    values: dict[str, Any] = {}
    for p in params:
        value = node.declare_parameter(p.name, p.default, p.descriptor()).value
        error = p.check(value)
        if error is not None:
            raise ValueError(f'invalid parameter: {error}')
        values[p.name] = value

    def validate(changes) -> SetParametersResult:
        accepted = {}
        for change in changes:
            spec = by_name.get(change.name)
            if spec is None:
                continue
            error = spec.check(change.value)
            if error is not None:
                return SetParametersResult(successful=False, reason=error)
            accepted[change.name] = change.value
        values.update(accepted)
        if on_change is not None and accepted:
            on_change(accepted)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(validate)
    return values


def diagnostic_status(name: str, hardware_id: str, level: int, message: str,
                      values: dict[str, Any] | None = None) -> DiagnosticStatus:
    """A DiagnosticStatus with key/values rendered as strings."""
    return DiagnosticStatus(
        level=level if isinstance(level, bytes) else bytes([level]),
        name=name, hardware_id=hardware_id, message=message,
        values=[KeyValue(key=str(k), value=str(v)) for k, v in (values or {}).items()])


def diagnostics_publisher(node):
    return node.create_publisher(DiagnosticArray, '/diagnostics', 10)


def publish_diagnostics(node, publisher, statuses: Sequence[DiagnosticStatus]) -> None:
    array = DiagnosticArray()
    array.header.stamp = node.get_clock().now().to_msg()
    array.status = list(statuses)
    publisher.publish(array)


OK = DiagnosticStatus.OK
WARN = DiagnosticStatus.WARN
ERROR = DiagnosticStatus.ERROR


def freeze_long_lived_objects(node, period: float):
    """Hide every object alive now, and again every ``period`` s, from the cyclic garbage collector.

    A full collection walks every tracked object; with rclpy, a database layer and a message
    cache alive that is a 15-20 ms pause, landing on whichever service call set it off. Frozen
    objects are still freed by reference counting; only reference cycles among them would stay
    (messages and records form none). Returns the timer, or None when ``period`` is 0.
    """
    gc.freeze()
    return node.create_timer(period, gc.freeze) if period > 0 else None


def sleep_future(node, seconds: float, callback_group=None) -> Future:
    """A future that completes after ``seconds``: ``await`` it in a coroutine callback
    instead of sleeping, so the executor keeps serving other callbacks."""
    future = Future()

    def fire():
        timer.cancel()
        if not future.done():
            future.set_result(None)

    timer = node.create_timer(seconds, fire, callback_group=callback_group)
    future.add_done_callback(lambda _f: node.destroy_timer(timer))
    return future


def with_timeout(node, future: Future, seconds: float, what: str, callback_group=None) -> Future:
    """A future with ``future``'s outcome, or a TimeoutError naming ``what`` after ``seconds``."""
    outer = Future()

    def forward(inner):
        if outer.done():
            return
        exception = inner.exception()
        if exception is not None:
            outer.set_exception(exception)
        else:
            outer.set_result(inner.result())

    def expire():
        timer.cancel()
        if not outer.done():
            future.cancel()
            outer.set_exception(TimeoutError(f'{what} did not finish within {seconds:.1f} s'))

    timer = node.create_timer(seconds, expire, callback_group=callback_group)
    outer.add_done_callback(lambda _f: node.destroy_timer(timer))
    future.add_done_callback(forward)
    return outer


class FrameWaiters:
    """Futures for "the first image stamped after time t", resolved as images arrive.

    Call ``offer`` from the image subscription (the executor thread) and ``expect``
    from coroutines; stamps and times are nanoseconds of the same clock.
    """

    def __init__(self):
        self._waiting: list[tuple[int, Future]] = []

    def expect(self, after_ns: int) -> Future:
        future = Future()
        self._waiting.append((after_ns, future))
        return future

    def offer(self, msg) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        waiting = []
        for after, future in self._waiting:
            if future.done():
                continue
            if stamp > after:
                future.set_result(msg)
            else:
                waiting.append((after, future))
        self._waiting = waiting


def wake_executor(node) -> None:
    """Make the node's executor resume coroutines awaiting a future completed in another thread.

    rclpy resumes a waiting coroutine only when its executor wakes up; a future set from
    a worker thread does not wake it by itself, so a spinning executor would sleep on.
    """
    executor = node.executor
    if executor is not None:
        executor.wake()


def run_node(make_node: Callable[[], Any], args=None, executor=None) -> None:
    """Init rclpy, build the node, spin until Ctrl-C or SIGTERM, then shut down cleanly.

    rclpy's own handlers catch both signals and wake the executor, which then raises
    ExternalShutdownException; a Python-level handler would wait for the next callback.
    """
    rclpy.init(args=args)
    node = None
    executor = executor or SingleThreadedExecutor()
    try:
        node = make_node()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            close = getattr(node, 'close', None)
            if close is not None:
                close()
            node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()

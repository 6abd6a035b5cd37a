"""Shared plumbing for every node of the system: parameters declared from their schema
(flake_core.parameters), QoS profiles, diagnostics and the ``main`` runner.

Nodes import from here rather than re-implementing these pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import gc
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.task import Future

from flake_core.parameters import Param, Schema, schema_params, updated, view

# Images: publishers reliable (REP 2003). Nodes that must see every frame they asked for
# (scan coordinator, autofocus) subscribe with the same reliable profile, so the profiles
# match and a 3 MB frame is repaired instead of dropped; viewers may subscribe best effort
# (SENSOR_SUBSCRIBER_QOS), which a reliable publisher also serves.
IMAGE_PUBLISHER_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                                 reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.VOLATILE)
IMAGE_SUBSCRIBER_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2,
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
# State topics (/stage/state): the latest message waits for late subscribers. Subscribers
# use it too, or a volatile subscription would not be handed the stored message.
STATE_QOS = LATCHED_QOS
# Services that robots and coordinators call in bursts: a deep request and reply history,
# so no call is dropped from a full queue. Servers and clients both use it: many replies
# may be in flight to one process, and with the rmw default depth of 10 a busy registry
# client lost its own reply and waited forever (one call in ~80 with 8 robots on a loaded host).
SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=200,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
# The same for the goal, result and cancel services of an action (server and client):
# ActionServer(..., **ACTION_QOS), ActionClient(..., **ACTION_QOS).
ACTION_QOS = {'goal_service_qos_profile': SERVICE_QOS, 'result_service_qos_profile': SERVICE_QOS,
              'cancel_service_qos_profile': SERVICE_QOS}


def image_publisher(node: Any, msg_type: Any, topic: str, qos: QoSProfile = IMAGE_PUBLISHER_QOS) -> Any:
    """An image publisher whose QoS a user may override with parameters."""
    return node.create_publisher(msg_type, topic, qos,
                                 qos_overriding_options=QoSOverridingOptions.with_default_policies())


def descriptor(spec: Param) -> ParameterDescriptor:
    """The ROS descriptor of a schema parameter: description, range, choices, read-only."""
    constraints = ''
    if spec.choices is not None:
        constraints = 'one of: ' + ', '.join(str(c) for c in spec.choices)
    result = ParameterDescriptor(description=spec.description, read_only=spec.read_only,
                                 additional_constraints=constraints)
    low, high = spec.minimum, spec.maximum
    if low is None or high is None or isinstance(spec.default, bool):
        return result
    if isinstance(spec.default, int):
        result.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=0)]
    elif isinstance(spec.default, float):
        result.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]
    return result


def declare_parameters(node: Any, schema: type[Schema],
                       on_change: Callable[[dict[str, Any]], None] | None = None) -> Schema:
    """Declare the parameters of ``schema`` (a flake_core.parameters schema) on ``node`` and return
    their frozen view; every accepted change later replaces ``node.params`` with an updated view.

    Invalid values given at start-up (from a YAML file or overrides) raise ValueError so a
    misconfigured node fails loudly; invalid runtime changes are refused with a reason.
    ``on_change`` receives the accepted changes as a dict, after ``node.params`` was updated.
    """
    specs = schema_params(schema)
    by_name = {p.name: p for p in specs}
    values: dict[str, Any] = {}
    for spec in specs:
        value = node.declare_parameter(spec.name, spec.default, descriptor(spec)).value
        error = spec.check(value)
        if error is not None:
            raise ValueError(f'invalid parameter: {error}')
        values[spec.name] = value

    def validate(changes: Sequence[Any]) -> SetParametersResult:
        accepted = {}
        for change in changes:
            spec = by_name.get(change.name)
            if spec is None:
                continue
            error = spec.check(change.value)
            if error is not None:
                return SetParametersResult(successful=False, reason=error)
            accepted[change.name] = change.value
        if accepted:
            node.params = updated(node.params, accepted)
            if on_change is not None:
                on_change(accepted)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(validate)
    return view(schema, values)


def diagnostic_status(name: str, hardware_id: str, level: int, message: str,
                      values: dict[str, Any] | None = None) -> DiagnosticStatus:
    """A DiagnosticStatus with key/values rendered as strings."""
    return DiagnosticStatus(
        level=level if isinstance(level, bytes) else bytes([level]),
        name=name, hardware_id=hardware_id, message=message,
        values=[KeyValue(key=str(k), value=str(v)) for k, v in (values or {}).items()])


def diagnostics_publisher(node: Any) -> Any:
    return node.create_publisher(DiagnosticArray, '/diagnostics', 10)


def publish_diagnostics(node: Any, publisher: Any, statuses: Sequence[DiagnosticStatus]) -> None:
    array = DiagnosticArray()
    array.header.stamp = node.get_clock().now().to_msg()
    array.status = list(statuses)
    publisher.publish(array)


OK = DiagnosticStatus.OK
WARN = DiagnosticStatus.WARN
ERROR = DiagnosticStatus.ERROR


def freeze_long_lived_objects(node: Any, period: float) -> Any:
    """Hide every object alive now, and again every ``period`` s, from the cyclic garbage collector.

    A full collection walks every tracked object; with rclpy, a database layer and a message
    cache alive that is a 15-20 ms pause, landing on whichever service call set it off. Frozen
    objects are still freed by reference counting; only reference cycles among them would stay
    (messages and records form none). Returns the timer, or None when ``period`` is 0.
    """
    gc.freeze()
    return node.create_timer(period, gc.freeze) if period > 0 else None


def sleep_future(node: Any, seconds: float, callback_group: Any = None) -> Future[None]:
    """A future that completes after ``seconds``: ``await`` it in a coroutine callback
    instead of sleeping, so the executor keeps serving other callbacks."""
    future: Future[None] = Future()

    def fire() -> None:
        timer.cancel()
        if not future.done():
            future.set_result(None)

    timer = node.create_timer(seconds, fire, callback_group=callback_group)
    future.add_done_callback(lambda _f: node.destroy_timer(timer))
    return future


def with_timeout(node: Any, future: Future[Any], seconds: float, what: str, callback_group: Any = None) -> Future[Any]:
    """A future with ``future``'s outcome, or a TimeoutError naming ``what`` after ``seconds``."""
    outer: Future[Any] = Future()

    def forward(inner: Future[Any]) -> None:
        if outer.done():
            return
        exception = inner.exception()
        if exception is not None:
            outer.set_exception(exception)
        else:
            outer.set_result(inner.result())

    def expire() -> None:
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

    def __init__(self) -> None:
        self._waiting: list[tuple[int, Future[Any]]] = []

    def expect(self, after_ns: int) -> Future[Any]:
        future: Future[Any] = Future()
        self._waiting.append((after_ns, future))
        return future

    def offer(self, msg: Any) -> None:
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


def wake_executor(node: Any) -> None:
    """Make the node's executor resume coroutines awaiting a future completed in another thread.

    rclpy resumes a waiting coroutine only when its executor wakes up; a future set from
    a worker thread does not wake it by itself, so a spinning executor would sleep on.
    """
    executor = node.executor
    if executor is not None:
        executor.wake()


def run_node(make_node: Callable[[], Any], args: list[str] | None = None,
             make_executor: Callable[[], Any] | None = None) -> None:
    """Init rclpy, build the node, spin until Ctrl-C or SIGTERM, then shut down cleanly.

    rclpy's own handlers catch both signals and wake the executor, which then raises
    ExternalShutdownException; a Python-level handler would wait for the next callback.
    """
    rclpy.init(args=args)
    node = None
    # Made after init: an executor needs a valid context for its guard condition.
    executor = make_executor() if make_executor is not None else SingleThreadedExecutor()
    try:
        node = make_node()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError:
        # A message taken while Ctrl-C tears the context down can fail to convert (rclpy's
        # shutdown race, seen under load: "Unable to convert call argument"); once the
        # context is shut down that is the end of the node, not an error of it.
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            close = getattr(node, 'close', None)
            if close is not None:
                close()
            node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()

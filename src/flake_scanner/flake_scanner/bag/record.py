"""``flake-record``: record topics of a running system into a rosbag2 (MCAP) bag.

Subscriptions take serialized bytes (``raw=True``), so recording costs one copy
per message and no (de)serialization. Callbacks only enqueue; a writer thread
owns the bag, so a slow disk never blocks the executor. The queue is bounded:
when it is full a message is dropped and counted (and logged), never buffered
without limit. Ctrl-C, SIGTERM or the end of ``duration`` close the bag cleanly.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import queue
import shutil
import signal
import sys
import threading
import time

import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args

from flake_core.node_tools import declare_parameters
from flake_core.parameters import schema_params
from flake_scanner.bag.io import (
    BAG_VERSIONS,
    GROUND_TRUTH_FILE,
    GROUND_TRUTH_TOPIC,
    STORAGES,
    STRING_TYPE,
    BagError,
    BagWriter,
    TopicQos,
)
from flake_scanner.bag.playback import parse_topics
from flake_scanner.bag.types import python_message_class, typestore
from flake_scanner.parameters import BagRecorderParameters

_STOP = object()


class BagRecorder(Node):
    """Subscribes the chosen topics as they appear in the graph and writes them to a bag."""

    def __init__(self, **node_kwargs):
        super().__init__('bag_recorder', **node_kwargs)
        try:
            self._check_options()
        except Exception:
            self.destroy_node()
            raise
        self.queue: queue.Queue = queue.Queue(maxsize=self.params.queue_size)
        self.subscriptions_by_topic: dict[str, object] = {}
        self.refused: set[str] = set()
        self.received = 0
        self.dropped = 0
        self.written = 0
        self.write_error: BaseException | None = None
        self.finished = threading.Event()
        self._closed = False
        self._writer_thread = threading.Thread(target=self._write_loop, name='bag_writer', daemon=True)
        self._writer_thread.start()
        self._discover()
        self.create_timer(self.params.discovery_period, self._discover)
        self.create_timer(5.0, self._report_progress)
        if self.params.duration > 0.0:
            self._deadline = time.monotonic() + self.params.duration
            self.create_timer(min(0.1, self.params.duration), self._check_duration)
        self.get_logger().info(f'recording to {self.output} ({self.params.storage})')

    def _check_options(self) -> None:
        self.params = declare_parameters(self, BagRecorderParameters)
        self.wanted = set(parse_topics(self.params.topics))
        self.excluded = set(parse_topics(self.params.exclude_topics))
        if not self.wanted and not self.params.all_topics:
            raise ValueError('nothing to record: give topics or set all_topics')
        output = self.params.output or time.strftime('recording_%Y%m%d_%H%M%S', time.gmtime())
        self.output = Path(output)
        ground_truth = self.params.ground_truth
        self.ground_truth = Path(ground_truth) if ground_truth else None
        if self.ground_truth is not None and not self.ground_truth.is_file():
            raise FileNotFoundError(f'ground truth file {self.ground_truth} does not exist')
        self.writer = BagWriter(self.output, storage=self.params.storage,
                                version=self.params.bag_version)

    @property
    def missing_topics(self) -> list[str]:
        """Requested topics not subscribed yet (no publisher seen so far); spin until empty before a scan."""
        return sorted(self.wanted - set(self.subscriptions_by_topic) - self.refused)

    # -- graph discovery -------------------------------------------------------------
    def _wants(self, topic: str) -> bool:
        if topic in self.wanted:
            return True
        return bool(self.params.all_topics) and topic not in self.excluded

    def _discover(self) -> None:
        for topic, types in self.get_topic_names_and_types():
            if topic in self.subscriptions_by_topic or topic in self.refused or not self._wants(topic):
                continue
            publishers = self.get_publishers_info_by_topic(topic)
            if not publishers:
                continue  # only subscribers so far: the QoS to match is not known yet
            if len(types) != 1:
                self._refuse(topic, f'it carries several types {types}')
                continue
            self._subscribe(topic, types[0], publishers)

    def _refuse(self, topic: str, reason: str) -> None:
        self.refused.add(topic)
        self.get_logger().error(f'not recording {topic}: {reason}')

    def _subscribe(self, topic: str, msgtype: str, publishers) -> None:
        if msgtype not in typestore().fielddefs:
            self._refuse(topic, f'message type {msgtype} has no definition here')
            return
        try:
            msg_class = python_message_class(msgtype)
        except LookupError as exc:
            self._refuse(topic, str(exc))
            return
        # Match what the publishers offer, as rosbag2 does: reliable only when every
        # publisher is, so a best-effort camera is still recorded.
        reliable = all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in publishers)
        latched = all(p.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in publishers)
        topic_qos = TopicQos(reliable=reliable, transient_local=latched,
                             depth=max(p.qos_profile.depth for p in publishers) or 10)
        reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
        durability = DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(topic_qos.depth, 100),
                         reliability=reliability, durability=durability)
        self._enqueue(('topic', topic, msgtype, topic_qos))
        self.subscriptions_by_topic[topic] = self.create_subscription(
            msg_class, topic, lambda data, topic=topic: self._on_message(topic, data), qos, raw=True)
        self.get_logger().info(f'recording {topic} [{msgtype}]')

    # -- message path -----------------------------------------------------------------
    def _enqueue(self, item) -> bool:
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            return False

    def _on_message(self, topic: str, data: bytes) -> None:
        self.received += 1
        stamp = self.get_clock().now().nanoseconds
        if not self._enqueue(('message', topic, stamp, data)):
            self.dropped += 1
            self.get_logger().warning(f'writer queue full: dropped {self.dropped} message(s) so far',
                                      throttle_duration_sec=2.0)

    def _write_loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if self.write_error is not None:
                continue  # keep draining so callbacks never block; the error is reported once
            try:
                if item[0] == 'topic':
                    _, topic, msgtype, topic_qos = item
                    self.writer.add_topic(topic, msgtype, topic_qos)
                else:
                    _, topic, stamp, data = item
                    self.writer.write(topic, stamp, data)
                    self.written += 1
            except Exception as exc:  # noqa: BLE001 - a disk error ends the recording, reported once
                self.write_error = exc
                self.finished.set()

    def _report_progress(self) -> None:
        self.get_logger().info(f'{self.written} message(s) written on {len(self.subscriptions_by_topic)} '
                               f'topic(s), {self.dropped} dropped')

    def _check_duration(self) -> None:
        if time.monotonic() >= self._deadline:
            self.finished.set()

    def _store_ground_truth(self) -> None:
        """The COCO ground truth as one latched String message, so a bare storage file carries it too."""
        if self.writer.has_topic(GROUND_TRUTH_TOPIC):
            return  # a live ground-truth topic was recorded already
        text = self.ground_truth.read_text()
        message = typestore().types[STRING_TYPE](data=text)
        self.writer.add_topic(GROUND_TRUTH_TOPIC, STRING_TYPE, TopicQos(transient_local=True, depth=1))
        self.writer.write(GROUND_TRUTH_TOPIC, self.get_clock().now().nanoseconds,
                          self.writer.serialize(message, STRING_TYPE))

    def close(self) -> None:
        """Stop subscribing, write what is queued, and close the bag (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for subscription in self.subscriptions_by_topic.values():
            self.destroy_subscription(subscription)
        self.queue.put(_STOP)
        self._writer_thread.join()
        if self.ground_truth is not None and self.write_error is None:
            self._store_ground_truth()
        self.writer.close()
        if self.ground_truth is not None:
            shutil.copyfile(self.ground_truth, self.output / GROUND_TRUTH_FILE)
        summary = (f'closed {self.output}: {self.written} message(s) on '
                   f'{len(self.subscriptions_by_topic)} topic(s), {self.dropped} dropped')
        self.get_logger().info(summary)
        if self.write_error is not None:
            raise BagError(f'recording to {self.output} failed: {self.write_error}')


def refuse_bad_overrides(parser: argparse.ArgumentParser, schema: type, overrides: list[Parameter],
                         options: dict[str, str]) -> None:
    """Exit with argparse's one-line error naming the option (``options``: parameter -> option)
    for every value the node's schema would refuse, before any node starts."""
    by_name = {spec.name: spec for spec in schema_params(schema)}
    for override in overrides:
        error = by_name[override.name].check(override.value)
        if error is not None:
            parser.error(f'{options.get(override.name, override.name)}: {error}')


def _parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[Parameter]]:
    parser = argparse.ArgumentParser(prog='flake-record', description=__doc__.split('\n\n')[0])
    parser.add_argument('--topics', nargs='+', default=[], help='topics to record')
    parser.add_argument('--all', action='store_true', help='record every topic')
    parser.add_argument('--exclude', nargs='+', default=None, help='topics left out with --all')
    parser.add_argument('--output', '-o', default=None, help='bag directory to create')
    parser.add_argument('--duration', type=float, default=None,
                        help='seconds to record (default: until Ctrl-C)')
    parser.add_argument('--storage', choices=STORAGES, default=None)
    parser.add_argument('--bag-version', type=int, choices=BAG_VERSIONS, default=None)
    parser.add_argument('--ground-truth', default=None, help='COCO file to store beside the messages')
    args = parser.parse_args(argv)
    overrides = []
    if args.topics:
        overrides.append(Parameter('topics', value=','.join(args.topics)))
    if args.all:
        overrides.append(Parameter('all_topics', value=True))
    for name, value in (('exclude_topics', ','.join(args.exclude) if args.exclude else None),
                        ('output', args.output), ('duration', args.duration), ('storage', args.storage),
                        ('bag_version', args.bag_version), ('ground_truth', args.ground_truth)):
        if value is not None:
            overrides.append(Parameter(name, value=value))
    refuse_bad_overrides(parser, BagRecorderParameters, overrides, {
        'topics': '--topics', 'all_topics': '--all', 'exclude_topics': '--exclude', 'output': '--output',
        'duration': '--duration', 'storage': '--storage', 'bag_version': '--bag-version',
        'ground_truth': '--ground-truth'})
    return args, overrides


def install_stop_handlers() -> threading.Event:
    """SIGINT and SIGTERM set the returned event instead of tearing the context down.

    rclpy's own handlers shut the context down at once, which races the executor
    (an RCLError from spin_once) and drops messages still queued in subscriptions;
    with an event the main loop ends, drains, and closes the bag cleanly.
    """
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def drain(executor, recorder: BagRecorder, quiet_spins: int = 4, limit_s: float = 3.0) -> None:
    """Spin until no message arrived for ``quiet_spins`` spins (or ``limit_s``): take what is still queued."""
    deadline = time.monotonic() + limit_s
    quiet, last = 0, recorder.received
    while quiet < quiet_spins and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
        quiet = quiet + 1 if recorder.received == last else 0
        last = recorder.received


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    _, overrides = _parse_args(remove_ros_args(argv)[1:])
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = install_stop_handlers()
    executor = SingleThreadedExecutor()
    recorder = None
    status = 0
    try:
        recorder = BagRecorder(parameter_overrides=overrides)
        executor.add_node(recorder)
        while rclpy.ok() and not recorder.finished.is_set() and not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
        if rclpy.ok():
            drain(executor, recorder)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileNotFoundError, FileExistsError, BagError, ParameterException) as exc:
        print(f'flake-record: {exc}', file=sys.stderr)
        status = 2
    finally:
        if recorder is not None:
            try:
                recorder.close()
            except BagError as exc:
                print(f'flake-record: {exc}', file=sys.stderr)
                status = 1
            recorder.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()
    return status


if __name__ == '__main__':
    sys.exit(main())

"""``flake-replay``: publish a bag's topics with their original timing.

Reads MCAP and sqlite3 bags (those written by ``flake-record`` and by ``ros2 bag
record``) and publishes the recorded serialized bytes as they are. A playback
thread paces the messages (``rate`` x real time, 0 = as fast as the subscribers
take them) so the executor is never blocked, and publishes ``/clock`` with the
bag time for nodes running with ``use_sim_time``.

At unlimited rate a reliable publisher could overwrite samples that a slow
subscriber has not acknowledged yet; every ``ack_window`` messages the thread
waits for the acknowledgements, so nothing is lost between replay and pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
import threading

import rclpy
from rclpy.duration import Duration
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.utilities import remove_ros_args
from rosgraph_msgs.msg import Clock
from std_srvs.srv import Trigger

from flake_core.node_tools import declare_parameters
from flake_scanner.bag.io import BagError, BagReader, UnknownTypeError
from flake_scanner.bag.playback import (
    NS_PER_S,
    PlaybackClock,
    parse_remaps,
    parse_topics,
    start_time_with_offset,
)
from flake_scanner.bag.record import install_stop_handlers, refuse_bad_overrides
from flake_scanner.bag.types import python_message_class
from flake_scanner.parameters import BagReplayerParameters


class BagReplayer(Node):
    """Publishes a bag's messages; ``finished`` is set at the end (or on a bag error)."""

    def __init__(self, **node_kwargs):
        super().__init__('bag_replayer', **node_kwargs)
        self.reader = None
        try:
            self.params = declare_parameters(self, BagReplayerParameters)
            if not self.params.bag:
                raise ValueError('no bag given (parameter "bag")')
            self.reader = BagReader(Path(self.params.bag))
            length = (self.reader.end_time - self.reader.start_time) / NS_PER_S
            if self.params.start_offset > length:
                raise BagError(f'start offset {self.params.start_offset:g} s is past the end of bag '
                               f'{self.reader.path} ({length:.3f} s long)')
            self._create_publishers()
        except Exception:
            # A refused bag leaves nothing behind: no open file, no node in the graph.
            if self.reader is not None:
                self.reader.close()
            self.destroy_node()
            raise
        replays_clock = self.params.clock_topic in {self.remaps.get(t, t) for t in self.publishers_by_topic}
        if self.params.publish_clock and replays_clock:
            # Two clocks on one topic would make sim time jump back and forth.
            self.get_logger().warning(f'the bag has {self.params.clock_topic} itself: replaying it instead '
                                      'of publishing the bag time')
        self.clock_publisher = (self.create_publisher(Clock, self.params.clock_topic, 10)
                                if self.params.publish_clock and not replays_clock else None)
        self.clock = PlaybackClock(self.params.rate)
        self.published = 0
        self.loops_done = 0
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Event()
        if not self.params.start_paused:
            self._running.set()
        self.create_service(Trigger, '~/pause', self._on_pause)
        self.create_service(Trigger, '~/resume', self._on_resume)
        self._thread = threading.Thread(target=self._run, name='bag_replay', daemon=True)
        self._thread.start()
        self.create_timer(5.0, self._report_progress)
        total = sum(self.reader.topics[t].count for t in self.publishers_by_topic)
        self.get_logger().info(f'replaying {total} message(s) on {len(self.publishers_by_topic)} topic(s) '
                               f'from {self.reader.path} at rate {self.params.rate or "unlimited"}')

    def _create_publishers(self) -> None:
        self.remaps = parse_remaps(self.params.remap)
        selected = parse_topics(self.params.topics) or sorted(self.reader.topics)
        unknown = [t for t in selected if t not in self.reader.topics]
        if unknown:
            raise BagError(f'bag {self.reader.path} has no topic(s) {unknown}; '
                           f'it has {sorted(self.reader.topics)}')
        self.publishers_by_topic: dict[str, object] = {}
        self.reliable_topics: set[str] = set()
        for topic in selected:
            info = self.reader.topics[topic]
            try:
                msg_class = python_message_class(info.msgtype)
            except LookupError as exc:
                if self.params.skip_unknown_types:
                    self.get_logger().warning(f'leaving out {topic}: {exc}')
                    continue
                raise UnknownTypeError(f'bag {self.reader.path}: cannot replay {topic}: {exc}') from exc
            # Recorded bytes of another layout would be garbage to every subscriber.
            mismatch = self.reader.definition_mismatch(topic)
            if mismatch is not None:
                if self.params.skip_unknown_types:
                    self.get_logger().warning(f'leaving out {mismatch}')
                    continue
                raise UnknownTypeError(f'bag {self.reader.path}: cannot replay {mismatch}')
            # Reliable for everything: a reliable publisher serves best-effort subscribers
            # too, and pipeline topics (frames, detections) must not lose samples.
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST,
                             depth=max(self.params.queue_depth, info.qos.depth),
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=(DurabilityPolicy.TRANSIENT_LOCAL if info.qos.transient_local
                                         else DurabilityPolicy.VOLATILE))
            self.publishers_by_topic[topic] = self.create_publisher(
                msg_class, self.remaps.get(topic, topic), qos)
            self.reliable_topics.add(topic)
        if not self.publishers_by_topic:
            raise BagError(f'bag {self.reader.path}: nothing to replay (no topic selected)')

    # -- playback thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            if not self._wait_for_subscribers():
                return
            if self._stop.wait(self.params.start_delay) or not self._wait_while_paused():
                return
            start = start_time_with_offset(self.reader.start_time, self.params.start_offset)
            while not self._stop.is_set():
                self._play_once(start)
                self.loops_done += 1
                if not self.params.loop:
                    break
        except BagError as exc:
            self.error = exc
            self.get_logger().error(str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure ends playback with a reported reason
            self.error = exc
            self.get_logger().error(f'replay stopped: {exc.__class__.__name__}: {exc}')
        finally:
            self.finished.set()

    def _wait_for_subscribers(self) -> bool:
        needed = self.params.wait_for_subscribers
        if needed == 0:
            return True
        deadline_steps = int(self.params.wait_timeout / 0.05)
        for _ in range(max(deadline_steps, 1)):
            if all(p.get_subscription_count() >= needed for p in self.publishers_by_topic.values()):
                return True
            if self._stop.wait(0.05):
                return False
        missing = [t for t, p in self.publishers_by_topic.items() if p.get_subscription_count() < needed]
        raise BagError(f'no {needed} subscriber(s) on {missing} after {self.params.wait_timeout} s')

    def _publish_clock(self, bag_time_ns: int) -> None:
        if self.clock_publisher is not None:
            message = Clock()
            message.clock.sec, message.clock.nanosec = divmod(int(bag_time_ns), NS_PER_S)
            self.clock_publisher.publish(message)

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def _on_pause(self, _request, response):
        self.pause()
        response.success, response.message = True, 'paused'
        return response

    def _on_resume(self, _request, response):
        self.resume()
        response.success, response.message = True, 'playing'
        return response

    def _wait_while_paused(self) -> bool:
        """Block while paused; False when stopped meanwhile."""
        while not self._running.wait(0.1):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def _wait_until_due(self, timestamp: int) -> bool:
        """Sleep until the message is due, publishing /clock meanwhile; False when stopped."""
        period = 1.0 / self.params.clock_frequency
        while True:
            if not self._running.is_set():
                paused_at = self.clock.bag_time_now()
                if not self._wait_while_paused():
                    return False
                self.clock.restart(paused_at)
            remaining = self.clock.due_in(timestamp)
            if remaining <= 0.0:
                return not self._stop.is_set()
            if self._stop.wait(min(remaining, period)):
                return False
            if self.clock.due_in(timestamp) > 0.0:
                self._publish_clock(min(self.clock.bag_time_now(), timestamp))

    def _play_once(self, start: int) -> None:
        self.clock.restart(start)
        self._publish_clock(start)
        in_flight = 0
        ack_window = self.params.ack_window
        for message in self.reader.messages(self.publishers_by_topic, start=start):
            if not self._wait_until_due(message.timestamp):
                return
            self._publish_clock(message.timestamp)
            publisher = self.publishers_by_topic[message.topic]
            publisher.publish(message.data)
            self.published += 1
            in_flight += 1
            if ack_window and in_flight >= ack_window:
                self._wait_for_acks()
                in_flight = 0
        if ack_window:
            self._wait_for_acks()

    def _wait_for_acks(self) -> None:
        timeout = Duration(seconds=self.params.ack_timeout)
        for publisher in self.publishers_by_topic.values():
            if publisher.get_subscription_count() > 0 and not publisher.wait_for_all_acked(timeout):
                self.get_logger().warning(f'{publisher.topic_name}: subscribers did not acknowledge within '
                                          f'{self.params.ack_timeout} s', throttle_duration_sec=5.0)

    def _report_progress(self) -> None:
        if not self.finished.is_set():
            self.get_logger().info(f'{self.published} message(s) published')

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.params.ack_timeout + 1.0)
        self.reader.close()


def _parse_args(argv: list[str]) -> list[Parameter]:
    parser = argparse.ArgumentParser(prog='flake-replay', description=__doc__.split('\n\n')[0])
    parser.add_argument('bag', help='rosbag2 directory or .mcap/.db3 file')
    parser.add_argument('--rate', type=float, default=None, help='speed factor, 0 = unlimited')
    parser.add_argument('--start-offset', type=float, default=None, help='seconds skipped at the start')
    parser.add_argument('--loop', action='store_true')
    parser.add_argument('--topics', nargs='+', default=[], help='replay only these topics')
    parser.add_argument('--remap', nargs='+', default=[], metavar='FROM:=TO', help='rename topics')
    parser.add_argument('--no-clock', action='store_true', help='do not publish /clock')
    parser.add_argument('--wait-for-subscribers', type=int, default=None)
    parser.add_argument('--skip-unknown-types', action='store_true')
    parser.add_argument('--start-paused', action='store_true', help='play once ~/resume is called')
    parser.add_argument('--delay', type=float, default=None, help='seconds to wait before the first message')
    args = parser.parse_args(argv)
    overrides = [Parameter('bag', value=args.bag)]
    if args.rate is not None:
        overrides.append(Parameter('rate', value=float(args.rate)))
    if args.start_offset is not None:
        overrides.append(Parameter('start_offset', value=float(args.start_offset)))
    if args.loop:
        overrides.append(Parameter('loop', value=True))
    if args.topics:
        overrides.append(Parameter('topics', value=','.join(args.topics)))
    if args.remap:
        overrides.append(Parameter('remap', value=','.join(args.remap)))
    if args.no_clock:
        overrides.append(Parameter('publish_clock', value=False))
    if args.wait_for_subscribers is not None:
        overrides.append(Parameter('wait_for_subscribers', value=args.wait_for_subscribers))
    if args.skip_unknown_types:
        overrides.append(Parameter('skip_unknown_types', value=True))
    if args.start_paused:
        overrides.append(Parameter('start_paused', value=True))
    if args.delay is not None:
        overrides.append(Parameter('start_delay', value=float(args.delay)))
    refuse_bad_overrides(parser, BagReplayerParameters, overrides, {
        'rate': '--rate', 'start_offset': '--start-offset', 'topics': '--topics', 'remap': '--remap',
        'wait_for_subscribers': '--wait-for-subscribers', 'start_delay': '--delay'})
    return overrides


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    overrides = _parse_args(remove_ros_args(argv)[1:])
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = install_stop_handlers()
    executor = SingleThreadedExecutor()
    replayer = None
    status = 0
    try:
        replayer = BagReplayer(parameter_overrides=overrides)
        executor.add_node(replayer)
        while rclpy.ok() and not replayer.finished.is_set() and not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
        if replayer.error is not None:
            print(f'flake-replay: {replayer.error}', file=sys.stderr)
            status = 1
        else:
            print(f'flake-replay: published {replayer.published} message(s)')
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, BagError, ParameterException) as exc:
        print(f'flake-replay: {exc}', file=sys.stderr)
        status = 2
    finally:
        if replayer is not None:
            replayer.close()
            replayer.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown()
    return status


if __name__ == '__main__':
    sys.exit(main())

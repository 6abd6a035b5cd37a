"""Recording and replay over real rclpy: record a publisher's topics, replay them, compare."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ros_helpers import spin_until

from flake_core.ros_image import image_to_numpy, numpy_to_image
from flake_scanner.bag.io import SCAN_FRAME_TYPE, BagError, BagReader, BagWriter
from flake_scanner.bag.playback import PlaybackClock, parse_remaps, parse_topics

# Topics unique to this test process: other runs of this suite may share the DDS domain.
T = f'/bagtest_{os.getpid()}'
CLOCK = f'{T}/clock'


def _scan_frame(index: int):
    from flake_msgs.msg import ScanFrame

    frame = ScanFrame()
    frame.header.frame_id = 'camera_optical'
    frame.scan_id = 'scan-replay'
    frame.tile_index = index
    frame.pixel_size = 1e-6
    frame.image = numpy_to_image(np.full((8, 12, 3), index, np.uint8), 'bgr8')
    return frame


class FakeMonotonic:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_playback_clock_honours_rate_factor():
    now = FakeMonotonic()
    clock = PlaybackClock(rate=2.0, now=now)
    clock.restart(5_000_000_000)
    # a message 3 s into the bag is due 1.5 s of wall time later at rate 2
    assert clock.due_in(8_000_000_000) == pytest.approx(1.5)
    now.t += 1.0
    assert clock.due_in(8_000_000_000) == pytest.approx(0.5)
    assert clock.bag_time_now() == 7_000_000_000
    slow = PlaybackClock(rate=0.5, now=now)
    slow.restart(0)
    assert slow.due_in(1_000_000_000) == pytest.approx(2.0)
    unlimited = PlaybackClock(rate=0.0, now=now)
    unlimited.restart(0)
    assert unlimited.due_in(10**12) == 0.0
    with pytest.raises(ValueError):
        PlaybackClock(rate=-1.0)


def test_option_parsing():
    assert parse_topics('/a, /b  /c') == ['/a', '/b', '/c']
    assert parse_remaps('/a:=/b, /c:=/d') == {'/a': '/b', '/c': '/d'}
    with pytest.raises(ValueError, match='absolute'):
        parse_topics('relative')
    with pytest.raises(ValueError, match='from:=/to'):
        parse_remaps('/a=/b')


@pytest.fixture
def executor(ros):
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor()
    yield executor
    executor.shutdown()


def _record(executor, tmp_path, count: int):
    """Publish ``count`` ScanFrames and a FlakeArray from a node and record them."""
    from rclpy.parameter import Parameter

    from flake_core.node_tools import PIPELINE_QOS
    from flake_msgs.msg import FlakeArray, ScanFrame
    from flake_scanner.bag.record import BagRecorder

    source = ros_node('bag_test_source')
    frames_pub = source.create_publisher(ScanFrame, f'{T}/tiles', PIPELINE_QOS)
    flakes_pub = source.create_publisher(FlakeArray, f'{T}/detections', PIPELINE_QOS)
    bag = tmp_path / 'recorded'
    recorder = BagRecorder(parameter_overrides=[
        Parameter('topics', value=f'{T}/tiles,{T}/detections'),
        Parameter('output', value=str(bag))])
    executor.add_node(source)
    executor.add_node(recorder)
    try:
        assert spin_until(executor, lambda: not recorder.missing_topics, timeout=20)
        assert spin_until(executor, lambda: frames_pub.get_subscription_count() == 1
                          and flakes_pub.get_subscription_count() == 1, timeout=20)
        for index in range(count):
            frames_pub.publish(_scan_frame(index))
        flakes_pub.publish(FlakeArray(scan_id='scan-replay', tile_index=99))
        assert spin_until(executor, lambda: recorder.received == count + 1, timeout=20)
    finally:
        executor.remove_node(recorder)
        executor.remove_node(source)
        recorder.close()
        recorder.destroy_node()
        source.destroy_node()
    return bag, recorder


def ros_node(name: str):
    from rclpy.node import Node

    return Node(name)


def _replay_and_collect(executor, bag, expected: int, extra=()):
    from rclpy.parameter import Parameter
    from rosgraph_msgs.msg import Clock

    from flake_core.node_tools import PIPELINE_QOS
    from flake_msgs.msg import FlakeArray, ScanFrame
    from flake_scanner.bag.replay import BagReplayer

    sink = ros_node('bag_test_sink')
    frames, flakes, clocks = [], [], []
    subscriptions = [sink.create_subscription(ScanFrame, f'{T}/replayed', frames.append, PIPELINE_QOS),
                     sink.create_subscription(FlakeArray, f'{T}/detections', flakes.append, PIPELINE_QOS),
                     sink.create_subscription(Clock, CLOCK, clocks.append, PIPELINE_QOS)]
    replayer = BagReplayer(parameter_overrides=[
        Parameter('bag', value=str(bag)), Parameter('rate', value=0.0),
        Parameter('remap', value=f'{T}/tiles:={T}/replayed'), Parameter('start_paused', value=True),
        Parameter('clock_topic', value=CLOCK),
        Parameter('start_delay', value=0.0), *extra])
    executor.add_node(sink)
    executor.add_node(replayer)
    try:
        # every replayed topic matched on the subscriber's side too, so nothing is sent into the void
        wanted = [s for s in subscriptions if s.topic_name in {replayer.remaps.get(t, t)
                                                               for t in replayer.publishers_by_topic} | {CLOCK}]
        assert spin_until(executor, lambda: all(s.get_publisher_count() >= 1 for s in wanted), timeout=20)
        assert replayer.paused and replayer.published == 0
        replayer.resume()
        assert spin_until(executor, lambda: replayer.finished.is_set()
                          and len(frames) + len(flakes) >= expected, timeout=30)
        spin_until(executor, lambda: False, timeout=0.3)  # let late /clock samples arrive
        assert replayer.error is None
    finally:
        executor.remove_node(replayer)
        executor.remove_node(sink)
        replayer.close()
        replayer.destroy_node()
        sink.destroy_node()
    return frames, flakes, clocks


def test_record_then_replay_unlimited_gives_every_message_in_order(executor, tmp_path):
    count = 40
    bag, recorder = _record(executor, tmp_path, count)
    assert recorder.written == count + 1 and recorder.dropped == 0
    with BagReader(bag) as reader:
        assert reader.storage == 'mcap'
        assert reader.topics[f'{T}/tiles'].count == count
        stamps = [m.timestamp for m in reader.messages()]
    frames, flakes, clocks = _replay_and_collect(executor, bag, count + 1)
    assert [f.tile_index for f in frames] == list(range(count))
    assert int(image_to_numpy(frames[7].image)[0, 0, 0]) == 7
    assert [f.tile_index for f in flakes] == [99]
    clock_ns = [c.clock.sec * 10**9 + c.clock.nanosec for c in clocks]
    assert clock_ns == sorted(clock_ns), '/clock must never go backwards'
    assert clock_ns[0] == stamps[0] and clock_ns[-1] == stamps[-1]


def test_sqlite3_bag_with_start_offset_and_topic_filter(executor, tmp_path):
    from rclpy.parameter import Parameter
    from rclpy.serialization import serialize_message

    bag = tmp_path / 'sqlite_bag'
    with BagWriter(bag, storage='sqlite3') as writer:
        writer.add_topic(f'{T}/tiles', SCAN_FRAME_TYPE)
        writer.add_topic(f'{T}/detections', 'flake_msgs/msg/FlakeArray')
        for index in range(10):
            writer.write(f'{T}/tiles', 1_000_000_000 + index * 100_000_000,
                         serialize_message(_scan_frame(index)))
    with BagReader(bag) as reader:
        assert reader.storage == 'sqlite3'
    # 0.45 s into the bag: frames 5..9 remain; the detections topic is filtered out
    frames, flakes, clocks = _replay_and_collect(
        executor, bag, 5, extra=[Parameter('start_offset', value=0.45),
                                 Parameter('topics', value=f'{T}/tiles')])
    assert [f.tile_index for f in frames] == [5, 6, 7, 8, 9]
    assert flakes == []
    assert clocks[0].clock.sec == 1 and clocks[0].clock.nanosec == 450_000_000


def test_paced_replay_advances_clock_between_messages(executor, tmp_path):
    """At rate 1 /clock ticks through the gaps between messages; unlimited jumps from message to message."""
    from rclpy.parameter import Parameter
    from rclpy.serialization import serialize_message

    bag = tmp_path / 'paced'
    stamps = [2_000_000_000, 2_300_000_000, 2_600_000_000]
    with BagWriter(bag) as writer:
        writer.add_topic(f'{T}/tiles', SCAN_FRAME_TYPE)
        for index, stamp in enumerate(stamps):
            writer.write(f'{T}/tiles', stamp, serialize_message(_scan_frame(index)))
    for rate, expect_ticks in ((1.0, True), (0.0, False)):
        frames, _, clocks = _replay_and_collect(executor, bag, 3, extra=[Parameter('rate', value=rate)])
        assert [f.tile_index for f in frames] == [0, 1, 2]
        clock_ns = [c.clock.sec * 10**9 + c.clock.nanosec for c in clocks]
        assert clock_ns == sorted(clock_ns)
        assert clock_ns[0] == stamps[0] and clock_ns[-1] == stamps[-1]
        between = [t for t in clock_ns if t not in stamps]
        assert bool(between) == expect_ticks, (rate, clock_ns)
        assert all(stamps[0] < t < stamps[-1] for t in between)


def test_flake_record_process_closes_the_bag_on_sigterm(executor, tmp_path):
    """The console script in its own process: SIGTERM mid-recording leaves a complete, readable bag."""
    import os
    import signal
    import subprocess
    import sys

    from rclpy.duration import Duration

    from flake_core.node_tools import PIPELINE_QOS
    from flake_msgs.msg import ScanFrame

    bag = tmp_path / 'sigterm'
    truth = tmp_path / 'truth.json'
    truth.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "graphene"}]}')
    process = subprocess.Popen([sys.executable, '-m', 'flake_scanner.bag.record', '--topics', f'{T}/sig',
                                '--output', str(bag), '--ground-truth', str(truth)], env=dict(os.environ),
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    source = ros_node('bag_test_sig_source')
    publisher = source.create_publisher(ScanFrame, f'{T}/sig', PIPELINE_QOS)
    executor.add_node(source)
    try:
        assert spin_until(executor, lambda: publisher.get_subscription_count() == 1, timeout=30)
        for index in range(15):
            publisher.publish(_scan_frame(index))
        assert spin_until(executor, lambda: publisher.wait_for_all_acked(Duration(seconds=0.1)), timeout=10)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        executor.remove_node(source)
        source.destroy_node()
    assert process.returncode == 0, output
    assert 'closed' in output
    with BagReader(bag) as reader:
        frames = [reader.deserialize(m).tile_index for m in reader.messages([f'{T}/sig'])]
        (stored_truth,) = [reader.deserialize(m).data for m in reader.messages(['/scan/ground_truth'])]
    assert frames == list(range(15))
    # the ground truth travels both beside the messages and inside the bag
    assert stored_truth == truth.read_text() == (bag / 'ground_truth.json').read_text()


def test_loop_starts_again_from_the_beginning(executor, tmp_path):
    from rclpy.parameter import Parameter
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.serialization import serialize_message

    from flake_msgs.msg import ScanFrame
    from flake_scanner.bag.replay import BagReplayer

    bag = tmp_path / 'loop'
    with BagWriter(bag) as writer:
        writer.add_topic(f'{T}/loop', SCAN_FRAME_TYPE)
        for index in range(3):
            writer.write(f'{T}/loop', 10**9 + index, serialize_message(_scan_frame(index)))
    sink = ros_node('bag_test_loop_sink')
    received = []
    # The loop runs on until close(): a keep-all reader keeps the first loops even when the
    # test's executor takes samples slower than the replayer publishes them.
    keep_all = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
    sink.create_subscription(ScanFrame, f'{T}/loop', lambda m: received.append(m.tile_index), keep_all)
    replayer = BagReplayer(parameter_overrides=[Parameter('bag', value=str(bag)), Parameter('rate', value=0.0),
                                                Parameter('loop', value=True), Parameter('ack_window', value=1),
                                                Parameter('start_paused', value=True),
                                                Parameter('wait_for_subscribers', value=1)])
    executor.add_node(sink)
    executor.add_node(replayer)
    try:
        assert spin_until(executor, lambda: list(sink.subscriptions)[0].get_publisher_count() >= 1, timeout=20)
        replayer.resume()
        assert spin_until(executor, lambda: len(received) >= 9, timeout=30)
        assert not replayer.finished.is_set()
    finally:
        executor.remove_node(replayer)
        executor.remove_node(sink)
        replayer.close()
        replayer.destroy_node()
        sink.destroy_node()
    assert replayer.finished.is_set() and replayer.error is None  # close() stops the loop
    assert received[:9] == [0, 1, 2] * 3


def _humble_style_bag(path, frames: int):
    """A bag as Humble's `ros2 bag record` lays it out: sqlite3 schema 3, metadata version 5, no definitions."""
    import sqlite3

    from rclpy.serialization import serialize_message

    path.mkdir()
    qos = ('- history: 3\n  depth: 0\n  reliability: 1\n  durability: 2\n  deadline:\n    sec: 2147483647\n'
           '    nsec: 4294967295\n  lifespan:\n    sec: 2147483647\n    nsec: 4294967295\n  liveliness: 1\n'
           '  liveliness_lease_duration:\n    sec: 2147483647\n    nsec: 4294967295\n'
           '  avoid_ros_namespace_conventions: false')
    stamps = [1_700_000_000_000_000_000 + i * 50_000_000 for i in range(frames)]
    database = sqlite3.connect(path / 'humble_0.db3')
    database.executescript(
        'CREATE TABLE schema(schema_version INTEGER PRIMARY KEY, ros_distro TEXT NOT NULL);'
        'INSERT INTO schema VALUES (3, "humble");'
        'CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,'
        ' serialization_format TEXT NOT NULL, offered_qos_profiles TEXT NOT NULL);'
        'CREATE TABLE messages(id INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL, timestamp INTEGER NOT NULL,'
        ' data BLOB NOT NULL);')
    database.execute(f'INSERT INTO topics VALUES (1, "{T}/tiles", "flake_msgs/msg/ScanFrame", "cdr", ?)', (qos,))
    database.executemany('INSERT INTO messages (topic_id, timestamp, data) VALUES (1, ?, ?)',
                         [(stamp, serialize_message(_scan_frame(i))) for i, stamp in enumerate(stamps)])
    database.commit()
    database.close()
    indented_qos = qos.replace('\n', '\\n')
    (path / 'metadata.yaml').write_text(f'''rosbag2_bagfile_information:
  version: 5
  storage_identifier: sqlite3
  duration:
    nanoseconds: {stamps[-1] - stamps[0]}
  starting_time:
    nanoseconds_since_epoch: {stamps[0]}
  message_count: {frames}
  topics_with_message_count:
    - topic_metadata:
        name: {T}/tiles
        type: flake_msgs/msg/ScanFrame
        serialization_format: cdr
        offered_qos_profiles: "{indented_qos}"
      message_count: {frames}
  compression_format: ""
  compression_mode: ""
  relative_file_paths:
    - humble_0.db3
  files:
    - path: humble_0.db3
      starting_time:
        nanoseconds_since_epoch: {stamps[0]}
      duration:
        nanoseconds: {stamps[-1] - stamps[0]}
      message_count: {frames}
''')
    return stamps


def test_bag_in_the_humble_recorder_layout_replays(executor, tmp_path):
    bag = tmp_path / 'humble'
    stamps = _humble_style_bag(bag, 6)
    with BagReader(bag) as reader:
        assert reader.storage == 'sqlite3'
        info = reader.topics[f'{T}/tiles']
        assert info.count == 6 and not info.has_definition and info.qos.reliable
        assert reader.deserialize(next(reader.messages())).tile_index == 0
    frames, _, clocks = _replay_and_collect(executor, bag, 6)
    assert [f.tile_index for f in frames] == list(range(6))
    assert clocks[-1].clock.sec * 10**9 + clocks[-1].clock.nanosec == stamps[-1]


def test_recorder_and_replayer_refuse_bad_options_clearly(ros, tmp_path):
    from rclpy.parameter import Parameter

    from flake_scanner.bag.io import BagNotFoundError
    from flake_scanner.bag.record import BagRecorder
    from flake_scanner.bag.replay import BagReplayer

    with pytest.raises(ValueError, match='nothing to record'):
        BagRecorder(parameter_overrides=[Parameter('output', value=str(tmp_path / 'a'))])
    (tmp_path / 'exists').mkdir()
    with pytest.raises(FileExistsError, match='exists already'):
        BagRecorder(parameter_overrides=[Parameter('topics', value=f'{T}/x'),
                                         Parameter('output', value=str(tmp_path / 'exists'))])
    with pytest.raises(FileNotFoundError, match='ground truth'):
        BagRecorder(parameter_overrides=[Parameter('topics', value=f'{T}/x'),
                                         Parameter('output', value=str(tmp_path / 'b')),
                                         Parameter('ground_truth', value=str(tmp_path / 'missing.json'))])
    with pytest.raises(ValueError, match='absolute'):
        BagRecorder(parameter_overrides=[Parameter('topics', value='relative/topic')])
    with pytest.raises(ValueError, match='no bag given'):
        BagReplayer()
    with pytest.raises(BagNotFoundError):
        BagReplayer(parameter_overrides=[Parameter('bag', value=str(tmp_path / 'none'))])
    bag = tmp_path / 'one_topic'
    with BagWriter(bag) as writer:
        writer.add_topic(f'{T}/tiles', SCAN_FRAME_TYPE)
    with pytest.raises(BagError, match='has no topic'):
        BagReplayer(parameter_overrides=[Parameter('bag', value=str(bag)), Parameter('topics', value=f'{T}/other')])
    with pytest.raises(ValueError, match='from:=/to'):
        BagReplayer(parameter_overrides=[Parameter('bag', value=str(bag)), Parameter('remap', value='/a=/b')])


@pytest.mark.parametrize('argv, message', [
    (['flake-replay', 'x.mcap', '--rate', '-1'], '--rate: rate must be >= 0.0, got -1.0'),
    (['flake-replay', 'x.mcap', '--start-offset', '1e9'], '--start-offset: start_offset must be <= '),
    (['flake-replay', 'x.mcap', '--start-offset', 'nan'], '--start-offset: start_offset'),
    (['flake-replay', 'x.mcap', '--wait-for-subscribers', '-3'], '--wait-for-subscribers: '),
    (['flake-replay', 'x.mcap', '--delay', '-0.5'], '--delay: start_delay must be >= 0.0'),
    (['flake-replay', 'x.mcap', '--rate', 'fast'], "argument --rate: invalid float value: 'fast'"),
    (['flake-record', '--topics', '/a', '--duration', '-5'], '--duration: duration must be >= 0.0'),
    (['flake-record', '--topics', '/a', '--bag-version', '3'], 'argument --bag-version: invalid choice'),
])
def test_every_bad_command_line_argument_is_one_clear_line(argv, message, capsys):
    from flake_scanner.bag import record, replay

    parse = replay._parse_args if argv[0] == 'flake-replay' else record._parse_args
    with pytest.raises(SystemExit) as exit_info:
        parse(argv[1:])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f'{argv[0]}: error: ') and message in error, error


def test_bags_that_cannot_be_played_end_in_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys

    bag = tmp_path / 'short'
    with BagWriter(bag) as writer:
        writer.add_topic(f'{T}/tiles', SCAN_FRAME_TYPE)
        writer.write(f'{T}/tiles', 10**9, b'\0' * 8)
        writer.write(f'{T}/tiles', 3 * 10**9, b'\0' * 8)
    noise = tmp_path / 'noise'
    noise.mkdir()
    (noise / 'noise_0.mcap').write_bytes(np.random.default_rng(0).bytes(4096))
    (noise / 'metadata.yaml').write_text('rosbag2_bagfile_information:\n  storage_identifier: mcap\n')
    for args, message in (([str(bag), '--start-offset', '5'], 'start offset 5 s is past the end of bag'),
                          ([str(noise)], 'is not an mcap file')):
        done = subprocess.run([sys.executable, '-m', 'flake_scanner.bag.replay', *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert 'Traceback' not in done.stderr and 'truncated' not in done.stderr
        assert message in done.stderr, done.stderr

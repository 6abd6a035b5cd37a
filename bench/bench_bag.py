"""Bag bench: write/read speed of MCAP bags of 1024x1024 bgr8 ScanFrames, replay throughput
at unlimited rate into a subscriber, and offline evaluation time per 100 frames per backend.

Prints Markdown tables. ``--frames`` sets the bag size (default 200).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import random
import sys
import tempfile
import time

os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(101, 200)))
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')

import numpy as np  # noqa: E402

from flake_scanner.bag.io import SCAN_FRAME_TYPE, BagReader, BagWriter  # noqa: E402
from flake_scanner.ros_image import numpy_to_image  # noqa: E402

SIDE = 1024


def write_frame_bag(path: Path, frames: int) -> float:
    """A bag of ``frames`` noisy 1024x1024 bgr8 ScanFrames at 10 Hz; returns seconds spent writing."""
    from rclpy.serialization import serialize_message

    from flake_msgs.msg import ScanFrame

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    start = time.perf_counter()
    with BagWriter(path) as writer:
        writer.add_topic('/scan/tiles', SCAN_FRAME_TYPE)
        for index in range(frames):
            frame = ScanFrame(scan_id='bench', tile_index=index, tiles_total=frames, pixel_size=1e-6)
            frame.image = numpy_to_image(np.roll(base, index, axis=1), 'bgr8')
            writer.write('/scan/tiles', 10**9 + index * 10**8, serialize_message(frame))
    return time.perf_counter() - start


def read_seconds(path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with BagReader(path) as reader:
        count = sum(1 for _ in reader.messages())
    return time.perf_counter() - start, count


def replay_throughput(path: Path, frames: int) -> tuple[float, int]:
    """Frames/s from the first to the last frame received by a subscriber, replay at rate 0."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from flake_msgs.msg import ScanFrame
    from flake_scanner.bag.replay import BagReplayer
    from flake_scanner.nodes.common import PIPELINE_QOS

    rclpy.init()
    executor = SingleThreadedExecutor()
    sink = Node('bench_bag_sink')
    arrivals: list[float] = []
    sink.create_subscription(ScanFrame, '/scan/tiles', lambda _: arrivals.append(time.perf_counter()),
                             PIPELINE_QOS)
    replayer = BagReplayer(parameter_overrides=[
        Parameter('bag', value=str(path)), Parameter('rate', value=0.0),
        Parameter('wait_for_subscribers', value=1), Parameter('publish_clock', value=False)])
    executor.add_node(sink)
    executor.add_node(replayer)
    deadline = time.monotonic() + 120
    try:
        while len(arrivals) < frames and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
            if replayer.finished.is_set() and replayer.error is not None:
                raise RuntimeError(f'replay failed: {replayer.error}')
    finally:
        replayer.close()
        executor.shutdown()
        replayer.destroy_node()
        sink.destroy_node()
        rclpy.try_shutdown()
    if len(arrivals) < 2:
        return 0.0, len(arrivals)
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), len(arrivals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='bench_bag_') as tmp:
        bag = Path(tmp) / 'frames'
        write_s = write_frame_bag(bag, args.frames)
        size_mb = sum(f.stat().st_size for f in bag.iterdir()) / 1e6
        read_s, count = read_seconds(bag)
        fps, received = replay_throughput(bag, args.frames)
        print(f'\n### Bags of {args.frames} ScanFrames, {SIDE}x{SIDE} bgr8 ({size_mb:.0f} MB MCAP)\n')
        print('| measurement | value |')
        print('|---|---|')
        print(f'| write (BagWriter, MCAP) | {args.frames / write_s:.0f} frames/s |')
        print(f'| read raw (BagReader) | {count / read_s:.0f} frames/s |')
        print(f'| replay at rate unlimited into a subscriber (received {received}/{args.frames}) '
              f'| {fps:.0f} frames/s |')
    return 0


if __name__ == '__main__':
    sys.exit(main())

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

from flake_core.ros_image import numpy_to_image  # noqa: E402
from flake_scanner.bag.io import SCAN_FRAME_TYPE, BagReader, BagWriter  # noqa: E402

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


def replay_throughput(path: Path, frames: int, separate_process: bool) -> tuple[float, int]:
    """Frames/s from the first to the last frame a subscriber receives, replay at rate 0.

    The replay runs in this process (same executor as the subscriber) or as the
    ``flake-replay`` command in its own process.
    """
    import subprocess

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from flake_core.node_tools import PIPELINE_QOS
    from flake_msgs.msg import ScanFrame
    from flake_scanner.bag.replay import BagReplayer

    rclpy.init()
    executor = SingleThreadedExecutor()
    sink = Node('bench_bag_sink')
    arrivals: list[float] = []
    sink.create_subscription(ScanFrame, '/scan/tiles', lambda _: arrivals.append(time.perf_counter()),
                             PIPELINE_QOS)
    executor.add_node(sink)
    replayer = process = None
    if separate_process:
        process = subprocess.Popen([sys.executable, '-m', 'flake_scanner.bag.replay', str(path), '--rate', '0',
                                    '--no-clock', '--wait-for-subscribers', '1'],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        replayer = BagReplayer(parameter_overrides=[
            Parameter('bag', value=str(path)), Parameter('rate', value=0.0),
            Parameter('wait_for_subscribers', value=1), Parameter('publish_clock', value=False)])
        executor.add_node(replayer)
    deadline = time.monotonic() + 120
    try:
        while len(arrivals) < frames and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
            if replayer is not None and replayer.finished.is_set() and replayer.error is not None:
                raise RuntimeError(f'replay failed: {replayer.error}')
            if process is not None and process.poll() not in (None, 0):
                raise RuntimeError(f'flake-replay exited with {process.returncode}')
    finally:
        if replayer is not None:
            replayer.close()
            replayer.destroy_node()
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        executor.shutdown()
        sink.destroy_node()
        rclpy.try_shutdown()
    if len(arrivals) < 2:
        return 0.0, len(arrivals)
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]), len(arrivals)


def write_simulated_scan(path: Path, frames: int, seed: int = 7) -> None:
    """A bag of simulated 1024x1024 frames with their COCO ground truth beside it."""
    import json

    from rclpy.serialization import serialize_message

    from flake_msgs.msg import ScanFrame
    from flake_scanner.bag.io import GROUND_TRUTH_FILE
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.cli import dataset_positions
    from flake_scanner.sim.coco import FrameRecord, frames_to_coco
    from flake_scanner.sim.wafer import VirtualWafer, WaferConfig

    camera = CameraModel(VirtualWafer.generate(WaferConfig(seed=seed)),
                         CameraSettings(width=SIDE, height=SIDE, objective='10x', seed=seed))
    records = []
    with BagWriter(path) as writer:
        writer.add_topic('/scan/tiles', SCAN_FRAME_TYPE)
        for index, x, y in dataset_positions(camera, frames, 0.15, seed):
            frame = ScanFrame(scan_id='bench-eval', tile_index=index, tiles_total=frames,
                              pixel_size=camera.pixel_size, objective='10x', magnification=10.0)
            frame.image = numpy_to_image(camera.render(x, y), 'bgr8')
            frame.pixel_to_wafer = [float(v) for v in camera.pixel_to_wafer(x, y).as_list()]
            writer.write('/scan/tiles', 10**9 + index * 10**8, serialize_message(frame))
            records.append(FrameRecord(f'tile_{index:04d}', camera.ground_truth(x, y), '10x'))
    (path / GROUND_TRUTH_FILE).write_text(json.dumps(frames_to_coco(records)))


def evaluation_rows(bag: Path) -> list[str]:
    """One row per backend: seconds per 100 frames and the headline metrics, or why it did not run."""
    from flake_detector.bag_evaluate import evaluate_bag
    from flake_detector.detection import available_detectors

    rows = []
    for name in available_detectors():
        start = time.perf_counter()
        try:
            report = evaluate_bag(bag, [(name, {})], None)
        except Exception as exc:  # noqa: BLE001 - a backend without weights is reported, not fatal
            reason = str(exc).splitlines()[0].replace(str(Path(__file__).resolve().parents[1]), '.')
            rows.append(f'| {name} | not run: {reason[:100]} | | | | |')
            continue
        total = time.perf_counter() - start
        entry = report['backends'][name]
        scope = entry['metrics']['materials']['all']
        segm = scope['segm'] or {}

        def fmt(value):
            return '-' if value is None else f'{value:.3f}'

        rows.append(f"| {name} | {entry['seconds_per_100_frames']:.1f} | {100 * total / entry['frames']:.1f} | "
                    f"{fmt(segm.get('AP50'))} | {fmt(scope['per_image']['precision'])} | "
                    f"{fmt(scope['per_image']['recall'])} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=200)
    parser.add_argument('--eval-frames', type=int, default=20, help='simulated frames for the evaluation bench')
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix='bench_bag_') as tmp:
        bag = Path(tmp) / 'frames'
        write_s = write_frame_bag(bag, args.frames)
        size_mb = sum(f.stat().st_size for f in bag.iterdir()) / 1e6
        read_s, count = read_seconds(bag)
        fps, received = replay_throughput(bag, args.frames, separate_process=False)
        fps_process, received_process = replay_throughput(bag, args.frames, separate_process=True)
        print(f'\n### Bags of {args.frames} ScanFrames, {SIDE}x{SIDE} bgr8 ({size_mb:.0f} MB MCAP)\n')
        print('| measurement | value |')
        print('|---|---|')
        print(f'| write (BagWriter, MCAP) | {args.frames / write_s:.0f} frames/s |')
        print(f'| read raw (BagReader) | {count / read_s:.0f} frames/s |')
        print(f'| replay at rate unlimited into a subscriber, one process (received {received}/{args.frames}) '
              f'| {fps:.0f} frames/s |')
        print(f'| `flake-replay --rate 0` in its own process into a subscriber (received '
              f'{received_process}/{args.frames}) | {fps_process:.0f} frames/s |')
        scan = Path(tmp) / 'simulated_scan'
        write_simulated_scan(scan, args.eval_frames)
        print(f'\n### Offline evaluation (flake-bag-eval) on {args.eval_frames} simulated {SIDE}x{SIDE} frames '
              '(seed 7, 10x), default parameters\n')
        print('| backend | detect s / 100 frames | total s / 100 frames | mask AP50 (all) | img P | img R |')
        print('|---|---|---|---|---|---|')
        for row in evaluation_rows(scan):
            print(row)
    return 0


if __name__ == '__main__':
    sys.exit(main())

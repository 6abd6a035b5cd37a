"""Stage and autofocus figures: serial round trips over a pty, autofocus accuracy on random planes.

Run: `source env.sh && python bench/bench_stage.py [--planes N] [--commands N]`. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flake_scanner.autofocus import FOCUS_MEASURES, FocusSearch, focus_measure, run_focus_search
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.wafer import VirtualWafer
from flake_scanner.stage.driver import StageDriver
from flake_scanner.stage.emulator import EmulatorConfig, StageEmulator
from flake_scanner.stage.fault_suite import FaultSuiteResult, run_fault_suite


def serial_latency(commands: int, drop: float, garbage: float) -> dict:
    config = EmulatorConfig(time_scale=100.0, drop_probability=drop, garbage_probability=garbage, seed=3)
    timings = {'WHERE': [], 'STATUS': [], 'MOVE': []}
    with StageEmulator(config) as emulator, StageDriver(emulator.port, timeout=0.2, retries=5) as driver:
        for i in range(commands):
            for name, call in (('WHERE', driver.where), ('STATUS', driver.is_busy),
                               ('MOVE', lambda i=i: driver.move_to(x=(i % 50) * 1e-5, wait=False))):
                started = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - started)
        counters = driver.counters
    return {'timings': timings, 'retries': counters.retries, 'faults': counters.faults,
            'resyncs': counters.resyncs, 'lost': counters.lost_replies}


def fault_suite(moves: int, threads: int, timeout: float) -> FaultSuiteResult:
    """``moves`` waited moves split over ``threads`` emulator/driver pairs running at once."""
    from concurrent.futures import ThreadPoolExecutor

    share = [moves // threads + (i < moves % threads) for i in range(threads)]
    total = FaultSuiteResult()
    with ThreadPoolExecutor(threads) as pool:
        for result in pool.map(lambda item: run_fault_suite(item[1], timeout=timeout, jitter=1.5, drop=0.05,
                                                             duplicate=0.05, seed=100 + item[0], retries=3),
                               enumerate(share)):
            total.add(result)
    return total


def autofocus_accuracy(planes: int, objective: str, search_range: float, centre_error: float | None):
    rng = np.random.default_rng(11)
    rows = {name: {'frames': [], 'error': []} for name in FOCUS_MEASURES}
    dof = None
    for seed in range(planes):
        wafer = VirtualWafer.generate(seed=100 + seed)  # each wafer has its own tilted, curved focal plane
        camera = CameraModel(wafer, CameraSettings(width=256, height=256, objective=objective, seed=seed))
        dof = camera.objective.depth_of_field_m
        x, y = camera.flake_corner_in_view(rng, tries=100)
        focal_z = camera.focal_plane_z(x, y)
        centre = 0.0 if centre_error is None else focal_z + rng.uniform(-centre_error, centre_error)
        for name in FOCUS_MEASURES:
            search = FocusSearch(centre, search_range, max_frames=15, tolerance=dof / 4)
            result = run_focus_search(search, lambda z, c=camera, x=x, y=y, n=name: focus_measure(
                c.render(x, y, z), n))
            rows[name]['frames'].append(result.frames_used)
            rows[name]['error'].append(abs(result.z - focal_z) / dof)
    return rows, dof


def ros_round_trips(moves: int, autofocus_runs: int) -> dict:
    """MoveStage (wait=True, 1 um z steps) and the Autofocus action through real rclpy, nodes in-process."""
    import threading

    from geometry_msgs.msg import Point
    import rclpy
    from rclpy.action import ActionClient
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from flake_msgs.action import Autofocus
    from flake_msgs.srv import MoveStage
    from flake_scanner.nodes.autofocus_node import AutofocusNode
    from flake_scanner.nodes.camera_node import CameraNode
    from flake_scanner.nodes.stage_node import StageNode

    rclpy.init()
    stage = StageNode(parameter_overrides=[Parameter('emulator_settle_time', value=0.0)])
    camera = CameraNode(parameter_overrides=[Parameter('rate', value=0.0)])  # 1024 x 1024 frames
    focus = AutofocusNode()
    for node in (stage, camera):
        node.trigger_configure()
        node.trigger_activate()
    system = SingleThreadedExecutor()
    for node in (stage, camera, focus):
        system.add_node(node)
    spinner = threading.Thread(target=system.spin, daemon=True)
    spinner.start()
    client = rclpy.create_node('bench_stage_client')
    move = client.create_client(MoveStage, '/stage/move')
    action = ActionClient(client, Autofocus, '/autofocus')

    def wait(future, timeout=120.0):
        rclpy.spin_until_future_complete(client, future, timeout_sec=timeout)
        return future.result()

    move.wait_for_service(timeout_sec=10.0)
    x, y = camera.source.wafer.wafer_to_stage.apply(5e-3, 5e-3)
    wait(move.call_async(MoveStage.Request(target=Point(x=float(x), y=float(y)), wait=True)))
    move_times = []
    for i in range(moves):
        target = Point(x=float(x), y=float(y), z=1e-6 * (i % 2))
        started = time.perf_counter()
        response = wait(move.call_async(MoveStage.Request(target=target, wait=True)))
        move_times.append(time.perf_counter() - started)
        assert response.success, response.message
    action.wait_for_server(timeout_sec=10.0)
    focus_runs = []
    for _ in range(autofocus_runs):
        started = time.perf_counter()
        handle = wait(action.send_goal_async(Autofocus.Goal(use_current=True)))
        result = wait(handle.get_result_async()).result
        focus_runs.append((time.perf_counter() - started, result.frames_used))
    action.destroy()
    system.shutdown()
    spinner.join(timeout=10.0)
    for node in (stage, camera, focus):
        node.close()
        node.destroy_node()
    client.destroy_node()
    rclpy.shutdown()
    return {'moves': move_times, 'focus': focus_runs}


def print_fault_suite(moves: int, threads: int, timeout: float) -> None:
    result = fault_suite(moves, threads, timeout)
    print(f'## Fault suite: waited moves, replies 0-{1.5 * timeout * 1e3:.0f} ms late against a '
          f'{timeout * 1e3:.0f} ms timeout, 5% lost, 5% sent twice\n')
    print('| moves | correct | failed loudly | silent wrong positions | worst silent error [um] | replies late or lost '
          '| lost | duplicated | stale replies flushed | drains | moves resent | wall [s] |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    print(f'| {result.moves} | {result.correct} | {result.failed_loudly} | {result.silent_wrong} '
          f'| {result.worst_silent_error_m * 1e6:.1f} | {result.replies_late} | {result.replies_dropped} '
          f'| {result.replies_duplicated} | {result.stale_replies} | {result.resyncs} | {result.moves_resent} '
          f'| {result.seconds:.0f} |')
    reasons: dict[str, int] = {}
    for failure in result.failures:
        reason = failure.split(' on ')[0].split(' after ')[0]
        reason = 'no valid reply to ' + reason.split()[4].strip("'") if reason.startswith('no valid reply') else reason
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        print('\nLoud failures by kind: ' + ', '.join(f'{n} x {r}' for r, n in sorted(reasons.items())) + '\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--commands', type=int, default=300, help='commands of each kind per latency run')
    parser.add_argument('--planes', type=int, default=20, help='random focal planes per objective')
    parser.add_argument('--ros-moves', type=int, default=40, help='MoveStage calls through rclpy')
    parser.add_argument('--ros-autofocus', type=int, default=3, help='Autofocus actions through rclpy')
    parser.add_argument('--fault-moves', type=int, default=2000, help='waited moves of the fault suite')
    parser.add_argument('--fault-threads', type=int, default=4, help='emulator/driver pairs run at once')
    parser.add_argument('--fault-timeout', type=float, default=0.03, help='reply timeout of the fault suite [s]')
    parser.add_argument('--only', choices=('latency', 'faults', 'autofocus', 'ros'), help='one table only')
    args = parser.parse_args()

    if args.only in (None, 'faults'):
        print_fault_suite(args.fault_moves, args.fault_threads, args.fault_timeout)
    if args.only in (None, 'latency'):
        print_latency(args.commands)
    if args.only in (None, 'autofocus'):
        print_autofocus(args.planes)
    if args.only in (None, 'ros'):
        print_ros(args.ros_moves, args.ros_autofocus)


def print_latency(commands: int) -> None:
    print('## Serial round trip over a pty (ASI MS-2000 protocol, 115200 Bd setting, emulator)\n')
    print('| faults injected | command | n | p50 [ms] | p99 [ms] | max [ms] | retries | resyncs | faults |')
    print('|---|---|---|---|---|---|---|---|---|')
    for label, drop, garbage in (('none', 0.0, 0.0), ('2% lost + 2% garbage', 0.02, 0.02)):
        run = serial_latency(commands, drop, garbage)
        for name, values in run['timings'].items():
            ms = np.array(values) * 1e3
            print(f'| {label} | {name} | {len(ms)} | {np.percentile(ms, 50):.3f} | {np.percentile(ms, 99):.2f} '
                  f'| {ms.max():.1f} | {run["retries"]} | {run["resyncs"]} | {run["faults"]} |')
    print('\nRetries and resyncs are totals over the run; a lost reply costs one reply timeout (200 ms here) '
          'and a drain of twice that.\n')


def print_autofocus(planes: int) -> None:
    print('## Autofocus on random tilted, curved focal planes (simulated camera, 256x256 px, budget 15 frames)\n')
    print('| objective | search | measure | planes | frames mean | frames max | mean abs(dz)/DOF '
          '| p95 abs(dz)/DOF | max abs(dz)/DOF | within DOF/2 |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for objective, search_range, centre_error in (('10x', 50e-6, None), ('50x', 8e-6, 3e-6)):
        rows, dof = autofocus_accuracy(planes, objective, search_range, centre_error)
        where = (f'{search_range * 1e6:.0f} um around z=0' if centre_error is None
                 else f'{search_range * 1e6:.0f} um around a guess off by <= {centre_error * 1e6:.0f} um')
        for name, row in rows.items():
            frames, error = np.array(row['frames']), np.array(row['error'])
            print(f'| {objective} (DOF {dof * 1e6:.2f} um) | {where} | {name} | {len(error)} | {frames.mean():.1f} '
                  f'| {frames.max()} | {error.mean():.3f} | {np.percentile(error, 95):.3f} | {error.max():.3f} '
                  f'| {(error <= 0.5).mean() * 100:.0f}% |')


def print_ros(moves: int, autofocus_runs: int) -> None:
    print('\n## Through ROS 2 (rclpy, nodes in one process, emulator at real speed, camera 1024x1024)\n')
    run = ros_round_trips(moves, autofocus_runs)
    ms = np.array(run['moves']) * 1e3
    print('| operation | n | p50 | p99 | max |')
    print('|---|---|---|---|---|')
    print(f'| MoveStage wait=True, 1 um z step (incl. motion) [ms] | {len(ms)} | {np.percentile(ms, 50):.1f} '
          f'| {np.percentile(ms, 99):.1f} | {ms.max():.1f} |')
    seconds = np.array([t for t, _ in run['focus']])
    frames = np.array([f for _, f in run['focus']])
    print(f'| Autofocus action, 50 um search [s] ({frames.mean():.1f} frames on average) | {len(seconds)} '
          f'| {np.percentile(seconds, 50):.2f} | {np.percentile(seconds, 99):.2f} | {seconds.max():.2f} |')


if __name__ == '__main__':
    main()

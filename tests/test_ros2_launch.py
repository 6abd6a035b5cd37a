"""The real ROS 2 tools against the pip-only install, as a ROS 2 user would use them: `ros2 launch`
brings the graph up, `ros2 service call` and `ros2 action send_goal` drive a scan and a
reservation, SIGINT stops it. Needs the ROS 2 tools kit (`make test` installs it from
../shared/ros2-tools when it is there); skipped with the reason where it is not."""

from __future__ import annotations

import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from flake_scanner.demo.run import camera_parameters, sim_wafer
from flake_scanner.graph import config_dir

pytestmark = [pytest.mark.ros, pytest.mark.slow]

NAMESPACE = f'/launch_test_{os.getpid()}'


def _kit_missing() -> str | None:
    if shutil.which('ros2') is None:
        return 'the ros2 command is not installed (the ROS 2 tools kit: make ros2-tools, from ../shared/ros2-tools)'
    try:
        import launch_ros  # noqa: F401
    except ImportError:
        return 'launch_ros is not installed (the ROS 2 tools kit: make ros2-tools, from ../shared/ros2-tools)'
    return None


pytestmark.append(pytest.mark.skipif(_kit_missing() is not None, reason=_kit_missing() or ''))


def ros2(*args: str, timeout: float = 120.0) -> str:
    """Run the real `ros2` command line; its output, or a failure showing it."""
    done = subprocess.run(['ros2', *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    assert done.returncode == 0, f'ros2 {" ".join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}'
    return done.stdout


def test_ros2_run_finds_the_executables_and_the_launch_file_is_a_real_file():
    executables = ros2('pkg', 'executables', 'flake_scanner')
    for name in ('stage_node', 'camera_node', 'autofocus_node', 'scan_coordinator', 'tiler_node'):
        assert f'flake_scanner {name}' in executables
    assert 'flake_detector detector_node' in ros2('pkg', 'executables', 'flake_detector')
    prefix = Path(ros2('pkg', 'prefix', 'flake_scanner').strip())
    launch_file = prefix / 'share' / 'flake_scanner' / 'launch' / 'flake_system.launch.py'
    assert launch_file.is_file() and not launch_file.is_symlink()
    assert not launch_file.parent.is_symlink()
    assert (prefix / 'lib' / 'flake_scanner' / 'stage_node').is_file()
    assert 'stage_emulator' in ros2('run', 'flake_scanner', 'stage_emulator', '--help')


@pytest.fixture(scope='module')
def launched(ros, tmp_path_factory):
    folder = tmp_path_factory.mktemp('ros2_launch')
    params = folder / 'params.yaml'
    params.write_text(yaml.safe_dump({
        '/**/camera_node': {'ros__parameters': {'rate': 0.0, 'sim_seed': 7}},
        '/**/detector_node': {'ros__parameters': {'backend': 'contrast', 'materials': 'graphene,hbn,mos2,wte2'}},
        '/**/scan_coordinator': {'ros__parameters': {'focus_strategy': 'focus_map', 'drain_timeout': 120.0}},
        '/**/registry_node': {'ros__parameters': {'database_path': str(folder / 'registry.sqlite')}},
    }))
    environment = dict(os.environ, FLAKE_DATA_DIR=str(folder / 'data'))
    log = (folder / 'launch.log').open('w')
    process = subprocess.Popen(
        # Generous stop timeouts (launch's default is 5 s before SIGTERM): a loaded machine stops
        # eight processes at once, and a node escalated to SIGTERM would not have stopped cleanly.
        ['ros2', 'launch', 'flake_scanner', 'flake_system.launch.py', f'namespace:={NAMESPACE}',
         f'params_file:={params}', 'sigterm_timeout:=60', 'sigkill_timeout:=30'],
        stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    try:
        _wait_until_up(ros, process, folder / 'launch.log')
        yield process, folder, params
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # what Ctrl-C in the launch terminal sends
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _wait_until_up(ros, process, log_path: Path, timeout: float = 240.0) -> None:
    """The scan action, the registry and both lifecycle nodes active (ros2 launch activates them)."""
    from lifecycle_msgs.msg import State
    from lifecycle_msgs.srv import GetState
    from rclpy.executors import SingleThreadedExecutor

    node = ros.create_node('launch_test_probe')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    clients = [node.create_client(GetState, f'{NAMESPACE}/{name}/get_state') for name in ('stage_node', 'camera_node')]
    needed = {f'{NAMESPACE}/scan/_action/send_goal', f'{NAMESPACE}/registry/reserve_flake',
              f'{NAMESPACE}/scan/set_wafer_frame'}
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert process.poll() is None, f'ros2 launch exited ({process.returncode}):\n{log_path.read_text()}'
            assert time.monotonic() < deadline, f'graph not up after {timeout} s:\n{log_path.read_text()[-3000:]}'
            executor.spin_once(timeout_sec=0.2)
            if not needed <= {name for name, _ in node.get_service_names_and_types()}:
                continue
            if not all(client.service_is_ready() for client in clients):
                continue
            states = []
            for client in clients:
                future = client.call_async(GetState.Request())
                until = time.monotonic() + 5
                while not future.done() and time.monotonic() < until:
                    executor.spin_once(timeout_sec=0.1)
                states.append(future.result().current_state.id if future.done() else None)
            if all(state == State.PRIMARY_STATE_ACTIVE for state in states):
                return
    finally:
        executor.shutdown()
        node.destroy_node()


def test_scan_and_reservation_through_the_ros2_command_line(launched):
    process, folder, params = launched
    camera = camera_parameters([config_dir() / 'camera_node.yaml', Path(params)])
    corners = sim_wafer(camera).corner_positions_stage(noise_m=2e-6, seed=1)
    points = ', '.join(f'{{x: {float(x)!r}, y: {float(y)!r}}}' for x, y in corners)
    answer = ros2('service', 'call', f'{NAMESPACE}/scan/set_wafer_frame', 'flake_msgs/srv/SetWaferFrame',
                  f'{{chip_id: launch-chip, corners: [{points}]}}')
    assert 'success=True' in answer, answer

    goal = ('{chip_id: launch-chip, region_min_x: 0.001, region_min_y: 0.001, region_max_x: 0.002, '
            'region_max_y: 0.002}')
    answer = ros2('action', 'send_goal', f'{NAMESPACE}/scan', 'flake_msgs/action/Scan', goal, timeout=600)
    assert 'Goal accepted' in answer and 'SUCCEEDED' in answer, answer
    assert re.search(r'tiles_done: 4\b|tiles_done=4\b', answer), answer

    answer = ros2('service', 'call', f'{NAMESPACE}/registry/query_flakes', 'flake_msgs/srv/QueryFlakes',
                  '{chip_id: launch-chip, limit: 5}')
    flake_ids = re.findall(r"\bid='([^']+)', scan_id=", answer)
    assert flake_ids, answer
    answer = ros2('service', 'call', f'{NAMESPACE}/registry/reserve_flake', 'flake_msgs/srv/ReserveFlake',
                  f"{{flake_id: '{flake_ids[0]}', robot_id: launch-robot, lease: 60.0}}")
    assert 'success=True' in answer, answer
    answer = ros2('service', 'call', f'{NAMESPACE}/registry/reserve_flake', 'flake_msgs/srv/ReserveFlake',
                  f"{{flake_id: '{flake_ids[0]}', robot_id: other-robot, lease: 60.0}}")
    assert "error_code='ALREADY_RESERVED'" in answer, answer

    # SIGINT, as Ctrl-C in the launch terminal: every node stops, cleanly.
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0
    log = (folder / 'launch.log').read_text()
    for sign in ('Traceback', 'context is invalid', 'RCLError', 'failed to send response'):
        assert sign not in log, f'{sign!r} in the launch output'
    exits = re.findall(r'\[INFO\] \[(\S+)-\d+\]: process has finished cleanly', log)
    assert {'stage_node', 'camera_node', 'scan_coordinator', 'registry_node'} <= set(exits), log[-3000:]

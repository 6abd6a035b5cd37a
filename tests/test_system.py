"""The whole graph, brought up as a lab would (flake-system): graph consistency, then a
scan of a small region scored against the simulator's ground truth."""

import json
import os
from pathlib import Path
import time

import pytest
from rclpy.action import get_action_client_names_and_types_by_node, get_action_server_names_and_types_by_node
from rclpy.executors import SingleThreadedExecutor
import yaml

from flake_scanner.demo.metrics import FoundFlake, score_scan, targets_in_region
from flake_scanner.demo.run import camera_parameters, run_scan, sim_wafer
from flake_scanner.graph import GRAPH, config_dir
from flake_scanner.system import RunningSystem

pytestmark = [pytest.mark.ros, pytest.mark.slow]

# Inputs that come from outside the graph: a STEM microscope, a bag replayer's clock.
EXTERNAL_INPUTS = {'/system_test/stem/image_raw', '/clock', '/parameter_events'}
REGION = (1.0e-3, 1.0e-3, 2.0e-3, 2.0e-3)
# Its own namespace keeps the graph apart from nodes other tests made in this process,
# and shows the launch file's namespace argument works.
NAMESPACE = '/system_test'


@pytest.fixture(scope='module')
def system(ros, tmp_path_factory):
    folder = tmp_path_factory.mktemp('system')
    previous = os.environ.get('FLAKE_DATA_DIR')
    os.environ['FLAKE_DATA_DIR'] = str(folder / 'data')
    params = folder / 'params.yaml'
    params.write_text(yaml.safe_dump({
        '/**/camera_node': {'ros__parameters': {'rate': 0.0, 'sim_seed': 7}},
        '/**/detector_node': {'ros__parameters': {'backend': 'contrast', 'materials': 'graphene,hbn,mos2,wte2'}},
        '/**/scan_coordinator': {'ros__parameters': {'focus_strategy': 'focus_map', 'drain_timeout': 120.0}},
    }))
    running = RunningSystem(hardware='sim', namespace=NAMESPACE, params_file=str(params), log_dir=folder / 'logs',
                            echo=False)
    running.start()
    try:
        running.activate_lifecycle_nodes(timeout=120)
        running.wait_until_ready(timeout=180)  # every node offers its interfaces and answers
        node = ros.create_node('system_test_probe')
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        yield running, node, executor, folder, params
        executor.shutdown()
        node.destroy_node()
    finally:
        codes = running.stop()
        if previous is None:
            os.environ.pop('FLAKE_DATA_DIR', None)
        else:
            os.environ['FLAKE_DATA_DIR'] = previous
    # Ctrl-C (SIGINT) ends every node cleanly: exit code 0, and nothing in the logs that says otherwise.
    unclean = {name: code for name, code in codes.items() if code != 0}
    assert not unclean, f'nodes did not stop cleanly: {unclean}; logs in {folder / "logs"}'
    for log in sorted((folder / 'logs').glob('*.log')):
        text = log.read_text()
        for sign in ('Traceback', 'context is invalid', 'RCLError', 'failed to send response'):
            assert sign not in text, f'{log.name}: {sign!r} in the log'


REQUIRED_SERVICES = ['registry/query_flakes', 'registry/reserve_flake', 'stage/move', 'scan/set_wafer_frame',
                     'defects/analyze']


def _graph(node, executor, names):
    """Topics, services and actions of every graph node, once every node has made its endpoints."""
    required = {f'{NAMESPACE}/{name}' for name in REQUIRED_SERVICES}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.2)
        nodes_up = names <= {n for n, ns in node.get_node_names_and_namespaces() if ns == NAMESPACE}
        if nodes_up and required <= {name for name, _types in node.get_service_names_and_types()}:
            break
    time.sleep(2.0)  # let the remaining endpoints of the discovered nodes arrive too
    executor.spin_once(timeout_sec=0.2)
    graph = {}
    for name in names:
        graph[name] = {
            'pub': dict(node.get_publisher_names_and_types_by_node(name, NAMESPACE)),
            'sub': dict(node.get_subscriber_names_and_types_by_node(name, NAMESPACE)),
            'srv': dict(node.get_service_names_and_types_by_node(name, NAMESPACE)),
            'cli': dict(node.get_client_names_and_types_by_node(name, NAMESPACE)),
            'act_srv': dict(get_action_server_names_and_types_by_node(node, name, NAMESPACE)),
            'act_cli': dict(get_action_client_names_and_types_by_node(node, name, NAMESPACE)),
        }
    return graph


def test_graph_is_consistent(system):
    running, node, executor, _folder, _params = system
    names = {spec.name for spec in GRAPH}
    assert not running.dead(), f'nodes exited at start-up: {running.dead()}'
    graph = _graph(node, executor, names)
    publishers, services, action_servers = {}, {}, {}
    for entry in graph.values():
        for topic, types in entry['pub'].items():
            publishers.setdefault(topic, set()).update(types)
        for name, types in entry['srv'].items():
            services.setdefault(name, set()).update(types)
        for name, types in entry['act_srv'].items():
            action_servers.setdefault(name, set()).update(types)
    problems = []
    for owner, entry in graph.items():
        for topic, types in entry['sub'].items():
            if topic in EXTERNAL_INPUTS:
                continue
            if not set(types) & publishers.get(topic, set()):
                problems.append(f'{owner} subscribes {topic} {types} but nothing in the graph publishes it')
        for name, types in entry['cli'].items():
            if name.endswith(('/set_parameters', '/get_parameters', '/describe_parameters', '/list_parameters',
                              '/get_parameter_types', '/set_parameters_atomically', '/get_type_description')):
                continue
            if not set(types) & services.get(name, set()):
                problems.append(f'{owner} calls service {name} {types} but no node serves it')
        for name, types in entry['act_cli'].items():
            if not set(types) & action_servers.get(name, set()):
                problems.append(f'{owner} uses action {name} {types} but no node serves it')
    assert not problems, '\n'.join(problems)
    # The interfaces the assembly robot and the operators rely on are there.
    assert f'{NAMESPACE}/scan' in action_servers and f'{NAMESPACE}/autofocus' in action_servers
    for name in REQUIRED_SERVICES:
        assert f'{NAMESPACE}/{name}' in services, f'{NAMESPACE}/{name} is not served'


def test_scan_finds_flakes_and_fills_the_registry(system):
    running, _node, _executor, folder, params = system
    camera = camera_parameters([config_dir() / 'camera_node.yaml', Path(params)])
    wafer = sim_wafer(camera)
    corners = wafer.corner_positions_stage(noise_m=2e-6, seed=1)
    result, flakes, _poses = run_scan(REGION, 'system-chip', corners, '10x', '', 2, folder / 'frames', timeout=600,
                                      namespace=NAMESPACE)
    assert result.success and result.tiles_done == result.tiles_total == 4
    assert result.hardware_time > 0 and result.duration > 0
    assert len(flakes) >= 3, 'the registry should hold the flakes of the scanned region'
    truth, too_small = targets_in_region(wafer, *REGION)
    score = score_scan([FoundFlake(f.flake_id, f.material, f.layer_class, f.centre, f.area) for f in flakes],
                       truth, region=REGION, ignored=too_small).total()
    assert score.matched_found >= 3
    assert score.precision >= 0.5, f'precision {score.precision:.2f}'
    # Positions are in the wafer frame: every flake lies in (or at the margin of) the scanned region.
    margin = 0.6e-3
    for flake in flakes:
        assert REGION[0] - margin <= flake.centre[0] <= REGION[2] + margin
        assert REGION[1] - margin <= flake.centre[1] <= REGION[3] + margin
    mosaic = folder / 'data' / 'scans' / result.scan_id / 'mosaic.json'
    assert json.loads(mosaic.read_text())['frames'] == 4
    assert not running.dead()


def test_tf_latched_state_and_names_in_logs(system):
    """After the scan: stage -> wafer_<chip> and camera -> camera_optical on tf_static, /stage/state
    handed to a subscriber that comes late, and log lines naming the namespaced interfaces."""
    running, node, executor, folder, _params = system
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from flake_core.node_tools import STATE_QOS
    from flake_msgs.msg import StageState

    states = []
    node.create_subscription(StageState, f'{NAMESPACE}/stage/state', states.append, STATE_QOS)
    try:
        from tf2_msgs.msg import TFMessage
    except ImportError:
        TFMessage = None  # noqa: N806 - the kit is absent: no tf to check
    static = []
    if TFMessage is not None:
        latched = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(TFMessage, f'{NAMESPACE}/tf_static', static.append, latched)

    def frames():
        return {(t.header.frame_id, t.child_frame_id) for message in static for t in message.transforms}

    wanted = {('stage', 'wafer_system-chip'), ('camera', 'camera_optical')} if TFMessage else set()
    assert _spin_until(executor, lambda: bool(states) and wanted <= frames(), 60), (len(states), frames())
    assert states[-1].header.frame_id == 'stage' and not states[-1].fault
    coordinator_log = (folder / 'logs' / 'scan_coordinator.log').read_text()
    assert f'action {NAMESPACE}/scan' in coordinator_log
    assert f'{NAMESPACE}/registry/save_wafer_frame' in coordinator_log


def _spin_until(executor, predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        executor.spin_once(timeout_sec=0.1)
    return predicate()


def test_goals_are_checked_when_they_arrive(system):
    """Two goals sent together: exactly one is accepted (the slot is taken at acceptance, not when
    the scan starts); a chip without a wafer frame is rejected at once, not accepted then aborted."""
    running, node, executor, folder, _params = system
    from rclpy.action import ActionClient

    from flake_core.node_tools import ACTION_QOS
    from flake_msgs.action import Scan

    action = ActionClient(node, Scan, f'{NAMESPACE}/scan', **ACTION_QOS)
    try:
        assert _spin_until(executor, action.server_is_ready, 60)
        goal = Scan.Goal(chip_id='system-chip', region_min_x=REGION[0], region_min_y=REGION[1],
                         region_max_x=REGION[2], region_max_y=REGION[3], focus_strategy='fixed')
        futures = [action.send_goal_async(goal) for _ in range(2)]
        assert _spin_until(executor, lambda: all(f.done() for f in futures), 120)
        handles = [f.result() for f in futures]
        assert sum(h.accepted for h in handles) == 1
        accepted = next(h for h in handles if h.accepted)
        cancel = accepted.cancel_goal_async()
        result = accepted.get_result_async()
        assert _spin_until(executor, lambda: cancel.done() and result.done(), 300)

        unknown = action.send_goal_async(Scan.Goal(chip_id='no-such-chip', region_max_x=1e-3, region_max_y=1e-3))
        assert _spin_until(executor, unknown.done, 120)
        assert not unknown.result().accepted
    finally:
        action.destroy()
    log = (folder / 'logs' / 'scan_coordinator.log').read_text()
    assert 'a scan is already running' in log
    assert "goal rejected: NO_WAFER_FRAME: no wafer frame for chip 'no-such-chip'" in log

"""A facility: two simulated microscopes, each in its own namespace with its stage, camera,
autofocus, coordinator, tiler and detector, scanning at the same time into one registry
(SQLite, and a real PostgreSQL server), brought up by flake-system --microscope."""

from __future__ import annotations

import os
from pathlib import Path
import threading

import pytest
from registry_backends import postgres_server  # noqa: F401 - the PostgreSQL server fixture
import yaml

from flake_scanner.demo.metrics import FoundFlake, score_scan, targets_in_region
from flake_scanner.demo.run import camera_parameters, run_scan, sim_wafer
from flake_scanner.graph import Microscope, config_dir, facility_graph
from flake_scanner.system import RunningSystem

pytestmark = [pytest.mark.ros, pytest.mark.slow]

REGION = (1.0e-3, 1.0e-3, 2.0e-3, 2.0e-3)
SCOPES = ('scope1', 'scope2')
# The STEM analyzer is a facility node too, but nothing here uses it: leave it out to spare the cores.
NODES = {'stage_node', 'camera_node', 'autofocus_node', 'scan_coordinator', 'tiler_node', 'detector_node',
         'registry_node'}


def test_facility_graph_places_each_microscope_in_its_namespace_around_one_registry(tmp_path):
    own = tmp_path / 'scope2.yaml'
    own.write_text('{}')
    placements = facility_graph([Microscope.parse('scope1'), Microscope.parse(f'scope2:real:{own}')])
    keys = [p.key for p in placements]
    assert keys.count('registry_node') == 1 and 'scope1/stage_node' in keys and 'scope2/detector_node' in keys
    coordinator = next(p for p in placements if p.key == 'scope2/scan_coordinator')
    assert coordinator.hardware == 'real' and coordinator.params_files == (str(own),)
    assert coordinator.resolve('scan') == '/scope2/scan'
    assert coordinator.resolve('registry/save_wafer_frame') == '/registry/save_wafer_frame'
    assert coordinator.resolve('detections') == '/detections'
    detector = next(p for p in placements if p.key == 'scope1/detector_node')
    assert detector.resolve('detections') == '/detections' and detector.resolve('scan/tiles') == '/scope1/scan/tiles'
    for bad in ('1scope', 'scope-1', 'scope1:laser', f'scope1:sim:{tmp_path / "missing.yaml"}'):
        with pytest.raises((ValueError, FileNotFoundError)):
            Microscope.parse(bad)
    with pytest.raises(ValueError, match='differ'):
        facility_graph([Microscope('scope1'), Microscope('scope1')])


def _registry_database(request, folder: Path) -> dict:
    if request.param == 'sqlite':
        return {'database_path': str(folder / 'registry.sqlite')}
    server = request.getfixturevalue('postgres_server')
    return {'database_url': server.create_database('facility', template='registry_template')}


@pytest.fixture(params=['sqlite', 'postgresql'])
def facility(request, ros, tmp_path):
    database = _registry_database(request, tmp_path)
    shared = tmp_path / 'facility.yaml'
    shared.write_text(yaml.safe_dump({
        '/**/camera_node': {'ros__parameters': {'rate': 0.0}},
        '/**/detector_node': {'ros__parameters': {'backend': 'contrast', 'materials': 'graphene,hbn,mos2,wte2'}},
        '/**/scan_coordinator': {'ros__parameters': {'focus_strategy': 'focus_map', 'drain_timeout': 120.0}},
        '/registry_node': {'ros__parameters': database},
    }))
    microscopes = []
    for name in SCOPES:
        # One file per microscope, as a lab keeps one per instrument; both simulate a chip of seed 7.
        own = tmp_path / f'{name}.yaml'
        own.write_text(yaml.safe_dump({'/**/camera_node': {'ros__parameters': {'sim_seed': 7}},
                                       '/**/stage_node': {'ros__parameters': {'timeout': 0.5}}}))
        microscopes.append(Microscope.parse(f'{name}:sim:{own}'))
    previous = os.environ.get('FLAKE_DATA_DIR')
    os.environ['FLAKE_DATA_DIR'] = str(tmp_path / 'data')
    running = RunningSystem(microscopes=microscopes, params_file=str(shared), log_dir=tmp_path / 'logs',
                            echo=False, only=NODES)
    running.start()
    try:
        running.activate_lifecycle_nodes(timeout=180)
        running.wait_until_ready(timeout=240)
        yield running, tmp_path, shared, microscopes
    finally:
        codes = running.stop()
        if previous is None:
            os.environ.pop('FLAKE_DATA_DIR', None)
        else:
            os.environ['FLAKE_DATA_DIR'] = previous
    assert all(code == 0 for code in codes.values()), f'unclean exits: {codes}; logs in {tmp_path / "logs"}'


def test_two_microscopes_scan_at_once_into_one_registry(facility, ros):
    running, folder, shared, microscopes = facility
    outcomes, errors = {}, {}

    def scan(microscope: Microscope, chip_id: str) -> None:
        try:
            camera = camera_parameters([config_dir() / 'camera_node.yaml', shared, Path(microscope.params_file)])
            wafer = sim_wafer(camera)
            corners = wafer.corner_positions_stage(noise_m=2e-6, seed=1)
            result, flakes, _poses = run_scan(REGION, chip_id, corners, '10x', '', 0,
                                              folder / f'frames-{microscope.name}', timeout=900,
                                              namespace=microscope.name, registry_namespace='')
            outcomes[microscope.name] = (result, flakes, wafer)
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors[microscope.name] = error

    threads = [threading.Thread(target=scan, args=(m, f'chip-{m.name}')) for m in microscopes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1200)
    assert not errors, errors
    scan_ids = set()
    for name in SCOPES:
        result, flakes, wafer = outcomes[name]
        assert result.success and result.tiles_done == result.tiles_total == 4, result.message
        scan_ids.add(result.scan_id)
        # Each chip's flakes are its own: found on that microscope's virtual wafer.
        truth, too_small = targets_in_region(wafer, *REGION)
        score = score_scan([FoundFlake(f.flake_id, f.material, f.layer_class, f.centre, f.area) for f in flakes],
                           truth, region=REGION, ignored=too_small).total()
        assert score.matched_found >= 2, (name, score)
        assert all(f.flake_id for f in flakes)
    assert len(scan_ids) == 2
    ids = [{f.flake_id for f in outcomes[name][1]} for name in SCOPES]
    assert not ids[0] & ids[1], 'flake ids are unique across the microscopes'
    _check_frames_and_ownership(ros, folder)
    assert not running.dead()


def _check_frames_and_ownership(ros, folder: Path) -> None:
    """The registry keeps each chip's frame with the coordinator that measured it; the other
    microscope's coordinator reads it from there and refuses to scan a chip mounted elsewhere."""
    from rclpy.action import ActionClient
    from rclpy.executors import SingleThreadedExecutor
    from ros_helpers import spin_future, spin_until

    from flake_core.node_tools import ACTION_QOS, SERVICE_QOS
    from flake_msgs.action import Scan
    from flake_msgs.srv import GetWaferFrames

    node = ros.create_node('facility_probe')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        frames = node.create_client(GetWaferFrames, '/registry/get_wafer_frames', qos_profile=SERVICE_QOS)
        assert spin_until(executor, frames.service_is_ready, 30)
        answer = spin_future(executor, frames.call_async(GetWaferFrames.Request()), 30)
        owners = {frame.chip_id: frame.measured_by for frame in answer.frames}
        assert owners == {f'chip-{name}': f'/{name}/scan_coordinator' for name in SCOPES}
        action = ActionClient(node, Scan, '/scope2/scan', **ACTION_QOS)
        assert spin_until(executor, action.server_is_ready, 30)
        goal = Scan.Goal(chip_id='chip-scope1', region_min_x=REGION[0], region_min_y=REGION[1],
                         region_max_x=REGION[2], region_max_y=REGION[3])
        handle = spin_future(executor, action.send_goal_async(goal), 60)
        assert not handle.accepted
        action.destroy()
    finally:
        executor.shutdown()
        node.destroy_node()
    log = (folder / 'logs' / 'scope2.scan_coordinator.log').read_text()
    assert "chip 'chip-scope1' was last measured by /scope1/scan_coordinator" in log

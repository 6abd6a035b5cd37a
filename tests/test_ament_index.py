"""All five packages are found through the ament index, as `ros2 launch` would find them."""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
import pytest


@pytest.mark.parametrize('package', ['flake_msgs', 'flake_core', 'flake_scanner', 'flake_detector', 'flake_registry'])
def test_share_directory_holds_the_package_manifest(package):
    share = Path(get_package_share_directory(package))
    manifest = (share / 'package.xml').read_text()
    assert f'<name>{package}</name>' in manifest


def test_flake_msgs_share_holds_the_interface_definitions():
    share = Path(get_package_share_directory('flake_msgs'))
    names = {p.name for p in share.glob('*/*') if p.suffix in {'.msg', '.srv', '.action'}}
    for expected in ['Flake.msg', 'FlakeArray.msg', 'ScanFrame.msg', 'StageState.msg', 'DefectCell.msg',
                     'DefectReport.msg', 'MoveStage.srv', 'SetWaferFrame.srv', 'QueryFlakes.srv',
                     'GetFlake.srv', 'ReserveFlake.srv', 'ReleaseFlake.srv', 'MarkFlakeUsed.srv',
                     'AnalyzeDefects.srv', 'Scan.action', 'Autofocus.action']:
        assert expected in names


def test_every_service_response_has_success_error_code_and_message():
    import flake_msgs.srv as srv

    for name in ['MoveStage', 'SetWaferFrame', 'QueryFlakes', 'GetFlake', 'ReserveFlake',
                 'ReleaseFlake', 'MarkFlakeUsed', 'AnalyzeDefects']:
        response = getattr(srv, name).Response()
        assert response.success is False and response.error_code == '' and response.message == ''


@pytest.mark.parametrize('package, executables', [
    ('flake_scanner', ['stage_node', 'camera_node', 'autofocus_node', 'scan_coordinator', 'tiler_node']),
    ('flake_detector', ['detector_node', 'defect_analyzer_node']),
    ('flake_registry', ['registry_node']),
])
def test_executables_are_where_ros2_run_and_launch_look(package, executables):
    """<prefix>/lib/<package>/<executable>, as colcon's script_dir puts them (ros2 run, launch_ros)."""
    import os

    prefix = Path(get_package_share_directory(package)).parent.parent
    for name in executables:
        path = prefix / 'lib' / package / name
        assert path.is_file() and os.access(path, os.X_OK), path
        assert path.read_text().startswith('#!'), path


def test_launch_files_are_real_files_in_the_share():
    """ros2 launch PACKAGE FILE searches the share without following a linked directory."""
    share = Path(get_package_share_directory('flake_scanner'))
    for name in ('flake_system.launch.py', 'facility.launch.py'):
        path = share / 'launch' / name
        assert path.is_file() and not path.is_symlink() and not path.parent.is_symlink(), path
    assert (share / 'config' / 'fastdds_profile.xml').is_file()

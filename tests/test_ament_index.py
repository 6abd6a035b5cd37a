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

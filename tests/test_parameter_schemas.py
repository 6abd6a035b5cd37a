"""Node parameters come from one schema per node: config files hold only valid overrides, the docs
tables are generated from the schemas, and a schema refuses what a node would refuse."""

from dataclasses import FrozenInstanceError
from pathlib import Path
import subprocess
import sys

import pytest

from flake_core.parameters import check_overrides, defaults, load_overrides, overrides_by_node, view

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
from parameter_docs import all_schemas  # noqa: E402

CONFIG_FILES = sorted((ROOT / 'config').glob('*.yaml'))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_config_files_hold_only_declared_valid_overrides(path):
    schemas = all_schemas()
    for node, values in overrides_by_node(path).items():
        assert node in schemas, f'{path.name}: no node named {node!r}'
        assert not check_overrides(schemas[node], values), check_overrides(schemas[node], values)
        same = sorted(k for k, v in values.items() if defaults(schemas[node])[k] == v)
        assert not same, f'{path.name}: {node} repeats defaults {same}; config files hold overrides only'


def test_a_mistyped_key_a_wrong_type_and_a_value_out_of_range_are_each_named():
    from flake_scanner.parameters import ScanCoordinatorParameters, StageNodeParameters

    errors = check_overrides(StageNodeParameters, {'sped': 0.01, 'retries': 2.0, 'timeout': 50.0})
    assert any('sped is not a parameter' in e for e in errors)
    assert any('retries must be of type int' in e for e in errors)
    assert any('timeout must be <= 10.0' in e for e in errors)
    assert check_overrides(ScanCoordinatorParameters, {'overlap': 0}) == [
        'overlap must be of type float, got 0 (write it with a decimal point)']


def test_views_are_typed_frozen_and_carry_the_overrides(tmp_path):
    from flake_scanner.parameters import CameraNodeParameters

    params = tmp_path / 'lab.yaml'
    params.write_text('/**/camera_node:\n  ros__parameters:\n    exposure: 0.02\n    sim_seed: 3\n')
    camera = view(CameraNodeParameters, load_overrides([ROOT / 'config' / 'missing.yaml', params], 'camera_node'))
    assert (camera.exposure, camera.sim_seed, camera.gain) == (0.02, 3, 1.0)
    with pytest.raises(FrozenInstanceError):
        camera.gain = 2.0
    with pytest.raises(ValueError, match='exposure must be >= 1e-06'):
        view(CameraNodeParameters, {'exposure': 0.0})


def test_pixel_pitch_is_declared_by_the_camera_alone():
    holders = [node for node, schema in all_schemas().items() if any('pitch' in k for k in defaults(schema))]
    assert holders == ['camera_node']


def test_docs_tables_are_generated_from_the_schemas():
    result = subprocess.run([sys.executable, str(ROOT / 'tools' / 'parameter_docs.py'), '--check'],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_misspelled_backend_parameter_is_an_error_naming_it():
    from flake_detector.detection import make_detector

    with pytest.raises(ValueError, match="unexpected keyword argument 'oxide'"):
        make_detector('contrast', oxide=285.0)

"""The packages stand on flake_core and import each other one way only, as their manifests declare;
flake_core's vocabulary agrees with the interfaces."""

import ast
from pathlib import Path
import re
import subprocess
import sys

import pytest

from flake_core import materials

SRC = Path(__file__).resolve().parents[1] / 'src'
PYTHON_PACKAGES = ('flake_core', 'flake_scanner', 'flake_detector', 'flake_registry')
# What each package may import of the others: a one-way ladder with flake_core at the ground.
ALLOWED = {
    'flake_core': set(),
    'flake_scanner': {'flake_core', 'flake_msgs'},
    'flake_detector': {'flake_core', 'flake_msgs', 'flake_scanner'},
    'flake_registry': {'flake_core', 'flake_msgs', 'flake_detector'},
}
# flake_core modules that talk to ROS; every other module of it must import without rclpy.
CORE_ROS_MODULES = {'node_tools'}


def imported_projects(path: Path) -> set[str]:
    """Top-level project packages (flake_*) that a file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split('.')[0] for name in names if name.startswith('flake_')}
    return found


def declared_dependencies(package: str) -> set[str]:
    manifest = (SRC / package / 'package.xml').read_text()
    return set(re.findall(r'<(?:exec_)?depend>(flake_\w+)</', manifest))


@pytest.mark.parametrize('package', PYTHON_PACKAGES)
def test_imports_run_one_way_and_are_declared(package):
    used = set()
    for path in (SRC / package / package).rglob('*.py'):
        others = imported_projects(path) - {package}
        assert others <= ALLOWED[package], f'{path.relative_to(SRC)} imports {sorted(others - ALLOWED[package])}'
        used |= others
    undeclared = used - declared_dependencies(package)
    assert not undeclared, f'{package}/package.xml lacks {sorted(undeclared)}'


def test_flake_core_imports_without_ros():
    modules = sorted(p.stem for p in (SRC / 'flake_core' / 'flake_core').glob('*.py')
                     if p.stem not in CORE_ROS_MODULES | {'__init__'})
    code = ('import sys\n' + ''.join(f'import flake_core.{m}\n' for m in modules)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rclpy', 'rcl_interfaces')))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


def test_flake_message_layer_constants_match_the_vocabulary():
    from flake_msgs.msg import Flake

    for value, name in materials.LAYER_CLASS_NAMES.items():
        assert getattr(Flake, f'LAYER_{name.upper()}') == value


def test_every_material_has_one_colour_one_coco_id_and_optical_constants():
    entries = list(materials.MATERIALS.values())
    assert len({m.colour for m in entries} | {materials.UNKNOWN_COLOUR}) == len(entries) + 1
    ids = [c['id'] for c in materials.coco_categories()]
    assert len(ids) == len(set(ids))
    assert all(m.coco_id < materials.CONTAMINANT_CATEGORY_MIN for m in entries)
    for m in entries:
        assert len(m.refractive_index) == 3 and all(n.real > 1.0 and n.imag >= 0 for n in m.refractive_index)
        assert 0.3 <= m.layer_nm <= 1.0


@pytest.mark.parametrize('layers, expected', [(1, 'mono'), (2, 'few'), (10, 'few'), (11, 'thick'),
                                              (40, 'thick'), (41, 'bulk'), (0, 'unknown'), (float('nan'), 'unknown')])
def test_layer_classes_follow_masubuchi_2020(layers, expected):
    assert materials.layer_class_name(layers) == expected


def test_unknown_material_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match='known: graphene'):
        materials.parse_materials('graphene,unobtainium')
    assert materials.parse_materials(' Graphene, NbSe2 ') == ('graphene', 'nbse2')

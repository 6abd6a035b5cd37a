"""flake-registry command line over a real registry file."""

import io
import json

import pytest

from flake_registry.cli import build_parser, main, run
from flake_registry.store import FlakeStore, Sighting

UM = 1e-6


@pytest.fixture
def registry_file(tmp_path):
    path = tmp_path / 'registry.sqlite'
    with FlakeStore(path) as store:
        store.ingest([Sighting('chip-C', 'scan-C', x=i * 1e-3, y=0.0, material=('graphene', 'hbn')[i % 2],
                                score=0.1 * (i + 1), area=(i + 1) * 100 * UM * UM, layers=1.0, layer_class=1)
                      for i in range(6)])
    return path


def cli(path, *argv):
    out = io.StringIO()
    assert run(build_parser().parse_args(['--db', str(path), *argv]), out) == 0
    return out.getvalue()


def test_query_prints_a_table_with_human_units(registry_file):
    text = cli(registry_file, 'query', '--material', 'graphene', '--area-um2', '200:', '--sort', 'area')
    lines = text.splitlines()
    assert lines[0].split() == ['id', 'chip', 'material', 'class', 'layers', 'nm', 'area_um2', 'score', 'x_mm',
                                'y_mm', 'status', 'seen']
    rows = [line.split() for line in lines[2:-1]]
    assert [(r[2], r[6], r[8]) for r in rows] == [('graphene', '500.0', '4.0000'), ('graphene', '300.0', '2.0000')]
    assert lines[-1] == '1-2 of 2 flakes'
    near = cli(registry_file, 'query', '--near-mm', '3.1,0', '--within-um', '1500', '--sort', 'distance',
               '--format', 'json')
    assert [f['x'] for f in json.loads(near)['flakes']] == pytest.approx([3e-3, 4e-3, 2e-3])


def test_show_and_export(registry_file, tmp_path):
    shown = cli(registry_file, 'show', 'F0000002')
    assert shown.startswith('flake F0000002 on chip chip-C: hbn, mono') and 'scan scan-C tile 0' in shown
    target = tmp_path / 'out' / 'chip.csv'
    cli(registry_file, 'export', '--chip', 'chip-C', '--format', 'csv', '-o', str(target))
    assert len(target.read_text().splitlines()) == 7
    assert not list(target.parent.glob('*.part'))


def test_errors_exit_with_code_2_and_a_reason(registry_file, tmp_path, capsys):
    assert main(['--db', str(registry_file), 'query', '--layers', '5:1']) == 2
    assert 'INVALID_RANGE' in capsys.readouterr().err
    assert main(['--db', str(registry_file), 'show', 'F9']) == 2
    assert 'UNKNOWN_ID' in capsys.readouterr().err
    assert main(['--db', str(tmp_path / 'none.sqlite'), 'info']) == 2
    assert 'no registry' in capsys.readouterr().err
    assert not (tmp_path / 'none.sqlite').exists()

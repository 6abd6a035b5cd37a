"""flake-registry command line over a real registry file: people's units in and out, undo and control."""

import csv
import io
import json

import pytest

from flake_core.units import local_time
from flake_registry import labelling, stacks
from flake_registry.cli import build_parser, main, run
from flake_registry.store import FlakeStore, Sighting

UM = 1e-6


@pytest.fixture
def registry_file(tmp_path):
    path = tmp_path / 'registry.sqlite'
    with FlakeStore(path) as store:
        store.ingest([Sighting('chip-C', 'scan-C', x=i * 1e-3, y=0.0, material=('graphene', 'hbn')[i % 2],
                               score=0.1 * (i + 1), area=(i + 1) * 100 * UM * UM, layers=1.0, layer_class=1,
                               thickness_nm=0.34, contour=[(i * 1e-3, 0.0), (i * 1e-3 + 1e-5, 0.0),
                                                           (i * 1e-3, 1e-5)], stamp=1.7e9)
                      for i in range(6)])
    return path


def cli(path, *argv):
    out = io.StringIO()
    assert run(build_parser().parse_args(['--db', str(path), *argv]), out) == 0
    return out.getvalue()


def refused(path, *argv, capsys):
    assert main(['--db', str(path), *argv]) == 2
    return capsys.readouterr().err


def test_query_prints_a_table_in_micrometres(registry_file):
    text = cli(registry_file, 'query', '--material', 'graphene', '--area', '200:', '--sort', 'area')
    lines = text.splitlines()
    assert lines[0].split() == ['id', 'chip', 'material', 'class', 'layers', 'thickness_nm', 'area_um2', 'score',
                                'x_um', 'y_um', 'status', 'seen']
    rows = [line.split() for line in lines[2:-1]]
    assert [(r[2], r[6], r[8]) for r in rows] == [('graphene', '500.0', '4000.0'), ('graphene', '300.0', '2000.0')]
    assert lines[-1] == '1-2 of 2 flakes'
    # A value may carry its own unit: the same query in mm^2.
    assert cli(registry_file, 'query', '--material', 'graphene', '--area', '0.0002mm2:', '--sort', 'area') == text
    near = cli(registry_file, 'query', '--near', '3100,0', '--within', '1500', '--sort', 'distance', '--format', 'json')
    assert [f['x_um'] for f in json.loads(near)['flakes']] == pytest.approx([3000, 4000, 2000])
    in_mm = cli(registry_file, 'query', '--near', '3.1mm, 0mm', '--within', '1.5 mm', '--sort', 'distance',
                '--format', 'json')
    assert in_mm == near
    region = cli(registry_file, 'query', '--region', '1500,-10,4.5mm,10', '--material', 'hbn,graphene')
    assert region.splitlines()[-1] == '1-3 of 3 flakes'
    assert cli(registry_file, 'query', '--thickness', '0.3:0.4', '--layer-class', 'mono,few').splitlines()[-1] == \
        '1-6 of 6 flakes'


def test_typed_units_of_the_wrong_kind_are_refused_by_name(registry_file, capsys):
    assert "--near: 'kg' in '3 kg' is not a unit of length" in refused(registry_file, 'query', '--near', '3 kg,0',
                                                                        capsys=capsys)
    assert 'INVALID_RANGE' in refused(registry_file, 'query', '--layers', '5:1', capsys=capsys)
    assert '--area: expected MIN:MAX' in refused(registry_file, 'query', '--area', '200', capsys=capsys)
    assert '--within needs a point --near' in refused(registry_file, 'query', '--within', '5', capsys=capsys)
    assert "unknown status 'lost'" in refused(registry_file, 'query', '--status', 'lost', capsys=capsys)


def test_a_file_that_cannot_be_written_is_one_line_not_a_traceback(registry_file, tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    said = refused(registry_file, 'export', '--chip', 'chip-C', '--format', 'csv', '-o', str(blocker / 'chip.csv'),
                   capsys=capsys)
    assert said.startswith('error: ') and said.count('\n') == 1 and 'Traceback' not in said


def test_show_speaks_micrometres_and_local_time(registry_file):
    shown = cli(registry_file, 'show', 'F0000002')
    assert shown.startswith('flake F0000002 on chip chip-C: hbn, mono (1.0 layers, 0.34 nm)')  # no "+- 0.0"
    assert 'x 1000.0 um, y 0.0 um (wafer frame)' in shown and 'area        200.0 um^2' in shown
    assert f'found       {local_time(1.7e9)}' in shown
    record = json.loads(cli(registry_file, 'show', 'F0000002', '--json'))
    assert (record['x_um'], record['area_um2'], record['outline_um'][1]) == (1000.0, 200.0, [1010.0, 0.0])


def test_csv_export_headers_carry_units(registry_file, tmp_path):
    target = tmp_path / 'out' / 'chip.csv'
    cli(registry_file, 'export', '--chip', 'chip-C', '--format', 'csv', '-o', str(target))
    assert not list(target.parent.glob('*.part'))
    with open(target, newline='') as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = reader.fieldnames
    for column in ('x_um', 'y_um', 'area_um2', 'thickness_nm', 'thickness_std_nm', 'isolation_um',
                   'detected_local_time', 'outline_um'):
        assert column in header
    for bare in ('x', 'y', 'area', 'created', 'contour'):
        assert bare not in header  # a number without its unit
    assert len(rows) == 6
    assert float(rows[1]['x_um']) == 1000.0 and float(rows[1]['area_um2']) == 200.0
    assert rows[1]['detected_local_time'] == local_time(1.7e9)
    assert json.loads(rows[1]['outline_um'])[1] == [1010.0, 0.0]
    document = json.loads(cli(registry_file, 'export', '--chip', 'chip-C', '--format', 'json'))
    assert document['units']['length'] == 'um' and document['flakes'][0]['x_um'] == 0.0


def test_undo_release_and_mark_used_go_through_the_registry_and_its_history(registry_file, capsys):
    with FlakeStore(registry_file) as store:
        store.reserve('F0000001', 'arm-7', 3600.0)           # a mistaken reservation
        robot = store.reserve('F0000003', 'arm-8', 3600.0)
    assert cli(registry_file, 'release', 'F0000001', '--by', 'alice') == \
        'released F0000001 (was reserved by arm-7)\n'
    assert 'NOT_RESERVED' in refused(registry_file, 'release', 'F0000001', '--by', 'alice', capsys=capsys)
    history = cli(registry_file, 'history', 'F0000001').splitlines()
    assert 'reserved by arm-7 until' in history[0]
    assert history[1].endswith('released (arm-7)')

    assert cli(registry_file, 'mark-used', 'F0000002', '--by', 'alice', '--note', 'stack 4') == \
        'F0000002 is used (cli-alice: marked used with flake-registry by alice: stack 4)\n'
    assert 'ALREADY_USED' in refused(registry_file, 'mark-used', 'F0000002', '--by', 'bob', capsys=capsys)
    # A reserved flake is marked used under its holder's reservation.
    assert 'is used (arm-8:' in cli(registry_file, 'mark-used', 'F0000003', '--by', 'bob')
    with FlakeStore(registry_file) as store:
        assert store.get_flake('F0000002').flake.used_by == 'cli-alice'
        assert [r['outcome'] for r in store.reservations('F0000003', live_only=False)] == ['used']
        assert store.reservations('F0000003', live_only=False)[0]['token'] == robot.token
    assert 'used (cli-alice)' in cli(registry_file, 'history', 'F0000002')
    assert 'INVALID_ARGUMENT' in refused(registry_file, 'release', 'F0000004', '--by', ' ', capsys=capsys)
    assert 'UNKNOWN_ID' in refused(registry_file, 'release', 'F0000099', '--by', 'alice', capsys=capsys)


def test_unreserve_a_stack_and_correct_or_withdraw_labels(registry_file, capsys):
    with FlakeStore(registry_file) as store:
        recipe = stacks.save_recipe(store, 'bilayer', [stacks.StackLayer('F0000004'), stacks.StackLayer('F0000005')])
        stacks.reserve_recipe(store, recipe.id, 'arm-1', 600.0)
        first = labelling.label_flake(store, 'F0000006', labelling.make_label('accept', 'hbn', 'mono'), 'carol')
    text = cli(registry_file, 'unreserve-stack', recipe.id, '--by', 'alice')
    assert text == f'released F0000004, F0000005 of stack {recipe.id}\n'
    with FlakeStore(registry_file) as store:
        assert store.reservations('F0000004') == [] and store.reservations('F0000005') == []

    corrected = cli(registry_file, 'label-correct', str(first), '--verdict', 'relabel', '--material', 'hbn',
                    '--layer-class', 'few', '--by', 'dave')
    assert corrected.startswith(f"label {first} 'accept:hbn:mono' corrected to 'relabel:hbn:few'")
    with FlakeStore(registry_file) as store:
        latest = [r for r in labelling.latest_labels(store) if r['flake_id'] == 'F0000006']
        assert [r['label'] for r in latest] == ['relabel:hbn:few']
        newest = latest[0]['id']
    assert cli(registry_file, 'label-withdraw', str(newest), '--by', 'dave').startswith(f'label {newest} withdrawn')
    assert 'INVALID_ARGUMENT' in refused(registry_file, 'label-withdraw', str(newest), '--by', 'dave', capsys=capsys)
    assert 'UNKNOWN_ID' in refused(registry_file, 'label-withdraw', '999', '--by', 'dave', capsys=capsys)
    listed = cli(registry_file, 'labels', '--flake', 'F0000006')
    assert 'accept:hbn:mono' in listed and 'withdrawn by dave' in listed
    history = cli(registry_file, 'history', 'F0000006')
    assert f"label {first} 'accept:hbn:mono' by carol" in history and f'label {newest} withdrawn by dave' in history
    with FlakeStore(registry_file) as store:
        # The withdrawn correction no longer counts: the first label is the flake's label again.
        assert [r['label'] for r in labelling.latest_labels(store) if r['flake_id'] == 'F0000006'] == \
            ['accept:hbn:mono']


def test_errors_exit_with_code_2_and_a_reason(registry_file, tmp_path, capsys):
    assert 'UNKNOWN_ID' in refused(registry_file, 'show', 'F9', capsys=capsys)
    assert main(['--db', str(tmp_path / 'none.sqlite'), 'info']) == 2
    assert 'no registry' in capsys.readouterr().err
    assert not (tmp_path / 'none.sqlite').exists()


def test_info_lists_chips_and_scans_with_local_start_times(registry_file):
    text = cli(registry_file, 'info')
    assert 'schema version' in text and 'chip-C' in text
    assert local_time(1.7e9) in text  # the scan's start, as the sightings were stamped

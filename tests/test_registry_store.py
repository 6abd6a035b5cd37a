"""FlakeStore on both backends (SQLite files, a real PostgreSQL server): schema and migrations, merge,
queries, leases, exports. Tests of SQLite's own file handling use a file directly."""

import csv
from dataclasses import replace
import io
import json
import math
import random
import sqlite3
import subprocess
import sys
import threading

from pycocotools.coco import COCO
import pytest
from registry_backends import postgres_server, registry_url  # noqa: F401 - fixtures
from ros_helpers import HELPERS

from flake_core.geometry import WaferFrame
from flake_core.materials import LAYER_FEW, LAYER_MONO, LAYER_THICK
from flake_registry import stacks
from flake_registry.export import build_coco, export_csv, export_json
from flake_registry.query import (
    STATUS_AVAILABLE,
    STATUS_RESERVED,
    STATUS_USED,
    FlakeQuery,
    RegistryError,
)
from flake_registry.reservations import reserve_in
from flake_registry.store import SCHEMA_VERSION, FlakeStore, SchemaError, Sighting

UM = 1e-6


class FakeClock:
    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def square(x, y, side, **fields):
    """A detection with a square outline of `side` metres centred on (x, y)."""
    h = side / 2
    fields.setdefault('chip_id', 'chip-1')
    fields.setdefault('scan_id', 'scan-1')
    fields.setdefault('material', 'graphene')
    fields.setdefault('score', 0.5)
    return Sighting(x=x, y=y, area=side * side,
                     contour=[(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)], **fields)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(registry_url, clock):  # noqa: F811 - the fixture imported above
    with FlakeStore(registry_url, clock=clock, default_lease_s=60.0) as store:
        yield store


@pytest.fixture
def populated(store):
    """60 flakes on a 10 x 6 grid 100 um apart, with seeded properties."""
    rng = random.Random(7)
    materials = ['graphene', 'hbn', 'mos2']
    batch = []
    for i in range(60):
        layers = rng.choice([1, 2, 5, 20])
        batch.append(square((i % 10) * 100 * UM, (i // 10) * 100 * UM, rng.uniform(5, 30) * UM,
                            material=materials[i % 3], layers=float(layers), thickness_nm=0.34 * layers,
                            layer_class=LAYER_MONO if layers == 1 else LAYER_FEW if layers < 10 else LAYER_THICK,
                            score=round(rng.random(), 3), homogeneity=rng.random(), tile_index=i // 10,
                            chip_id='chip-1' if i < 40 else 'chip-2', scan_id='scan-1' if i < 40 else 'scan-2'))
    outcomes = store.ingest(batch)
    assert all(o.is_new for o in outcomes)
    return store, batch, [o.flake_id for o in outcomes]


# -- schema -------------------------------------------------------------------

def test_new_registry_has_current_schema(store):
    assert store.schema_version == SCHEMA_VERSION == 10
    tables = set(store.table_names())
    assert {'chips', 'scans', 'frames', 'flakes', 'observations', 'images', 'reservations', 'defect_reports',
            'labels', 'schema_version', 'flake_boxes', 'stack_recipes', 'wafer_frames'} <= tables
    with store.snapshot() as tx:
        assert [r['version'] for r in tx.all('SELECT version FROM schema_version ORDER BY version')] == \
            list(range(1, SCHEMA_VERSION + 1))
    assert store.integrity_check() == 'ok'


def test_new_file_has_current_schema_wal_and_full_sync(tmp_path):
    store = FlakeStore(tmp_path / 'registry.sqlite')
    assert store.schema_version == SCHEMA_VERSION == 10
    tables = set(store.table_names())
    assert {'chips', 'scans', 'frames', 'flakes', 'observations', 'images', 'reservations', 'defect_reports',
            'labels', 'schema_version', 'flake_boxes', 'stack_recipes', 'wafer_frames'} <= tables
    assert store.db.conn.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    assert store.db.conn.execute('PRAGMA synchronous').fetchone()[0] == 2  # FULL
    assert store.integrity_check() == 'ok'
    store.close()


def test_batches_commit_with_normal_sync_and_claims_with_full(tmp_path):
    store = FlakeStore(tmp_path / 'registry.sqlite')

    def mode():
        return store.db.conn.execute('PRAGMA synchronous').fetchone()[0]

    flake_id = store.ingest([square(0.0, 0.0, 10 * UM)])[0].flake_id
    assert mode() == 1  # NORMAL: a batch survives crashes of the process; a rescan restores it after power loss
    store.reserve(flake_id, 'robot-a')
    assert mode() == 2  # FULL: a claim survives power loss too


def test_writers_take_turns_and_a_writer_held_up_past_the_busy_timeout_is_told(tmp_path):
    from flake_registry.database import SQLiteDatabase

    path = tmp_path / 'registry.sqlite'
    FlakeStore(path).close()
    holder, waiter = SQLiteDatabase(path), SQLiteDatabase(path, busy_timeout_s=0.2)
    inside, release = threading.Event(), threading.Event()

    def hold():
        with holder.transaction() as tx:
            tx.execute("INSERT INTO chips (id, created, updated) VALUES ('held', 0, 0)")
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert inside.wait(30)
    with pytest.raises(sqlite3.OperationalError, match='database is locked'):
        with waiter.transaction() as tx:
            tx.execute("INSERT INTO chips (id, created, updated) VALUES ('waited', 0, 0)")
    release.set()
    thread.join(30)
    with waiter.transaction() as tx:   # the turn is free again
        tx.execute("INSERT INTO chips (id, created, updated) VALUES ('waited', 0, 0)")
    with waiter.snapshot() as tx:
        assert sorted(r['id'] for r in tx.all('SELECT id FROM chips')) == ['held', 'waited']
    holder.close()
    waiter.close()


def test_version_1_file_is_migrated_and_keeps_its_flakes(tmp_path):
    path = tmp_path / 'old.sqlite'
    with FlakeStore(path, schema_target=1) as old:
        assert old.schema_version == 1
        assert 'labels' not in old.db.table_names()
        flake_id = old.ingest([square(0.0, 0.0, 10 * UM)])[0].flake_id
    with FlakeStore(path) as new:
        assert new.schema_version == SCHEMA_VERSION
        assert new.get_flake(flake_id).flake.area == pytest.approx(1e-10)
        assert new.query(FlakeQuery()).total == new.query(FlakeQuery(chip_id='chip-1')).total == 1
        label_id = new.add_label('monolayer', 'alice', flake_id=flake_id)
        assert new.labels(flake_id) == [{'id': label_id, 'flake_id': flake_id, 'crop_path': None,
                                         'label': 'monolayer', 'labelled_by': 'alice',
                                         'created': pytest.approx(new.clock(), abs=5)}]
        versions = [r['version'] for r in new.db.query('SELECT version FROM schema_version ORDER BY version')]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        indexes = {r['name'] for r in new.db.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert 'idx_flakes_material_layers_score' in indexes and 'idx_flakes_material_layers' not in indexes


def test_file_from_newer_software_is_refused(tmp_path):
    path = tmp_path / 'future.sqlite'
    FlakeStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute('INSERT INTO schema_version VALUES (99, 0, "from the future")')
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match='newer'):
        FlakeStore(path)


def test_version_4_file_keeps_its_stack_recipes_and_chip_frame(tmp_path):
    """Migration 5 adopts the stack_recipes table older code made itself; 6 moves chip frames out of `chips`."""
    path = tmp_path / 'v4.sqlite'
    with FlakeStore(path, schema_target=4) as old:
        flake_id = old.ingest([square(0.0, 0.0, 10 * UM)])[0].flake_id
        with old.transaction() as tx:
            tx.execute('CREATE TABLE stack_recipes (id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL, '
                       'created_by TEXT, robot_id TEXT, reserved_at REAL, lease_expires REAL, layers TEXT NOT NULL)')
            tx.execute("INSERT INTO stack_recipes (id, name, created, layers) VALUES ('S0123456789ab', 'old', 1, ?)",
                       (json.dumps([{'flake_id': flake_id}]),))
            quarter_turn = [0.0, 1.0, -2e-3, -1.0, 0.0, 1e-3]  # stage_to_wafer of a chip turned by +90 degrees
            tx.execute('UPDATE chips SET corners = ?, stage_to_wafer = ? WHERE id = ?',
                       ('[[0.001, 0.002], [0.001, 0.007], [-0.004, 0.002]]', json.dumps(quarter_turn), 'chip-1'))
    with FlakeStore(path) as new:
        assert new.schema_version == SCHEMA_VERSION
        assert stacks.get_recipe(new, 'S0123456789ab').layers[0].flake_id == flake_id
        frame = new.wafer_frame('chip-1')
        assert frame.stage_to_wafer == quarter_turn
        assert frame.rotation == pytest.approx(math.pi / 2)
        assert frame.corners == [(0.001, 0.002), (0.001, 0.007), (-0.004, 0.002)]
        assert set(new.chips()[0]) == {'id', 'note', 'created', 'updated', 'flakes'}


@pytest.fixture(params=('sqlite', 'postgresql'))
def empty_registry_url(request, tmp_path):
    """Where a registry can be made at any schema version (no migrated template)."""
    if request.param == 'sqlite':
        return str(tmp_path / 'registry.sqlite')
    return request.getfixturevalue('postgres_server').create_database(f'empty_{tmp_path.name}'.lower()[:60])


def test_version_7_registry_gets_chip_keys_and_keeps_its_reservations(empty_registry_url):
    """Migration 8 adds who ended a reservation (unknown for older ones); 9 puts the chip into the spatial index."""
    with FlakeStore(empty_registry_url, schema_target=7) as old:
        assert old.schema_version == 7
        outcomes = old.ingest([square(1e-3, 1e-3, 10 * UM), square(1e-3, 1e-3, 10 * UM, chip_id='chip-2'),
                               square(3e-3, 1e-3, 10 * UM, chip_id='chip-2')])
        flake_id = outcomes[1].flake_id
        with old.transaction() as tx:
            tx.execute("INSERT INTO reservations (flake_pk, robot_id, token, created, expires, ended, outcome) "
                       "SELECT pk, 'arm-1', 'old-token', 1.0, 100.0, 50.0, 'released' FROM flakes WHERE id = ?",
                       (flake_id,))
    with FlakeStore(empty_registry_url) as new:
        assert new.schema_version == SCHEMA_VERSION == 10
        assert [(r['outcome'], r['ended_by']) for r in new.reservations(flake_id, live_only=False)] == [
            ('released', None)]
        with new.snapshot() as tx:
            keys = {r['id']: r['chip_key'] for r in tx.all('SELECT id, chip_key FROM chips')}
        assert sorted(keys) == ['chip-1', 'chip-2'] and len(set(keys.values())) == 2
        around = (0.9e-3, 0.9e-3, 1.1e-3, 1.1e-3)
        assert [f.id for f in new.query(FlakeQuery(chip_id='chip-2', region=around)).flakes] == [flake_id]
        assert [f.id for f in new.query(FlakeQuery(chip_id='chip-1', region=around)).flakes] == [outcomes[0].flake_id]
        # Ingest after the migration merges on the right chip and gives a new chip the next key.
        later = new.ingest([square(1e-3 + 1 * UM, 1e-3, 10 * UM, chip_id='chip-2'), square(0.0, 0.0, 10 * UM,
                                                                                          chip_id='chip-3')])
        assert later[0].flake_id == flake_id and later[1].is_new
        with new.snapshot() as tx:
            assert tx.scalar("SELECT chip_key FROM chips WHERE id = 'chip-3'") not in keys.values()
        assert new.query(FlakeQuery(chip_id='chip-3', near=(0.0, 0.0), max_distance=2 * UM)).total == 1
        assert new.integrity_check() == 'ok'


def test_version_9_registry_keeps_its_defect_reports_as_not_recorded(empty_registry_url):
    """Migration 10 adds what a defect analysis assumed; reports stored before it never said."""
    with FlakeStore(empty_registry_url, schema_target=9) as old:
        flake_id = old.ingest([square(0.0, 0.0, 10 * UM)])[0].flake_id
        with old.transaction() as tx:
            tx.execute("INSERT INTO defect_reports (flake_pk, image_id, cells_total, class_names, counts, created) "
                       "SELECT pk, 'stem-old', 400, ?, ?, 1.0 FROM flakes WHERE id = ?",
                       (json.dumps(['Perfect', 'V_Te1']), json.dumps([390, 10]), flake_id))
    with FlakeStore(empty_registry_url) as new:
        assert new.schema_version == SCHEMA_VERSION == 10
        [report] = new.defect_reports(flake_id)
        assert (report['image_id'], report['class_names'], report['counts']) == ('stem-old', ['Perfect', 'V_Te1'],
                                                                               [390, 10])
        assert (report['material'], report['detector'], report['detector_source'], report['warnings']) == (
            '', '', '', [])
        new.add_defect_report({'image_id': 'stem-new', 'material': 'mote2'}, flake_id=flake_id)
        assert [r['material'] for r in new.defect_reports(flake_id)] == ['', 'mote2']


def test_every_table_is_made_by_a_numbered_migration(store, populated):
    store, _, flake_ids = populated
    tables = set(store.table_names())
    recipe = stacks.save_recipe(store, 'pair', [stacks.StackLayer(flake_ids[0]), stacks.StackLayer(flake_ids[1])])
    stacks.reserve_recipe(store, recipe.id, 'arm-1', 30.0)
    store.save_wafer_frame('chip-1', [(0.0, 0.0), (0.01, 0.0), (0.0, 0.01)])
    assert set(store.table_names()) == tables


def test_wafer_frame_is_measured_kept_and_seen_by_another_store(store, tmp_path, clock):
    corners = [(1e-3, 2e-3), (1e-3 + 5e-3 * math.cos(0.01), 2e-3 + 5e-3 * math.sin(0.01)), (0.5e-3, 6e-3)]
    saved = store.save_wafer_frame('chip-9', corners, measured_by='/scope1/scan_coordinator')
    expected = WaferFrame.from_corners(corners)
    assert saved.stage_to_wafer == pytest.approx(expected.stage_to_wafer.as_list())
    assert saved.rotation == pytest.approx(0.01) and saved.residual == pytest.approx(expected.residual)
    with FlakeStore(store.url) as other:  # a second coordinator, or the same one after a restart
        assert other.wafer_frame('chip-9') == saved
        assert other.wafer_frame('chip-unknown') is None
    clock.now += 60
    remeasured = store.save_wafer_frame('chip-9', [(0.0, 0.0), (0.01, 0.0), (0.0, 0.01)])
    assert store.wafer_frames() == {'chip-9': remeasured}
    assert store.wafer_frames(['chip-9', 'chip-unknown']) == {'chip-9': remeasured}
    assert [f.measured_at for f in store.wafer_frame_history('chip-9')] == [clock.now - 60, clock.now]
    assert [c['id'] for c in store.chips()] == ['chip-9']


@pytest.mark.parametrize('chip_id, corners, code', [
    ('', [(0, 0), (1e-2, 0), (0, 1e-2)], 'INVALID_ARGUMENT'),
    ('c', [(0, 0), (1e-2, 0)], 'INVALID_ARGUMENT'),
    ('c', [(0, 0), (1e-2, 0), (float('nan'), 1e-2)], 'INVALID_ARGUMENT'),
    ('c', [(0, 0), (1e-2, 0), (2e-2, 0)], 'DEGENERATE'),
    ('c', [(0, 0), (1e-2, 0), (0, -1e-2)], 'DEGENERATE'),
])
def test_bad_wafer_frames_are_refused_with_a_code(store, chip_id, corners, code):
    with pytest.raises(RegistryError) as refused:
        store.save_wafer_frame(chip_id, corners)
    assert refused.value.code == code
    assert store.wafer_frames() == {}


def test_transaction_commits_together_or_not_at_all(populated):
    store, _, flake_ids = populated
    with pytest.raises(RuntimeError), store.transaction() as tx:
        reserve_in(tx, flake_ids[:2], 'arm-1', 30.0, store.clock())
        assert tx.scalar('SELECT COUNT(*) FROM reservations') == 2  # seen inside the transaction
        raise RuntimeError('the robot changed its mind')
    assert store.reservations() == []
    with store.transaction() as tx:
        reserve_in(tx, flake_ids[:2], 'arm-1', 30.0, store.clock())
    with store.snapshot() as tx:
        assert [r['robot_id'] for r in tx.all('SELECT robot_id FROM reservations')] == ['arm-1', 'arm-1']


# -- merge --------------------------------------------------------------------

def test_overlapping_tiles_and_rescan_merge_into_one_flake(store):
    first = store.ingest([square(1e-3, 1e-3, 20 * UM, score=0.6, tile_index=3)])[0]
    # The neighbouring tile sees the same flake 2 um off (stage error), with a better score.
    second = store.ingest([square(1e-3 + 2 * UM, 1e-3, 20 * UM, score=0.9, tile_index=4)])[0]
    rescan = store.ingest([square(1e-3 - 1 * UM, 1e-3 + 1 * UM, 20 * UM, score=0.7, scan_id='scan-2')])[0]
    assert first.is_new and not second.is_new and not rescan.is_new
    assert first.flake_id == second.flake_id == rescan.flake_id
    detail = store.get_flake(first.flake_id)
    assert detail.flake.n_observations == 3
    assert [(o.scan_id, o.tile_index) for o in detail.observations] == [('scan-1', 3), ('scan-1', 4),
                                                                       ('scan-2', 0)]
    # The record keeps the best sighting's fields.
    assert detail.flake.score == pytest.approx(0.9)
    assert detail.flake.x == pytest.approx(1e-3 + 2 * UM)
    assert detail.observations[1].iou == pytest.approx(18 / 22, rel=1e-4)  # R*Tree stores float32
    assert store.count() == 1


def test_nearby_distinct_flakes_other_chips_and_bad_input_stay_apart(store):
    outcomes = store.ingest([
        square(0.0, 0.0, 10 * UM),
        square(40 * UM, 0.0, 10 * UM),                  # 40 um away: a neighbour, not the same flake
        square(0.0, 0.0, 10 * UM, chip_id='chip-2'),    # same place on another chip
        square(float('nan'), 0.0, 10 * UM),
        square(0.0, 0.0, 10 * UM, material='gold'),
        square(1 * UM, 0.0, 10 * UM),                   # same flake as the first, in the same batch
    ])
    assert [o.is_new for o in outcomes] == [True, True, True, False, False, False]
    assert 'x is not finite' in outcomes[3].error and 'material' in outcomes[4].error
    assert outcomes[5].flake_id == outcomes[0].flake_id
    assert len({o.flake_id for o in outcomes if o.flake_id}) == 3
    # Totals of unfiltered and chip-only queries come from the chips' counts of flakes.
    assert store.query(FlakeQuery()).total == store.count() == 3
    assert [store.query(FlakeQuery(chip_id=chip)).total for chip in ('chip-1', 'chip-2', 'none')] == [2, 1, 0]
    assert [c['flakes'] for c in store.chips()] == [2, 1]
    assert store.count() == 3
    here = (-1 * UM, -1 * UM, 1 * UM, 1 * UM)
    assert [store.query(FlakeQuery(chip_id=chip, region=here)).flakes[0].id for chip in ('chip-1', 'chip-2')] == [
        outcomes[0].flake_id, outcomes[2].flake_id]
    assert store.query(FlakeQuery(region=here)).total == 2


def _merge_one_by_one(sightings, rule_distance=5e-6, rule_iou=0.3):
    """The merge rule applied by comparing each sighting with every flake made before it: flake index per sighting."""
    from flake_registry.ingest import box_iou

    flakes = []                                 # [chip, x, y, score, box]
    assigned = []
    for sighting in sightings:
        box = sighting.wafer_box()
        best, best_rank = None, None
        for index, (chip, x, y, _, other) in enumerate(flakes):
            distance = math.hypot(x - sighting.x, y - sighting.y)
            iou = box_iou(box, other)
            if chip != sighting.chip_id or (distance > rule_distance and iou < rule_iou):
                continue
            rank = (iou, -distance, -index)
            if best_rank is None or rank > best_rank:
                best, best_rank = index, rank
        if best is None:
            flakes.append([sighting.chip_id, sighting.x, sighting.y, sighting.score, box])
            assigned.append(len(flakes) - 1)
            continue
        if sighting.score > flakes[best][3]:
            flakes[best] = [sighting.chip_id, sighting.x, sighting.y, sighting.score, box]
        assigned.append(best)
    return assigned


def test_a_batch_merges_as_if_each_sighting_met_every_flake_before_it(store):
    """Sightings of one batch find the flakes made earlier in it through a grid of cells: the same flakes as
    comparing each with all of them, with flakes much larger than a cell and sightings on two chips."""
    rng = random.Random(11)
    batch = []
    for i in range(400):
        chip = 'chip-1' if i % 3 else 'chip-2'
        if i % 97 == 0:                         # a crystal-sized flake over many cells
            batch.append(square(rng.uniform(0, 600) * UM, rng.uniform(0, 600) * UM, 900 * UM, chip_id=chip,
                                score=rng.random()))
            continue
        # Dense: most sightings land near an earlier one (a tile seen twice, neighbouring tiles).
        x, y = rng.uniform(0, 600) * UM, rng.uniform(0, 600) * UM
        if batch and rng.random() < 0.5:
            earlier = rng.choice(batch)
            x, y, chip = earlier.x + rng.uniform(-6, 6) * UM, earlier.y + rng.uniform(-6, 6) * UM, earlier.chip_id
        batch.append(square(x, y, rng.uniform(3, 70) * UM, chip_id=chip, score=rng.random()))
    outcomes = store.ingest(batch)
    order = sorted({o.flake_id for o in outcomes})   # new flakes are numbered in order of discovery
    assigned = [order.index(o.flake_id) for o in outcomes]
    assert assigned == _merge_one_by_one(batch)
    assert 30 < len(order) < 350                 # merged and distinct flakes both


# -- queries ------------------------------------------------------------------

def test_filters_match_a_brute_force_scan(populated):
    store, batch, ids = populated
    flakes = list(zip(ids, batch, strict=True))

    def expect(predicate):
        return {i for i, d in flakes if predicate(d)}

    def got(**kwargs):
        result = store.query(FlakeQuery(limit=1000, **kwargs))
        assert result.total == len(result.flakes)
        return {f.id for f in result.flakes}

    assert got(materials=('hbn',)) == expect(lambda d: d.material == 'hbn')
    assert got(materials=('graphene',), layer_classes=(LAYER_MONO,)) == expect(
        lambda d: d.material == 'graphene' and d.layer_class == LAYER_MONO)
    assert got(layers_min=2, layers_max=5) == expect(lambda d: 2 <= d.layers <= 5)
    assert got(thickness_nm_min=1.0) == expect(lambda d: d.thickness_nm >= 1.0)
    assert got(area_min=100 * UM**2, area_max=400 * UM**2) == expect(lambda d: 100 * UM**2 <= d.area <= 400 * UM**2)
    assert got(min_score=0.5, min_homogeneity=0.3) == expect(lambda d: d.score >= 0.5 and d.homogeneity >= 0.3)
    assert got(chip_id='chip-2') == expect(lambda d: d.chip_id == 'chip-2')
    assert got(scan_id='scan-1') == expect(lambda d: d.scan_id == 'scan-1')
    assert got(region=(150 * UM, 50 * UM, 450 * UM, 250 * UM)) == expect(
        lambda d: 150 * UM <= d.x <= 450 * UM and 50 * UM <= d.y <= 250 * UM)
    near = (300 * UM, 200 * UM)
    assert got(near=near, max_distance=150 * UM) == expect(
        lambda d: (d.x - near[0]) ** 2 + (d.y - near[1]) ** 2 <= (150 * UM) ** 2)
    assert len(got(near=near, max_distance=150 * UM)) == 9  # 5 on the axes and 4 on the diagonals at 141 um
    # The chip is a dimension of the spatial index: both chips hold flakes in this square.
    square_mm = (0.0, 250 * UM, 1e-3, 1e-3)
    for chip in ('chip-1', 'chip-2'):
        assert got(chip_id=chip, region=square_mm) == expect(
            lambda d, chip=chip: d.chip_id == chip and d.y >= 250 * UM)
        assert got(chip_id=chip, near=(450 * UM, 350 * UM), max_distance=120 * UM) == expect(
            lambda d, chip=chip: d.chip_id == chip and (d.x - 450 * UM) ** 2 + (d.y - 350 * UM) ** 2 <= (120 * UM) ** 2)
    assert got(chip_id='chip-1', region=square_mm) and got(chip_id='chip-2', region=square_mm)
    assert got(chip_id='no-such-chip', region=square_mm) == set()


def test_sorting_and_paging(populated):
    store, batch, ids = populated
    by_score = store.query(FlakeQuery(limit=1000)).flakes
    assert [f.score for f in by_score] == sorted((d.score for d in batch), reverse=True)
    by_area = store.query(FlakeQuery(sort_by='area', ascending=True, limit=1000)).flakes
    assert [f.area for f in by_area] == sorted(d.area for d in batch)
    nearest = store.query(FlakeQuery(sort_by='distance', near=(0.0, 0.0), limit=3)).flakes
    assert [f.id for f in nearest] == [ids[0], ids[1], ids[10]] or [f.id for f in nearest] == [ids[0], ids[10],
                                                                                             ids[1]]
    oldest_first = store.query(FlakeQuery(sort_by='created', ascending=True, limit=1000)).flakes
    assert [f.id for f in oldest_first] == ids
    pages = [store.query(FlakeQuery(limit=7, offset=offset)) for offset in range(0, 60, 7)]
    assert all(p.total == 60 for p in pages)
    assert [f.id for p in pages for f in p.flakes] == [f.id for f in by_score]
    past_the_end = store.query(FlakeQuery(limit=5, offset=100))
    assert (past_the_end.total, past_the_end.flakes) == (60, [])
    assert store.query(FlakeQuery(chip_id='no-such-chip')).total == 0



def test_query_without_outlines_gives_the_same_records_less_the_outline(populated, clock):
    store, batch, ids = populated
    store.reserve(ids[3], 'arm-1', 30)
    query = FlakeQuery(min_score=0.2, sort_by='area', limit=25)
    full, lean = store.query(query), store.query(query, contours=False)
    assert lean.total == full.total and len(lean.flakes) == 25
    assert all(f.contour for f in full.flakes) and not any(f.contour for f in lean.flakes)
    assert [replace(f, contour=[]) for f in full.flakes] == lean.flakes
    exported = {f.id: f for f in store.iter_flakes(chip_id='chip-1', page=7)}
    assert len(exported) == 40
    assert all(exported[f.id].contour == f.contour for f in full.flakes if f.chip_id == 'chip-1')
    assert exported[ids[3]].reserved_by == 'arm-1' and exported[ids[3]].status == STATUS_RESERVED

@pytest.mark.parametrize('filters, code', [
    ({'layers_min': 5, 'layers_max': 2}, 'INVALID_RANGE'),
    ({'area_min': -1.0}, 'INVALID_RANGE'),
    ({'min_score': 1.5}, 'INVALID_RANGE'),
    ({'region': (1.0, 0.0, 0.0, 1.0)}, 'INVALID_RANGE'),
    ({'limit': 0}, 'INVALID_RANGE'),
    ({'limit': 5000}, 'INVALID_RANGE'),
    ({'materials': ('gold',)}, 'INVALID_ARGUMENT'),
    ({'sort_by': 'colour'}, 'INVALID_ARGUMENT'),
    ({'sort_by': 'distance'}, 'INVALID_ARGUMENT'),
    ({'max_distance': 1e-3}, 'INVALID_ARGUMENT'),
    ({'layers_min': float('nan')}, 'INVALID_ARGUMENT'),
])
def test_impossible_filters_are_refused_with_a_code(store, filters, code):
    with pytest.raises(RegistryError) as error:
        store.query(FlakeQuery(**filters))
    assert error.value.code == code


def test_histograms_count_every_match_per_material_in_half_open_bins(populated):
    store, batch, ids = populated
    edges = {'layers': (0.0, 2.0, 10.0, math.inf), 'area': (0.0, 100 * UM * UM, 400 * UM * UM, math.inf)}

    def expected(sightings):
        counts = {}
        for s in sightings:
            material = counts.setdefault(s.material, {'layers': [0, 0, 0], 'area': [0, 0, 0]})
            material['layers'][sum(s.layers >= e for e in edges['layers'][1:-1])] += 1
            material['area'][sum(s.area >= e for e in edges['area'][1:-1])] += 1
        return counts

    assert store.histograms(FlakeQuery(chip_id='chip-1'), edges) == expected(batch[:40])
    assert store.histograms(FlakeQuery(), edges) == expected(batch)
    graphene_counts = store.histograms(FlakeQuery(materials=('graphene',), layer_classes=(LAYER_FEW,)), edges)
    assert graphene_counts == expected([s for s in batch if s.material == 'graphene' and s.layer_class == LAYER_FEW])
    store.reserve(ids[0], 'robot-a')
    assert store.histograms(FlakeQuery(statuses=(STATUS_RESERVED,)), edges) == expected(batch[:1])
    assert store.histograms(FlakeQuery(chip_id='no-such-chip'), edges) == {}
    with pytest.raises(ValueError, match='contour'):
        store.histograms(FlakeQuery(), {'contour': (0.0, 1.0)})


def test_query_from_loose_text_input():
    query = FlakeQuery.from_mapping({'material': 'Graphene', 'layer_classes': 'mono,few', 'statuses': 'available',
                                     'region': '0,0,1e-3,1e-3', 'limit': '5', 'ascending': 'true'})
    assert query.materials == ('graphene',) and query.layer_classes == (LAYER_MONO, LAYER_FEW)
    assert query.statuses == (STATUS_AVAILABLE,) and query.region == (0.0, 0.0, 1e-3, 1e-3)
    assert query.limit == 5 and query.ascending is True
    with pytest.raises(RegistryError, match='unknown filter'):
        FlakeQuery.from_mapping({'colour': 'blue'})


# -- reservations -------------------------------------------------------------

def codes_of(call, *args):
    with pytest.raises(RegistryError) as error:
        call(*args)
    return error.value.code


def test_reservation_lifecycle_and_every_error(populated, clock):
    store, _, ids = populated
    flake = ids[0]
    held = store.reserve(flake, 'robot-a', 30.0)
    assert len(held.token) >= 32 and held.expires == clock.now + 30.0
    assert codes_of(store.reserve, flake, 'robot-b') == 'ALREADY_RESERVED'
    assert codes_of(store.reserve, 'F9999999', 'robot-b') == 'UNKNOWN_ID'
    assert codes_of(store.reserve, ids[1], '') == 'INVALID_ARGUMENT'
    assert codes_of(store.reserve, ids[1], 'robot-b', -1.0) == 'INVALID_ARGUMENT'
    assert codes_of(store.release, flake, 'not-the-token') == 'WRONG_TOKEN'
    assert codes_of(store.release, ids[1], 'x') == 'NOT_RESERVED'
    assert codes_of(store.mark_used, flake, 'not-the-token') == 'WRONG_TOKEN'
    assert codes_of(store.mark_used, 'nope', 'x') == 'UNKNOWN_ID'
    record = store.get_flake(flake).flake
    assert (record.status, record.reserved_by, record.lease_expires) == (STATUS_RESERVED, 'robot-a', held.expires)
    assert store.query(FlakeQuery(statuses=(STATUS_RESERVED,))).total == 1

    store.release(flake, held.token)
    assert store.get_flake(flake).flake.status == STATUS_AVAILABLE
    assert codes_of(store.release, flake, held.token) == 'NOT_RESERVED'

    again = store.reserve(flake, 'robot-b')            # 0 s: the default lease
    assert again.expires == clock.now + 60.0
    store.mark_used(flake, again.token, 'stack 7')
    record = store.get_flake(flake).flake
    assert (record.status, record.used_by, record.used_note) == (STATUS_USED, 'robot-b', 'stack 7')
    assert codes_of(store.reserve, flake, 'robot-a') == 'ALREADY_USED'
    assert codes_of(store.mark_used, flake, again.token) == 'ALREADY_USED'


def test_who_ended_each_reservation_is_kept(populated, clock):
    """The holder that gave a reservation back, or the person who released it or marked the flake used."""
    from flake_registry import control

    store, _, ids = populated
    held = store.reserve(ids[0], 'robot-a', 30.0)
    assert store.release(ids[0], held.token).ended_by == 'robot-a'
    store.reserve(ids[0], 'robot-a', 30.0)
    assert control.release_flake(store, ids[0], 'Ada L', via='cli')['ended_by'] == 'cli-Ada_L'
    store.reserve(ids[1], 'robot-b', 30.0)
    control.mark_flake_used(store, ids[1], 'bo', note='cracked')
    assert store.get_flake(ids[1]).flake.used_by == 'robot-b'
    store.reserve(ids[2], 'robot-c', 5.0)
    clock.now += 10
    store.reserve(ids[2], 'robot-d', 5.0)       # closes robot-c's lease as expired: nobody ended it
    history = [(r['robot_id'], r['outcome'], r['ended_by'])
               for flake in ids[:3] for r in store.reservations(flake, live_only=False)]
    assert history == [('robot-a', 'released', 'robot-a'), ('robot-a', 'released', 'cli-Ada_L'),
                       ('robot-b', 'used', 'web-bo'), ('robot-c', 'expired', None), ('robot-d', None, None)]


def test_lease_expires_at_query_time(populated, clock):
    store, _, ids = populated
    flake = ids[2]
    old = store.reserve(flake, 'robot-a', 10.0)
    clock.now += 10.5
    assert store.get_flake(flake).flake.status == STATUS_AVAILABLE
    assert codes_of(store.mark_used, flake, old.token) == 'LEASE_EXPIRED'
    assert codes_of(store.release, flake, old.token) == 'NOT_RESERVED'
    new = store.reserve(flake, 'robot-b', 10.0)
    # The first robot's stale token is recognised as expired, not as somebody else's.
    assert codes_of(store.mark_used, flake, old.token) == 'LEASE_EXPIRED'
    assert codes_of(store.mark_used, flake, 'guess') == 'WRONG_TOKEN'
    store.mark_used(flake, new.token)
    outcomes = [r['outcome'] for r in store.reservations(flake, live_only=False)]
    assert outcomes == ['expired', 'used']


def test_reserve_many_is_all_or_none(populated):
    store, _, ids = populated
    store.reserve(ids[5], 'robot-a')
    with pytest.raises(RegistryError) as error:
        store.reserve_many([ids[3], ids[4], ids[5]], 'robot-b')
    assert (error.value.code, error.value.flake_id) == ('ALREADY_RESERVED', ids[5])
    assert store.reservations(ids[3]) == [] and store.reservations(ids[4]) == []
    assert codes_of(store.reserve_many, [ids[3], ids[3]], 'robot-b') == 'INVALID_ARGUMENT'
    stack = store.reserve_many([ids[3], ids[4]], 'robot-b', 20.0)
    assert [r.flake_id for r in stack] == [ids[3], ids[4]] and len({r.token for r in stack}) == 2


def test_processes_racing_for_the_same_flakes_never_share_one(populated):
    store, _, ids = populated
    contested = ids[:20]
    workers = [subprocess.Popen([sys.executable, str(HELPERS / 'registry_worker.py'), 'reserve', store.url,
                                 f'robot-{i}', *contested], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True) for i in range(4)]
    outputs = []
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == 'READY'
        for worker in workers:  # release them together
            worker.stdin.write('go\n')
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    winners = {}
    for robot, output in enumerate(outputs):
        for line in output.splitlines():
            if line.startswith('WON'):
                _, flake_id, token = line.split()
                assert flake_id not in winners, f'{flake_id} won twice'
                winners[flake_id] = (f'robot-{robot}', token)
    assert set(winners) == set(contested)
    assert sum(output.count('LOST') for output in outputs) == 3 * len(contested)
    for flake_id, (robot, token) in winners.items():
        # The workers ran on the real clock, this store on a fake one: compare rows, not liveness.
        rows = store.reservations(flake_id, live_only=False)
        assert [(r['robot_id'], r['token']) for r in rows] == [(robot, token)]


# -- revisit, images, labels, defect reports -----------------------------------

def test_revisit_list_takes_good_unvisited_available_flakes(populated):
    store, batch, ids = populated
    expected = {i for i, d in zip(ids, batch, strict=True) if d.score >= 0.8}
    listed = store.revisit_list(min_score=0.8)
    assert {f.id for f in listed} == expected
    # Monolayer-first by default: thinnest first, then largest (flake_registry.revisit).
    keys = [(round(f.layers), -f.area) for f in listed]
    assert keys == sorted(keys) and listed[0].layers == 1.0
    best = listed[0].id
    store.add_image(best, 'revisit', 'images/revisit_best.png', objective='100x', pixel_size=70e-9)
    taken = store.reserve(listed[1].id, 'robot-a')
    assert taken.token
    after = [f.id for f in store.revisit_list(min_score=0.8)]
    assert best not in after and listed[1].id not in after and len(after) == len(listed) - 2
    assert best in [f.id for f in store.revisit_list(min_score=0.8, include_revisited=True)]
    images = store.get_flake(best).images
    assert [(i.role, i.path, i.objective) for i in images] == [('revisit', 'images/revisit_best.png', '100x')]
    assert codes_of(store.add_image, best, 'selfie', 'x.png') == 'INVALID_ARGUMENT'
    assert codes_of(store.add_image, 'F0', 'crop', 'x.png') == 'UNKNOWN_ID'


def test_labels_for_crops_and_defect_reports(populated):
    store, _, ids = populated
    store.add_label('not a flake', 'bob', crop_path='crops/c17.png')
    assert codes_of(store.add_label, 'x', 'bob') == 'INVALID_ARGUMENT'
    assert [r['crop_path'] for r in store.labels()] == ['crops/c17.png']
    store.add_defect_report({'image_id': 'stem-1', 'cells_total': 400, 'class_names': ['perfect', 'v_te1'],
                             'counts': [390, 10], 'concentration': [0.0, 1.2e13]}, flake_id=ids[0])
    reports = store.defect_reports(ids[0])
    assert len(reports) == 1 and reports[0]['counts'] == [390, 10] and reports[0]['flake_id'] == ids[0]
    # What the analysis assumed is kept with it; a caller that does not say is stored as not recorded.
    assert (reports[0]['material'], reports[0]['detector'], reports[0]['warnings']) == ('', '', [])
    store.add_defect_report({'image_id': 'stem-2', 'material': 'wse2', 'detector': 'HAADF 80-250 mrad',
                             'detector_source': 'file', 'warnings': ['sublattices assumed from the expected contrast'],
                             'class_names': ['Perfect', 'V_Se'], 'counts': [99, 1]})
    stored = store.defect_reports()[-1]
    assert (stored['image_id'], stored['flake_id'], stored['material'], stored['detector'],
            stored['detector_source'], stored['warnings']) == (
        'stem-2', None, 'wse2', 'HAADF 80-250 mrad', 'file', ['sublattices assumed from the expected contrast'])


# -- export -------------------------------------------------------------------

def test_json_and_csv_exports_hold_every_flake_of_a_chip(populated):
    store, batch, ids = populated
    store.ingest([square(0.0, 0.0, 10 * UM, scan_id='scan-9', score=0.1)])  # second sighting of ids[0]
    text = io.StringIO()
    assert export_json(store, text, chip_id='chip-1') == 40
    document = json.loads(text.getvalue())
    assert [f['id'] for f in document['flakes']] == ids[:40]
    first = document['flakes'][0]
    # People's units, named in the keys (flake_registry.export).
    assert len(first['observations']) == 2
    assert first['outline_um'][0] == pytest.approx([v / UM for v in batch[0].contour[0]], abs=1e-3)
    text = io.StringIO()
    assert export_csv(store, text, scan_id='scan-2') == 20
    rows = list(csv.DictReader(io.StringIO(text.getvalue())))
    assert [r['id'] for r in rows] == ids[40:]
    assert float(rows[0]['area_um2']) == pytest.approx(batch[40].area / UM ** 2, abs=0.01)
    assert rows[0]['status'] == 'available'
    with pytest.raises(RegistryError):
        export_json(store, io.StringIO())


def test_coco_export_maps_outlines_to_tile_pixels(store, tmp_path):
    # Tile 0 of scan-1: 0.5 um pixels, pixel (0, 0) at wafer (1 mm, 2 mm), +v is wafer -y.
    px = 0.5 * UM
    store.record_frame('scan-1', 0, [px, 0.0, 1e-3, 0.0, -px, 2e-3], width=640, height=480, path='tiles/0.png')
    (tmp_path / 'tiles').mkdir()
    (tmp_path / 'tiles' / '0.png').write_bytes(b'\x89PNG\r\n\x1a\n')  # the kept frame (tmp_path: the data folder)
    centre_u, centre_v = 100, 50
    x, y = 1e-3 + centre_u * px, 2e-3 - centre_v * px
    store.ingest([square(x, y, 20 * px, bbox_px=(90, 40, 20, 20), layer_class=LAYER_MONO, score=0.8)])
    store.ingest([square(x + px, y, 20 * px, scan_id='scan-1', tile_index=1, bbox_px=(5, 40, 20, 20))])
    coco = build_coco(store, scan_id='scan-1', data_dir=tmp_path, base_dir=tmp_path)
    path = tmp_path / 'coco.json'
    path.write_text(json.dumps(coco))
    api = COCO(str(path))
    # Only pictures that exist: tile 1 was never kept, its observation is left out and counted.
    assert len(api.getImgIds()) == 1 and len(api.getAnnIds()) == 1
    assert coco['info']['left_out_observations'] == 1
    first = api.loadAnns(api.getAnnIds(imgIds=[1]))[0]
    assert api.loadImgs([1])[0]['file_name'] == 'tiles/0.png'
    assert api.loadCats([first['category_id']])[0]['name'] == 'graphene_mono'
    us, vs = first['segmentation'][0][0::2], first['segmentation'][0][1::2]
    assert (min(us), max(us), min(vs), max(vs)) == pytest.approx((90, 110, 40, 60))
    assert first['area'] == pytest.approx(400)
    assert api.annToMask(first).sum() == pytest.approx(400, rel=0.15)

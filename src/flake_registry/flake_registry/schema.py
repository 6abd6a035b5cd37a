"""The registry's schema: one ordered list of numbered migrations, the only place tables are made.

Version N is reached by applying migrations 1..N, each in its own transaction, and
recorded in ``schema_version``; opening a registry applies the missing ones. A
database written by newer software is refused (``SchemaError``) rather than
modified. To change the schema, append a migration; never edit a released one.

The same numbered migrations make the same tables on SQLite and on PostgreSQL.
Each takes the open ``Transaction``; SQLite's steps are the released sqlite-utils
code, PostgreSQL's the equivalent DDL (``_PG``), differing only where the engines
do: float and blob types, keys from sequences, and the spatial index (an R*Tree
virtual table on SQLite, a GiST index on the box expression on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Callable
import json
import math
import time

import sqlite_utils

from flake_registry.database import CHIP_SPAN, Database, Transaction


def _migration_1(tx: Transaction) -> None:
    """Chips, scans, frames, flakes, observations, images, reservations, defect reports."""
    if tx.dialect == 'postgresql':
        _run(tx, _PG[1])
        return
    db = sqlite_utils.Database(tx.conn, execute_plugins=False)
    db.create_table('chips', {'id': str, 'corners': str, 'stage_to_wafer': str, 'note': str,
                              'created': float, 'updated': float}, pk='id', not_null={'created'})
    db.create_table('scans', {'id': str, 'chip_id': str, 'started': float, 'note': str},
                    pk='id', not_null={'chip_id'})
    db.create_table('frames', {'scan_id': str, 'tile_index': int, 'stamp': float, 'width': int, 'height': int,
                               'pixel_size': float, 'pixel_to_wafer': str, 'path': str},
                    pk=('scan_id', 'tile_index'))
    db.create_table('flakes', {
        'pk': int, 'id': str, 'chip_id': str, 'scan_id': str, 'tile_index': int, 'material': str,
        'layer_class': int, 'layers': float, 'layers_std': float, 'thickness_nm': float,
        'thickness_nm_std': float, 'score': float, 'detector': str, 'model_version': str,
        'x': float, 'y': float, 'contour': bytes, 'area': float, 'bbox_px': str, 'homogeneity': float,
        'isolation_distance': float, 'edge_straightness': float, 'status': int, 'n_observations': int,
        'created': float, 'updated': float, 'detected_at': float, 'revisited_at': float,
        'used_by': str, 'used_at': float, 'used_note': str,
        'mask': bytes, 'mask_width': int, 'mask_height': int,
    }, pk='pk', not_null={'id', 'chip_id', 'material', 'x', 'y', 'status', 'score'})
    db.table('flakes').create_index(['id'], unique=True)
    db.table('flakes').create_index(['chip_id', 'score'])
    db.table('flakes').create_index(['material', 'layers'])
    db.table('flakes').create_index(['material', 'layer_class', 'score'])
    db.table('flakes').create_index(['score'])
    db.table('flakes').create_index(['area'])
    db.table('flakes').create_index(['thickness_nm'])
    db.table('flakes').create_index(['created'])
    db.create_table('observations', {
        'id': int, 'flake_pk': int, 'scan_id': str, 'tile_index': int, 'stamp': float, 'x': float, 'y': float,
        'bbox_px': str, 'score': float, 'detector': str, 'iou': float, 'created': float,
    }, pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')], not_null={'flake_pk'})
    db.table('observations').create_index(['flake_pk'])
    db.table('observations').create_index(['scan_id', 'flake_pk'])
    db.create_table('images', {'id': int, 'flake_pk': int, 'role': str, 'path': str, 'objective': str,
                               'pixel_size': float, 'stamp': float, 'created': float},
                    pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')], not_null={'flake_pk', 'role', 'path'})
    db.table('images').create_index(['flake_pk'])
    db.create_table('reservations', {'id': int, 'flake_pk': int, 'robot_id': str, 'token': str,
                                     'created': float, 'expires': float, 'ended': float, 'outcome': str},
                    pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')],
                    not_null={'flake_pk', 'robot_id', 'token', 'created', 'expires'})
    # The guarantee behind "never two owners": one unended reservation per flake.
    db.execute('CREATE UNIQUE INDEX idx_reservations_one_live ON reservations (flake_pk) WHERE ended IS NULL')
    db.table('reservations').create_index(['token'])
    db.create_table('defect_reports', {
        'id': int, 'flake_pk': int, 'image_id': str, 'stamp': float, 'pixel_size': float,
        'analysed_area': float, 'cells_total': int, 'class_names': str, 'counts': str, 'concentration': str,
        'concentration_low': str, 'concentration_high': str, 'model_version': str, 'created': float,
    }, pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')])
    db.table('defect_reports').create_index(['flake_pk'])
    # Bounding boxes of flakes in the wafer frame: merge candidates, region and distance queries.
    db.execute('CREATE VIRTUAL TABLE flake_boxes USING rtree(id, min_x, max_x, min_y, max_y)')


def _migration_2(tx: Transaction) -> None:
    """Labels from people (a flake or a candidate crop, a label, who, when); revisit index."""
    if tx.dialect == 'postgresql':
        _run(tx, _PG[2])
        return
    db = sqlite_utils.Database(tx.conn, execute_plugins=False)
    db.create_table('labels', {'id': int, 'flake_pk': int, 'crop_path': str, 'label': str,
                               'labelled_by': str, 'created': float},
                    pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')], not_null={'label', 'created'})
    db.table('labels').create_index(['flake_pk'])
    db.table('flakes').create_index(['revisited_at', 'score'])


def _migration_3(tx: Transaction) -> None:
    """Covering index for material + layer range sorted by score."""
    if tx.dialect == 'postgresql':
        _run(tx, _PG[3])
        return
    db = sqlite_utils.Database(tx.conn, execute_plugins=False)
    db.table('flakes').create_index(['material', 'layers', 'score'])
    db.execute('DROP INDEX IF EXISTS idx_flakes_material_layers')


def _migration_4(tx: Transaction) -> None:
    """Drop the creation-time and revisit indexes: every index is written on each ingest."""
    if tx.dialect == 'postgresql':
        _run(tx, _PG[4])
        return
    db = sqlite_utils.Database(tx.conn, execute_plugins=False)
    # 'created' order is insertion order (pk); the revisit list is found through the score index.
    db.execute('DROP INDEX IF EXISTS idx_flakes_created')
    db.execute('DROP INDEX IF EXISTS idx_flakes_revisited_at_score')


def _migration_5(tx: Transaction) -> None:
    """Stack recipes planned from registry flakes (the table flake_registry.stacks made on first use)."""
    real = 'DOUBLE PRECISION' if tx.dialect == 'postgresql' else 'REAL'
    # IF NOT EXISTS: files written before this migration may hold the table already.
    tx.execute(f'CREATE TABLE IF NOT EXISTS stack_recipes (id TEXT PRIMARY KEY, name TEXT NOT NULL, '
               f'created {real} NOT NULL, created_by TEXT, robot_id TEXT, reserved_at {real}, lease_expires {real}, '
               'layers TEXT NOT NULL)')


def _migration_6(tx: Transaction) -> None:
    """Chip wafer frames: every measurement of a chip's corners on a stage, the newest is the chip's frame."""
    postgres = tx.dialect == 'postgresql'
    key, real = ('BIGSERIAL', 'DOUBLE PRECISION') if postgres else ('INTEGER', 'REAL')
    tx.execute(f'CREATE TABLE wafer_frames (id {key} PRIMARY KEY, chip_id TEXT NOT NULL REFERENCES chips (id), '
               f'corners TEXT NOT NULL, stage_to_wafer TEXT NOT NULL, rotation {real} NOT NULL, '
               f'residual {real} NOT NULL, measured_by TEXT, measured_at {real} NOT NULL)')
    tx.execute('CREATE INDEX idx_wafer_frames_chip_id ON wafer_frames (chip_id, id)')
    # The frames migration 1 kept in `chips` (FlakeStore.set_chip) move here; `chips` keeps
    # the chip itself.
    for row in tx.all('SELECT id, corners, stage_to_wafer, updated FROM chips'):
        affine = json.loads(row['stage_to_wafer'] or '[]')
        if len(affine) != 6:
            continue
        tx.execute('INSERT INTO wafer_frames (chip_id, corners, stage_to_wafer, rotation, residual, measured_by, '
                   'measured_at) VALUES (?, ?, ?, ?, 0.0, ?, ?)',
                   (row['id'], row['corners'] or '[]', row['stage_to_wafer'], math.atan2(affine[1], affine[0]),
                    'set_chip', row['updated']))
    tx.execute('ALTER TABLE chips DROP COLUMN corners')
    tx.execute('ALTER TABLE chips DROP COLUMN stage_to_wafer')



def _migration_7(tx: Transaction) -> None:
    """Flakes per chip kept with the chip: exact totals of unfiltered and chip-only queries without a count."""
    tx.execute('ALTER TABLE chips ADD COLUMN n_flakes INTEGER NOT NULL DEFAULT 0')
    tx.execute('UPDATE chips SET n_flakes = (SELECT COUNT(*) FROM flakes f WHERE f.chip_id = chips.id)')


def _migration_8(tx: Transaction) -> None:
    """Who ended a reservation: the robot that gave it back, or the person who released it or marked it used."""
    # Reservations ended before this migration keep NULL: their records never said.
    tx.execute('ALTER TABLE reservations ADD COLUMN ended_by TEXT')


def _migration_9(tx: Transaction) -> None:
    """Chip keys and the chip in the spatial index: a region of one chip reads that chip's flakes only."""
    # Every chip an integer key (a third R*Tree dimension in SQLite; a range in the GiST
    # index in PostgreSQL): without it a 1 x 1 mm box read that square of every chip.
    # A flake whose chip row is missing (registries filled by hand) gets one first.
    tx.execute('INSERT INTO chips (id, created, updated) SELECT DISTINCT f.chip_id, 0.0, 0.0 FROM flakes f '
               'WHERE NOT EXISTS (SELECT 1 FROM chips c WHERE c.id = f.chip_id)')
    tx.execute('ALTER TABLE chips ADD COLUMN chip_key INTEGER')
    if tx.dialect == 'postgresql':
        _run(tx, _PG[9])
        return
    tx.execute('UPDATE chips SET chip_key = rowid')
    tx.execute('CREATE UNIQUE INDEX idx_chips_chip_key ON chips (chip_key)')
    # A chip inserted by any code gets the next key (PostgreSQL: the column's sequence default).
    tx.execute('CREATE TRIGGER chips_chip_key AFTER INSERT ON chips WHEN NEW.chip_key IS NULL BEGIN '
               'UPDATE chips SET chip_key = (SELECT COALESCE(MAX(chip_key), 0) + 1 FROM chips) WHERE id = NEW.id; '
               'END')
    # An R*Tree keeps its dimensions for life: a new one with the chip, filled from the old.
    tx.execute('CREATE VIRTUAL TABLE flake_boxes_by_chip USING rtree(id, min_x, max_x, min_y, max_y, '
               'min_chip, max_chip)')
    tx.execute('INSERT INTO flake_boxes_by_chip (id, min_x, max_x, min_y, max_y, min_chip, max_chip) '
               'SELECT b.id, b.min_x, b.max_x, b.min_y, b.max_y, c.chip_key, c.chip_key + ? FROM flake_boxes b '
               'JOIN flakes f ON f.pk = b.id JOIN chips c ON c.id = f.chip_id ORDER BY c.chip_key', (CHIP_SPAN,))
    tx.execute('DROP TABLE flake_boxes')
    tx.execute('ALTER TABLE flake_boxes_by_chip RENAME TO flake_boxes')


def _migration_10(tx: Transaction) -> None:
    """What a defect analysis assumed: the material, the annular detector and where it came from; its warnings."""
    # Reports stored before this migration read '' and no warnings: their records never said
    # (the web app shows "not recorded"), and a DEFAULT fills old rows on both engines.
    for column in ('material', 'detector', 'detector_source'):
        tx.execute(f"ALTER TABLE defect_reports ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
    tx.execute("ALTER TABLE defect_reports ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'")


MIGRATIONS: tuple[Callable[[Transaction], None], ...] = (
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6, _migration_7,
    _migration_8, _migration_9, _migration_10)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaError(RuntimeError):
    """The file's schema is newer than this code or not a registry."""


def schema_version(tx: Transaction) -> int:
    if tx.dialect == 'postgresql':
        exists = tx.scalar("SELECT to_regclass('schema_version') IS NOT NULL")
    else:
        exists = tx.scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    if not exists:
        return 0
    return int(tx.scalar('SELECT COALESCE(MAX(version), 0) FROM schema_version'))


def migrate(database: Database, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations up to ``target``, each in its own transaction; return the version.

    Several processes may open a registry at once: on SQLite the write lock, on
    PostgreSQL an advisory lock makes them apply each migration once.
    """
    attempts = 0
    while True:
        try:
            done = _migrate_step(database, target)
        except Exception as error:
            attempts += 1
            # A server connection ended under us (server restart, an administrator) is
            # tried again on a fresh one; the step's transaction left nothing behind.
            if attempts >= 3 or not database.is_transient(error):
                raise
            continue
        if done is not None:
            return done


def _migrate_step(database: Database, target: int) -> int | None:
    """Apply the next missing migration; the version when there is none left to apply."""
    with database.transaction() as tx:
        if tx.dialect == 'postgresql':
            tx.execute('SELECT pg_advisory_xact_lock(7235001)')
        tx.execute('CREATE TABLE IF NOT EXISTS schema_version '
                   '(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL, description TEXT)')
        current = schema_version(tx)
        if current > SCHEMA_VERSION:
            raise SchemaError(f'registry schema version {current} is newer than this software '
                              f'({SCHEMA_VERSION}); upgrade flake_registry')
        if current >= target:
            return current
        step = MIGRATIONS[current]
        step(tx)
        tx.execute('INSERT INTO schema_version (version, applied_at, description) VALUES (?, ?, ?)',
                   (current + 1, time.time(), (step.__doc__ or '').strip()))
    return None


def _run(tx: Transaction, statements: str) -> None:
    for statement in statements.split(';'):
        if statement.strip():
            tx.execute(statement)


_D = 'DOUBLE PRECISION'
# PostgreSQL's DDL of migrations 1-4 and 9 (SQLite's is the code above).
_PG = {
    1: f"""
CREATE TABLE chips (id TEXT PRIMARY KEY, corners TEXT, stage_to_wafer TEXT, note TEXT, created {_D} NOT NULL,
                    updated {_D});
CREATE TABLE scans (id TEXT PRIMARY KEY, chip_id TEXT NOT NULL, started {_D}, note TEXT);
CREATE TABLE frames (scan_id TEXT, tile_index INTEGER, stamp {_D}, width INTEGER, height INTEGER, pixel_size {_D},
                     pixel_to_wafer TEXT, path TEXT, PRIMARY KEY (scan_id, tile_index));
CREATE SEQUENCE flake_pk_seq;
CREATE TABLE flakes (pk BIGINT PRIMARY KEY, id TEXT NOT NULL, chip_id TEXT NOT NULL, scan_id TEXT,
    tile_index INTEGER, material TEXT NOT NULL, layer_class INTEGER, layers {_D}, layers_std {_D},
    thickness_nm {_D}, thickness_nm_std {_D}, score {_D} NOT NULL, detector TEXT, model_version TEXT,
    x {_D} NOT NULL, y {_D} NOT NULL, contour BYTEA, area {_D}, bbox_px TEXT, homogeneity {_D},
    isolation_distance {_D}, edge_straightness {_D}, status INTEGER NOT NULL, n_observations INTEGER,
    created {_D}, updated {_D}, detected_at {_D}, revisited_at {_D}, used_by TEXT, used_at {_D}, used_note TEXT,
    mask BYTEA, mask_width INTEGER, mask_height INTEGER);
CREATE UNIQUE INDEX idx_flakes_id ON flakes (id);
CREATE INDEX idx_flakes_chip_id_score ON flakes (chip_id, score);
CREATE INDEX idx_flakes_material_layers ON flakes (material, layers);
CREATE INDEX idx_flakes_material_layer_class_score ON flakes (material, layer_class, score);
CREATE INDEX idx_flakes_score ON flakes (score);
CREATE INDEX idx_flakes_area ON flakes (area);
CREATE INDEX idx_flakes_thickness_nm ON flakes (thickness_nm);
CREATE INDEX idx_flakes_created ON flakes (created);
CREATE TABLE observations (id BIGSERIAL PRIMARY KEY, flake_pk BIGINT NOT NULL REFERENCES flakes (pk),
    scan_id TEXT, tile_index INTEGER, stamp {_D}, x {_D}, y {_D}, bbox_px TEXT, score {_D}, detector TEXT,
    iou {_D}, created {_D});
CREATE INDEX idx_observations_flake_pk ON observations (flake_pk);
CREATE INDEX idx_observations_scan_id_flake_pk ON observations (scan_id, flake_pk);
CREATE TABLE images (id BIGSERIAL PRIMARY KEY, flake_pk BIGINT NOT NULL REFERENCES flakes (pk), role TEXT NOT NULL,
    path TEXT NOT NULL, objective TEXT, pixel_size {_D}, stamp {_D}, created {_D});
CREATE INDEX idx_images_flake_pk ON images (flake_pk);
CREATE TABLE reservations (id BIGSERIAL PRIMARY KEY, flake_pk BIGINT NOT NULL REFERENCES flakes (pk),
    robot_id TEXT NOT NULL, token TEXT NOT NULL, created {_D} NOT NULL, expires {_D} NOT NULL, ended {_D},
    outcome TEXT);
CREATE UNIQUE INDEX idx_reservations_one_live ON reservations (flake_pk) WHERE ended IS NULL;
CREATE INDEX idx_reservations_token ON reservations (token);
CREATE TABLE defect_reports (id BIGSERIAL PRIMARY KEY, flake_pk BIGINT REFERENCES flakes (pk), image_id TEXT,
    stamp {_D}, pixel_size {_D}, analysed_area {_D}, cells_total INTEGER, class_names TEXT, counts TEXT,
    concentration TEXT, concentration_low TEXT, concentration_high TEXT, model_version TEXT, created {_D});
CREATE INDEX idx_defect_reports_flake_pk ON defect_reports (flake_pk);
CREATE TABLE flake_boxes (id BIGINT PRIMARY KEY, min_x {_D} NOT NULL, max_x {_D} NOT NULL, min_y {_D} NOT NULL,
    max_y {_D} NOT NULL);
CREATE INDEX idx_flake_boxes_box ON flake_boxes USING gist (box(point(min_x, min_y), point(max_x, max_y)))
""",
    2: f"""
CREATE TABLE labels (id BIGSERIAL PRIMARY KEY, flake_pk BIGINT REFERENCES flakes (pk), crop_path TEXT,
    label TEXT NOT NULL, labelled_by TEXT, created {_D} NOT NULL);
CREATE INDEX idx_labels_flake_pk ON labels (flake_pk);
CREATE INDEX idx_flakes_revisited_at_score ON flakes (revisited_at, score)
""",
    3: """
CREATE INDEX idx_flakes_material_layers_score ON flakes (material, layers, score);
DROP INDEX IF EXISTS idx_flakes_material_layers
""",
    4: """
DROP INDEX IF EXISTS idx_flakes_created;
DROP INDEX IF EXISTS idx_flakes_revisited_at_score
""",
    # The chip first in a two-column GiST index: a range of one integer (GiST's built-in
    # range_ops, no extension such as btree_gist to install), then the box.
    9: """
CREATE SEQUENCE chip_key_seq OWNED BY chips.chip_key;
UPDATE chips SET chip_key = nextval('chip_key_seq');
ALTER TABLE chips ALTER COLUMN chip_key SET DEFAULT nextval('chip_key_seq');
ALTER TABLE chips ALTER COLUMN chip_key SET NOT NULL;
CREATE UNIQUE INDEX idx_chips_chip_key ON chips (chip_key);
DROP INDEX idx_flake_boxes_box;
ALTER TABLE flake_boxes ADD COLUMN chip_key INTEGER;
UPDATE flake_boxes b SET chip_key = c.chip_key FROM flakes f JOIN chips c ON c.id = f.chip_id WHERE f.pk = b.id;
ALTER TABLE flake_boxes ALTER COLUMN chip_key SET NOT NULL;
CREATE INDEX idx_flake_boxes_chip_box ON flake_boxes USING gist (int4range(chip_key, chip_key, '[]'),
    box(point(min_x, min_y), point(max_x, max_y)))
""",
}

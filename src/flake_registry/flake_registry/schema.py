"""The registry's schema: one ordered list of numbered migrations, the only place tables are made.

Version N is reached by applying migrations 1..N, each in its own transaction, and
recorded in ``schema_version``; opening a registry applies the missing ones. A
database written by newer software is refused (``SchemaError``) rather than
modified. To change the schema, append a migration; never edit a released one.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import math
import sqlite3
import time

import sqlite_utils


def _migration_1(db: sqlite_utils.Database) -> None:
    """Chips, scans, frames, flakes, observations, images, reservations, defect reports."""
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
    db['flakes'].create_index(['id'], unique=True)
    db['flakes'].create_index(['chip_id', 'score'])
    db['flakes'].create_index(['material', 'layers'])
    db['flakes'].create_index(['material', 'layer_class', 'score'])
    db['flakes'].create_index(['score'])
    db['flakes'].create_index(['area'])
    db['flakes'].create_index(['thickness_nm'])
    db['flakes'].create_index(['created'])
    db.create_table('observations', {
        'id': int, 'flake_pk': int, 'scan_id': str, 'tile_index': int, 'stamp': float, 'x': float, 'y': float,
        'bbox_px': str, 'score': float, 'detector': str, 'iou': float, 'created': float,
    }, pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')], not_null={'flake_pk'})
    db['observations'].create_index(['flake_pk'])
    db['observations'].create_index(['scan_id', 'flake_pk'])
    db.create_table('images', {'id': int, 'flake_pk': int, 'role': str, 'path': str, 'objective': str,
                               'pixel_size': float, 'stamp': float, 'created': float},
                    pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')], not_null={'flake_pk', 'role', 'path'})
    db['images'].create_index(['flake_pk'])
    db.create_table('reservations', {'id': int, 'flake_pk': int, 'robot_id': str, 'token': str,
                                     'created': float, 'expires': float, 'ended': float, 'outcome': str},
                    pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')],
                    not_null={'flake_pk', 'robot_id', 'token', 'created', 'expires'})
    # The guarantee behind "never two owners": one unended reservation per flake.
    db.execute('CREATE UNIQUE INDEX idx_reservations_one_live ON reservations (flake_pk) WHERE ended IS NULL')
    db['reservations'].create_index(['token'])
    db.create_table('defect_reports', {
        'id': int, 'flake_pk': int, 'image_id': str, 'stamp': float, 'pixel_size': float,
        'analysed_area': float, 'cells_total': int, 'class_names': str, 'counts': str, 'concentration': str,
        'concentration_low': str, 'concentration_high': str, 'model_version': str, 'created': float,
    }, pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')])
    db['defect_reports'].create_index(['flake_pk'])
    # Bounding boxes of flakes in the wafer frame: merge candidates, region and distance queries.
    db.execute('CREATE VIRTUAL TABLE flake_boxes USING rtree(id, min_x, max_x, min_y, max_y)')


def _migration_2(db: sqlite_utils.Database) -> None:
    """Labels from people (a flake or a candidate crop, a label, who, when); revisit index."""
    db.create_table('labels', {'id': int, 'flake_pk': int, 'crop_path': str, 'label': str,
                               'labelled_by': str, 'created': float},
                    pk='id', foreign_keys=[('flake_pk', 'flakes', 'pk')], not_null={'label', 'created'})
    db['labels'].create_index(['flake_pk'])
    db['flakes'].create_index(['revisited_at', 'score'])


def _migration_3(db: sqlite_utils.Database) -> None:
    """Covering index for material + layer range sorted by score."""
    db['flakes'].create_index(['material', 'layers', 'score'])
    db.execute('DROP INDEX IF EXISTS idx_flakes_material_layers')


def _migration_4(db: sqlite_utils.Database) -> None:
    """Drop the creation-time and revisit indexes: every index is written on each ingest."""
    # 'created' order is insertion order (pk); the revisit list is found through the score index.
    db.execute('DROP INDEX IF EXISTS idx_flakes_created')
    db.execute('DROP INDEX IF EXISTS idx_flakes_revisited_at_score')


def _migration_5(db: sqlite_utils.Database) -> None:
    """Stack recipes planned from registry flakes (the table flake_registry.stacks made on first use)."""
    # IF NOT EXISTS: files written before this migration may hold the table already.
    db.execute('CREATE TABLE IF NOT EXISTS stack_recipes (id TEXT PRIMARY KEY, name TEXT NOT NULL, '
               'created REAL NOT NULL, created_by TEXT, robot_id TEXT, reserved_at REAL, lease_expires REAL, '
               'layers TEXT NOT NULL)')


def _migration_6(db: sqlite_utils.Database) -> None:
    """Chip wafer frames: every measurement of a chip's corners on a stage, the newest is the chip's frame."""
    db.execute('CREATE TABLE wafer_frames (id INTEGER PRIMARY KEY, chip_id TEXT NOT NULL REFERENCES chips (id), '
               'corners TEXT NOT NULL, stage_to_wafer TEXT NOT NULL, rotation REAL NOT NULL, '
               'residual REAL NOT NULL, measured_by TEXT, measured_at REAL NOT NULL)')
    db.execute('CREATE INDEX idx_wafer_frames_chip_id ON wafer_frames (chip_id, id)')
    # The frames migration 1 kept in `chips` (FlakeStore.set_chip) move here; `chips` keeps
    # the chip itself.
    for row in db.execute('SELECT id, corners, stage_to_wafer, updated FROM chips').fetchall():
        affine = json.loads(row[2] or '[]')
        if len(affine) != 6:
            continue
        db.execute('INSERT INTO wafer_frames (chip_id, corners, stage_to_wafer, rotation, residual, measured_by, '
                   'measured_at) VALUES (?, ?, ?, ?, 0.0, ?, ?)',
                   (row[0], row[1] or '[]', row[2], math.atan2(affine[1], affine[0]), 'set_chip', row[3]))
    db.execute('ALTER TABLE chips DROP COLUMN corners')
    db.execute('ALTER TABLE chips DROP COLUMN stage_to_wafer')


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaError(RuntimeError):
    """The file's schema is newer than this code or not a registry."""


def schema_version(conn: sqlite3.Connection) -> int:
    has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
                             ).fetchone()
    if not has_table:
        return 0
    return int(conn.execute('SELECT COALESCE(MAX(version), 0) FROM schema_version').fetchone()[0])


def migrate(db: sqlite_utils.Database, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations up to ``target``, each in its own transaction; return the version."""
    conn = db.conn
    conn.execute('BEGIN IMMEDIATE')
    try:
        conn.execute('CREATE TABLE IF NOT EXISTS schema_version '
                     '(version INTEGER PRIMARY KEY, applied_at FLOAT NOT NULL, description TEXT)')
        conn.execute('COMMIT')
    except BaseException:
        conn.execute('ROLLBACK')
        raise
    while True:
        conn.execute('BEGIN IMMEDIATE')
        try:
            current = schema_version(conn)
            if current > SCHEMA_VERSION:
                raise SchemaError(f'registry schema version {current} is newer than this software '
                                  f'({SCHEMA_VERSION}); upgrade flake_registry')
            if current >= target:
                conn.execute('COMMIT')
                return current
            step = MIGRATIONS[current]
            step(db)
            conn.execute('INSERT INTO schema_version (version, applied_at, description) VALUES (?, ?, ?)',
                         (current + 1, time.time(), (step.__doc__ or '').strip()))
            conn.execute('COMMIT')
        except BaseException:
            if conn.in_transaction:
                conn.execute('ROLLBACK')
            raise

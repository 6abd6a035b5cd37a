"""The flake registry: one SQLite file (through sqlite-utils) that remembers every flake.

Pure core: no rclpy, no message types. The registry node, the command line and a
web front end all use ``FlakeStore`` over the same file, from several threads or
processes at once.

Durability and concurrency:
- WAL journal, so readers never block the writer and a killed process leaves the
  file consistent: a transaction is either in the WAL with its commit record or
  it is not there at all.
- Durability is chosen per kind of write. Claims (reserve, release, mark used,
  images, labels) commit with ``synchronous=FULL``: every commit is fsynced, so a
  power cut cannot take back a reservation a robot was already told it holds.
  Ingest commits with ``synchronous=NORMAL`` by default: a committed batch survives
  any crash of the process, only an OS crash or power cut can lose the last
  batches, which a rescan or a bag replay restores; the fsync per batch would
  otherwise cost ~40 % of the ingest rate (bench_registry.py measures both). A FULL
  commit also makes every earlier NORMAL commit durable (it syncs the whole WAL).
- Every write is one ``BEGIN IMMEDIATE`` transaction: the write lock is taken up
  front, so two writers (threads or processes) are serialised by SQLite itself and
  wait up to ``busy_timeout`` instead of failing half-way.
- A flake has at most one live reservation, enforced by a partial UNIQUE index,
  not by application logic alone. Lease expiry is evaluated at query time against
  the clock, so nothing has to run to expire a lease.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
import contextlib
from dataclasses import dataclass, field
import json
import math
import os
from pathlib import Path
import secrets
import sqlite3
import sys
import threading
import time
from typing import Any
import zlib

import sqlite_utils

from flake_core.materials import LAYER_UNKNOWN, MATERIAL_NAMES
from flake_registry.query import (
    ALREADY_RESERVED,
    ALREADY_USED,
    EFFECTIVE_STATUS_SQL,
    INVALID_ARGUMENT,
    LEASE_EXPIRED,
    LIVE_RESERVATION_JOIN,
    NOT_RESERVED,
    STATUS_AVAILABLE,
    STATUS_REJECTED,
    STATUS_USED,
    UNKNOWN_ID,
    WRONG_TOKEN,
    FlakeQuery,
    RegistryError,
)

IMAGE_ROLES = ('crop', 'revisit', 'mask', 'thumbnail')
SYNCHRONOUS_MODES = ('FULL', 'NORMAL', 'EXTRA')


def default_database_path() -> Path:
    """$FLAKE_DATA_DIR/registry.sqlite, or ./data/registry.sqlite when the variable is unset."""
    return Path(os.environ.get('FLAKE_DATA_DIR') or 'data') / 'registry.sqlite'


# ---------------------------------------------------------------------------
# Records


@dataclass
class Detection:
    """One sighting of a flake by the detector, in the wafer frame of its chip."""

    chip_id: str
    scan_id: str
    x: float                                    # centroid [m], wafer frame
    y: float
    material: str = 'unknown'
    tile_index: int = 0
    layer_class: int = LAYER_UNKNOWN
    layers: float = 0.0
    layers_std: float = 0.0
    thickness_nm: float = 0.0
    thickness_nm_std: float = 0.0
    score: float = 0.0
    detector: str = ''
    model_version: str = ''
    contour: Sequence[tuple[float, float]] = ()  # outline [m], wafer frame
    area: float = 0.0                           # [m^2]
    bbox_px: tuple[int, int, int, int] = (0, 0, 0, 0)  # x_offset, y_offset, width, height in the tile
    homogeneity: float = 0.0
    isolation_distance: float = 0.0
    edge_straightness: float = 0.0
    stamp: float = 0.0                          # capture time [s since the epoch]
    rejected: bool = False
    mask: bytes = b''                           # mono8 pixels covering bbox_px, row-major
    mask_width: int = 0
    mask_height: int = 0

    def check(self) -> str | None:
        """Why this detection cannot be stored, or None."""
        for name in ('x', 'y', 'score', 'area', 'layers', 'thickness_nm'):
            if not math.isfinite(getattr(self, name)):
                return f'{name} is not finite'
        if any(not (math.isfinite(px) and math.isfinite(py)) for px, py in self.contour):
            return 'contour has a non-finite point'
        if self.material not in MATERIAL_NAMES:
            return f'unknown material {self.material!r}'
        if self.mask and len(self.mask) != self.mask_width * self.mask_height:
            return f'mask has {len(self.mask)} bytes for {self.mask_width}x{self.mask_height}'
        return None

    def wafer_box(self) -> tuple[float, float, float, float]:
        """(min_x, min_y, max_x, max_y) of the outline, or of a square of the flake's area."""
        if len(self.contour) >= 3:
            xs = [p[0] for p in self.contour]
            ys = [p[1] for p in self.contour]
            return min(min(xs), self.x), min(min(ys), self.y), max(max(xs), self.x), max(max(ys), self.y)
        half = math.sqrt(max(self.area, 0.0)) / 2
        return self.x - half, self.y - half, self.x + half, self.y + half


@dataclass
class FlakeRecord:
    """A flake as the registry knows it. ``status`` is effective: a live lease reads RESERVED."""

    id: str
    chip_id: str
    scan_id: str                                # scan of the best observation
    tile_index: int
    material: str
    layer_class: int
    layers: float
    layers_std: float
    thickness_nm: float
    thickness_nm_std: float
    score: float
    detector: str
    model_version: str
    x: float
    y: float
    contour: list[tuple[float, float]]
    area: float
    bbox_px: tuple[int, int, int, int]
    homogeneity: float
    isolation_distance: float
    edge_straightness: float
    status: int
    n_observations: int
    created: float
    updated: float
    detected_at: float
    revisited_at: float | None = None
    reserved_by: str = ''
    lease_expires: float | None = None
    used_by: str = ''
    used_at: float | None = None
    used_note: str = ''
    mask: bytes = b''
    mask_width: int = 0
    mask_height: int = 0


@dataclass
class Observation:
    scan_id: str
    tile_index: int
    stamp: float
    x: float
    y: float
    bbox_px: tuple[int, int, int, int]
    score: float
    detector: str
    iou: float                                  # overlap with the flake it was merged into (1 when new)


@dataclass
class FlakeImageRecord:
    role: str
    path: str
    objective: str
    pixel_size: float
    stamp: float


@dataclass
class FlakeDetail:
    flake: FlakeRecord
    observations: list[Observation]
    images: list[FlakeImageRecord]


@dataclass
class Reservation:
    flake_id: str
    robot_id: str
    token: str
    created: float
    expires: float


@dataclass
class IngestOutcome:
    """What became of one detection: its flake id, or why it was refused."""

    flake_id: str = ''
    chip_id: str = ''
    is_new: bool = False
    error: str = ''


@dataclass
class QueryResult:
    total: int                                  # matches before limit/offset
    flakes: list[FlakeRecord] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Schema: ordered migrations. Version N is reached by applying migrations 1..N in
# one transaction each; a file is never downgraded.


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


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_migration_1, _migration_2, _migration_3,
                                                                   _migration_4)
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


# ---------------------------------------------------------------------------


_FLAKE_COLUMNS = ('f.id, f.chip_id, f.scan_id, f.tile_index, f.material, f.layer_class, f.layers, '
                  'f.layers_std, f.thickness_nm, f.thickness_nm_std, f.score, f.detector, f.model_version, '
                  'f.x, f.y, f.contour, f.area, f.bbox_px, f.homogeneity, f.isolation_distance, '
                  f'f.edge_straightness, {EFFECTIVE_STATUS_SQL} AS status, f.n_observations, f.created, '
                  'f.updated, f.detected_at, f.revisited_at, live.robot_id AS reserved_by, '
                  'live.expires AS lease_expires, f.used_by, f.used_at, f.used_note')
_FLAKE_COLUMNS_WITH_MASK = _FLAKE_COLUMNS + ', f.mask, f.mask_width, f.mask_height'
# Long query answers leave the outline out: its blob is neither read nor decoded.
_FLAKE_COLUMNS_NO_CONTOUR = _FLAKE_COLUMNS.replace('f.contour,', 'NULL AS contour,')


def encode_contour(points: Iterable[tuple[float, float]]) -> bytes:
    """An outline as little-endian float64 x, y pairs: several times faster to read back than JSON."""
    values = array('d', (float(v) for point in points for v in point[:2]))
    if sys.byteorder == 'big':
        values.byteswap()
    return values.tobytes()


def decode_contour(blob: bytes | None) -> list[tuple[float, float]]:
    if not blob:
        return []
    values = array('d')
    values.frombytes(blob)
    if sys.byteorder == 'big':
        values.byteswap()
    return list(zip(values[0::2], values[1::2], strict=True))


def _records(cursor: sqlite3.Cursor) -> list[FlakeRecord]:
    """Every row of ``cursor`` (executed with plain tuple rows) as a FlakeRecord.

    A ``sqlite3.Row`` finds each column by comparing names one after the other:
    turning 100 rows of 32 columns into dicts that way cost as much as the SQL.
    """
    names = _column_names(cursor)
    return [_record(dict(zip(names, row))) for row in cursor]


def _column_names(cursor: sqlite3.Cursor) -> list[str]:
    # Interned, so that FlakeRecord(**values) matches its 35 keywords by identity;
    # the driver's fresh strings made that matching half the cost of a record.
    return [sys.intern(column[0]) for column in cursor.description]


def _tuple_cursor(conn: sqlite3.Connection) -> sqlite3.Cursor:
    cursor = conn.cursor()
    cursor.row_factory = None
    return cursor


def _record(row: sqlite3.Row | dict) -> FlakeRecord:
    values = row if isinstance(row, dict) else dict(row)
    values['contour'] = decode_contour(values['contour'])
    bbox = values['bbox_px']
    values['bbox_px'] = tuple(json.loads(bbox)) if bbox else (0, 0, 0, 0)
    for name in ('reserved_by', 'used_by', 'used_note', 'detector', 'model_version', 'scan_id'):
        if values[name] is None:
            values[name] = ''
    if 'mask' in values:
        values['mask'] = zlib.decompress(values['mask']) if values['mask'] else b''
        values['mask_width'] = values['mask_width'] or 0
        values['mask_height'] = values['mask_height'] or 0
    return FlakeRecord(**values)


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (min_x, min_y, max_x, max_y) boxes; 0 for degenerate ones."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FlakeStore:
    """The registry over one SQLite file. Safe to share between threads; one connection per thread.

    ``clock`` returns seconds since the epoch; tests pass a fake one to move leases
    through time. Every method that refuses a request raises ``RegistryError``.
    """

    def __init__(self, path: str | os.PathLike, *, synchronous: str = 'FULL', ingest_synchronous: str = 'NORMAL',
                 busy_timeout_s: float = 10.0,
                 default_lease_s: float = 300.0, max_lease_s: float = 7 * 86400.0,
                 merge_distance: float = 5e-6, merge_iou: float = 0.3,
                 clock: Callable[[], float] = time.time, schema_target: int = SCHEMA_VERSION):
        synchronous, ingest_synchronous = synchronous.upper(), ingest_synchronous.upper()
        for mode in (synchronous, ingest_synchronous):
            if mode not in SYNCHRONOUS_MODES:
                raise ValueError(f'synchronous modes are {SYNCHRONOUS_MODES}, got {mode!r}')
        if not 0 < default_lease_s <= max_lease_s:
            raise ValueError(f'need 0 < default_lease_s <= max_lease_s, got {default_lease_s}, {max_lease_s}')
        if merge_distance < 0 or not 0 < merge_iou <= 1:
            raise ValueError('merge_distance must be >= 0 and merge_iou in (0, 1]')
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self.ingest_synchronous = ingest_synchronous
        self.busy_timeout_s = busy_timeout_s
        self.default_lease_s = default_lease_s
        self.max_lease_s = max_lease_s
        self.merge_distance = merge_distance
        self.merge_iou = merge_iou
        self.clock = clock
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.schema_version = migrate(self.db, schema_target)

    # -- connections and transactions ------------------------------------

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's sqlite-utils Database (its own connection to the file)."""
        db = getattr(self._local, 'db', None)
        if db is None:
            # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE),
            # never implicitly by the driver.
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute('PRAGMA journal_mode=WAL')
            conn.execute(f'PRAGMA synchronous={self.synchronous}')
            conn.execute(f'PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}')
            conn.execute('PRAGMA foreign_keys=ON')
            # Ingest inserts random keys into every index of a file of many MB: a 64 MiB
            # page cache and a 40 MB WAL between checkpoints more than double the
            # ingest rate at 100 000 flakes (bench_registry.py).
            conn.execute('PRAGMA cache_size=-65536')
            conn.execute('PRAGMA wal_autocheckpoint=10000')
            db = sqlite_utils.Database(conn, execute_plugins=False)
            self._local.db = db
            self._local.synchronous = self.synchronous
            with self._lock:
                self._connections.append(conn)
        return db

    @contextlib.contextmanager
    def _write(self, synchronous: str | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database write lock from its first statement.

        ``synchronous`` overrides the store's mode for this commit (ingest uses NORMAL).
        """
        conn = self.db.conn
        mode = synchronous or self.synchronous
        if self._local.synchronous != mode:
            conn.execute(f'PRAGMA synchronous={mode}')
            self._local.synchronous = mode
        conn.execute('BEGIN IMMEDIATE')
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute('ROLLBACK')
            raise
        else:
            conn.execute('COMMIT')

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several SELECTs see one snapshot."""
        conn = self.db.conn
        conn.execute('BEGIN')
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute('COMMIT')

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def __enter__(self) -> FlakeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def integrity_check(self) -> str:
        """'ok' or SQLite's list of problems."""
        rows = self.db.conn.execute('PRAGMA integrity_check').fetchall()
        return '\n'.join(str(r[0]) for r in rows)

    # -- chips, scans, frames ---------------------------------------------

    def set_chip(self, chip_id: str, corners: Sequence[Sequence[float]] = (),
                 stage_to_wafer: Sequence[float] = (), note: str = '') -> None:
        """Record a chip's wafer frame: corner points [m] in the stage frame and the affine map."""
        if not chip_id:
            raise RegistryError(INVALID_ARGUMENT, 'chip_id must not be empty')
        now = self.clock()
        with self._write() as conn:
            conn.execute('INSERT INTO chips (id, corners, stage_to_wafer, note, created, updated) '
                         'VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET corners = excluded.corners, '
                         'stage_to_wafer = excluded.stage_to_wafer, note = excluded.note, updated = excluded.updated',
                         (chip_id, json.dumps([list(map(float, c)) for c in corners]),
                          json.dumps([float(v) for v in stage_to_wafer]), note, now, now))

    def chips(self) -> list[dict[str, Any]]:
        rows = self.db.query('SELECT c.*, (SELECT COUNT(*) FROM flakes f WHERE f.chip_id = c.id) AS flakes '
                             'FROM chips c ORDER BY c.id')
        return [dict(r, corners=json.loads(r['corners'] or '[]'),
                     stage_to_wafer=json.loads(r['stage_to_wafer'] or '[]')) for r in rows]

    def record_frame(self, scan_id: str, tile_index: int, pixel_to_wafer: Sequence[float], width: int,
                     height: int, pixel_size: float = 0.0, stamp: float = 0.0, path: str = '') -> None:
        """Remember a tile's geometry so that exports can map wafer outlines back to its pixels."""
        if len(pixel_to_wafer) != 6:
            raise RegistryError(INVALID_ARGUMENT, 'pixel_to_wafer needs 6 numbers')
        with self._write() as conn:
            conn.execute('INSERT OR REPLACE INTO frames VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
                         (scan_id, int(tile_index), stamp, int(width), int(height), pixel_size,
                          json.dumps([float(v) for v in pixel_to_wafer]), path))

    def frames(self, scan_id: str) -> dict[int, dict[str, Any]]:
        rows = self.db.query('SELECT * FROM frames WHERE scan_id = ?', [scan_id])
        return {r['tile_index']: dict(r, pixel_to_wafer=json.loads(r['pixel_to_wafer'])) for r in rows}

    def scans(self, chip_id: str = '') -> list[dict[str, Any]]:
        sql = ('SELECT s.*, (SELECT COUNT(DISTINCT flake_pk) FROM observations o WHERE o.scan_id = s.id) '
               'AS flakes FROM scans s')
        if chip_id:
            return list(self.db.query(sql + ' WHERE s.chip_id = ? ORDER BY s.started', [chip_id]))
        return list(self.db.query(sql + ' ORDER BY s.started'))

    # -- ingest and merge ---------------------------------------------------

    def ingest(self, detections: Iterable[Detection]) -> list[IngestOutcome]:
        """Store one batch in one transaction, merging sightings of flakes already known.

        A detection matches a known flake on the same chip when their centres are
        within ``merge_distance`` or their wafer-frame boxes overlap by at least
        ``merge_iou``; the best match (largest overlap, then nearest) wins. The merged
        flake keeps the fields of its highest-scoring observation. Detections that
        cannot be stored (non-finite numbers, unknown material) are refused one by one
        with a reason; the rest of the batch is stored.
        """
        detections = list(detections)
        outcomes: list[IngestOutcome] = []
        now = self.clock()
        with self._write(self.ingest_synchronous) as conn:
            next_pk = int(conn.execute('SELECT COALESCE(MAX(pk), 0) FROM flakes').fetchone()[0]) + 1
            seen_scans: set[tuple[str, str]] = set()
            for detection in detections:
                error = detection.check() if detection.chip_id else 'chip_id is empty'
                if error is not None:
                    outcomes.append(IngestOutcome(chip_id=detection.chip_id, error=error))
                    continue
                if (detection.chip_id, detection.scan_id) not in seen_scans:
                    seen_scans.add((detection.chip_id, detection.scan_id))
                    conn.execute('INSERT OR IGNORE INTO chips (id, created, updated) VALUES (?, ?, ?)',
                                 (detection.chip_id, now, now))
                    if detection.scan_id:
                        conn.execute('INSERT OR IGNORE INTO scans (id, chip_id, started) VALUES (?, ?, ?)',
                                     (detection.scan_id, detection.chip_id, detection.stamp or now))
                box = detection.wafer_box()
                match = self._best_match(conn, detection, box)
                if match is None:
                    flake_pk, flake_id, iou = next_pk, f'F{next_pk:07d}', 1.0
                    next_pk += 1
                    self._insert_flake(conn, flake_pk, flake_id, detection, box, now)
                else:
                    flake_pk, flake_id, best_score, iou = match
                    if detection.score > best_score:
                        self._replace_representative(conn, flake_pk, detection, box, now)
                    conn.execute('UPDATE flakes SET n_observations = n_observations + 1, updated = ? '
                                 'WHERE pk = ?', (now, flake_pk))
                conn.execute('INSERT INTO observations (flake_pk, scan_id, tile_index, stamp, x, y, bbox_px, '
                             'score, detector, iou, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                             (flake_pk, detection.scan_id, int(detection.tile_index), detection.stamp,
                              detection.x, detection.y, json.dumps(list(map(int, detection.bbox_px))),
                              detection.score, detection.detector, iou, now))
                outcomes.append(IngestOutcome(flake_id=flake_id, chip_id=detection.chip_id,
                                              is_new=match is None))
        return outcomes

    def _best_match(self, conn: sqlite3.Connection, detection: Detection, box):
        reach = self.merge_distance
        # `+f.chip_id`: keeps the planner on the R*Tree range search; with the chip index
        # it would visit every flake of the chip and probe the R*Tree once for each.
        rows = conn.execute(
            'SELECT f.pk, f.id, f.x, f.y, f.score, b.min_x, b.min_y, b.max_x, b.max_y FROM flake_boxes b '
            'JOIN flakes f ON f.pk = b.id WHERE b.max_x >= ? AND b.min_x <= ? AND b.max_y >= ? AND b.min_y <= ? '
            'AND +f.chip_id = ?',
            (box[0] - reach, box[2] + reach, box[1] - reach, box[3] + reach, detection.chip_id)).fetchall()
        best, best_key = None, None
        for row in rows:
            distance = math.hypot(row['x'] - detection.x, row['y'] - detection.y)
            iou = _box_iou(box, (row['min_x'], row['min_y'], row['max_x'], row['max_y']))
            if distance > reach and iou < self.merge_iou:
                continue
            key = (iou, -distance)
            if best_key is None or key > best_key:
                best, best_key = (row['pk'], row['id'], row['score'], iou), key
        return best

    @staticmethod
    def _flake_values(detection: Detection) -> dict[str, Any]:
        return {
            'scan_id': detection.scan_id, 'tile_index': int(detection.tile_index),
            'material': detection.material, 'layer_class': int(detection.layer_class),
            'layers': detection.layers, 'layers_std': detection.layers_std,
            'thickness_nm': detection.thickness_nm, 'thickness_nm_std': detection.thickness_nm_std,
            'score': detection.score, 'detector': detection.detector, 'model_version': detection.model_version,
            'x': detection.x, 'y': detection.y,
            'contour': encode_contour(detection.contour),
            'area': detection.area, 'bbox_px': json.dumps(list(map(int, detection.bbox_px))),
            'homogeneity': detection.homogeneity, 'isolation_distance': detection.isolation_distance,
            'edge_straightness': detection.edge_straightness, 'detected_at': detection.stamp,
            'mask': zlib.compress(detection.mask, 1) if detection.mask else None,
            'mask_width': detection.mask_width, 'mask_height': detection.mask_height,
        }

    def _insert_flake(self, conn, flake_pk: int, flake_id: str, detection: Detection, box, now: float) -> None:
        values = self._flake_values(detection)
        values.update(pk=flake_pk, id=flake_id, chip_id=detection.chip_id, n_observations=1, created=now,
                      updated=now, status=STATUS_REJECTED if detection.rejected else STATUS_AVAILABLE)
        names = ', '.join(values)
        conn.execute(f'INSERT INTO flakes ({names}) VALUES ({", ".join("?" * len(values))})',
                     tuple(values.values()))
        conn.execute('INSERT INTO flake_boxes (id, min_x, max_x, min_y, max_y) VALUES (?, ?, ?, ?, ?)',
                     (flake_pk, box[0], box[2], box[1], box[3]))

    def _replace_representative(self, conn, flake_pk: int, detection: Detection, box, now: float) -> None:
        values = self._flake_values(detection)
        assignments = ', '.join(f'{name} = ?' for name in values)
        conn.execute(f'UPDATE flakes SET {assignments} WHERE pk = ?', (*values.values(), flake_pk))
        conn.execute('UPDATE flake_boxes SET min_x = ?, max_x = ?, min_y = ?, max_y = ? WHERE id = ?',
                     (box[0], box[2], box[1], box[3], flake_pk))

    # -- reading --------------------------------------------------------------

    def query(self, query: FlakeQuery, contours: bool = True) -> QueryResult:
        """Flakes matching ``query`` (validated here), one page, and the total number of matches.

        ``contours=False`` leaves every record's outline empty (not read from the file).
        """
        query = query.validated()
        where, params = query.where_sql(self.clock())
        order = query.order_sql()
        count_join = LIVE_RESERVATION_JOIN if query.statuses else ''
        params.update(limit=query.limit, offset=query.offset)
        with self._read() as conn:
            total = conn.execute(f'SELECT COUNT(*) FROM flakes AS f {count_join} WHERE {where}',
                                 params).fetchone()[0]
            # The page is chosen on keys alone and only its rows are read in full: sorting
            # thousands of matches with every column costs ten times more.
            columns = _FLAKE_COLUMNS if contours else _FLAKE_COLUMNS_NO_CONTOUR
            flakes = _records(_tuple_cursor(conn).execute(
                f'SELECT {columns} FROM (SELECT f.pk AS pk FROM flakes AS f {count_join} WHERE {where} '
                f'ORDER BY {order} LIMIT :limit OFFSET :offset) AS page JOIN flakes AS f ON f.pk = page.pk '
                f'{LIVE_RESERVATION_JOIN} ORDER BY {order}', params))
        return QueryResult(total=int(total), flakes=flakes)

    def iter_flakes(self, chip_id: str = '', scan_id: str = '', page: int = 1000) -> Iterator[FlakeRecord]:
        """Every flake of a chip and/or scan in creation order, read in pages (exports)."""
        last_pk = 0
        clauses, params = ['f.pk > :last_pk'], {'now': self.clock()}
        if chip_id:
            clauses.append('f.chip_id = :chip_id')
            params['chip_id'] = chip_id
        if scan_id:
            clauses.append('f.pk IN (SELECT flake_pk FROM observations WHERE scan_id = :scan_id)')
            params['scan_id'] = scan_id
        while True:
            params.update(last_pk=last_pk, page=page)
            cursor = _tuple_cursor(self.db.conn).execute(
                f'SELECT f.pk AS pk, {_FLAKE_COLUMNS_WITH_MASK} FROM flakes AS f {LIVE_RESERVATION_JOIN} '
                f'WHERE {" AND ".join(clauses)} ORDER BY f.pk LIMIT :page', params)
            names = _column_names(cursor)
            rows = cursor.fetchall()
            if not rows:
                return
            for row in rows:
                values = dict(zip(names, row))
                last_pk = values.pop('pk')
                yield _record(values)

    def _flake_pk(self, conn: sqlite3.Connection, flake_id: str) -> sqlite3.Row:
        if not flake_id:
            raise RegistryError(UNKNOWN_ID, 'flake_id is empty', flake_id)
        row = conn.execute('SELECT pk, status FROM flakes WHERE id = ?', (flake_id,)).fetchone()
        if row is None:
            raise RegistryError(UNKNOWN_ID, f'no flake with id {flake_id!r}', flake_id)
        return row

    def get_flake(self, flake_id: str) -> FlakeDetail:
        """The full record: outline, mask, every observation and image. Raises UNKNOWN_ID."""
        with self._read() as conn:
            pk = self._flake_pk(conn, flake_id)['pk']
            row = conn.execute(f'SELECT {_FLAKE_COLUMNS_WITH_MASK} FROM flakes AS f {LIVE_RESERVATION_JOIN} '
                               'WHERE f.pk = :pk', {'pk': pk, 'now': self.clock()}).fetchone()
            observations = [
                Observation(scan_id=r['scan_id'] or '', tile_index=r['tile_index'], stamp=r['stamp'], x=r['x'],
                            y=r['y'], bbox_px=tuple(json.loads(r['bbox_px'])), score=r['score'],
                            detector=r['detector'] or '', iou=r['iou'])
                for r in conn.execute('SELECT * FROM observations WHERE flake_pk = ? ORDER BY id', (pk,))]
            images = [FlakeImageRecord(role=r['role'], path=r['path'], objective=r['objective'] or '',
                                       pixel_size=r['pixel_size'] or 0.0, stamp=r['stamp'] or 0.0)
                      for r in conn.execute('SELECT * FROM images WHERE flake_pk = ? ORDER BY id', (pk,))]
        return FlakeDetail(flake=_record(row), observations=observations, images=images)

    def count(self) -> int:
        return int(self.db.conn.execute('SELECT COUNT(*) FROM flakes').fetchone()[0])

    def revisit_list(self, *, chip_id: str = '', scan_id: str = '', materials: Sequence[str] = (),
                     layer_classes: Sequence[int] = (), min_score: float = 0.8, min_homogeneity: float = 0.0,
                     include_revisited: bool = False, limit: int = 50) -> list[FlakeRecord]:
        """Promising flakes for a high-magnification revisit: available, good enough, best first."""
        query = FlakeQuery(chip_id=chip_id, scan_id=scan_id, materials=tuple(materials),
                           layer_classes=tuple(layer_classes), min_score=min_score,
                           min_homogeneity=min_homogeneity, statuses=(STATUS_AVAILABLE,),
                           revisited=None if include_revisited else False, sort_by='score', limit=limit)
        return self.query(query).flakes

    # -- images, labels, defect reports ----------------------------------------

    def add_image(self, flake_id: str, role: str, path: str, objective: str = '', pixel_size: float = 0.0,
                  stamp: float | None = None) -> None:
        """Attach an image file to a flake; a 'revisit' image takes the flake off the revisit list."""
        if role not in IMAGE_ROLES:
            raise RegistryError(INVALID_ARGUMENT, f'image role must be one of {list(IMAGE_ROLES)}, got {role!r}')
        if not path:
            raise RegistryError(INVALID_ARGUMENT, 'image path is empty')
        if not math.isfinite(pixel_size) or pixel_size < 0:
            raise RegistryError(INVALID_ARGUMENT, f'pixel_size must be >= 0, got {pixel_size}')
        now = self.clock()
        with self._write() as conn:
            pk = self._flake_pk(conn, flake_id)['pk']
            conn.execute('INSERT INTO images (flake_pk, role, path, objective, pixel_size, stamp, created) '
                         'VALUES (?, ?, ?, ?, ?, ?, ?)',
                         (pk, role, str(path), objective, pixel_size, now if stamp is None else stamp, now))
            if role == 'revisit':
                conn.execute('UPDATE flakes SET revisited_at = ?, updated = ? WHERE pk = ?', (now, now, pk))

    def add_label(self, label: str, labelled_by: str, flake_id: str = '', crop_path: str = '') -> int:
        """A person's label for a flake or for a candidate crop that is not a flake (yet)."""
        if not label:
            raise RegistryError(INVALID_ARGUMENT, 'label is empty')
        if not flake_id and not crop_path:
            raise RegistryError(INVALID_ARGUMENT, 'a label needs a flake_id or a crop_path')
        with self._write() as conn:
            pk = self._flake_pk(conn, flake_id)['pk'] if flake_id else None
            cursor = conn.execute('INSERT INTO labels (flake_pk, crop_path, label, labelled_by, created) '
                                  'VALUES (?, ?, ?, ?, ?)', (pk, crop_path or None, label, labelled_by,
                                                             self.clock()))
            return int(cursor.lastrowid)

    def labels(self, flake_id: str = '') -> list[dict[str, Any]]:
        sql = ('SELECT l.id, f.id AS flake_id, l.crop_path, l.label, l.labelled_by, l.created FROM labels l '
               'LEFT JOIN flakes f ON f.pk = l.flake_pk')
        if flake_id:
            return list(self.db.query(sql + ' WHERE f.id = ? ORDER BY l.id', [flake_id]))
        return list(self.db.query(sql + ' ORDER BY l.id'))

    def add_defect_report(self, report: dict[str, Any], flake_id: str = '') -> int:
        """Store a STEM defect analysis (the fields of flake_msgs/DefectReport), optionally for a flake."""
        with self._write() as conn:
            pk = self._flake_pk(conn, flake_id)['pk'] if flake_id else None
            cursor = conn.execute(
                'INSERT INTO defect_reports (flake_pk, image_id, stamp, pixel_size, analysed_area, cells_total, '
                'class_names, counts, concentration, concentration_low, concentration_high, model_version, '
                'created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                (pk, report.get('image_id', ''), report.get('stamp', 0.0), report.get('pixel_size', 0.0),
                 report.get('analysed_area', 0.0), int(report.get('cells_total', 0)),
                 json.dumps(list(report.get('class_names', []))), json.dumps(list(report.get('counts', []))),
                 json.dumps(list(report.get('concentration', []))),
                 json.dumps(list(report.get('concentration_low', []))),
                 json.dumps(list(report.get('concentration_high', []))), report.get('model_version', ''),
                 self.clock()))
            return int(cursor.lastrowid)

    def defect_reports(self, flake_id: str = '') -> list[dict[str, Any]]:
        sql = 'SELECT d.*, f.id AS flake_id FROM defect_reports d LEFT JOIN flakes f ON f.pk = d.flake_pk'
        rows = (self.db.query(sql + ' WHERE f.id = ? ORDER BY d.id', [flake_id]) if flake_id
                else self.db.query(sql + ' ORDER BY d.id'))
        decoded = ('class_names', 'counts', 'concentration', 'concentration_low', 'concentration_high')
        return [{k: (json.loads(v) if k in decoded else v) for k, v in r.items() if k != 'flake_pk'} for r in rows]

    # -- reservations -----------------------------------------------------------

    def _lease(self, lease_s: float) -> float:
        if not math.isfinite(lease_s) or lease_s < 0:
            raise RegistryError(INVALID_ARGUMENT, f'lease must be a finite number >= 0 s, got {lease_s}')
        if lease_s > self.max_lease_s:
            raise RegistryError(INVALID_ARGUMENT, f'lease {lease_s} s is above the maximum {self.max_lease_s} s')
        return lease_s or self.default_lease_s

    def _reserve_in(self, conn, flake_id: str, robot_id: str, lease_s: float, now: float) -> Reservation:
        flake = self._flake_pk(conn, flake_id)
        if flake['status'] == STATUS_USED:
            raise RegistryError(ALREADY_USED, f'flake {flake_id} was already used', flake_id)
        if flake['status'] == STATUS_REJECTED:
            raise RegistryError(INVALID_ARGUMENT, f'flake {flake_id} is rejected and cannot be reserved', flake_id)
        conn.execute("UPDATE reservations SET ended = expires, outcome = 'expired' "
                     'WHERE flake_pk = ? AND ended IS NULL AND expires <= ?', (flake['pk'], now))
        token = secrets.token_urlsafe(24)
        expires = now + lease_s
        try:
            conn.execute('INSERT INTO reservations (flake_pk, robot_id, token, created, expires) '
                         'VALUES (?, ?, ?, ?, ?)', (flake['pk'], robot_id, token, now, expires))
        except sqlite3.IntegrityError:
            holder = conn.execute('SELECT robot_id, expires FROM reservations WHERE flake_pk = ? AND ended IS NULL',
                                  (flake['pk'],)).fetchone()
            raise RegistryError(ALREADY_RESERVED, f'flake {flake_id} is reserved by {holder["robot_id"]!r} for '
                                                  f'another {holder["expires"] - now:.1f} s', flake_id) from None
        return Reservation(flake_id=flake_id, robot_id=robot_id, token=token, created=now, expires=expires)

    def reserve(self, flake_id: str, robot_id: str, lease_s: float = 0.0) -> Reservation:
        """Claim a flake for ``robot_id`` for ``lease_s`` seconds (0: the default lease).

        Atomic across threads and processes: of any number of concurrent callers at
        most one gets a token until the lease expires or is released.
        """
        return self.reserve_many([flake_id], robot_id, lease_s)[0]

    def reserve_many(self, flake_ids: Sequence[str], robot_id: str, lease_s: float = 0.0) -> list[Reservation]:
        """Claim several flakes at once, all or none (a stack needs every one of its layers)."""
        if not robot_id:
            raise RegistryError(INVALID_ARGUMENT, 'robot_id must not be empty')
        flake_ids = list(flake_ids)
        if not flake_ids:
            raise RegistryError(INVALID_ARGUMENT, 'no flake ids given')
        if len(set(flake_ids)) != len(flake_ids):
            raise RegistryError(INVALID_ARGUMENT, 'a flake id is given twice')
        lease_s = self._lease(lease_s)
        now = self.clock()
        with self._write() as conn:
            return [self._reserve_in(conn, flake_id, robot_id, lease_s, now) for flake_id in flake_ids]

    def _check_token(self, conn, flake_pk: int, flake_id: str, token: str, now: float,
                     expired_code: str) -> sqlite3.Row:
        """The live reservation ``token`` belongs to; raises the code that says why not."""
        live = conn.execute('SELECT * FROM reservations WHERE flake_pk = ? AND ended IS NULL', (flake_pk,)).fetchone()
        own = None
        if token:
            own = conn.execute('SELECT * FROM reservations WHERE flake_pk = ? AND token = ?',
                               (flake_pk, token)).fetchone()
        own_expired = own is not None and (own['outcome'] == 'expired' or (own['ended'] is None
                                                                           and own['expires'] <= now))
        if live is not None and live['expires'] > now:
            if own is not None and own['id'] == live['id']:
                return live
            if own_expired:
                raise RegistryError(expired_code, f'the lease on {flake_id} expired and the flake was '
                                                  'reserved again', flake_id)
            raise RegistryError(WRONG_TOKEN, f'token does not match the reservation of {flake_id}', flake_id)
        if own_expired:
            raise RegistryError(expired_code, f'the lease on {flake_id} expired at {own["expires"]:.3f}', flake_id)
        raise RegistryError(NOT_RESERVED, f'flake {flake_id} is not reserved', flake_id)

    def release(self, flake_id: str, token: str) -> Reservation:
        """Give a reservation back before its lease ends."""
        now = self.clock()
        with self._write() as conn:
            flake = self._flake_pk(conn, flake_id)
            live = self._check_token(conn, flake['pk'], flake_id, token, now, NOT_RESERVED)
            conn.execute("UPDATE reservations SET ended = ?, outcome = 'released' WHERE id = ?", (now, live['id']))
        return Reservation(flake_id=flake_id, robot_id=live['robot_id'], token=token, created=live['created'],
                           expires=now)

    def mark_used(self, flake_id: str, token: str, note: str = '') -> Reservation:
        """The robot put the flake into a stack: it leaves the pool for good. Needs the live token."""
        now = self.clock()
        with self._write() as conn:
            flake = self._flake_pk(conn, flake_id)
            if flake['status'] == STATUS_USED:
                raise RegistryError(NOT_RESERVED, f'flake {flake_id} was already used', flake_id)
            live = self._check_token(conn, flake['pk'], flake_id, token, now, LEASE_EXPIRED)
            conn.execute("UPDATE reservations SET ended = ?, outcome = 'used' WHERE id = ?", (now, live['id']))
            conn.execute('UPDATE flakes SET status = ?, used_by = ?, used_at = ?, used_note = ?, updated = ? '
                         'WHERE pk = ?', (STATUS_USED, live['robot_id'], now, note, now, flake['pk']))
        return Reservation(flake_id=flake_id, robot_id=live['robot_id'], token=token, created=live['created'],
                           expires=now)

    def reservations(self, flake_id: str = '', live_only: bool = True) -> list[dict[str, Any]]:
        """Reservation rows (who, token, lease, outcome), live ones only by default."""
        clauses, params = [], {'now': self.clock()}
        if live_only:
            clauses.append('r.ended IS NULL AND r.expires > :now')
        if flake_id:
            clauses.append('f.id = :flake_id')
            params['flake_id'] = flake_id
        where = ('WHERE ' + ' AND '.join(clauses)) if clauses else ''
        return list(self.db.query('SELECT f.id AS flake_id, r.robot_id, r.token, r.created, r.expires, r.ended, '
                                  f'r.outcome FROM reservations r JOIN flakes f ON f.pk = r.flake_pk {where} '
                                  'ORDER BY r.id', params))

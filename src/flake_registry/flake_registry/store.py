"""The flake registry: ``FlakeStore``, the one object the node, the command line and the web app use.

Pure core: no rclpy, no message types. Several threads and processes use the same
registry at once. The work is split by concern, each in its own module:

- ``database``: connections, transactions and durability (``Transaction``)
- ``schema``: the numbered migrations, the only place tables are made
- ``ingest``: sightings merged into flakes
- ``reservations``: leases, tokens, never two owners
- ``reading`` and ``query``: filters, pages, full records

``FlakeStore`` holds the settings (leases, merge rule, clock) and opens one
transaction per call. Code that needs several steps in one transaction (a stack
recipe reserving its layers and recording the tokens) uses the public
``transaction()`` and the ``*_in`` functions of those modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import contextlib
import json
import math
import os
from pathlib import Path
import time
from typing import Any

import sqlite_utils

from flake_core.geometry import WaferFrame
from flake_registry import ingest as ingest_module
from flake_registry import reading, reservations, revisit
from flake_registry.database import SYNCHRONOUS_MODES, Row, SQLiteDatabase, Transaction, open_database
from flake_registry.ingest import MergeRule
from flake_registry.query import DEGENERATE, INVALID_ARGUMENT, FlakeQuery, RegistryError
from flake_registry.records import (
    ChipWaferFrame,
    FlakeDetail,
    FlakeImageRecord,
    FlakeRecord,
    IngestOutcome,
    Observation,
    QueryResult,
    Reservation,
    Sighting,
    decode_contour,
    encode_contour,
)
from flake_registry.reservations import LeasePolicy, flake_row
from flake_registry.revisit import RevisitPolicy
from flake_registry.schema import SCHEMA_VERSION, SchemaError, migrate

IMAGE_ROLES = ('crop', 'revisit', 'mask', 'thumbnail')

__all__ = [
    'IMAGE_ROLES', 'SCHEMA_VERSION', 'SYNCHRONOUS_MODES', 'ChipWaferFrame', 'FlakeDetail', 'FlakeImageRecord',
    'FlakeRecord', 'FlakeStore', 'IngestOutcome', 'Observation', 'QueryResult', 'Reservation', 'SchemaError',
    'Sighting', 'Transaction', 'decode_contour', 'default_database_path', 'encode_contour',
]


def default_database_path() -> Path:
    """$FLAKE_DATA_DIR/registry.sqlite, or ./data/registry.sqlite when the variable is unset."""
    return Path(os.environ.get('FLAKE_DATA_DIR') or 'data') / 'registry.sqlite'


class FlakeStore:
    """The registry in an SQLite file or on a PostgreSQL server. Safe to share between threads.

    ``path`` is a file path (SQLite, one connection per thread) or a
    ``postgresql://user@host:port/database`` URL (a pool of connections, shared by
    threads).

    ``clock`` returns seconds since the epoch; tests pass a fake one to move leases
    through time. Every method that refuses a request raises ``RegistryError``.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = 'FULL', ingest_synchronous: str = 'NORMAL',
                 busy_timeout_s: float = 10.0,
                 default_lease_s: float = 300.0, max_lease_s: float = 7 * 86400.0,
                 merge_distance: float = 5e-6, merge_iou: float = 0.3,
                 clock: Callable[[], float] = time.time, schema_target: int = SCHEMA_VERSION):
        ingest_synchronous = ingest_synchronous.upper()
        if ingest_synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f'synchronous modes are {SYNCHRONOUS_MODES}, got {ingest_synchronous!r}')
        self.leases = LeasePolicy(default_lease_s, max_lease_s)
        self.merge_rule = MergeRule(merge_distance, merge_iou)
        self.database = open_database(path, synchronous=synchronous, busy_timeout_s=busy_timeout_s)
        self.path = self.database.path          # the SQLite file; None on PostgreSQL
        self.url = self.database.url            # where the registry is (a password is never shown)
        self.dialect = self.database.dialect
        self.ingest_synchronous = ingest_synchronous
        self.clock = clock
        self.schema_version = migrate(self.database, schema_target)

    # -- transactions -----------------------------------------------------------

    def transaction(self, synchronous: str | None = None) -> contextlib.AbstractContextManager[Transaction]:
        """One write transaction: every statement in the ``with`` block commits together or not at all.

        ``synchronous`` overrides the durability of this commit (claims use the store's
        ``synchronous``, FULL by default; detection batches ``ingest_synchronous``).
        """
        return self.database.transaction(synchronous)

    def snapshot(self, single_statement: bool = False) -> contextlib.AbstractContextManager[Transaction]:
        """A read transaction: several statements see one consistent state.

        ``single_statement``: the block runs one statement only (it sees one state by
        itself); on PostgreSQL that saves the round trips of BEGIN and COMMIT.
        """
        return self.database.snapshot(single_statement)

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's sqlite-utils Database of the file (SQLite only: inspection and tests)."""
        if not isinstance(self.database, SQLiteDatabase):
            raise AttributeError('db (sqlite-utils) exists for SQLite registries only; use snapshot()')
        return self.database.db

    @property
    def synchronous(self) -> str:
        return self.database.synchronous

    @property
    def default_lease_s(self) -> float:
        return self.leases.default_s

    @default_lease_s.setter
    def default_lease_s(self, seconds: float) -> None:
        self.leases = LeasePolicy(seconds, self.leases.max_s)

    @property
    def max_lease_s(self) -> float:
        return self.leases.max_s

    @max_lease_s.setter
    def max_lease_s(self, seconds: float) -> None:
        self.leases = LeasePolicy(min(self.leases.default_s, seconds), seconds)

    def lease_seconds(self, lease_s: float) -> float:
        """The lease a request for ``lease_s`` gets (0: the default); RegistryError when out of range."""
        return self.leases.seconds(lease_s)

    def close(self) -> None:
        self.database.close()

    def __enter__(self) -> FlakeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def integrity_check(self) -> str:
        """'ok' or the database's list of problems."""
        return self.database.integrity_check()

    def table_names(self) -> list[str]:
        return self.database.table_names()

    # -- chips, wafer frames, scans, tile frames ----------------------------------

    def save_wafer_frame(self, chip_id: str, corners: Sequence[Sequence[float]],
                         measured_by: str = '') -> ChipWaferFrame:
        """Measure a chip's wafer frame from three corners [m] in the stage frame and keep it.

        corners[0] is the origin, corners[1] lies on the wafer +x axis, corners[2] on
        the +y side (``flake_core.geometry.WaferFrame``). Every measurement is kept; the
        newest is the chip's frame. Raises INVALID_ARGUMENT or DEGENERATE.
        """
        if not chip_id:
            raise RegistryError(INVALID_ARGUMENT, 'chip_id must not be empty')
        points = [(float(c[0]), float(c[1])) for c in corners if len(c) >= 2]
        if len(points) != len(corners):
            raise RegistryError(INVALID_ARGUMENT, 'every corner needs x and y')
        try:
            frame = WaferFrame.from_corners(points, chip_id)
        except ValueError as error:
            degenerate = any(word in str(error) for word in ('collinear', 'apart', 'clockwise'))
            raise RegistryError(DEGENERATE if degenerate else INVALID_ARGUMENT, str(error)) from None
        now = self.clock()
        saved = ChipWaferFrame(chip_id=chip_id, corners=points,
                               stage_to_wafer=[float(v) for v in frame.stage_to_wafer.as_list()],
                               rotation=float(frame.rotation), residual=float(frame.residual), measured_by=measured_by,
                               measured_at=now)
        with self.transaction() as tx:
            tx.execute('INSERT INTO chips (id, created, updated) VALUES (?, ?, ?) '
                       'ON CONFLICT (id) DO UPDATE SET updated = excluded.updated', (chip_id, now, now))
            tx.execute('INSERT INTO wafer_frames (chip_id, corners, stage_to_wafer, rotation, residual, measured_by, '
                       'measured_at) VALUES (?, ?, ?, ?, ?, ?, ?)',
                       (chip_id, json.dumps([list(p) for p in points]), json.dumps(saved.stage_to_wafer),
                        saved.rotation, saved.residual, measured_by, now))
        return saved

    def wafer_frames(self, chip_ids: Iterable[str] = ()) -> dict[str, ChipWaferFrame]:
        """The current wafer frame of each chip (of ``chip_ids``; every chip that has one when empty)."""
        wanted = list(chip_ids)
        sql = ('SELECT w.* FROM wafer_frames w WHERE w.id = (SELECT MAX(id) FROM wafer_frames n '
               'WHERE n.chip_id = w.chip_id)')
        params: dict[str, Any] = {}
        if wanted:
            sql += ' AND w.chip_id IN (' + ', '.join(f':chip{i}' for i in range(len(wanted))) + ')'
            params = {f'chip{i}': chip for i, chip in enumerate(wanted)}
        with self.snapshot() as tx:
            rows = tx.all(sql + ' ORDER BY w.chip_id', params)
        return {row['chip_id']: _wafer_frame(row) for row in rows}

    def wafer_frame(self, chip_id: str) -> ChipWaferFrame | None:
        """The chip's current wafer frame, or None when it was never measured."""
        return self.wafer_frames([chip_id]).get(chip_id)

    def wafer_frame_history(self, chip_id: str) -> list[ChipWaferFrame]:
        """Every measurement of the chip's frame, oldest first."""
        with self.snapshot() as tx:
            rows = tx.all('SELECT * FROM wafer_frames WHERE chip_id = ? ORDER BY id', (chip_id,))
        return [_wafer_frame(row) for row in rows]

    def chips(self) -> list[dict[str, Any]]:
        """Every chip: id, note, times, number of flakes."""
        with self.snapshot() as tx:
            rows = tx.all('SELECT id, note, created, updated, n_flakes AS flakes FROM chips ORDER BY id')
        return [dict(row) for row in rows]

    def record_frame(self, scan_id: str, tile_index: int, pixel_to_wafer: Sequence[float], width: int,
                     height: int, pixel_size: float = 0.0, stamp: float = 0.0, path: str = '') -> None:
        """Remember a tile's geometry so that exports can map wafer outlines back to its pixels."""
        if len(pixel_to_wafer) != 6:
            raise RegistryError(INVALID_ARGUMENT, 'pixel_to_wafer needs 6 numbers')
        with self.transaction() as tx:
            tx.execute('INSERT INTO frames (scan_id, tile_index, stamp, width, height, pixel_size, pixel_to_wafer, '
                       'path) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scan_id, tile_index) DO UPDATE SET '
                       'stamp = excluded.stamp, width = excluded.width, height = excluded.height, '
                       'pixel_size = excluded.pixel_size, pixel_to_wafer = excluded.pixel_to_wafer, '
                       'path = excluded.path',
                       (scan_id, int(tile_index), stamp, int(width), int(height), pixel_size,
                        json.dumps([float(v) for v in pixel_to_wafer]), path))

    def frames(self, scan_id: str) -> dict[int, dict[str, Any]]:
        with self.snapshot() as tx:
            rows = tx.all('SELECT * FROM frames WHERE scan_id = ?', (scan_id,))
        return {r['tile_index']: dict(r, pixel_to_wafer=json.loads(r['pixel_to_wafer'])) for r in rows}

    def scans(self, chip_id: str = '') -> list[dict[str, Any]]:
        sql = ('SELECT s.*, (SELECT COUNT(DISTINCT flake_pk) FROM observations o WHERE o.scan_id = s.id) '
               'AS flakes FROM scans s')
        with self.snapshot() as tx:
            rows = (tx.all(sql + ' WHERE s.chip_id = ? ORDER BY s.started', (chip_id,)) if chip_id
                    else tx.all(sql + ' ORDER BY s.started'))
        return [dict(row) for row in rows]

    # -- ingest -------------------------------------------------------------------

    def ingest(self, sightings: Iterable[Sighting]) -> list[IngestOutcome]:
        """Store one batch in one transaction, merging sightings of flakes already known (see ``ingest``)."""
        sightings = list(sightings)
        with self.transaction(self.ingest_synchronous) as tx:
            return ingest_module.ingest(tx, sightings, self.merge_rule, self.clock(), self.schema_version)

    # -- reading --------------------------------------------------------------------

    def query(self, query: FlakeQuery, contours: bool = True) -> QueryResult:
        """Flakes matching ``query`` (validated here), one page, and the total number of matches.

        ``contours=False`` leaves every record's outline empty (not read from the database).
        """
        now = self.clock()
        with self.snapshot(single_statement=True) as tx:
            return reading.query(tx, query, now, contours)

    def histograms(self, query: FlakeQuery, edges: dict[str, Sequence[float]]) -> dict[str, dict[str, list[int]]]:
        """Per material, counts of the flakes matching ``query`` in the bins of each column of
        ``edges`` (``reading.histograms``); ``query``'s page and sort are ignored."""
        now = self.clock()
        with self.snapshot(single_statement=True) as tx:
            return reading.histograms(tx, query, now, edges)

    def iter_flakes(self, chip_id: str = '', scan_id: str = '', page: int = 1000) -> Iterator[FlakeRecord]:
        """Every flake of a chip and/or scan in creation order, read in pages (exports)."""
        return reading.iter_flakes(self, chip_id, scan_id, page)

    def get_flake(self, flake_id: str) -> FlakeDetail:
        """The full record: outline, mask, every observation and image. Raises UNKNOWN_ID."""
        now = self.clock()
        with self.snapshot() as tx:
            return reading.get_flake(tx, flake_id, now)

    def count(self) -> int:
        with self.snapshot() as tx:
            return int(tx.scalar('SELECT COUNT(*) FROM flakes'))

    def revisit_list(self, *, chip_id: str = '', scan_id: str = '', materials: Sequence[str] = (),
                     layer_classes: Sequence[int] = (), min_score: float = 0.8, min_homogeneity: float = 0.0,
                     include_revisited: bool = False, limit: int = 50,
                     policy: RevisitPolicy | None = None) -> list[FlakeRecord]:
        """Flakes for a high-magnification revisit: available, good enough, wanted by ``policy`` (default:
        thin and thick flakes and unknown-colour candidates, thinnest first, then largest, then most
        isolated; see ``flake_registry.revisit``), at most ``limit``. ``materials`` and ``layer_classes``
        narrow what the policy wants."""
        chosen = (policy or RevisitPolicy()).restricted(materials, layer_classes)
        return revisit.revisit_list(self, chosen, chip_id=chip_id, scan_id=scan_id, min_score=min_score,
                                    min_homogeneity=min_homogeneity, include_revisited=include_revisited,
                                    limit=limit)

    # -- images, labels, defect reports ------------------------------------------------

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
        with self.transaction() as tx:
            pk = flake_row(tx, flake_id)['pk']
            tx.execute('INSERT INTO images (flake_pk, role, path, objective, pixel_size, stamp, created) '
                       'VALUES (?, ?, ?, ?, ?, ?, ?)',
                       (pk, role, str(path), objective, pixel_size, now if stamp is None else stamp, now))
            if role == 'revisit':
                tx.execute('UPDATE flakes SET revisited_at = ?, updated = ? WHERE pk = ?', (now, now, pk))

    def add_label(self, label: str, labelled_by: str, flake_id: str = '', crop_path: str = '') -> int:
        """A person's label for a flake or for a candidate crop that is not a flake (yet)."""
        if not label:
            raise RegistryError(INVALID_ARGUMENT, 'label is empty')
        if not flake_id and not crop_path:
            raise RegistryError(INVALID_ARGUMENT, 'a label needs a flake_id or a crop_path')
        with self.transaction() as tx:
            pk = flake_row(tx, flake_id)['pk'] if flake_id else None
            return tx.insert('INSERT INTO labels (flake_pk, crop_path, label, labelled_by, created) '
                             'VALUES (?, ?, ?, ?, ?)', (pk, crop_path or None, label, labelled_by, self.clock()))

    def labels(self, flake_id: str = '') -> list[dict[str, Any]]:
        sql = ('SELECT l.id, f.id AS flake_id, l.crop_path, l.label, l.labelled_by, l.created FROM labels l '
               'LEFT JOIN flakes f ON f.pk = l.flake_pk')
        with self.snapshot() as tx:
            rows = (tx.all(sql + ' WHERE f.id = ? ORDER BY l.id', (flake_id,)) if flake_id
                    else tx.all(sql + ' ORDER BY l.id'))
        return [dict(row) for row in rows]

    def add_defect_report(self, report: dict[str, Any], flake_id: str = '') -> int:
        """Store a STEM defect analysis (the fields of flake_msgs/DefectReport), optionally for a flake.

        ``material``, ``detector``, ``detector_source`` and ``warnings`` say what the analysis
        assumed and doubted; a report without them is stored as not recorded ('', no warnings).
        """
        with self.transaction() as tx:
            pk = flake_row(tx, flake_id)['pk'] if flake_id else None
            return tx.insert(
                'INSERT INTO defect_reports (flake_pk, image_id, stamp, pixel_size, analysed_area, cells_total, '
                'class_names, counts, concentration, concentration_low, concentration_high, model_version, '
                'created, material, detector, detector_source, warnings) '
                'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                (pk, report.get('image_id', ''), report.get('stamp', 0.0), report.get('pixel_size', 0.0),
                 report.get('analysed_area', 0.0), int(report.get('cells_total', 0)),
                 json.dumps(list(report.get('class_names', []))), json.dumps(list(report.get('counts', []))),
                 json.dumps(list(report.get('concentration', []))),
                 json.dumps(list(report.get('concentration_low', []))),
                 json.dumps(list(report.get('concentration_high', []))), report.get('model_version', ''),
                 self.clock(), str(report.get('material') or ''), str(report.get('detector') or ''),
                 str(report.get('detector_source') or ''),
                 json.dumps([str(w) for w in report.get('warnings') or []])))

    def defect_reports(self, flake_id: str = '') -> list[dict[str, Any]]:
        """Stored defect analyses, oldest first: the DefectReport fields kept, ``flake_id``, ``created``."""
        sql = 'SELECT d.*, f.id AS flake_id FROM defect_reports d LEFT JOIN flakes f ON f.pk = d.flake_pk'
        with self.snapshot() as tx:
            rows = (tx.all(sql + ' WHERE f.id = ? ORDER BY d.id', (flake_id,)) if flake_id
                    else tx.all(sql + ' ORDER BY d.id'))
        decoded = ('class_names', 'counts', 'concentration', 'concentration_low', 'concentration_high', 'warnings')
        # A list column left NULL (a row written by hand) reads as an empty list.
        return [{k: ((json.loads(v) if v else []) if k in decoded else v) for k, v in dict(r).items()
                 if k != 'flake_pk'} for r in rows]

    # -- reservations ---------------------------------------------------------------------

    def reserve(self, flake_id: str, robot_id: str, lease_s: float = 0.0) -> Reservation:
        """Claim a flake for ``robot_id`` for ``lease_s`` seconds (0: the default lease).

        Atomic across threads and processes: of any number of concurrent callers at
        most one gets a token until the lease expires or is released.
        """
        return self.reserve_many([flake_id], robot_id, lease_s)[0]

    def reserve_many(self, flake_ids: Sequence[str], robot_id: str, lease_s: float = 0.0) -> list[Reservation]:
        """Claim several flakes at once, all or none (a stack needs every one of its layers)."""
        flake_ids = reservations.check_request(flake_ids, robot_id)
        lease_s = self.lease_seconds(lease_s)
        now = self.clock()
        with self.transaction() as tx:
            return reservations.reserve_in(tx, flake_ids, robot_id, lease_s, now)

    def release(self, flake_id: str, token: str, ended_by: str = '') -> Reservation:
        """Give a reservation back before its lease ends.

        ``ended_by``: who did it when not the holder (a person: ``flake_registry.control``); kept in the history.
        """
        now = self.clock()
        with self.transaction() as tx:
            return reservations.release_in(tx, flake_id, token, now, ended_by)

    def mark_used(self, flake_id: str, token: str, note: str = '', ended_by: str = '') -> Reservation:
        """The robot put the flake into a stack: it leaves the pool for good. Needs the live token."""
        now = self.clock()
        with self.transaction() as tx:
            return reservations.mark_used_in(tx, flake_id, token, note, now, ended_by)

    def reservations(self, flake_id: str = '', live_only: bool = True) -> list[dict[str, Any]]:
        """Reservation rows (who, token, lease, outcome, ``ended_by``), live ones only by default."""
        now = self.clock()
        with self.snapshot() as tx:
            return reservations.list_reservations(tx, now, flake_id, live_only)


def _wafer_frame(row: Row) -> ChipWaferFrame:
    return ChipWaferFrame(chip_id=row['chip_id'], corners=[tuple(c) for c in json.loads(row['corners'])],
                          stage_to_wafer=json.loads(row['stage_to_wafer']), rotation=row['rotation'],
                          residual=row['residual'], measured_by=row['measured_by'] or '',
                          measured_at=row['measured_at'])

"""Connections and transactions of the registry: the one place that talks to the database driver.

``Transaction`` is the public way to run SQL against the registry (the store's
modules and add-ons such as stack recipes use it): statements take named
(``:name``) or positional (``?``) parameters, rows are read by column name.

SQLite (``SQLiteDatabase``): one connection per thread, WAL journal.
- A write transaction is ``BEGIN IMMEDIATE``: the write lock is taken up front, so
  writers in different threads or processes queue (``busy_timeout``) instead of
  failing half-way, and a process killed at any moment leaves the whole
  transaction or nothing.
- Durability is chosen per transaction (``synchronous``): claims commit with
  FULL (fsynced: a power cut cannot take back a reservation a robot was told it
  holds), detection batches with NORMAL (a committed batch survives any crash of
  the process; only an OS crash or a power cut can lose the last ones, which a
  rescan or a bag replay restores). A FULL commit makes every earlier NORMAL
  commit durable too (it syncs the whole WAL).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import os
from pathlib import Path
import sqlite3
import sys
import threading
from typing import Any

import sqlite_utils

SYNCHRONOUS_MODES = ('FULL', 'NORMAL', 'EXTRA')
Params = Mapping[str, Any] | Sequence[Any]


class Transaction:
    """One open transaction: run statements, read rows by column name.

    Obtained from ``FlakeStore.transaction()`` (writes) or ``FlakeStore.snapshot()``
    (reads that see one consistent state). Leaving the ``with`` block commits; an
    exception rolls everything back.
    """

    dialect = 'sqlite'
    integrity_error: type[Exception] = sqlite3.IntegrityError  # a constraint refused the statement

    def __init__(self, conn: sqlite3.Connection, writable: bool):
        self.conn = conn
        self.writable = writable

    def execute(self, sql: str, params: Params = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        self.conn.executemany(sql, rows)

    def one(self, sql: str, params: Params = ()) -> Mapping[str, Any] | None:
        """The first row (read by column name), or None."""
        return self.conn.execute(sql, params).fetchone()

    def all(self, sql: str, params: Params = ()) -> list[Mapping[str, Any]]:
        return self.conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: Params = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def insert(self, sql: str, params: Params = ()) -> int:
        """Run an INSERT into a table with an integer key; return the new row's key."""
        return int(self.conn.execute(sql, params).lastrowid)

    def tuples(self, sql: str, params: Params = ()) -> tuple[list[str], list[tuple]]:
        """Column names and plain tuple rows: the fast path for long pages.

        A ``sqlite3.Row`` finds each column by comparing names one after the other:
        turning 100 rows of 32 columns into dicts that way cost as much as the SQL.
        Names are interned so that ``Record(**dict(zip(names, row)))`` matches its
        keywords by identity (the driver's fresh strings made that half the cost).
        """
        cursor = self.conn.cursor()
        cursor.row_factory = None
        cursor.execute(sql, params)
        names = [sys.intern(column[0]) for column in cursor.description]
        return names, cursor.fetchall()


class SQLiteDatabase:
    """A registry file, shared by threads (one connection each) and processes."""

    dialect = 'sqlite'

    def __init__(self, path: str | os.PathLike, *, synchronous: str = 'FULL', busy_timeout_s: float = 10.0):
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f'synchronous modes are {SYNCHRONOUS_MODES}, got {synchronous!r}')
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.url = str(self.path)
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

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
    def transaction(self, synchronous: str | None = None) -> Iterator[Transaction]:
        """A write transaction holding the database write lock from its first statement."""
        conn = self.db.conn
        mode = (synchronous or self.synchronous).upper()
        if self._local.synchronous != mode:
            if mode not in SYNCHRONOUS_MODES:
                raise ValueError(f'synchronous modes are {SYNCHRONOUS_MODES}, got {mode!r}')
            conn.execute(f'PRAGMA synchronous={mode}')
            self._local.synchronous = mode
        conn.execute('BEGIN IMMEDIATE')
        try:
            yield Transaction(conn, writable=True)
        except BaseException:
            if conn.in_transaction:
                conn.execute('ROLLBACK')
            raise
        else:
            conn.execute('COMMIT')

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Transaction]:
        """A read transaction: several SELECTs see one state of the file."""
        conn = self.db.conn
        conn.execute('BEGIN')
        try:
            yield Transaction(conn, writable=False)
        finally:
            if conn.in_transaction:
                conn.execute('COMMIT')

    def table_names(self) -> list[str]:
        return self.db.table_names()

    def integrity_check(self) -> str:
        """'ok' or SQLite's list of problems."""
        rows = self.db.conn.execute('PRAGMA integrity_check').fetchall()
        return '\n'.join(str(r[0]) for r in rows)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

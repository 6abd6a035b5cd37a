"""Connections and transactions of the registry: the one place that talks to the database drivers.

``Transaction`` is the public way to run SQL against the registry (the store's
modules and add-ons such as stack recipes use it): statements take named
(``:name``) or positional (``?``) parameters, rows are read by column name. The
same statements run on SQLite and on PostgreSQL; the few places where the two
differ ask the transaction (``dialect``, ``box_overlap``, ``for_update``).

``open_database(target)`` picks the backend: a path or ``sqlite:///path`` is an
embedded SQLite file, ``postgresql://user@host:port/database`` a PostgreSQL server.

SQLite (``SQLiteDatabase``): one connection per thread, WAL journal.
- A write transaction is ``BEGIN IMMEDIATE``: the write lock is taken up front, so
  writers in different threads or processes queue instead of failing half-way, and
  a process killed at any moment leaves the whole transaction or nothing.
- Writers queue on an advisory lock of a file beside the registry
  (``registry.sqlite-writer``, ``flock``) before they ask SQLite: SQLite's own busy
  wait sleeps 25-100 ms between tries once it has waited a while, so four scanners
  writing at once spent most of their time asleep with the file free. The kernel lets
  go of the lock of a process killed at any moment. ``busy_timeout_s`` bounds the wait.
- Durability is chosen per transaction (``synchronous``): claims commit with
  FULL (fsynced: a power cut cannot take back a reservation a robot was told it
  holds), detection batches with NORMAL (a committed batch survives any crash of
  the process; only an OS crash or a power cut can lose the last ones, which a
  rescan or a bag replay restores). A FULL commit makes every earlier NORMAL
  commit durable too (it syncs the whole WAL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import functools
import os
from pathlib import Path
import re
import sqlite3
import sys
import threading
import time
from typing import Any, TypeVar

import sqlite_utils

try:
    import fcntl
except ImportError:  # not a POSIX system: SQLite's own busy wait alone
    fcntl = None  # type: ignore[assignment]

SYNCHRONOUS_MODES = ('FULL', 'NORMAL', 'EXTRA')
Params = Mapping[str, Any] | Sequence[Any]
Row = Mapping[str, Any]                         # a row read by column name
_Result = TypeVar('_Result')


# SQLite's R*Tree holds chip k as the interval [k, k + CHIP_SPAN] of its third dimension: an
# interval of no length gives every box a volume of 0, and the R*Tree, which places boxes by
# the volume they add, then built a tree that searched three times slower (ingest).
CHIP_SPAN = 0.5


def box_overlap_sql(dialect: str, alias: str, min_x: str, min_y: str, max_x: str, max_y: str,
                    chip_key: str | None = None) -> str:
    """SQL: the box of ``flake_boxes`` row ``alias`` overlaps the box of four SQL terms (on chip ``chip_key``).

    The terms are what the spatial index searches (schema migrations 1 and 9): SQLite's
    R*Tree columns, with the chip as its third dimension; PostgreSQL's GiST expressions,
    the chip as a one-integer range. A flake's chip is in its box since schema 9.
    """
    prefix = f'{alias}.' if alias else ''
    if dialect == 'postgresql':
        sql = (f'box(point({prefix}min_x, {prefix}min_y), point({prefix}max_x, {prefix}max_y)) '
               f'&& box(point({min_x}, {min_y}), point({max_x}, {max_y}))')
        if chip_key is not None:
            sql = f"int4range({prefix}chip_key, {prefix}chip_key, '[]') @> ({chip_key})::integer AND {sql}"
        return sql
    sql = (f'{prefix}max_x >= {min_x} AND {prefix}min_x <= {max_x} AND {prefix}max_y >= {min_y} '
           f'AND {prefix}min_y <= {max_y}')
    if chip_key is not None:
        sql += f' AND {prefix}min_chip <= {chip_key} AND {prefix}max_chip >= {chip_key}'
    return sql


class Transaction:
    """One open transaction: run statements, read rows by column name.

    Obtained from ``FlakeStore.transaction()`` (writes) or ``FlakeStore.snapshot()``
    (reads that see one consistent state). Leaving the ``with`` block commits; an
    exception rolls everything back.
    """

    dialect = 'sqlite'
    integrity_error: type[Exception] = sqlite3.IntegrityError  # a constraint refused the statement
    for_update = ''                             # SQLite locks the whole file for a write transaction

    def __init__(self, conn: Any, writable: bool):
        self.conn = conn
        self.writable = writable

    def box_overlap(self, alias: str, min_x: str, min_y: str, max_x: str, max_y: str,
                    chip_key: str | None = None) -> str:
        """SQL: the bounding box in ``flake_boxes`` row ``alias`` overlaps the box of four SQL terms
        (and lies on the chip whose key is the SQL term ``chip_key``); see ``box_overlap_sql``."""
        return box_overlap_sql(self.dialect, alias, min_x, min_y, max_x, max_y, chip_key)

    def execute(self, sql: str, params: Params = ()) -> Any:
        """Run one statement; the driver's cursor."""
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        self.conn.executemany(sql, rows)

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert plain rows (values in the order of ``columns``): the fast way for a batch of new rows."""
        if rows:
            self.conn.executemany(f'INSERT INTO {table} ({", ".join(columns)}) '
                                  f'VALUES ({", ".join("?" * len(columns))})', rows)

    def one(self, sql: str, params: Params = ()) -> Row | None:
        """The first row (read by column name), or None."""
        row: Row | None = self.conn.execute(sql, params).fetchone()
        return row

    def first(self, sql: str, params: Params = ()) -> Row:
        """The first row of a statement that always gives one (``COUNT``, ``RETURNING``, a checked key)."""
        row = self.one(sql, params)
        if row is None:
            raise LookupError(f'no row from {sql[:80]!r}')
        return row

    def all(self, sql: str, params: Params = ()) -> list[Row]:
        rows: list[Row] = self.conn.execute(sql, params).fetchall()
        return rows

    def scalar(self, sql: str, params: Params = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def insert(self, sql: str, params: Params = ()) -> int:
        """Run an INSERT into a table with an integer key; return the new row's key."""
        return int(self.conn.execute(sql, params).lastrowid)

    def tuples(self, sql: str, params: Params = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
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
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        return names, rows


class SQLiteDatabase:
    """A registry file, shared by threads (one connection each) and processes."""

    dialect = 'sqlite'

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = 'FULL', busy_timeout_s: float = 10.0):
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
        self._writer_files: list[int] = []
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
        with self._writer_turn():
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
    def _writer_turn(self) -> Iterator[None]:
        """This thread's turn among the writers of every process (see the module text)."""
        if fcntl is None:
            yield
            return
        handle = getattr(self._local, 'writer_file', None)
        if handle is None:
            # Each thread opens the file itself: flock locks belong to an open file, so
            # threads of one process queue against each other as processes do.
            handle = os.open(f'{self.path}-writer', os.O_RDWR | os.O_CREAT, 0o644)
            self._local.writer_file = handle
            with self._lock:
                self._writer_files.append(handle)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Polled, not blocked on: a blocking flock has no timeout. A turn lasts a few
            # milliseconds (a batch of 100 flakes): tries a quarter of a millisecond apart at
            # first, at most two milliseconds apart later.
            deadline = time.monotonic() + self.busy_timeout_s
            pause = 0.00025
            while True:
                time.sleep(pause)
                pause = min(2 * pause, 0.002)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise sqlite3.OperationalError(
                            f'database is locked: another writer held {self.path} for more than '
                            f'{self.busy_timeout_s:g} s') from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def snapshot(self, single_statement: bool = False) -> Iterator[Transaction]:
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

    @staticmethod
    def is_transient(error: Exception) -> bool:
        """Whether trying the transaction again may succeed (SQLite's busy waits happen inside the driver)."""
        return False

    def integrity_check(self) -> str:
        """'ok' or SQLite's list of problems."""
        rows = self.db.conn.execute('PRAGMA integrity_check').fetchall()
        return '\n'.join(str(r[0]) for r in rows)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            writer_files, self._writer_files = self._writer_files, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        for handle in writer_files:
            with contextlib.suppress(OSError):
                os.close(handle)
        self._local = threading.local()


_NAMED = re.compile(r'(?<![:\w]):([A-Za-z_]\w*)')


@functools.lru_cache(maxsize=2048)
def _pyformat(sql: str, named: bool, binary: frozenset[str] = frozenset()) -> str:
    """``?`` / ``:name`` placeholders in psycopg's ``%s`` / ``%(name)s`` form; ``binary`` names as ``%(name)b``."""
    sql = sql.replace('%', '%%')
    if named:
        return _NAMED.sub(lambda match: f'%({match[1]})' + ('b' if match[1] in binary else 's'), sql)
    return sql.replace('?', '%s')


def _placeholders(sql: str, params: Params) -> tuple[str, Params | None]:
    """The statement in psycopg's form and its parameters (None: no placeholders to fill).

    Lists (the arrays ingest sends, a value per sighting) go in binary: psycopg writes an
    array's text form element by element in Python, five times the CPU of the binary form.
    """
    if isinstance(params, Mapping):
        binary = frozenset(name for name, value in params.items() if isinstance(value, list))
        return _pyformat(sql, True, binary), params
    return _pyformat(sql, False), params or None


class PostgresTransaction(Transaction):
    """A transaction on one pooled PostgreSQL connection (psycopg 3)."""

    dialect = 'postgresql'
    for_update = ' FOR UPDATE'                  # row locks: concurrent claims of one flake queue here

    def __init__(self, conn: Any, writable: bool, reconnect: Callable[[], Any] | None = None):
        super().__init__(conn, writable)
        import psycopg

        self.integrity_error = psycopg.IntegrityError
        self._reconnect = reconnect              # for a statement outside a transaction: its first may retry

    def _run(self, work: Callable[[Any], _Result]) -> _Result:
        """``work(conn)``; when the pooled connection had ended, once more on a fresh one."""
        if self._reconnect is None:
            return work(self.conn)
        import psycopg

        reconnect, self._reconnect = self._reconnect, None
        try:
            return work(self.conn)
        except psycopg.OperationalError:
            self.conn = reconnect()
            return work(self.conn)

    def execute(self, sql: str, params: Params = ()) -> Any:
        query, values = _placeholders(sql, params)
        return self._run(lambda conn: conn.execute(query, values))

    def executemany(self, sql: str, rows: Sequence[Params]) -> None:
        if not rows:
            return
        with self.conn.cursor() as cursor:
            cursor.executemany(_pyformat(sql, isinstance(rows[0], Mapping)), rows)

    def insert_many(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        # COPY: one command for the batch. An INSERT per row (executemany, even pipelined)
        # cost the server an executor start per row and the client a bind per row.
        if not rows:
            return
        with self.conn.cursor() as cursor, cursor.copy(f'COPY {table} ({", ".join(columns)}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)

    def one(self, sql: str, params: Params = ()) -> Row | None:
        row: Row | None = self.execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: Params = ()) -> list[Row]:
        rows: list[Row] = self.execute(sql, params).fetchall()
        return rows

    def scalar(self, sql: str, params: Params = ()) -> Any:
        row = self.execute(sql, params).fetchone()
        return None if row is None else next(iter(row.values()))

    def insert(self, sql: str, params: Params = ()) -> int:
        return int(self.scalar(sql + ' RETURNING id', params))

    def tuples(self, sql: str, params: Params = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        from psycopg.rows import tuple_row

        query, values = _placeholders(sql, params)

        def work(conn: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
            with conn.cursor(row_factory=tuple_row) as cursor:
                cursor.execute(query, values)
                rows: list[tuple[Any, ...]] = cursor.fetchall()
                return [sys.intern(column.name) for column in cursor.description], rows
        return self._run(work)


class PostgresDatabase:
    """A registry on a PostgreSQL server, through a pool of connections (SQLAlchemy's QueuePool).

    Statements run on the pooled psycopg connection itself: SQLAlchemy's own
    statement execution cost 25 us per statement against 2-9 us on the driver
    (measured on SQLite inserts), and ingest runs several per sighting.
    Durability: claims commit with ``synchronous_commit = on`` (on disk before the
    answer); detection batches with ``off`` when ``ingest_synchronous`` is NORMAL:
    a committed batch survives any crash of the registry or of its connections, only
    a crash of the server machine can lose the last fraction of a second.
    """

    dialect = 'postgresql'
    path = None

    def __init__(self, url: str, *, synchronous: str = 'FULL', pool_size: int = 8, max_overflow: int = 32,
                 connect_timeout_s: float = 10.0):
        from sqlalchemy import create_engine, event
        from sqlalchemy.engine import make_url

        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f'synchronous modes are {SYNCHRONOUS_MODES}, got {synchronous!r}')
        sa_url = make_url(url)
        if sa_url.drivername in ('postgresql', 'postgres'):
            sa_url = sa_url.set(drivername='postgresql+psycopg')
        self.url = sa_url.render_as_string(hide_password=True)
        self.synchronous = synchronous
        # No pre-ping (a round trip before every transaction): a pooled connection whose
        # server process has ended fails its first statement, which is then tried again
        # on a fresh connection (_checkout, PostgresTransaction._run).
        self.engine = create_engine(sa_url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=False,
                                    pool_timeout=60, connect_args={'connect_timeout': int(connect_timeout_s),
                                                                   'application_name': 'flake_registry'})

        @event.listens_for(self.engine, 'connect')
        def _autocommit(dbapi_connection: Any, _record: Any) -> None:
            from psycopg.rows import dict_row

            # Transactions are begun explicitly (BEGIN ... COMMIT), as on SQLite.
            dbapi_connection.autocommit = True
            dbapi_connection.row_factory = dict_row

    @contextlib.contextmanager
    def _connection(self, first: str | None) -> Iterator[list[Any]]:
        """[pool entry] whose connection has run ``first`` (BEGIN ...); the list lets a reader swap it."""
        import psycopg

        held = [self._checkout(first)]
        try:
            yield held
        except BaseException as error:
            conn = held[0].driver_connection
            if conn.closed or isinstance(error, psycopg.OperationalError):
                held[0].invalidate()            # never hand a broken connection to the next caller
            else:
                with contextlib.suppress(psycopg.Error):
                    conn.execute('ROLLBACK')
            raise
        finally:
            held[0].close()                     # back to the pool

    def _checkout(self, first: str | None) -> Any:
        """A pool entry whose connection answered ``first``; ended connections are replaced (3 tries)."""
        import psycopg

        for attempt in range(3):
            pooled: Any = self.engine.raw_connection()
            if first is None:
                return pooled
            try:
                pooled.driver_connection.execute(first)
                return pooled
            except psycopg.OperationalError:
                pooled.invalidate()
                pooled.close()
                if attempt == 2:
                    raise
        raise AssertionError('unreachable')

    @contextlib.contextmanager
    def transaction(self, synchronous: str | None = None) -> Iterator[Transaction]:
        mode = (synchronous or self.synchronous).upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f'synchronous modes are {SYNCHRONOUS_MODES}, got {mode!r}')
        with self._connection('BEGIN') as held:
            conn = held[0].driver_connection
            if mode == 'NORMAL':
                conn.execute('SET LOCAL synchronous_commit = off')
            yield PostgresTransaction(conn, writable=True)
            conn.execute('COMMIT')

    @contextlib.contextmanager
    def snapshot(self, single_statement: bool = False) -> Iterator[Transaction]:
        """Reads that see one state. ``single_statement``: one statement, which sees one state by itself,
        runs without a transaction of its own (one round trip instead of three)."""
        if single_statement:
            with self._connection(None) as held:
                def reconnect() -> Any:
                    held[0].invalidate()
                    held[0].close()
                    held[0] = self.engine.raw_connection()
                    return held[0].driver_connection
                yield PostgresTransaction(held[0].driver_connection, writable=False, reconnect=reconnect)
            return
        with self._connection('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY') as held:
            yield PostgresTransaction(held[0].driver_connection, writable=False)
            held[0].driver_connection.execute('COMMIT')

    @staticmethod
    def is_transient(error: Exception) -> bool:
        """A lost connection, a deadlock or a serialisation failure: trying again may succeed."""
        import psycopg

        return isinstance(error, (psycopg.OperationalError, psycopg.errors.SerializationFailure,
                                  psycopg.errors.DeadlockDetected))

    def table_names(self) -> list[str]:
        with self.snapshot() as tx:
            return [r['tablename'] for r in tx.all('SELECT tablename FROM pg_tables '
                                                   'WHERE schemaname = current_schema() ORDER BY tablename')]

    def integrity_check(self) -> str:
        """'ok' when every flake has its box and every observation its flake (the server checks pages itself)."""
        with self.snapshot() as tx:
            orphans = tx.scalar('SELECT (SELECT COUNT(*) FROM flakes f WHERE NOT EXISTS '
                                '(SELECT 1 FROM flake_boxes b WHERE b.id = f.pk)) + (SELECT COUNT(*) FROM '
                                'flake_boxes b WHERE NOT EXISTS (SELECT 1 FROM flakes f WHERE f.pk = b.id))')
        return 'ok' if orphans == 0 else f'{orphans} flakes without a box or boxes without a flake'

    def close(self) -> None:
        self.engine.dispose()


def is_postgres_url(target: str | os.PathLike[str]) -> bool:
    return isinstance(target, str) and target.split(':', 1)[0].split('+', 1)[0] in ('postgresql', 'postgres')


def open_database(target: str | os.PathLike[str], *, synchronous: str = 'FULL',
                  busy_timeout_s: float = 10.0) -> Database:
    """The registry database at ``target``: a file path, ``sqlite:///path`` or ``postgresql://...``."""
    if is_postgres_url(target):
        return PostgresDatabase(str(target), synchronous=synchronous)
    if isinstance(target, str) and target.startswith('sqlite:///'):
        target = target[len('sqlite:///'):]
    return SQLiteDatabase(target, synchronous=synchronous, busy_timeout_s=busy_timeout_s)


Database = SQLiteDatabase | PostgresDatabase    # what open_database returns

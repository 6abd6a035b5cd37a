"""A throwaway PostgreSQL server for tests, benches and trying the registry out.

``TemporaryPostgres`` runs Debian's ``initdb`` and ``postgres`` (package
``postgresql``, installed by tools/install_postgresql.sh) in a fresh data directory,
listening on 127.0.0.1 at a free port, and removes everything when it stops. The
server refuses to run as root, so when the caller is root it runs as an unprivileged
user (``nobody`` by default) through ``runuser``.

    python -m flake_registry.pg_server            # prints the database_url, stops on Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
from pathlib import Path
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

SERVER_USER = 'nobody'


class PostgresNotInstalledError(RuntimeError):
    """No PostgreSQL server programs on this machine (run tools/install_postgresql.sh)."""


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin that holds initdb and postgres."""
    candidates = sorted(glob.glob('/usr/lib/postgresql/*/bin'), key=lambda p: int(Path(p).parent.name or 0))
    for folder in reversed(candidates):
        if Path(folder, 'initdb').is_file() and Path(folder, 'postgres').is_file():
            return Path(folder)
    found = shutil.which('initdb')
    if found and shutil.which('postgres'):
        return Path(found).resolve().parent
    raise PostgresNotInstalledError('PostgreSQL is not installed: run `bash tools/install_postgresql.sh` '
                              "(Debian's postgresql package)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class TemporaryPostgres:
    """initdb + postgres in a temporary directory; ``url(database)`` for clients.

    ``settings`` are extra ``postgres -c name=value`` options. The superuser is
    ``flake`` with trust authentication on 127.0.0.1 only.
    """

    def __init__(self, settings: dict[str, str] | None = None, user: str = SERVER_USER, parent: str | None = None):
        self.bin = find_bin_dir()
        self.settings = {'max_connections': '200', 'shared_buffers': '256MB', 'fsync': 'on',
                         'listen_addresses': '127.0.0.1', **(settings or {})}
        self.run_as = user if os.geteuid() == 0 else None
        self.parent = parent                    # where the temporary folder is made (default: the temp dir)
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None
        self.port = 0

    def _command(self, *args: str) -> list[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        return ['runuser', '-u', self.run_as, '--', *command] if self.run_as else command

    def start(self, timeout: float = 60.0) -> TemporaryPostgres:
        self.folder = Path(tempfile.mkdtemp(prefix='flake-postgres-', dir=self.parent))
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        data = self.folder / 'data'
        subprocess.run(self._command('initdb', '-D', str(data), '-U', 'flake', '--auth=trust', '-E', 'UTF8',
                                     '--locale=C', '--no-sync'),
                       check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.folder)
        self.port = _free_port()
        options = [f'-c{name}={value}' for name, value in self.settings.items()]
        self.process = subprocess.Popen(
            self._command('postgres', '-D', str(data), '-p', str(self.port), '-k', str(self.folder), *options),
            stdout=subprocess.DEVNULL, stderr=open(self.folder / 'server.log', 'wb'), cwd=self.folder,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'postgres stopped at start: {self.log_tail()}')
            if subprocess.run([str(self.bin / 'pg_isready'), '-h', '127.0.0.1', '-p', str(self.port), '-U', 'flake',
                               '-d', 'postgres', '-q'],
                              check=False).returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f'postgres did not accept connections within {timeout} s')

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.folder / 'server.log').read_text(errors='replace')[-chars:]
        except OSError:
            return ''

    def url(self, database: str = 'postgres') -> str:
        return f'postgresql://flake@127.0.0.1:{self.port}/{database}'

    def create_database(self, name: str, template: str = '') -> str:
        """A new database (empty, or a copy of ``template``); returns its URL."""
        import psycopg

        copy = f' TEMPLATE "{template}"' if template else ''
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGQUIT: immediate shutdown, no checkpoint: the data directory is removed next.
            os.killpg(self.process.pid, signal.SIGQUIT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def memory_folder(min_free: int = 2 << 30) -> str | None:
    """/dev/shm when it has ``min_free`` bytes free: throwaway test data never waits for a busy disk."""
    try:
        stats = os.statvfs('/dev/shm')
    except OSError:
        return None
    return '/dev/shm' if stats.f_bavail * stats.f_frsize >= min_free and os.access('/dev/shm', os.W_OK) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Run a temporary PostgreSQL server for the flake registry '
                                                 '(everything is removed when it stops).')
    parser.add_argument('--database', default='registry', help='database to create (default: registry)')
    args = parser.parse_args(argv)
    try:
        server = TemporaryPostgres().start()
    except PostgresNotInstalledError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    try:
        url = server.create_database(args.database)
        print(f'PostgreSQL running; registry_node --ros-args -p database_url:={url}', flush=True)
        print('Ctrl-C stops the server and removes its data.', flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server.process.poll() is None:
                time.sleep(1)
    finally:
        server.stop()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

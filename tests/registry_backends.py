"""The registry's two backends for tests: an SQLite file and a database on a real PostgreSQL server.

Import the fixtures into a test module; ``registry_url`` runs each test that uses it
once per backend. The PostgreSQL server (Debian's package, see
tools/install_postgresql.sh) is started once per test session in a temporary data
directory as an unprivileged user; every test gets a database of its own.
"""

import itertools

import pytest

from flake_registry.pg_server import PostgresNotInstalledError, TemporaryPostgres, memory_folder
from flake_registry.store import FlakeStore

BACKENDS = ('sqlite', 'postgresql')
_names = itertools.count()


@pytest.fixture(scope='session')
def postgres_server():
    try:
        # Throwaway data, in memory where there is room and without fsync, so that CREATE DATABASE,
        # commits and the final clean-up never wait for the disk of a busy machine (a crash of the
        # server machine is not what these tests check).
        server = TemporaryPostgres(settings={'fsync': 'off', 'full_page_writes': 'off'},
                                   parent=memory_folder()).start()
    except PostgresNotInstalledError as error:
        pytest.skip(f'PostgreSQL backend not tested: {error}')
    # Every test's database is a copy of one migrated template: CREATE DATABASE ...
    # TEMPLATE copies files, where running the migrations again took seconds a test.
    FlakeStore(server.create_database('registry_template')).close()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def registry_url(request, tmp_path):
    """Where a fresh registry lives: a file path (SQLite) or a postgresql:// URL of a new database."""
    if request.param == 'sqlite':
        return str(tmp_path / 'registry.sqlite')
    return request.getfixturevalue('postgres_server').create_database(f'registry_{next(_names)}',
                                                                       template='registry_template')

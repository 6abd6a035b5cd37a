"""kill -9 during ingest: every acknowledged batch survives, no half batch, the registry stays sound.

On both backends. On PostgreSQL the server also ends the writers' connections in the
middle of their work (pg_terminate_backend), as a server restart or a network cut would.
"""

import os
import selectors
import signal
import subprocess
import sys
import time

import psycopg
from registry_backends import postgres_server, registry_url  # noqa: F401 - fixtures
from ros_helpers import HELPERS

from flake_registry.store import FlakeStore

BATCH = 50  # sightings per transaction in tests/helpers/registry_worker.py


class Writer:
    """An ingest worker process and the flake ids it was told are committed."""

    def __init__(self, url, seed):
        self.process = subprocess.Popen([sys.executable, str(HELPERS / 'registry_worker.py'), 'ingest', url,
                                         str(seed)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.committed: list[str] = []
        self.retries = 0
        self.batches = 0
        self.ready = False
        self.other: list[str] = []  # anything else it printed (a traceback), for the failure message

    def read_line(self) -> None:
        line = self.process.stdout.readline()
        assert line, f'writer ended early: {"".join(self.other) + self.process.stdout.read()}'
        if line.startswith('READY'):
            self.ready = True
        elif line.startswith('COMMITTED'):
            self.committed.extend(line.split()[1:])
            self.batches += 1
        elif line.startswith('RETRY'):
            self.retries += 1
        else:
            self.other.append(line)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process.stdout.close()
        assert self.process.returncode == -signal.SIGKILL


def run_writers(url, seeds, batches, end_connections_at=()):
    """Two writers at once until each acknowledged ``batches`` batches, then kill -9 both mid-transaction.

    ``end_connections_at``: after how many acknowledged batches (of all writers) the
    server ends every registry connection (PostgreSQL only).
    """
    writers = [Writer(url, seed) for seed in seeds]
    selector = selectors.DefaultSelector()
    for writer in writers:
        selector.register(writer.process.stdout, selectors.EVENT_READ, writer)
    pending = sorted(end_connections_at)
    try:
        deadline = time.monotonic() + 300
        while any(w.batches < batches for w in writers):
            assert time.monotonic() < deadline, 'writers too slow'
            for key, _ in selector.select(timeout=5):
                key.data.read_line()
            # Connections are ended only once every writer has its store open: a writer still
            # opening it (slow under load) would die in its constructor, which is not the case tested.
            if pending and all(w.ready for w in writers) and sum(w.batches for w in writers) >= pending[0]:
                pending.pop(0)
                with psycopg.connect(url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = 'flake_registry' AND pid <> pg_backend_pid()")
        # Both writers are already building and writing their next batch: kill them mid-transaction.
    finally:
        for writer in writers:
            writer.kill()
    return writers


def test_killed_writers_lose_no_acknowledged_flake(registry_url):  # noqa: F811 - the fixture imported above
    postgres = registry_url.startswith('postgresql')
    acknowledged, retries = [], 0
    for round_index, batches in enumerate((4, 6)):
        writers = run_writers(registry_url, seeds=(10 * round_index, 10 * round_index + 1), batches=batches,
                              end_connections_at=(3, 7) if postgres else ())
        for writer in writers:
            acknowledged += writer.committed
            retries += writer.retries
        with FlakeStore(registry_url) as store, store.snapshot() as tx:
            assert store.integrity_check() == 'ok'
            present = {row['id'] for row in tx.all('SELECT id FROM flakes')}
            lost = set(acknowledged) - present
            assert not lost, f'{len(lost)} acknowledged flakes lost after kill {round_index + 1}'
            # Batches are all or nothing: a killed one is either wholly there or not at all.
            assert len(present) % BATCH == 0
            boxes = tx.scalar('SELECT COUNT(*) FROM flake_boxes')
            observations = tx.scalar('SELECT COUNT(*) FROM observations')
            assert boxes == len(present)
            # A batch whose commit reached the server but whose answer did not is stored
            # again by the retry and merges into the same flakes as observations.
            assert observations >= len(present) and observations % BATCH == 0
    assert len(set(acknowledged)) == len(acknowledged) >= (4 + 6) * 2 * BATCH
    if postgres:
        assert retries >= 1, 'ending the connections should have failed some transactions'
    print(f'\n{"postgresql" if postgres else "sqlite"}: {len(acknowledged)} acknowledged flakes, 0 lost, '
          f'{len(present)} present, {retries} batches retried after the server ended a connection')


"""kill -9 during ingest: every committed batch survives, no half batch, the file stays sound."""

import os
import signal
import subprocess
import sys

from ros_helpers import HELPERS

from flake_registry.store import FlakeStore

BATCH = 50  # detections per transaction in tests/helpers/registry_worker.py


def ingest_until_killed(path, seed, batches):
    """Run the ingest worker, SIGKILL it right after its `batches`-th commit; return the ids it committed."""
    worker = subprocess.Popen([sys.executable, str(HELPERS / 'registry_worker.py'), 'ingest', str(path), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    committed = []
    try:
        while len(committed) < batches * BATCH:
            line = worker.stdout.readline()
            assert line, f'worker ended early: {worker.stdout.read()}'
            if line.startswith('COMMITTED'):
                committed.extend(line.split()[1:])
        # The worker is already building and writing its next batch: kill it mid-transaction.
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(timeout=30)
        worker.stdout.close()
    assert worker.returncode == -signal.SIGKILL
    return committed


def test_killed_ingest_loses_nothing_committed_and_restarts(tmp_path):
    path = tmp_path / 'registry.sqlite'
    committed = []
    for round_index, batches in enumerate((4, 7, 3)):
        committed += ingest_until_killed(path, seed=round_index, batches=batches)
        with FlakeStore(path) as store:
            assert store.integrity_check() == 'ok'
            present = {row['id'] for row in store.db.query('SELECT id FROM flakes')}
            missing = set(committed) - present
            assert not missing, f'{len(missing)} committed flakes lost after kill {round_index + 1}'
            # Batches are all or nothing: the killed one is either wholly there or not at all.
            assert len(present) % BATCH == 0
            observations = store.db.conn.execute('SELECT COUNT(*) FROM observations').fetchone()[0]
            assert observations == len(present)
            boxes = store.db.conn.execute('SELECT COUNT(*) FROM flake_boxes').fetchone()[0]
            assert boxes == len(present)
    assert len(set(committed)) == len(committed) == (4 + 7 + 3) * BATCH

"""Retraining started from the Labelling page: one at a time, in a background thread, with its log."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
import threading
import time
from typing import Any

from flake_registry.query import RegistryError
from flake_registry.retrain import RetrainError, RetrainOptions, retrain
from flake_registry.store import FlakeStore

BUSY = 'BUSY'


@dataclass
class RetrainStatus:
    state: str = 'idle'                         # idle | running | done | failed
    target: str = ''
    started_by: str = ''
    started: float | None = None
    finished: float | None = None
    message: str = ''
    weights: str = ''
    labels_used: int = 0
    log: deque = field(default_factory=lambda: deque(maxlen=200))

    def as_dict(self) -> dict[str, Any]:
        return {'state': self.state, 'target': self.target, 'started_by': self.started_by, 'started': self.started,
                'finished': self.finished, 'message': self.message, 'weights': self.weights,
                'labels_used': self.labels_used, 'log': list(self.log)}


class RetrainRunner:
    """Runs ``flake_registry.retrain.retrain`` for the web app; ``options`` are the lab's training settings."""

    def __init__(self, store: FlakeStore, db_path: Path, data_dir: Path, options: RetrainOptions = RetrainOptions()):
        self.store, self.db_path, self.data_dir = store, db_path, data_dir
        self.options = replace(options, threads=min(options.threads, 1))  # leave the server's cores to the pages
        self.status = RetrainStatus()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._done.set()
        self._thread: threading.Thread | None = None

    def start(self, target: str, who: str) -> RetrainStatus:
        with self._lock:
            if self.status.state == 'running':
                raise RegistryError(BUSY, f'a retraining of {self.status.target} started by {self.status.started_by} '
                                          'is still running; wait for it to finish')
            self.status = RetrainStatus(state='running', target=target, started_by=who, started=time.time())
            self._done.clear()
            options = replace(self.options, target=target)
            self._thread = threading.Thread(target=self._run, args=(options,), name='retrain', daemon=True)
            self._thread.start()
            return self.status

    def _run(self, options: RetrainOptions) -> None:
        status = self.status
        try:
            result = retrain(self.db_path, self.data_dir, options, store=self.store, log=status.log.append)
            status.weights, status.labels_used = str(result.weights), result.summary.used
            status.message = f'trained on {result.summary.used} labelled crops: {result.weights.name}'
            status.state = 'done'
        except RetrainError as refused:
            status.message, status.state = refused.message, 'failed'
        except Exception as failure:  # noqa: BLE001 - a failed job is reported on the page, not lost
            status.message, status.state = f'retraining failed: {type(failure).__name__}: {failure}', 'failed'
        finally:
            status.finished = time.time()
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the running retraining (if any) has finished; False on timeout."""
        return self._done.wait(timeout)

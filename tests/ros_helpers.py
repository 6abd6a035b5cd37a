"""Helpers for tests that run real rclpy nodes: bounded waits, never sleeps in callbacks."""

from __future__ import annotations

from collections.abc import Callable
import os
from pathlib import Path
import subprocess
import sys
import time

HELPERS = Path(__file__).resolve().parent / 'helpers'


def spin_until(executor, predicate: Callable[[], bool], timeout: float = 30.0,
               step: float = 0.05) -> bool:
    """Spin ``executor`` until ``predicate()`` holds or ``timeout`` seconds pass (a hang guard)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=step)
    return predicate()


def spin_future(executor, future, timeout: float = 30.0):
    """Spin until ``future`` is done; return its result or raise TimeoutError."""
    if not spin_until(executor, future.done, timeout):
        raise TimeoutError('future did not complete')
    return future.result()


def start_helper(name: str, *args: str) -> subprocess.Popen:
    """Start ``tests/helpers/<name>.py`` in its own process with this environment."""
    return subprocess.Popen([sys.executable, str(HELPERS / f'{name}.py'), *args],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def stop_helper(process: subprocess.Popen) -> str:
    """Terminate a helper process started by ``start_helper`` and return its output."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.stdout.read() if process.stdout else ''

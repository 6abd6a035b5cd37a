"""The stage fault suite: many waited moves against an emulator whose replies jitter around
the driver's timeout, get lost or arrive twice, with the true position checked after each.

A move that returns is *correct* when the emulator, which knows where the axes really are,
has them within the driver's tolerance of the target, both when the move returns and when
the next command is about to be sent (a stale MOVE still queued in the controller would have
run by then). It *failed loudly* when it raised StageError. Anything else is a *silent wrong
position*: the one outcome the driver must never produce. Used by the tests and the bench.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import random
import time

from flake_scanner.stage.driver import StageDriver, StageError
from flake_scanner.stage.emulator import EmulatorConfig, StageEmulator


@dataclass
class FaultSuiteResult:
    moves: int = 0
    correct: int = 0
    failed_loudly: int = 0
    silent_wrong: int = 0
    worst_silent_error_m: float = 0.0
    replies_dropped: int = 0
    replies_duplicated: int = 0
    replies_late: int = 0  # tries the driver gave up waiting for (lost or later than its timeout)
    stale_replies: int = 0
    resyncs: int = 0
    moves_resent: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def add(self, other: FaultSuiteResult) -> None:
        for name in ('moves', 'correct', 'failed_loudly', 'silent_wrong', 'replies_dropped', 'replies_duplicated',
                     'replies_late', 'stale_replies', 'resyncs', 'moves_resent'):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.worst_silent_error_m = max(self.worst_silent_error_m, other.worst_silent_error_m)
        self.seconds = max(self.seconds, other.seconds)
        self.failures += other.failures


def _error(true, target) -> float:
    return max(abs(a - b) for a, b in zip(true, target, strict=True))


def run_fault_suite(moves: int, timeout: float = 0.05, jitter: float = 1.5, drop: float = 0.05,
                    duplicate: float = 0.05, garbage: float = 0.0, seed: int = 0, retries: int = 3,
                    span: float = 2e-3, tolerance: float = 1e-6,
                    driver_class: type = StageDriver) -> FaultSuiteResult:
    """``moves`` waited moves to random targets within ``span`` of the origin.

    Each reply takes uniformly 0 to ``jitter`` x ``timeout`` to come (so about a third of
    them are later than the timeout with the default 1.5), a fraction ``drop`` is lost and
    a fraction ``duplicate`` is sent twice, the copy up to ``jitter`` x ``timeout`` later.
    ``driver_class`` lets a bench measure another driver (an earlier version) the same way.
    """
    config = EmulatorConfig(time_scale=200.0, settle_time=0.002, reply_jitter=jitter * timeout,
                            drop_probability=drop, duplicate_probability=duplicate,
                            garbage_probability=garbage, seed=seed)
    rng = random.Random(seed + 1)
    result = FaultSuiteResult()
    started = time.monotonic()
    with StageEmulator(config) as emulator, driver_class(emulator.port, timeout=timeout, retries=retries,
                                                          reconnect_delay=0.01) as driver:
        confirmed = None  # the target of the last move that returned, while nothing else was sent since

        def check_still_there() -> None:
            if confirmed is None:
                return
            error = _error(emulator.position(), confirmed)
            if error > tolerance:
                result.correct -= 1
                result.silent_wrong += 1
                result.worst_silent_error_m = max(result.worst_silent_error_m, error)

        for _ in range(moves):
            target = (rng.uniform(-span, span), rng.uniform(-span, span), rng.uniform(-span / 20, span / 20))
            check_still_there()
            result.moves += 1
            try:
                driver.move_to(*target, wait=True, timeout=10.0)
            except StageError as error:
                result.failed_loudly += 1
                result.failures.append(str(error))
                confirmed = None
                continue
            error = _error(emulator.position(), target)
            if error > tolerance or emulator.busy():
                result.silent_wrong += 1
                result.worst_silent_error_m = max(result.worst_silent_error_m, error)
                confirmed = None
            else:
                result.correct += 1
                confirmed = target
        # Whatever was still in flight has arrived by now.
        time.sleep(2 * (jitter * timeout + 2 * timeout))
        check_still_there()
        counters = driver.counters
        result.replies_dropped = emulator.counters.replies_dropped
        result.replies_duplicated = emulator.counters.replies_duplicated
        result.replies_late = counters.lost_replies
        result.stale_replies = getattr(counters, 'stale_replies', 0)
        result.resyncs = counters.resyncs
        result.moves_resent = getattr(counters, 'moves_resent', 0)
    result.seconds = time.monotonic() - started
    return result

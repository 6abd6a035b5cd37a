"""pyserial driver for an ASI MS-2000 XYZ stage controller (see ``protocol``).

Every exchange is one command line and one reply line under a single lock, so the
driver may be shared between threads. Recovery, in order of escalation:

- no reply within ``timeout``: send the command again (all commands used are
  idempotent: moves are absolute), up to ``retries`` times;
- a reply that is not valid protocol (noise on the line): wait for the line to go
  quiet, flush the input and send again;
- an I/O error (adapter unplugged, port vanished): close the port and reopen it by
  its path, up to ``reconnect_attempts`` times, then raise StageError.

Positions are metres at this API; the controller's 0.1 um units stay in ``protocol``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
import threading
import time
from typing import TypeVar

import serial

from flake_scanner.stage import protocol
from flake_scanner.stage.protocol import ControllerError, ProtocolError

T = TypeVar('T')
AXES = ('x', 'y', 'z')

try:
    import termios

    # pyserial lets termios.error (not an OSError) through from flushes of an unplugged port.
    IO_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError, termios.error)
except ImportError:  # Windows
    IO_ERRORS = (serial.SerialException, OSError)


class StageError(RuntimeError):
    """The stage could not carry out a command (lost controller, refused command)."""


class StageLimitError(StageError):
    """A target outside the configured travel limits; nothing was sent."""


class StageTimeoutError(StageError):
    """The stage did not become idle in time."""


class StageNotHomedError(StageError):
    """A move was requested before homing on a driver that requires homing."""


@dataclass
class TravelLimits:
    """Allowed travel per axis [m], inclusive."""

    x: tuple[float, float] = (-0.05, 0.05)
    y: tuple[float, float] = (-0.05, 0.05)
    z: tuple[float, float] = (-0.005, 0.005)

    def __post_init__(self):
        for axis in AXES:
            low, high = getattr(self, axis)
            if not low < high:
                raise ValueError(f'{axis} limits must satisfy low < high, got ({low}, {high})')

    def check(self, target: dict[str, float]) -> None:
        for axis, value in target.items():
            low, high = getattr(self, axis)
            if not low <= value <= high:
                raise StageLimitError(
                    f'{axis} = {value * 1e3:.4f} mm is outside the travel limits '
                    f'[{low * 1e3:.4f}, {high * 1e3:.4f}] mm')


@dataclass
class StageCounters:
    """Serial health since the driver was created, for diagnostics."""

    commands: int = 0
    retries: int = 0
    lost_replies: int = 0
    resyncs: int = 0
    reconnects: int = 0
    faults: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class StageDriver:
    """Thread-safe driver of an MS-2000 controller on a serial port."""

    def __init__(self, port: str, baudrate: int = 115200, timeout: float = 0.5, retries: int = 3,
                 reconnect_attempts: int = 5, reconnect_delay: float = 0.2,
                 limits: TravelLimits | None = None, require_homing: bool = False,
                 serial_factory: Callable[..., serial.Serial] = serial.Serial):
        if timeout <= 0:
            raise ValueError(f'timeout must be positive, got {timeout}')
        if retries < 0 or reconnect_attempts < 0:
            raise ValueError('retries and reconnect_attempts must be >= 0')
        self.port = port
        self.baudrate = baudrate
        self.timeout = timeout
        self.retries = retries
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.limits = limits or TravelLimits()
        self.require_homing = require_homing
        self.counters = StageCounters()
        self.homed = False
        self.target: tuple[float, float, float] | None = None
        self.fault_message = ''
        self._serial_factory = serial_factory
        self._serial: serial.Serial | None = None
        self._lock = threading.RLock()

    # --- connection ----------------------------------------------------------------------

    def open(self) -> None:
        """Open the port; raises StageError with the port path when it cannot be opened."""
        with self._lock:
            if self._serial is not None:
                return
            try:
                self._serial = self._serial_factory(self.port, baudrate=self.baudrate, timeout=self.timeout,
                                                    write_timeout=self.timeout)
            except (*IO_ERRORS, ValueError) as exc:
                raise StageError(f'cannot open stage port {self.port!r}: {exc}') from exc
            self.fault_message = ''

    def close(self) -> None:
        with self._lock:
            if self._serial is not None:
                try:
                    self._serial.close()
                except IO_ERRORS:
                    pass
                self._serial = None

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def __enter__(self) -> StageDriver:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _reconnect(self, cause: Exception) -> None:
        self.close()
        last = cause
        for _ in range(self.reconnect_attempts):
            time.sleep(self.reconnect_delay)
            try:
                self.open()
            except StageError as exc:
                last = exc
                continue
            self.counters.reconnects += 1
            return
        self.counters.faults += 1
        self.fault_message = (f'lost the stage controller on {self.port!r}: '
                              f'{self.reconnect_attempts} reconnect attempts failed ({last})')
        raise StageError(self.fault_message) from cause

    def _resync(self) -> None:
        """Let a noisy line go quiet, then drop whatever is buffered."""
        port = self._serial
        if port is None:
            return
        try:
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                time.sleep(0.005)
                if port.in_waiting == 0:
                    break
                port.reset_input_buffer()
            port.reset_input_buffer()
        except IO_ERRORS:
            self.close()  # the next attempt reopens the port

    # --- one exchange --------------------------------------------------------------------

    def _transact(self, command: bytes, parse: Callable[[bytes], T]) -> T:
        name = command.decode('ascii').strip()
        with self._lock:
            self.counters.commands += 1
            problem: object = None
            for attempt in range(self.retries + 1):
                if attempt:
                    self.counters.retries += 1
                try:
                    if self._serial is None:
                        self._reconnect(problem if isinstance(problem, Exception)
                                        else StageError('port closed'))
                    port = self._serial
                    port.reset_input_buffer()  # a late reply to an earlier try must not answer this one
                    port.write(command)
                    line = port.read_until(b'\n')
                except IO_ERRORS as exc:
                    problem = exc
                    self._reconnect(exc)
                    continue
                if not line.endswith(b'\n'):
                    if line:
                        problem = f'truncated reply {line!r}'
                        self.counters.resyncs += 1
                        self._resync()
                    else:
                        problem = f'no reply within {self.timeout} s'
                        self.counters.lost_replies += 1
                    continue
                try:
                    result = parse(line)
                except ProtocolError as exc:
                    problem = exc
                    self.counters.resyncs += 1
                    self._resync()
                    continue
                except ControllerError as exc:
                    self.counters.faults += 1
                    if exc.code == 4:
                        raise StageLimitError(f'controller refused {name!r}: {exc}') from exc
                    raise StageError(f'controller refused {name!r}: {exc}') from exc
                self.fault_message = ''
                return result
            self.counters.faults += 1
            self.fault_message = (f'no valid reply to {name!r} on {self.port!r} after '
                                  f'{self.retries + 1} attempts: {problem}')
            raise StageError(self.fault_message)

    # --- commands ------------------------------------------------------------------------

    def where(self) -> tuple[float, float, float]:
        """Current position [m] as (x, y, z)."""
        return self._transact(protocol.encode_where('XYZ'), lambda line: protocol.parse_where(line, 3))

    def is_busy(self) -> bool:
        return self._transact(protocol.encode_status(), protocol.parse_status)

    def stop(self) -> None:
        """Halt every axis now."""
        self._transact(protocol.encode_halt(), protocol.parse_ack)

    def set_speed(self, xy: float, z: float | None = None) -> None:
        """Maximum axis speed [m/s]."""
        if xy <= 0 or (z is not None and z <= 0):
            raise ValueError(f'speeds must be positive, got xy={xy}, z={z}')
        self._transact(protocol.encode_speed(xy, z), protocol.parse_ack)

    def wait_until_idle(self, timeout: float = 30.0, poll_interval: float = 0.01) -> None:
        """Poll STATUS until no axis moves or settles; StageTimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.is_busy():
            if time.monotonic() > deadline:
                raise StageTimeoutError(f'stage still busy after {timeout} s')
            time.sleep(poll_interval)

    def home(self, wait: bool = True, timeout: float = 60.0) -> None:
        """Drive every axis to its home position and make that the origin (HOME, then HERE 0).

        Always waits for the axes to arrive, because the origin is set there; ``wait`` is
        accepted for symmetry with the moves.
        """
        self._transact(protocol.encode_home('XYZ'), protocol.parse_ack)
        self.wait_until_idle(timeout)
        self._transact(protocol.encode_here(0.0, 0.0, 0.0), protocol.parse_ack)
        self.target = (0.0, 0.0, 0.0)
        self.homed = True

    def move_to(self, x: float | None = None, y: float | None = None, z: float | None = None,
                wait: bool = True, timeout: float = 30.0) -> tuple[float, float, float]:
        """Absolute move [m]; axes given as None stay where they are. Returns the last target."""
        if self.require_homing and not self.homed:
            raise StageNotHomedError('the stage must be homed before moving (require_homing is set)')
        target = {axis: value for axis, value in zip(AXES, (x, y, z), strict=True) if value is not None}
        if not target:
            raise ValueError('move_to needs at least one axis')
        self.limits.check(target)
        self._transact(protocol.encode_move(**target), protocol.parse_ack)
        previous = self.target if self.target is not None else self.where()
        self.target = tuple(target.get(axis, previous[i]) for i, axis in enumerate(AXES))
        if wait:
            self.wait_until_idle(timeout)
        return self.target

    def move_by(self, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0, wait: bool = True,
                timeout: float = 30.0) -> tuple[float, float, float]:
        """Relative move [m], sent as an absolute move from the current position (safe to retry)."""
        x, y, z = self.where()
        return self.move_to(x + dx, y + dy, z + dz, wait=wait, timeout=timeout)

"""pyserial driver for an ASI MS-2000 XYZ stage controller (see ``protocol``).

Every exchange is one command line and one reply line under a single lock, so the
driver may be shared between threads. The MS-2000 does not echo commands, so a reply
can only be matched to its command when nothing else is in flight. The driver keeps
it that way:

- stale input is flushed before every command (counted as ``stale_replies``);
- after a lost, late, truncated or garbled reply the driver never takes the next line
  as the answer: it *drains* the line until it has been quiet for ``quiet_period``
  (every reply still in flight arrives and is dropped), and only then speaks again;
- a query (WHERE, STATUS) is then asked again; a MOVE is not resent blindly: the
  driver asks the controller where it is and whether it is busy, and resends only if
  the stage is idle away from the target;
- a move reports success only when the controller, asked after the move has settled
  (and after a drain when anything went wrong during it), reports a position within
  ``tolerance`` of the target; otherwise it is sent again, up to ``retries`` times,
  then StageError. While that is not settled, ``position_fault`` says why;
- an I/O error (adapter unplugged, port vanished): close the port and reopen it by
  its path, up to ``reconnect_attempts`` times, then raise StageError.

Positions are metres at this API; the controller's 0.1 um units stay in ``protocol``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
import math
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


class StageSpeedError(StageError, ValueError):
    """A speed outside the configured speed limits; nothing was sent."""


class StageTimeoutError(StageError):
    """The stage did not become idle in time."""


class StageNotHomedError(StageError):
    """A move was requested before homing on a driver that requires homing."""


class StagePositionError(StageError):
    """A move ended with the measured position away from its target."""


@dataclass
class TravelLimits:
    """Allowed travel per axis [m], inclusive."""

    x: tuple[float, float] = (-0.05, 0.05)
    y: tuple[float, float] = (-0.05, 0.05)
    z: tuple[float, float] = (-0.005, 0.005)

    def __post_init__(self):
        for axis in AXES:
            low, high = getattr(self, axis)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f'{axis} limits must be finite with low < high, got ({low}, {high})')

    def check(self, target: dict[str, float]) -> None:
        for axis, value in target.items():
            low, high = getattr(self, axis)
            if not math.isfinite(value):
                raise StageLimitError(f'{axis} = {value} is not a finite position')
            if not low <= value <= high:
                raise StageLimitError(
                    f'{axis} = {value * 1e3:.4f} mm is outside the travel limits '
                    f'[{low * 1e3:.4f}, {high * 1e3:.4f}] mm')


@dataclass
class SpeedLimits:
    """Allowed axis speeds [m/s], inclusive."""

    xy: tuple[float, float] = (1e-6, 0.1)
    z: tuple[float, float] = (1e-7, 0.05)

    def __post_init__(self):
        for name in ('xy', 'z'):
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
                raise ValueError(f'{name} speed limits must be finite with 0 < low < high, got ({low}, {high})')

    def check(self, xy: float, z: float | None) -> None:
        for name, value in (('xy', xy), ('z', z)):
            if value is None:
                continue
            low, high = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                raise StageSpeedError(f'{name} speed {value:g} m/s is outside [{low:g}, {high:g}] m/s')


@dataclass
class StageCounters:
    """Serial health since the driver was created, for diagnostics."""

    commands: int = 0
    retries: int = 0
    lost_replies: int = 0
    resyncs: int = 0
    stale_replies: int = 0
    reconnects: int = 0
    moves_resent: int = 0
    faults: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _UnansweredError(Exception):
    """No valid reply to one try of a command (lost, late, truncated or garbled)."""


class StageDriver:
    """Thread-safe driver of an MS-2000 controller on a serial port."""

    def __init__(self, port: str, baudrate: int = 115200, timeout: float = 0.5, retries: int = 3,
                 reconnect_attempts: int = 5, reconnect_delay: float = 0.2,
                 limits: TravelLimits | None = None, require_homing: bool = False,
                 tolerance: float = 1e-6, quiet_period: float | None = None,
                 speed_limits: SpeedLimits | None = None,
                 serial_factory: Callable[..., serial.Serial] = serial.Serial):
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f'timeout must be positive, got {timeout}')
        if retries < 0 or reconnect_attempts < 0:
            raise ValueError('retries and reconnect_attempts must be >= 0')
        if not (math.isfinite(tolerance) and tolerance >= protocol.UNIT_M / 2):
            raise ValueError(f'tolerance must be at least half a controller unit (5e-8 m), got {tolerance}')
        self.port = port
        self.baudrate = baudrate
        self.timeout = timeout
        self.retries = retries
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.limits = limits or TravelLimits()
        self.speed_limits = speed_limits or SpeedLimits()
        self.require_homing = require_homing
        self.tolerance = tolerance
        self._quiet_period = quiet_period
        self.counters = StageCounters()
        self.homed = False
        self.target: tuple[float, float, float] | None = None
        self.fault_message = ''  # the serial link: set when a command got no valid reply at all
        self.position_fault = ''  # the position: set while a move is not confirmed by the controller
        self._anomalies = 0  # unanswered tries and stale input seen, ever (moves compare before/after)
        self._serial_factory = serial_factory
        self._serial: serial.Serial | None = None
        self._lock = threading.RLock()

    @property
    def quiet_period(self) -> float:
        """How long the line must stay silent before the driver speaks again after a bad exchange [s]."""
        return self._quiet_period if self._quiet_period is not None else 2.0 * self.timeout

    @property
    def fault(self) -> str:
        """Why the stage cannot be trusted now (link or position), empty when it can."""
        return '; '.join(m for m in (self.fault_message, self.position_fault) if m)

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

    def _drain(self) -> None:
        """Drop everything the controller still sends until the line is quiet for ``quiet_period``.

        Replies to earlier tries arrive here and are thrown away, so the next reply read
        belongs to the next command. Raises StageError if the line never goes quiet.
        """
        self.counters.resyncs += 1
        port = self._serial
        if port is None:
            return
        quiet = self.quiet_period
        started = last_byte = time.monotonic()
        limit = max(10.0 * quiet, 1.0)
        try:
            while True:
                waiting = port.in_waiting
                now = time.monotonic()
                if waiting:
                    port.read(waiting)
                    last_byte = now
                elif now - last_byte >= quiet:
                    return
                if now - started > limit:
                    self.counters.faults += 1
                    self.fault_message = f'the line from {self.port!r} never went quiet for {quiet:.3f} s'
                    raise StageError(self.fault_message)
                time.sleep(min(0.002, quiet / 4))
        except IO_ERRORS:
            self.close()  # the next attempt reopens the port

    # --- one exchange --------------------------------------------------------------------

    def _try_once(self, command: bytes, parse: Callable[[bytes], T]) -> T:
        """Send ``command`` once and parse its reply; _UnansweredError (after a drain) when none is valid."""
        if self._serial is None:
            self._reconnect(StageError('port closed'))
        port = self._serial
        try:
            stale = port.in_waiting
            if stale:
                # A reply nobody waited for (a duplicate, or later than the quiet period):
                # it must not answer this command.
                self.counters.stale_replies += 1
                self._anomalies += 1
            port.reset_input_buffer()
            port.write(command)
            line = port.read_until(b'\n')
        except IO_ERRORS as exc:
            self._reconnect(exc)
            self._anomalies += 1
            raise _UnansweredError(f'I/O error: {exc}') from exc
        if not line.endswith(b'\n'):
            self._anomalies += 1
            if line:
                problem = f'truncated reply {line!r}'
            else:
                problem = f'no reply within {self.timeout} s'
                self.counters.lost_replies += 1
            self._drain()
            raise _UnansweredError(problem)
        try:
            return parse(line)
        except ProtocolError as exc:
            self._anomalies += 1
            self._drain()
            raise _UnansweredError(str(exc)) from exc

    def _transact(self, command: bytes, parse: Callable[[bytes], T],
                  took_effect: Callable[[], bool] | None = None) -> T | None:
        """One command with recovery; returns the parsed reply.

        ``took_effect`` (for commands that change the stage) is asked after an
        unanswered try, once the line is drained: when it says the command was carried
        out, the command is not sent again and None is returned.
        """
        name = command.decode('ascii').strip()
        with self._lock:
            self.counters.commands += 1
            problem = ''
            for attempt in range(self.retries + 1):
                if attempt:
                    self.counters.retries += 1
                try:
                    result = self._try_once(command, parse)
                except _UnansweredError as exc:
                    problem = str(exc)
                    if took_effect is not None and took_effect():
                        self.fault_message = ''
                        return None
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
        """Maximum axis speed [m/s]; StageSpeedError (nothing sent) outside ``speed_limits``."""
        self.speed_limits.check(xy, z)
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
        self.target = (0.0, 0.0, 0.0)
        self.position_fault = 'homing: position unknown until the axes arrive home'
        self._transact(protocol.encode_home('XYZ'), protocol.parse_ack)
        self.wait_until_idle(timeout)
        self._transact(protocol.encode_here(0.0, 0.0, 0.0), protocol.parse_ack)
        position = self._settled_position(-1)
        if not self._within(position, self.target):
            self.position_fault = f'after homing the controller reports {_mm(position)}, not the origin'
            raise StagePositionError(self.position_fault)
        self.homed = True
        self.position_fault = ''

    def _within(self, position, target) -> bool:
        return all(abs(p - t) <= self.tolerance for p, t in zip(position, target, strict=True))

    def _settled_position(self, anomalies_before: int) -> tuple[float, float, float]:
        """The position of an idle stage, read so that no reply of an earlier try can answer it.

        When anything went wrong since ``anomalies_before`` (-1: always), the line is drained
        first and the controller asked again whether it is idle.
        """
        with self._lock:
            if self._anomalies != anomalies_before:
                self._drain()
                while self.is_busy():
                    time.sleep(0.01)
            return self.where()

    def move_to(self, x: float | None = None, y: float | None = None, z: float | None = None,
                wait: bool = True, timeout: float = 30.0) -> tuple[float, float, float]:
        """Absolute move [m]; axes given as None keep their last target.

        With ``wait`` it returns the measured position once the stage has settled within
        ``tolerance`` of the target, and raises StagePositionError otherwise; without it,
        the target once the controller has accepted the move.
        """
        if self.require_homing and not self.homed:
            raise StageNotHomedError('the stage must be homed before moving (require_homing is set)')
        given = {axis: value for axis, value in zip(AXES, (x, y, z), strict=True) if value is not None}
        if not given:
            raise ValueError('move_to needs at least one axis')
        self.limits.check(given)
        with self._lock:
            if len(given) < 3:
                confirmed = self.target is not None and not self.position_fault
                previous = self.target if confirmed else self.where()
            else:
                previous = (0.0, 0.0, 0.0)
            target = tuple(given.get(axis, previous[i]) for i, axis in enumerate(AXES))
            anomalies_before = self._anomalies
            self.target = target

        def took_effect() -> bool:
            self.position_fault = f'MOVE to {_mm(target)} unanswered: asking the controller where it is'
            return self._arrived_or_moving(target)

        command = protocol.encode_move(**given)
        deadline = time.monotonic() + timeout
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.counters.moves_resent += 1
            self._transact(command, protocol.parse_ack, took_effect=took_effect)
            if not wait:
                if self._anomalies != anomalies_before:
                    self.position_fault = f'moving to {_mm(target)}: not confirmed by the controller yet'
                return target
            self.wait_until_idle(max(0.0, deadline - time.monotonic()))
            last = self._settled_position(anomalies_before)
            if self._within(last, target):
                self.position_fault = ''
                return last
            self.position_fault = f'stage stopped at {_mm(last)}, not at the target {_mm(target)}: sending it again'
            anomalies_before = -1  # from now on every reading is taken after a drain
        self.counters.faults += 1
        self.position_fault = (f'stage stopped at {_mm(last)}, not at the target {_mm(target)} '
                               f'(tolerance {self.tolerance * 1e6:.2f} um) after {self.retries + 1} attempts')
        raise StagePositionError(self.position_fault)

    def observe(self, position: tuple[float, float, float], busy: bool) -> None:
        """A position read by a poller: an unconfirmed move is confirmed once the stage is idle on target."""
        if self.position_fault and not busy and self.target is not None and self._within(position, self.target):
            with self._lock:
                if not self.is_busy() and self._within(self._settled_position(-1), self.target):
                    self.position_fault = ''

    def _arrived_or_moving(self, target) -> bool:
        """After an unanswered MOVE (line drained): did the controller take it? Busy or on target: yes."""
        try:
            busy = self.is_busy()
            return busy or self._within(self.where(), target)
        except StageError:
            return False

    def move_by(self, dx: float = 0.0, dy: float = 0.0, dz: float = 0.0, wait: bool = True,
                timeout: float = 30.0) -> tuple[float, float, float]:
        """Relative move [m], sent as an absolute move from the current position (safe to retry)."""
        x, y, z = self.where()
        return self.move_to(x + dx, y + dy, z + dz, wait=wait, timeout=timeout)


def _mm(position) -> str:
    if position is None:
        return '(unknown)'
    return '(' + ', '.join(f'{v * 1e3:.4f}' for v in position) + ') mm'

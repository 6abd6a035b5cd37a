"""Emulator of an ASI MS-2000 XYZ stage controller, served on a pseudo-terminal.

The emulator opens a pty pair (``os.openpty``) and publishes the slave side under a
stable symlink, the way udev publishes a USB-serial adapter under
``/dev/serial/by-id/...``; pyserial opens that path exactly as it opens real hardware.

Motion is timed: each axis follows a trapezoidal velocity profile (maximum speed,
acceleration) and the controller reports busy until the move has finished and the
settle time has passed. ``time_scale`` > 1 runs the emulated clock faster so tests
can move millimetres in milliseconds.

Fault injection, for testing the driver's recovery:

- lost replies: the command is executed but no reply is sent;
- slow replies: each command is processed ``reply_delay`` plus a random share of
  ``reply_jitter`` seconds after it arrived, one after another, so commands sent while
  an earlier one is still being processed queue up as in a real controller;
- duplicated replies: a reply is sent a second time, up to ``reply_jitter`` later
  (possibly after the reply to the next command);
- garbage: random bytes precede the reply on the line (electrical noise);
- busy: STATUS reports ``B`` for a while although nothing moves;
- disconnect: both pty ends are closed and the symlink removed, like unplugging a
  USB adapter; after ``down_for`` seconds a new pty is created and the symlink points
  at it, so the driver must notice the I/O error and reopen the port by its path.
  The controller state (positions, homing) survives, as the controller keeps power.

Run ``stage_emulator`` to serve it from a process; it prints the port path.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
import math
import os
import random
import select
import signal
import sys
import tempfile
import threading
import time
import tty

from flake_scanner.stage import protocol
from flake_scanner.stage.protocol import ControllerError

AXIS_NAMES = ('X', 'Y', 'Z')


@dataclass
class EmulatorConfig:
    """Physical behaviour of the emulated controller; lengths in metres, times in seconds."""

    speed_xy: float = 5e-3
    speed_z: float = 1e-3
    accel_xy: float = 0.1
    accel_z: float = 0.05
    settle_time: float = 0.02
    limits: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        'X': (-0.05, 0.05), 'Y': (-0.05, 0.05), 'Z': (-0.005, 0.005)})
    home_position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    initial_position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    time_scale: float = 1.0  # emulated seconds per real second
    reply_delay: float = 0.0  # controller processing time per command [real s]
    reply_jitter: float = 0.0  # extra processing time per command, uniform in [0, reply_jitter] [real s]
    drop_probability: float = 0.0
    duplicate_probability: float = 0.0
    garbage_probability: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.time_scale <= 0:
            raise ValueError(f'time_scale must be positive, got {self.time_scale}')
        for name in ('reply_delay', 'reply_jitter'):
            if not getattr(self, name) >= 0:
                raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
        for name in ('drop_probability', 'garbage_probability', 'duplicate_probability'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f'{name} must be in [0, 1], got {getattr(self, name)}')
        for name in ('speed_xy', 'speed_z', 'accel_xy', 'accel_z'):
            if getattr(self, name) <= 0:
                raise ValueError(f'{name} must be positive, got {getattr(self, name)}')


@dataclass
class _AxisMove:
    start: float
    target: float
    t_start: float
    speed: float
    accel: float

    @property
    def duration(self) -> float:
        distance = abs(self.target - self.start)
        if distance == 0:
            return 0.0
        if distance <= self.speed ** 2 / self.accel:  # triangular profile: never reaches full speed
            return 2.0 * math.sqrt(distance / self.accel)
        return distance / self.speed + self.speed / self.accel

    def position(self, now: float) -> float:
        distance = abs(self.target - self.start)
        direction = 1.0 if self.target >= self.start else -1.0
        t = now - self.t_start
        total = self.duration
        if t >= total:
            return self.target
        if t <= 0:
            return self.start
        if distance <= self.speed ** 2 / self.accel:
            half = total / 2.0
            if t <= half:
                travelled = 0.5 * self.accel * t * t
            else:
                travelled = distance - 0.5 * self.accel * (total - t) ** 2
        else:
            ramp = self.speed / self.accel
            if t <= ramp:
                travelled = 0.5 * self.accel * t * t
            elif t <= total - ramp:
                travelled = 0.5 * self.speed * ramp + self.speed * (t - ramp)
            else:
                travelled = distance - 0.5 * self.accel * (total - t) ** 2
        return self.start + direction * travelled


@dataclass
class EmulatorCounters:
    commands: int = 0
    moves: int = 0  # MOVE commands received
    replies_dropped: int = 0
    garbage_sent: int = 0
    replies_duplicated: int = 0
    disconnects: int = 0


class StageEmulator:
    """An MS-2000 controller on a pty, served by a background thread."""

    def __init__(self, config: EmulatorConfig | None = None, link_path: str | None = None):
        self.config = config or EmulatorConfig()
        self._rng = random.Random(self.config.seed)
        self._own_dir = None
        if link_path is None:
            self._own_dir = tempfile.mkdtemp(prefix='stage-emulator-')
            link_path = os.path.join(self._own_dir, 'ttyASI0')
        self.port = link_path
        self.counters = EmulatorCounters()
        self._lock = threading.Lock()
        self._moves = {axis: _AxisMove(p, p, 0.0, 1.0, 1.0)
                       for axis, p in zip(AXIS_NAMES, self.config.initial_position, strict=True)}
        # Mechanical coordinate of each axis' logical zero; HERE moves it. Motion and limits
        # are mechanical, WHERE/MOVE speak logical coordinates, as on the controller.
        self._origin = {axis: 0.0 for axis in AXIS_NAMES}
        self._speeds = {'X': self.config.speed_xy, 'Y': self.config.speed_xy, 'Z': self.config.speed_z}
        self._accels = {'X': self.config.accel_xy, 'Y': self.config.accel_xy, 'Z': self.config.accel_z}
        self._busy_until = 0.0
        self._held_busy_until = 0.0
        self._drop_next = 0
        self._delay_next: list[float] = []
        self._garble_next = 0
        self._disconnect_request: float | None = None
        self._unplugged = threading.Event()
        self._down_until: float | None = None  # real time when a disconnected port comes back
        self.homed = False
        self._master: int | None = None
        self._slave: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0 = time.monotonic()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> str:
        """Create the pty and serve it in a daemon thread; return the port path."""
        self._open_pty()
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name='stage-emulator', daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._close_pty()
        if self._own_dir is not None:
            try:
                os.rmdir(self._own_dir)
            except OSError:
                pass

    def __enter__(self) -> StageEmulator:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        # Raw line discipline: no echo, no CR/LF translation, like a real UART.
        tty.setraw(slave)
        self._master, self._slave = master, slave
        temporary = self.port + '.new'
        if os.path.lexists(temporary):
            os.unlink(temporary)
        os.symlink(os.ttyname(slave), temporary)
        os.replace(temporary, self.port)

    def _close_pty(self) -> None:
        if os.path.lexists(self.port):
            os.unlink(self.port)
        for fd in (self._master, self._slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = None

    # --- emulated clock and state ------------------------------------------------------

    def now(self) -> float:
        """Emulated time [s]."""
        return (time.monotonic() - self._t0) * self.config.time_scale

    def position(self) -> tuple[float, float, float]:
        """Current position in metres, controller coordinates (the motion profile at the emulated time)."""
        with self._lock:
            now = self.now()
            return tuple(self._logical(a, now) for a in AXIS_NAMES)

    def _logical(self, axis: str, now: float) -> float:
        return self._moves[axis].position(now) - self._origin[axis]

    def busy(self) -> bool:
        with self._lock:
            return self._busy_locked(self.now())

    def _busy_locked(self, now: float) -> bool:
        return now < self._busy_until or time.monotonic() < self._held_busy_until

    # --- fault injection ---------------------------------------------------------------

    def drop_next_replies(self, count: int = 1) -> None:
        with self._lock:
            self._drop_next += count

    def delay_next_replies(self, seconds: float, count: int = 1) -> None:
        """Process the next ``count`` commands ``seconds`` late (a controller busy with something else)."""
        with self._lock:
            self._delay_next += [seconds] * count

    def garble_next_replies(self, count: int = 1) -> None:
        with self._lock:
            self._garble_next += count

    def hold_busy(self, seconds: float) -> None:
        """Report busy for ``seconds`` of real time although nothing moves."""
        with self._lock:
            self._held_busy_until = time.monotonic() + seconds

    def disconnect(self, down_for: float | None = 0.2) -> None:
        """Unplug the port now; it comes back after ``down_for`` real seconds (None: never).

        Returns once the port is gone, so the next command of a driver meets the unplugged port.
        """
        self._unplugged.clear()
        with self._lock:
            self._disconnect_request = math.inf if down_for is None else down_for
        if self._thread is not None and not self._unplugged.wait(5.0):
            raise RuntimeError('emulator thread did not unplug the port')

    # --- serving -----------------------------------------------------------------------

    def _serve(self) -> None:
        buffer = b''
        while not self._stop.is_set():
            with self._lock:
                request, self._disconnect_request = self._disconnect_request, None
            if request is not None:
                self._close_pty()
                self.counters.disconnects += 1
                buffer = b''
                self._down_until = time.monotonic() + request
                self._unplugged.set()
            if self._master is None:
                if self._down_until is not None and time.monotonic() >= self._down_until:
                    self._down_until = None
                    self._open_pty()
                else:
                    self._stop.wait(0.01)
                continue
            try:
                readable, _, _ = select.select([self._master], [], [], 0.02)
                if not readable:
                    continue
                data = os.read(self._master, 4096)
            except OSError:
                continue
            buffer += data
            while True:
                cut = min((i for i in (buffer.find(b'\r'), buffer.find(b'\n')) if i >= 0), default=-1)
                if cut < 0:
                    break
                line, buffer = buffer[:cut], buffer[cut + 1:]
                if line.strip():
                    self._answer(line)

    def _answer(self, line: bytes) -> None:
        delay = self.config.reply_delay
        with self._lock:
            if self.config.reply_jitter > 0:
                delay += self._rng.uniform(0.0, self.config.reply_jitter)
            if self._delay_next:
                delay += self._delay_next.pop(0)
        if delay > 0:
            time.sleep(delay)
        with self._lock:
            self.counters.commands += 1
            reply = self._execute(line)
            drop = self._drop_next > 0 or self._rng.random() < self.config.drop_probability
            if self._drop_next > 0:
                self._drop_next -= 1
            garble = not drop and (self._garble_next > 0
                                   or self._rng.random() < self.config.garbage_probability)
            if garble and self._garble_next > 0:
                self._garble_next -= 1
            if drop:
                self.counters.replies_dropped += 1
                return
            duplicate_after = None
            if self.config.duplicate_probability and self._rng.random() < self.config.duplicate_probability:
                self.counters.replies_duplicated += 1
                duplicate_after = self._rng.uniform(0.0, self.config.reply_jitter)
            if garble:
                self.counters.garbage_sent += 1
                noise = bytes(self._rng.choice([*range(1, 10), *range(14, 256)])
                              for _ in range(self._rng.randint(1, 8)))
                reply = noise + reply
        self._write(reply)
        if duplicate_after is not None:
            timer = threading.Timer(duplicate_after, self._write, args=(reply,))
            timer.daemon = True
            timer.start()

    def _write(self, reply: bytes) -> None:
        try:
            os.write(self._master, reply)
        except (OSError, TypeError):
            pass  # port unplugged while answering: the reply is lost, as on real hardware

    def _execute(self, line: bytes) -> bytes:
        try:
            command = protocol.decode_command(line)
            now = self.now()
            if command.verb == 'STATUS':
                return protocol.encode_reply_status(self._busy_locked(now))
            if command.verb == 'WHERE':
                axes = [a for a in command.args] or list(AXIS_NAMES)
                return protocol.encode_reply_where([protocol.to_units(self._logical(a, now)) for a in axes])
            if command.verb == 'MOVE':
                self.counters.moves += 1
                targets = {a: protocol.to_metres(v) + self._origin[a]
                           for a, v in command.args.items() if v is not None}
                if not targets:
                    raise ControllerError(3)
                return self._start_move(targets, now)
            if command.verb == 'HOME':
                axes = list(command.args) or list(AXIS_NAMES)
                home = dict(zip(AXIS_NAMES, self.config.home_position, strict=True))
                reply = self._start_move({a: home[a] for a in axes}, now)
                self.homed = True
                return reply
            if command.verb == 'HERE':
                values = {a: v for a, v in command.args.items() if v is not None}
                if not values:
                    raise ControllerError(3)
                for axis, value in values.items():
                    self._origin[axis] = self._moves[axis].position(now) - protocol.to_metres(value)
                return protocol.encode_reply_ack()
            if command.verb == 'HALT':
                for axis in AXIS_NAMES:
                    here = self._moves[axis].position(now)
                    self._moves[axis] = _AxisMove(here, here, now, 1.0, 1.0)
                self._busy_until = now
                return protocol.encode_reply_ack()
            if command.verb == 'SPEED':
                for axis, value in command.args.items():
                    if value is None or value <= 0:
                        raise ControllerError(4)
                    self._speeds[axis] = value * 1e-3
                return protocol.encode_reply_ack()
            raise ControllerError(1)
        except ControllerError as exc:
            return protocol.encode_reply_error(exc.code)

    def _start_move(self, targets: dict[str, float], now: float) -> bytes:
        for axis, target in targets.items():
            low, high = self.config.limits[axis]
            if not low - 1e-12 <= target <= high + 1e-12:
                raise ControllerError(4)
        finish = now
        for axis, target in targets.items():
            here = self._moves[axis].position(now)
            move = _AxisMove(here, target, now, self._speeds[axis], self._accels[axis])
            self._moves[axis] = move
            finish = max(finish, now + move.duration)
        # Still-moving axes that were not commanded keep their own finish time.
        for axis in AXIS_NAMES:
            move = self._moves[axis]
            finish = max(finish, move.t_start + move.duration)
        self._busy_until = finish + self.config.settle_time
        return protocol.encode_reply_ack()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description='Serve an emulated ASI MS-2000 XYZ stage controller on a pseudo-terminal.')
    parser.add_argument('--link', default=None,
                        help='path of the symlink to the pty (default: a new temporary directory)')
    parser.add_argument('--time-scale', type=float, default=1.0, help='emulated seconds per real second')
    parser.add_argument('--speed', type=float, default=5e-3, help='maximum x/y speed [m/s]')
    parser.add_argument('--settle-time', type=float, default=0.02, help='settle time after a move [s]')
    parser.add_argument('--drop-probability', type=float, default=0.0, help='chance a reply is lost')
    parser.add_argument('--garbage-probability', type=float, default=0.0,
                        help='chance noise bytes precede a reply')
    parser.add_argument('--duplicate-probability', type=float, default=0.0,
                        help='chance a reply is sent twice')
    parser.add_argument('--reply-delay', type=float, default=0.0, help='processing time per command [s]')
    parser.add_argument('--reply-jitter', type=float, default=0.0,
                        help='extra processing time per command, uniform in [0, JITTER] [s]')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = EmulatorConfig(speed_xy=args.speed, settle_time=args.settle_time, time_scale=args.time_scale,
                                drop_probability=args.drop_probability,
                                garbage_probability=args.garbage_probability,
                                duplicate_probability=args.duplicate_probability, reply_delay=args.reply_delay,
                                reply_jitter=args.reply_jitter, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    emulator = StageEmulator(config, link_path=args.link)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    port = emulator.start()
    print(port, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()
        print(f'served {emulator.counters.commands} commands', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Codec for the ASI MS-2000 / Tiger ASCII serial protocol (the subset a scanner needs).

Commands are ASCII lines ended by a carriage return; replies end with CR LF.
Positions travel in the controller's native unit, a tenth of a micrometre, and are
converted to metres only at this module's boundary (``to_units`` / ``to_metres``).

Commands used (MS-2000 "high level" syntax):

- ``MOVE X=<u> Y=<u> Z=<u>``   absolute move            -> ``:A``
- ``WHERE X Y Z``              read positions           -> ``:A <x> <y> <z>``
- ``STATUS``                   any axis moving?         -> ``N`` (idle) or ``B`` (busy)
- ``HOME X Y Z``               drive to the home position -> ``:A``
- ``HERE X=<u> Y=<u> Z=<u>``   call the current position <u> (defines the origin) -> ``:A``
- ``HALT``                     stop all axes            -> ``:A``
- ``SPEED X=<mm/s> Y=<mm/s>``  maximum axis speed       -> ``:A``

Errors come back as ``:N-<code>``. Relative moves (``MOVREL``) are deliberately not
used: a reply lost after a relative move cannot be retried safely, whereas an
absolute move can be sent again with the same effect.
"""

from __future__ import annotations

from dataclasses import dataclass
import re

UNIT_M = 1e-7  # one controller unit = 0.1 um
AXES = ('X', 'Y', 'Z')
COMMAND_TERMINATOR = b'\r'
REPLY_TERMINATOR = b'\r\n'

ERROR_CODES = {
    1: 'unknown command',
    2: 'unrecognised axis parameter',
    3: 'missing parameters',
    4: 'parameter out of range',
    5: 'operation failed',
    6: 'undefined error',
    21: 'serial command halted by HALT',
}


class ProtocolError(ValueError):
    """A reply that does not follow the protocol (garbage, truncated, wrong shape)."""


class ControllerError(RuntimeError):
    """The controller answered ``:N-<code>``: it understood and refused the command."""

    def __init__(self, code: int, command: str = ''):
        self.code = code
        self.command = command
        reason = ERROR_CODES.get(code, 'unknown error')
        super().__init__(f'controller error :N-{code} ({reason})' + (f' for {command!r}' if command else ''))


def to_units(metres: float) -> int:
    """Metres -> controller units (0.1 um), rounded to the nearest unit."""
    return int(round(metres / UNIT_M))


def to_metres(units: float) -> float:
    return float(units) * UNIT_M


def _axes_arguments(values: dict[str, float], fmt) -> str:
    parts = []
    for axis in AXES:
        if axis.lower() in values and values[axis.lower()] is not None:
            parts.append(f'{axis}={fmt(values[axis.lower()])}')
    if not parts:
        raise ValueError('at least one axis (x, y or z) is required')
    return ' '.join(parts)


def encode_move(x: float | None = None, y: float | None = None, z: float | None = None) -> bytes:
    """Absolute move to the given axis positions in metres (None leaves an axis alone)."""
    args = _axes_arguments({'x': x, 'y': y, 'z': z}, lambda m: str(to_units(m)))
    return f'MOVE {args}'.encode('ascii') + COMMAND_TERMINATOR


def encode_where(axes: str = 'XYZ') -> bytes:
    return ('WHERE ' + ' '.join(axes.upper())).encode('ascii') + COMMAND_TERMINATOR


def encode_status() -> bytes:
    return b'STATUS' + COMMAND_TERMINATOR


def encode_home(axes: str = 'XYZ') -> bytes:
    return ('HOME ' + ' '.join(axes.upper())).encode('ascii') + COMMAND_TERMINATOR


def encode_here(x: float | None = None, y: float | None = None, z: float | None = None) -> bytes:
    """Declare the current position of the given axes to be these values [m] (sets the origin)."""
    args = _axes_arguments({'x': x, 'y': y, 'z': z}, lambda m: str(to_units(m)))
    return f'HERE {args}'.encode('ascii') + COMMAND_TERMINATOR


def encode_halt() -> bytes:
    return b'HALT' + COMMAND_TERMINATOR


def encode_speed(xy_m_per_s: float, z_m_per_s: float | None = None) -> bytes:
    """Maximum speed per axis; the protocol takes mm/s."""
    values = {'x': xy_m_per_s, 'y': xy_m_per_s, 'z': z_m_per_s}
    args = _axes_arguments(values, lambda v: f'{v * 1e3:.6g}')
    return f'SPEED {args}'.encode('ascii') + COMMAND_TERMINATOR


# --- replies -------------------------------------------------------------------------------

_ERROR_RE = re.compile(r'^:N-(\d+)$')
_WHERE_RE = re.compile(r'^:A((?: -?\d+(?:\.\d+)?)+)$')


def _text(line: bytes | str) -> str:
    if isinstance(line, bytes):
        try:
            line = line.decode('ascii')
        except UnicodeDecodeError as exc:
            raise ProtocolError(f'non-ASCII bytes in reply {line!r}') from exc
    text = line.strip('\r\n ')
    if any(not (32 <= ord(c) < 127) for c in text):
        raise ProtocolError(f'control characters in reply {line!r}')
    return text


def _raise_if_error(text: str, command: str) -> None:
    match = _ERROR_RE.match(text)
    if match:
        raise ControllerError(int(match.group(1)), command)


def parse_ack(line: bytes | str, command: str = '') -> None:
    """Accept ``:A`` (possibly followed by text); raise ControllerError or ProtocolError otherwise.

    ``:A`` followed by numbers only is the shape of a WHERE reply, never an acknowledgement:
    refusing it keeps a late position reply from answering a MOVE.
    """
    text = _text(line)
    _raise_if_error(text, command)
    if text != ':A' and not text.startswith(':A '):
        raise ProtocolError(f'expected ":A", got {text!r}')
    if _WHERE_RE.match(text):
        raise ProtocolError(f'expected ":A", got a position reply {text!r}')


def parse_where(line: bytes | str, n_axes: int = 3, command: str = '') -> tuple[float, ...]:
    """``:A 1234 -56 7`` -> positions in metres, one per requested axis."""
    text = _text(line)
    _raise_if_error(text, command)
    match = _WHERE_RE.match(text)
    if not match:
        raise ProtocolError(f'expected ":A <positions>", got {text!r}')
    values = match.group(1).split()
    if len(values) != n_axes:
        raise ProtocolError(f'expected {n_axes} positions, got {len(values)} in {text!r}')
    return tuple(to_metres(float(v)) for v in values)


def parse_status(line: bytes | str, command: str = '') -> bool:
    """``B`` -> True (busy), ``N`` -> False (idle)."""
    text = _text(line)
    _raise_if_error(text, command)
    if text == 'B':
        return True
    if text == 'N':
        return False
    raise ProtocolError(f'expected "N" or "B", got {text!r}')


# --- controller side (used by the emulator) ------------------------------------------------

@dataclass(frozen=True)
class Command:
    """A decoded command line: verb and its axis arguments (``X=12`` -> {'X': 12.0}, ``X`` -> None)."""

    verb: str
    args: dict[str, float | None]


_VERB_ALIASES = {'M': 'MOVE', 'W': 'WHERE', '/': 'STATUS', '!': 'HOME', 'H': 'HERE', '\\': 'HALT', 'S': 'SPEED',
                 'R': 'MOVREL'}


def decode_command(line: bytes | str) -> Command:
    """Parse a command line as the controller does; raises ControllerError(1/2/3) when malformed."""
    if isinstance(line, bytes):
        try:
            line = line.decode('ascii')
        except UnicodeDecodeError:
            raise ControllerError(1) from None
    text = line.strip('\r\n ').upper()
    if not text:
        raise ControllerError(1)
    words = text.split()
    verb = _VERB_ALIASES.get(words[0], words[0])
    args: dict[str, float | None] = {}
    for word in words[1:]:
        name, _, value = word.partition('=')
        if name not in AXES:
            raise ControllerError(2, text)
        if value:
            try:
                args[name] = float(value)
            except ValueError:
                raise ControllerError(3, text) from None
        else:
            args[name] = None
    return Command(verb, args)


def encode_reply_ack() -> bytes:
    return b':A' + REPLY_TERMINATOR


def encode_reply_error(code: int) -> bytes:
    return f':N-{code}'.encode('ascii') + REPLY_TERMINATOR


def encode_reply_where(units: list[int]) -> bytes:
    return (':A ' + ' '.join(str(int(u)) for u in units)).encode('ascii') + REPLY_TERMINATOR


def encode_reply_status(busy: bool) -> bytes:
    return (b'B' if busy else b'N') + REPLY_TERMINATOR

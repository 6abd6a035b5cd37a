"""Units for people: what a person reads is in um, um^2, nm and the lab's local time, and what
a person types is read in the unit its field states (or the unit typed with the number).

Topics, the registry and every file meant for programs keep SI units (m, m^2, s since the
epoch); pages, pictures, command-line output and export headers turn them into these, and
read inputs back, through this one module. An input field has a unit (its label says
which), and a typed value may carry another one: ``1.2 mm`` in a um field is 1200 um. A
unit that is not a length (or area, or thickness) is refused with a message in the field's
unit, never silently read as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
import re
import time


class UnitError(ValueError):
    """A typed value that is not a quantity of the field's kind; ``message`` names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


UM = 1e-6                   # [m]
UM2 = 1e-12                 # [m^2]
NM = 1e-9                   # [m]

_LENGTH_UM = {'nm': 1e-3, 'um': 1.0, 'µm': 1.0, 'μm': 1.0, 'micron': 1.0, 'microns': 1.0, 'micrometre': 1.0,
              'micrometer': 1.0, 'mm': 1e3, 'cm': 1e4, 'm': 1e6}
_AREA_UM2 = {'nm2': 1e-6, 'um2': 1.0, 'µm2': 1.0, 'μm2': 1.0, 'mm2': 1e6, 'cm2': 1e8, 'm2': 1e12}
_THICKNESS_NM = {'pm': 1e-3, 'å': 0.1, 'angstrom': 0.1, 'nm': 1.0, 'um': 1e3, 'µm': 1e3, 'μm': 1e3,
                 'mm': 1e6}


@dataclass(frozen=True)
class Kind:
    """A kind of quantity a form field holds: its display unit and the units accepted for it."""

    name: str
    unit: str                                   # what the field's label says
    factors: dict[str, float]                   # accepted unit -> display units per unit
    si: float                                   # SI value of one display unit


LENGTH = Kind('length', 'µm', _LENGTH_UM, UM)
AREA = Kind('area', 'µm²', _AREA_UM2, UM2)
THICKNESS = Kind('thickness', 'nm', _THICKNESS_NM, 1.0)   # the registry keeps thickness in nm

_NUMBER = re.compile(r'^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\W\d_].*?)?\s*$')


def _unit_key(text: str) -> str:
    return text.strip().lower().replace(' ', '').replace('^', '').replace('²', '2')


def parse_quantity(text: str, kind: Kind, field: str) -> float | None:
    """The value typed into ``field`` in the field's display unit; None when the field is empty.

    Accepts a bare number (in the display unit) or a number with a unit of the same kind
    (``1.2 mm``, ``300 um^2``, ``0.01 µm``). Raises UnitError naming the field, what was
    typed and the units it accepts.
    """
    if text is None:
        return None
    text = str(text).strip()
    if not text:
        return None
    return _parse_filled(text, kind, field)


def _parse_filled(text: str, kind: Kind, field: str) -> float:
    """``parse_quantity`` of a field that is not empty (``text`` stripped)."""
    accepted = ', '.join(sorted({u for u in kind.factors if u.isascii() and len(u) <= 3}))
    match = _NUMBER.match(text)
    if match is None:
        raise UnitError(field, f'{field}: {text!r} is not a {kind.name}; type a number in '
                                              f'{kind.unit}, or a number with a unit ({accepted})')
    number = float(match.group(1))
    unit = match.group(2)
    if unit:
        factor = kind.factors.get(_unit_key(unit))
        if factor is None:
            raise UnitError(field, f'{field}: {unit.strip()!r} in {text!r} is not a unit of '
                                                  f'{kind.name}; use {kind.unit} or one of {accepted}')
        number *= factor
    if not math.isfinite(number):
        raise UnitError(field, f'{field}: {text!r} is not a finite {kind.name}')
    return number


def parse_point(text: str, field: str) -> tuple[float, float] | None:
    """``x, y`` in µm (each may carry a length unit: ``1.2 mm, 0.4 mm``); None when empty."""
    if text is None or not str(text).strip():
        return None
    parts = [p for p in re.split(r'[,;]', str(text)) if p.strip()]
    if len(parts) != 2:
        raise UnitError(field, f'{field}: {text!r} needs two lengths x, y (in µm, or with a unit '
                                              'such as 1.2 mm, 0.4 mm)')
    x, y = (_parse_filled(p.strip(), LENGTH, field) for p in parts)
    return x, y


# -- showing values ----------------------------------------------------------------------------


def local_time(stamp: float | None) -> str:
    """``2026-05-01 14:03:12 CEST``: the lab's local time with its zone; '' for no time."""
    if not stamp:
        return ''
    return time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(stamp))


def local_zone() -> str:
    return time.strftime('%Z', time.localtime())


def um(metres: float | None, digits: int = 1) -> str:
    return '' if metres is None else f'{metres / UM:.{digits}f}'


def um2(square_metres: float | None, digits: int = 0) -> str:
    return '' if square_metres is None else f'{square_metres / UM2:.{digits}f}'


def nm(metres: float | None, digits: int = 1) -> str:
    return '' if metres is None else f'{metres / NM:.{digits}f}'


def with_uncertainty(value: float, std: float, unit: str, digits: int = 2) -> str:
    """``12.30 ± 0.40 nm``, or ``12.30 nm`` when no uncertainty was estimated (never ``± 0.00``)."""
    text = f'{value:.{digits}f}'
    if std and math.isfinite(std) and round(std, digits) > 0:
        text += f' ± {std:.{digits}f}'
    return f'{text} {unit}'.rstrip()


def length_label(metres: float) -> str:
    """A length as a person writes it on a scale bar: ``500 nm``, ``10 µm``, ``1.5 mm``."""
    if metres < 1e-6:
        return f'{metres / NM:g} nm'
    if metres < 1e-3:
        return f'{metres / UM:g} µm'
    return f'{metres / 1e-3:g} mm'

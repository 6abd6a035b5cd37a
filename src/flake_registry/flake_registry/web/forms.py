"""What the web app accepts: JSON bodies, form fields and the flake browser's filters, all validated.

The browser's filters are in the units people read (µm, µm², nm) and may carry other
units (``1.2 mm``, read by ``flake_core.units``); they become a ``FlakeQuery`` in SI
units. A bad value is refused with the registry's error codes (a unit of the wrong
kind as INVALID_ARGUMENT, by the app's error handler) and a message in the unit the
person typed.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import QueryParams

from flake_core.units import AREA, LENGTH, THICKNESS, UM, UM2, parse_point, parse_quantity
from flake_registry import stacks
from flake_registry.query import DEFAULT_LIMIT, INVALID_ARGUMENT, INVALID_RANGE, FlakeQuery, RegistryError
from flake_registry.reservations import ROBOT_ID_MAX, check_robot_id

FLAKE_ID_PATTERN = r'^[A-Za-z0-9_.\-]{1,64}$'
NAME_PATTERN = re.compile(r'^[A-Za-z0-9_.\-]{1,128}$')  # scan, chip and report names
WHO_MAX = 64
NOTE_MAX = 500
MAX_PAGE = 10_000_000
LIST_FIELDS = ('layer_classes', 'statuses', 'materials')
# Browser fields in display units -> (FlakeQuery field, kind, SI factor, words for messages).
UNIT_FIELDS = {
    'area_min_um2': ('area_min', AREA, UM2, 'area min'), 'area_max_um2': ('area_max', AREA, UM2, 'area max'),
    'max_distance_um': ('max_distance', LENGTH, UM, 'within'),
    'thickness_nm_min': ('thickness_nm_min', THICKNESS, 1.0, 'thickness min'),
    'thickness_nm_max': ('thickness_nm_max', THICKNESS, 1.0, 'thickness max'),
}


def check_flake_id(flake_id: str) -> str:
    if not isinstance(flake_id, str) or not re.match(FLAKE_ID_PATTERN, flake_id):
        raise RegistryError(INVALID_ARGUMENT, f'flake id must be 1-64 letters, digits or _.-, got {flake_id!r}')
    return flake_id


def check_name(name: str, what: str) -> str:
    """A scan, chip or report name: letters, digits and _.- only, never '.' or '..'."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or set(name) == {'.'}:
        raise RegistryError(INVALID_ARGUMENT, f'{what} must be 1-128 letters, digits or _.-, got {name!r}')
    return name


def browser_query(params: QueryParams, default_limit: int = DEFAULT_LIMIT // 2) -> tuple[FlakeQuery, dict[str, Any]]:
    """The browser's filters (display units) as a validated FlakeQuery, and the form values to show again."""
    form: dict[str, Any] = {'limit': default_limit, 'sort_by': 'score'}
    values: dict[str, Any] = {}
    shown: dict[str, float] = {}
    for key in params.keys():
        many = params.getlist(key)
        if key in LIST_FIELDS:
            form[key] = [v for v in many if v]
            values[key] = ','.join(form[key])
            continue
        if key == 'page':
            continue
        if len(many) > 1:
            raise RegistryError(INVALID_ARGUMENT, f'{key} is given {len(many)} times')
        text = many[0]
        form[key] = text
        if key in UNIT_FIELDS:
            name, kind, factor, words = UNIT_FIELDS[key]
            value = parse_quantity(text, kind, words)
            if value is not None:
                if value < 0:
                    raise RegistryError(INVALID_RANGE, f'{words} must be >= 0 {kind.unit}, got {text!r}')
                shown[key] = value
                values[name] = value * factor
        elif key == 'near_um':
            point = parse_point(text, 'near')
            if point is not None:
                values['near'] = (point[0] * UM, point[1] * UM)
        else:
            values[key] = text
    for low, high in (('area_min_um2', 'area_max_um2'), ('thickness_nm_min', 'thickness_nm_max')):
        if low in shown and high in shown and shown[low] > shown[high]:
            unit = UNIT_FIELDS[low][1].unit
            raise RegistryError(INVALID_RANGE, f'{UNIT_FIELDS[low][3]} {shown[low]:g} {unit} is above '
                                               f'{UNIT_FIELDS[high][3]} {shown[high]:g} {unit}')
    if 'max_distance_um' in shown and 'near' not in values:
        raise RegistryError(INVALID_ARGUMENT, 'within [µm] needs a point: fill in "near x, y"')
    if shown.get('max_distance_um') == 0:
        raise RegistryError(INVALID_RANGE, 'within must be more than 0 µm')
    page_text = (params.get('page', '1') or '1').strip()
    if not page_text.isdigit() or not 1 <= int(page_text) <= MAX_PAGE:
        raise RegistryError(INVALID_RANGE, f'page must be a whole number from 1 to {MAX_PAGE}, got {page_text!r}')
    values.setdefault('limit', form['limit'])
    query = FlakeQuery.from_mapping(values)
    query = FlakeQuery.from_mapping({**values, 'offset': (int(page_text) - 1) * query.limit})
    form['page'] = int(page_text)
    form.setdefault('layer_classes', [])
    form.setdefault('statuses', [])
    return query, form


# -- JSON bodies ---------------------------------------------------------------------------------


class StackLayerIn(BaseModel):
    model_config = ConfigDict(extra='forbid')
    flake_id: str = Field(pattern=FLAKE_ID_PATTERN)
    rotation_deg: float = Field(0.0, ge=-360.0, le=360.0)
    offset_x_um: float = Field(0.0, ge=-1000.0, le=1000.0)
    offset_y_um: float = Field(0.0, ge=-1000.0, le=1000.0)

    def to_layer(self) -> stacks.StackLayer:
        return stacks.StackLayer(flake_id=self.flake_id, rotation=math.radians(self.rotation_deg),
                                 offset_x=self.offset_x_um * UM, offset_y=self.offset_y_um * UM)


class StackPreviewIn(BaseModel):
    model_config = ConfigDict(extra='forbid')
    layers: list[StackLayerIn] = Field(min_length=1, max_length=stacks.MAX_LAYERS)


class StackIn(StackPreviewIn):
    name: str = Field(min_length=1, max_length=80, pattern=stacks.NAME_PATTERN.pattern)
    robot_id: str = Field('', max_length=ROBOT_ID_MAX)
    lease_s: float = Field(0.0, ge=0.0, le=7 * 86400.0)
    reserve: bool = True

    @field_validator('robot_id')
    @classmethod
    def _robot(cls, value: str) -> str:
        if value:
            try:
                check_robot_id(value)
            except RegistryError as refused:
                raise ValueError(refused.message) from None
        return value


class LabelItemIn(BaseModel):
    """One label (``verdict:material:layer_class``) on a flake or a candidate crop."""

    model_config = ConfigDict(extra='forbid')
    verdict: str = Field(max_length=16)
    material: str = Field(max_length=32)
    layer_class: str | int
    flake_id: str = Field('', max_length=64)
    crop_path: str = Field('', max_length=512)


class LabelIn(LabelItemIn):
    """One label and who gave it."""

    who: str = Field(min_length=1, max_length=WHO_MAX)


class LabelBatchIn(BaseModel):
    """Several labels from the keyboard-driven grid, by one labeller."""

    model_config = ConfigDict(extra='forbid')
    who: str = Field(min_length=1, max_length=WHO_MAX)
    items: list[LabelItemIn] = Field(min_length=1, max_length=200)


class ControlIn(BaseModel):
    """Who undoes or changes something, and why (kept in the registry's history)."""

    model_config = ConfigDict(extra='forbid')
    who: str = Field(min_length=1, max_length=WHO_MAX)
    note: str = Field('', max_length=NOTE_MAX)


class RetrainIn(BaseModel):
    model_config = ConfigDict(extra='forbid')
    who: str = Field(min_length=1, max_length=WHO_MAX)
    target: str = Field(min_length=1, max_length=64)

"""Validated flake filters and the SQL they become.

One ``FlakeQuery`` is what the ROS service, the command line and a web front end
build from their own inputs; ``validate`` turns bad input into a ``RegistryError``
with a machine-readable code, and ``FlakeStore.query`` runs it. Every filter maps
to an indexed column or to the spatial index so that queries stay fast on a
registry of hundreds of thousands of flakes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
import math
from typing import Any

from flake_core.materials import LAYER_CLASS_NAMES, MATERIAL_NAMES
from flake_registry.database import box_overlap_sql

# Codes shared with the service definitions in flake_msgs/srv (same strings).
UNKNOWN_ID = 'UNKNOWN_ID'
INVALID_RANGE = 'INVALID_RANGE'
INVALID_ARGUMENT = 'INVALID_ARGUMENT'
ALREADY_RESERVED = 'ALREADY_RESERVED'
ALREADY_USED = 'ALREADY_USED'
NOT_RESERVED = 'NOT_RESERVED'
WRONG_TOKEN = 'WRONG_TOKEN'
LEASE_EXPIRED = 'LEASE_EXPIRED'
INTERNAL_ERROR = 'INTERNAL_ERROR'
DEGENERATE = 'DEGENERATE'                      # wafer-frame corners that define no frame

LAYER_NAMES = tuple(LAYER_CLASS_NAMES[value] for value in sorted(LAYER_CLASS_NAMES))
STATUS_CANDIDATE, STATUS_AVAILABLE, STATUS_RESERVED, STATUS_USED, STATUS_REJECTED = range(5)
STATUS_NAMES = ('candidate', 'available', 'reserved', 'used', 'rejected')

SORT_KEYS = ('score', 'area', 'distance', 'thickness', 'created', 'layers')
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class RegistryError(Exception):
    """A refused request: ``code`` is one of the constants above, ``message`` says why."""

    def __init__(self, code: str, message: str, flake_id: str = ''):
        super().__init__(f'{code}: {message}')
        self.code = code
        self.message = message
        self.flake_id = flake_id


def parse_status(value: int | str) -> int:
    """A status number from its number or name ('available', 'reserved', ...)."""
    if isinstance(value, str) and not value.strip().isdigit():
        name = value.strip().lower()
        if name not in STATUS_NAMES:
            raise RegistryError(INVALID_ARGUMENT, f'unknown status {value!r}; one of {list(STATUS_NAMES)}')
        return STATUS_NAMES.index(name)
    number = int(value)
    if not 0 <= number < len(STATUS_NAMES):
        raise RegistryError(INVALID_ARGUMENT, f'status must be 0..{len(STATUS_NAMES) - 1}, got {number}')
    return number


def parse_layer_class(value: int | str) -> int:
    """A layer class number from its number or name ('mono', 'few', ...)."""
    if isinstance(value, str) and not value.strip().isdigit():
        name = value.strip().lower()
        if name not in LAYER_NAMES:
            raise RegistryError(INVALID_ARGUMENT, f'unknown layer class {value!r}; one of {list(LAYER_NAMES)}')
        return LAYER_NAMES.index(name)
    number = int(value)
    if not 0 <= number < len(LAYER_NAMES):
        raise RegistryError(INVALID_ARGUMENT, f'layer class must be 0..{len(LAYER_NAMES) - 1}, got {number}')
    return number


# The status a client sees: a live (unexpired) reservation makes a flake RESERVED.
# `live` is the LEFT JOIN of the flake's unexpired, unended reservation.
EFFECTIVE_STATUS_SQL = (f'CASE WHEN f.status IN ({STATUS_USED}, {STATUS_REJECTED}) THEN f.status '
                        f'WHEN live.flake_pk IS NOT NULL THEN {STATUS_RESERVED} ELSE f.status END')
LIVE_RESERVATION_JOIN = ('LEFT JOIN reservations AS live ON live.flake_pk = f.pk '
                         'AND live.ended IS NULL AND live.expires > :now')


@dataclass(frozen=True)
class FlakeQuery:
    """A search of the registry. ``None`` or empty means "no constraint".

    Lengths are metres, areas square metres, thicknesses nanometres (as on the
    topics). ``region`` is (min_x, min_y, max_x, max_y) in the wafer frame and keeps
    flakes whose centre lies inside it; ``near`` with ``max_distance`` keeps flakes
    whose centre is within that distance. ``ascending=None`` sorts largest first,
    except by distance, which sorts nearest first.
    """

    materials: tuple[str, ...] = ()
    chip_id: str = ''
    scan_id: str = ''
    layer_classes: tuple[int, ...] = ()
    layers_min: float | None = None
    layers_max: float | None = None
    thickness_nm_min: float | None = None
    thickness_nm_max: float | None = None
    area_min: float | None = None
    area_max: float | None = None
    min_score: float | None = None
    min_homogeneity: float | None = None
    statuses: tuple[int, ...] = ()
    region: tuple[float, float, float, float] | None = None
    near: tuple[float, float] | None = None
    max_distance: float | None = None
    revisited: bool | None = None
    sort_by: str = 'score'
    ascending: bool | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    flake_ids: tuple[str, ...] = field(default=())

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FlakeQuery:
        """Build from loosely typed input (command line, web form): names or numbers, lists or CSV."""
        def as_tuple(value: Any) -> tuple[Any, ...]:
            if value is None or value == '':
                return ()
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(',') if v.strip())
            return tuple(value)

        def as_float(name: str) -> float | None:
            value = values.get(name)
            if value is None or value == '':
                return None
            try:
                return float(value)
            except (TypeError, ValueError):
                raise RegistryError(INVALID_ARGUMENT, f'{name} must be a number, got {value!r}') from None

        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known - {'material'}
        if unknown:
            raise RegistryError(INVALID_ARGUMENT, f'unknown filter(s): {sorted(unknown)}')
        materials = as_tuple(values.get('materials')) + as_tuple(values.get('material'))
        kwargs: dict[str, Any] = {
            'materials': materials,
            'chip_id': str(values.get('chip_id') or ''),
            'scan_id': str(values.get('scan_id') or ''),
            'layer_classes': tuple(parse_layer_class(v) for v in as_tuple(values.get('layer_classes'))),
            'statuses': tuple(parse_status(v) for v in as_tuple(values.get('statuses'))),
            'flake_ids': as_tuple(values.get('flake_ids')),
            'sort_by': str(values.get('sort_by') or 'score'),
        }
        for name in ('layers_min', 'layers_max', 'thickness_nm_min', 'thickness_nm_max', 'area_min',
                     'area_max', 'min_score', 'min_homogeneity', 'max_distance'):
            kwargs[name] = as_float(name)
        for name in ('region', 'near'):
            numbers = as_tuple(values.get(name))
            if numbers:
                try:
                    kwargs[name] = tuple(float(v) for v in numbers)
                except ValueError:
                    raise RegistryError(INVALID_ARGUMENT, f'{name} must be numbers, got {numbers!r}') from None
        for name in ('ascending', 'revisited'):
            flag = values.get(name)
            if isinstance(flag, str):
                flag = flag.strip().lower() in ('1', 'true', 'yes', 'asc')
            kwargs[name] = flag
        for name, default in (('limit', DEFAULT_LIMIT), ('offset', 0)):
            count = values.get(name)
            try:
                kwargs[name] = default if count is None or count == '' else int(count)
            except (TypeError, ValueError):
                raise RegistryError(INVALID_ARGUMENT, f'{name} must be an integer, got {count!r}') from None
        return cls(**kwargs).validated()

    def validated(self) -> FlakeQuery:
        """This query with normalised names; raises RegistryError for impossible or malformed filters."""
        materials = tuple(m.strip().lower() for m in self.materials)
        for material in materials:
            if material not in MATERIAL_NAMES:
                raise RegistryError(INVALID_ARGUMENT, f'unknown material {material!r}; one of {list(MATERIAL_NAMES)}')
        for layer_class in self.layer_classes:
            parse_layer_class(layer_class)
        for status in self.statuses:
            parse_status(status)
        numbers = {name: getattr(self, name) for name in (
            'layers_min', 'layers_max', 'thickness_nm_min', 'thickness_nm_max', 'area_min', 'area_max',
            'min_score', 'min_homogeneity', 'max_distance')}
        for name, value in numbers.items():
            if value is not None and not math.isfinite(value):
                raise RegistryError(INVALID_ARGUMENT, f'{name} must be finite, got {value}')
            if value is not None and value < 0:
                raise RegistryError(INVALID_RANGE, f'{name} must be >= 0, got {value}')
        for low, high in (('layers_min', 'layers_max'), ('thickness_nm_min', 'thickness_nm_max'),
                          ('area_min', 'area_max')):
            if numbers[low] is not None and numbers[high] is not None and numbers[low] > numbers[high]:
                raise RegistryError(INVALID_RANGE, f'{low} {numbers[low]} is above {high} {numbers[high]}')
        for name in ('min_score', 'min_homogeneity'):
            if numbers[name] is not None and numbers[name] > 1:
                raise RegistryError(INVALID_RANGE, f'{name} must be in [0, 1], got {numbers[name]}')
        if self.region is not None:
            if len(self.region) != 4 or not all(math.isfinite(v) for v in self.region):
                raise RegistryError(INVALID_ARGUMENT, 'region needs four finite numbers min_x, min_y, max_x, max_y')
            min_x, min_y, max_x, max_y = self.region
            if min_x > max_x or min_y > max_y:
                raise RegistryError(INVALID_RANGE, f'region minimum ({min_x}, {min_y}) is above its maximum '
                                                   f'({max_x}, {max_y})')
        if self.near is not None and (len(self.near) != 2 or not all(math.isfinite(v) for v in self.near)):
            raise RegistryError(INVALID_ARGUMENT, 'near needs two finite numbers x, y')
        if self.max_distance is not None and self.max_distance <= 0:
            raise RegistryError(INVALID_RANGE, f'max_distance must be > 0, got {self.max_distance}')
        if self.max_distance is not None and self.near is None:
            raise RegistryError(INVALID_ARGUMENT, 'max_distance needs a point `near`')
        if self.sort_by not in SORT_KEYS:
            raise RegistryError(INVALID_ARGUMENT, f'unknown sort key {self.sort_by!r}; one of {list(SORT_KEYS)}')
        if not 1 <= self.limit <= MAX_LIMIT:
            raise RegistryError(INVALID_RANGE, f'limit must be in 1..{MAX_LIMIT}, got {self.limit}')
        if self.offset < 0:
            raise RegistryError(INVALID_RANGE, f'offset must be >= 0, got {self.offset}')
        return replace(self, materials=materials, layer_classes=tuple(int(v) for v in self.layer_classes),
                       statuses=tuple(int(v) for v in self.statuses))

    def filters_only_chip(self) -> bool:
        """True when nothing but ``chip_id`` (or nothing at all) narrows the matches."""
        return self == FlakeQuery(chip_id=self.chip_id, sort_by=self.sort_by, ascending=self.ascending,
                                  limit=self.limit, offset=self.offset, near=self.near)

    def where_sql(self, now: float, dialect: str = 'sqlite') -> tuple[str, dict[str, Any]]:
        """The WHERE clause (without the keyword) and its named parameters, for SQLite or PostgreSQL."""
        clauses: list[str] = []
        params: dict[str, Any] = {'now': now}

        def add_in(column: str, values: tuple[Any, ...], prefix: str) -> None:
            names = []
            for i, value in enumerate(values):
                params[f'{prefix}{i}'] = value
                names.append(f':{prefix}{i}')
            clauses.append(f'{column} IN ({", ".join(names)})')

        if self.materials:
            add_in('f.material', self.materials, 'material')
        if self.layer_classes:
            add_in('f.layer_class', self.layer_classes, 'layer_class')
        if self.flake_ids:
            add_in('f.id', self.flake_ids, 'flake_id')
        if self.chip_id:
            clauses.append('f.chip_id = :chip_id')
            params['chip_id'] = self.chip_id
        if self.scan_id:
            clauses.append('f.pk IN (SELECT flake_pk FROM observations WHERE scan_id = :scan_id)')
            params['scan_id'] = self.scan_id
        for column, low, high in (('layers', self.layers_min, self.layers_max),
                                  ('thickness_nm', self.thickness_nm_min, self.thickness_nm_max),
                                  ('area', self.area_min, self.area_max)):
            if low:
                clauses.append(f'f.{column} >= :{column}_min')
                params[f'{column}_min'] = low
            if high is not None:
                clauses.append(f'f.{column} <= :{column}_max')
                params[f'{column}_max'] = high
        if self.min_score:
            clauses.append('f.score >= :min_score')
            params['min_score'] = self.min_score
        if self.min_homogeneity:
            clauses.append('f.homogeneity >= :min_homogeneity')
            params['min_homogeneity'] = self.min_homogeneity
        if self.revisited is not None:
            clauses.append('f.revisited_at IS NOT NULL' if self.revisited else 'f.revisited_at IS NULL')
        box = None
        if self.region is not None:
            box = self.region
            clauses.append('f.x BETWEEN :region_min_x AND :region_max_x '
                           'AND f.y BETWEEN :region_min_y AND :region_max_y')
            params.update(region_min_x=box[0], region_min_y=box[1], region_max_x=box[2], region_max_y=box[3])
        if self.near is not None:
            params['near_x'], params['near_y'] = self.near
        if self.max_distance is not None and self.near is not None:  # validated: a distance comes with `near`
            x, y = self.near
            r = self.max_distance
            disc = (x - r, y - r, x + r, y + r)
            box = disc if box is None else (max(box[0], disc[0]), max(box[1], disc[1]),
                                            min(box[2], disc[2]), min(box[3], disc[3]))
            clauses.append('(f.x - :near_x) * (f.x - :near_x) + (f.y - :near_y) * (f.y - :near_y) '
                           '<= :max_distance_sq')
            params['max_distance_sq'] = r * r
        if box is not None:
            # A flake's centre lies inside its bounding box, so every flake whose centre
            # is in `box` has a box that intersects it: a spatial index lookup, not a scan,
            # on the chip asked for (the chip is a dimension of the index).
            chip_key = '(SELECT chip_key FROM chips WHERE id = :chip_id)' if self.chip_id else None
            overlap = box_overlap_sql(dialect, '', ':box_min_x', ':box_min_y', ':box_max_x', ':box_max_y', chip_key)
            clauses.append(f'f.pk IN (SELECT id FROM flake_boxes WHERE {overlap})')
            params.update(box_min_x=box[0], box_min_y=box[1], box_max_x=box[2], box_max_y=box[3])
        if self.statuses:
            names = []
            for i, status in enumerate(self.statuses):
                params[f'status{i}'] = status
                names.append(f':status{i}')
            clauses.append(f'({EFFECTIVE_STATUS_SQL}) IN ({", ".join(names)})')
        return (' AND '.join(clauses) or '1 = 1'), params

    def sort_key_sql(self) -> tuple[str, str]:
        """The SQL expression the answer is sorted by, and 'ASC' or 'DESC'."""
        ascending = self.ascending
        if ascending is None:
            ascending = self.sort_by == 'distance'
        direction = 'ASC' if ascending else 'DESC'
        if self.sort_by == 'distance':
            if self.near is None:
                raise RegistryError(INVALID_ARGUMENT, 'sorting by distance needs a point `near`')
            key = '(f.x - :near_x) * (f.x - :near_x) + (f.y - :near_y) * (f.y - :near_y)'
        else:
            key = {'score': 'f.score', 'area': 'f.area', 'thickness': 'f.thickness_nm',
                   'created': 'f.pk', 'layers': 'f.layers'}[self.sort_by]  # pk: insertion order
        return key, direction

    def order_sql(self) -> str:
        key, direction = self.sort_key_sql()
        # pk breaks ties so that paging with offset is stable.
        return f'{key} {direction}, f.pk {direction}'

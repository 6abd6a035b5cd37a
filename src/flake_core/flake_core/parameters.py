"""One schema per node, as generate_parameter_library gives C++ nodes: a frozen dataclass whose
fields are the node's parameters.

    @dataclass(frozen=True)
    class StageNodeParameters:
        timeout: float = param(0.2, 'time to wait for one reply before retrying [s]', minimum=0.01, maximum=10.0)

From the one class come the declared ROS parameters with their descriptors and validation
(``flake_core.node_tools.declare_parameters``), the typed, frozen view the node's code reads
(``self.params.timeout``), the YAML check (``check_overrides``: an undeclared key, a wrong type or
a value out of range is an error) and the tables of docs/parameters.md (``markdown_table``).
YAML files under config/ hold only what differs from these defaults.

No rclpy here: schemas import anywhere (docs, tests, command-line tools).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
import math
from pathlib import Path
from typing import Any, TypeVar

import yaml

_METADATA_KEY = 'flake_parameter'
Schema = TypeVar('Schema')


@dataclass(frozen=True)
class Param:
    """A node parameter: default, description, and the constraints it is validated against."""

    name: str
    default: Any
    description: str
    minimum: float | int | None = None
    maximum: float | int | None = None
    choices: Sequence[Any] | None = None
    read_only: bool = False
    validator: Callable[[Any], str | None] | None = None  # returns an error text or None

    def check(self, value: Any) -> str | None:
        """The reason ``value`` is refused, or None."""
        type_error = _type_error(self.name, self.default, value)
        if type_error is not None:
            return type_error
        if isinstance(value, float) and not math.isfinite(value):
            return f'{self.name} must be finite, got {value}'
        if self.minimum is not None and value < self.minimum:
            return f'{self.name} must be >= {self.minimum}, got {value}'
        if self.maximum is not None and value > self.maximum:
            return f'{self.name} must be <= {self.maximum}, got {value}'
        if self.choices is not None and value not in self.choices:
            return f'{self.name} must be one of {list(self.choices)}, got {value!r}'
        if self.validator is not None:
            return self.validator(value)
        return None


def _type_error(name: str, default: Any, value: Any) -> str | None:
    """ROS parameters keep the type of their default; a YAML ``0`` for a float is refused at launch."""
    expected = type(default)
    if expected is list:
        ok = isinstance(value, list | tuple)
    elif expected is float:
        ok = isinstance(value, float)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if ok:
        return None
    hint = ' (write it with a decimal point)' if expected is float and isinstance(value, int) else ''
    return f'{name} must be of type {expected.__name__}, got {value!r}{hint}'


def param(default: Any, description: str, *, minimum: float | int | None = None,
          maximum: float | int | None = None, choices: Sequence[Any] | None = None, read_only: bool = False,
          validator: Callable[[Any], str | None] | None = None) -> Any:
    """A schema field: the parameter's default, its description and its constraints."""
    spec = {'default': default, 'description': description, 'minimum': minimum, 'maximum': maximum,
            'choices': tuple(choices) if choices is not None else None, 'read_only': read_only,
            'validator': validator}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={_METADATA_KEY: spec})
    return field(default=default, metadata={_METADATA_KEY: spec})


def schema_params(schema: type) -> list[Param]:
    """The parameters a schema class declares, in field order."""
    if not is_dataclass(schema):
        raise TypeError(f'{schema!r} is not a parameter schema (a dataclass of param() fields)')
    params = []
    for item in fields(schema):
        spec = item.metadata.get(_METADATA_KEY)
        if spec is None:
            raise TypeError(f'{schema.__name__}.{item.name} is not declared with param()')
        params.append(Param(item.name, **spec))
    return params


def defaults(schema: type) -> dict[str, Any]:
    return {p.name: p.default for p in schema_params(schema)}


def view(schema: type[Schema], values: Mapping[str, Any] | None = None) -> Schema:
    """The frozen view of ``schema`` with ``values`` over its defaults; ValueError naming what is wrong."""
    errors = check_overrides(schema, values or {})
    if errors:
        raise ValueError('invalid parameter: ' + '; '.join(errors))
    return schema(**{**defaults(schema), **dict(values or {})})


def updated(current: Schema, changes: Mapping[str, Any]) -> Schema:
    """``current`` with ``changes`` applied (already validated)."""
    return replace(current, **dict(changes))  # type: ignore[type-var]


def check_overrides(schema: type, overrides: Mapping[str, Any]) -> list[str]:
    """Why each of ``overrides`` would be refused by a node of ``schema`` (empty when all are fine)."""
    by_name = {p.name: p for p in schema_params(schema)}
    errors = []
    for name, value in overrides.items():
        spec = by_name.get(name)
        if spec is None:
            errors.append(f'{name} is not a parameter of {schema.__name__} (known: {", ".join(by_name)})')
            continue
        error = spec.check(value)
        if error is not None:
            errors.append(error)
    return errors


def _cell(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')


def _constraints(p: Param) -> str:
    parts = []
    if p.minimum is not None or p.maximum is not None:
        low = '' if p.minimum is None else f'{p.minimum:g}'
        high = '' if p.maximum is None else f'{p.maximum:g}'
        parts.append(f'{low} .. {high}')
    if p.choices is not None:
        parts.append('one of ' + ', '.join(f'`{c}`' for c in p.choices))
    if p.validator is not None:
        parts.append('checked')
    if p.read_only:
        parts.append('read-only')
    return '; '.join(parts)


def markdown_table(schema: type) -> str:
    """A Markdown table of a schema: name, type, default, constraints, description."""
    lines = ['| parameter | type | default | constraints | description |', '|---|---|---|---|---|']
    for p in schema_params(schema):
        default = repr(p.default) if isinstance(p.default, str) else str(p.default).lower() \
            if isinstance(p.default, bool) else str(p.default)
        lines.append(f'| `{p.name}` | {type(p.default).__name__} | `{_cell(default)}` | '
                     f'{_cell(_constraints(p))} | {_cell(p.description)} |')
    return '\n'.join(lines)


def load_overrides(paths: Sequence[Path | str], node: str) -> dict[str, Any]:
    """``node``'s ros__parameters merged from YAML parameter files, later files overriding earlier
    ones; files that do not exist are skipped. Keys as ROS reads them: ``/**`` (every node),
    ``node``, ``/node`` and ``/**/node`` (the node in any namespace, the form config/ uses)."""
    merged: dict[str, Any] = {}
    for path in map(Path, paths):
        if not path.exists():
            continue
        content = yaml.safe_load(path.read_text()) or {}
        for key in ('/**', node, f'/{node}', f'/**/{node}'):
            section = content.get(key, {})
            merged.update(section.get('ros__parameters', {}) if isinstance(section, dict) else {})
    return merged


def overrides_by_node(path: Path | str) -> dict[str, dict[str, Any]]:
    """Every node section of one parameter file: node name -> its ros__parameters."""
    content = yaml.safe_load(Path(path).read_text()) or {}
    return {key.rstrip('/').split('/')[-1]: (section or {}).get('ros__parameters', {})
            for key, section in content.items()}

"""Stack recipes: van der Waals stacks planned from registry flakes, for the assembly robot.

A recipe is an ordered list of layers (bottom first), each a flake with the rotation
to apply when it is picked up and an optional offset of its centre in the stack. The
lab plans it in the web app; the robot fetches it over ROS 2 (GetStackRecipe).

Recipes live in the registry, in the ``stack_recipes`` table (schema migration 5).
Reserving a recipe takes the registry's reservation path for every layer inside one
write transaction (``FlakeStore.transaction``) that also records the tokens in the
recipe: all layers are reserved and the recipe says so, or nothing changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
import json
import math
import re
import secrets
from typing import Any

from flake_registry.query import INVALID_ARGUMENT, LAYER_NAMES, UNKNOWN_ID, RegistryError
from flake_registry.reservations import check_robot_id, reserve_in
from flake_registry.stack_geometry import place_outline, stack_overlap
from flake_registry.store import FlakeStore

MAX_LAYERS = 12
MAX_OFFSET = 1e-3                               # [m]; a stack is a few hundred micrometres across
NAME_PATTERN = re.compile(r'^[A-Za-z0-9_.:/ +\-]{1,80}$')
RECIPE_ID_PATTERN = re.compile(r'^S[0-9a-f]{12}$')


@dataclass
class StackLayer:
    flake_id: str
    rotation: float = 0.0                       # [rad], counter-clockwise
    offset_x: float = 0.0                       # [m], centre of this layer in the stack frame
    offset_y: float = 0.0
    # Filled from the registry when the recipe is saved:
    chip_id: str = ''
    material: str = ''
    layer_class: int = 0
    x: float = 0.0                              # flake centre, wafer frame of its chip [m]
    y: float = 0.0
    token: str = ''


@dataclass
class StackRecipe:
    id: str
    name: str
    created: float
    created_by: str = ''
    robot_id: str = ''
    reserved_at: float | None = None
    lease_expires: float | None = None
    layers: list[StackLayer] = field(default_factory=list)

    def as_dict(self, include_tokens: bool = False) -> dict[str, Any]:
        """The exported recipe: flake ids, wafer positions, rotations, order (bottom first)."""
        layers = []
        for index, layer in enumerate(self.layers):
            entry = {'index': index, 'flake_id': layer.flake_id, 'chip_id': layer.chip_id,
                     'material': layer.material, 'layer_class': LAYER_NAMES[layer.layer_class],
                     'wafer_position_m': [layer.x, layer.y], 'rotation_rad': layer.rotation,
                     'rotation_deg': math.degrees(layer.rotation),
                     'offset_m': [layer.offset_x, layer.offset_y]}
            if include_tokens:
                entry['token'] = layer.token
            layers.append(entry)
        return {'id': self.id, 'name': self.name, 'created': self.created, 'created_by': self.created_by,
                'robot_id': self.robot_id, 'reserved_at': self.reserved_at, 'lease_expires': self.lease_expires,
                'order': 'bottom_first', 'layers': layers}


def check_layers(layers: Sequence[StackLayer]) -> None:
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise RegistryError(INVALID_ARGUMENT, f'a stack needs 1..{MAX_LAYERS} layers, got {len(layers)}')
    ids = [layer.flake_id for layer in layers]
    if len(set(ids)) != len(ids):
        raise RegistryError(INVALID_ARGUMENT, 'a flake appears twice in the stack')
    for layer in layers:
        for name in ('rotation', 'offset_x', 'offset_y'):
            if not math.isfinite(getattr(layer, name)):
                raise RegistryError(INVALID_ARGUMENT, f'{name} of {layer.flake_id} must be finite')
        if abs(layer.rotation) > 2 * math.pi + 1e-9:
            raise RegistryError(INVALID_ARGUMENT, f'rotation of {layer.flake_id} must be within ±2π rad')
        if max(abs(layer.offset_x), abs(layer.offset_y)) > MAX_OFFSET:
            raise RegistryError(INVALID_ARGUMENT, f'offset of {layer.flake_id} is above {MAX_OFFSET} m')


def preview(store: FlakeStore, layers: Sequence[StackLayer]) -> dict[str, Any]:
    """Outlines of the layers in the stack frame [m] and how much each covers the others."""
    check_layers(layers)
    outlines, described = [], []
    for layer in layers:
        flake = store.get_flake(layer.flake_id).flake
        contour = flake.contour
        if len(contour) < 3:
            # No outline stored: a square of the flake's area stands in for it.
            half = math.sqrt(max(flake.area, 1e-14)) / 2
            contour = [(flake.x - half, flake.y - half), (flake.x + half, flake.y - half),
                       (flake.x + half, flake.y + half), (flake.x - half, flake.y + half)]
        outline = place_outline(contour, (flake.x, flake.y), layer.rotation, (layer.offset_x, layer.offset_y))
        outlines.append(outline)
        described.append({'flake_id': flake.id, 'material': flake.material,
                          'layer_class': LAYER_NAMES[flake.layer_class], 'status': flake.status,
                          'thickness_nm': flake.thickness_nm, 'area': flake.area,
                          'rotation': layer.rotation, 'outline': outline.tolist()})
    overlap = stack_overlap(outlines)
    return {'layers': described, 'overlap': overlap.as_dict()}


def save_recipe(store: FlakeStore, name: str, layers: Sequence[StackLayer], created_by: str = '') -> StackRecipe:
    """Store a recipe with each layer's flake as the registry knows it now; raises UNKNOWN_ID."""
    name = (name or '').strip()
    if not NAME_PATTERN.match(name):
        raise RegistryError(INVALID_ARGUMENT, 'name must be 1-80 letters, digits, spaces or _.:/+-')
    check_layers(layers)
    filled = []
    for layer in layers:
        flake = store.get_flake(layer.flake_id).flake
        filled.append(StackLayer(flake_id=flake.id, rotation=float(layer.rotation), offset_x=float(layer.offset_x),
                                 offset_y=float(layer.offset_y), chip_id=flake.chip_id, material=flake.material,
                                 layer_class=int(flake.layer_class), x=flake.x, y=flake.y))
    recipe = StackRecipe(id='S' + secrets.token_hex(6), name=name, created=store.clock(),
                         created_by=created_by, layers=filled)
    with store.transaction() as tx:
        tx.execute('INSERT INTO stack_recipes (id, name, created, created_by, layers) VALUES (?, ?, ?, ?, ?)',
                   (recipe.id, recipe.name, recipe.created, created_by, _layers_json(filled)))
    return recipe


def _layers_json(layers: Sequence[StackLayer]) -> str:
    return json.dumps([asdict(layer) for layer in layers])


def _from_row(row) -> StackRecipe:
    layers = [StackLayer(**entry) for entry in json.loads(row['layers'])]
    return StackRecipe(id=row['id'], name=row['name'], created=row['created'], created_by=row['created_by'] or '',
                       robot_id=row['robot_id'] or '', reserved_at=row['reserved_at'],
                       lease_expires=row['lease_expires'], layers=layers)


def check_recipe_id(recipe_id: str) -> str:
    if not isinstance(recipe_id, str) or not RECIPE_ID_PATTERN.match(recipe_id):
        raise RegistryError(INVALID_ARGUMENT, f'recipe id must look like S0123456789ab, got {recipe_id!r}')
    return recipe_id


def get_recipe(store: FlakeStore, recipe_id: str) -> StackRecipe:
    check_recipe_id(recipe_id)
    with store.snapshot() as tx:
        row = tx.one('SELECT * FROM stack_recipes WHERE id = ?', (recipe_id,))
    if row is None:
        raise RegistryError(UNKNOWN_ID, f'no stack recipe {recipe_id!r}')
    return _from_row(row)


def list_recipes(store: FlakeStore, limit: int = 100) -> list[StackRecipe]:
    with store.snapshot() as tx:
        rows = tx.all('SELECT * FROM stack_recipes ORDER BY created DESC LIMIT ?', (int(limit),))
    return [_from_row(r) for r in rows]


def reserve_recipe(store: FlakeStore, recipe_id: str, robot_id: str, lease_s: float = 0.0) -> StackRecipe:
    """Reserve every layer's flake for ``robot_id``, all or none, and keep the tokens in the recipe.

    Raises the store's RegistryError (ALREADY_RESERVED, ALREADY_USED, ...) naming the
    first flake that could not be reserved; then no flake of the recipe is reserved.
    """
    check_robot_id(robot_id)
    recipe = get_recipe(store, recipe_id)
    lease_s = store.lease_seconds(lease_s)
    now = store.clock()
    with store.transaction() as tx:
        reservations = reserve_in(tx, [layer.flake_id for layer in recipe.layers], robot_id, lease_s, now)
        for layer, reservation in zip(recipe.layers, reservations, strict=True):
            layer.token = reservation.token
        recipe.robot_id, recipe.reserved_at, recipe.lease_expires = robot_id, now, now + lease_s
        tx.execute('UPDATE stack_recipes SET robot_id = ?, reserved_at = ?, lease_expires = ?, layers = ? '
                   'WHERE id = ?', (robot_id, now, now + lease_s, _layers_json(recipe.layers), recipe.id))
    return recipe

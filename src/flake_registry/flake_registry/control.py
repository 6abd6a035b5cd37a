"""Undo and control by people: release, mark used, unreserve a stack.

The web app and ``flake-registry`` both act through these functions; labels are
withdrawn and corrected through ``flake_registry.labelling``. Every action goes
through the registry's own paths and checks (the reservation token of the live
reservation, the flake's status) inside its transactions, so the registry's history
records it: a released reservation ends with outcome ``released`` and who released it
(``ended_by``: ``web-<name>`` or ``cli-<name>``), a used flake keeps who used it and a
note naming the person, a withdrawn label stays in the labels
table with who withdrew it and when.
"""

from __future__ import annotations

import re
from typing import Any

from flake_registry import labelling, stacks
from flake_registry.query import NOT_RESERVED, RegistryError
from flake_registry.reservations import mark_used_in, reserve_in
from flake_registry.store import FlakeStore

# A flake marked used from the web without a robot's reservation is held this long inside one transaction.
WEB_LEASE_S = 60.0
# Where a person acted (the web app, or flake-registry at a terminal): robot id prefix and wording.
VIA = {'web': ('web', 'in the web app'), 'cli': ('cli', 'with flake-registry')}


def web_robot_id(who: str, via: str = 'web') -> str:
    """The robot id under which a person's own action is recorded: ``web-<name>`` (``cli-<name>``)."""
    name = re.sub(r'[^A-Za-z0-9_.\-]+', '_', labelling.check_who(who)).strip('_') or 'person'
    return f'{VIA[via][0]}-{name}'[:64]


def _live_reservation(store: FlakeStore, flake_id: str) -> dict[str, Any] | None:
    live = store.reservations(flake_id)
    return live[0] if live else None


def release_flake(store: FlakeStore, flake_id: str, who: str, via: str = 'web') -> dict[str, Any]:
    """End the flake's live reservation (a mistaken one, or a robot that gave up); NOT_RESERVED otherwise.

    The reservation ends with outcome ``released`` and ``ended_by`` = ``web-<who>`` (``cli-<who>``).
    """
    labelling.check_who(who)
    live = _live_reservation(store, flake_id)
    if live is None:
        store.get_flake(flake_id)  # UNKNOWN_ID for a flake that does not exist
        raise RegistryError(NOT_RESERVED, f'flake {flake_id} is not reserved; nothing to release', flake_id)
    released = store.release(flake_id, live['token'], ended_by=web_robot_id(who, via))
    return {'flake_id': flake_id, 'released_from': released.robot_id, 'by': who, 'ended_by': released.ended_by}


def mark_flake_used(store: FlakeStore, flake_id: str, who: str, note: str = '', via: str = 'web') -> dict[str, Any]:
    """Take the flake out of the pool for good, as a robot's MarkFlakeUsed does.

    A reserved flake is marked used under its live reservation (the holder is recorded
    as the user); an available one is reserved for ``web-<who>`` and marked used in the
    same transaction, so it is never left reserved.
    """
    labelling.check_who(who)
    text = f'marked used {VIA[via][1]} by {who}' + (f': {note.strip()}' if note.strip() else '')
    live = _live_reservation(store, flake_id)
    robot = web_robot_id(who, via)
    if live is not None:
        used = store.mark_used(flake_id, live['token'], text, ended_by=robot)
        return {'flake_id': flake_id, 'used_by': used.robot_id, 'note': text}
    now = store.clock()
    with store.transaction() as tx:
        reservation = reserve_in(tx, [flake_id], robot, WEB_LEASE_S, now)[0]
        mark_used_in(tx, flake_id, reservation.token, text, now)
    return {'flake_id': flake_id, 'used_by': robot, 'note': text}


def release_stack(store: FlakeStore, recipe_id: str, who: str, via: str = 'web') -> dict[str, Any]:
    """Release every layer the recipe still holds (with the tokens kept in it); layers already used stay used."""
    labelling.check_who(who)
    person = web_robot_id(who, via)
    recipe = stacks.get_recipe(store, recipe_id)
    released, kept = [], []
    for layer in recipe.layers:
        if not layer.token:
            kept.append({'flake_id': layer.flake_id, 'why': 'never reserved by this recipe'})
            continue
        try:
            store.release(layer.flake_id, layer.token, ended_by=person)
            released.append(layer.flake_id)
        except RegistryError as refused:
            kept.append({'flake_id': layer.flake_id, 'why': f'{refused.code}: {refused.message}'})
    if not released:
        raise RegistryError(NOT_RESERVED, f'recipe {recipe_id} holds no reservation any more '
                                          f'({"; ".join(k["why"] for k in kept)})')
    return {'recipe_id': recipe_id, 'released': released, 'kept': kept, 'by': who}


def recipe_state(store: FlakeStore, recipe: stacks.StackRecipe) -> dict[str, Any]:
    """How many of the recipe's layers it still holds, and how many were used."""
    held = used = 0
    for layer in recipe.layers:
        if not layer.token:
            continue
        live = store.reservations(layer.flake_id)
        if live and live[0]['token'] == layer.token:
            held += 1
        elif any(r['token'] == layer.token and r['outcome'] == 'used'
                 for r in store.reservations(layer.flake_id, live_only=False)):
            used += 1
    return {'held': held, 'used': used, 'layers': len(recipe.layers)}

"""Reservations and leases: never two owners of one flake.

A reservation is an ``INSERT`` inside a write transaction, after the expired
leases of that flake are closed; a partial unique index allows one unended
reservation per flake, so the guarantee holds across processes, not only inside
one. A lease that ran out frees the flake at that moment, evaluated when anybody
next asks: nothing has to run to expire it. Only the holder of a reservation's
random token (``secrets``, 192 bits) can release it or mark the flake used.

These functions work inside a caller's transaction (``FlakeStore.transaction()``),
so that a stack of flakes and the record of its recipe are claimed together or
not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import math
import secrets
from typing import Any

from flake_registry.database import Transaction
from flake_registry.query import (
    ALREADY_RESERVED,
    ALREADY_USED,
    INVALID_ARGUMENT,
    LEASE_EXPIRED,
    NOT_RESERVED,
    STATUS_REJECTED,
    STATUS_USED,
    UNKNOWN_ID,
    WRONG_TOKEN,
    RegistryError,
)
from flake_registry.records import Reservation

# A lease shorter than this cannot cover any pick and place; 1e-9 s was accepted once.
MIN_LEASE_S = 1.0
ROBOT_ID_MAX = 64


@dataclass(frozen=True)
class LeasePolicy:
    default_s: float = 300.0                    # lease when a request asks for 0 s
    max_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if not MIN_LEASE_S <= self.default_s <= self.max_s:
            raise ValueError(f'need {MIN_LEASE_S} <= default_lease_s <= max_lease_s, got {self.default_s}, '
                             f'{self.max_s}')

    def seconds(self, lease_s: float) -> float:
        """The lease a request gets: ``lease_s``, or the default for 0; RegistryError when out of range."""
        if not math.isfinite(lease_s) or lease_s < 0:
            raise RegistryError(INVALID_ARGUMENT, f'lease must be a finite number >= 0 s, got {lease_s}')
        if lease_s > self.max_s:
            raise RegistryError(INVALID_ARGUMENT, f'lease {lease_s} s is above the maximum {self.max_s} s')
        if 0 < lease_s < MIN_LEASE_S:
            raise RegistryError(INVALID_ARGUMENT, f'lease {lease_s:g} s is below the minimum {MIN_LEASE_S:g} s '
                                                  '(0 asks for the default lease)')
        return lease_s or self.default_s


def check_robot_id(robot_id: str) -> str:
    """``robot_id`` when it names a holder: 1-64 printable characters, no spaces."""
    if not robot_id or not robot_id.strip():
        raise RegistryError(INVALID_ARGUMENT, 'robot_id must not be empty or blank')
    if len(robot_id) > ROBOT_ID_MAX or not robot_id.isprintable() or any(c.isspace() for c in robot_id):
        raise RegistryError(INVALID_ARGUMENT, f'robot_id must be 1-{ROBOT_ID_MAX} printable characters without '
                                              f'spaces, got {robot_id[:80]!r}')
    return robot_id


def flake_row(tx: Transaction, flake_id: str, lock: bool = False) -> Mapping[str, Any]:
    """The flake's key and stored status; raises UNKNOWN_ID. ``lock``: hold its row until the commit."""
    if not flake_id:
        raise RegistryError(UNKNOWN_ID, 'flake_id is empty', flake_id)
    row = tx.one(f'SELECT pk, status FROM flakes WHERE id = ?{tx.for_update if lock else ""}', (flake_id,))
    if row is None:
        raise RegistryError(UNKNOWN_ID, f'no flake with id {flake_id!r}', flake_id)
    return row


def check_request(flake_ids: Sequence[str], robot_id: str) -> list[str]:
    check_robot_id(robot_id)
    flake_ids = list(flake_ids)
    if not flake_ids:
        raise RegistryError(INVALID_ARGUMENT, 'no flake ids given')
    if len(set(flake_ids)) != len(flake_ids):
        raise RegistryError(INVALID_ARGUMENT, 'a flake id is given twice')
    return flake_ids


def reserve_in(tx: Transaction, flake_ids: Sequence[str], robot_id: str, lease_s: float,
               now: float) -> list[Reservation]:
    """Reserve every flake of ``flake_ids`` for ``robot_id`` inside ``tx``: all, or a RegistryError.

    ``lease_s`` is the lease already checked by ``LeasePolicy.seconds``. On a refusal
    the caller's transaction must roll back (leaving the ``with`` block by the
    exception does that), so no flake of the set stays reserved.
    """
    flake_ids = check_request(flake_ids, robot_id)
    if tx.for_update:
        # Row locks on every flake of the set, taken in one order (by key) so that two
        # robots claiming overlapping stacks queue instead of deadlocking.
        placeholders = ', '.join('?' * len(flake_ids))
        tx.all(f'SELECT pk FROM flakes WHERE id IN ({placeholders}) ORDER BY pk{tx.for_update}', tuple(flake_ids))
    return [_reserve_one(tx, flake_id, robot_id, lease_s, now) for flake_id in flake_ids]


def _reserve_one(tx: Transaction, flake_id: str, robot_id: str, lease_s: float, now: float) -> Reservation:
    flake = flake_row(tx, flake_id, lock=True)
    if flake['status'] == STATUS_USED:
        raise RegistryError(ALREADY_USED, f'flake {flake_id} was already used', flake_id)
    if flake['status'] == STATUS_REJECTED:
        raise RegistryError(INVALID_ARGUMENT, f'flake {flake_id} is rejected and cannot be reserved', flake_id)
    tx.execute("UPDATE reservations SET ended = expires, outcome = 'expired' "
               'WHERE flake_pk = ? AND ended IS NULL AND expires <= ?', (flake['pk'], now))
    holder = tx.one('SELECT robot_id, expires FROM reservations WHERE flake_pk = ? AND ended IS NULL',
                    (flake['pk'],))
    if holder is not None:
        raise RegistryError(ALREADY_RESERVED, f'flake {flake_id} is reserved by {holder["robot_id"]!r} for '
                                              f'another {holder["expires"] - now:.1f} s', flake_id)
    token = secrets.token_urlsafe(24)
    expires = now + lease_s
    try:
        tx.execute('INSERT INTO reservations (flake_pk, robot_id, token, created, expires) VALUES (?, ?, ?, ?, ?)',
                   (flake['pk'], robot_id, token, now, expires))
    except tx.integrity_error:
        # The unique index is the last word: nobody can hold the flake twice.
        raise RegistryError(ALREADY_RESERVED, f'flake {flake_id} is reserved by another robot', flake_id) from None
    return Reservation(flake_id=flake_id, robot_id=robot_id, token=token, created=now, expires=expires)


def _check_token(tx: Transaction, flake_pk: int, flake_id: str, token: str, now: float,
                 expired_code: str) -> Mapping[str, Any]:
    """The live reservation ``token`` belongs to; raises the code that says why not."""
    live = tx.one('SELECT * FROM reservations WHERE flake_pk = ? AND ended IS NULL', (flake_pk,))
    own = tx.one('SELECT * FROM reservations WHERE flake_pk = ? AND token = ?', (flake_pk, token)) if token else None
    own_expired = own is not None and (own['outcome'] == 'expired' or (own['ended'] is None
                                                                       and own['expires'] <= now))
    if live is not None and live['expires'] > now:
        if own is not None and own['id'] == live['id']:
            return live
        if own_expired:
            raise RegistryError(expired_code, f'the lease on {flake_id} expired and the flake was '
                                              'reserved again', flake_id)
        raise RegistryError(WRONG_TOKEN, f'token does not match the reservation of {flake_id}', flake_id)
    if own is not None and own_expired:
        raise RegistryError(expired_code, f'the lease on {flake_id} expired at {own["expires"]:.3f}', flake_id)
    raise RegistryError(NOT_RESERVED, f'flake {flake_id} is not reserved', flake_id)


def release_in(tx: Transaction, flake_id: str, token: str, now: float, ended_by: str = '') -> Reservation:
    """Give a reservation back before its lease ends.

    ``ended_by``: who gave it back, when not the holder itself (a person releasing a
    robot's reservation, recorded as ``web-<name>`` or ``cli-<name>``); kept in the history.
    """
    flake = flake_row(tx, flake_id, lock=True)
    live = _check_token(tx, flake['pk'], flake_id, token, now, NOT_RESERVED)
    ended_by = ended_by or live['robot_id']
    tx.execute("UPDATE reservations SET ended = ?, outcome = 'released', ended_by = ? WHERE id = ?",
               (now, ended_by, live['id']))
    return Reservation(flake_id=flake_id, robot_id=live['robot_id'], token=token, created=live['created'],
                       expires=now, ended_by=ended_by)


def mark_used_in(tx: Transaction, flake_id: str, token: str, note: str, now: float,
                 ended_by: str = '') -> Reservation:
    """The robot put the flake into a stack: it leaves the pool for good. Needs the live token.

    ``ended_by`` as for ``release_in``: a person who marked a robot's flake used.
    """
    flake = flake_row(tx, flake_id, lock=True)
    if flake['status'] == STATUS_USED:
        raise RegistryError(ALREADY_USED, f'flake {flake_id} was already used', flake_id)
    live = _check_token(tx, flake['pk'], flake_id, token, now, LEASE_EXPIRED)
    ended_by = ended_by or live['robot_id']
    tx.execute("UPDATE reservations SET ended = ?, outcome = 'used', ended_by = ? WHERE id = ?",
               (now, ended_by, live['id']))
    tx.execute('UPDATE flakes SET status = ?, used_by = ?, used_at = ?, used_note = ?, updated = ? WHERE pk = ?',
               (STATUS_USED, live['robot_id'], now, note, now, flake['pk']))
    return Reservation(flake_id=flake_id, robot_id=live['robot_id'], token=token, created=live['created'],
                       expires=now, ended_by=ended_by)


def list_reservations(tx: Transaction, now: float, flake_id: str = '',
                      live_only: bool = True) -> list[dict[str, Any]]:
    """Reservation rows (who, token, lease, outcome, who ended it), live ones only by default."""
    clauses: list[str] = []
    params: dict[str, Any] = {'now': now}
    if live_only:
        clauses.append('r.ended IS NULL AND r.expires > :now')
    if flake_id:
        clauses.append('f.id = :flake_id')
        params['flake_id'] = flake_id
    where = ('WHERE ' + ' AND '.join(clauses)) if clauses else ''
    rows = tx.all('SELECT f.id AS flake_id, r.robot_id, r.token, r.created, r.expires, r.ended, r.outcome, '
                  'r.ended_by '
                  f'FROM reservations r JOIN flakes f ON f.pk = r.flake_pk {where} ORDER BY r.id', params)
    return [dict(row) for row in rows]

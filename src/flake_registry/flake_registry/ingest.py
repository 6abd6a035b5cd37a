"""Ingest and merging: sightings become flakes, or observations of flakes already known.

A sighting matches a known flake of the same chip when their centres are within
``merge_distance`` or their wafer-frame bounding boxes overlap by at least
``merge_iou`` (IoU); candidates come from the spatial index, the best match
(largest overlap, then nearest) wins. The flake keeps the fields of its
highest-scoring sighting. Material is not part of the match: a flake's identity is
its place on the chip.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
import math
from typing import Any
import zlib

from flake_registry.database import CHIP_SPAN, Row, Transaction
from flake_registry.query import STATUS_AVAILABLE, STATUS_REJECTED
from flake_registry.records import IngestOutcome, Sighting, encode_contour
from flake_registry.schema import SCHEMA_VERSION


@dataclass(frozen=True)
class MergeRule:
    distance: float = 5e-6                      # [m] centres this close on one chip are one flake
    iou: float = 0.3                            # wafer-frame box overlap that also makes them one flake

    def __post_init__(self) -> None:
        if self.distance < 0 or not 0 < self.iou <= 1:
            raise ValueError('merge_distance must be >= 0 and merge_iou in (0, 1]')


def flake_id_of(pk: int) -> str:
    """Flake ids are F + seven digits, in order of discovery."""
    return f'F{pk:07d}'


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (min_x, min_y, max_x, max_y) boxes; 0 for degenerate ones."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ingest(tx: Transaction, sightings: Iterable[Sighting], rule: MergeRule, now: float,
           schema_version: int = SCHEMA_VERSION) -> list[IngestOutcome]:
    """Store one batch inside ``tx``, merging sightings of flakes already known.

    Sightings that cannot be stored (non-finite numbers, unknown material) are
    refused one by one with a reason; the rest of the batch is stored. The batch is
    planned in memory first (the matches read from the database in one pass, then
    taken in order, so that a sighting can merge into a flake found earlier in the
    same batch) and written with one statement per kind of row: on PostgreSQL that
    is a few round trips per batch instead of several per sighting. ``schema_version``:
    that of the registry (below 9 only for one kept at an older version: chips keep
    their number of flakes from 7 on, their key in the spatial index from 9 on).
    """
    sightings = list(sightings)
    outcomes: list[IngestOutcome] = [IngestOutcome() for _ in sightings]
    valid: list[int] = []
    for index, sighting in enumerate(sightings):
        error = sighting.check()
        if error is None:
            valid.append(index)
        else:
            outcomes[index] = IngestOutcome(chip_id=sighting.chip_id, error=error)
    if not valid:
        return outcomes
    chips = sorted({sightings[i].chip_id for i in valid})
    if tx.dialect == 'postgresql':
        # One writer per chip at a time: two scanners' batches of the same chip merge
        # in order, batches of different chips are written side by side.
        for chip in chips:
            tx.execute('SELECT pg_advisory_xact_lock(hashtext(?))', (chip,))
    chip_keys = _chip_keys(tx, chips, now, keyed=schema_version >= 9)
    boxes = {i: sightings[i].wafer_box() for i in valid}
    fetched = _candidates(tx, [(i, sightings[i].chip_id, boxes[i]) for i in valid], rule.distance, chip_keys)

    plan = _Plan(rule.distance)
    for index in valid:
        sighting, box = sightings[index], boxes[index]
        match = plan.best_match(sighting, box, fetched.get(index, ()), rule)
        if match is None:
            key = plan.add_flake(sighting, box)
            iou = 1.0
        else:
            key, iou = match
            plan.merge(key, sighting, box)
        plan.observations.append((key, sighting, iou))
        outcomes[index] = IngestOutcome(chip_id=sighting.chip_id, is_new=match is None, flake_id=str(key))

    new_pks = _allocate_pks(tx, len(plan.new))
    real = {key: pk for key, pk in zip(plan.new, new_pks, strict=True)}
    for index in valid:
        key = int(outcomes[index].flake_id)
        outcomes[index].flake_id = plan.state[key][0] if key > 0 else flake_id_of(real[key])
    _write(tx, plan, real, sightings, valid, now, chip_keys, count_per_chip=schema_version >= 7)
    return outcomes


# The batch's own flakes are found through a grid of cells of this side: comparing every
# sighting with every flake the batch touched cost ~20 us per sighting in batches of 100.
_CELL = 64e-6                                   # [m]
_MAX_CELLS = 64                                 # a box over more cells is kept in its chip's list of wide ones
Box = tuple[float, float, float, float]         # min_x, min_y, max_x, max_y [m], wafer frame
Known = tuple[str, float, float, float, Box]    # a flake as merging sees it: id, x, y, score, box


class _Plan:
    """The batch in memory: known flakes touched so far, new flakes (negative keys), observations."""

    def __init__(self, reach: float):
        self.state: dict[int, Known] = {}       # key = pk, or -n for new flakes
        self.touched: list[int] = []            # keys changed or made by this batch, in order
        self.new: list[int] = []
        self.best: dict[int, Sighting] = {}     # key -> sighting that now represents the flake
        self.extra_observations: dict[int, int] = {}
        self.observations: list[tuple[int, Sighting, float]] = []
        self.reach = reach
        self._touched_on: dict[str, list[int]] = {}           # chip -> touched keys
        self._cells: dict[tuple[str, int, int], list[int]] = {}  # grid cell -> keys whose box (+ reach) meets it
        self._wide: dict[str, list[int]] = {}                 # chip -> keys whose box covers too many cells

    @staticmethod
    def _cell_span(box: Box, margin: float) -> tuple[int, int, int, int]:
        return (math.floor((box[0] - margin) / _CELL), math.floor((box[2] + margin) / _CELL),
                math.floor((box[1] - margin) / _CELL), math.floor((box[3] + margin) / _CELL))

    def _touch(self, key: int, chip: str) -> None:
        """``key`` now lies where ``state[key]`` says (touched first, or its box changed)."""
        if key not in self.extra_observations and key not in self.best:
            self.touched.append(key)
            self._touched_on.setdefault(chip, []).append(key)
        x0, x1, y0, y1 = self._cell_span(self.state[key][4], self.reach)
        if (x1 - x0 + 1) * (y1 - y0 + 1) > _MAX_CELLS:
            self._wide.setdefault(chip, []).append(key)
            return
        for i in range(x0, x1 + 1):
            for j in range(y0, y1 + 1):
                self._cells.setdefault((chip, i, j), []).append(key)

    def _near_touched(self, chip: str, box: Box) -> set[int] | list[int]:
        """Touched keys of ``chip`` whose box may lie within ``reach`` of ``box`` (a superset)."""
        x0, x1, y0, y1 = self._cell_span(box, 0.0)
        if (x1 - x0 + 1) * (y1 - y0 + 1) > _MAX_CELLS:
            return self._touched_on.get(chip, [])
        keys = set(self._wide.get(chip, ()))
        for i in range(x0, x1 + 1):
            for j in range(y0, y1 + 1):
                keys.update(self._cells.get((chip, i, j), ()))
        return keys

    def best_match(self, sighting: Sighting, box: Box, fetched: Sequence[tuple[int, Known]],
                   rule: MergeRule) -> tuple[int, float] | None:
        for pk, row in fetched:
            self.state.setdefault(pk, row)      # a flake changed earlier in the batch keeps its new state
        keys = {pk for pk, _ in fetched}
        keys.update(self._near_touched(sighting.chip_id, box))
        reach = rule.distance
        best: tuple[int, float] | None = None
        best_key: tuple[float, float, int] | None = None
        for key in keys:
            _, x, y, _, other = self.state[key]
            if other[0] - reach > box[2] or other[2] + reach < box[0] or other[1] - reach > box[3] \
                    or other[3] + reach < box[1]:
                continue
            distance = math.hypot(x - sighting.x, y - sighting.y)
            iou = box_iou(box, other)
            if distance > reach and iou < rule.iou:
                continue
            rank = (iou, -distance, -key if key > 0 else key)  # ties: the earlier flake
            if best_key is None or rank > best_key:
                best, best_key = (key, iou), rank
        return best

    def add_flake(self, sighting: Sighting, box: Box) -> int:
        key = -(len(self.new) + 1)
        self.new.append(key)
        self.state[key] = ('', sighting.x, sighting.y, sighting.score, box)
        self._touch(key, sighting.chip_id)
        self.best[key] = sighting
        return key

    def merge(self, key: int, sighting: Sighting, box: Box) -> None:
        better = sighting.score > self.state[key][3]
        if better:
            self.state[key] = (self.state[key][0], sighting.x, sighting.y, sighting.score, box)
        if better or (key not in self.extra_observations and key not in self.best):
            self._touch(key, sighting.chip_id)
        self.extra_observations[key] = self.extra_observations.get(key, 0) + 1
        if better:
            self.best[key] = sighting


def _chip_keys(tx: Transaction, chips: list[str], now: float, keyed: bool) -> dict[str, int]:
    """Make the batch's chips known (a new chip gets its key) and return chip id -> key (schema 9 on)."""
    if not keyed:
        tx.executemany('INSERT INTO chips (id, created, updated) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING',
                       [(chip, now, now) for chip in chips])
        return {}
    if tx.dialect != 'postgresql':
        tx.executemany('INSERT INTO chips (id, created, updated) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING',
                       [(chip, now, now) for chip in chips])
        rows = tx.all(f'SELECT id, chip_key FROM chips WHERE id IN ({", ".join("?" * len(chips))})', chips)
        return {row['id']: int(row['chip_key']) for row in rows}
    # One round trip: the chips inserted now come back from the INSERT, the others from the
    # table (the statement's snapshot does not see its own insert).
    rows = tx.all('WITH new AS (INSERT INTO chips (id, created, updated) SELECT unnest(:ids::text[]), :now, :now '
                  'ON CONFLICT (id) DO NOTHING RETURNING id, chip_key) SELECT id, chip_key FROM new UNION ALL '
                  'SELECT id, chip_key FROM chips WHERE id = ANY(:ids::text[])', {'ids': chips, 'now': now})
    keys = {row['id']: int(row['chip_key']) for row in rows}
    if len(keys) < len(chips):
        # A chip that a writer without this chip's lock (a wafer frame) committed while the
        # statement ran: the next statement sees it.
        keys.update((row['id'], int(row['chip_key'])) for row in tx.all(
            'SELECT id, chip_key FROM chips WHERE id = ANY(:ids::text[])', {'ids': chips}))
    return keys


def _candidates(tx: Transaction, wanted: list[tuple[int, str, Box]], reach: float,
                chip_keys: dict[str, int]) -> dict[int, list[tuple[int, Known]]]:
    """Known flakes near each sighting, on its chip: index -> [(pk, (id, x, y, score, box))].

    ``chip_keys`` empty: a registry older than schema 9, whose spatial index has no chip.
    """
    found: dict[int, list[tuple[int, Known]]] = {}
    columns = 'f.pk, f.id, f.x, f.y, f.score, b.min_x, b.min_y, b.max_x, b.max_y'
    if tx.dialect == 'postgresql':
        if chip_keys:
            near = tx.box_overlap('b', 'd.x0', 'd.y0', 'd.x1', 'd.y1', chip_key='d.chip_key')
        else:
            # `|| ''` keeps the planner off the chip index: with it, it read every flake of
            # the chip for each sighting (280 ms a batch at 3000 flakes, growing with the chip).
            near = tx.box_overlap('b', 'd.x0', 'd.y0', 'd.x1', 'd.y1') + " AND f.chip_id || '' = d.chip"
        # LATERAL: one GiST search per sighting, then its few flakes by key.
        rows = tx.all(
            f'SELECT d.i, c.* FROM unnest(:i::int[], :chip::text[], :chip_key::int[], :x0::float8[], :y0::float8[], '
            f':x1::float8[], :y1::float8[]) AS d(i, chip, chip_key, x0, y0, x1, y1) CROSS JOIN LATERAL '
            f'(SELECT {columns} FROM flake_boxes b JOIN flakes f ON f.pk = b.id WHERE {near} OFFSET 0) AS c',
            {'i': [w[0] for w in wanted], 'chip': [w[1] for w in wanted],
             'chip_key': [chip_keys.get(w[1], 0) for w in wanted],
             'x0': [w[2][0] - reach for w in wanted], 'y0': [w[2][1] - reach for w in wanted],
             'x1': [w[2][2] + reach for w in wanted], 'y1': [w[2][3] + reach for w in wanted]})
        for row in rows:
            found.setdefault(row['i'], []).append(_candidate(row))
        return found
    if chip_keys:
        near = tx.box_overlap('b', ':x0', ':y0', ':x1', ':y1', chip_key=':chip_key')
    else:
        # `+f.chip_id`: keeps SQLite's planner on the R*Tree range search; with the chip
        # index it would visit every flake of the chip and probe the R*Tree once for each.
        near = tx.box_overlap('b', ':x0', ':y0', ':x1', ':y1') + ' AND +f.chip_id = :chip'
    sql = f'SELECT {columns} FROM flake_boxes b JOIN flakes f ON f.pk = b.id WHERE {near}'
    for index, chip, box in wanted:
        rows = tx.all(sql, {'x0': box[0] - reach, 'y0': box[1] - reach, 'x1': box[2] + reach, 'y1': box[3] + reach,
                            'chip': chip, 'chip_key': chip_keys.get(chip, 0)})
        if rows:
            found[index] = [_candidate(row) for row in rows]
    return found


def _candidate(row: Row) -> tuple[int, Known]:
    return row['pk'], (row['id'], row['x'], row['y'], row['score'],
                       (row['min_x'], row['min_y'], row['max_x'], row['max_y']))


def _allocate_pks(tx: Transaction, count: int) -> list[int]:
    if not count:
        return []
    if tx.dialect == 'postgresql':
        rows = tx.all("SELECT nextval('flake_pk_seq') AS pk FROM generate_series(1, ?)", (count,))
        return [int(row['pk']) for row in rows]
    # The write transaction holds SQLite's lock, so nobody else takes these keys.
    first = int(tx.scalar('SELECT COALESCE(MAX(pk), 0) FROM flakes')) + 1
    return list(range(first, first + count))


def _write(tx: Transaction, plan: _Plan, real: dict[int, int], sightings: list[Sighting], valid: list[int],
           now: float, chip_keys: dict[str, int], count_per_chip: bool) -> None:
    seen: dict[tuple[str, str], float] = {}
    for index in valid:
        seen.setdefault((sightings[index].chip_id, sightings[index].scan_id), sightings[index].stamp)
    tx.executemany('INSERT INTO scans (id, chip_id, started) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING',
                   [(scan, chip, stamp or now) for (chip, scan), stamp in seen.items() if scan])
    inserts, boxes = [], []
    for key in plan.new:
        sighting, box, pk = plan.best[key], plan.state[key][4], real[key]
        values = _flake_values(sighting)
        values.update(pk=pk, id=flake_id_of(pk), chip_id=sighting.chip_id,
                      n_observations=1 + plan.extra_observations.get(key, 0), created=now, updated=now,
                      status=STATUS_REJECTED if sighting.rejected else STATUS_AVAILABLE)
        inserts.append(values)
        boxes.append((pk, box[0], box[2], box[1], box[3]))
    if inserts and count_per_chip:
        # The chip rows are this writer's alone while it holds the chips' locks (the
        # advisory lock on PostgreSQL, the write lock on SQLite).
        new_per_chip: dict[str, int] = {}
        for values in inserts:
            new_per_chip[values['chip_id']] = new_per_chip.get(values['chip_id'], 0) + 1
        tx.executemany('UPDATE chips SET n_flakes = n_flakes + ? WHERE id = ?',
                       [(count, chip) for chip, count in sorted(new_per_chip.items())])
    if inserts:
        names = list(inserts[0])
        tx.insert_many('flakes', names, [tuple(values.values()) for values in inserts])
        if not chip_keys:
            tx.insert_many('flake_boxes', ('id', 'min_x', 'max_x', 'min_y', 'max_y'), boxes)
        elif tx.dialect == 'postgresql':
            tx.insert_many('flake_boxes', ('id', 'min_x', 'max_x', 'min_y', 'max_y', 'chip_key'),
                           [(*box, chip_keys[values['chip_id']]) for box, values in zip(boxes, inserts, strict=True)])
        else:
            tx.insert_many('flake_boxes', ('id', 'min_x', 'max_x', 'min_y', 'max_y', 'min_chip', 'max_chip'),
                           [(*box, chip_keys[values['chip_id']], chip_keys[values['chip_id']] + CHIP_SPAN)
                            for box, values in zip(boxes, inserts, strict=True)])
    updates, box_updates, counts = [], [], []
    for key in plan.touched:
        if key < 0:
            continue
        if key in plan.best:
            values = _flake_values(plan.best[key])
            updates.append((*values.values(), key))
            box = plan.state[key][4]
            box_updates.append((box[0], box[2], box[1], box[3], key))
        counts.append((plan.extra_observations.get(key, 0), now, key))
    if updates:
        assignments = ', '.join(f'{name} = ?' for name in _flake_values(plan.best[updates[0][-1]]))
        tx.executemany(f'UPDATE flakes SET {assignments} WHERE pk = ?', updates)
        tx.executemany('UPDATE flake_boxes SET min_x = ?, max_x = ?, min_y = ?, max_y = ? WHERE id = ?', box_updates)
    tx.executemany('UPDATE flakes SET n_observations = n_observations + ?, updated = ? WHERE pk = ?', counts)
    tx.insert_many('observations', ('flake_pk', 'scan_id', 'tile_index', 'stamp', 'x', 'y', 'bbox_px', 'score',
                                    'detector', 'iou', 'created'),
                   [(real.get(key, key), s.scan_id, int(s.tile_index), s.stamp, s.x, s.y,
                     _bbox_text(s.bbox_px), s.score, s.detector, iou, now)
                    for key, s, iou in plan.observations])


def _bbox_text(bbox: Sequence[int]) -> str:
    """The pixel box as JSON (``[x, y, w, h]``, as json.dumps writes it), without the JSON encoder's cost."""
    x, y, w, h = map(int, bbox)
    return f'[{x}, {y}, {w}, {h}]'


def _flake_values(sighting: Sighting) -> dict[str, Any]:
    return {
        'scan_id': sighting.scan_id, 'tile_index': int(sighting.tile_index),
        'material': sighting.material, 'layer_class': int(sighting.layer_class),
        'layers': sighting.layers, 'layers_std': sighting.layers_std,
        'thickness_nm': sighting.thickness_nm, 'thickness_nm_std': sighting.thickness_nm_std,
        'score': sighting.score, 'detector': sighting.detector, 'model_version': sighting.model_version,
        'x': sighting.x, 'y': sighting.y,
        'contour': encode_contour(sighting.contour),
        'area': sighting.area, 'bbox_px': _bbox_text(sighting.bbox_px),
        'homogeneity': sighting.homogeneity, 'isolation_distance': sighting.isolation_distance,
        'edge_straightness': sighting.edge_straightness, 'detected_at': sighting.stamp,
        'mask': zlib.compress(sighting.mask, 1) if sighting.mask else None,
        'mask_width': sighting.mask_width, 'mask_height': sighting.mask_height,
    }

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
import json
import math
from typing import Any
import zlib

from flake_registry.database import Transaction
from flake_registry.query import STATUS_AVAILABLE, STATUS_REJECTED
from flake_registry.records import IngestOutcome, Sighting, encode_contour


@dataclass(frozen=True)
class MergeRule:
    distance: float = 5e-6                      # [m] centres this close on one chip are one flake
    iou: float = 0.3                            # wafer-frame box overlap that also makes them one flake

    def __post_init__(self):
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


def ingest(tx: Transaction, sightings: Iterable[Sighting], rule: MergeRule, now: float) -> list[IngestOutcome]:
    """Store one batch inside ``tx``, merging sightings of flakes already known.

    Sightings that cannot be stored (non-finite numbers, unknown material) are
    refused one by one with a reason; the rest of the batch is stored.
    """
    outcomes: list[IngestOutcome] = []
    next_pk = int(tx.scalar('SELECT COALESCE(MAX(pk), 0) FROM flakes')) + 1
    seen_scans: set[tuple[str, str]] = set()
    for sighting in sightings:
        error = sighting.check()
        if error is not None:
            outcomes.append(IngestOutcome(chip_id=sighting.chip_id, error=error))
            continue
        if (sighting.chip_id, sighting.scan_id) not in seen_scans:
            seen_scans.add((sighting.chip_id, sighting.scan_id))
            tx.execute('INSERT INTO chips (id, created, updated) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING',
                       (sighting.chip_id, now, now))
            if sighting.scan_id:
                tx.execute('INSERT INTO scans (id, chip_id, started) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING',
                           (sighting.scan_id, sighting.chip_id, sighting.stamp or now))
        box = sighting.wafer_box()
        match = best_match(tx, sighting, box, rule)
        if match is None:
            flake_pk, flake_id, iou = next_pk, flake_id_of(next_pk), 1.0
            next_pk += 1
            _insert_flake(tx, flake_pk, flake_id, sighting, box, now)
        else:
            flake_pk, flake_id, best_score, iou = match
            if sighting.score > best_score:
                _replace_representative(tx, flake_pk, sighting, box)
            tx.execute('UPDATE flakes SET n_observations = n_observations + 1, updated = ? WHERE pk = ?',
                       (now, flake_pk))
        tx.execute('INSERT INTO observations (flake_pk, scan_id, tile_index, stamp, x, y, bbox_px, score, detector, '
                   'iou, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                   (flake_pk, sighting.scan_id, int(sighting.tile_index), sighting.stamp, sighting.x, sighting.y,
                    json.dumps(list(map(int, sighting.bbox_px))), sighting.score, sighting.detector, iou, now))
        outcomes.append(IngestOutcome(flake_id=flake_id, chip_id=sighting.chip_id, is_new=match is None))
    return outcomes


def best_match(tx: Transaction, sighting: Sighting, box, rule: MergeRule):
    """(pk, id, score, iou) of the known flake ``sighting`` is another sighting of, or None."""
    reach = rule.distance
    # `+f.chip_id`: keeps the planner on the R*Tree range search; with the chip index
    # it would visit every flake of the chip and probe the R*Tree once for each.
    rows = tx.all(
        'SELECT f.pk, f.id, f.x, f.y, f.score, b.min_x, b.min_y, b.max_x, b.max_y FROM flake_boxes b '
        'JOIN flakes f ON f.pk = b.id WHERE b.max_x >= ? AND b.min_x <= ? AND b.max_y >= ? AND b.min_y <= ? '
        'AND +f.chip_id = ?',
        (box[0] - reach, box[2] + reach, box[1] - reach, box[3] + reach, sighting.chip_id))
    best, best_key = None, None
    for row in rows:
        distance = math.hypot(row['x'] - sighting.x, row['y'] - sighting.y)
        iou = box_iou(box, (row['min_x'], row['min_y'], row['max_x'], row['max_y']))
        if distance > reach and iou < rule.iou:
            continue
        key = (iou, -distance)
        if best_key is None or key > best_key:
            best, best_key = (row['pk'], row['id'], row['score'], iou), key
    return best


def _flake_values(sighting: Sighting) -> dict[str, Any]:
    return {
        'scan_id': sighting.scan_id, 'tile_index': int(sighting.tile_index),
        'material': sighting.material, 'layer_class': int(sighting.layer_class),
        'layers': sighting.layers, 'layers_std': sighting.layers_std,
        'thickness_nm': sighting.thickness_nm, 'thickness_nm_std': sighting.thickness_nm_std,
        'score': sighting.score, 'detector': sighting.detector, 'model_version': sighting.model_version,
        'x': sighting.x, 'y': sighting.y,
        'contour': encode_contour(sighting.contour),
        'area': sighting.area, 'bbox_px': json.dumps(list(map(int, sighting.bbox_px))),
        'homogeneity': sighting.homogeneity, 'isolation_distance': sighting.isolation_distance,
        'edge_straightness': sighting.edge_straightness, 'detected_at': sighting.stamp,
        'mask': zlib.compress(sighting.mask, 1) if sighting.mask else None,
        'mask_width': sighting.mask_width, 'mask_height': sighting.mask_height,
    }


def _insert_flake(tx: Transaction, flake_pk: int, flake_id: str, sighting: Sighting, box, now: float) -> None:
    values = _flake_values(sighting)
    values.update(pk=flake_pk, id=flake_id, chip_id=sighting.chip_id, n_observations=1, created=now,
                  updated=now, status=STATUS_REJECTED if sighting.rejected else STATUS_AVAILABLE)
    names = ', '.join(values)
    tx.execute(f'INSERT INTO flakes ({names}) VALUES ({", ".join("?" * len(values))})', tuple(values.values()))
    tx.execute('INSERT INTO flake_boxes (id, min_x, max_x, min_y, max_y) VALUES (?, ?, ?, ?, ?)',
               (flake_pk, box[0], box[2], box[1], box[3]))


def _replace_representative(tx: Transaction, flake_pk: int, sighting: Sighting, box) -> None:
    values = _flake_values(sighting)
    assignments = ', '.join(f'{name} = ?' for name in values)
    tx.execute(f'UPDATE flakes SET {assignments} WHERE pk = ?', (*values.values(), flake_pk))
    tx.execute('UPDATE flake_boxes SET min_x = ?, max_x = ?, min_y = ?, max_y = ? WHERE id = ?',
               (box[0], box[2], box[1], box[3], flake_pk))

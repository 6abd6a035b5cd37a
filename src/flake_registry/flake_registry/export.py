"""Export the flakes of a chip or scan as JSON, CSV or COCO instance annotations.

JSON is the complete record (observations and images included) for other programs;
CSV is one flat row per flake for spreadsheets; COCO has one image per scan tile and
one annotation per observation, with outlines mapped back to tile pixels where the
tile's geometry was recorded (``FlakeStore.record_frame``), so the crops can train
or evaluate an instance-segmentation model.
"""

from __future__ import annotations

from collections.abc import Iterable
import csv
from dataclasses import asdict
import json
import time
from typing import IO, Any

from flake_core.geometry import Affine2D
from flake_core.materials import MATERIAL_NAMES
from flake_registry.query import LAYER_NAMES, STATUS_NAMES, RegistryError
from flake_registry.store import SCHEMA_VERSION, FlakeRecord, FlakeStore

FORMATS = ('json', 'csv', 'coco')
CSV_COLUMNS = ('id', 'chip_id', 'scan_id', 'tile_index', 'material', 'layer_class', 'layers', 'layers_std',
               'thickness_nm', 'thickness_nm_std', 'score', 'detector', 'model_version', 'x', 'y', 'area',
               'homogeneity', 'isolation_distance', 'edge_straightness', 'status', 'n_observations',
               'reserved_by', 'used_by', 'used_note', 'created', 'revisited_at', 'contour')


def _scope(chip_id: str, scan_id: str) -> dict[str, str]:
    if not chip_id and not scan_id:
        raise RegistryError('INVALID_ARGUMENT', 'export needs a chip_id or a scan_id')
    return {'chip_id': chip_id, 'scan_id': scan_id}


def flake_dict(store: FlakeStore, flake_id: str) -> dict[str, Any]:
    """The full record of one flake as plain JSON-ready values (mask left out)."""
    detail = store.get_flake(flake_id)
    record = asdict(detail.flake)
    for name in ('mask', 'mask_width', 'mask_height'):
        record.pop(name)
    record['layer_class_name'] = LAYER_NAMES[record['layer_class']]
    record['status_name'] = STATUS_NAMES[record['status']]
    record['observations'] = [asdict(o) for o in detail.observations]
    record['images'] = [asdict(i) for i in detail.images]
    return record


def export_json(store: FlakeStore, out: IO[str], chip_id: str = '', scan_id: str = '') -> int:
    scope = _scope(chip_id, scan_id)
    flakes = [flake_dict(store, f.id) for f in store.iter_flakes(**scope)]
    json.dump({'format': 'flake-registry', 'schema_version': SCHEMA_VERSION, 'exported_at': time.time(),
               **scope, 'units': {'length': 'm', 'area': 'm^2', 'thickness': 'nm'}, 'flakes': flakes},
              out, indent=1)
    return len(flakes)


def write_flake_csv(flakes: Iterable[FlakeRecord], out: IO[str]) -> int:
    """One row per flake (SI units; outline as a JSON list); returns the number of rows."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction='ignore')
    writer.writeheader()
    count = 0
    for flake in flakes:
        row = asdict(flake)
        row['layer_class'] = LAYER_NAMES[flake.layer_class]
        row['status'] = STATUS_NAMES[flake.status]
        row['contour'] = json.dumps(flake.contour)
        writer.writerow(row)
        count += 1
    return count


def export_csv(store: FlakeStore, out: IO[str], chip_id: str = '', scan_id: str = '') -> int:
    return write_flake_csv(store.iter_flakes(**_scope(chip_id, scan_id)), out)


def coco_categories() -> list[dict[str, Any]]:
    """One category per material and layer class, as in seed 001 (e.g. graphene_mono)."""
    names = [(m, layer) for m in MATERIAL_NAMES for layer in LAYER_NAMES]
    return [{'id': i + 1, 'name': f'{m}_{layer}', 'supercategory': m} for i, (m, layer) in enumerate(names)]


def _polygon_area(points: list[tuple[float, float]]) -> float:
    total = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        total += x0 * y1 - x1 * y0
    return abs(total) / 2


def build_coco(store: FlakeStore, chip_id: str = '', scan_id: str = '') -> dict[str, Any]:
    scope = _scope(chip_id, scan_id)
    category_ids = {c['name']: c['id'] for c in coco_categories()}
    images: dict[tuple[str, int], dict[str, Any]] = {}
    frames_by_scan: dict[str, dict[int, dict[str, Any]]] = {}
    annotations = []
    for flake in store.iter_flakes(**scope):
        detail = store.get_flake(flake.id)
        for obs in detail.observations:
            if scan_id and obs.scan_id != scan_id:
                continue
            frames = frames_by_scan.setdefault(obs.scan_id, store.frames(obs.scan_id))
            frame = frames.get(obs.tile_index)
            key = (obs.scan_id, obs.tile_index)
            x0, y0, w, h = obs.bbox_px
            if key not in images:
                images[key] = {'id': len(images) + 1,
                               'file_name': (frame or {}).get('path') or f'{obs.scan_id}/tile_{obs.tile_index:05d}.png',
                               'width': (frame or {}).get('width') or 0, 'height': (frame or {}).get('height') or 0,
                               'scan_id': obs.scan_id, 'tile_index': obs.tile_index}
            image = images[key]
            if frame is None:
                # Tile size unknown: at least as large as every box seen in it.
                image['width'] = max(image['width'], x0 + w)
                image['height'] = max(image['height'], y0 + h)
            polygon = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
            if frame is not None and len(flake.contour) >= 3:
                to_pixels = Affine2D.from_list(frame['pixel_to_wafer']).inverse()
                # The stored outline belongs to the best sighting; shift it onto this one.
                dx, dy = obs.x - flake.x, obs.y - flake.y
                polygon = [tuple(map(float, to_pixels.apply(px + dx, py + dy))) for px, py in flake.contour]
            annotations.append({
                'id': len(annotations) + 1, 'image_id': image['id'],
                'category_id': category_ids[f'{flake.material}_{LAYER_NAMES[flake.layer_class]}'],
                'bbox': [x0, y0, w, h], 'area': _polygon_area(polygon),
                'segmentation': [[round(v, 2) for point in polygon for v in point]], 'iscrowd': 0,
                'flake_id': flake.id, 'score': obs.score})
    return {'info': {'description': f'flake registry export {scope}', 'version': str(SCHEMA_VERSION),
                     'date_created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())},
            'licenses': [], 'images': list(images.values()), 'annotations': annotations,
            'categories': coco_categories()}


def export_coco(store: FlakeStore, out: IO[str], chip_id: str = '', scan_id: str = '') -> int:
    coco = build_coco(store, chip_id, scan_id)
    json.dump(coco, out)
    return len(coco['annotations'])


EXPORTERS = {'json': export_json, 'csv': export_csv, 'coco': export_coco}

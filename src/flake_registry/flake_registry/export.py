"""Export the flakes of a chip or scan as JSON, CSV or COCO instance annotations.

JSON (every flake with its observations and images) and CSV (one row per flake, for
spreadsheets) speak the units people read: micrometres, square micrometres,
nanometres and the lab's local time, each named in the key or column (``x_um``,
``area_um2``, ``thickness_nm``, ``detected_local_time``). SI values stay on the ROS
topics and in ``flake_registry.client``.

COCO has one image per kept scan frame (``FlakeStore.record_frame`` with the file in
the data folder, as ``flake-import`` keeps them) and one annotation per observation,
outlines mapped into the frame's pixels; a scan whose frames are not kept but that has
a mosaic (``scans/<scan>/mosaic.png``) is annotated on the mosaic. Every ``file_name``
names a file that exists: relative to the folder of the written COCO file, or absolute
when it goes to standard output. Observations with no picture to lie on are left out
and counted in ``info``. Categories are material x layer class, as in Masubuchi et al.
(2020) (``graphene_mono``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
import csv
import json
import os
from pathlib import Path
import time
from typing import IO, Any

from flake_core.geometry import Affine2D, polygon_area
from flake_core.materials import MATERIAL_NAMES
from flake_core.units import UM, UM2, local_time
from flake_registry.files import resolve_inside
from flake_registry.query import INVALID_ARGUMENT, LAYER_NAMES, STATUS_NAMES, RegistryError
from flake_registry.store import SCHEMA_VERSION, FlakeDetail, FlakeRecord, FlakeStore, default_database_path

FORMATS = ('json', 'csv', 'coco')
CSV_COLUMNS = ('id', 'chip_id', 'scan_id', 'tile_index', 'material', 'layer_class', 'layers', 'layers_std',
               'thickness_nm', 'thickness_std_nm', 'area_um2', 'x_um', 'y_um', 'score', 'homogeneity',
               'isolation_um', 'edge_straightness', 'status', 'n_observations', 'reserved_by', 'used_by', 'used_note',
               'detector', 'model_version', 'detected_local_time', 'revisited_local_time', 'outline_um')
UNITS = {'length': 'um', 'area': 'um^2', 'thickness': 'nm', 'time': 'local time of the registry host, with its zone',
         'frame': 'wafer frame of the chip (origin at its aligned corner, x along the edge, y up)'}


def _scope(chip_id: str, scan_id: str) -> dict[str, str]:
    if not chip_id and not scan_id:
        raise RegistryError(INVALID_ARGUMENT, 'export needs a chip_id or a scan_id')
    return {'chip_id': chip_id, 'scan_id': scan_id}


def people_row(flake: FlakeRecord) -> dict[str, Any]:
    """One flake in the units people read, the unit in each key (the CSV row)."""
    return {'id': flake.id, 'chip_id': flake.chip_id, 'scan_id': flake.scan_id, 'tile_index': flake.tile_index,
            'material': flake.material, 'layer_class': LAYER_NAMES[flake.layer_class],
            'layers': round(flake.layers, 3), 'layers_std': round(flake.layers_std, 3),
            'thickness_nm': round(flake.thickness_nm, 3), 'thickness_std_nm': round(flake.thickness_nm_std, 3),
            'area_um2': round(flake.area / UM2, 2), 'x_um': round(flake.x / UM, 3), 'y_um': round(flake.y / UM, 3),
            'score': round(flake.score, 4), 'homogeneity': round(flake.homogeneity, 4),
            'isolation_um': round(flake.isolation_distance / UM, 2),
            'edge_straightness': round(flake.edge_straightness, 4), 'status': STATUS_NAMES[flake.status],
            'n_observations': flake.n_observations, 'reserved_by': flake.reserved_by, 'used_by': flake.used_by,
            'used_note': flake.used_note, 'detector': flake.detector, 'model_version': flake.model_version,
            'detected_local_time': local_time(flake.detected_at or flake.created),
            'revisited_local_time': local_time(flake.revisited_at)}


def outline_um(flake: FlakeRecord) -> list[list[float]]:
    """The flake's outline in the wafer frame [um]."""
    return [[round(x / UM, 3), round(y / UM, 3)] for x, y in flake.contour]


def csv_row(flake: FlakeRecord) -> dict[str, Any]:
    """One flake as a row of ``CSV_COLUMNS`` (the outline as JSON text)."""
    return dict(people_row(flake), outline_um=json.dumps(outline_um(flake)))


def people_record(flake: FlakeRecord, detail: FlakeDetail | None = None) -> dict[str, Any]:
    """One flake in people's units: its row, outline and lease; with its ``detail``, observations and images too."""
    record = people_row(flake)
    record['outline_um'] = outline_um(flake)
    record['lease_expires_local_time'] = local_time(flake.lease_expires)
    record['used_local_time'] = local_time(flake.used_at)
    if detail is None:
        return record
    record['observations'] = [{'scan_id': o.scan_id, 'tile_index': o.tile_index, 'local_time': local_time(o.stamp),
                               'x_um': round(o.x / UM, 3), 'y_um': round(o.y / UM, 3), 'bbox_px': list(o.bbox_px),
                               'score': round(o.score, 4), 'detector': o.detector, 'overlap': round(o.iou, 3)}
                              for o in detail.observations]
    record['images'] = [{'role': i.role, 'path': i.path, 'objective': i.objective,
                         'pixel_size_um': round(i.pixel_size / UM, 5) if i.pixel_size else None,
                         'local_time': local_time(i.stamp)} for i in detail.images]
    return record


def flake_dict(store: FlakeStore, flake_id: str) -> dict[str, Any]:
    detail = store.get_flake(flake_id)
    return people_record(detail.flake, detail)


def export_json(store: FlakeStore, out: IO[str], chip_id: str = '', scan_id: str = '', **_) -> int:
    scope = _scope(chip_id, scan_id)
    flakes = [flake_dict(store, f.id) for f in store.iter_flakes(**scope)]
    json.dump({'format': 'flake-registry', 'schema_version': SCHEMA_VERSION,
               'exported_local_time': local_time(time.time()), **scope, 'units': UNITS, 'flakes': flakes},
              out, indent=1)
    return len(flakes)


def write_flake_csv(flakes: Iterable[FlakeRecord], out: IO[str]) -> int:
    """One row per flake, units in the column names; returns the number of rows."""
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    count = 0
    for flake in flakes:
        writer.writerow(csv_row(flake))
        count += 1
    return count


def export_csv(store: FlakeStore, out: IO[str], chip_id: str = '', scan_id: str = '', **_) -> int:
    return write_flake_csv(store.iter_flakes(**_scope(chip_id, scan_id)), out)


# -- COCO ----------------------------------------------------------------------------------------


def coco_categories() -> list[dict[str, Any]]:
    """One category per material and layer class, as in Masubuchi et al. (2020) (e.g. graphene_mono)."""
    names = [(m, layer) for m in MATERIAL_NAMES for layer in LAYER_NAMES]
    return [{'id': i + 1, 'name': f'{m}_{layer}', 'supercategory': m} for i, (m, layer) in enumerate(names)]


def data_folder(store: FlakeStore) -> Path:
    """The folder of the registry's files: next to its SQLite file, else $FLAKE_DATA_DIR."""
    path = getattr(store, 'path', None)
    return Path(path).parent if path else default_database_path().parent


def _kept_file(data_dir: Path, name: str | None) -> Path | None:
    if not name:
        return None
    try:
        return resolve_inside(data_dir, name, allow_absolute=True, what='frame')
    except RegistryError:
        return None


def _png_size(path: Path) -> tuple[int, int] | None:
    with open(path, 'rb') as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != b'\x89PNG\r\n\x1a\n':
        return None
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')


def _mosaic(data_dir: Path, scan_id: str) -> dict[str, Any] | None:
    """The scan's mosaic file, size and wafer -> mosaic map, when the scan has one."""
    picture = _kept_file(data_dir, f'scans/{scan_id}/mosaic.png')
    try:
        meta_path = resolve_inside(data_dir, f'scans/{scan_id}/mosaic.json', suffixes=frozenset({'.json'}))
        to_mosaic = Affine2D.from_list(json.loads(meta_path.read_text())['wafer_to_mosaic'])
    except (RegistryError, OSError, ValueError, KeyError, TypeError):
        return None
    size = _png_size(picture) if picture is not None else None
    if size is None:
        return None
    return {'path': picture, 'width': size[0], 'height': size[1], 'to_mosaic': to_mosaic}


def build_coco(store: FlakeStore, chip_id: str = '', scan_id: str = '', data_dir: Path | None = None,
               base_dir: Path | None = None) -> dict[str, Any]:
    """COCO of the scope's observations on the pictures the registry keeps (see the module docstring).

    ``base_dir``: the folder the COCO file is written to (file names relative to it);
    None gives absolute file names.
    """
    scope = _scope(chip_id, scan_id)
    data_dir = Path(data_dir) if data_dir is not None else data_folder(store)
    category_ids = {c['name']: c['id'] for c in coco_categories()}
    images: dict[tuple[str, int], dict[str, Any]] = {}
    frames_by_scan: dict[str, dict[int, dict[str, Any]]] = {}
    mosaics: dict[str, dict[str, Any] | None] = {}
    annotations: list[dict[str, Any]] = []
    left_out = 0
    on_mosaic: set[tuple[str, str]] = set()

    def image_entry(key, path: Path, width: int, height: int, **extra) -> dict[str, Any]:
        if key not in images:
            name = os.path.relpath(path, base_dir) if base_dir is not None else str(path)
            images[key] = {'id': len(images) + 1, 'file_name': Path(name).as_posix(), 'width': int(width),
                           'height': int(height), **extra}
        return images[key]

    def annotate(image, flake, polygon, bbox, score):
        annotations.append({
            'id': len(annotations) + 1, 'image_id': image['id'],
            'category_id': category_ids[f'{flake.material}_{LAYER_NAMES[flake.layer_class]}'],
            'bbox': [round(v, 2) for v in bbox], 'area': polygon_area(polygon),
            'segmentation': [[round(v, 2) for point in polygon for v in point]], 'iscrowd': 0,
            'flake_id': flake.id, 'score': score})

    for flake in store.iter_flakes(**scope):
        detail = store.get_flake(flake.id)
        outline = flake.contour if len(flake.contour) >= 3 else None
        for obs in detail.observations:
            if scan_id and obs.scan_id != scan_id:
                continue
            frames = frames_by_scan.setdefault(obs.scan_id, store.frames(obs.scan_id))
            frame = frames.get(obs.tile_index)
            picture = _kept_file(data_dir, frame.get('path')) if frame else None
            if picture is not None:
                image = image_entry((obs.scan_id, obs.tile_index), picture, frame['width'], frame['height'],
                                    scan_id=obs.scan_id, tile_index=obs.tile_index)
                x0, y0, w, h = obs.bbox_px
                polygon = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
                if outline is not None:
                    to_pixels = Affine2D.from_list(frame['pixel_to_wafer']).inverse()
                    # The stored outline belongs to the best sighting; shift it onto this one.
                    dx, dy = obs.x - flake.x, obs.y - flake.y
                    polygon = [tuple(map(float, to_pixels.apply(px + dx, py + dy))) for px, py in outline]
                annotate(image, flake, polygon, (x0, y0, w, h), obs.score)
                continue
            if obs.scan_id not in mosaics:
                mosaics[obs.scan_id] = _mosaic(data_dir, obs.scan_id)
            mosaic = mosaics[obs.scan_id]
            if mosaic is None or outline is None:
                left_out += 1
                continue
            if (flake.id, obs.scan_id) in on_mosaic:
                continue  # one annotation per flake on a scan's mosaic, however often it was seen
            on_mosaic.add((flake.id, obs.scan_id))
            image = image_entry((obs.scan_id, -1), mosaic['path'], mosaic['width'], mosaic['height'],
                                scan_id=obs.scan_id, mosaic=True)
            polygon = [tuple(map(float, mosaic['to_mosaic'].apply(px, py))) for px, py in outline]
            us, vs = [p[0] for p in polygon], [p[1] for p in polygon]
            annotate(image, flake, polygon, (min(us), min(vs), max(us) - min(us), max(vs) - min(vs)), flake.score)
    return {'info': {'description': f'flake registry export {scope}', 'version': str(SCHEMA_VERSION),
                     'date_created': time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime()),
                     'left_out_observations': left_out,
                     'left_out_reason': 'observations on frames whose image the registry does not keep, in scans '
                                        'without a mosaic'},
            'licenses': [], 'images': list(images.values()), 'annotations': annotations,
            'categories': coco_categories()}


def export_coco(store: FlakeStore, out: IO[str], chip_id: str = '', scan_id: str = '',
                data_dir: Path | None = None, base_dir: Path | None = None) -> int:
    coco = build_coco(store, chip_id, scan_id, data_dir=data_dir, base_dir=base_dir)
    json.dump(coco, out)
    return len(coco['annotations'])


EXPORTERS = {'json': export_json, 'csv': export_csv, 'coco': export_coco}

"""People's labels on flakes and candidate crops, and their export as training crops.

A label is kept in the registry's ``labels`` table as one text, ``verdict:material:
layer_class`` (e.g. ``accept:graphene:mono``, ``reject:unknown:unknown``), so that the
command line shows it as it is and the trainer reads it back without a schema change.

``export_labelled_crops`` writes the folder the cascade trainer learns from (Greplova et al.'s
labelling step): ``good/`` and ``bad/`` PNG crops of a fixed size plus ``labels.csv``
with one row per crop (who labelled it, when, material, layer class). A flake accepted
or relabelled is good; a rejected one is bad. The newest label of a flake or crop wins.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
import json
import math
from pathlib import Path
import re
from typing import Any

import cv2
import numpy as np

from flake_core.geometry import Affine2D
from flake_core.materials import MATERIAL_NAMES
from flake_registry.files import IMAGE_SUFFIXES, resolve_inside
from flake_registry.query import INVALID_ARGUMENT, LAYER_NAMES, UNKNOWN_ID, RegistryError, parse_layer_class
from flake_registry.store import FlakeStore

VERDICTS = ('accept', 'reject', 'relabel')
WHO_PATTERN = re.compile(r'^[A-Za-z0-9_.@ \-]{1,64}$')
CROP_SIZE = 80  # Greplova et al.'s candidate crops are 80 x 80 pixels
# A label is withdrawn (deleted, history kept) by a later row 'withdrawn:<label id>' on the same target.
WITHDRAWN = 'withdrawn'


@dataclass(frozen=True)
class Label:
    verdict: str
    material: str
    layer_class: int

    def encode(self) -> str:
        return f'{self.verdict}:{self.material}:{LAYER_NAMES[self.layer_class]}'

    @property
    def good(self) -> bool:
        return self.verdict != 'reject'


def make_label(verdict: str, material: str, layer_class: int | str) -> Label:
    """A validated label; raises RegistryError(INVALID_ARGUMENT) naming the bad part."""
    verdict = str(verdict).strip().lower()
    if verdict not in VERDICTS:
        raise RegistryError(INVALID_ARGUMENT, f'verdict must be one of {list(VERDICTS)}, got {verdict!r}')
    material = str(material).strip().lower()
    if material not in MATERIAL_NAMES:
        raise RegistryError(INVALID_ARGUMENT, f'unknown material {material!r}; one of {list(MATERIAL_NAMES)}')
    return Label(verdict, material, parse_layer_class(layer_class))


def decode_label(text: str) -> Label | None:
    """The label stored as ``text``, or None for a text this module did not write."""
    parts = (text or '').split(':')
    if len(parts) != 3 or parts[0] not in VERDICTS or parts[1] not in MATERIAL_NAMES or parts[2] not in LAYER_NAMES:
        return None
    return Label(parts[0], parts[1], LAYER_NAMES.index(parts[2]))


def check_who(who: str) -> str:
    who = (who or '').strip()
    if not WHO_PATTERN.match(who):
        raise RegistryError(INVALID_ARGUMENT, 'who must be 1-64 letters, digits, spaces or _.@-')
    return who


def resolve_crop(data_dir: Path, crop_path: str) -> Path:
    """A candidate crop file inside ``data_dir`` from its relative path; refuses anything outside it."""
    return resolve_inside(Path(data_dir), crop_path, what='crop')


def label_flake(store: FlakeStore, flake_id: str, label: Label, who: str) -> int:
    return store.add_label(label.encode(), check_who(who), flake_id=flake_id)


def label_crop(store: FlakeStore, data_dir: Path, crop_path: str, label: Label, who: str) -> int:
    path = resolve_crop(data_dir, crop_path)
    relative = path.relative_to(Path(data_dir).resolve()).as_posix()
    return store.add_label(label.encode(), check_who(who), crop_path=relative)


def candidate_crops(data_dir: Path, limit: int = 200) -> list[str]:
    """Candidate crop files under <data_dir>/candidates (relative paths), sorted."""
    root = Path(data_dir) / 'candidates'
    if not root.is_dir():
        return []
    found = sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [p.relative_to(data_dir).as_posix() for p in found[:limit]]


def withdrawn_ids(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Label id -> the row that withdrew it."""
    withdrawn = {}
    for row in rows:
        verdict, _, target = (row['label'] or '').partition(':')
        if verdict == WITHDRAWN and target.isdigit():
            withdrawn[int(target)] = row
    return withdrawn


def _standing_label(store: FlakeStore, label_id: int, withdrawn_message: str) -> dict[str, Any]:
    """The row of a label that exists and was not withdrawn; UNKNOWN_ID, or INVALID_ARGUMENT with the message."""
    rows = store.labels()
    row = next((r for r in rows if r['id'] == label_id and decode_label(r['label']) is not None), None)
    if row is None:
        raise RegistryError(UNKNOWN_ID, f'no label {label_id}')
    if label_id in withdrawn_ids(rows):
        raise RegistryError(INVALID_ARGUMENT, f'label {label_id} {withdrawn_message}')
    return row


def withdraw_label(store: FlakeStore, label_id: int, who: str) -> int:
    """Delete a label from the training set, keeping the history: a row that says who withdrew it, and when.

    The flake's (or crop's) previous label, if any, counts again. Raises UNKNOWN_ID for
    a label that does not exist and INVALID_ARGUMENT for one already withdrawn.
    """
    who = check_who(who)
    row = _standing_label(store, label_id, 'was already withdrawn')
    return store.add_label(f'{WITHDRAWN}:{label_id}', who, flake_id=row['flake_id'] or '',
                           crop_path=row['crop_path'] or '')


def correct_label(store: FlakeStore, label_id: int, label: Label, who: str) -> tuple[str, int]:
    """A new label on the flake or crop of label ``label_id`` (the newest label counts; the old one stays in
    the history); returns the old label's text and the new label's id. A withdrawn label is not corrected."""
    who = check_who(who)
    row = _standing_label(store, label_id, 'was withdrawn; label the flake anew instead')
    new_id = store.add_label(label.encode(), who, flake_id=row['flake_id'] or '', crop_path=row['crop_path'] or '')
    return row['label'], new_id


def latest_labels(store: FlakeStore) -> list[dict[str, Any]]:
    """The newest decodable, not withdrawn label of each flake or crop, oldest first."""
    rows = store.labels()
    withdrawn = withdrawn_ids(rows)
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        label = decode_label(row['label'])
        if label is None or row['id'] in withdrawn:
            continue
        key = ('flake', row['flake_id']) if row['flake_id'] else ('crop', row['crop_path'])
        newest[key] = dict(row, parsed=label)
    return sorted(newest.values(), key=lambda r: r['id'])


def _fit_crop(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def flake_crop(store: FlakeStore, flake_id: str, data_dir: Path, size: int = CROP_SIZE) -> np.ndarray | None:
    """A ``size`` x ``size`` BGR crop of the flake at camera resolution, or None when no image is kept.

    A stored crop image wins; otherwise the crop is cut around the flake's centre from
    the frame the detector saw it in (the registry's frames table maps wafer metres
    to that frame's pixels).
    """
    detail = store.get_flake(flake_id)
    for image in detail.images:
        if image.role in ('crop', 'thumbnail'):
            pixels = _read_image(Path(data_dir), image.path)
            if pixels is not None:
                return _fit_crop(pixels, size)
    flake = detail.flake
    frame = store.frames(flake.scan_id).get(flake.tile_index) if flake.scan_id else None
    if not frame or not frame.get('path'):
        return None
    pixels = _read_image(Path(data_dir), frame['path'])
    if pixels is None:
        return None
    u, v = Affine2D.from_list(frame['pixel_to_wafer']).inverse().apply(flake.x, flake.y)
    if not (math.isfinite(u) and math.isfinite(v)):
        return None
    half = size // 2
    padded = cv2.copyMakeBorder(pixels, size, size, size, size, cv2.BORDER_REFLECT)
    top, left = int(round(v)) + size - half, int(round(u)) + size - half
    if not (0 <= top <= padded.shape[0] - size and 0 <= left <= padded.shape[1] - size):
        return None
    return padded[top:top + size, left:left + size].copy()


def _read_image(data_dir: Path, path: str) -> np.ndarray | None:
    """An image the registry lists, only when it lies inside the data folder."""
    try:
        real = resolve_inside(Path(data_dir), path, allow_absolute=True, what='image')
    except RegistryError:
        return None
    return cv2.imread(str(real), cv2.IMREAD_COLOR)


@dataclass
class ExportSummary:
    folder: Path
    good: int
    bad: int
    skipped: list[str]

    @property
    def used(self) -> int:
        return self.good + self.bad

    def as_dict(self) -> dict:
        return {'folder': str(self.folder), 'good': self.good, 'bad': self.bad, 'used': self.used,
                'skipped': self.skipped}


def export_labelled_crops(store: FlakeStore, data_dir: Path, out_dir: Path, size: int = CROP_SIZE,
                          material: str = '') -> ExportSummary:
    """Write good/ and bad/ crops and labels.csv for every labelled flake or crop that has an image.

    ``material`` keeps only labels of that material (a cascade is trained per target);
    rejected crops of other materials are kept as bad examples, as Greplova et al. (2020) does.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    for name in ('good', 'bad'):
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    counts = {'good': 0, 'bad': 0}
    skipped: list[str] = []
    rows = []
    for row in latest_labels(store):
        label: Label = row['parsed']
        if material and label.good and label.material != material:
            continue
        if row['flake_id']:
            source = row['flake_id']
            pixels = flake_crop(store, row['flake_id'], data_dir, size)
        else:
            source = row['crop_path']
            pixels = _read_image(data_dir, row['crop_path'])
            pixels = None if pixels is None else _fit_crop(pixels, size)
        if pixels is None:
            skipped.append(source)
            continue
        kind = 'good' if label.good else 'bad'
        stem = re.sub(r'[^A-Za-z0-9_-]', '_', source if row['flake_id'] else Path(source).stem)[-48:]
        name = f'{kind}/{counts[kind]:06d}_{stem}.png'
        cv2.imwrite(str(out_dir / name), pixels)
        counts[kind] += 1
        rows.append({'file': name, 'good': int(label.good), 'verdict': label.verdict, 'material': label.material,
                     'layer_class': LAYER_NAMES[label.layer_class], 'source': source,
                     'labelled_by': row['labelled_by'] or '', 'created': row['created']})
    with open(out_dir / 'labels.csv', 'w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=['file', 'good', 'verdict', 'material', 'layer_class', 'source',
                                                    'labelled_by', 'created'])
        writer.writeheader()
        writer.writerows(rows)
    summary = ExportSummary(out_dir, counts['good'], counts['bad'], skipped)
    (out_dir / 'export.json').write_text(json.dumps(summary.as_dict(), indent=1))
    return summary

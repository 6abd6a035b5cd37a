"""flake-import: a folder of a lab's own micrographs into the registry, as one scan.

    flake-import micrographs/ --chip chip-7 --pixel-size 0.345um --positions stage.csv \\
        --param materials=graphene,hbn --param oxide_nm=90

Each image is run through a detector backend (``flake_detector.detection.make_detector``,
``--backend`` and ``--param name=value`` as in ``flake-detect``); its detections land in the
registry with the chip and scan id, merged with what the registry already knows of that
chip. The images are kept in the data folder (``scans/<scan>/frames/``) and recorded as the
scan's frames with their pixel -> wafer map, and every new flake gets a crop
(``scans/<scan>/crops/``), so the web app and the COCO export show real pixels.

Where each image was taken:
- ``--positions FILE.csv``: a header row with a file column (``file``, ``image`` or
  ``filename``) and the image centre's stage position, its unit in the column name
  (``x_um, y_um``, ``x_mm, y_mm`` or ``x_m, y_m``);
- ``--name-pattern REGEX``: the position read from each file name by a regular expression
  with the named groups ``x_um`` and ``y_um`` (or ``_mm``, ``_m``), e.g.
  ``'X(?P<x_um>-?[0-9.]+)_Y(?P<y_um>-?[0-9.]+)'``;
- neither: the images are laid side by side in a row (100 um apart), so flakes of
  different images never merge; their positions then say nothing about the chip.
Stage positions go into the chip's wafer frame when the registry holds one
(``SaveWaferFrame``); otherwise stage and wafer coordinates are taken to be the same.

An interrupted import continues where it stopped when run again with the same ``--scan``:
images whose frame is already recorded are skipped. Each image is stored in its own
transaction, so a crash loses at most the image being read.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import csv
from dataclasses import dataclass, field
import math
import os
from pathlib import Path
import re
import shutil
import sys
import time

import cv2
import numpy as np

from flake_core.geometry import Affine2D, pixel_to_wafer
from flake_core.materials import LAYER_CLASS_NAMES
from flake_registry.cli import report_refusals
from flake_registry.files import IMAGE_SUFFIXES
from flake_registry.query import INVALID_ARGUMENT, RegistryError
from flake_registry.records import Sighting
from flake_registry.store import FlakeStore

UNIT_METRES = {'nm': 1e-9, 'um': 1e-6, 'mm': 1e-3, 'm': 1.0}
FILE_COLUMNS = ('file', 'image', 'filename')
ROW_GAP = 100e-6                                # [m] between images laid side by side
CROP_MARGIN = 0.5                               # crop = flake box grown by half its size on each side
MIN_CROP_PX = 80


@dataclass(frozen=True)
class ImagePosition:
    x: float                                    # stage position of the image centre [m]
    y: float


@dataclass
class ImportSummary:
    scan_id: str
    chip_id: str
    images: int = 0
    imported: int = 0
    skipped: list[str] = field(default_factory=list)       # already imported in this scan
    unplaced: list[str] = field(default_factory=list)      # no position known
    unreadable: list[str] = field(default_factory=list)
    detections: int = 0
    new_flakes: int = 0
    refused: int = 0
    positions: str = ''


def find_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, in name order (numbers in names compared as numbers)."""
    def key(path: Path):
        return [int(part) if part.isdigit() else part.lower() for part in re.split(r'(\d+)', path.name)]

    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=key)


def _unit_of(column: str, axis: str) -> float | None:
    name = column.strip().lower()
    for unit, metres in UNIT_METRES.items():
        if name == f'{axis}_{unit}':
            return metres
    return None


def positions_from_csv(path: Path) -> dict[str, ImagePosition]:
    """File name -> stage position from a CSV with a file column and x_<unit>, y_<unit> columns."""
    with open(path, newline='') as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        file_column = next((c for c in columns if c.strip().lower() in FILE_COLUMNS), None)
        x_column = next((c for c in columns if _unit_of(c, 'x')), None)
        y_column = next((c for c in columns if _unit_of(c, 'y')), None)
        if file_column is None or x_column is None or y_column is None:
            raise RegistryError(INVALID_ARGUMENT, f'{path.name}: needs a header with a file column '
                                                  f'({", ".join(FILE_COLUMNS)}) and x_um, y_um (or _mm, _m) '
                                                  f'columns; found {columns}')
        x_unit, y_unit = _unit_of(x_column, 'x'), _unit_of(y_column, 'y')
        positions = {}
        for line, row in enumerate(reader, start=2):
            try:
                x, y = float(row[x_column]) * x_unit, float(row[y_column]) * y_unit
            except (TypeError, ValueError):
                raise RegistryError(INVALID_ARGUMENT, f'{path.name} line {line}: {x_column}, {y_column} must be '
                                                      f'numbers, got {row[x_column]!r}, {row[y_column]!r}') from None
            if not (math.isfinite(x) and math.isfinite(y)):
                raise RegistryError(INVALID_ARGUMENT, f'{path.name} line {line}: position is not finite')
            positions[Path(row[file_column].strip()).name] = ImagePosition(x, y)
    return positions


def position_from_name(pattern: re.Pattern, name: str) -> ImagePosition | None:
    """The stage position a file name states through ``pattern``'s x_<unit>, y_<unit> groups."""
    match = pattern.search(Path(name).stem)
    if match is None:
        return None
    values = {}
    for group, text in match.groupdict().items():
        axis, _, unit = group.partition('_')
        if axis in ('x', 'y') and unit in UNIT_METRES and text is not None:
            values[axis] = float(text) * UNIT_METRES[unit]
    if set(values) != {'x', 'y'}:
        return None
    return ImagePosition(values['x'], values['y'])


def compile_name_pattern(text: str) -> re.Pattern:
    try:
        pattern = re.compile(text)
    except re.error as error:
        raise RegistryError(INVALID_ARGUMENT, f'--name-pattern is not a regular expression: {error}') from None
    axes = {name.partition('_')[0] for name in pattern.groupindex
            if name.partition('_')[2] in UNIT_METRES}
    if axes != {'x', 'y'}:
        raise RegistryError(INVALID_ARGUMENT, '--name-pattern needs the named groups x_um and y_um (or x_mm, '
                                              'y_mm, x_m, y_m), e.g. X(?P<x_um>-?[0-9.]+)_Y(?P<y_um>-?[0-9.]+)')
    return pattern


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def sightings_of(detections, to_wafer: Affine2D, shape: tuple[int, int], chip_id: str, scan_id: str,
                 tile_index: int, stamp: float, backend: str) -> list[Sighting]:
    """The registry's record of each detection of one image (wafer frame, SI units)."""
    from flake_detector.detection import wafer_geometry

    sightings = []
    for det in detections:
        geometry = wafer_geometry(det, to_wafer, shape)
        mask = np.where(det.mask, 255, 0).astype(np.uint8)
        sightings.append(Sighting(
            chip_id=chip_id, scan_id=scan_id, x=geometry.centre[0], y=geometry.centre[1], material=det.material,
            tile_index=tile_index, layer_class=int(det.layer_class), layers=_finite(det.layers),
            layers_std=_finite(det.layers_std), thickness_nm=_finite(det.thickness_nm),
            thickness_nm_std=_finite(det.thickness_nm_std), score=_finite(det.score),
            detector=det.detector or backend, model_version=det.model_version,
            contour=[(float(x), float(y)) for x, y in geometry.contour], area=geometry.area_m2,
            bbox_px=tuple(int(v) for v in det.bbox), homogeneity=_finite(det.homogeneity),
            isolation_distance=_finite(geometry.isolation_m), edge_straightness=_finite(det.edge_straightness),
            stamp=stamp, mask=mask.tobytes(), mask_width=mask.shape[1], mask_height=mask.shape[0]))
    return sightings


def crop_of(image: np.ndarray, bbox: Sequence[int]) -> np.ndarray:
    """A square cut of ``image`` around ``bbox`` with a margin (at least MIN_CROP_PX wide)."""
    x, y, w, h = bbox
    side = max(MIN_CROP_PX, int(round(max(w, h) * (1 + 2 * CROP_MARGIN))))
    cx, cy = x + w / 2, y + h / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    height, width = image.shape[:2]
    left, top = min(max(left, 0), max(width - side, 0)), min(max(top, 0), max(height - side, 0))
    return image[top:top + side, left:left + side]


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix('.part.png')
    if not cv2.imwrite(str(temporary), pixels):
        raise OSError(f'cannot write {path}')
    os.replace(temporary, path)  # never a half-written file under the final name


def import_folder(store: FlakeStore, data_dir: Path, images: Sequence[Path], *, chip_id: str, scan_id: str,
                  detector, pixel_size: float, positions: Callable[[int, Path, tuple[int, int]], ImagePosition | None],
                  objective: str = '', camera_rotation: float = 0.0, min_score: float = 0.0,
                  progress: Callable[[str], None] = lambda line: None) -> ImportSummary:
    """Detect, store and keep every image of ``images`` as frames of ``scan_id`` on ``chip_id``.

    ``positions(index, path, (height, width))`` gives the image centre's stage position [m],
    or None when it is not known (the image is then left out and listed).
    """
    data_dir = Path(data_dir)
    summary = ImportSummary(scan_id=scan_id, chip_id=chip_id, images=len(images))
    frame = store.wafer_frame(chip_id)
    stage_to_wafer = Affine2D.from_list(frame.stage_to_wafer) if frame is not None else Affine2D()
    done = store.frames(scan_id)
    scan_dir = data_dir / 'scans' / scan_id
    for index, source in enumerate(images):
        stored_name = f'{index:05d}_{source.name}'
        if index in done and Path(done[index].get('path') or '').name == stored_name:
            summary.skipped.append(source.name)
            progress(f'[{index + 1}/{len(images)}] {source.name}: already imported in scan {scan_id}')
            continue
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            summary.unreadable.append(source.name)
            progress(f'[{index + 1}/{len(images)}] {source.name}: not a readable image, left out')
            continue
        height, width = image.shape[:2]
        position = positions(index, source, (height, width))
        if position is None:
            summary.unplaced.append(source.name)
            progress(f'[{index + 1}/{len(images)}] {source.name}: no stage position, left out')
            continue
        to_wafer = pixel_to_wafer(position.x, position.y, pixel_size, width, height, stage_to_wafer,
                                  camera_rotation)
        detections = [d for d in detector.detect(np.ascontiguousarray(image)).detections if d.score >= min_score]
        stamp = source.stat().st_mtime
        kept = scan_dir / 'frames' / stored_name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, kept)
        sightings = sightings_of(detections, to_wafer, (height, width), chip_id, scan_id, index, stamp,
                                 getattr(detector, 'name', ''))
        outcomes = store.ingest(sightings)
        for sighting, outcome in zip(sightings, outcomes, strict=True):
            if outcome.error:
                summary.refused += 1
                progress(f'  refused a detection of {source.name}: {outcome.error}')
            elif outcome.is_new:
                crop = scan_dir / 'crops' / f'{outcome.flake_id}.png'
                _write_png(crop, crop_of(image, sighting.bbox_px))
                store.add_image(outcome.flake_id, 'crop', crop.relative_to(data_dir).as_posix(), objective,
                                pixel_size, stamp)
        # Recorded last: a frame on record means its image was imported whole.
        store.record_frame(scan_id, index, to_wafer.as_list(), width, height, pixel_size, stamp,
                           kept.relative_to(data_dir).as_posix())
        new = sum(o.is_new and not o.error for o in outcomes)
        summary.imported += 1
        summary.detections += len(detections)
        summary.new_flakes += new
        classes = ', '.join(f'{d.material} {LAYER_CLASS_NAMES.get(d.layer_class, "?")}' for d in detections[:4])
        progress(f'[{index + 1}/{len(images)}] {source.name}: {len(detections)} flake(s), {new} new'
                 + (f' ({classes}{", ..." if len(detections) > 4 else ""})' if detections else ''))
    return summary


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from flake_detector.cli import parse_param, pixel_size_option
    from flake_detector.detection import available_detectors

    parser = argparse.ArgumentParser(prog='flake-import', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 2)[2])
    parser.add_argument('folder', type=Path, help='folder of micrographs (png, jpg, tif, bmp)')
    parser.add_argument('--chip', required=True, help='chip id the images show')
    parser.add_argument('--scan', default='', help='scan id (default: import-<folder>-<local time>); '
                                                   'the same id again continues an interrupted import')
    parser.add_argument('--pixel-size', type=pixel_size_option, required=True,
                        help='size of one image pixel on the sample, e.g. 0.345um (a bare number is um)')
    parser.add_argument('--objective', default='', help='objective the images were taken with, e.g. 20x')
    parser.add_argument('--camera-rotation-deg', type=float, default=0.0,
                        help='angle of the image +u axis from the stage +x axis [deg]')
    where = parser.add_mutually_exclusive_group()
    where.add_argument('--positions', type=Path, help='CSV of stage positions: file, x_um, y_um (or _mm, _m)')
    where.add_argument('--name-pattern', help='regular expression with groups x_um, y_um read from file names')
    parser.add_argument('--backend', default='contrast', help=f'detector backend, one of {available_detectors()}')
    parser.add_argument('--param', action='append', type=parse_param, default=[],
                        help='backend parameter name=value (repeatable), e.g. materials=graphene,hbn')
    parser.add_argument('--min-score', type=float, default=0.0, help='leave out detections scored below this')
    parser.add_argument('--data-dir', type=Path, default=None,
                        help='data folder of the registry (default: $FLAKE_DATA_DIR or ./data)')
    parser.add_argument('--db', type=Path, default=None, help='registry file (default: DATA_DIR/registry.sqlite)')
    return parser


def _positions(args, images: Sequence[Path]):
    if args.positions is not None:
        table = positions_from_csv(args.positions)
        return lambda index, path, shape: table.get(path.name), f'stage positions from {args.positions.name}'
    if args.name_pattern:
        pattern = compile_name_pattern(args.name_pattern)
        return lambda index, path, shape: position_from_name(pattern, path.name), 'stage positions from file names'
    # Each image one pitch further along x, the pitch the widest image plus a gap, so that
    # no flake of one image can merge with one of its neighbour.
    pitch = max(_image_side(path) for path in images) * args.pixel_size + ROW_GAP
    return (lambda index, path, shape: ImagePosition(index * pitch, 0.0),
            'no stage positions: images laid side by side, 100 um apart')


def _image_side(path: Path) -> int:
    """The longer side of an image [px] from its header (0 when unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return max(image.size)
    except (OSError, UnidentifiedImageError):
        return 0


def run(args, out=None) -> int:
    from flake_detector.detection import make_detector

    out = out or sys.stdout

    folder = args.folder
    if not folder.is_dir():
        raise RegistryError(INVALID_ARGUMENT, f'{folder} is not a folder')
    if not args.chip.strip():
        raise RegistryError(INVALID_ARGUMENT, '--chip must not be empty')
    images = find_images(folder)
    if not images:
        raise RegistryError(INVALID_ARGUMENT, f'no images ({", ".join(sorted(IMAGE_SUFFIXES))}) in {folder}')
    if not 0.0 <= args.min_score <= 1.0:
        raise RegistryError(INVALID_ARGUMENT, f'--min-score must be in [0, 1], got {args.min_score}')
    positions, how = _positions(args, images)
    try:
        detector = make_detector(args.backend, **dict(args.param))
    except (TypeError, ValueError, KeyError) as error:
        raise RegistryError(INVALID_ARGUMENT, f'detector {args.backend!r}: {error}') from None
    data_dir = args.data_dir or Path(os.environ.get('FLAKE_DATA_DIR') or 'data')
    db_path = args.db or data_dir / 'registry.sqlite'
    scan_id = args.scan or f'import-{folder.resolve().name}-{time.strftime("%Y%m%dT%H%M%S")}'
    print(f'importing {len(images)} image(s) from {folder} as scan {scan_id} of chip {args.chip} into {db_path} '
          f'({how}; pixel {args.pixel_size / 1e-6:.4g} um)', file=out)
    with FlakeStore(db_path) as store:
        if store.wafer_frame(args.chip) is None:
            print(f'chip {args.chip} has no wafer frame in the registry: stage coordinates are used as wafer '
                  'coordinates', file=out)
        summary = import_folder(store, data_dir, images, chip_id=args.chip, scan_id=scan_id, detector=detector,
                                pixel_size=args.pixel_size, positions=positions, objective=args.objective,
                                camera_rotation=math.radians(args.camera_rotation_deg), min_score=args.min_score,
                                progress=lambda line: print(line, file=out, flush=True))
    print(f'scan {scan_id}: {summary.imported} of {summary.images} image(s) imported, {summary.detections} '
          f'detection(s), {summary.new_flakes} new flake(s)'
          + (f'; {len(summary.skipped)} already imported' if summary.skipped else '')
          + (f'; left out without a position: {", ".join(summary.unplaced)}' if summary.unplaced else '')
          + (f'; unreadable: {", ".join(summary.unreadable)}' if summary.unreadable else '')
          + (f'; {summary.refused} detection(s) refused' if summary.refused else ''), file=out)
    return 0 if summary.imported or summary.skipped else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return report_refusals(lambda: run(args))


if __name__ == '__main__':
    sys.exit(main())

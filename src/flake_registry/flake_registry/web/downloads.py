"""Zip downloads of a flake, a scan and a chip, in the units people read.

A flake's zip holds its record (``flake.json``), its outline (``outline.csv`` in µm and
``outline.png`` to scale), the frame it was detected in (the file as stored and a
full-resolution cut-out with outline, scale bar and legend), every image stored with
it (revisits, crops) as stored and annotated, and a README naming the units. A scan's
or chip's zip holds ``flakes.csv`` and ``flakes.json`` for all their flakes and the scan
mosaics, plain and annotated. Rows and records are those of ``flake_registry.export``
(``flake-registry export``): column names carry their unit (``area_um2``,
``thickness_nm``, ``x_um``); times are the lab's local time with the zone.

Zips are written to a temporary file that spills to disk beyond a few MB, so a chip of
100 000 flakes is streamed without holding the archive in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import csv
import io
import json
import tempfile
import time
from typing import IO
import zipfile

from flake_registry.export import CSV_COLUMNS, UNITS, csv_row, outline_um, people_record
from flake_registry.web import drawing, pictures
from flake_registry.web.context import WebContext
from flake_registry.web.summaries import chip_scope, scan_scope

SPOOL_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 256 * 1024
UNITS_NOTE = ('Lengths in micrometres (um), areas in square micrometres (um2), thicknesses in nanometres (nm), '
              'times in the lab\'s local time with its zone. Positions are the flake centre in the wafer frame of '
              'its chip (origin at the chip corner the scan was aligned to, x along the chip edge, y up).')


def _stream(archive_file: IO[bytes]) -> Iterator[bytes]:
    try:
        archive_file.seek(0)
        while chunk := archive_file.read(CHUNK_BYTES):
            yield chunk
    finally:
        archive_file.close()


def _archive() -> tuple[IO[bytes], zipfile.ZipFile]:
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    return spool, zipfile.ZipFile(spool, 'w', compression=zipfile.ZIP_DEFLATED, compresslevel=6)


def _put_png(archive: zipfile.ZipFile, name: str, pixels) -> None:
    archive.writestr(zipfile.ZipInfo(name, time.localtime()[:6]), drawing.encode_png(pixels), zipfile.ZIP_STORED)


def flake_zip(ctx: WebContext, flake_id: str) -> Iterator[bytes]:
    detail = ctx.store.get_flake(flake_id)
    flake = detail.flake
    spool, archive = _archive()
    contents = ['flake.json: the record (units in the key names), observations and images',
                'outline.csv: the outline in the wafer frame [um]', 'outline.png: the outline to scale']
    with archive:
        archive.writestr('flake.json', json.dumps(people_record(flake, detail), indent=1))
        buffer = io.StringIO()
        buffer.write('x_um,y_um\n')
        for x, y in outline_um(flake):
            buffer.write(f'{x:.3f},{y:.3f}\n')
        archive.writestr('outline.csv', buffer.getvalue())
        _put_png(archive, 'outline.png', pictures.outline_picture(flake))
        source = pictures.frame_source(ctx, flake)
        if source is not None:
            archive.write(source.path, f'frame_tile{source.tile_index:05d}{source.path.suffix.lower()}')
            cut = pictures.frame_picture(ctx, flake)
            if cut is not None:
                _put_png(archive, 'frame_flake.png', cut)
            contents.append('frame_tile*.*: the frame the flake was detected in, as stored; frame_flake.png: '
                            'the flake at full resolution with outline, scale bar and legend')
        else:
            contents.append('(the registry holds no frame of this flake)')
        for index, image in enumerate(detail.images):
            try:
                path = pictures.data_file(ctx, image.path)
                annotated = pictures.image_picture(ctx, detail, index)
            except Exception as refused:  # noqa: BLE001 - a missing image is listed, not fatal
                contents.append(f'{image.role} image {index}: not included ({refused})')
                continue
            stem = f'{image.role}_{index}'
            archive.write(path, f'{stem}{path.suffix.lower()}')
            _put_png(archive, f'{stem}_annotated.png', annotated)
            contents.append(f'{stem}{path.suffix.lower()}: {image.role} image as stored'
                            f'{" (" + image.objective + ")" if image.objective else ""}; '
                            f'{stem}_annotated.png: with scale bar and legend')
        archive.writestr('README.txt', f'Flake {flake.id} on chip {flake.chip_id}\n\n' + UNITS_NOTE + '\n\n'
                         + '\n'.join(contents) + '\n')
    return _stream(spool)


def _mosaics(ctx: WebContext, archive: zipfile.ZipFile, scan_ids: Iterable[str], contents: list[str]) -> None:
    for scan_id in scan_ids:
        meta = pictures.read_mosaic_meta(ctx, scan_id)
        if meta is None:
            continue
        archive.write(meta['path'], f'mosaic_{scan_id}.png')
        pixels = drawing.read_image(meta['path'])
        if pixels is not None:
            flakes = ctx.store.iter_flakes(**scan_scope(ctx.store, scan_id))
            _put_png(archive, f'mosaic_{scan_id}_annotated.png',
                     drawing.annotated_mosaic(pixels, meta['to_mosaic'], meta.get('metres_per_pixel')
                                              or 1 / meta['to_mosaic'].scale, flakes))
        contents.append(f'mosaic_{scan_id}.png: the scan mosaic; mosaic_{scan_id}_annotated.png: with every '
                        'outline, scale bar and legend')


def flakes_zip(ctx: WebContext, *, scan_id: str = '', chip_id: str = '') -> Iterator[bytes]:
    """All flakes of a scan or a chip, with the scan mosaics; the registry is read once."""
    spool, archive = _archive()
    what = f'scan {scan_id}' if scan_id else f'chip {chip_id}'
    scope = scan_scope(ctx.store, scan_id) if scan_id else chip_scope(ctx.store, chip_id)
    contents = ['flakes.csv: one row per flake, units in the column names',
                'flakes.json: the same with outlines [um]']
    with archive, tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, mode='w+') as records:
        records.write(f'{{"{"scan_id" if scan_id else "chip_id"}": {json.dumps(scan_id or chip_id)}, '
                      f'"units": {json.dumps(UNITS)}, "flakes": [\n')
        count = 0
        with archive.open('flakes.csv', 'w') as raw, io.TextIOWrapper(raw, encoding='utf-8', newline='') as text:
            writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for flake in ctx.store.iter_flakes(**scope):
                writer.writerow(csv_row(flake))
                records.write((',\n' if count else '') + json.dumps(people_record(flake)))
                count += 1
        records.write('\n]}\n')
        records.seek(0)
        with archive.open('flakes.json', 'w') as raw, io.TextIOWrapper(raw, encoding='utf-8') as text:
            while chunk := records.read(CHUNK_BYTES):
                text.write(chunk)
        scans = [scan_id] if scan_id else [s['id'] for s in ctx.store.scans(chip_id)]
        _mosaics(ctx, archive, scans, contents)
        archive.writestr('README.txt', f'{count} flakes of {what}\n\n{UNITS_NOTE}\n\n' + '\n'.join(contents) + '\n')
    return _stream(spool)

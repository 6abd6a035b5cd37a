"""Zip downloads of a flake, a scan and a chip (people's units, pictures with scale bars)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from flake_registry.query import UNKNOWN_ID, RegistryError
from flake_registry.web import downloads
from flake_registry.web.context import require_read, web
from flake_registry.web.forms import check_flake_id, check_name

NAV = None
router = APIRouter(dependencies=[Depends(require_read)])


def _zip(chunks, name: str) -> StreamingResponse:
    return StreamingResponse(chunks, media_type='application/zip',
                             headers={'Content-Disposition': f'attachment; filename="{name}.zip"'})


@router.get('/flakes/{flake_id}/download.zip')
def flake_download(request: Request, flake_id: str):
    """The flake: record, outline, detection frame, revisit and other images (annotated and as stored)."""
    return _zip(downloads.flake_zip(web(request), check_flake_id(flake_id)), f'flake_{flake_id}')


@router.get('/scans/{scan_id}/download.zip')
def scan_download(request: Request, scan_id: str):
    """Every flake of the scan (CSV and JSON, units in the names) and its mosaic, plain and annotated."""
    ctx = web(request)
    check_name(scan_id, 'scan id')
    if not any(s['id'] == scan_id for s in ctx.store.scans()):
        raise RegistryError(UNKNOWN_ID, f'no scan {scan_id!r} in the registry')
    return _zip(downloads.flakes_zip(ctx, scan_id=scan_id), f'scan_{scan_id}')


@router.get('/chips/{chip_id}/download.zip')
def chip_download(request: Request, chip_id: str):
    """Every flake of the chip and the mosaics of its scans."""
    ctx = web(request)
    check_name(chip_id, 'chip id')
    if not any(c['id'] == chip_id for c in ctx.store.chips()):
        raise RegistryError(UNKNOWN_ID, f'no chip {chip_id!r} in the registry')
    return _zip(downloads.flakes_zip(ctx, chip_id=chip_id), f'chip_{chip_id}')

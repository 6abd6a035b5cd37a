"""Chip map: a scan's mosaic in the wafer frame with a marker per flake, thin flakes first beside it, and the
thickness and area distributions of the scan's flakes per material."""

from __future__ import annotations

from dataclasses import replace
import math

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
import numpy as np

from flake_core import materials
from flake_core.geometry import Affine2D
from flake_registry.files import resolve_inside
from flake_registry.query import LAYER_NAMES, MAX_LIMIT, UNKNOWN_ID, FlakeQuery, RegistryError
from flake_registry.web import pictures
from flake_registry.web.context import NavEntry, require_read, web
from flake_registry.web.forms import check_name
from flake_registry.web.rendering import LAYER_STYLES, page
from flake_registry.web.summaries import scan_distributions, scan_scope, thin_summary

NAV = NavEntry('chipmap', 'Chip map', '/')
router = APIRouter(dependencies=[Depends(require_read)])
# Outlines are sent with the markers when a zoomed view holds at most this many flakes.
MAX_OUTLINES = 1500


def known_scans(request: Request, scan_rows: list[dict]) -> list[str]:
    ctx = web(request)
    names = {s['id'] for s in scan_rows if s['id']}
    scans_dir = ctx.data_dir / 'scans'
    if scans_dir.is_dir():
        names.update(p.name for p in scans_dir.iterdir() if (p / 'mosaic.json').is_file())
    out = []
    for name in sorted(names):
        try:
            out.append(check_name(name, 'scan id'))
        except RegistryError:
            continue
    return out


@router.get('/', response_class=HTMLResponse, include_in_schema=False)
def chip_map(request: Request, scan_id: str = Query('', max_length=128)):
    scan_rows = web(request).store.scans()
    scans = known_scans(request, scan_rows)
    if scan_id:
        check_name(scan_id, 'scan id')
        if scan_id not in scans:
            raise RegistryError(UNKNOWN_ID, f'no scan {scan_id!r}')
    chosen = scan_id or (scans[-1] if scans else '')
    store = web(request).store
    thin = thin_summary(store, scan_id=chosen, scans=scan_rows) if chosen else None
    distributions = scan_distributions(store, chosen, scans=scan_rows) if chosen else None
    chip_id = next((s['chip_id'] for s in scan_rows if s['id'] == chosen), '')
    return page(request, 'chipmap.html', {'page': 'chipmap', 'scans': scans, 'scan_id': chosen, 'thin': thin,
                                          'distributions': distributions, 'chip_id': chip_id})


@router.get('/api/chipmap')
def chip_map_data(request: Request, scan_id: str = Query(..., min_length=1, max_length=128),
                  region: str = Query('', max_length=200, description='min_x,min_y,max_x,max_y [m], wafer frame'),
                  outlines: bool = Query(False, description='send each flake outline (zoomed views)')):
    """Markers of the scan's best flakes (at most max_markers), or of those inside ``region``.

    With ``outlines`` and at most 1500 flakes in view, each marker carries its outline in
    view coordinates, so a zoomed map can draw outlines around the flakes instead of
    discs over them.
    """
    ctx = web(request)
    check_name(scan_id, 'scan id')
    meta = pictures.read_mosaic_meta(ctx, scan_id)
    base = FlakeQuery.from_mapping({**scan_scope(ctx.store, scan_id), 'sort_by': 'score', 'limit': MAX_LIMIT,
                                    'region': region})
    flakes, total, offset = [], None, 0
    while offset < ctx.max_markers:
        result = ctx.store.query(replace(base, offset=offset, limit=min(MAX_LIMIT, ctx.max_markers - offset)),
                                 contours=outlines)
        total = result.total if total is None else total
        flakes.extend(result.flakes)
        offset += len(result.flakes)
        if not result.flakes or offset >= result.total:
            break
    if meta is not None:
        to_view = meta['to_mosaic']
        view = {'x': 0, 'y': 0, 'w': meta['width'], 'h': meta['height']}
    else:
        # No mosaic yet: micrometres with +y up, so the map still reads like the wafer.
        to_view = Affine2D(1e6, 0, 0, 0, -1e6, 0)
        if flakes:
            us, vs = to_view.apply(np.array([f.x for f in flakes]), np.array([f.y for f in flakes]))
            view = {'x': float(us.min()), 'y': float(vs.min()), 'w': float(np.ptp(us)) or 100.0,
                    'h': float(np.ptp(vs)) or 100.0}
        else:
            view = {'x': 0, 'y': 0, 'w': 100, 'h': 100}
    extent = max(view['w'], view['h'])
    if base.region is not None:
        corners = to_view.apply_points(np.array([base.region[:2], base.region[2:]]))
        extent = float(np.abs(corners[1] - corners[0]).max()) or extent
    minimum_radius = 0.004 * extent
    send_outlines = outlines and len(flakes) <= MAX_OUTLINES
    markers = []
    scale = to_view.scale
    centres = to_view.apply_points(np.array([(f.x, f.y) for f in flakes], dtype=np.float64).reshape(-1, 2))
    for f, (u, v) in zip(flakes, np.round(centres, 2).tolist(), strict=True):
        name = LAYER_NAMES[f.layer_class]
        marker = {'id': f.id, 'u': u, 'v': v, 'material': f.material,
                  'layer_class': f.layer_class, 'layer_name': name, 'score': f.score,
                  'thickness_nm': round(f.thickness_nm, 2),
                  'r': round(max(math.sqrt(max(f.area, 0) / math.pi) * scale, minimum_radius), 2),
                  'colour': materials.colour(f.material),
                  'fill': LAYER_STYLES[name]['fill'], 'stroke': LAYER_STYLES[name]['stroke']}
        if send_outlines and len(f.contour) >= 3:
            points = to_view.apply_points(np.asarray(f.contour, dtype=np.float64))
            marker['outline'] = np.round(points, 2).tolist()
        markers.append(marker)
    mosaic = None
    if meta is not None:
        mosaic = {'url': f'/scans/{scan_id}/mosaic.png', 'width': meta['width'], 'height': meta['height'],
                  'metres_per_pixel': meta.get('metres_per_pixel')}
    # Plain JSON values throughout: a JSONResponse skips FastAPI's encoder, which took most of
    # the time of 5 000 markers.
    return JSONResponse({'scan_id': scan_id, 'total': total or 0, 'markers': markers, 'mosaic': mosaic, 'view': view,
                         'to_view': to_view.as_list(), 'metres_per_view_unit': 1 / to_view.scale,
                         'region': list(base.region) if base.region else None, 'outlines': send_outlines})


@router.get('/scans/{scan_id}/mosaic.png', include_in_schema=False)
def mosaic_png(request: Request, scan_id: str):
    check_name(scan_id, 'scan id')
    path = resolve_inside(web(request).data_dir, f'scans/{scan_id}/mosaic.png', what='mosaic')
    return FileResponse(path, media_type='image/png')

"""Flakes: the browser (QueryFlakes' filters in people's units), the flake page, its pictures and controls."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from flake_core import materials
from flake_core.units import UM, local_time
from flake_registry import control, labelling
from flake_registry.query import LAYER_NAMES, MAX_LIMIT, SORT_KEYS, STATUS_NAMES, RegistryError
from flake_registry.store import FlakeRecord
from flake_registry.web import drawing, pictures
from flake_registry.web.context import NavEntry, require_read, require_write, web
from flake_registry.web.forms import FLAKE_ID_PATTERN, NOTE_MAX, WHO_MAX, ControlIn, browser_query, check_flake_id
from flake_registry.web.rendering import page
from flake_registry.web.summaries import thin_summary

NAV = NavEntry('flakes', 'Flakes', '/flakes')
router = APIRouter(dependencies=[Depends(require_read)])
PNG_HEADERS = {'Cache-Control': 'max-age=60'}


def png(pixels) -> Response:
    return Response(drawing.encode_png(pixels), media_type='image/png', headers=PNG_HEADERS)


def flake_json(f: FlakeRecord) -> dict[str, Any]:
    """A flake for the JSON API: SI units as on the topics, plus the people's units beside them."""
    return {'id': f.id, 'chip_id': f.chip_id, 'scan_id': f.scan_id, 'material': f.material,
            'layer_class': LAYER_NAMES[f.layer_class], 'layers': f.layers, 'layers_std': f.layers_std,
            'thickness_nm': f.thickness_nm, 'thickness_nm_std': f.thickness_nm_std, 'score': f.score,
            'area': f.area, 'area_um2': round(f.area / UM ** 2, 3), 'x': f.x, 'y': f.y,
            'x_um': round(f.x / UM, 3), 'y_um': round(f.y / UM, 3), 'status': STATUS_NAMES[f.status],
            'reserved_by': f.reserved_by, 'homogeneity': f.homogeneity, 'n_observations': f.n_observations,
            'colour': materials.colour(f.material)}


@router.get('/flakes', response_class=HTMLResponse, include_in_schema=False)
def flake_browser(request: Request):
    ctx = web(request)
    query, form = browser_query(request.query_params)
    result = ctx.store.query(query)
    page_number = form['page']
    page_count = max(1, math.ceil(result.total / query.limit))

    def page_url(number: int) -> str:
        items = [(k, v) for k, v in request.query_params.multi_items() if k != 'page']
        return '/flakes?' + urlencode(items + [('page', str(number))])

    # Without filters the page opens with the thin flakes people hunt: monolayers first.
    thin = thin_summary(ctx.store) if not request.query_params else None
    first = query.offset + 1 if result.flakes else 0
    return page(request, 'flakes.html', {
        'page': 'flakes', 'form': form, 'flakes': result.flakes, 'total': result.total, 'thin': thin,
        'first': first, 'last': query.offset + len(result.flakes), 'page_number': page_number,
        'page_count': page_count, 'sort_keys': SORT_KEYS, 'max_limit': MAX_LIMIT,
        'prev_url': page_url(page_number - 1) if page_number > 1 else '',
        'next_url': page_url(page_number + 1) if query.offset + len(result.flakes) < result.total else ''})


@router.get('/api/flakes')
def flakes_api(request: Request):
    """Flakes matching the browser's filters (areas in µm², distances in µm, thickness in nm; units accepted)."""
    query, _ = browser_query(request.query_params)
    result = web(request).store.query(query, contours=False)
    return JSONResponse({'total': result.total, 'offset': query.offset, 'limit': query.limit,
                         'flakes': [flake_json(f) for f in result.flakes]})


def flake_history(request: Request, flake: FlakeRecord) -> list[dict[str, Any]]:
    """Reservations, releases, use and label changes of one flake, oldest first."""
    store = web(request).store
    history = []
    for r in store.reservations(flake.id, live_only=False):
        history.append({'stamp': r['created'], 'kind': 'reserved', 'who': r['robot_id'],
                        'detail': f'lease until {local_time(r["expires"])}'})
        if r['ended']:
            history.append({'stamp': r['ended'], 'kind': r['outcome'] or 'ended', 'who': r['robot_id'],
                            'detail': ''})
    if flake.used_at:
        history.append({'stamp': flake.used_at, 'kind': 'used', 'who': flake.used_by, 'detail': flake.used_note})
    history.sort(key=lambda h: h['stamp'])
    return history


def flake_labels(request: Request, flake_id: str) -> list[dict[str, Any]]:
    rows = web(request).store.labels(flake_id)
    withdrawn = labelling.withdrawn_ids(rows)
    labels = []
    for row in rows:
        parsed = labelling.decode_label(row['label'])
        if parsed is None:
            continue
        gone = withdrawn.get(row['id'])
        labels.append({'id': row['id'], 'when': row['created'], 'who': row['labelled_by'] or '',
                       'verdict': parsed.verdict, 'material': parsed.material, 'layer_class': parsed.layer_class,
                       'withdrawn_by': gone['labelled_by'] if gone else '',
                       'withdrawn_at': gone['created'] if gone else None})
    return labels


@router.get('/flakes/{flake_id}', response_class=HTMLResponse, include_in_schema=False)
def flake_page(request: Request, flake_id: str, who: str = Query('', max_length=WHO_MAX),
               done: str = Query('', max_length=200)):
    ctx = web(request)
    detail = ctx.store.get_flake(check_flake_id(flake_id))
    flake = detail.flake
    labels = flake_labels(request, flake_id)
    current = next((entry for entry in reversed(labels) if not entry['withdrawn_by']), None)
    images = [{'index': i, 'role': im.role, 'objective': im.objective, 'pixel_size': im.pixel_size}
              for i, im in enumerate(detail.images)]
    images.sort(key=lambda image: image['role'] != 'revisit')
    return page(request, 'flake.html', {
        'page': 'flakes', 'flake': flake, 'labels': labels, 'current_label': current,
        'history': flake_history(request, flake), 'observations': detail.observations, 'images': images,
        'has_frame': pictures.frame_source(ctx, flake) is not None, 'who': who or request.cookies.get('labeller', ''),
        'done': done, 'caption': drawing.flake_caption(flake.material, flake.layer_class, flake.thickness_nm,
                                                        flake.thickness_nm_std)})


@router.get('/api/flakes/{flake_id}')
def flake_api(request: Request, flake_id: str):
    """One flake with outline, observations, images, labels and reservation history (no tokens)."""
    store = web(request).store
    detail = store.get_flake(check_flake_id(flake_id))
    body = flake_json(detail.flake)
    body.update(contour=[list(p) for p in detail.flake.contour],
                observations=[vars(o) for o in detail.observations],
                images=[vars(i) for i in detail.images],
                labels=store.labels(flake_id),
                reservations=[{k: v for k, v in r.items() if k != 'token'}
                              for r in store.reservations(flake_id, live_only=False)])
    return body


# -- pictures ------------------------------------------------------------------------------------


@router.get('/flakes/{flake_id}/thumb.png', include_in_schema=False)
def flake_thumbnail(request: Request, flake_id: str):
    return png(pictures.thumbnail(web(request), web(request).store.get_flake(check_flake_id(flake_id))))


@router.get('/flakes/{flake_id}/frame.png', include_in_schema=False)
def flake_frame(request: Request, flake_id: str, whole: bool = False):
    ctx = web(request)
    flake = ctx.store.get_flake(check_flake_id(flake_id)).flake
    pixels = pictures.frame_picture(ctx, flake, whole=whole)
    if pixels is None:
        raise RegistryError('UNKNOWN_ID', f'the registry holds no frame of flake {flake_id}')
    return png(pixels)


@router.get('/flakes/{flake_id}/context.png', include_in_schema=False)
def flake_context(request: Request, flake_id: str):
    ctx = web(request)
    flake = ctx.store.get_flake(check_flake_id(flake_id)).flake
    pixels = pictures.mosaic_picture(ctx, flake, 320)
    return png(pixels if pixels is not None else pictures.outline_picture(flake))


@router.get('/flakes/{flake_id}/outline.png', include_in_schema=False)
def flake_outline(request: Request, flake_id: str):
    return png(pictures.outline_picture(web(request).store.get_flake(check_flake_id(flake_id)).flake))


@router.get('/flakes/{flake_id}/images/{index}.png', include_in_schema=False)
def flake_image_annotated(request: Request, flake_id: str, index: int):
    ctx = web(request)
    return png(pictures.image_picture(ctx, ctx.store.get_flake(check_flake_id(flake_id)), index))


@router.get('/images/{index}', include_in_schema=False)
def flake_image(request: Request, index: int, flake_id: str = Query(..., pattern=FLAKE_ID_PATTERN)):
    """A stored image file of the flake as it is, only from inside the data folder."""
    ctx = web(request)
    images = ctx.store.get_flake(flake_id).images
    if not 0 <= index < len(images):
        raise RegistryError('UNKNOWN_ID', f'flake {flake_id} has no image {index}')
    return FileResponse(pictures.data_file(ctx, images[index].path))


# -- control: release and mark used ---------------------------------------------------------------


def _back(flake_id: str, who: str, done: str) -> RedirectResponse:
    return RedirectResponse(f'/flakes/{flake_id}?{urlencode({"who": who, "done": done})}', status_code=303)


@router.post('/flakes/{flake_id}/release', dependencies=[Depends(require_write)], include_in_schema=False)
def release_form(request: Request, flake_id: str, who: str = Form(..., max_length=WHO_MAX)):
    result = control.release_flake(web(request).store, check_flake_id(flake_id), who)
    return _back(flake_id, who, f'released (was reserved by {result["released_from"]})')


@router.post('/flakes/{flake_id}/mark-used', dependencies=[Depends(require_write)], include_in_schema=False)
def mark_used_form(request: Request, flake_id: str, who: str = Form(..., max_length=WHO_MAX),
                   note: str = Form('', max_length=NOTE_MAX)):
    control.mark_flake_used(web(request).store, check_flake_id(flake_id), who, note)
    return _back(flake_id, who, 'marked used')


@router.post('/api/flakes/{flake_id}/release', dependencies=[Depends(require_write)])
def release_api(request: Request, flake_id: str, body: ControlIn):
    """End the flake's live reservation (recorded as released); NOT_RESERVED when it has none."""
    return control.release_flake(web(request).store, check_flake_id(flake_id), body.who)


@router.post('/api/flakes/{flake_id}/mark-used', dependencies=[Depends(require_write)])
def mark_used_api(request: Request, flake_id: str, body: ControlIn):
    """Take the flake out of the pool (under its live reservation, or reserved and used at once)."""
    return control.mark_flake_used(web(request).store, check_flake_id(flake_id), body.who, body.note)

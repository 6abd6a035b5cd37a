"""The lab web app: chip map, flake browser, labelling, stack planner and defect reports.

It reads and writes the registry's SQLite file through ``FlakeStore`` (the same core
the registry node uses), so it runs next to a live registry node: SQLite WAL lets
both read at once and serialises their writes, and reservations stay atomic across
the two processes.

Served on 127.0.0.1 by default. Bound to any other address it refuses to start
without ``--token``; with a token, every write (labels, stack recipes, reservations)
needs it, as an ``X-Flake-Token`` header or the cookie that /login sets.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from dataclasses import replace
import hmac
import ipaddress
import json
import logging
import math
import os
from pathlib import Path
import re
import sys
import threading
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import cv2
from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from flake_core import materials
from flake_core.geometry import Affine2D
from flake_core.materials import MATERIAL_NAMES
from flake_registry import labelling, stacks
from flake_registry.query import (
    DEFAULT_LIMIT,
    INVALID_ARGUMENT,
    INVALID_RANGE,
    LAYER_NAMES,
    MAX_LIMIT,
    SORT_KEYS,
    STATUS_NAMES,
    FlakeQuery,
    RegistryError,
)
from flake_registry.store import FlakeStore

log = logging.getLogger('flake_web')

HERE = Path(__file__).resolve().parent
TOKEN_COOKIE = 'flake_token'
TOKEN_HEADER = 'x-flake-token'
MATERIAL_COLOURS = {name: materials.colour(name) for name in MATERIAL_NAMES}
# Marker fill and outline width by layer class: the thinner the flake, the bolder its marker.
LAYER_STYLES = {'unknown': {'fill': 0.15, 'stroke': 1}, 'mono': {'fill': 0.9, 'stroke': 3},
                'few': {'fill': 0.6, 'stroke': 2}, 'thick': {'fill': 0.3, 'stroke': 1.5},
                'bulk': {'fill': 0.1, 'stroke': 1}}
MAX_MARKERS = 5000
THUMB_PIXELS = 120
SCAN_ID_PATTERN = re.compile(r'^[A-Za-z0-9_.\-]{1,128}$')
FLAKE_ID_PATTERN = r'^[A-Za-z0-9_.\-]{1,64}$'
# Browser form fields in display units -> FlakeQuery fields in SI units.
UNIT_FIELDS = {'area_min_um2': ('area_min', 1e-12), 'area_max_um2': ('area_max', 1e-12),
               'max_distance_um': ('max_distance', 1e-6)}
HTTP_STATUS_OF_CODE = {'UNKNOWN_ID': 404, 'INVALID_ARGUMENT': 422, 'INVALID_RANGE': 422, 'ALREADY_RESERVED': 409,
                       'ALREADY_USED': 409, 'NOT_RESERVED': 409, 'WRONG_TOKEN': 403, 'LEASE_EXPIRED': 409}
CODE_OF_HTTP_STATUS = {401: 'UNAUTHORISED', 403: 'FORBIDDEN', 404: 'NOT_FOUND', 405: 'METHOD_NOT_ALLOWED'}
LOOPBACK_NAMES = ('localhost', 'localhost.localdomain', 'ip6-localhost')


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def utc_text(stamp: float | None) -> str:
    if not stamp:
        return ''
    return time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(stamp))


# ---------------------------------------------------------------------------
# Request bodies


class StackLayerIn(BaseModel):
    model_config = ConfigDict(extra='forbid')
    flake_id: str = Field(pattern=FLAKE_ID_PATTERN)
    rotation_deg: float = Field(0.0, ge=-360.0, le=360.0)
    offset_x_um: float = Field(0.0, ge=-1000.0, le=1000.0)
    offset_y_um: float = Field(0.0, ge=-1000.0, le=1000.0)

    def to_layer(self) -> stacks.StackLayer:
        return stacks.StackLayer(flake_id=self.flake_id, rotation=math.radians(self.rotation_deg),
                                 offset_x=self.offset_x_um * 1e-6, offset_y=self.offset_y_um * 1e-6)


class StackPreviewIn(BaseModel):
    model_config = ConfigDict(extra='forbid')
    layers: list[StackLayerIn] = Field(min_length=1, max_length=stacks.MAX_LAYERS)


class StackIn(StackPreviewIn):
    name: str = Field(min_length=1, max_length=80, pattern=stacks.NAME_PATTERN.pattern)
    robot_id: str = Field('', max_length=64)
    lease_s: float = Field(0.0, ge=0.0, le=7 * 86400.0)
    reserve: bool = True

    @field_validator('robot_id')
    @classmethod
    def _robot(cls, value: str) -> str:
        if value and not stacks.ROBOT_PATTERN.match(value):
            raise ValueError('robot_id must be 1-64 letters, digits or _.-')
        return value


class LabelIn(BaseModel):
    model_config = ConfigDict(extra='forbid')
    who: str = Field(min_length=1, max_length=64)
    verdict: str
    material: str
    layer_class: str | int
    flake_id: str = Field('', max_length=64)
    crop_path: str = Field('', max_length=512)


# ---------------------------------------------------------------------------
# Mosaics


class MosaicCache:
    """Decoded scan mosaics, newest few kept: thumbnails cut many crops from one mosaic."""

    def __init__(self, size: int = 2):
        self._size = size
        self._items: OrderedDict[tuple[str, float], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> np.ndarray | None:
        try:
            key = (str(path), path.stat().st_mtime)
        except OSError:
            return None
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if pixels is None:
            return None
        with self._lock:
            self._items[key] = pixels
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return pixels


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG header without decoding the picture."""
    with open(path, 'rb') as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != b'\x89PNG\r\n\x1a\n':
        raise ValueError(f'{path.name} is not a PNG file')
    return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')


def read_mosaic_meta(data_dir: Path, scan_id: str) -> dict | None:
    folder = data_dir / 'scans' / scan_id
    try:
        meta = json.loads((folder / 'mosaic.json').read_text())
        width, height = png_size(folder / 'mosaic.png')
        meta['to_mosaic'] = Affine2D.from_list(meta['wafer_to_mosaic'])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    meta.update(width=width, height=height, path=folder / 'mosaic.png')
    return meta


def encode_png(pixels: np.ndarray) -> Response:
    ok, data = cv2.imencode('.png', pixels)
    if not ok:
        raise RegistryError('INTERNAL_ERROR', 'could not encode the image')
    return Response(content=data.tobytes(), media_type='image/png', headers={'Cache-Control': 'max-age=60'})


def render_outline(contour, size: int, colour_hex: str) -> np.ndarray:
    """A dark square picture of an outline scaled to fit (when no image of the flake is kept)."""
    canvas = np.full((size, size, 3), 24, np.uint8)
    points = np.asarray(contour, dtype=np.float64).reshape(-1, 2)
    if len(points) < 3:
        return canvas
    low, high = points.min(axis=0), points.max(axis=0)
    scale = (size * 0.8) / max(float((high - low).max()), 1e-12)
    centre = (low + high) / 2
    pixels = (points - centre) * scale * [1, -1] + size / 2
    rgb = tuple(int(colour_hex[i:i + 2], 16) for i in (5, 3, 1))
    cv2.fillPoly(canvas, [np.round(pixels).astype(np.int32)], tuple(c // 2 for c in rgb), cv2.LINE_AA)
    cv2.polylines(canvas, [np.round(pixels).astype(np.int32)], True, rgb, 1, cv2.LINE_AA)
    return canvas


# ---------------------------------------------------------------------------


def create_app(db_path: str | os.PathLike, data_dir: str | os.PathLike, token: str | None = None,
               *, store: FlakeStore | None = None, max_markers: int = MAX_MARKERS) -> FastAPI:
    """The web app over the registry at ``db_path``; mosaics and reports come from ``data_dir``.

    ``max_markers`` bounds the chip map's markers per request (the best flakes of the
    view); zooming in loads the visible region's best.
    """
    data_dir = Path(data_dir)
    store = store or FlakeStore(db_path)
    mosaics = MosaicCache()
    app = FastAPI(title='Flake registry', docs_url='/api/docs', redoc_url=None, openapi_url='/api/openapi.json')
    app.state.store = store
    app.state.data_dir = data_dir
    app.state.token = token or None
    app.mount('/static', StaticFiles(directory=HERE / 'static'), name='static')
    templates = Jinja2Templates(directory=HERE / 'templates')
    templates.env.globals.update(
        colour=lambda m: materials.colour(m),
        layer_name=lambda c: LAYER_NAMES[c] if 0 <= int(c) < len(LAYER_NAMES) else str(c),
        status_name=lambda s: STATUS_NAMES[s] if 0 <= int(s) < len(STATUS_NAMES) else str(s))

    def authorised(request: Request) -> bool:
        if app.state.token is None:
            return True
        given = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE) or ''
        auth = request.headers.get('authorization', '')
        if not given and auth.lower().startswith('bearer '):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), app.state.token.encode())

    def require_write(request: Request) -> None:
        # A page from another site must not make a lab browser label or reserve (cross-site
        # form posts reach 127.0.0.1 too): a write that names its origin must come from here.
        origin = request.headers.get('origin')
        if origin and origin != 'null' and urlsplit(origin).netloc != request.headers.get('host', ''):
            raise StarletteHTTPException(403, f'writes from another site ({origin}) are refused')
        if not authorised(request):
            raise StarletteHTTPException(401, 'writes need the access token: open /login, or send the '
                                              'X-Flake-Token header')

    def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
        context = dict(context, token_required=app.state.token is not None, authorised=authorised(request))
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    # -- errors: a page or a JSON body, never a traceback -------------------

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith('/api/') or 'application/json' in request.headers.get('accept', '')

    def error(request: Request, status: int, code: str, message: str, details: list | None = None) -> Response:
        if wants_json(request):
            body = {'error': {'code': code, 'message': message}}
            if details:
                body['error']['details'] = details
            return JSONResponse(body, status_code=status)
        return page(request, 'error.html', {'status': status, 'code': code, 'message': message,
                                            'details': details or []}, status_code=status)

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError):
        return error(request, HTTP_STATUS_OF_CODE.get(exc.code, 400), exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        details = [{'field': '.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query', 'path',
                                                                                 'form')) or 'request',
                    'message': e.get('msg', 'invalid')} for e in exc.errors()]
        summary = '; '.join(f"{d['field']}: {d['message']}" for d in details[:3])
        return error(request, 422, INVALID_ARGUMENT, f'invalid input: {summary}', details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = CODE_OF_HTTP_STATUS.get(exc.status_code, 'HTTP_ERROR')
        message = exc.detail if isinstance(exc.detail, str) else 'request refused'
        if exc.status_code == 404 and message == 'Not Found':
            message = f'no page at {request.url.path}'
        return error(request, exc.status_code, code, message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception('unhandled error on %s %s', request.method, request.url.path)
        return error(request, 500, 'INTERNAL_ERROR', f'the server failed on this request ({type(exc).__name__}); '
                                                     'the details are in the server log')

    @app.middleware('http')
    async def server_timing(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        response.headers['Server-Timing'] = f'app;dur={(time.perf_counter() - start) * 1000:.2f}'
        return response

    # -- log-in (only when a token is configured) ---------------------------

    @app.get('/login', response_class=HTMLResponse)
    def login_page(request: Request):
        return page(request, 'login.html', {'page': 'login'})

    @app.post('/login')
    def login(request: Request, token: str = Form(..., min_length=1, max_length=256)):
        if app.state.token is None or not hmac.compare_digest(token.encode(), app.state.token.encode()):
            raise StarletteHTTPException(401, 'wrong token')
        response = RedirectResponse('/', status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite='strict')
        return response

    # -- chip map ----------------------------------------------------------------

    def known_scans() -> list[str]:
        names = {s['id'] for s in store.scans() if s['id']}
        scans_dir = data_dir / 'scans'
        if scans_dir.is_dir():
            names.update(p.name for p in scans_dir.iterdir() if (p / 'mosaic.json').is_file())
        return sorted(n for n in names if SCAN_ID_PATTERN.match(n))

    def check_scan_id(scan_id: str) -> str:
        if not SCAN_ID_PATTERN.match(scan_id or ''):
            raise RegistryError(INVALID_ARGUMENT, f'scan id must be 1-128 letters, digits or _.-, got {scan_id!r}')
        return scan_id

    @app.get('/', response_class=HTMLResponse)
    def chip_map(request: Request, scan_id: str = Query('', max_length=128)):
        scans = known_scans()
        if scan_id:
            check_scan_id(scan_id)
            if scan_id not in scans:
                raise RegistryError('UNKNOWN_ID', f'no scan {scan_id!r}')
        return page(request, 'chipmap.html', {'page': 'chipmap', 'scans': scans,
                                              'scan_id': scan_id or (scans[-1] if scans else ''),
                                              'material_colours': MATERIAL_COLOURS, 'layer_styles': LAYER_STYLES})

    @app.get('/api/chipmap')
    def chip_map_data(scan_id: str = Query(..., min_length=1, max_length=128),
                      region: str = Query('', max_length=200, description='min_x,min_y,max_x,max_y [m], wafer')):
        """Markers of the scan's best flakes (at most MAX_MARKERS), or of those inside ``region``."""
        check_scan_id(scan_id)
        meta = read_mosaic_meta(data_dir, scan_id)
        base = FlakeQuery.from_mapping({'scan_id': scan_id, 'sort_by': 'score', 'limit': MAX_LIMIT,
                                        'region': region})
        flakes, total, offset = [], None, 0
        while offset < max_markers:
            result = store.query(replace(base, offset=offset, limit=min(MAX_LIMIT, max_markers - offset)))
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
        markers = []
        for f in flakes:
            u, v = to_view.apply(f.x, f.y)
            name = LAYER_NAMES[f.layer_class]
            markers.append({'id': f.id, 'u': round(u, 2), 'v': round(v, 2), 'material': f.material,
                            'layer_class': f.layer_class, 'layer_name': name, 'score': f.score,
                            'r': round(max(math.sqrt(max(f.area, 0) / math.pi) * to_view.scale, minimum_radius), 2),
                            'colour': materials.colour(f.material),
                            'fill': LAYER_STYLES[name]['fill'], 'stroke': LAYER_STYLES[name]['stroke']})
        mosaic = None
        if meta is not None:
            mosaic = {'url': f'/scans/{scan_id}/mosaic.png', 'width': meta['width'], 'height': meta['height'],
                      'metres_per_pixel': meta.get('metres_per_pixel')}
        return {'scan_id': scan_id, 'total': total or 0, 'markers': markers, 'mosaic': mosaic, 'view': view,
                'to_view': to_view.as_list(), 'region': list(base.region) if base.region else None}

    @app.get('/scans/{scan_id}/mosaic.png')
    def mosaic_png(scan_id: str):
        check_scan_id(scan_id)
        path = data_dir / 'scans' / scan_id / 'mosaic.png'
        if not path.is_file():
            raise RegistryError('UNKNOWN_ID', f'scan {scan_id!r} has no mosaic yet')
        return FileResponse(path, media_type='image/png')

    # -- flake browser --------------------------------------------------------------

    def query_from_params(request: Request) -> tuple[FlakeQuery, dict[str, Any]]:
        """The browser's form (display units) as a validated FlakeQuery, and the form values to show."""
        params = request.query_params
        form: dict[str, Any] = {'limit': DEFAULT_LIMIT // 2, 'sort_by': 'score'}
        values: dict[str, Any] = {}
        for key in params.keys():
            many = params.getlist(key)
            if key in ('layer_classes', 'statuses', 'materials'):
                form[key] = [v for v in many if v]
                values[key] = ','.join(form[key])
            elif key == 'page':
                continue
            elif len(many) > 1:
                raise RegistryError(INVALID_ARGUMENT, f'{key} is given {len(many)} times')
            else:
                form[key] = many[0]
                if key in UNIT_FIELDS:
                    name, factor = UNIT_FIELDS[key]
                    if many[0] != '':
                        try:
                            values[name] = float(many[0]) * factor
                        except ValueError:
                            raise RegistryError(INVALID_ARGUMENT, f'{key} must be a number, got {many[0]!r}') from None
                elif key == 'near_um':
                    if many[0].strip():
                        try:
                            x, y = (float(v) * 1e-6 for v in many[0].split(','))
                        except ValueError:
                            raise RegistryError(INVALID_ARGUMENT, 'near_um must be two numbers x,y') from None
                        values['near'] = (x, y)
                else:
                    values[key] = many[0]
        page_text = params.get('page', '1') or '1'
        if not page_text.isdigit() or int(page_text) < 1 or int(page_text) > 10_000_000:
            raise RegistryError(INVALID_RANGE, f'page must be a whole number >= 1, got {page_text!r}')
        values.setdefault('limit', form['limit'])
        query = FlakeQuery.from_mapping(values)
        query = FlakeQuery.from_mapping({**values, 'offset': (int(page_text) - 1) * query.limit})
        form['page'] = int(page_text)
        return query, form

    @app.get('/flakes', response_class=HTMLResponse)
    def flake_browser(request: Request):
        query, form = query_from_params(request)
        result = store.query(query)
        page_number = form['page']
        page_count = max(1, math.ceil(result.total / query.limit))

        def page_url(number: int) -> str:
            items = [(k, v) for k, v in request.query_params.multi_items() if k != 'page']
            return '/flakes?' + urlencode(items + [('page', str(number))])

        form.setdefault('layer_classes', [])
        form.setdefault('statuses', [])
        first = query.offset + 1 if result.flakes else 0
        return page(request, 'flakes.html', {
            'page': 'flakes', 'form': form, 'flakes': result.flakes, 'total': result.total,
            'first': first, 'last': query.offset + len(result.flakes), 'page_number': page_number,
            'page_count': page_count, 'materials': MATERIAL_NAMES, 'layer_names': LAYER_NAMES,
            'status_names': STATUS_NAMES, 'sort_keys': SORT_KEYS, 'max_limit': MAX_LIMIT,
            'prev_url': page_url(page_number - 1) if page_number > 1 else '',
            'next_url': page_url(page_number + 1) if query.offset + len(result.flakes) < result.total else ''})

    def flake_json(f) -> dict[str, Any]:
        return {'id': f.id, 'chip_id': f.chip_id, 'scan_id': f.scan_id, 'material': f.material,
                'layer_class': LAYER_NAMES[f.layer_class], 'layers': f.layers, 'layers_std': f.layers_std,
                'thickness_nm': f.thickness_nm, 'thickness_nm_std': f.thickness_nm_std, 'score': f.score,
                'area': f.area, 'x': f.x, 'y': f.y, 'status': STATUS_NAMES[f.status], 'reserved_by': f.reserved_by,
                'homogeneity': f.homogeneity, 'n_observations': f.n_observations}

    @app.get('/api/flakes')
    def flakes_api(request: Request):
        query, _ = query_from_params(request)
        result = store.query(query)
        return {'total': result.total, 'offset': query.offset, 'limit': query.limit,
                'flakes': [flake_json(f) for f in result.flakes]}

    def check_flake_id(flake_id: str) -> str:
        if not re.match(FLAKE_ID_PATTERN, flake_id or ''):
            raise RegistryError(INVALID_ARGUMENT, f'flake id must be 1-64 letters, digits or _.-, got {flake_id!r}')
        return flake_id

    @app.get('/flakes/{flake_id}', response_class=HTMLResponse)
    def flake_page(request: Request, flake_id: str, who: str = Query('', max_length=64)):
        detail = store.get_flake(check_flake_id(flake_id))
        flake = detail.flake
        contour = np.asarray(flake.contour or [(flake.x, flake.y)], dtype=np.float64).reshape(-1, 2)
        relative = (contour - [flake.x, flake.y]) * [1e6, -1e6]
        size = max(float(np.abs(relative).max()) * 2.4, 1.0)
        outline = {'points': ' '.join(f'{u:.2f},{v:.2f}' for u, v in relative),
                   'view_box': f'{-size / 2:.2f} {-size / 2:.2f} {size:.2f} {size:.2f}', 'size_um': size / 1.2}
        labels = []
        for row in store.labels(flake_id):
            parsed = labelling.decode_label(row['label'])
            labels.append({'when_text': utc_text(row['created']), 'who': row['labelled_by'] or '',
                           'verdict': parsed.verdict if parsed else row['label'],
                           'material': parsed.material if parsed else '',
                           'layer_class': parsed.layer_class if parsed else 0})
        history = []
        for r in store.reservations(flake_id, live_only=False):
            history.append({'stamp': r['created'], 'when_text': utc_text(r['created']), 'kind': 'reserved',
                            'robot_id': r['robot_id'], 'detail': f'lease until {utc_text(r["expires"])}'})
            if r['ended']:
                history.append({'stamp': r['ended'], 'when_text': utc_text(r['ended']), 'kind': r['outcome'] or 'ended',
                                'robot_id': r['robot_id'], 'detail': ''})
        if flake.used_at:
            history.append({'stamp': flake.used_at, 'when_text': utc_text(flake.used_at), 'kind': 'used',
                            'robot_id': flake.used_by, 'detail': flake.used_note})
        history.sort(key=lambda h: h['stamp'])
        observations = [dict(vars(o), when_text=utc_text(o.stamp)) for o in detail.observations]
        images = [{'index': i, 'role': im.role, 'objective': im.objective} for i, im in enumerate(detail.images)]
        return page(request, 'flake.html', {
            'page': 'flakes', 'flake': flake, 'effective_status': flake.status, 'reserved_by': flake.reserved_by,
            'outline': outline, 'labels': labels, 'history': history, 'observations': observations,
            'images': images, 'materials': MATERIAL_NAMES, 'layer_names': LAYER_NAMES, 'who': who})

    @app.get('/api/flakes/{flake_id}')
    def flake_api(flake_id: str):
        detail = store.get_flake(check_flake_id(flake_id))
        body = flake_json(detail.flake)
        body.update(contour=[list(p) for p in detail.flake.contour],
                    observations=[vars(o) for o in detail.observations],
                    images=[vars(i) for i in detail.images],
                    labels=store.labels(flake_id),
                    reservations=[{k: v for k, v in r.items() if k != 'token'}
                                  for r in store.reservations(flake_id, live_only=False)])
        return body

    def mosaic_cutout(flake, margin: float, draw_contour: bool, size: int) -> np.ndarray | None:
        """The scan mosaic around the flake, scaled to ``size`` px, contour drawn if asked."""
        meta = read_mosaic_meta(data_dir, flake.scan_id) if flake.scan_id else None
        if meta is None:
            return None
        pixels = mosaics.get(meta['path'])
        if pixels is None:
            return None
        to_mosaic: Affine2D = meta['to_mosaic']
        contour = np.asarray(flake.contour or [(flake.x, flake.y)], dtype=np.float64).reshape(-1, 2)
        points = to_mosaic.apply_points(contour)
        cu, cv_ = to_mosaic.apply(flake.x, flake.y)
        half = max(float(np.abs(points - [cu, cv_]).max()) * margin, 6.0)
        left, top = int(math.floor(cu - half)), int(math.floor(cv_ - half))
        side = int(math.ceil(2 * half))
        height, width = pixels.shape[:2]
        if left >= width or top >= height or left + side <= 0 or top + side <= 0:
            return None
        canvas = np.zeros((side, side, 3), np.uint8)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + side, width), min(top + side, height)
        canvas[y0 - top:y1 - top, x0 - left:x1 - left] = pixels[y0:y1, x0:x1]
        scale = size / side
        canvas = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
        if draw_contour and len(points) >= 3:
            drawn = np.round((points - [left, top]) * scale).astype(np.int32)
            cv2.polylines(canvas, [drawn], True, (0, 230, 255), 1, cv2.LINE_AA)
        return canvas

    @app.get('/flakes/{flake_id}/thumb.png')
    def flake_thumbnail(flake_id: str):
        detail = store.get_flake(check_flake_id(flake_id))
        for image in detail.images:
            if image.role in ('thumbnail', 'crop'):
                path = resolve_image_path(image.path)
                pixels = cv2.imread(str(path), cv2.IMREAD_COLOR) if path else None
                if pixels is not None:
                    return encode_png(cv2.resize(pixels, (THUMB_PIXELS, THUMB_PIXELS),
                                                 interpolation=cv2.INTER_AREA))
        pixels = mosaic_cutout(detail.flake, 1.6, True, THUMB_PIXELS)
        if pixels is None:
            pixels = render_outline(detail.flake.contour, THUMB_PIXELS,
                                    materials.colour(detail.flake.material))
        return encode_png(pixels)

    @app.get('/flakes/{flake_id}/context.png')
    def flake_context(flake_id: str):
        flake = store.get_flake(check_flake_id(flake_id)).flake
        pixels = mosaic_cutout(flake, 3.0, True, 320)
        if pixels is None:
            pixels = render_outline(flake.contour, 320, materials.colour(flake.material))
        return encode_png(pixels)

    def resolve_image_path(path: str) -> Path | None:
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = data_dir / candidate
        if candidate.suffix.lower() not in labelling.IMAGE_SUFFIXES or not candidate.is_file():
            return None
        return candidate

    @app.get('/images/{index}')
    def flake_image(index: int, flake_id: str = Query(..., pattern=FLAKE_ID_PATTERN)):
        # Only files the registry lists for this flake are served, never an arbitrary path.
        images = store.get_flake(flake_id).images
        if not 0 <= index < len(images):
            raise RegistryError('UNKNOWN_ID', f'flake {flake_id} has no image {index}')
        path = resolve_image_path(images[index].path)
        if path is None:
            raise RegistryError('UNKNOWN_ID', f'image file of flake {flake_id} is missing')
        return FileResponse(path)

    # -- labelling -------------------------------------------------------------------

    @app.post('/flakes/{flake_id}/labels', dependencies=[Depends(require_write)])
    def label_flake_form(request: Request, flake_id: str, who: str = Form(..., max_length=64),
                         verdict: str = Form(...), material: str = Form(...), layer_class: str = Form(...)):
        label = labelling.make_label(verdict, material, layer_class)
        labelling.label_flake(store, check_flake_id(flake_id), label, who)
        return RedirectResponse(f'/flakes/{flake_id}?{urlencode({"who": who})}', status_code=303)

    @app.post('/api/labels', status_code=201, dependencies=[Depends(require_write)])
    def label_api(body: LabelIn):
        label = labelling.make_label(body.verdict, body.material, body.layer_class)
        if bool(body.flake_id) == bool(body.crop_path):
            raise RegistryError(INVALID_ARGUMENT, 'give exactly one of flake_id and crop_path')
        if body.flake_id:
            label_id = labelling.label_flake(store, check_flake_id(body.flake_id), label, body.who)
        else:
            label_id = labelling.label_crop(store, data_dir, body.crop_path, label, body.who)
        return {'id': label_id, 'label': label.encode()}

    @app.post('/labels/crop', dependencies=[Depends(require_write)])
    def label_crop_form(crop_path: str = Form(..., max_length=512), who: str = Form(..., max_length=64),
                        verdict: str = Form(...), material: str = Form('unknown'),
                        layer_class: str = Form('unknown')):
        label = labelling.make_label(verdict, material, layer_class)
        labelling.label_crop(store, data_dir, crop_path, label, who)
        return RedirectResponse(f'/labels?{urlencode({"who": who})}', status_code=303)

    @app.get('/crops/{crop_path:path}')
    def crop_image(crop_path: str):
        return FileResponse(labelling.resolve_crop(data_dir, crop_path))

    @app.get('/labels', response_class=HTMLResponse)
    def labels_page(request: Request, who: str = Query('', max_length=64)):
        latest = labelling.latest_labels(store)
        labelled_flakes = {r['flake_id'] for r in latest if r['flake_id']}
        labelled_crops = {r['crop_path'] for r in latest if r['crop_path']}
        queue = [f for f in store.query(FlakeQuery(sort_by='score', limit=200)).flakes
                 if f.id not in labelled_flakes][:48]
        crops = [c for c in labelling.candidate_crops(data_dir) if c not in labelled_crops][:48]
        counts = {'good': sum(1 for r in latest if r['parsed'].good),
                  'bad': sum(1 for r in latest if not r['parsed'].good)}
        recent = [{'when_text': utc_text(r['created']), 'who': r['labelled_by'] or '',
                   'target': r['flake_id'] or r['crop_path'], 'label': r['label']} for r in latest[-20:][::-1]]
        return page(request, 'labels.html', {'page': 'labels', 'queue': queue, 'crops': crops, 'counts': counts,
                                             'recent': recent, 'materials': MATERIAL_NAMES, 'layer_names': LAYER_NAMES,
                                             'who': who})

    # -- stack planner ---------------------------------------------------------------

    @app.get('/planner', response_class=HTMLResponse)
    def planner_page(request: Request):
        recipes = stacks.list_recipes(store, limit=20)
        return page(request, 'planner.html', {'page': 'planner', 'materials': MATERIAL_NAMES,
                                              'layer_names': LAYER_NAMES,
                                              'recipes': recipes, 'utc_text': utc_text,
                                              'material_colours': MATERIAL_COLOURS})

    @app.post('/api/stacks/preview')
    def stack_preview(body: StackPreviewIn):
        return stacks.preview(store, [layer.to_layer() for layer in body.layers])

    @app.post('/api/stacks', status_code=201, dependencies=[Depends(require_write)])
    def stack_create(body: StackIn):
        layers = [layer.to_layer() for layer in body.layers]
        if body.reserve and not body.robot_id:
            raise RegistryError(INVALID_ARGUMENT, 'reserving a stack needs a robot_id')
        recipe = stacks.save_recipe(store, body.name, layers)
        if body.reserve:
            try:
                recipe = stacks.reserve_recipe(store, recipe.id, body.robot_id, body.lease_s)
            except RegistryError as refused:
                # The recipe is kept (it can be reserved later); say which flake blocked it.
                return JSONResponse({'error': {'code': refused.code, 'message': refused.message,
                                               'flake_id': refused.flake_id}, 'recipe': recipe.as_dict()},
                                    status_code=HTTP_STATUS_OF_CODE.get(refused.code, 400))
        return recipe.as_dict(include_tokens=True)

    @app.post('/api/stacks/{recipe_id}/reserve', dependencies=[Depends(require_write)])
    def stack_reserve(recipe_id: str, robot_id: str = Query(..., min_length=1, max_length=64),
                      lease_s: float = Query(0.0, ge=0.0, le=7 * 86400.0)):
        return stacks.reserve_recipe(store, recipe_id, robot_id, lease_s).as_dict(include_tokens=True)

    @app.get('/api/stacks')
    def stack_list():
        return {'recipes': [r.as_dict() for r in stacks.list_recipes(store)]}

    @app.get('/api/stacks/{recipe_id}')
    def stack_export(recipe_id: str, download: bool = False):
        recipe = stacks.get_recipe(store, recipe_id)
        headers = {'Content-Disposition': f'attachment; filename="{recipe.id}.json"'} if download else None
        return JSONResponse(recipe.as_dict(), headers=headers)

    # -- defect reports --------------------------------------------------------------

    def report_folders() -> list[Path]:
        root = data_dir / 'defects'
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and SCAN_ID_PATTERN.match(p.name)
                      and any(p.glob('*.json')))

    @app.get('/defects', response_class=HTMLResponse)
    def defects_page(request: Request):
        stored = [dict(r, rows=concentration_rows(r)) for r in store.defect_reports()]
        folders = [{'name': p.name, 'files': sorted(f.name for f in p.iterdir() if f.is_file())}
                   for p in report_folders()]
        return page(request, 'defects.html', {'page': 'defects', 'stored': stored, 'folders': folders,
                                              'utc_text': utc_text})

    @app.get('/defects/{name}', response_class=HTMLResponse)
    def defect_folder_page(request: Request, name: str):
        folder = defect_folder(name)
        report: dict = {}
        # The analyzer writes <image id>_report.json; any other JSON is a fallback.
        for path in sorted(folder.glob('*.json'), key=lambda p: (not p.name.endswith('_report.json'), p.name)):
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(loaded, dict):
                report = loaded
                break
        images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in ('.png', '.jpg', '.jpeg'))
        csvs = sorted(p.name for p in folder.glob('*.csv'))
        rows = concentration_rows(report)
        return page(request, 'defect_report.html', {'page': 'defects', 'name': name, 'report': report,
                                                    'images': images, 'csvs': csvs, 'rows': rows})

    def defect_folder(name: str) -> Path:
        if not SCAN_ID_PATTERN.match(name or ''):
            raise RegistryError(INVALID_ARGUMENT, f'report name must be letters, digits or _.-, got {name!r}')
        folder = data_dir / 'defects' / name
        if not folder.is_dir():
            raise RegistryError('UNKNOWN_ID', f'no defect report {name!r}')
        return folder

    @app.get('/defects/{name}/files/{file_name}')
    def defect_file(name: str, file_name: str):
        folder = defect_folder(name)
        if not SCAN_ID_PATTERN.match(file_name) or not (folder / file_name).is_file():
            raise RegistryError('UNKNOWN_ID', f'no file {file_name!r} in report {name!r}')
        return FileResponse(folder / file_name)

    return app


def concentration_rows(report: dict) -> list[dict[str, Any]]:
    """Rows (class, count, concentration and its 95 % interval, cm^-2) from a defect report.

    Reads both the analyzer's report JSON (``classes``: name, count, concentration_cm2,
    ...) and the registry's stored reports (parallel lists, as in DefectReport).
    """
    if isinstance(report.get('classes'), list):
        return [{'class': str(c.get('name', '')), 'counts': c.get('count'),
                 'concentration': c.get('concentration_cm2'), 'concentration_low': c.get('concentration_low_cm2'),
                 'concentration_high': c.get('concentration_high_cm2')}
                for c in report['classes'] if isinstance(c, dict)]
    names = report.get('class_names') or []
    columns = {key: report.get(key) or [] for key in ('counts', 'concentration', 'concentration_low',
                                                      'concentration_high')}
    rows = []
    for i, name in enumerate(names):
        row = {'class': str(name)}
        for key, values in columns.items():
            row[key] = values[i] if i < len(values) else None
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='flake-web', description='Lab web app over the flake registry (chip map, flakes, labels, stacks). '
                                      'Subcommands: `flake-web retrain ...` retrains the cascade from labels; '
                                      '`flake-web candidates IMAGE...` cuts candidate crops to label.')
    parser.add_argument('--db', default='', help='registry SQLite file (default: $FLAKE_DATA_DIR/registry.sqlite)')
    parser.add_argument('--data-dir', default='', help='folder with scans/ and defects/ (default: $FLAKE_DATA_DIR '
                                                      'or ./data)')
    parser.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this computer only)')
    parser.add_argument('--port', type=int, default=8080, help='TCP port (default 8080)')
    parser.add_argument('--token', default=os.environ.get('FLAKE_WEB_TOKEN', ''),
                        help='access token for writes; required when --host is not a loopback address '
                             '(default: $FLAKE_WEB_TOKEN)')
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == 'retrain':
        from flake_registry.retrain import main as retrain_main
        return retrain_main(argv[1:])
    if argv and argv[0] == 'candidates':
        from flake_detector.cut_candidates import main as candidates_main
        return candidates_main(argv[1:])
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f'--port must be 1..65535, got {args.port}')
    if not is_loopback(args.host) and not args.token:
        parser.error(f'--host {args.host} serves the registry beyond this computer: give --token (or '
                     'FLAKE_WEB_TOKEN) so that only people with it can label and reserve')
    if args.token and len(args.token) < 8:
        parser.error('--token must be at least 8 characters')
    data_dir = Path(args.data_dir or os.environ.get('FLAKE_DATA_DIR') or 'data')
    db_path = Path(args.db) if args.db else data_dir / 'registry.sqlite'
    import uvicorn

    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    app = create_app(db_path, data_dir, token=args.token or None)
    print(f'flake-web: registry {db_path}, serving http://{args.host}:{args.port}/', flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level='warning')
    return 0


if __name__ == '__main__':
    sys.exit(main())

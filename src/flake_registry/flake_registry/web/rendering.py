"""Page rendering: the templates, what every page knows, and errors as pages or JSON, never tracebacks."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from flake_core import materials, units
from flake_core.materials import LAYER_CLASS_MAX_LAYERS, MATERIAL_NAMES
from flake_registry.query import INVALID_ARGUMENT, LAYER_NAMES, STATUS_NAMES, RegistryError
from flake_registry.web.context import web

log = logging.getLogger('flake_web')

TEMPLATES_DIR = Path(__file__).resolve().parent / 'templates'
HTTP_STATUS_OF_CODE = {'UNKNOWN_ID': 404, 'INVALID_ARGUMENT': 422, 'INVALID_RANGE': 422, 'ALREADY_RESERVED': 409,
                       'ALREADY_USED': 409, 'NOT_RESERVED': 409, 'WRONG_TOKEN': 403, 'LEASE_EXPIRED': 409,
                       'FORBIDDEN': 403, 'BUSY': 409}
CODE_OF_HTTP_STATUS = {400: 'BAD_REQUEST', 401: 'UNAUTHORISED', 403: 'FORBIDDEN', 404: 'NOT_FOUND',
                       405: 'METHOD_NOT_ALLOWED', 413: 'PAYLOAD_TOO_LARGE', 429: 'TOO_MANY_ATTEMPTS'}
# Marker fill and outline width by layer class: the thinner the flake, the bolder its marker.
LAYER_STYLES = {'unknown': {'fill': 0.15, 'stroke': 1}, 'mono': {'fill': 0.9, 'stroke': 3},
                'few': {'fill': 0.6, 'stroke': 2}, 'thick': {'fill': 0.3, 'stroke': 1.5},
                'bulk': {'fill': 0.1, 'stroke': 1}}


def _name_of(value, names) -> str:
    """The name of a numbered value; the value itself when it is no number of ``names``."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return str(value)
    return names[number] if 0 <= number < len(names) else str(value)


def layer_name(value) -> str:
    return _name_of(value, LAYER_NAMES)


def status_name(value) -> str:
    return _name_of(value, STATUS_NAMES)


def contrast_text(flake) -> str:
    """The optical contrast an 'unknown'-material candidate was found with (R, G, B), when recorded."""
    contrast = getattr(flake, 'contrast', None)
    try:
        values = [float(v) for v in contrast]
    except (TypeError, ValueError):
        return 'contrast not recorded'
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        return 'contrast not recorded'
    return 'contrast R {:+.3f}, G {:+.3f}, B {:+.3f}'.format(*values)


def layer_range_text() -> list[tuple[str, str]]:
    """(layer class, its layer counts) for the thickness legends."""
    low = 1
    out = []
    for value, name in ((1, 'mono'), (2, 'few'), (3, 'thick')):
        high = LAYER_CLASS_MAX_LAYERS[value]
        out.append((name, '1 layer' if high == 1 else f'{low}–{high} layers'))
        low = high + 1
    out.append(('bulk', f'> {low - 1} layers'))
    return out


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=TEMPLATES_DIR)
    templates.env.globals.update(
        colour=materials.colour, material_label=materials.label, layer_name=layer_name, status_name=status_name,
        materials=MATERIAL_NAMES, layer_names=LAYER_NAMES, status_names=STATUS_NAMES,
        unknown_material=materials.UNKNOWN, local_time=units.local_time, local_zone=units.local_zone, um=units.um,
        um2=units.um2, with_uncertainty=units.with_uncertainty, contrast_text=contrast_text,
        layer_ranges=layer_range_text(), layer_styles=LAYER_STYLES)
    templates.env.filters.update(um=units.um, um2=units.um2, local_time=units.local_time)
    return templates


def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    ctx = web(request)
    context = dict(context, token_required=ctx.access.token is not None, authorised=ctx.access.authorised(request),
                   nav=ctx.nav)
    return ctx.templates.TemplateResponse(request, name, context, status_code=status_code)


def wants_json(request: Request) -> bool:
    return request.url.path.startswith('/api/') or 'application/json' in request.headers.get('accept', '')


def error(request: Request, status: int, code: str, message: str, details: list | None = None,
          headers: dict[str, str] | None = None) -> Response:
    """The error as ``{"error": {code, message}}`` under /api/ (or when JSON is asked for), else a page."""
    if wants_json(request):
        body: dict[str, Any] = {'error': {'code': code, 'message': message}}
        if details:
            body['error']['details'] = details
        return JSONResponse(body, status_code=status, headers=headers)
    if status == 401 and request.method == 'GET':
        response = page(request, 'login.html', {'page': 'login', 'message': message,
                                                'next': request.url.path}, status_code=401)
    else:
        response = page(request, 'error.html', {'status': status, 'code': code, 'message': message,
                                                'details': details or []}, status_code=status)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError):
        return error(request, HTTP_STATUS_OF_CODE.get(exc.code, 400), exc.code, exc.message)

    @app.exception_handler(units.UnitError)
    async def unit_error(request: Request, exc: units.UnitError):
        return error(request, HTTP_STATUS_OF_CODE.get(INVALID_ARGUMENT, 400), INVALID_ARGUMENT, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        details = [{'field': '.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query', 'path',
                                                                                 'form')) or 'request',
                    'message': e.get('msg', 'invalid')} for e in exc.errors()]
        summary = '; '.join(f"{d['field']}: {d['message']}" for d in details[:3])
        return error(request, 422, INVALID_ARGUMENT, f'invalid input: {summary}', details)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = CODE_OF_HTTP_STATUS.get(exc.status_code, 'HTTP_ERROR')
        message = exc.detail if isinstance(exc.detail, str) else 'request refused'
        if exc.status_code == 404 and message == 'Not Found':
            message = f'no page at {request.url.path}'
        return error(request, exc.status_code, code, message, headers=getattr(exc, 'headers', None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception('unhandled error on %s %s', request.method, request.url.path)
        return error(request, 500, 'INTERNAL_ERROR', f'the server failed on this request ({type(exc).__name__}); '
                                                     'the details are in the server log')

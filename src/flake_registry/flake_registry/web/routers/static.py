"""The app's own scripts and styles, and the material colours as a stylesheet (no inline styles: CSP)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from flake_core import materials
from flake_core.materials import MATERIAL_NAMES
from flake_registry.files import STATIC_SUFFIXES, resolve_inside

STATIC_DIR = Path(__file__).resolve().parent.parent / 'static'
MEDIA_TYPES = {'.css': 'text/css; charset=utf-8', '.js': 'text/javascript; charset=utf-8'}
NAV = None
router = APIRouter(include_in_schema=False)


@router.get('/static/{name:path}', name='static')
def static_file(name: str):
    path = resolve_inside(STATIC_DIR, name, suffixes=STATIC_SUFFIXES, what='static file')
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={'Cache-Control': 'max-age=300'})


def material_css() -> str:
    """One rule set per material, from flake_core.materials: text, swatch, border and marker colours."""
    rules = []
    for name in MATERIAL_NAMES:
        colour = materials.colour(name)
        rules.append(f'.mat-{name} {{ color: {colour}; }}\n.swatch-{name} {{ background: {colour}; }}\n'
                     f'.edge-{name} {{ border-color: {colour}; }}')
    return '/* Material colours from flake_core.materials (generated). */\n' + '\n'.join(rules) + '\n'


@router.get('/materials.css')
def materials_stylesheet():
    return Response(material_css(), media_type='text/css; charset=utf-8', headers={'Cache-Control': 'max-age=300'})

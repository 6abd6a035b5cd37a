"""Defect reports: folders written by ``flake-defects analyze --report`` and the reports kept in the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse

from flake_registry.files import REPORT_SUFFIXES, resolve_inside
from flake_registry.query import UNKNOWN_ID, RegistryError
from flake_registry.web.context import NavEntry, require_read, web
from flake_registry.web.forms import check_name
from flake_registry.web.rendering import page

NAV = NavEntry('defects', 'Defect reports', '/defects')
router = APIRouter(dependencies=[Depends(require_read)])


def defects_root(request: Request) -> Path:
    return web(request).data_dir / 'defects'


def report_folders(request: Request) -> list[Path]:
    root = defects_root(request)
    if not root.is_dir():
        return []
    folders = []
    for path in sorted(root.iterdir()):
        try:
            check_name(path.name, 'report name')
        except RegistryError:
            continue
        if path.is_dir() and not path.is_symlink() and any(path.glob('*.json')):
            folders.append(path)
    return folders


def defect_folder(request: Request, name: str) -> Path:
    check_name(name, 'report name')
    folder = defects_root(request) / name
    if not folder.is_dir() or folder.is_symlink():
        raise RegistryError(UNKNOWN_ID, f'no defect report {name!r}')
    return folder


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


@router.get('/defects', response_class=HTMLResponse, include_in_schema=False)
def defects_page(request: Request):
    stored = [dict(r, rows=concentration_rows(r)) for r in web(request).store.defect_reports()]
    folders = [{'name': p.name, 'files': sorted(f.name for f in p.iterdir() if f.is_file())}
               for p in report_folders(request)]
    return page(request, 'defects.html', {'page': 'defects', 'stored': stored, 'folders': folders})


@router.get('/defects/{name}', response_class=HTMLResponse, include_in_schema=False)
def defect_folder_page(request: Request, name: str):
    folder = defect_folder(request, name)
    report: dict = {}
    # The analyzer writes <image id>_report.json; any other JSON is a fallback.
    for path in sorted(folder.glob('*.json'), key=lambda p: (not p.name.endswith('_report.json'), p.name)):
        try:
            loaded = json.loads(resolve_inside(folder, path.name, suffixes=REPORT_SUFFIXES).read_text())
        except (RegistryError, OSError, ValueError):
            continue
        if isinstance(loaded, dict):
            report = loaded
            break
    images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in ('.png', '.jpg', '.jpeg'))
    csvs = sorted(p.name for p in folder.glob('*.csv'))
    return page(request, 'defect_report.html', {'page': 'defects', 'name': name, 'report': report,
                                                'images': images, 'csvs': csvs, 'rows': concentration_rows(report)})


@router.get('/defects/{name}/files/{file_name}', include_in_schema=False)
def defect_file(request: Request, name: str, file_name: str):
    check_name(name, 'report name')
    path = resolve_inside(defects_root(request), f'{name}/{file_name}', suffixes=REPORT_SUFFIXES,
                          what='report file')
    return FileResponse(path)

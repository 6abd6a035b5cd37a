"""/api/docs: the JSON API as a plain page drawn from the OpenAPI description (no scripts from elsewhere)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from flake_registry.web.context import require_read
from flake_registry.web.rendering import page

NAV = None
router = APIRouter(include_in_schema=False, dependencies=[Depends(require_read)])


@router.get('/api/docs', response_class=HTMLResponse)
def api_docs(request: Request):
    schema = request.app.openapi()
    rows = []
    for path, methods in sorted(schema.get('paths', {}).items()):
        for method, operation in methods.items():
            parameters = [p['name'] for p in operation.get('parameters', [])]
            body = operation.get('requestBody', {}).get('content', {})
            rows.append({'method': method.upper(), 'path': path, 'summary': operation.get('summary', ''),
                         'description': (operation.get('description') or '').split('\n\n')[0],
                         'parameters': ', '.join(parameters), 'body': ', '.join(body)})
    return page(request, 'api_docs.html', {'page': 'api', 'rows': rows})

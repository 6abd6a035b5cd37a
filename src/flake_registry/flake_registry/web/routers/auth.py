"""Log-in with the access token (only when the app was started with one), and log-out."""

from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from flake_registry.web.context import web
from flake_registry.web.rendering import page
from flake_registry.web.security import TOKEN_COOKIE, session_value

NAV = None
router = APIRouter(include_in_schema=False)


def safe_next(target: str) -> str:
    """A same-site path to go back to after logging in (never another site)."""
    # Browsers drop tabs and newlines from URLs and read a backslash as a slash: '/\t/x' is '//x'.
    cleaned = ''.join(c for c in target if c >= ' ')
    if not target.startswith('/') or cleaned.startswith('//') or '\\' in target or cleaned != target:
        return '/'
    return target


@router.get('/login', response_class=HTMLResponse)
def login_page(request: Request, next: str = '/'):
    return page(request, 'login.html', {'page': 'login', 'next': safe_next(next[:512]), 'message': ''})


@router.post('/login')
def login(request: Request, token: str = Form(..., min_length=1, max_length=256), next: str = Form('/')):
    access = web(request).access
    access.check_same_origin(request)
    if access.token is None:
        return RedirectResponse(safe_next(next[:512]), status_code=303)  # nothing to log in to
    access.check_login(request, token)
    response = RedirectResponse(safe_next(next[:512]), status_code=303)
    response.set_cookie(TOKEN_COOKIE, session_value(token), httponly=True, samesite='strict')
    return response


@router.post('/logout')
def logout(request: Request):
    web(request).access.check_same_origin(request)
    response = RedirectResponse('/login', status_code=303)
    response.delete_cookie(TOKEN_COOKIE)
    return response

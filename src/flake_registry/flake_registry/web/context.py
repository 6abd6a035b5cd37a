"""What every route of the web app shares: the registry, the data folder, the access policy, the pages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates

from flake_registry.store import FlakeStore
from flake_registry.web.drawing import MosaicCache
from flake_registry.web.jobs import RetrainRunner
from flake_registry.web.security import AccessPolicy


@dataclass(frozen=True)
class NavEntry:
    key: str                                    # a page's `page` value, to highlight it
    title: str
    path: str


@dataclass
class WebContext:
    store: FlakeStore
    db_path: Path
    data_dir: Path                              # resolved: every file route is confined to it
    access: AccessPolicy
    templates: Jinja2Templates
    retrain: RetrainRunner
    max_markers: int
    mosaics: MosaicCache = field(default_factory=MosaicCache)
    nav: list[NavEntry] = field(default_factory=list)


def web(request: Request) -> WebContext:
    """The app's shared state (a FastAPI dependency)."""
    return request.app.state.web


def require_read(request: Request) -> None:
    """With a token, every page and API read needs it (a FastAPI dependency)."""
    web(request).access.check_token(request, 'reading the registry')


def require_write(request: Request) -> None:
    """Writes: same-origin Origin on an allowed host, then the token (a FastAPI dependency)."""
    access = web(request).access
    access.check_same_origin(request)
    access.check_token(request, 'this change')

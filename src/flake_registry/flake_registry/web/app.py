"""The lab web app (``flake-web``): chip map, flake browser, labelling, stack planner, defect reports.

It reads and writes the registry through ``FlakeStore`` (the same core the registry
node uses), so it runs next to a live registry node: the database lets both read at
once and serialises their writes, and reservations stay atomic across the two processes.

The app is a set of routers, one per area (``flake_registry.web.routers``); pages are
rendered in ``rendering``, pictures drawn in ``drawing`` and ``pictures``, files found
only through ``files.resolve_inside``, and who may do what is decided in ``security``.
Served on 127.0.0.1 by default; bound to any other address it refuses to start without
``--token``, and with a token every read and write needs it.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
import socket
import sqlite3
import sys

from fastapi import FastAPI

from flake_registry.retrain import RetrainOptions
from flake_registry.store import FlakeStore
from flake_registry.web.context import WebContext
from flake_registry.web.jobs import RetrainRunner
from flake_registry.web.rendering import install_error_handlers, make_templates
from flake_registry.web.routers import AREAS
from flake_registry.web.security import (
    DEFAULT_ALLOWED_HOSTS,
    MAX_BODY_BYTES,
    AccessPolicy,
    AttemptLimiter,
    GuardMiddleware,
    is_loopback,
    normalise_hosts,
)

__all__ = ['create_app', 'is_loopback', 'main']
# The chip map's overview shows the best this many flakes; zooming in loads the visible region's best.
MAX_MARKERS = 2000


def create_app(db_path: str | os.PathLike, data_dir: str | os.PathLike, token: str | None = None, *,
               store: FlakeStore | None = None, max_markers: int = MAX_MARKERS,
               allowed_hosts=DEFAULT_ALLOWED_HOSTS, max_body_bytes: int = MAX_BODY_BYTES,
               limiter: AttemptLimiter | None = None, retrain_options: RetrainOptions = RetrainOptions()) -> FastAPI:
    """The web app over the registry at ``db_path``; mosaics, images and reports only from ``data_dir``.

    ``allowed_hosts`` are the names the app answers to (DNS rebinding); ``max_markers``
    bounds the chip map's markers per request (zooming in loads the visible region's best).
    """
    store = store or FlakeStore(db_path)
    data_dir = Path(data_dir).resolve()
    access = AccessPolicy(token or None, normalise_hosts(allowed_hosts), limiter or AttemptLimiter())
    app = FastAPI(title='Flake registry', docs_url=None, redoc_url=None, openapi_url='/api/openapi.json')
    app.state.web = WebContext(store=store, db_path=Path(db_path), data_dir=data_dir, access=access,
                               templates=make_templates(), max_markers=max_markers,
                               retrain=RetrainRunner(store, Path(db_path), data_dir, retrain_options),
                               nav=[area.NAV for area in AREAS if area.NAV is not None])
    app.state.store = store
    install_error_handlers(app)
    for area in AREAS:
        app.include_router(area.router)
    app.add_middleware(GuardMiddleware, allowed_hosts=access.allowed_hosts, max_body_bytes=max_body_bytes)
    return app


def registry_problem(db_path: Path) -> str | None:
    """Why ``db_path`` is not a registry to serve, or None (read-only look: nothing is created)."""
    if not db_path.exists():
        return f'no registry at {db_path} (a mistyped --db?); registry_node creates it on its first start'
    if not db_path.is_file():
        return f'{db_path} is not a file'
    try:
        with open(db_path, 'rb') as handle:
            if handle.read(16) != b'SQLite format 3\x00':
                return f'{db_path} is not a registry (not an SQLite file)'
        connection = sqlite3.connect(f'{db_path.resolve().as_uri()}?mode=ro', uri=True)
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except (OSError, sqlite3.Error) as exc:
        return f'cannot read {db_path}: {exc}'
    if 'flakes' not in tables:
        return f'{db_path} is an SQLite file but not a flake registry (no flakes table)'
    return None


def own_names(host: str) -> list[str]:
    """The names this computer is reached by when the app listens beyond loopback."""
    names = [host] if host not in ('0.0.0.0', '::', '') else []
    for name in (socket.gethostname(), socket.getfqdn()):
        names.append(name)
        try:
            names.extend(info[4][0] for info in socket.getaddrinfo(name, None))
        except OSError:
            continue
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='flake-web', description='Lab web app over the flake registry (chip map, flakes, labels, stacks). '
                                      'Subcommands: `flake-web retrain ...` retrains the cascade from labels; '
                                      '`flake-web candidates IMAGE...` cuts candidate crops to label.')
    parser.add_argument('--db', default='', help='registry SQLite file (default: <data dir>/registry.sqlite); '
                                                 'must exist')
    parser.add_argument('--data-dir', default='', help='folder with scans/, defects/ and candidates/ '
                                                       '(default: $FLAKE_DATA_DIR or ./data)')
    parser.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this computer only)')
    parser.add_argument('--port', type=int, default=8080, help='TCP port (default 8080)')
    parser.add_argument('--token', default=os.environ.get('FLAKE_WEB_TOKEN', ''),
                        help='access token for every read and write; required when --host is not a loopback '
                             'address (default: $FLAKE_WEB_TOKEN)')
    parser.add_argument('--allow-host', action='append', default=[], metavar='NAME',
                        help='another host name people type to reach the app (repeatable); requests naming any '
                             'other host are refused (DNS rebinding protection)')
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == 'retrain':
        from flake_registry.retrain import main as retrain_main
        return retrain_main(argv[1:])
    if argv and argv[0] == 'candidates':
        from flake_detector.cut_candidates import main as candidates_main
        return candidates_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f'--port must be 1..65535, got {args.port}')
    if not is_loopback(args.host) and not args.token:
        parser.error(f'--host {args.host} serves the registry beyond this computer: give --token (or '
                     'FLAKE_WEB_TOKEN) so that only people with it can read, label and reserve')
    if args.token and len(args.token) < 8:
        parser.error('--token must be at least 8 characters')
    data_dir = Path(args.data_dir or os.environ.get('FLAKE_DATA_DIR') or 'data')
    if args.data_dir and not data_dir.is_dir():
        parser.error(f'--data-dir {data_dir} is not a folder')
    db_path = Path(args.db) if args.db else data_dir / 'registry.sqlite'
    problem = registry_problem(db_path)
    if problem:
        parser.error(problem)
    allowed = [*DEFAULT_ALLOWED_HOSTS, *args.allow_host]
    if not is_loopback(args.host):
        allowed += own_names(args.host)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    app = create_app(db_path, data_dir, token=args.token or None, allowed_hosts=allowed)
    print(f'flake-web: registry {db_path}, data {data_dir}, serving http://{args.host}:{args.port}/ '
          f'(answers to {", ".join(sorted(app.state.web.access.allowed_hosts))})', flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level='warning')
    return 0


if __name__ == '__main__':
    sys.exit(main())

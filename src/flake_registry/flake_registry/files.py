"""The one way the registry turns a name from a request or a registry row into a file it may read.

Every file route of the web app (mosaics, flake images, frames, candidate crops, defect
reports, static files), every download, the registry's image services, the exports and
the labelled-crop export go through ``resolve_inside``: the name is taken after URL
decoding, ``..`` is refused outright, symbolic links are resolved, and the real file
must lie inside the folder it is meant for and carry a suffix of the kind served there.
Registry files (the SQLite database, its WAL and shared memory, journals) are never
served, whatever they are called or linked as.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from flake_registry.query import INVALID_ARGUMENT, UNKNOWN_ID, RegistryError

FORBIDDEN = 'FORBIDDEN'
IMAGE_SUFFIXES = frozenset({'.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp'})
REPORT_SUFFIXES = IMAGE_SUFFIXES | {'.csv', '.json'}
STATIC_SUFFIXES = frozenset({'.css', '.js'})
# SQLite's own files and what people call registries; checked on the real (link-resolved) name.
REGISTRY_SUFFIXES = frozenset({'.sqlite', '.sqlite3', '.db', '.db3'})
REGISTRY_ENDINGS = ('-wal', '-shm', '-journal')
SQLITE_MAGIC = b'SQLite format 3\x00'
MAX_NAME_CHARS = 1024


def is_registry_file(path: Path) -> bool:
    """True for a database file or one of its companions, by name or by its first bytes."""
    name = path.name.lower()
    if REGISTRY_SUFFIXES.intersection(s.lower() for s in path.suffixes) or name.endswith(REGISTRY_ENDINGS):
        return True
    try:
        with open(path, 'rb') as handle:
            return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def resolve_inside(root: Path, name: str, *, suffixes: frozenset[str] = IMAGE_SUFFIXES,
                   allow_absolute: bool = False, what: str = 'file') -> Path:
    """The real path of ``name`` (relative to ``root``) when it is a servable file inside ``root``.

    ``allow_absolute`` accepts an absolute ``name`` (image rows of the registry may hold
    one), which must still lie inside ``root`` once symbolic links are resolved.
    Raises RegistryError: INVALID_ARGUMENT for a malformed name, FORBIDDEN for anything
    outside ``root``, of another kind, or a registry file, UNKNOWN_ID for a missing file.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or '\x00' in name or '\\' in name:
        raise RegistryError(INVALID_ARGUMENT, f'{what} name is empty, too long or malformed')
    pure = PurePosixPath(name)
    if pure.is_absolute() and not allow_absolute:
        raise RegistryError(FORBIDDEN, f'{what} {name!r} is an absolute path; only names inside the folder are served')
    if '..' in pure.parts:
        raise RegistryError(FORBIDDEN, f'{what} {name!r} climbs out of its folder (..); refused')
    base = Path(root).resolve()
    try:
        real = (base / pure).resolve(strict=True)
    except (OSError, RuntimeError):
        raise RegistryError(UNKNOWN_ID, f'no {what} {name!r}') from None
    if not real.is_relative_to(base) or real == base:
        raise RegistryError(FORBIDDEN, f'{what} {name!r} lies outside the folder it is served from; refused')
    if real.suffix.lower() not in suffixes or pure.suffix.lower() not in suffixes:
        raise RegistryError(FORBIDDEN, f'{what} {name!r} is not of a kind served here ({", ".join(sorted(suffixes))})')
    if not real.is_file():
        raise RegistryError(UNKNOWN_ID, f'no {what} {name!r}')
    if is_registry_file(real):
        raise RegistryError(FORBIDDEN, f'{what} {name!r} is a registry file; registry files are never served')
    return real

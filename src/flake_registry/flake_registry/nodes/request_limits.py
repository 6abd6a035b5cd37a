"""Size limits on what the registry accepts over ROS, checked before any work is done.

ROS strings and sequences carry no length limit of their own: without these checks
a 1 MB note or a 200 000-character robot id went into the database, and an image
path could name any file of the registry host. Every service request (and every
``Flake`` of a ``/detections`` batch) is walked field by field: a text or list
longer than its limit is refused with ``INVALID_ARGUMENT`` naming the field and the
limit, oversized pixels with ``INVALID_IMAGE``. Image paths must name an existing
image file inside the registry's data folder.

No rclpy here: the checks work on any generated message object and are tested
directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from flake_registry.query import INVALID_ARGUMENT, RegistryError

INVALID_IMAGE = 'INVALID_IMAGE'

# Text limits [characters] by dotted field path, then by field name; others get DEFAULT_TEXT.
TEXT_LIMITS = {
    'flake_id': 32,                             # F + 7 digits today
    'recipe_id': 32,
    'robot_id': 64,
    'token': 64,                                # tokens are 32 characters
    'material': 32,
    'materials': 32,                            # each element of a string list
    'sort_by': 32,
    'role': 32,
    'objective': 32,
    'encoding': 32,
    'chip_id': 128,
    'scan_id': 128,
    'detector': 128,
    'model_version': 128,
    'frame_id': 128,
    'note': 1000,
    'path': 1024,
}
DEFAULT_TEXT = 256
# List limits [elements] by dotted field path, then by field name; others get DEFAULT_LIST.
LIST_LIMITS = {
    'layer_classes': 16,
    'statuses': 16,
    'materials': 16,
    'contour.points': 10_000,                   # detectors send at most a few hundred
    'mask.data': 16 * 1024 * 1024,              # mono8 over the flake's box
    'pixels.data': 64 * 1024 * 1024,            # a 20 MP rgb8 revisit frame is 60 MB
}
DEFAULT_LIST = 1000
MAX_IMAGE_SIDE = 16384                          # [px]
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')


def _limit(table: dict[str, int], path: str, name: str, default: int) -> int:
    return table.get(path, table.get(name, default))


def check_message(msg, prefix: str = '') -> None:
    """Raise RegistryError when a text or list field of ``msg`` (nested ones too) is too long."""
    for name, kind in msg.get_fields_and_field_types().items():
        value = getattr(msg, name)
        path = f'{prefix}{name}'
        if kind == 'string' or kind.startswith('string<'):
            _check_text(path, name, value)
        elif kind.startswith('sequence<'):
            limit = _limit(LIST_LIMITS, path, name, DEFAULT_LIST)
            if len(value) > limit:
                code = INVALID_IMAGE if path == 'pixels.data' else INVALID_ARGUMENT
                raise RegistryError(code, f'{path} has {len(value)} elements; at most {limit}')
            if kind.startswith('sequence<string'):
                for item in value:
                    _check_text(path, name, item)
            # Sequences of messages (outline points) hold only numbers: their length is the limit.
        elif '/' in kind:
            check_message(value, f'{path}.')


def _check_text(path: str, name: str, value: str) -> None:
    limit = _limit(TEXT_LIMITS, path, name, DEFAULT_TEXT)
    if len(value) > limit:
        raise RegistryError(INVALID_ARGUMENT, f'{path} has {len(value)} characters; at most {limit}')
    if '\x00' in value:
        raise RegistryError(INVALID_ARGUMENT, f'{path} contains a NUL character')


def check_image_size(width: int, height: int) -> None:
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
        raise RegistryError(INVALID_IMAGE, f'image of {width} x {height} px; each side must be 1..{MAX_IMAGE_SIDE}')


def confine_path(path: str, data_dir: Path, other_roots: tuple[Path, ...] = ()) -> str:
    """``path`` as the registry stores it, or RegistryError when it leaves the data folder.

    A relative path is read from ``data_dir``. After symbolic links and ``..`` are
    resolved the file must lie inside ``data_dir`` (or one of ``other_roots``), exist,
    and have an image suffix. Returned relative to ``data_dir`` when inside it (the
    web app and exports read it from there), else absolute.
    """
    if not path.strip():
        raise RegistryError(INVALID_ARGUMENT, 'image path is empty')
    data_dir = Path(data_dir).resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = data_dir / candidate
    resolved = Path(os.path.realpath(candidate))
    roots = (data_dir, *(Path(r).resolve() for r in other_roots))
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise RegistryError(INVALID_ARGUMENT, f'image path {path!r} is outside the registry data folder '
                                              f'(relative paths are read from there)')
    if resolved.suffix.lower() not in IMAGE_SUFFIXES:
        raise RegistryError(INVALID_ARGUMENT, f'image path {path!r} is not an image file '
                                              f'({", ".join(IMAGE_SUFFIXES)})')
    if not resolved.is_file():
        raise RegistryError(INVALID_ARGUMENT, f'no image file at {path!r} in the registry data folder')
    if data_dir in resolved.parents:
        return resolved.relative_to(data_dir).as_posix()
    return str(resolved)

"""Size limits on what the registry accepts over ROS, checked before any work is done.

ROS strings and sequences carry no length limit of their own: without these checks
a 1 MB note or a 200 000-character robot id went into the database, and an image
path could name any file of the registry host. Every service request (and every
``Flake`` of a ``/detections`` batch) is walked field by field: a text or list
longer than its limit is refused with ``INVALID_ARGUMENT`` naming the field and the
limit, oversized pixels with ``INVALID_IMAGE``. Image paths must name an existing
image file inside the registry's data folder. ``answer_request`` is how every registry
service answers: the checks, then the work; a refusal or a failure becomes an error
code in the response, never an exception.

No rclpy here: the checks work on any generated message object and are tested
directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flake_registry.files import IMAGE_SUFFIXES, resolve_inside
from flake_registry.query import INTERNAL_ERROR, INVALID_ARGUMENT, RegistryError

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


def _limit(table: dict[str, int], path: str, name: str, default: int) -> int:
    return table.get(path, table.get(name, default))


def check_message(msg) -> None:
    """Raise RegistryError when a text or list field of ``msg`` (nested ones too) is too long."""
    for kind, attribute, path, limit in _plan(type(msg)):
        value = msg
        for name in attribute:
            value = getattr(value, name)
        if kind is _TEXT:  # _check_text inlined: this loop runs for every field of every detection
            if len(value) > limit:
                raise RegistryError(INVALID_ARGUMENT, f'{path} has {len(value)} characters; at most {limit}')
            if '\x00' in value:
                raise RegistryError(INVALID_ARGUMENT, f'{path} contains a NUL character')
        else:
            if len(value) > limit:
                code = INVALID_IMAGE if path == 'pixels.data' else INVALID_ARGUMENT
                raise RegistryError(code, f'{path} has {len(value)} elements; at most {limit}')
            if kind is _TEXTS:
                text_limit = _limit(TEXT_LIMITS, path, attribute[-1], DEFAULT_TEXT)
                for item in value:
                    _check_text(path, text_limit, item)


_TEXT, _LIST, _TEXTS = 'text', 'list', 'texts'
_PLANS: dict[type, list[tuple[str, tuple[str, ...], str, int]]] = {}


def _plan(msg_class) -> list[tuple[str, tuple[str, ...], str, int]]:
    """What to check in a message class, worked out once: (kind, attribute chain, path, limit).

    Walking the generated field tables on every message cost 50 us per detection."""
    plan = _PLANS.get(msg_class)
    if plan is None:
        plan = []
        _collect(msg_class, (), plan)
        _PLANS[msg_class] = plan
    return plan


def _collect(msg_class, attribute: tuple[str, ...], plan: list) -> None:
    for name, kind in msg_class.get_fields_and_field_types().items():
        chain = (*attribute, name)
        path = '.'.join(chain)
        if kind == 'string' or kind.startswith('string<'):
            plan.append((_TEXT, chain, path, _limit(TEXT_LIMITS, path, name, DEFAULT_TEXT)))
        elif kind.startswith('sequence<'):
            # Sequences of messages (outline points) hold only numbers: their length is the limit.
            texts = kind.startswith('sequence<string')
            plan.append((_TEXTS if texts else _LIST, chain, path, _limit(LIST_LIMITS, path, name, DEFAULT_LIST)))
        elif '/' in kind:
            package, _, type_name = kind.partition('/')
            module = __import__(f'{package}.msg', fromlist=[type_name])
            _collect(getattr(module, type_name), chain, plan)


def _check_text(path: str, limit: int, value: str) -> None:
    if len(value) > limit:
        raise RegistryError(INVALID_ARGUMENT, f'{path} has {len(value)} characters; at most {limit}')
    if '\x00' in value:
        raise RegistryError(INVALID_ARGUMENT, f'{path} contains a NUL character')


def answer_request(request, response, action: Callable[[], None], what: str, logger: Any = None):
    """Check ``request`` against the limits and run ``action`` (which fills ``response``); a refusal
    becomes its error code in ``response``, a failure INTERNAL_ERROR (logged as ``what`` failed)."""
    try:
        check_message(request)
        action()
        response.success, response.error_code = True, ''
    except RegistryError as error:
        response.success, response.error_code, response.message = False, error.code, error.message
    except Exception as error:  # noqa: BLE001 - a service must answer, whatever went wrong
        if logger is not None:
            logger.error(f'{what} failed: {type(error).__name__}: {error}')
        response.success, response.error_code = False, INTERNAL_ERROR
        response.message = f'{type(error).__name__}: {error}'
    return response


def check_image_size(width: int, height: int) -> None:
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
        raise RegistryError(INVALID_IMAGE, f'image of {width} x {height} px; each side must be 1..{MAX_IMAGE_SIDE}')


def confine_path(path: str, data_dir: Path, other_roots: tuple[Path, ...] = ()) -> str:
    """``path`` as the registry stores it, or RegistryError(INVALID_ARGUMENT) when it may not be kept.

    The name is resolved by the one function that resolves every file name the registry
    serves (``flake_registry.files.resolve_inside``): read from ``data_dir`` when
    relative, no ``..``, symbolic links resolved, and the real file must be an existing
    image inside ``data_dir`` (or one of ``other_roots``), never a registry file.
    Returned relative to ``data_dir`` when inside it (the web app and exports read it
    from there), else absolute.
    """
    if not path.strip():
        raise RegistryError(INVALID_ARGUMENT, 'image path is empty')
    data_dir = Path(data_dir).resolve()
    refusal = None
    for root in (data_dir, *(Path(r).resolve() for r in other_roots)):
        try:
            real = resolve_inside(root, path, suffixes=IMAGE_SUFFIXES, allow_absolute=True, what='image')
        except RegistryError as error:
            refusal = refusal or RegistryError(INVALID_ARGUMENT, f'image path refused: {error.message} (the '
                                                                 'registry keeps images inside its data folder; '
                                                                 'relative paths are read from there)')
            continue
        return real.relative_to(data_dir).as_posix() if real.is_relative_to(data_dir) else str(real)
    raise refusal

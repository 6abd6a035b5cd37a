"""Message types for reading and writing bags without a ROS install.

rosbags ships the standard ROS 2 types (std, sensor, geometry, rosgraph, ...);
the project's own flake_msgs types are parsed from their ``.msg``/``.srv``/``.action``
files and registered once, so every bag written here carries full definitions
and type hashes that match rosidl's.
"""

from __future__ import annotations

import functools
from pathlib import Path

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

INTERFACE_PACKAGE = 'flake_msgs'
# Kilted is the distro the pip-only install runs; its definitions of the standard
# types are identical to Jazzy's for everything this project records.
BASE_STORE = Stores.ROS2_KILTED


def interface_share_dir() -> Path:
    """The directory holding flake_msgs' msg/, srv/ and action/ definitions.

    The installed share directory (found through the ament index) wins; a source
    checkout without an install falls back to the package sources next to this one.
    """
    try:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory(INTERFACE_PACKAGE))
        if (share / 'msg').is_dir():
            return share
    except Exception:  # noqa: BLE001 - any lookup failure means "not installed"
        pass
    source = Path(__file__).resolve().parents[3] / INTERFACE_PACKAGE
    if (source / 'msg').is_dir():
        return source
    raise FileNotFoundError(f'cannot find the {INTERFACE_PACKAGE} interface definitions '
                            '(neither installed in the ament index nor in the source tree)')


def _split_sections(text: str) -> list[str]:
    sections: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip() == '---':
            sections.append([])
        else:
            sections[-1].append(line)
    return ['\n'.join(lines) + '\n' for lines in sections]


def _qualify(text: str, local_messages: set[str]) -> str:
    """Spell relative references to flake_msgs messages in full, as rosidl resolves them."""
    lines = []
    for line in text.splitlines():
        parts = line.split(maxsplit=1)
        if parts and not line.lstrip().startswith('#'):
            base = parts[0].split('[')[0]
            if base in local_messages:
                line = line.replace(parts[0], f'{INTERFACE_PACKAGE}/msg/{parts[0]}', 1)
        lines.append(line)
    return '\n'.join(lines) + '\n'


def interface_definitions(share: Path | None = None) -> dict[str, str]:
    """Map every flake_msgs type name (``flake_msgs/msg/Flake``, ...) to its definition text.

    Actions contribute ``_Goal``/``_Result``/``_Feedback`` and the ``_FeedbackMessage``
    that travels on the action's feedback topic. Services are left out: they never
    travel on a topic, and rosbags has no namespace for them.
    """
    share = share or interface_share_dir()
    definitions: dict[str, str] = {}
    for path in sorted((share / 'msg').glob('*.msg')):
        definitions[f'{INTERFACE_PACKAGE}/msg/{path.stem}'] = path.read_text()
    local_messages = {name.rsplit('/', 1)[1] for name in definitions}
    for path in sorted((share / 'action').glob('*.action')):
        goal, result, feedback = _split_sections(path.read_text())
        base = f'{INTERFACE_PACKAGE}/action/{path.stem}'
        definitions[f'{base}_Goal'] = _qualify(goal, local_messages)
        definitions[f'{base}_Result'] = _qualify(result, local_messages)
        definitions[f'{base}_Feedback'] = _qualify(feedback, local_messages)
        definitions[f'{base}_FeedbackMessage'] = (
            f'unique_identifier_msgs/UUID goal_id\n{base}_Feedback feedback\n')
    return definitions


@functools.lru_cache(maxsize=1)
def typestore() -> Typestore:
    """The shared typestore: standard ROS 2 types plus every flake_msgs type."""
    store = get_typestore(BASE_STORE)
    types: dict = {}
    for name, text in interface_definitions().items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store


def python_message_class(msgtype: str):
    """The rclpy message class for ``pkg/msg/Name`` (needs the generated Python package).

    Raises LookupError naming the type when it is not importable here.
    """
    import importlib

    parts = msgtype.split('/')
    if len(parts) != 3:
        raise LookupError(f'malformed message type name {msgtype!r} (expected pkg/msg/Name)')
    package, kind, name = parts
    try:
        module = importlib.import_module(f'{package}.{kind}')
        if hasattr(module, name):
            return getattr(module, name)
        # Action parts (Scan_Goal, Scan_FeedbackMessage, ...) live on the action class.
        action, _, part = name.rpartition('_')
        if kind == 'action' and action and hasattr(module, action):
            holder = getattr(module, action)
            return getattr(holder, part, None) or getattr(holder.Impl, part)
        return getattr(module, name)
    except (ImportError, AttributeError) as exc:
        raise LookupError(f'message type {msgtype} is not available in this Python environment '
                          f'({exc.__class__.__name__}: {exc})') from exc

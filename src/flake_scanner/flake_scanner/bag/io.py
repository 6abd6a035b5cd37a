"""Reading and writing rosbag2 bags (MCAP or sqlite3) without a ROS install.

Pure core: no rclpy, no generated message classes. Messages stay as serialized
CDR bytes end to end, so recording and replay never pay for (de)serialization;
``deserialize`` turns them into rosbags dataclasses when a consumer needs fields.

Bags are written with rosbag2 metadata ``version=9`` (what Jazzy and Kilted's
rosbag2 write and read, with per-topic message definitions and type hashes).
``version=8`` is available for older readers (Iron); Humble's rosbag2 reads
neither reliably and is not a target.

Every failure to read a bag surfaces as a ``BagError`` subclass whose message
names the bag and the problem; nothing here retries or waits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
import struct

from rosbags.interfaces import (
    Connection,
    MessageDefinitionFormat,
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import Reader, StoragePlugin, Writer, WriterError
from rosbags.typesys import get_types_from_msg
from rosbags.typesys.store import Typestore

from flake_scanner.bag.types import typestore

SCAN_FRAME_TYPE = 'flake_msgs/msg/ScanFrame'
FLAKE_ARRAY_TYPE = 'flake_msgs/msg/FlakeArray'
CLOCK_TYPE = 'rosgraph_msgs/msg/Clock'
STORAGES = ('mcap', 'sqlite3')
BAG_VERSIONS = (8, 9)
DEFAULT_BAG_VERSION = 9
# The simulator's COCO ground truth travels inside the bag directory under this name.
GROUND_TRUTH_FILE = 'ground_truth.json'
# ... or inside the bag, as COCO JSON in std_msgs/String messages on this topic.
GROUND_TRUTH_TOPIC = '/scan/ground_truth'
STRING_TYPE = 'std_msgs/msg/String'


class BagError(Exception):
    """A bag that cannot be used, with the reason in the message."""


class BagNotFoundError(BagError):
    """No bag at the given path."""


class CorruptBagError(BagError):
    """The bag's files are unreadable or inconsistent."""


class TruncatedBagError(CorruptBagError):
    """The bag's storage file ends early (a recorder killed mid-write, a partial copy)."""


class UnknownTypeError(BagError):
    """A topic's message type is neither known here nor defined in the bag."""


class NoFramesError(BagError):
    """The bag holds no ScanFrame messages to evaluate."""


@dataclass(frozen=True)
class TopicQos:
    """The part of a publisher's QoS a replay must reproduce."""

    reliable: bool = True
    transient_local: bool = False
    depth: int = 10

    def to_rosbags(self) -> Qos:
        zero = QosTime(0, 0)
        return Qos(history=QosHistory.KEEP_LAST, depth=self.depth,
                   reliability=QosReliability.RELIABLE if self.reliable else QosReliability.BEST_EFFORT,
                   durability=(QosDurability.TRANSIENT_LOCAL if self.transient_local
                               else QosDurability.VOLATILE),
                   deadline=zero, lifespan=zero, liveliness=QosLiveliness.AUTOMATIC,
                   liveliness_lease_duration=zero, avoid_ros_namespace_conventions=False)

    @classmethod
    def from_rosbags(cls, profiles: Iterable[Qos]) -> TopicQos:
        """One profile that every recorded publisher's subscribers were compatible with."""
        profiles = list(profiles)
        if not profiles:
            return cls()
        return cls(reliable=all(p.reliability == QosReliability.RELIABLE for p in profiles),
                   transient_local=all(p.durability == QosDurability.TRANSIENT_LOCAL for p in profiles),
                   depth=max(max(p.depth for p in profiles), 1))


@dataclass(frozen=True)
class TopicInfo:
    name: str
    msgtype: str
    count: int
    qos: TopicQos
    has_definition: bool
    type_hash: str = ''  # RIHS01 hash of the definition it was recorded with ('' when unknown)


@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    timestamp: int  # receive time [ns] as recorded
    data: bytes  # serialized CDR, exactly as it travelled


def _looks_truncated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (EOFError, struct.error)) or any(
        word in text for word in ('truncat', 'unexpected end', 'not enough data', 'short read',
                                  'magic', 'footer', 'end of file', 'eof', 'incomplete'))


def _wrap(path: Path, exc: BaseException, doing: str) -> BagError:
    """Turn a storage library's exception into a BagError naming the bag and the problem."""
    if isinstance(exc, BagError):
        return exc
    detail = f'{exc.__class__.__name__}: {exc}'
    if _looks_truncated(exc):
        return TruncatedBagError(f'bag {path} is truncated ({doing}): {detail}')
    return CorruptBagError(f'bag {path} is corrupt or unreadable ({doing}): {detail}')


def detect_storage(path: Path) -> str:
    """'mcap' or 'sqlite3' for a bag directory or a bare storage file."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(path.glob('*.mcap')) + sorted(path.glob('*.db3'))
        metadata = path / 'metadata.yaml'
        if metadata.is_file():
            text = metadata.read_text(errors='replace')
            if 'storage_identifier: mcap' in text:
                return 'mcap'
            if 'storage_identifier: sqlite3' in text:
                return 'sqlite3'
    for file in files:
        with file.open('rb') as stream:
            head = stream.read(16)
        if head.startswith(b'\x89MCAP'):
            return 'mcap'
        if head.startswith(b'SQLite format 3'):
            return 'sqlite3'
    raise CorruptBagError(f'bag {path}: no MCAP or sqlite3 storage file recognised')


_MAGIC = {'mcap': b'\x89MCAP', 'sqlite3': b'SQLite format 3'}


def _check_magic(path: Path, storage: str) -> None:
    """A storage file that does not begin as its format does is not a bag at all (not a truncated one)."""
    files = [path] if path.is_file() else sorted(path.glob('*.mcap' if storage == 'mcap' else '*.db3'))
    for file in files:
        with file.open('rb') as stream:
            head = stream.read(16)
        if not head.startswith(_MAGIC[storage]):
            raise CorruptBagError(f'bag {file} is not an {storage} file: it does not begin with the {storage} '
                                  f'signature (first bytes {head[:8]!r})')


class BagReader:
    """An open bag: its topics and an iterator over its messages as raw bytes.

    Accepts a rosbag2 directory (metadata.yaml + storage files, as ``ros2 bag
    record`` writes) or a bare ``.mcap``/``.db3`` file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise BagNotFoundError(f'no bag at {self.path}')
        if self.path.is_dir() and not (self.path / 'metadata.yaml').is_file():
            storage_files = sorted(self.path.glob('*.mcap')) + sorted(self.path.glob('*.db3'))
            if len(storage_files) != 1:
                raise CorruptBagError(f'bag {self.path} has no metadata.yaml and '
                                      f'{len(storage_files)} storage files (expected exactly one)')
            self.path = storage_files[0]
        self.storage = detect_storage(self.path)
        _check_magic(self.path, self.storage)
        try:
            self._reader = Reader(self.path)
            self._reader.open()
        except Exception as exc:  # noqa: BLE001 - garbled lengths surface as anything, MemoryError included
            raise _wrap(self.path, exc, 'opening') from exc
        self._typestore: Typestore = typestore()
        self._stores: dict[str, Typestore] = {}
        self.topics = self._collect_topics(self._reader.connections)

    @staticmethod
    def _collect_topics(connections: list[Connection]) -> dict[str, TopicInfo]:
        topics: dict[str, TopicInfo] = {}
        for conn in connections:
            qos = TopicQos.from_rosbags(getattr(conn.ext, 'offered_qos_profiles', []) or [])
            previous = topics.get(conn.topic)
            count = conn.msgcount + (previous.count if previous else 0)
            topics[conn.topic] = TopicInfo(
                name=conn.topic, msgtype=conn.msgtype, count=count, qos=qos,
                has_definition=conn.msgdef.format != MessageDefinitionFormat.NONE and bool(conn.msgdef.data),
                type_hash=conn.digest if str(conn.digest).startswith('RIHS01_') else '')
        return topics

    @property
    def message_count(self) -> int:
        return self._reader.message_count

    @property
    def start_time(self) -> int:
        return self._reader.start_time if self._reader.message_count else 0

    @property
    def end_time(self) -> int:
        return self._reader.end_time if self._reader.message_count else 0

    def topics_of_type(self, msgtype: str) -> list[str]:
        return sorted(name for name, info in self.topics.items() if info.msgtype == msgtype)

    def definition_mismatch(self, topic: str) -> str | None:
        """Why ``topic``'s recorded definition differs from the one known here, or None when it agrees.

        Only checked where the bag stores a type hash (rosbag2 metadata version 7 and later).
        """
        info = self.topics[topic]
        if not info.type_hash or info.msgtype not in self._typestore.fielddefs:
            return None
        local = self._typestore.hash_rihs01(info.msgtype)
        if local == info.type_hash:
            return None
        return (f'{topic} was recorded with a different definition of {info.msgtype} '
                f'(hash {info.type_hash[:19]}..., here {local[:19]}...)')

    def messages(self, topics: Iterable[str] | None = None, start: int | None = None,
                 stop: int | None = None) -> Iterator[BagMessage]:
        """Messages of ``topics`` (all when None) in timestamp order, ``start <= t < stop`` [ns]."""
        wanted = None if topics is None else set(topics)
        if wanted is not None:
            missing = wanted - set(self.topics)
            if missing:
                raise BagError(f'bag {self.path} has no topic(s) {sorted(missing)}; '
                               f'it has {sorted(self.topics)}')
        connections = [c for c in self._reader.connections if wanted is None or c.topic in wanted]
        if not connections:
            return
        try:
            for conn, timestamp, data in self._reader.messages(connections, start=start, stop=stop):
                yield BagMessage(conn.topic, conn.msgtype, timestamp, bytes(data))
        except BagError:
            raise
        except Exception as exc:  # noqa: BLE001 - a storage library failing mid-file is a bag problem
            raise _wrap(self.path, exc, 'reading messages') from exc

    def _store_for(self, msgtype: str) -> Typestore:
        """The typestore that decodes ``msgtype`` as it was recorded.

        The shared store when the type is known here with the same definition; else one
        built from the definition stored in the bag (foreign types, older versions).
        """
        if msgtype in self._stores:
            return self._stores[msgtype]
        stale = any(self.definition_mismatch(t) for t, i in self.topics.items() if i.msgtype == msgtype)
        if msgtype in self._typestore.fielddefs and not stale:
            return self._typestore
        definition = next((c.msgdef for c in self._reader.connections if c.msgtype == msgtype), None)
        if definition is None or definition.format != MessageDefinitionFormat.MSG or not definition.data:
            raise UnknownTypeError(f'bag {self.path}: message type {msgtype} is unknown here and the bag '
                                   'carries no .msg definition for it')
        try:
            types = _types_from_concatenated_msgdef(definition.data, msgtype)
            store = _store_with(self._typestore, types)
        except Exception as exc:  # noqa: BLE001 - a garbled definition is an unknown type
            raise UnknownTypeError(f'bag {self.path}: cannot parse the definition of {msgtype} '
                                   f'stored in the bag: {exc}') from exc
        self._stores[msgtype] = store
        return store

    def deserialize(self, message: BagMessage):
        """The message as a rosbags dataclass (fields as in the .msg, arrays as numpy)."""
        store = self._store_for(message.msgtype)
        try:
            return store.deserialize_cdr(message.data, message.msgtype)
        except Exception as exc:  # noqa: BLE001 - bad bytes in a message are a corrupt bag
            raise CorruptBagError(f'bag {self.path}: a {message.msgtype} message on {message.topic} at '
                                  f't={message.timestamp} ns cannot be decoded: {exc}') from exc

    def close(self) -> None:
        if getattr(self, '_reader', None) is not None and self._reader.is_open:
            self._reader.close()

    def __enter__(self) -> BagReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _types_from_concatenated_msgdef(text: str, msgtype: str) -> dict:
    """Parse a rosbag2 message definition: the type's .msg, then its dependencies after '=' lines."""
    types: dict = {}
    sections = text.split('\n' + '=' * 80 + '\n')
    types.update(get_types_from_msg(sections[0], msgtype))
    for section in sections[1:]:
        header, _, body = section.partition('\n')
        name = header.removeprefix('MSG: ').strip()
        if '/' in name and '/msg/' not in name:
            package, base = name.split('/', 1)
            name = f'{package}/msg/{base}'
        types.update(get_types_from_msg(body, name))
    return types


def _store_with(store: Typestore, types: dict) -> Typestore:
    """A copy of ``store`` in which ``types`` replace definitions of the same name."""
    from rosbags.typesys import Stores, get_typestore

    copy = get_typestore(Stores.EMPTY)
    copy.register({name: value for name, value in store.fielddefs.items() if name not in types})
    copy.register(types)
    return copy


class BagWriter:
    """Writes a rosbag2 bag that ``ros2 bag play`` on Jazzy/Kilted plays.

    ``path`` is the bag directory to create (it must not exist yet).
    """

    def __init__(self, path: str | Path, storage: str = 'mcap', version: int = DEFAULT_BAG_VERSION):
        if storage not in STORAGES:
            raise ValueError(f'storage must be one of {STORAGES}, got {storage!r}')
        if version not in BAG_VERSIONS:
            raise ValueError(f'bag version must be one of {BAG_VERSIONS}, got {version}')
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f'{self.path} exists already; choose a new bag directory')
        self.storage = storage
        plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        self._typestore = typestore()
        self._writer = Writer(self.path, version=version, storage_plugin=plugin)
        self._writer.open()
        self._connections: dict[str, Connection] = {}
        self.message_count = 0

    def known_type(self, msgtype: str) -> bool:
        return msgtype in self._typestore.fielddefs

    def add_topic(self, topic: str, msgtype: str, qos: TopicQos | None = None) -> None:
        if topic in self._connections:
            if self._connections[topic].msgtype != msgtype:
                raise BagError(f'topic {topic} is already recorded as {self._connections[topic].msgtype}, '
                               f'not {msgtype}')
            return
        if not self.known_type(msgtype):
            raise UnknownTypeError(f'cannot record {topic}: message type {msgtype} has no definition here '
                                   '(only the standard ROS 2 types and flake_msgs are known)')
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=self._typestore,
            offered_qos_profiles=[(qos or TopicQos()).to_rosbags()])

    def has_topic(self, topic: str) -> bool:
        return topic in self._connections

    def write(self, topic: str, timestamp: int, data: bytes | memoryview) -> None:
        try:
            connection = self._connections[topic]
        except KeyError:
            raise BagError(f'topic {topic} was not added to bag {self.path}') from None
        self._writer.write(connection, int(timestamp), data)
        self.message_count += 1

    def serialize(self, message, msgtype: str) -> bytes:
        """CDR bytes of a rosbags dataclass (for tools that build messages without rclpy)."""
        return bytes(self._typestore.serialize_cdr(message, msgtype))

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except WriterError as exc:
                raise BagError(f'closing bag {self.path} failed: {exc}') from exc
            self._writer = None

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


PREFERRED_FRAME_TOPICS = ('/scan/tiles', '/scan/frames')


def frame_topic(reader: BagReader, topic: str | None = None) -> str:
    """The ScanFrame topic to evaluate: ``topic``, else the detector's input, else the only one."""
    frame_topics = reader.topics_of_type(SCAN_FRAME_TYPE)
    if topic is not None:
        if topic not in frame_topics:
            raise NoFramesError(f'bag {reader.path} has no {SCAN_FRAME_TYPE} topic {topic}; '
                                f'its ScanFrame topics: {frame_topics or "none"}')
        return topic
    if not frame_topics:
        listing = ', '.join(f'{t} [{i.msgtype}]' for t, i in sorted(reader.topics.items())) or 'no topics'
        raise NoFramesError(f'bag {reader.path} holds no {SCAN_FRAME_TYPE} messages ({listing})')
    for preferred in PREFERRED_FRAME_TOPICS:
        if preferred in frame_topics:
            return preferred
    if len(frame_topics) > 1:
        raise NoFramesError(f'bag {reader.path} has several ScanFrame topics {frame_topics}; choose one')
    return frame_topics[0]


def scan_frames(reader: BagReader, topic: str | None = None) -> Iterator[tuple[int, object]]:
    """(timestamp, ScanFrame as a rosbags dataclass) for every frame of the bag, in order.

    Raises NoFramesError when the bag has no frames at all.
    """
    chosen = frame_topic(reader, topic)
    count = 0
    for message in reader.messages([chosen]):
        count += 1
        yield message.timestamp, reader.deserialize(message)
    if count == 0:
        raise NoFramesError(f'bag {reader.path}: topic {chosen} has no messages')

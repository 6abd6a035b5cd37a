"""Playback timing and option parsing for bag replay (pure: no rclpy).

The replay node asks a ``PlaybackClock`` when each message is due, so the timing
rules (rate factor, unlimited rate, start offset, loops) are tested here with a
fake clock instead of measured against the wall clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
import time

NS_PER_S = 1_000_000_000


def parse_topics(text: str | Iterable[str]) -> list[str]:
    """'/a, /b /c' (or a list) -> ['/a', '/b', '/c']; every name must be absolute."""
    items = text.replace(',', ' ').split() if isinstance(text, str) else [t.strip() for t in text]
    topics = [t for t in items if t]
    relative = [t for t in topics if not t.startswith('/')]
    if relative:
        raise ValueError(f'topic names must be absolute (start with /): {relative}')
    return topics


def parse_remaps(text: str | Iterable[str]) -> dict[str, str]:
    """'/a:=/b, /c:=/d' (or a list of 'from:=to') -> {'/a': '/b', '/c': '/d'}."""
    items = text.replace(',', ' ').split() if isinstance(text, str) else list(text)
    remaps: dict[str, str] = {}
    for item in items:
        source, sep, target = item.partition(':=')
        if not sep or not source or not target:
            raise ValueError(f'remap {item!r} must look like /from:=/to')
        if not source.startswith('/') or not target.startswith('/'):
            raise ValueError(f'remap {item!r}: both topic names must be absolute')
        remaps[source] = target
    return remaps


@dataclass
class PlaybackClock:
    """Maps bag time to the wall time a message is due, at ``rate`` x real time.

    ``rate == 0`` means unlimited: every message is due at once. ``now`` is the
    monotonic clock (injectable for tests); ``restart`` anchors bag time
    ``bag_start_ns`` to the current wall time, which is how loops and start
    offsets begin.
    """

    rate: float
    now: Callable[[], float] = time.monotonic
    _bag_anchor_ns: int = field(default=0, init=False)
    _wall_anchor: float = field(default=0.0, init=False)

    def __post_init__(self):
        if not self.rate >= 0.0:
            raise ValueError(f'rate must be >= 0 (0 = unlimited), got {self.rate}')

    def restart(self, bag_start_ns: int) -> None:
        self._bag_anchor_ns = int(bag_start_ns)
        self._wall_anchor = self.now()

    def due_in(self, timestamp_ns: int) -> float:
        """Seconds from now until the message stamped ``timestamp_ns`` is due (<= 0: due now)."""
        if self.rate == 0.0:
            return 0.0
        due = self._wall_anchor + (timestamp_ns - self._bag_anchor_ns) / NS_PER_S / self.rate
        return due - self.now()

    def bag_time_now(self) -> int:
        """The bag time [ns] that corresponds to now, for /clock between messages."""
        if self.rate == 0.0:
            return self._bag_anchor_ns
        return self._bag_anchor_ns + int((self.now() - self._wall_anchor) * self.rate * NS_PER_S)


def start_time_with_offset(bag_start_ns: int, offset_s: float) -> int:
    if offset_s < 0:
        raise ValueError(f'start offset must be >= 0 s, got {offset_s}')
    return bag_start_ns + int(round(offset_s * NS_PER_S))

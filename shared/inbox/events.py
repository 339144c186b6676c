"""What an inbox entry is, how it travels between nodes and how a device's filter matches it.

Pure data, no I/O: the writer (``shared.inbox.writer``), the REST routes that append and the
relay that delivers (``relay.inbox``) all speak these shapes.

Wake-up envelope on the broker channel ``inbox:{user_id}`` (MessagePack):

* ``[0, [[cursor, event, data_json, target_device, expires_at_ms, created_at_ms], ...]]``
  durable entries just committed, in cursor order (one message per user per commit batch);
* ``[1, frame, exclude_device]`` an ephemeral frame (``device.online``, ``typing``...) for the
  user's sockets, never stored.

The envelope carries the entries themselves, so a node delivers live events without reading
the store; the store stays the truth for catch-up, re-sends and anything a lost wake-up missed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

# realtime.md "Durable event names".
DURABLE_EVENTS: frozenset[str] = frozenset(
    {
        "message.new",
        "message.recalled",
        "message.read",
        "conversation.updated",
        "contact.request",
        "contact.accepted",
        "group.updated",
        "group.member_added",
        "group.member_removed",
        "group.dismissed",
        "task.created",
        "task.assigned",
        "task.updated",
        "task.completed",
        "task.failed",
        "task.cancelled",
        "notification.new",
        "publish",
        "config.updated",
        "config.restore",
    }
)

WAKE_ENTRIES = 0
WAKE_EPHEMERAL = 1
MAX_FILTER_PATTERNS = 64
_PATTERN = re.compile(r"^(\*|[a-z_]+(\.[a-z_]+)?|[a-z_]+\.\*)$")


def inbox_channel(user_id: str) -> str:
    return f"inbox:{user_id}"


@dataclass(slots=True)
class Entry:
    """One committed inbox entry. ``data`` is JSON text (sent to JSON clients verbatim)."""

    cursor: int
    event: str
    data: str
    target_device: str | None = None
    expires_at: int | None = None
    created_at: int = 0
    # The encoded ``event`` frame per wire format (binary?), filled by the delivering side so
    # that every socket an entry goes to gets the same bytes, encoded once.
    wire: dict[bool, bytes] | None = field(default=None, repr=False, compare=False)

    def as_row(self) -> list[Any]:
        return [
            self.cursor,
            self.event,
            self.data,
            self.target_device,
            self.expires_at,
            self.created_at,
        ]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Entry:
        cursor, event, data, target, expires, created = row
        return cls(int(cursor), str(event), str(data), target, expires, int(created))

    def frame(self) -> dict[str, Any]:
        """The ``event`` frame (realtime.md): ``{type, event, cursor, data}``."""
        return {
            "type": "event",
            "event": self.event,
            "cursor": self.cursor,
            "data": json.loads(self.data),
        }


def pack_entries(entries: Iterable[Entry]) -> bytes:
    return msgpack.packb([WAKE_ENTRIES, [e.as_row() for e in entries]])  # type: ignore[no-any-return]


def pack_ephemeral(frame: dict[str, Any], exclude_device: str | None = None) -> bytes:
    return msgpack.packb([WAKE_EPHEMERAL, frame, exclude_device], use_bin_type=True)  # type: ignore[no-any-return]


def unpack_wake(data: bytes) -> tuple[int, Any, Any]:
    """``(kind, entries | frame, exclude_device)``; raises ValueError on anything malformed."""
    try:
        value = msgpack.unpackb(data, raw=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ValueError("malformed inbox wake-up") from exc
    if not isinstance(value, list) or not value:
        raise ValueError("malformed inbox wake-up")
    if value[0] == WAKE_ENTRIES and len(value) == 2:
        return WAKE_ENTRIES, [Entry.from_row(r) for r in value[1]], None
    if value[0] == WAKE_EPHEMERAL and len(value) == 3 and isinstance(value[1], dict):
        return WAKE_EPHEMERAL, value[1], value[2]
    raise ValueError("malformed inbox wake-up")


class EventFilter:
    """A device's ``filter``: exact names, ``prefix.*`` or ``*`` (realtime.md "filter")."""

    __slots__ = ("patterns", "_exact", "_prefixes", "_all")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)
        self._all = "*" in patterns
        self._exact = frozenset(p for p in patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))

    @classmethod
    def parse(cls, value: Any) -> EventFilter:
        """From a client's ``events`` list; ValueError says what is wrong."""
        if not isinstance(value, list) or not value:
            raise ValueError("'events' must be a non-empty list of event names or patterns")
        if len(value) > MAX_FILTER_PATTERNS:
            raise ValueError(f"'events' holds at most {MAX_FILTER_PATTERNS} patterns")
        for item in value:
            if not isinstance(item, str) or not _PATTERN.match(item):
                raise ValueError("each pattern is an event name, 'prefix.*' or '*'")
        return cls(list(dict.fromkeys(value)))

    def matches(self, event: str) -> bool:
        return self._all or event in self._exact or event.startswith(self._prefixes)

    def to_json(self) -> str:
        return json.dumps(self.patterns)


__all__ = [
    "DURABLE_EVENTS",
    "Entry",
    "EventFilter",
    "inbox_channel",
    "pack_entries",
    "pack_ephemeral",
    "unpack_wake",
]

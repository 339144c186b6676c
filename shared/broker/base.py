"""The ``Broker`` protocol (after centrifuge's broker.go).

A node owns one broker. The broker calls one synchronous ``handler(channel, data)`` for every
message on a channel this node subscribed to; the hub then writes it to local sockets. A node
subscribes to a channel when its first local member joins and unsubscribes when the last leaves,
so a node only receives what its own connections need.

Subscriptions are reference counted by the caller (the hub), not by the broker: ``subscribe`` on a
channel already subscribed is a no-op, and one ``unsubscribe`` drops it.

``publish`` delivers to every subscribed node, including the publishing one (the hub does not
short-circuit local delivery, so ordering is the broker's order for everyone).

``publish_sequenced`` numbers messages with a counter the broker keeps (under its prefix): taking
the next value and publishing happen as ONE atomic step (Redis: one Lua script), so the order of a
channel's messages is their seq order on every node, whichever node published them. The seq
travels inside the published bytes: ``data`` followed by the seq as one MessagePack integer, so a
caller that sends ``data`` as the first items of a MessagePack array (with the header counting the
seq) receives a complete array (the hub does exactly that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

MessageHandler = Callable[[str, bytes], None]


class Broker(Protocol):
    async def start(self, handler: MessageHandler) -> None:
        """Connect and start delivering messages of subscribed channels to ``handler``."""
        ...

    async def publish(self, channel: str, data: bytes) -> None:
        """Send ``data`` to every node subscribed to ``channel``. Raises ``BackendUnavailable``."""
        ...

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """``publish`` each ``(channel, data)``, in order, in as few round trips as the broker
        allows (one pipeline on Redis). Raises ``BackendUnavailable`` (some may be published)."""
        ...

    async def publish_sequenced(self, counter_key: str, channel: str, data: bytes) -> int:
        """Take the next value of ``counter_key`` and publish ``data + msgpack(seq)``; the seq."""
        ...

    async def sequence_head(self, counter_key: str) -> int:
        """The last value ``publish_sequenced`` took from ``counter_key`` (0 if none)."""
        ...

    async def subscribe(self, channel: str) -> None: ...

    async def unsubscribe(self, channel: str) -> None: ...

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` when the broker cannot be reached."""
        ...

    async def close(self) -> None: ...

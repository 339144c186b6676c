"""``MemoryBroker``: the in-process broker of a single worker (the default, no Redis).

Delivery is synchronous: ``publish`` calls the handler before it returns, so messages of one
channel reach the handler in publish order, the same guarantee Redis pub/sub gives per
connection. Only channels this node subscribed to are delivered; a publish to any other channel
is dropped (in one process there is no other node that could want it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgpack

from shared.broker.base import Broker, MessageHandler
from shared.errors import BackendUnavailable

log = logging.getLogger("switchboard.broker")


class MemoryBroker:
    __slots__ = ("_channels", "_closed", "_counters", "_handler")

    def __init__(self) -> None:
        self._channels: set[str] = set()
        self._handler: MessageHandler | None = None
        self._closed = False
        self._counters: dict[str, int] = {}

    async def start(self, handler: MessageHandler) -> None:
        self._handler = handler

    async def publish(self, channel: str, data: bytes) -> None:
        if self._closed:
            raise BackendUnavailable("broker is closed")
        handler = self._handler
        if handler is None or channel not in self._channels:
            return
        try:
            handler(channel, data)
        except Exception:
            # The publisher is not the subscriber: a failing handler is the hub's bug, and must not
            # surface as a publish error (Redis would not report it either).
            log.exception("broker handler failed")

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for channel, data in messages:
            await self.publish(channel, data)

    async def publish_sequenced(self, counter_key: str, channel: str, data: bytes) -> int:
        if self._closed:
            raise BackendUnavailable("broker is closed")
        # No await between the increment and the delivery: one process, so that is atomic.
        seq = self._counters[counter_key] = self._counters.get(counter_key, 0) + 1
        await self.publish(channel, data + msgpack.packb(seq))
        return seq

    async def sequence_head(self, counter_key: str) -> int:
        return self._counters.get(counter_key, 0)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def ping(self) -> None:
        if self._closed:
            raise BackendUnavailable("broker is closed")

    async def close(self) -> None:
        self._closed = True
        self._handler = None
        self._channels.clear()


_: type[Broker] = MemoryBroker

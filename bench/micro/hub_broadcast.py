"""Micro-benchmark of the hub broadcast: frames/s delivered to 1,000 local sockets.

    .venv/bin/python -m bench.micro.hub_broadcast            # uvloop (production)
    .venv/bin/python -m bench.micro.hub_broadcast --asyncio

Three figures per run:

* ``fake``: 1,000 fake transports (write appends to a list): the hub's own cost per broadcast
  (envelope decode, one encode per codec, the member loop, the buffer check);
* ``sockets``: 1,000 real socketpairs on the loop, one broadcast per loop tick;
* ``burst``: the same sockets, BURST broadcasts per tick (a busy Redis reader delivers several
  messages per read).

Each figure twice: ``DirectHub`` writes one frame per ``transport.write`` inside the broadcast
loop; ``+coalesce`` is the real ``Hub``, which queues frames per socket and writes them joined
once per tick (``loop.call_soon``) -- the measurement behind that choice (bench/micro/README.md).

Not a test: it prints figures and gates nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from typing import Any

import uvloop
from websockets.protocol import OPEN

from relay.hub import Hub, encode_frame, pack_envelope
from relay.protocol import JSON, MSGPACK, Message
from shared.broker.memory import MemoryBroker

MEMBERS = 1000
BURST = 16
LIMIT = 1 << 30
MESSAGE: Message = {"type": "crdt_operation", "payload": b"\x17" * 200, "timestamp": 1706860800,
                    "device_id": "device-uuid-123", "relay_timestamp": 1706860801}  # fmt: skip


class _Protocol:
    __slots__ = ("state", "extensions")

    def __init__(self) -> None:
        self.state = OPEN
        self.extensions: list[Any] = []


class _FakeTransport:
    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += 1

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


class Member:
    """What the hub touches on a connection (outbox and flush as in ``WsConnection``)."""

    __slots__ = ("protocol", "transport", "codec", "device_id", "outbox")

    def __init__(self, transport: Any, binary: bool) -> None:
        self.protocol = _Protocol()
        self.transport = transport
        self.codec = MSGPACK if binary else JSON
        self.device_id = None
        self.outbox: list[bytes] = []

    def flush_outbox(self) -> None:
        outbox = self.outbox
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > LIMIT:
            raise AssertionError("no member should be slow here")

    def slow_consumer(self) -> None:
        raise AssertionError("no member should be slow here")


class DirectHub(Hub):
    """The alternative: one transport write per frame, right in the broadcast loop."""

    __slots__ = ()

    def _queue(self, channel: str, members: Any, message: Message, exclude: str | None) -> None:
        frames: dict[bool, bytes] = {}
        for conn in members:
            if conn.protocol.state is not OPEN:
                continue
            binary = conn.codec.binary
            frame = frames.get(binary)
            if frame is None:
                frame = frames[binary] = encode_frame(message, binary=binary)
            transport = conn.transport
            transport.write(frame)
            if transport.get_write_buffer_size() > LIMIT:
                raise AssertionError("no member should be slow here")


class _Sink(asyncio.Protocol):
    """The reading end: counts bytes."""

    received = 0

    def data_received(self, data: bytes) -> None:
        _Sink.received += len(data)


async def _socket_members() -> tuple[list[Member], list[asyncio.BaseTransport]]:
    loop = asyncio.get_running_loop()
    members: list[Member] = []
    transports: list[asyncio.BaseTransport] = []
    for i in range(MEMBERS):
        a, b = socket.socketpair()
        wt, _ = await loop.create_connection(asyncio.Protocol, sock=a)
        rt, _ = await loop.create_connection(_Sink, sock=b)
        wt.set_write_buffer_limits(high=LIMIT)  # type: ignore[attr-defined]
        members.append(Member(wt, binary=i % 2 == 1))
        transports += [wt, rt]
    return members, transports


async def _subscribe_all(hub: Hub, members: list[Member]) -> None:
    for member in members:
        await hub.subscribe(member, "c")  # type: ignore[arg-type]


def _rate(frames: int, seconds: float) -> str:
    return f"{frames / seconds:>12,.0f} frames/s  ({seconds / (frames / MEMBERS) * 1e6:,.1f} us per broadcast)"


async def bench_fake(rounds: int, burst: int, coalesce: bool) -> None:
    hub = Hub(MemoryBroker(), outbound_limit=LIMIT) if coalesce else DirectHub(MemoryBroker())
    members = [Member(_FakeTransport(), binary=i % 2 == 1) for i in range(MEMBERS)]
    await _subscribe_all(hub, members)
    data = pack_envelope(MESSAGE, None, sequenced=False)
    start = time.perf_counter()
    for _ in range(rounds):
        for _ in range(burst):
            hub.on_broker_message("c", data)
        await asyncio.sleep(0)  # one tick: the coalescing hub writes here
    elapsed = time.perf_counter() - start
    label = ("fake" if burst == 1 else "fake-burst") + ("+coalesce" if coalesce else "")
    frames = rounds * burst * MEMBERS
    print(f"{label:<17} {MEMBERS} members, {burst}/tick x {rounds}: {_rate(frames, elapsed)}")


async def bench_sockets(rounds: int, burst: int, coalesce: bool) -> None:
    members, transports = await _socket_members()
    hub: Hub = Hub(MemoryBroker(), outbound_limit=LIMIT) if coalesce else DirectHub(MemoryBroker())
    await _subscribe_all(hub, members)
    data = pack_envelope(MESSAGE, None, sequenced=False)
    _Sink.received = 0
    start = time.perf_counter()
    for _ in range(rounds):
        for _ in range(burst):
            hub.on_broker_message("c", data)
        await asyncio.sleep(0)  # one loop tick: coalesced writes flush, readers read
    while any(m.transport.get_write_buffer_size() for m in members):
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    frames = rounds * burst * MEMBERS
    label = ("sockets" if burst == 1 else "burst") + ("+coalesce" if coalesce else "")
    print(f"{label:<17} {MEMBERS} members, {burst}/tick x {rounds}: {_rate(frames, elapsed)}")
    for transport in transports:
        transport.close()
    await asyncio.sleep(0.05)


async def main(rounds: int) -> None:
    await bench_fake(rounds, 1, coalesce=False)
    await bench_fake(rounds, 1, coalesce=True)
    await bench_fake(rounds // BURST or 1, BURST, coalesce=False)
    await bench_fake(rounds // BURST or 1, BURST, coalesce=True)
    await bench_sockets(rounds, 1, coalesce=False)
    await bench_sockets(rounds, 1, coalesce=True)
    await bench_sockets(rounds // BURST or 1, BURST, coalesce=False)
    await bench_sockets(rounds // BURST or 1, BURST, coalesce=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio instead of uvloop")
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    print(f"loop: {'asyncio' if args.asyncio else 'uvloop'}")
    if args.asyncio:
        asyncio.run(main(args.rounds))
    else:
        uvloop.run(main(args.rounds))

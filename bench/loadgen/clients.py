"""Client protocols: counting subscribers, sampled subscribers, publishers.

All three do the handshake by hand (see wsproto). A counting subscriber then only
adds the byte count of each read to a shared counter; it reads into one buffer
shared by every counting socket of the process (reads are synchronous, nothing
is kept) and sets SO_RCVLOWAT so the kernel wakes it once per `rcvlowat` bytes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from array import array
from collections.abc import Callable
from typing import Any

from .adapters import Adapter
from .wsproto import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    check_handshake,
    client_frame,
    parse_frames,
)

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the source port at connect(), per destination
_SHARED_READ_BUFFER = memoryview(bytearray(1 << 18))


class _Handshaking:
    """Collects the HTTP response; `ready` resolves when the 101 is checked."""

    def __init__(self, request: bytes, init: bytes) -> None:
        self.request = request
        self.init = init
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: Any = None
        self.open = False
        self.lost = False
        self._head = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def _handshake(self, data: bytes | memoryview) -> bytes | None:
        """Feed response bytes; once the 101 is complete return what followed it."""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return None
        try:
            check_handshake(bytes(self._head[:end]))
        except Exception as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            self.transport.close()
            return None
        rest = bytes(self._head[end + 4 :])
        self._head = bytearray()
        self.open = True
        if self.init:
            self.transport.write(self.init)
        self.on_open()
        if not self.ready.done():
            self.ready.set_result(None)
        return rest

    def on_open(self) -> None:
        """Hook run after the 101."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed during handshake"))


class CountingSub(_Handshaking, asyncio.BufferedProtocol):
    """Never parses: counts bytes into `counters[slot]`."""

    def __init__(
        self, request: bytes, init: bytes, counters: Any, slot: int, rcvlowat: int
    ) -> None:
        super().__init__(request, init)
        self.counters = counters
        self.slot = slot
        self.rcvlowat = rcvlowat

    def on_open(self) -> None:
        if self.rcvlowat > 1:
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.rcvlowat)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SHARED_READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        if self.open:
            self.counters[self.slot] += nbytes
            return
        rest = self._handshake(_SHARED_READ_BUFFER[:nbytes])
        if rest:
            self.counters[self.slot] += len(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.counters[self.slot + 1] += 1  # the slot after the byte count counts lost sockets
        super().connection_lost(exc)


class Samples:
    """Latencies (ns) of every stamped message the sampled sockets saw, in arrival order."""

    def __init__(self) -> None:
        self.latency_ns = array("q")
        self.messages = 0
        self.frame_bytes = 0  # bytes of frames that carried stamps (to check delivery_size)
        self.lost = 0
        self.on_progress: Callable[[], None] | None = None


class SampledSub(_Handshaking, asyncio.Protocol):
    """Parses frames, extracts each stamp, records publish->receive latency."""

    def __init__(
        self, request: bytes, init: bytes, adapter: Adapter, channel: int, samples: Samples
    ) -> None:
        super().__init__(request, init)
        self.adapter = adapter
        self.channel = channel
        self.samples = samples
        self.last_seq = 0
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        if not self.open:
            rest = self._handshake(data)
            if not rest:
                return
            data = rest
        self._buf += data
        now = time.perf_counter_ns()
        s = self.samples
        for opcode, payload in parse_frames(self._buf):
            if opcode in (OP_TEXT, OP_BINARY):
                stamps = self.adapter.extract(payload)
                if stamps:
                    s.frame_bytes += len(payload) + (2 if len(payload) < 126 else 4)
                    for seq, ts in stamps:
                        if ts:  # ts 0: a readiness probe
                            s.latency_ns.append(now - ts)
                        if seq > self.last_seq:
                            self.last_seq = seq
                    s.messages += len(stamps)
            elif opcode == OP_PING:
                self.transport.write(client_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.transport.close()
        if s.on_progress is not None:
            s.on_progress()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.samples.lost += 1
        super().connection_lost(exc)


class Publisher(_Handshaking, asyncio.Protocol):
    """Writes frames; discards what the server sends back; tracks write backpressure."""

    def __init__(self, request: bytes, init: bytes) -> None:
        super().__init__(request, init)
        self.paused = False
        self.received = 0

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self._handshake(data)
        self.received += len(data)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


async def open_socket(
    factory: Callable[[], _Handshaking], host: str, port: int, src: str, timeout: float = 10.0
) -> _Handshaking:
    """Connect from source address `src`, do the handshake, return the open protocol."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((src, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        _, proto = await loop.create_connection(factory, sock=sock)  # type: ignore[type-var]
    except BaseException:
        sock.close()
        raise
    try:
        await asyncio.wait_for(asyncio.shield(proto.ready), timeout)
    except BaseException:
        if proto.transport is not None:
            proto.transport.close()
        raise
    return proto

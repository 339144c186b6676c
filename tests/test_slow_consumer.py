"""realtime.md guarantee 3: a slow reader never slows others.

One raw socket joins a channel and then stops reading (small SO_RCVBUF, and the server's send buffer
for it kept small, so the kernel does not absorb the backlog). 99 websockets clients on the same
channel keep reading. The publisher keeps at most a small window ahead of the fast readers (they are
fast, by construction; the slow one is never waited for). The slow one must be closed with 4008, and
the fast ones must get every message, in order, and stay open.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from websockets.protocol import OPEN

from tests.conftest import wait_for
from tests.test_hub import join, start_node
from tests.test_ws_handshake import read_hello

TIMEOUT = 10.0
FAST = 99
PAYLOAD = "x" * 1024
WINDOW = 8  # how far the publisher may run ahead of the slowest FAST reader


def client_frame(payload: bytes) -> bytes:
    """One masked client text frame (payload < 126 bytes)."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + key + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
    n = second & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await asyncio.wait_for(reader.readexactly(n), TIMEOUT)


async def slow_socket(port: int, channel: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw WebSocket client with a tiny receive buffer, joined to ``channel``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: caps the window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token=user&device_id=slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    await read_hello(reader)
    writer.write(client_frame(json.dumps({"type": "test.join", "channel": channel}).encode()))
    assert json.loads((await read_frame(reader))[1]) == {"type": "joined", "channel": channel}
    return reader, writer


async def test_a_slow_reader_is_closed_4008_and_the_fast_ones_get_everything(
    server_factory: Any, make_settings: Callable[..., Any]
) -> None:
    server = await start_node(server_factory, make_settings, ws_outbound_limit_bytes=64 * 1024)
    hub = server.state.hub
    slow_reader, slow_writer = await slow_socket(server.port, "room")
    (slow_conn,) = [c for c in server.state.registry if c.device_id == "slow"]
    # Keep the kernel from absorbing megabytes on loopback: the backlog must reach our buffer.
    slow_conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    fast = [await join(server, "room", f"fast{i}", binary=i % 2 == 1) for i in range(FAST)]
    received: list[list[int]] = [[] for _ in fast]

    async def read(i: int) -> None:
        while True:
            message = await fast[i].recv()
            received[i].append(message["n"])

    readers = [asyncio.ensure_future(read(i)) for i in range(FAST)]
    sent = 0
    try:

        async def publish_one() -> None:
            nonlocal sent
            await wait_for(lambda: min(len(r) for r in received) >= sent - WINDOW, TIMEOUT)
            await hub.publish("room", {"type": "op", "n": sent, "data": PAYLOAD})
            sent += 1

        while slow_conn.protocol.state is OPEN:
            assert sent < 20_000, "the slow reader was never closed"
            await publish_one()
        for _ in range(50):  # and the fast ones keep going after it is gone
            await publish_one()
        await wait_for(lambda: all(len(r) == sent for r in received), TIMEOUT)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    assert all(r == list(range(sent)) for r in received)  # every message, in order
    assert all(client.ws.state is OPEN for client in fast)

    # The slow reader, reading again, finds what was buffered and then the 4008 close frame.
    code = None
    while code is None:
        opcode, payload = await read_frame(slow_reader)
        if opcode == 0x8:
            code = int.from_bytes(payload[:2], "big")
    assert code == 4008
    slow_writer.close()
    await wait_for(lambda: slow_conn not in server.state.hub.local_members("room"))
    for client in fast:
        await client.ws.close()

"""Pacing a replay by the socket's write buffer (inbox and book catch-up)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.connection import WsConnection

PACING_WAIT_S = 0.005


async def paced(conn: WsConnection, limit: int) -> None:
    """Wait until ``conn``'s write buffer is at most ``limit`` bytes (or the socket closed).

    A replay writes a page, then waits here before reading the next: a reader slower than the
    store gets its history at its own pace instead of being closed as a slow consumer (4008).
    """
    transport = conn.transport
    while conn.open and transport.get_write_buffer_size() > limit:
        await asyncio.sleep(PACING_WAIT_S)

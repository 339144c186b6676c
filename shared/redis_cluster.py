"""What every user of redis-py's async ``RedisCluster`` client here must do (broker, limiter)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def run_on_cluster(
    client: Any,
    gate: asyncio.Semaphore,
    command: Callable[..., Awaitable[Any]],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Run ``command`` on a ``RedisCluster``: initialized first, at most ``gate``'s count in flight.

    redis-py's async cluster client must be initialized before any command: sent before, a command
    goes to a random node, and the MOVEDs of a concurrent burst make it close every connection,
    in-flight commands' included (redis-py issues 3032 and 4322). And it has no blocking pool:
    more commands in flight than connections raise MaxConnectionsError, so the gate makes a burst
    wait instead (each holder is bounded by its own connect and command timeouts).
    """
    async with gate:
        _ = await client.initialize()  # a no-op once initialized
        return await command(*args, **kwargs)

"""What every user of redis-py's async clients here must do (broker, limiter, pairing codes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


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


def command_client(
    url: str, *, cluster: bool, pool_size: int, connect_timeout_s: float, command_timeout_s: float
) -> tuple[Any, asyncio.Semaphore | None]:
    """A client for short commands (no pub/sub), and the gate ``run_on_cluster`` needs (None on
    a standalone Redis, whose blocking pool makes a burst wait by itself).

    One retry on a fresh connection (the pooled one died with a Redis restart); something in front
    of requests must not stall on a Redis that is really down.
    """
    options: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": command_timeout_s,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 1),
    }
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        client = RedisCluster.from_url(url, max_connections=pool_size, **options)
        return client, asyncio.Semaphore(pool_size)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=command_timeout_s, **options
    )
    return Redis.from_pool(pool), None

"""``RedisRateLimiter``: GCRA shared by every worker and node, one Lua script per decision.

The script reads the TAT, decides and writes it back atomically (concurrent hits cannot both see
the old value), and takes "now" from Redis ``TIME``, so nodes with skewed clocks still share one
budget. The key expires when its bucket is full again, so idle keys vanish by themselves. The
arithmetic is ``shared.ratelimit.memory.gcra`` line for line; see that module for the algorithm
and for why the TAT is stored as two numbers.

The script runs with EVALSHA; redis-py's ``AsyncScript`` loads it again when Redis answers
NOSCRIPT (after a restart or ``SCRIPT FLUSH``). Every redis-py error becomes ``BackendUnavailable``.

On a Redis Cluster (``cluster=True``, setting ``REDIS_CLUSTER``) the same script runs through
redis-py's ``RedisCluster``: it touches exactly one key, ``<prefix>rl:<key>``, so it runs on the
master owning that key's slot (``TIME`` is that master's clock: one key, one clock). A key with a
hash tag (``{...}``) lands in the tag's slot, as Redis defines it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from shared.errors import BackendUnavailable
from shared.ratelimit.base import Decision, Limit, RateLimiter
from shared.ratelimit.memory import EPSILON, decision
from shared.redis_cluster import command_client, run_on_cluster

CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 5.0
# Connections per process (per cluster node). A burst larger than this waits for a free
# connection (up to COMMAND_TIMEOUT_S on a standalone Redis) instead of failing: redis-py's
# default pool raises "Too many connections", RedisCluster raises MaxConnectionsError.
POOL_SIZE = 64
# RedisCluster raises RedisClusterException (not a RedisError) when no node can be reached.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)

# KEYS[1] bucket, stored as "<stamp us> <ahead us>" (see shared.ratelimit.memory for why two
# numbers); ARGV: interval_us, capacity, cost, commit ("1" hit, "0" peek), epsilon.
# Returns {allowed 0|1, full_us (ceil), remaining, retry_us (ceil)}: integers, because Redis
# truncates Lua numbers to integers on the way out.
GCRA_LUA = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local eps = tonumber(ARGV[5])
local tau = interval * capacity
local ahead = 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local stamp, was_ahead = string.match(stored, '^(%S+) (%S+)$')
  ahead = tonumber(was_ahead) - (now - tonumber(stamp))
  if ahead < 0 then ahead = 0 end
end
local pushed = ahead + interval * cost
local allowed = pushed <= tau + interval * eps
if allowed and ARGV[4] == '1' then
  ahead = pushed
  redis.call('SET', KEYS[1], string.format('%.17g %.17g', now, ahead),
             'PX', math.ceil(ahead / 1000))
end
local retry = 0
if not allowed then retry = pushed - tau end
local remaining = math.floor((tau - ahead) / interval + eps)
if remaining < 0 then remaining = 0 end
if remaining > capacity then remaining = capacity end
return {allowed and 1 or 0, math.ceil(now + ahead), remaining, math.ceil(retry)}
"""


class RedisRateLimiter:
    def __init__(self, url: str, *, prefix: str = "sb:", cluster: bool = False) -> None:
        self._prefix = prefix + "rl:"
        self._client, self._gate = command_client(
            url,
            cluster=cluster,
            pool_size=POOL_SIZE,
            connect_timeout_s=CONNECT_TIMEOUT_S,
            command_timeout_s=COMMAND_TIMEOUT_S,
        )
        self._script = self._client.register_script(GCRA_LUA)
        self._eps = repr(EPSILON)

    async def _on_cluster(
        self, command: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        assert self._gate is not None
        return await run_on_cluster(self._client, self._gate, command, *args, **kwargs)

    def _key(self, key: str) -> str:
        """``<prefix>rl:<kind>:<sha256 of the key>``: limiter keys name devices, books, emails
        and IPs; Redis sees only their kind and a digest (the zero-knowledge test scans it)."""
        kind = key.partition(":")[0]
        return f"{self._prefix}{kind}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    async def _run(self, key: str, limit: Limit, cost: int, commit: bool) -> Decision:
        if cost < 1:
            raise ValueError("cost must be >= 1")
        interval = limit.period_s * 1e6 / limit.count
        args = (repr(interval), limit.capacity, cost, "1" if commit else "0", self._eps)
        keys = [self._key(key)]
        try:
            if self._gate is None:
                reply: Any = await self._script(keys=keys, args=args)
            else:
                reply = await self._on_cluster(self._script, keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"redis rate limit failed: {exc.__class__.__name__}") from exc
        allowed, full_us, remaining, retry_us = reply
        return decision(limit, allowed == 1, full_us, remaining, retry_us)

    async def hit(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        return await self._run(key, limit, cost, True)

    async def peek(self, key: str, limit: Limit) -> Decision:
        return await self._run(key, limit, 1, False)

    async def reset(self, key: str) -> None:
        try:
            if self._gate is None:
                await self._client.delete(self._key(key))
            else:
                await self._on_cluster(self._client.delete, self._key(key))
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(
                f"redis rate limit reset failed: {exc.__class__.__name__}"
            ) from exc

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except REDIS_ERRORS:
            pass  # closing a client whose server is gone: nothing left to release


_: type[RateLimiter] = RedisRateLimiter

"""``RedisRateLimiter``: GCRA shared by every worker and node, one Lua script per decision.

The script reads the TAT, decides and writes it back atomically (concurrent hits cannot both see
the old value), and takes "now" from Redis ``TIME``, so nodes with skewed clocks still share one
budget. The key expires when its bucket is full again, so idle keys vanish by themselves. The
arithmetic is ``shared.ratelimit.memory.gcra`` line for line; see that module for the algorithm.

The script runs with EVALSHA; redis-py's ``AsyncScript`` loads it again when Redis answers
NOSCRIPT (after a restart or ``SCRIPT FLUSH``). Every redis-py error becomes ``BackendUnavailable``.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from shared.errors import BackendUnavailable
from shared.ratelimit.base import Decision, Limit, RateLimiter
from shared.ratelimit.memory import EPSILON, decision

CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 5.0

# KEYS[1] bucket; ARGV: interval_us, capacity, cost, commit ("1" hit, "0" peek).
# Returns {allowed 0|1, tat_us (ceil), remaining, retry_us (ceil)}: integers, because Redis
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
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local pushed = tat + interval * cost
local allowed = pushed - now <= tau + interval * eps
if allowed and ARGV[4] == '1' then
  tat = pushed
  redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.ceil((tat - now) / 1000))
end
local retry = 0
if not allowed then retry = pushed - tau - now end
local remaining = math.floor((now + tau - tat) / interval + eps)
if remaining < 0 then remaining = 0 end
if remaining > capacity then remaining = capacity end
return {allowed and 1 or 0, math.ceil(tat), remaining, math.ceil(retry)}
"""


class RedisRateLimiter:
    def __init__(self, url: str, *, prefix: str = "sb:") -> None:
        self._prefix = prefix + "rl:"
        self._client: Redis = Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            socket_keepalive=True,
            # One retry on a fresh connection (the pooled one died with a Redis restart); a
            # limiter in front of every request must not stall on a Redis that is really down.
            retry=Retry(NoBackoff(), 1),
        )
        self._script = self._client.register_script(GCRA_LUA)
        self._eps = repr(EPSILON)

    async def _run(self, key: str, limit: Limit, cost: int, commit: bool) -> Decision:
        if cost < 1:
            raise ValueError("cost must be >= 1")
        interval = limit.period_s * 1e6 / limit.count
        args = (repr(interval), limit.capacity, cost, "1" if commit else "0", self._eps)
        try:
            reply: Any = await self._script(keys=[self._prefix + key], args=args)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis rate limit failed: {exc.__class__.__name__}") from exc
        allowed, tat_us, remaining, retry_us = reply
        return decision(limit, allowed == 1, tat_us, remaining, retry_us)

    async def hit(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        return await self._run(key, limit, cost, True)

    async def peek(self, key: str, limit: Limit) -> Decision:
        return await self._run(key, limit, 1, False)

    async def reset(self, key: str) -> None:
        try:
            await self._client.delete(self._prefix + key)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(
                f"redis rate limit reset failed: {exc.__class__.__name__}"
            ) from exc

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass  # closing a client whose server is gone: nothing left to release


_: type[RateLimiter] = RedisRateLimiter

"""``MemoryRateLimiter``: GCRA in one process, and the arithmetic both limiters share.

GCRA keeps one number per key, the theoretical arrival time (TAT): the instant at which the
bucket would be completely full again. Every event pushes it ``T = period / count`` later; an
event fits when the pushed TAT is at most ``tau = T * capacity`` ahead of now. A key whose TAT is in
the past holds nothing, so it can be forgotten: that is how memory stays bounded here (a sweep
drops those keys) and why Redis keys get a TTL ending at the TAT.

The Redis script (``shared.ratelimit.redis``) is the same arithmetic in Lua; ``gcra`` here is the
reference, and both return microseconds that ``decision`` turns into the contract's whole seconds.
"""

from __future__ import annotations

import math
import time

from shared.ratelimit.base import Decision, Limit, RateLimiter

# Float slack, in units of one emission interval: 2/3 of a period for count=3 must not round to
# "not quite one event".
EPSILON = 1e-9


def gcra(
    tat: float, now: float, limit: Limit, cost: int, commit: bool
) -> tuple[bool, float, int, float]:
    """One GCRA step in microseconds: ``(allowed, new_tat, remaining, retry_us)``.

    ``tat`` is the stored TAT (any value <= now for an empty bucket); ``commit`` False is a peek
    that asks whether ``cost`` more events would fit.
    """
    if cost < 1:
        raise ValueError("cost must be >= 1")
    interval = limit.period_s * 1e6 / limit.count
    tau = interval * limit.capacity
    tat = max(tat, now)
    pushed = tat + interval * cost
    allowed = pushed - now <= tau + interval * EPSILON
    if allowed and commit:
        tat = pushed
    retry_us = 0.0 if allowed else pushed - tau - now
    remaining = math.floor((now + tau - tat) / interval + EPSILON)
    return allowed, tat, max(0, min(limit.capacity, remaining)), retry_us


def decision(
    limit: Limit, allowed: bool, tat_us: float, remaining: int, retry_us: float
) -> Decision:
    """The contract's view: whole seconds, rounded up (``reset_at`` is when the bucket is full)."""
    return Decision(
        allowed=allowed,
        limit=limit.capacity,
        remaining=remaining,
        reset_at=math.ceil(tat_us / 1e6),
        retry_after=0 if allowed else max(1, math.ceil(retry_us / 1e6)),
    )


class MemoryRateLimiter:
    """GCRA per key in a dict; keys whose bucket is full again are swept every ``sweep_s``."""

    __slots__ = ("_next_sweep", "_sweep_s", "_tats")

    def __init__(self, *, sweep_s: float = 10.0) -> None:
        self._tats: dict[str, float] = {}  # key -> TAT, unix microseconds
        self._sweep_s = sweep_s
        self._next_sweep = 0.0

    def __len__(self) -> int:
        """Keys currently held (full buckets are dropped at the next sweep)."""
        return len(self._tats)

    def _now(self) -> float:
        now = time.time()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_s
            now_us = now * 1e6
            for key in [k for k, tat in self._tats.items() if tat <= now_us]:
                del self._tats[key]
        return now * 1e6

    async def hit(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        now = self._now()
        allowed, tat, remaining, retry_us = gcra(self._tats.get(key, now), now, limit, cost, True)
        if allowed:
            self._tats[key] = tat
        return decision(limit, allowed, tat, remaining, retry_us)

    async def peek(self, key: str, limit: Limit) -> Decision:
        now = self._now()
        allowed, tat, remaining, retry_us = gcra(self._tats.get(key, now), now, limit, 1, False)
        return decision(limit, allowed, tat, remaining, retry_us)

    async def reset(self, key: str) -> None:
        self._tats.pop(key, None)

    async def close(self) -> None:
        self._tats.clear()


_: type[RateLimiter] = MemoryRateLimiter

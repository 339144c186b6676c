"""``MemoryRateLimiter``: GCRA in one process, and the arithmetic both limiters share.

GCRA keeps one instant per key, the theoretical arrival time (TAT): when the bucket would be
completely full again. Every event pushes it ``interval = period / count`` later; an event fits
when the pushed TAT is at most ``tau = interval * capacity`` ahead of now. A key whose TAT is in
the past holds nothing, so it can be forgotten: that is how memory stays bounded here (a sweep
drops those keys) and why Redis keys get a TTL ending at the TAT.

The TAT is stored as ``(stamp, ahead)``: an integer unix microsecond (exact) and how far the TAT
was ahead of it (a small double). Stored as one absolute double instead, it would be rounded to
0.25 us on every write (a double's resolution near 1.8e15), and those errors pile up until a full
bucket admits one event more or one fewer than its capacity.

The Redis script (``shared.ratelimit.redis``) is this arithmetic in Lua; ``gcra`` is the
reference, and both give microseconds that ``decision`` turns into the contract's whole seconds.
"""

from __future__ import annotations

import math
import time

from shared.ratelimit.base import Decision, Limit, RateLimiter

# Float slack in units of one interval: 3 events of 1/3 s each must fill exactly one second.
EPSILON = 1e-9


def gcra(
    stamp: int, ahead: float, now: int, limit: Limit, cost: int, commit: bool
) -> tuple[bool, float, int, float]:
    """One GCRA step: ``(allowed, ahead_of_now, remaining, retry_us)``, times in microseconds.

    ``(stamp, ahead)`` is the stored TAT (``(now, 0.0)`` for an empty bucket); ``commit`` False
    is a peek that asks whether ``cost`` more events would fit and changes nothing.
    """
    if cost < 1:
        raise ValueError("cost must be >= 1")
    interval = limit.period_s * 1e6 / limit.count
    tau = interval * limit.capacity
    ahead = max(ahead - (now - stamp), 0.0)
    pushed = ahead + interval * cost
    allowed = pushed <= tau + interval * EPSILON
    if allowed and commit:
        ahead = pushed
    retry_us = 0.0 if allowed else pushed - tau
    remaining = math.floor((tau - ahead) / interval + EPSILON)
    return allowed, ahead, max(0, min(limit.capacity, remaining)), retry_us


def decision(
    limit: Limit, allowed: bool, full_us: float, remaining: int, retry_us: float
) -> Decision:
    """The contract's view: whole seconds, rounded up; ``full_us`` is the TAT (unix us)."""
    return Decision(
        allowed=allowed,
        limit=limit.capacity,
        remaining=remaining,
        reset_at=math.ceil(full_us / 1e6),
        retry_after=0 if allowed else max(1, math.ceil(retry_us / 1e6)),
    )


class MemoryRateLimiter:
    """GCRA per key in a dict; keys whose bucket is full again are swept every ``sweep_s``."""

    __slots__ = ("_next_sweep", "_sweep_us", "_tats")

    def __init__(self, *, sweep_s: float = 10.0) -> None:
        self._tats: dict[str, tuple[int, float]] = {}  # key -> (stamp us, ahead us)
        self._sweep_us = int(sweep_s * 1e6)
        self._next_sweep = 0

    def __len__(self) -> int:
        """Keys currently held (full buckets are dropped at the next sweep)."""
        return len(self._tats)

    def _now(self) -> int:
        now = time.time_ns() // 1000
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_us
            full = [k for k, (stamp, ahead) in self._tats.items() if stamp + ahead <= now]
            for key in full:
                del self._tats[key]
        return now

    async def hit(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        now = self._now()
        stamp, ahead = self._tats.get(key, (now, 0.0))
        allowed, ahead, remaining, retry_us = gcra(stamp, ahead, now, limit, cost, True)
        if allowed:
            self._tats[key] = (now, ahead)
        return decision(limit, allowed, now + ahead, remaining, retry_us)

    async def peek(self, key: str, limit: Limit) -> Decision:
        now = self._now()
        stamp, ahead = self._tats.get(key, (now, 0.0))
        allowed, ahead, remaining, retry_us = gcra(stamp, ahead, now, limit, 1, False)
        return decision(limit, allowed, now + ahead, remaining, retry_us)

    async def reset(self, key: str) -> None:
        self._tats.pop(key, None)

    async def close(self) -> None:
        self._tats.clear()


_: type[RateLimiter] = MemoryRateLimiter

"""The ``RateLimiter`` protocol: GCRA (generic cell rate algorithm) over named keys.

A ``Limit`` allows ``count`` events per ``period_s``, with bursts up to ``burst`` (default
``count``): the same answer as a sliding window without storing one entry per event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.config import RateSpec
from shared.errors import RateLimited


@dataclass(frozen=True, slots=True)
class Limit:
    count: int
    period_s: float
    burst: int | None = None

    @classmethod
    def of(cls, spec: RateSpec, burst: int | None = None) -> Limit:
        return cls(spec.count, spec.period_s, burst)

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else self.count


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_at: int  # unix seconds when the bucket is full again (X-RateLimit-Reset)
    retry_after: int  # seconds until the next event would be allowed (0 when allowed)

    def raise_if_denied(self, message: str = "") -> None:
        if not self.allowed:
            raise RateLimited(self.limit, self.remaining, self.reset_at, self.retry_after, message)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_at),
        }


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: Limit, cost: int = 1) -> Decision:
        """Count ``cost`` events against ``key`` if they fit; the decision says whether they did."""
        ...

    async def peek(self, key: str, limit: Limit) -> Decision:
        """Would one more event be allowed? Counts nothing."""
        ...

    async def reset(self, key: str) -> None: ...

    async def close(self) -> None: ...

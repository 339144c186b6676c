"""Rate limiting: ``MemoryRateLimiter`` (one process) and ``RedisRateLimiter`` (atomic Lua GCRA)."""

from shared.ratelimit.base import Decision, Limit, RateLimiter

__all__ = ["Decision", "Limit", "RateLimiter"]

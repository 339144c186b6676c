"""The ``Presence`` protocol: which devices of a user are online, shared by every node.

realtime.md guarantee 5. A device is **online** while it has a ``/ws`` socket open on some node, or
sent a heartbeat within ``PRESENCE_TIMEOUT_S``, or closed its last socket less than
``PRESENCE_GRACE_S`` ago (a reconnect within the grace is silent: no offline, no second online).
Each change of that state is reported once, cluster-wide, as a ``Transition`` to the handlers of
the node that noticed it (the relay turns them into ``device.online`` / ``device.offline``).

Device keys: a socket's ``device_id``, or ``session_key(connection_id)`` for a socket without one.
A session's key is never reused (a new connection is a new session), so closing it has no grace.

Two implementations, picked by ``shared.presence.make_presence``: ``MemoryPresence`` (one process,
the default) and ``RedisPresence`` (``REDIS_URL``; every node and worker shares the state).

Timing is driven from outside, so both implementations do no I/O of their own in the background:
the relay calls ``refresh()`` every ``refresh_interval`` (keeps this node's shared entries alive;
a node that stops calling it, or dies, has its devices expire after ``PRESENCE_TTL_S``) and
``sweep()`` every ``sweep_interval`` (reports what expired: graces, heartbeat timeouts, dead nodes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shared.config import ConfigError, Settings

SESSION_PREFIX = "~"


def session_key(connection_id: str) -> str:
    """The device key of a socket without ``device_id`` (``[A-Za-z0-9_-]`` ids never start so)."""
    return SESSION_PREFIX + connection_id


def is_session(device_key: str) -> bool:
    return device_key.startswith(SESSION_PREFIX)


@dataclass(frozen=True, slots=True)
class Transition:
    user_id: str
    device_key: str
    online: bool


TransitionHandler = Callable[[Transition], None]


@dataclass(frozen=True, slots=True)
class Timing:
    """The presence durations in milliseconds, checked once."""

    timeout_ms: int
    grace_ms: int
    ttl_ms: int

    @classmethod
    def of(cls, settings: Settings) -> Timing:
        for name in ("presence_timeout_s", "presence_grace_s", "presence_ttl_s"):
            if getattr(settings, name) <= 0:
                raise ConfigError(f"{name.upper()} must be > 0")
        return cls(
            timeout_ms=round(settings.presence_timeout_s * 1000),
            grace_ms=round(settings.presence_grace_s * 1000),
            ttl_ms=round(settings.presence_ttl_s * 1000),
        )

    @property
    def refresh_interval(self) -> float:
        """Seconds between refreshes: a third of the TTL, so one late refresh loses nothing."""
        return self.ttl_ms / 3000

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: small against the shortest deadline, at most 1 s (an offline
        fires at most this late), at least 20 ms (an idle sweep is one Redis round trip)."""
        shortest = min(self.timeout_ms, self.grace_ms, self.ttl_ms) / 1000
        return max(0.02, min(1.0, shortest / 5))


class Presence(Protocol):
    def add_handler(self, handler: TransitionHandler) -> None:
        """Call ``handler`` (synchronously, on this node) for every transition this node notices."""
        ...

    async def socket_opened(self, user_id: str, device_key: str) -> None:
        """A socket of ``device_key`` opened on this node (counted: several sockets are fine)."""
        ...

    async def socket_closed(self, user_id: str, device_key: str) -> None:
        """One of its sockets on this node closed; the last one everywhere starts the grace."""
        ...

    async def heartbeat(self, user_id: str, device_id: str) -> None:
        """The device is online for ``PRESENCE_TIMEOUT_S`` from now (socket or not)."""
        ...

    async def online_devices(self, user_id: str) -> list[str]:
        """Device keys with a socket open on any node, sorted (rest.md ``online_devices``)."""
        ...

    async def online(self, user_id: str) -> list[str]:
        """Device keys online in the sense above (sockets, heartbeats, graces), sorted."""
        ...

    async def refresh(self) -> None:
        """Keep this node's shared entries alive (every ``Timing.refresh_interval``)."""
        ...

    async def sweep(self) -> None:
        """Report transitions whose deadline passed (every ``Timing.sweep_interval``)."""
        ...

    async def close(self) -> None:
        """Drain: this node's sockets count as closed (graces start), then release resources."""
        ...


__all__ = [
    "SESSION_PREFIX",
    "Presence",
    "Timing",
    "Transition",
    "TransitionHandler",
    "is_session",
    "session_key",
]

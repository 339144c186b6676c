"""Device presence: ``MemoryPresence`` (one process) and ``RedisPresence`` (every node shares it).

``for_services(services)`` is the process's one ``Presence`` (created on first use, closed with
the services), so the relay and the REST routes see the same state; ``online_devices(services,
user_id)`` is what ``POST /publish`` reports. The relay drives it (``relay.presence``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.presence.base import (
    SESSION_PREFIX,
    Presence,
    Timing,
    Transition,
    TransitionHandler,
    is_session,
    session_key,
)
from shared.presence.heartbeats import HeartbeatLog, HeartbeatReport, parse_heartbeat

if TYPE_CHECKING:
    from shared.config import Settings
    from shared.services import Services

PRESENCE_KEY = "shared.presence"
HEARTBEATS_KEY = "shared.presence.heartbeats"


def make_presence(settings: Settings) -> Presence:
    if settings.redis_url:
        from shared.presence.redis import RedisPresence

        return RedisPresence(settings)
    from shared.presence.memory import MemoryPresence

    return MemoryPresence(settings)


def for_services(services: Services) -> Presence:
    """The process's ``Presence``, created on first use; it closes with ``services``."""
    presence: Presence | None = services.extras.get(PRESENCE_KEY)
    if presence is None:
        presence = services.extras[PRESENCE_KEY] = make_presence(services.settings)
        services.closers.append(presence.close)
    return presence


def heartbeat_log(services: Services) -> HeartbeatLog:
    """The process's batch of heartbeat timestamps (flushed by ``relay.presence``)."""
    log: HeartbeatLog | None = services.extras.get(HEARTBEATS_KEY)
    if log is None:
        log = services.extras[HEARTBEATS_KEY] = HeartbeatLog(services)
    return log


async def online_devices(services: Services, user_id: str) -> int:
    """Distinct devices of ``user_id`` with an open ``/ws`` on any node; each session without
    ``device_id`` counts as one (rest.md ``POST /publish``). Raises ``BackendUnavailable``."""
    return len(await for_services(services).online_devices(user_id))


__all__ = [
    "SESSION_PREFIX",
    "HeartbeatLog",
    "HeartbeatReport",
    "Presence",
    "Timing",
    "Transition",
    "TransitionHandler",
    "for_services",
    "heartbeat_log",
    "is_session",
    "make_presence",
    "online_devices",
    "parse_heartbeat",
    "session_key",
]

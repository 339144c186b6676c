"""``MemoryPresence``: presence of a single process (the default, no Redis).

Per device: the number of open sockets, the heartbeat deadline, the grace deadline and whether it
was last reported online. Every call recomputes the device's state and reports a change at once;
deadlines wait in a heap until ``sweep`` pops them. One process and no await between reading and
writing a device's state, so every transition is reported exactly once.
"""

from __future__ import annotations

import heapq
import logging
import time

from shared.config import Settings
from shared.presence.base import Presence, Timing, Transition, TransitionHandler, is_session

log = logging.getLogger("switchboard.presence")


def _now_ms() -> int:
    return int(time.monotonic() * 1000)  # one process: a clock that never jumps


class _Device:
    __slots__ = ("sockets", "heartbeat_until", "grace_until", "online")

    def __init__(self) -> None:
        self.sockets = 0
        self.heartbeat_until = 0
        self.grace_until = 0
        self.online = False


class MemoryPresence:
    def __init__(self, settings: Settings) -> None:
        self.timing = Timing.of(settings)
        self._users: dict[str, dict[str, _Device]] = {}
        self._due: list[tuple[int, str, str]] = []  # (deadline, user, device key)
        self._handlers: list[TransitionHandler] = []

    def add_handler(self, handler: TransitionHandler) -> None:
        self._handlers.append(handler)

    # -- changes ------------------------------------------------------------------------------
    def _device(self, user_id: str, key: str) -> _Device:
        devices = self._users.setdefault(user_id, {})
        device = devices.get(key)
        if device is None:
            device = devices[key] = _Device()
        return device

    async def socket_opened(self, user_id: str, device_key: str) -> None:
        device = self._device(user_id, device_key)
        device.sockets += 1
        device.grace_until = 0
        self._settle(user_id, device_key, device, _now_ms())

    async def socket_closed(self, user_id: str, device_key: str) -> None:
        device = self._users.get(user_id, {}).get(device_key)
        if device is None or device.sockets == 0:
            return
        device.sockets -= 1
        now = _now_ms()
        if device.sockets == 0 and not is_session(device_key):
            device.grace_until = now + self.timing.grace_ms
            heapq.heappush(self._due, (device.grace_until, user_id, device_key))
        self._settle(user_id, device_key, device, now)

    async def heartbeat(self, user_id: str, device_id: str) -> None:
        device = self._device(user_id, device_id)
        now = _now_ms()
        until = now + self.timing.timeout_ms
        if until > device.heartbeat_until:
            device.heartbeat_until = until
            heapq.heappush(self._due, (until, user_id, device_id))
        self._settle(user_id, device_id, device, now)

    def _settle(self, user_id: str, key: str, device: _Device, now: int) -> None:
        online = device.sockets > 0 or device.heartbeat_until > now or device.grace_until > now
        if not online:
            devices = self._users.get(user_id)
            if devices is not None:
                devices.pop(key, None)
                if not devices:
                    del self._users[user_id]
        if online != device.online:
            device.online = online
            transition = Transition(user_id, key, online)
            for handler in self._handlers:
                try:
                    handler(transition)
                except Exception:
                    log.exception("presence handler failed")

    # -- reads --------------------------------------------------------------------------------
    async def online_devices(self, user_id: str) -> list[str]:
        return sorted(k for k, d in self._users.get(user_id, {}).items() if d.sockets > 0)

    async def online(self, user_id: str) -> list[str]:
        now = _now_ms()
        return sorted(
            k
            for k, d in self._users.get(user_id, {}).items()
            if d.sockets > 0 or d.heartbeat_until > now or d.grace_until > now
        )

    # -- timing -------------------------------------------------------------------------------
    async def refresh(self) -> None:
        pass  # nothing is shared, so nothing can expire behind our back

    async def sweep(self) -> None:
        now = _now_ms()
        due = self._due
        while due and due[0][0] <= now:
            _, user_id, key = heapq.heappop(due)
            device = self._users.get(user_id, {}).get(key)
            if device is not None:
                self._settle(user_id, key, device, now)

    async def close(self) -> None:
        # Nobody else shares this state: after the drain no one is left to tell about offlines.
        self._users.clear()
        self._due.clear()
        self._handlers.clear()


_: type[Presence] = MemoryPresence

"""Which devices of a book are online across nodes, as one node sees it (no store, no Redis keys).

Every node announces on the book's channel what its sockets mean for presence: ``device.online``
when a device's first socket on the book opens on it, ``device.offline`` when the last one
closed ``PRESENCE_GRACE_S`` ago (a reconnect to the same node within the grace is silent), and
``_here`` (the devices it counts online for the book) when it first has a socket on the book, as
a query the other nodes answer with their own ``_here``, and again every third of
``PRESENCE_TTL_S``. Each message carries the sending node's id.

``BookView`` folds those messages into "device -> the nodes that count it online" and says which
changes the local sockets must be told about: a device is online while any node counts it; the
first node to count it makes it online, the last to stop makes it offline. A node not heard from
within ``PRESENCE_TTL_S`` (killed, partitioned) stops counting, so its devices go offline for
everyone else instead of staying online forever (realtime.md guarantee 5).

Sans-I/O: the relay (relay/book_relay.py) publishes and delivers what this decides.
"""

from __future__ import annotations

from collections.abc import Iterable

HERE = "_here"  # internal: never written to a socket


class BookView:
    __slots__ = ("holders", "heard")

    def __init__(self) -> None:
        self.holders: dict[str, set[str]] = {}  # device -> nodes counting it online
        self.heard: dict[str, float] = {}  # node -> when it last spoke (monotonic s)

    def online(self) -> list[str]:
        return sorted(d for d, nodes in self.holders.items() if nodes)

    def claim(self, node: str, device: str, now: float) -> bool:
        """``node`` counts ``device`` online; True when the device just came online."""
        self.heard[node] = now
        nodes = self.holders.setdefault(device, set())
        was = bool(nodes)
        nodes.add(node)
        return not was

    def release(self, node: str, device: str, now: float) -> bool:
        """``node`` stopped counting ``device``; True when the device just went offline."""
        self.heard[node] = now
        nodes = self.holders.get(device)
        if not nodes or node not in nodes:
            return False
        nodes.discard(node)
        if nodes:
            return False
        del self.holders[device]
        return True

    def here(self, node: str, devices: Iterable[str], now: float) -> tuple[list[str], list[str]]:
        """``node``'s full list: the devices that came online and went offline because of it."""
        listed = set(devices)
        came = [d for d in sorted(listed) if self.claim(node, d, now)]
        gone = [d for d in sorted(self.holders) if node in self.holders[d] and d not in listed]
        went = [d for d in gone if self.release(node, d, now)]
        return came, went

    def expire(self, now: float, ttl: float, keep: str) -> list[str]:
        """Forget nodes silent for ``ttl`` (never ``keep``, this node); the devices gone offline."""
        silent = [n for n, at in self.heard.items() if n != keep and now - at >= ttl]
        went: list[str] = []
        for node in silent:
            del self.heard[node]
            for device in sorted(self.holders):
                if node in self.holders[device] and self.release(node, device, now):
                    went.append(device)
            self.heard.pop(node, None)
        return went

"""Write device notices (``shared.device_notices``) to this node's sockets of that device and book.

The hub listens on the node-wide ``device_notice`` channel. A notice names a device and a book:
its frame goes to the device's sockets (the registry's ``by_device`` index, never a walk of every
socket) that the book relay has on record for that book. A socket still being set up (held by the
relay until ``presence``, its catch-up and ``synced`` are out) gets the frame with the live frames
held for it, after those: its first frame stays ``presence`` (realtime.md "Handshake").
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from relay import book_relay
from shared.device_notices import DEVICE_NOTICE_CHANNEL, book_digest

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.state import RelayState

log = logging.getLogger("switchboard.device_notices")


def parse(data: bytes) -> tuple[str, str, dict[str, Any]] | None:
    """``(device_id, book digest, frame)`` of a well-formed notice, else None."""
    try:
        notice = json.loads(data)
    except ValueError:
        return None
    if not isinstance(notice, dict):
        return None
    device_id, book_id, frame = notice.get("device_id"), notice.get("book"), notice.get("frame")
    if not (isinstance(device_id, str) and isinstance(book_id, str) and isinstance(frame, dict)):
        return None
    if not isinstance(frame.get("type"), str):
        return None
    return device_id, book_id, frame


def targets(state: RelayState, device_id: str, book: str) -> list[tuple[WsConnection, Any]]:
    """The open relay sockets of ``device_id`` on the book whose digest is ``book`` on this node,
    with the relay's record of each (``book_relay._Socket``)."""
    relay = state.services.extras.get(book_relay.EXTRAS_KEY)
    if not isinstance(relay, book_relay.BookRelay):
        return []  # no relay socket was ever opened on this node
    found = []
    for conn in state.registry.by_device(device_id):
        socket = relay.sockets.get(conn)
        if socket is not None and book_digest(socket.book_id) == book and conn.open:
            found.append((conn, socket))
    return found


def deliver(state: RelayState, data: bytes) -> int:
    """Write one notice's frame (held for a socket not live yet); how many sockets get it."""
    parsed = parse(data)
    if parsed is None:
        log.error("dropped a malformed device notice")
        return 0
    device_id, book_id, frame = parsed
    found = targets(state, device_id, book_id)
    for conn, socket in found:
        if socket.pending is not None:  # being set up: sent after synced, with the held ops
            socket.pending.append(frame)  # no seq, so a replay never drops it
        else:
            conn.send(frame)
    return len(found)


async def install(state: RelayState) -> None:
    """Listen for notices (awaited at start: the subscription is confirmed before serving)."""

    def on_notice(data: bytes) -> None:
        deliver(state, data)

    await state.hub.listen(DEVICE_NOTICE_CHANNEL, on_notice)


__all__ = ["deliver", "install", "parse", "targets"]

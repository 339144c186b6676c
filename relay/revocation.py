"""Close the sockets of revoked credentials, on every node (``shared.revocation`` notices).

The hub listens on the node-wide ``revoke`` channel; a notice closes every matching socket of
this node with 1008 (policy: the credential was revoked), found through the registry's token,
session and user indexes.

A ``book_device`` notice (a device removed from a book) is found through the device index and
kept to the sockets of that book: the relay's own record of the socket's book, or, while the
socket is still subscribing (not yet recorded), the book its token is bound to. Those sockets get
``{"type": "device.removed"}`` and then the 1008 close (realtime.md "Book relay"). A socket of
an unbound token whose notice arrives in that short window (one subscribe round trip), or before
the socket is registered at all, is not found here; closing that gap needs the relay to re-check
membership once subscribed.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from relay import book_relay
from shared.codes import CloseCode
from shared.revocation import REVOKE_CHANNEL, forget_cached_token

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.state import RelayState

log = logging.getLogger("switchboard.revocation")


def book_device(notice: dict[str, Any]) -> tuple[str, str] | None:
    """``(book_id, device_id)`` of a well-formed ``book_device`` notice, else None."""
    value = notice.get("book_device")
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], str)
    ):
        return value[0], value[1]
    return None


def book_of(state: RelayState, conn: WsConnection) -> str | None:
    """The book a ``/ws/relay/{book_id}`` socket is open on (None for a ``/ws`` socket)."""
    relay = state.services.extras.get(book_relay.EXTRAS_KEY)
    if isinstance(relay, book_relay.BookRelay):
        socket = relay.sockets.get(conn)
        if socket is not None:
            return socket.book_id
    # Still subscribing (the relay records it once subscribed): a bound token opens only its book.
    return conn.principal.book_id


def matches(conn: WsConnection, notice: dict[str, Any]) -> bool:
    p = conn.principal
    if "token" in notice:
        return p.token_id is not None and p.token_id == notice["token"]
    if "session" in notice:
        return p.session_id is not None and p.session_id == notice["session"]
    if "user_sessions" in notice:
        return (
            p.kind == "user"
            and p.user_id == notice["user_sessions"]
            and p.session_id is not None
            and p.session_id != notice.get("keep")
        )
    return False


def removed_from_book(state: RelayState, conn: WsConnection, book_id: str, device_id: str) -> bool:
    p = conn.principal
    return p.kind == "device" and p.device_id == device_id and book_of(state, conn) == book_id


def candidates(state: RelayState, notice: dict[str, Any]) -> tuple[WsConnection, ...]:
    """The sockets a notice may concern, from the registry's indexes (never a walk of them all)."""
    registry = state.registry
    for key, lookup in (
        ("token", registry.by_token),
        ("session", registry.by_session),
        ("user_sessions", registry.by_user),
    ):
        value = notice.get(key)
        if isinstance(value, str):
            return lookup(value)
    removed = book_device(notice)
    if removed is not None:
        return registry.by_device(removed[1])
    return ()


async def install(state: RelayState) -> None:
    """Listen for notices (awaited at start: the subscription is confirmed before serving)."""

    def on_notice(data: bytes) -> None:
        try:
            notice = json.loads(data)
        except ValueError:
            log.error("dropped a malformed revocation notice")
            return
        if not isinstance(notice, dict):
            return
        if isinstance(notice.get("token"), str):
            forget_cached_token(state.services, notice["token"])
        removed = book_device(notice)
        if removed is not None:
            relay = book_relay.for_state(state)
            for conn in candidates(state, notice):
                if conn.open and removed_from_book(state, conn, *removed):
                    relay.evict(conn)
            return
        for conn in candidates(state, notice):
            if conn.open and matches(conn, notice):
                conn.close(CloseCode.POLICY, "credential revoked")

    await state.hub.listen(REVOKE_CHANNEL, on_notice)


__all__ = ["book_device", "book_of", "candidates", "install", "matches", "removed_from_book"]

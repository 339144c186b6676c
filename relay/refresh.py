"""Credential refresh on a live socket (realtime.md "Credential refresh on a live socket").

A socket outlives its access token. Before the credential's ``exp`` the client sends
``{"type": "refresh", "token": "<new>"}``; if the new token authenticates as the *same* principal
the connection adopts it and gets ``{"type": "refreshed", "exp": <unix s | null>}``. Anything else
(invalid or expired token, another principal, another book) gets an ``error`` frame and the socket
keeps its old credential. A socket whose credential expires unrefreshed is closed with 4001.

One timer per socket whose credential has an ``exp`` (``call_later``, no task); credentials that
never expire (API tokens without ``expires_at``) hold no timer. ``install`` wires this into a
``RelayState``: the ``refresh`` handler, an ``on_open`` hook arming the timer and an ``on_close``
hook cancelling it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from relay.protocol import Message, error_frame, request_id_of
from shared.codes import CloseCode, ErrorCode
from shared.errors import ApiError, BackendUnavailable
from shared.principals import Principal, authenticate

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.state import RelayState

# A JWT or opaque key is a few hundred bytes; anything far longer is not worth a store lookup.
MAX_TOKEN_CHARS = 8192


def same_principal(old: Principal, new: Principal) -> bool:
    """Whether ``new`` may replace ``old`` on an open socket.

    Same kind and id (user id, or device id for daemons and E2EE devices) and the same bindings:
    a device JWT for another book, or a credential naming another device, is someone else. A
    credential that could not have opened the socket (an API token without ``subscribe`` where
    the old one had it) is refused too, so refresh never widens what the socket may do.
    """
    return (
        old.kind == new.kind
        and old.id == new.id
        and old.user_id == new.user_id
        and old.device_id == new.device_id
        and old.book_id == new.book_id
        and not ("subscribe" in old.scopes and "subscribe" not in new.scopes)
    )


def refreshed_frame(exp: int | None, request: Message) -> Message:
    frame: Message = {"type": "refreshed", "exp": exp}
    rid = request_id_of(request)
    if rid is not None:
        frame["request_id"] = rid
    return frame


class CredentialWatch:
    """The expiry timers of one server's sockets and the ``refresh`` handler that re-arms them."""

    __slots__ = ("_state", "_timers")

    def __init__(self, state: RelayState) -> None:
        self._state = state
        self._timers: dict[WsConnection, asyncio.TimerHandle] = {}

    def arm(self, conn: WsConnection) -> None:
        """(Re)start the expiry timer for the connection's current credential."""
        self.disarm(conn)
        exp = conn.principal.exp
        if exp is None:
            return
        # ``exp`` is wall-clock unix seconds; the loop's clock is monotonic, so convert once to a
        # delay. A credential is valid while now < exp (PyJWT's rule), hence "at exp", not after.
        delay = max(0.0, exp - time.time())
        self._timers[conn] = asyncio.get_running_loop().call_later(delay, self._expired, conn)

    def disarm(self, conn: WsConnection) -> None:
        handle = self._timers.pop(conn, None)
        if handle is not None:
            handle.cancel()

    def _expired(self, conn: WsConnection) -> None:
        self._timers.pop(conn, None)
        exp = conn.principal.exp
        remaining = exp - time.time() if exp is not None else 0.0
        if remaining > 0:
            # The loop runs a timer up to its clock resolution early (uvloop: ~1 ms), and the
            # wall clock may have been stepped: never close a credential that is still valid.
            self._timers[conn] = asyncio.get_running_loop().call_later(
                remaining, self._expired, conn
            )
            return
        conn.close(CloseCode.TOKEN_EXPIRED)

    async def on_refresh(self, conn: WsConnection, message: Message) -> None:
        rid = request_id_of(message)
        token = message.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            conn.send(
                error_frame(ErrorCode.VALIDATION_ERROR, "'token' must be a non-empty string", rid)
            )
            return
        try:
            principal = await authenticate(self._state.services, token)
        except ApiError as exc:  # INVALID_TOKEN / TOKEN_EXPIRED, with the authenticator's message
            conn.send(error_frame(exc.code, exc.message, rid))
            return
        except BackendUnavailable:
            conn.send(
                error_frame(ErrorCode.SERVICE_UNAVAILABLE, "a backend is unavailable; retry", rid)
            )
            return
        if not same_principal(conn.principal, principal):
            conn.send(error_frame(ErrorCode.FORBIDDEN, "the token names another principal", rid))
            return
        if not conn.open:  # closed (or expired) while the token was checked
            return
        conn.principal = principal
        self.arm(conn)
        conn.send(refreshed_frame(principal.exp, message))


def install(state: RelayState) -> CredentialWatch:
    """Register the ``refresh`` handler and the expiry hooks on ``state``."""
    watch = CredentialWatch(state)
    state.handlers["refresh"] = watch.on_refresh
    state.on_open.append(watch.arm)
    state.on_close.append(watch.disarm)
    return watch

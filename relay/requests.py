"""Client requests on ``/ws``: ``request_id`` in, one ``reply`` out, idempotent per principal.

realtime.md "client -> server requests carry a request_id and get a reply" and "A repeated
request_id from the same principal returns the first reply again (idempotent sends)":

    {"type": "message.send", "request_id": "r-1", ...}
    {"type": "reply", "request_id": "r-1", "ok": true, "data": {...}}
    {"type": "reply", "request_id": "r-2", "ok": false, "error": {"code": "MUTED", "message": "..."}}

A handler is ``async (conn, message) -> data`` and raises ``ApiError`` for an error reply. The
wrapper installed by ``install`` validates ``request_id``, claims it in the store
(``shared.idempotency``, scope = the principal, so a retry after a reconnect to another node finds
it too), runs the handler, remembers the reply and sends it. Replies that say "try again"
(``SERVICE_UNAVAILABLE``, ``INTERNAL_ERROR``, ``RATE_LIMIT_EXCEEDED``) are not remembered: the
retry runs the request again. A repeat that arrives while the first attempt still runs is
answered ``CONFLICT`` (retry later), never run twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from relay.protocol import Message, error_frame, request_id_of
from shared import idempotency
from shared.clock import now_ms
from shared.codes import ErrorCode
from shared.errors import ApiError, BackendUnavailable, StoreError

if TYPE_CHECKING:
    from relay.connection import WsConnection
    from relay.state import RelayState

log = logging.getLogger("switchboard.requests")

RequestHandler = Callable[["WsConnection", Message], Awaitable[dict[str, Any]]]
_TRANSIENT = frozenset(
    {ErrorCode.SERVICE_UNAVAILABLE, ErrorCode.INTERNAL_ERROR, ErrorCode.RATE_LIMIT_EXCEEDED}
)


def ok_reply(request_id: Any, data: dict[str, Any]) -> Message:
    return {"type": "reply", "request_id": request_id, "ok": True, "data": data}


def error_reply(request_id: Any, code: ErrorCode | str, message: str) -> Message:
    return {
        "type": "reply",
        "request_id": request_id,
        "ok": False,
        "error": {"code": str(code), "message": message},
    }


def scope_of(conn: WsConnection) -> str:
    p = conn.principal
    return f"ws:{p.kind}:{p.id}"


def install(
    state: RelayState, name: str, handler: RequestHandler, *, idempotent: bool = True
) -> None:
    """Serve request type ``name`` on every ``/ws`` socket of ``state``."""

    async def serve(conn: WsConnection, message: Message) -> None:
        rid = request_id_of(message)
        if rid is None:
            conn.send(
                error_frame(
                    ErrorCode.VALIDATION_ERROR, "a request needs a 'request_id' (string or integer)"
                )
            )
            return
        db = state.services.db
        scope, key = scope_of(conn), str(rid)
        if idempotent:
            try:
                prior = await idempotency.claim(
                    db, scope, key, now=now_ms(), ttl_ms=state.settings.idempotency_ttl_s * 1000
                )
            except idempotency.InProgress:
                conn.send(
                    error_reply(
                        rid, ErrorCode.CONFLICT, "a request with this request_id is still running"
                    )
                )
                return
            except (BackendUnavailable, StoreError):
                conn.send(
                    error_reply(
                        rid, ErrorCode.SERVICE_UNAVAILABLE, "a backend is unavailable; retry"
                    )
                )
                return
            if prior is not None:
                conn.send(prior.body)
                return
        try:
            reply = ok_reply(rid, await handler(conn, message))
        except ApiError as exc:
            reply = error_reply(rid, exc.code, exc.message)
        except (BackendUnavailable, StoreError):
            reply = error_reply(
                rid, ErrorCode.SERVICE_UNAVAILABLE, "a backend is unavailable; retry"
            )
        except Exception:
            log.exception("request %r failed", name)
            reply = error_reply(rid, ErrorCode.INTERNAL_ERROR, "internal error")
        if idempotent:
            try:
                if not reply["ok"] and reply["error"]["code"] in _TRANSIENT:
                    await idempotency.release(db, scope, key)
                else:
                    await idempotency.finish(db, scope, key, 200, reply)
            except (BackendUnavailable, StoreError) as exc:
                log.warning("reply to %r not remembered: %s", name, exc)
        conn.send(reply)

    state.handlers[name] = serve


__all__ = ["RequestHandler", "error_reply", "install", "ok_reply", "scope_of"]

"""Deciding a ``/ws`` upgrade: every check that must pass before a 101 goes out.

Order matters: cheap checks first (path, drain, Origin, ``device_id``), then the credential (one
store or crypto lookup), then the connection rate limit, and only then the WebSocket handshake
itself. Any refusal is an ``ApiError``; the caller answers it as the REST envelope with
``Content-Length`` and ``Connection: close`` (realtime.md "Handshake"), never with a 101.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from websockets.http11 import Request
from websockets.server import ServerProtocol

from relay import book_relay
from relay.httphead import RequestHead
from relay.protocol import DEVICE_ID, SUBPROTOCOLS, Codec, codec_for, select_subprotocol
from relay.state import RelayState
from shared.books import is_member
from shared.codes import ErrorCode
from shared.errors import ApiError, validation_error
from shared.principals import Principal, authenticate, bearer_from_header
from shared.ratelimit import Limit

WS_PATH = "/ws"
RELAY_PATH = re.compile(
    r"^/ws/relay/([A-Za-z0-9_-]{1,64})$"
)  # another spelling of a book id is no book
WS_KINDS = frozenset({"user", "daemon", "api_token"})  # E2EE devices use /ws/relay/{book_id}


@dataclass(slots=True)
class Accepted:
    """An upgrade that passed every check; ``protocol`` holds the 101 in ``data_to_send``."""

    protocol: ServerProtocol
    connection_id: str
    principal: Principal
    device_id: str | None
    codec: Codec
    book_id: str | None = None  # set on /ws/relay/{book_id}
    since: int | None = None  # /ws/relay/{book_id}?since=<seq>: catch up after that seq


def credential_of(head: RequestHead) -> str | None:
    """``Authorization: Bearer ...`` first, else the browser's ``?token=...``."""
    return bearer_from_header(head.header("authorization")) or head.query_param("token") or None


async def negotiate(state: RelayState, head: RequestHead, data: bytes) -> Accepted:
    """Run every check on an upgrade request (``data``: the bytes read so far, head included)."""
    settings = state.settings
    relay = RELAY_PATH.match(head.path)
    if head.path != WS_PATH and relay is None:
        raise ApiError(ErrorCode.NOT_FOUND, "no such socket endpoint")
    if state.draining:
        raise ApiError(
            ErrorCode.SERVICE_UNAVAILABLE, "server is draining", headers={"Retry-After": "1"}
        )
    allowed = settings.allowed_origin_set
    origin = head.header("origin")
    if allowed and origin is not None and origin not in allowed:
        raise ApiError(ErrorCode.FORBIDDEN, "origin not allowed")
    book_id: str | None = None
    since: int | None = None
    if relay is not None:
        book_id = relay.group(1)
        since = _since_of(head)
        principal = await _admit_relay(state, head, book_id)
        device_id = principal.device_id
    else:
        principal, device_id = await _admit_ws(state, head)

    protocol = ServerProtocol(
        subprotocols=SUBPROTOCOLS,
        select_subprotocol=select_subprotocol,
        extensions=None,  # no permessage-deflate: payloads are mostly ciphertext
        max_size=settings.ws_max_frame_bytes,
    )
    protocol.receive_data(data)
    events = protocol.events_received()
    request = events[0] if events else None
    if not isinstance(request, Request):
        raise ApiError(ErrorCode.VALIDATION_ERROR, "malformed upgrade request")
    response = protocol.accept(request)
    if response.status_code != 101:
        # Missing Sec-WebSocket-Key, wrong version...: websockets says why in plain text.
        reason = response.body.decode(errors="replace").strip() or "invalid WebSocket handshake"
        raise ApiError(ErrorCode.VALIDATION_ERROR, reason[:200], status=response.status_code)
    protocol.send_response(response)
    subprotocol = response.headers.get("Sec-WebSocket-Protocol")
    return Accepted(
        protocol,
        "c-" + secrets.token_urlsafe(12),
        principal,
        device_id,
        codec_for(subprotocol),
        book_id,
        since,
    )


def _since_of(head: RequestHead) -> int | None:
    """``?since=<seq>``: a non-negative integer (checked before the credential costs anything)."""
    value = head.query_param("since")
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise validation_error("since", "must be a non-negative integer (the last seq you have)")
    return int(value)


async def _admit_ws(state: RelayState, head: RequestHead) -> tuple[Principal, str | None]:
    """``/ws``: users, daemons and API tokens with ``subscribe``; the socket's ``device_id``."""
    device_id = head.query_param("device_id")
    if device_id is not None and not DEVICE_ID.match(device_id):
        raise validation_error("device_id", "must match [A-Za-z0-9_-]{1,64}")

    credential = credential_of(head)
    if credential is None:
        raise ApiError(ErrorCode.INVALID_TOKEN, "missing credential")
    principal = await authenticate(state.services, credential)
    if principal.kind not in WS_KINDS:
        raise ApiError(ErrorCode.FORBIDDEN, "this credential cannot open /ws")
    if principal.kind == "api_token":
        principal.require_scope("subscribe")
    device_id = device_id or principal.device_id  # a daemon's key implies its own device

    limit = Limit.of(state.settings.rate("rate_ws_connect"))
    key = f"ws_connect:{principal.kind}:{principal.id}:{device_id or ''}"
    decision = await state.services.limiter.hit(key, limit)
    decision.raise_if_denied("too many socket connections; retry later")
    return principal, device_id


async def _admit_relay(state: RelayState, head: RequestHead, book_id: str) -> Principal:
    """``/ws/relay/{book_id}``: a device JWT of a current member, bound to this book if bound at all.

    Not a member, no such book, another book's token, another kind of credential: all the same
    403, so outsiders cannot probe which books exist (README "Device JWT"). The connection limit
    (per device) is counted before the membership query, so a flood costs no store lookups.
    """
    credential = credential_of(head)
    if credential is None:
        raise ApiError(ErrorCode.INVALID_TOKEN, "missing credential")
    principal = await authenticate(state.services, credential)
    if principal.kind != "device" or principal.device_id is None:
        raise ApiError(ErrorCode.FORBIDDEN, "the book relay needs an E2EE device token")
    if principal.book_id is not None and principal.book_id != book_id:
        raise ApiError(ErrorCode.FORBIDDEN, "this token is bound to another book")
    limit = Limit.of(state.settings.rate("rate_relay_connect"))
    decision = await state.services.limiter.hit(f"relay_connect:{principal.device_id}", limit)
    decision.raise_if_denied("too many relay connections; retry later")
    if not await is_member(state.services.db, book_id, principal.device_id):
        raise ApiError(ErrorCode.FORBIDDEN, "not a member of this book")
    book_relay.for_state(state)  # its handlers are in place before the socket can send anything
    return principal

"""The one-port router: read the first request head, then keep the socket or hand it to aiohttp.

``HeadReader`` is the protocol of every accepted connection. It buffers bytes until the blank
line ending the head (bounded by ``MAX_HEAD_BYTES``, 431 above; by ``HANDSHAKE_TIMEOUT_S``, closed
after), and parses only the request line and header fields (``relay.httphead``, Sans-I/O).

* ``GET /ws...`` with ``Upgrade: websocket``: the relay keeps the connection. Reading pauses while
  ``relay.upgrade.negotiate`` checks the request; then a ``WsConnection`` takes over the transport.
* Anything else: aiohttp's request handler takes over the same transport and receives every byte
  read so far, so keep-alive, pipelined and chunked requests continue as if aiohttp had accepted
  the connection itself (``transport.set_protocol`` + ``connection_made`` + ``data_received``).

Unfinished handshakes are bounded per client IP (``MAX_HANDSHAKES_PER_IP``; excess: 503 and close).
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from relay import book_relay, inbox
from relay.connection import WsConnection
from relay.httphead import HeadError, RequestHead, find_head_end, parse_head
from relay.responses import error_response_bytes
from relay.state import RelayState
from relay.upgrade import negotiate
from shared.codes import ErrorCode
from shared.errors import ApiError, BackendUnavailable

log = logging.getLogger("switchboard.relay")

# After a refusal written while the client may still be sending (a 431 in the middle of a huge
# head), keep reading and dropping for this long, so closing with unread input does not reset the
# connection before the client has read the answer.
LINGER_S = 1.0


class HeadReader(asyncio.Protocol):
    __slots__ = ("_state", "_transport", "_buffer", "_searched", "_ip", "_timer", "_task", "_phase")

    # _phase: "head" (reading), "upgrade" (negotiating, reading paused), "linger" (refused,
    # dropping input), "done" (handed off or closed).

    def __init__(self, state: RelayState) -> None:
        self._state = state
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._searched = 0
        self._ip: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._phase = "head"

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = transport = cast(asyncio.Transport, transport)
        state = self._state
        if state.draining:
            self._refuse(
                ErrorCode.SERVICE_UNAVAILABLE, "server is draining", headers={"Retry-After": "1"}
            )
            return
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if not state.acquire_handshake(ip):
            self._refuse(
                ErrorCode.SERVICE_UNAVAILABLE,
                "too many unfinished handshakes from this address",
                headers={"Retry-After": "1"},
            )
            return
        self._ip = ip
        state.pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            state.settings.handshake_timeout_s, self._on_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self._phase != "head":
            return  # lingering after a refusal: drop
        buffer = self._buffer
        buffer += data
        end = find_head_end(buffer, self._searched)
        limit = self._state.settings.max_head_bytes
        if end < 0:
            self._searched = len(buffer)
            if len(buffer) > limit:
                self._refuse(ErrorCode.HEADERS_TOO_LARGE, "request head too large")
            return
        if end > limit:
            self._refuse(ErrorCode.HEADERS_TOO_LARGE, "request head too large")
            return
        try:
            head = parse_head(bytes(buffer[:end]))
        except HeadError as exc:
            self._refuse(ErrorCode.VALIDATION_ERROR, str(exc))
            return
        if self._state.draining:
            self._refuse(
                ErrorCode.SERVICE_UNAVAILABLE, "server is draining", headers={"Retry-After": "1"}
            )
        elif head.wants_relay:
            self._start_upgrade(head)
        else:
            self._hand_to_http()

    def eof_received(self) -> bool | None:
        return None  # a client that stops sending before its head is complete is done

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = "done"
        self._finish()
        if self._task is not None:
            self._task.cancel()

    # -- routes ---------------------------------------------------------------------------------
    def _hand_to_http(self) -> None:
        transport = self._transport
        assert transport is not None
        self._phase = "done"
        self._finish()
        protocol = self._state.http_factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(bytes(self._buffer))
        self._buffer = bytearray()

    def _start_upgrade(self, head: RequestHead) -> None:
        assert self._transport is not None
        self._phase = "upgrade"
        self._transport.pause_reading()
        self._task = self._state.spawn(self._upgrade(head))

    async def _upgrade(self, head: RequestHead) -> None:
        transport = self._transport
        assert transport is not None
        try:
            accepted = await negotiate(self._state, head, bytes(self._buffer))
        except ApiError as exc:
            self._refuse(exc.code, exc.message, exc.details, status=exc.status, headers=exc.headers)
            return
        except BackendUnavailable:
            log.warning("socket upgrade refused: a backend is unavailable")
            self._refuse(
                ErrorCode.SERVICE_UNAVAILABLE,
                "a backend is unavailable",
                headers={"Retry-After": "5"},
            )
            return
        except Exception:
            log.exception("socket upgrade failed")
            self._refuse(ErrorCode.INTERNAL_ERROR, "internal error")
            return
        if transport.is_closing():
            return
        self._phase = "done"
        self._finish()
        self._buffer = bytearray()
        conn = WsConnection(
            self._state,
            accepted.protocol,
            transport,
            accepted.connection_id,
            accepted.principal,
            accepted.device_id,
            accepted.codec,
        )
        transport.set_protocol(conn)
        conn.start()
        if accepted.book_id is not None:
            # Subscribed before ``presence``, its first frame (realtime.md "Handshake").
            await book_relay.for_state(self._state).opened(conn, accepted.book_id, accepted.since)
        else:
            # Subscribed to the inbox before ``hello``; catch-up follows it (relay.inbox).
            await inbox.for_state(self._state).opened(conn)
        transport.resume_reading()

    # -- endings --------------------------------------------------------------------------------
    def _finish(self) -> None:
        """The head phase is over: stop the timer, give back the per-IP handshake slot."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ip is not None:
            self._state.release_handshake(self._ip)
            self._ip = None
        self._state.pending.discard(self)

    def _on_timeout(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Drain: a connection that has not finished its first head is simply closed."""
        if self._transport is not None and self._phase == "head":
            self._transport.close()

    def _refuse(
        self,
        code: ErrorCode,
        message: str,
        details: dict[str, object] | None = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        transport = self._transport
        assert transport is not None
        was_paused = self._phase == "upgrade"
        self._phase = "linger"
        self._finish()
        if transport.is_closing():
            return
        transport.write(
            error_response_bytes(code, message, details, status=status, headers=headers)
        )
        if transport.can_write_eof():
            transport.write_eof()  # the client sees the whole answer, then end of stream
        if was_paused:
            transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

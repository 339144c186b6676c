"""``WsConnection``: one open ``/ws`` socket, an ``asyncio.Protocol`` around websockets' Sans-I/O.

There is no reader coroutine per connection: bytes arrive in ``data_received`` and are handled
right there, following websockets' ritual (STYLE.md 2):

    receive_data -> events_received -> send data_to_send (always: the protocol answers pings and
    close frames by itself) -> arm the close deadline if close_expected() -> dispatch events.

While the socket is OPEN, ``data_received`` hands the protocol one frame at a time
(``frame_length``), so every frame is dispatched before the protocol parses the next: websockets'
``receive_data`` would otherwise parse a whole read, answer (or fail on) a close or a bad frame
near its end, and leave the frames before it to be dispatched after our close frame. The
ordering that gives, exactly as if each frame had arrived in a read of its own:

* a message before the client's close frame is dispatched while the socket is still OPEN, so a
  synchronous answer (``pong``, an ``error`` frame) goes out before our close frame; an answer
  that needs an ``await`` (store, broker) and finishes after the close frame is dropped by
  ``send``: RFC 6455 5.5.1 forbids data frames after a Close. The request itself was received
  and acted on; a client that wants the answer waits for it before closing.
* a frame that fails the connection (invalid UTF-8: 1007, too many fragments: 1009, or the
  protocol's own 1002/1009) stops everything after it, a client close frame included: the close
  code is the failure's, and websockets discards the rest of the stream (RFC 6455 7.1.7).

Fragments are reassembled into one ``bytearray`` (not a list of ``bytes``: a megabyte of one-byte
fragments would be a million objects), at most ``WS_MAX_FRAGMENTS`` frames per message, text
checked for UTF-8 as each fragment arrives (fail fast). Every data frame, fragment or not, takes a
token of the inbound rate budget (realtime.md: frames per second): a message split into n frames
costs n parses, so it costs n tokens. Control frames are answered by the protocol and do not count.

Timers, not tasks, and no timer per idle socket: one ``HeartbeatWheel`` per server visits every
socket once per ``heartbeat_s`` to ping it (sockets spread over its slots); a socket found silent
for more than one period gets a timer of its own to its exact deadline, closed once silent for
``2 x heartbeat_s``. Another timer aborts a transport whose peer does not finish the closing
handshake.

Handlers of message types live in ``RelayState.handlers``; a later issue (hub, inbox) adds its
own types there and attaches to ``on_open`` / ``on_close``.
"""

from __future__ import annotations

import asyncio
import codecs
import inspect
import logging
import os
from typing import TYPE_CHECKING, Any

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from relay.hub import frame_bytes
from relay.protocol import Codec, Message, MessageError, TokenBucket, error_frame, request_id_of
from shared import metrics
from shared.codes import CloseCode, ErrorCode
from shared.config import RateSpec
from shared.principals import Principal

if TYPE_CHECKING:
    from relay.state import RelayState

log = logging.getLogger("switchboard.relay")
# websockets' DEBUG lines carry request paths (book ids) and frames (ciphertext); even at
# LOG_LEVEL=DEBUG they stay off, as aiosqlite's statements do (shared/store/sqlite.py).
logging.getLogger("websockets").setLevel(logging.INFO)

# Time the peer gets to answer our close frame before the TCP connection is aborted. websockets
# uses 10 s; ours is shorter because SIGTERM drain must finish within SHUTDOWN_TIMEOUT_S.
CLOSE_TIMEOUT_S = 3.0
# A slow consumer's buffer is full, so its close frame may never leave: wait this long for the
# buffer to drain (the peer then sees 4008), then abort. Short, because the buffer holds up to
# WS_OUTBOUND_LIMIT_BYTES of memory for that whole time.
SLOW_CLOSE_TIMEOUT_S = 1.0
_DATA_OPCODES = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def frame_length(data: bytes, start: int = 0) -> int | None:
    """Bytes of the frame starting at ``data[start]``, header included (RFC 6455 5.2); None while
    its length field is incomplete. Only the length is read: validating the frame is the protocol's
    job (a 64-bit length with its top bit set gives a huge size, which the protocol refuses)."""
    available = len(data) - start
    if available < 2:
        return None
    second = data[start + 1]
    n = second & 0x7F
    size = 6 if second & 0x80 else 2  # the masking key follows the length fields
    if n == 126:
        if available < 4:
            return None
        n = int.from_bytes(data[start + 2 : start + 4], "big")
        size += 2
    elif n == 127:
        if available < 10:
            return None
        n = int.from_bytes(data[start + 2 : start + 10], "big")
        size += 8
    return size + n


def release_handshake(protocol: ServerProtocol) -> bool:
    """Let the opening handshake's request go once it is answered (memory per idle socket).

    ``ServerProtocol.parse`` parses the request and then runs the frame parser, ``Protocol.parse``,
    inside the same generator frame, whose local ``request`` (the Request with every header, the
    credential included: about 3 KB, bench/micro/README.md) thus lives as long as the socket.
    When that generator waits at the top of its frame loop (no frame half read: the reader is
    empty and the innermost generator is ``StreamReader.at_eof``), a fresh ``Protocol.parse`` on
    the same protocol is in exactly the same state, so it replaces it. Otherwise nothing changes.
    """
    parser = protocol.parser
    inner = parser
    while (sub := getattr(inner, "gi_yieldfrom", None)) is not None:
        inner = sub
    if protocol.reader.buffer or getattr(inner, "gi_code", None) is not _AT_EOF_CODE:
        return False
    fresh = Protocol.parse(protocol)
    next(fresh)  # runs to the same wait: at_eof on the empty reader
    protocol.parser = fresh
    parser.close()
    return True


_AT_EOF_CODE = StreamReader.at_eof.__code__


class HeartbeatWheel:
    """One timer for the heartbeats of every socket of a server (instead of one per socket:
    ~550 bytes each, bench/micro/README.md). Sockets sit in ``SLOTS`` sets by hash; every
    ``heartbeat_s / SLOTS`` one set is visited, so each socket is visited once per period."""

    SLOTS = 16
    __slots__ = ("_interval", "_slots", "_pos", "_handle", "_count")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._slots: list[set[WsConnection]] = [set() for _ in range(self.SLOTS)]
        self._pos = 0
        self._handle: asyncio.TimerHandle | None = None
        self._count = 0

    def add(self, conn: WsConnection) -> None:
        slot = self._slots[hash(conn) % self.SLOTS]
        if conn not in slot:
            slot.add(conn)
            self._count += 1
        if self._handle is None:
            self._schedule()

    def discard(self, conn: WsConnection) -> None:
        slot = self._slots[hash(conn) % self.SLOTS]
        if conn in slot:
            slot.discard(conn)
            self._count -= 1
        if not self._count and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self._interval / self.SLOTS, self._turn)

    def _turn(self) -> None:
        self._pos = (self._pos + 1) % self.SLOTS
        for conn in list(self._slots[self._pos]):  # a visit may close it: membership changes
            conn._on_heartbeat()
        if self._count:
            self._schedule()
        else:
            self._handle = None


_WHEEL_KEY = "relay.heartbeat"


def heartbeat_wheel(state: RelayState) -> HeartbeatWheel:
    """The server's wheel (one per ``RelayState``, kept in the services' extras)."""
    found = state.services.extras.get(_WHEEL_KEY)
    if isinstance(found, tuple) and found[0] is state:
        wheel: HeartbeatWheel = found[1]
        return wheel
    wheel = HeartbeatWheel(state.settings.heartbeat_s)
    state.services.extras[_WHEEL_KEY] = (state, wheel)
    return wheel


class WsConnection(asyncio.Protocol):
    # __slots__: one of these per socket, and a worker holds tens of thousands (STYLE.md hot path).
    __slots__ = (
        "id",
        "_principal",
        "device_id",
        "codec",
        "protocol",
        "transport",
        "_state",
        "_loop",
        "_last_rx",
        "_heartbeat",
        "_close_deadline",
        "_bucket",
        "_warned",
        "_frame_left",
        "_head",
        "_fragments",
        "_fragment_count",
        "_fragment_text",
        "_dropping",
        "_utf8",
        "outbox",
    )

    def __init__(
        self,
        state: RelayState,
        protocol: ServerProtocol,
        transport: asyncio.Transport,
        connection_id: str,
        principal: Principal,
        device_id: str | None,
        codec: Codec,
    ) -> None:
        self._state = state
        self.protocol = protocol
        self.transport = transport
        self.id = connection_id
        self._principal = principal
        self.device_id = device_id
        self.codec = codec
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._last_rx = now
        self._heartbeat: asyncio.TimerHandle | None = None
        self._close_deadline: asyncio.TimerHandle | None = None
        rate = RateSpec.parse(state.settings.ws_rate)
        self._bucket = TokenBucket(rate.count / rate.period_s, state.settings.ws_burst, now)
        self._warned = False
        # Splitting reads into frames (data_received): bytes left of the frame being fed, and the
        # start of a frame whose length field has not fully arrived yet.
        self._frame_left = 0
        self._head = b""
        # The fragmented message being reassembled (None between messages), its frame count, its
        # type, whether it is being dropped (over the rate budget), and its UTF-8 check.
        self._fragments: bytearray | None = None
        self._fragment_count = 0
        self._fragment_text = False
        self._dropping = False
        self._utf8: codecs.IncrementalDecoder | None = None
        # Frames owed to this socket that could not share its channel's joined bytes (its own
        # frames, see send(), and the broadcasts queued before them), written at the tick's flush
        # (Hub.queue_own) or before anything the protocol writes (Hub.flush_member): order holds.
        self.outbox: list[bytes] = []
        release_handshake(protocol)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Called once the transport is ours and the 101 is in ``data_to_send``."""
        # High-water mark at the outbound bound: asyncio calls pause_writing when a peer falls that
        # far behind, which is also where the slow-consumer check closes it.
        limit = self._state.settings.ws_outbound_limit_bytes
        self.transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self._send_data()
        self._state.registry.add(self)
        metrics.WS_CONNECTIONS_WS.inc()
        for hook in self._state.on_open:
            hook(self)
        heartbeat_wheel(self._state).add(self)
        if self._state.draining:
            # Upgraded while the drain was walking the registry (the credential check awaits):
            # its shard may be done already, so this socket says 1001 itself.
            self.close(CloseCode.GOING_AWAY)

    @property
    def open(self) -> bool:
        return self.protocol.state is OPEN

    @property
    def principal(self) -> Principal:
        return self._principal

    @principal.setter
    def principal(self, principal: Principal) -> None:
        # A live refresh may bring another token or session of the same principal (relay.refresh):
        # the registry's revocation indexes must follow, or revoking the new token would miss us.
        old, self._principal = self._principal, principal
        self._state.registry.reindex(self, old)  # a no-op until start() and after connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent; moves the protocol to CLOSED
        assert self.protocol.state is State.CLOSED
        for handle in (self._heartbeat, self._close_deadline):
            if handle is not None:
                handle.cancel()
        self._heartbeat = self._close_deadline = None
        heartbeat_wheel(self._state).discard(self)
        if self in self._state.registry:
            self._state.registry.discard(self)
            metrics.WS_CONNECTIONS_WS.dec()
            for hook in self._state.on_close:
                hook(self)

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._send_data()
        return None  # let asyncio close the transport

    def pause_writing(self) -> None:
        # Nothing to stop, on purpose: outbound frames come from dispatch and from the hub's
        # synchronous broadcast, which must never wait for one socket. The slow-consumer check
        # after each write bounds what a socket may hold instead.
        pass

    def resume_writing(self) -> None:
        pass

    # -- inbound --------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        if self._head:  # a frame whose length field was cut by the previous read
            data = self._head + data
            self._head = b""
        start, end = 0, len(data)
        while start < end:
            if not self.open:
                # Closing: nothing is dispatched any more (frames after a close are discarded, RFC
                # 6455 1.4), so the protocol may parse the rest at once.
                self._receive(data[start:] if start else data)
                return
            if self._frame_left == 0:
                size = frame_length(data, start)
                if size is None:
                    self._head = data[start:]  # at most 9 bytes
                    return
                self._frame_left = size
            stop = min(end, start + self._frame_left)
            self._frame_left -= stop - start
            self._receive(data if start == 0 and stop == end else data[start:stop])
            start = stop

    def _receive(self, data: bytes) -> None:
        """The ritual (STYLE.md 2) for bytes holding at most one frame while OPEN."""
        self.protocol.receive_data(data)
        events = self.protocol.events_received()
        self._send_data()
        if self.protocol.close_expected():
            self._arm_close_deadline()
        for event in events:
            if isinstance(event, Frame):
                self._on_frame(event)

    def _on_frame(self, frame: Frame) -> None:
        # Control frames (ping, pong, close) were answered by the protocol; they still count as
        # traffic for the heartbeat but not against the message budget.
        if frame.opcode not in _DATA_OPCODES or not self.open:
            return
        if frame.opcode is not Opcode.CONT:  # the first frame of a message
            self._fragment_text = frame.opcode is Opcode.TEXT
            self._fragment_count = 1
            self._dropping = False
        else:
            self._fragment_count += 1
            if self._fragment_count > self._state.settings.ws_max_fragments:
                # 1009, not 1008: the message is too big to process, counted in frames instead of
                # bytes. RFC 6455 7.4.1 keeps 1008 for when nothing more specific fits, and our
                # contract reads 1008 as "credential revoked", which tells a client to drop it.
                self._fail_message(CloseCode.TOO_BIG, "too many fragments")
                return
        if not self._admit():
            # Over the budget: the whole message is dropped. Its remaining fragments are still
            # read, counted and charged (a second excess in a row closes 4029), but not kept.
            self._dropping = True
            self._fragments = self._utf8 = None
            return
        if self._dropping:
            return
        data = frame.data
        if frame.fin and self._fragments is None:  # unfragmented, the common case: no copy
            payload = data if isinstance(data, bytes) else bytes(data)  # the parser gives bytes
            if self._fragment_text:
                try:
                    payload.decode()
                except UnicodeDecodeError as exc:
                    self._fail_message(
                        CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}"
                    )
                    return
            self._on_message(payload)
            return
        if self._fragment_text:
            if self._utf8 is None:
                self._utf8 = _utf8_decoder()
            try:
                self._utf8.decode(data, frame.fin)  # fails at the fragment that breaks UTF-8
            except UnicodeDecodeError as exc:
                self._fail_message(
                    CloseCode.INVALID_DATA, f"{exc.reason} in fragment {self._fragment_count}"
                )
                return
        if self._fragments is None:
            self._fragments = bytearray(data)  # the protocol bounds the total by max_size
        else:
            self._fragments += data
        if frame.fin:
            message = bytes(self._fragments)
            self._fragments = self._utf8 = None
            self._on_message(message)

    def _fail_message(self, code: CloseCode, reason: str) -> None:
        self._fragments = self._utf8 = None
        self.fail(code, reason)

    def _admit(self) -> bool:
        """Inbound rate limit: an error frame on the first excess, 4029 if the flood goes on."""
        if self._bucket.take(self._loop.time()):
            self._warned = False
            return True
        if self._warned:
            self.close(CloseCode.RATE_LIMITED)
            return False
        self._warned = True
        self.send(error_frame(ErrorCode.RATE_LIMIT_EXCEEDED, "too many frames; slow down"))
        return False

    def _on_message(self, data: bytes) -> None:
        try:
            message = self.codec.decode(data)
        except MessageError as exc:
            self.send(error_frame(ErrorCode.VALIDATION_ERROR, exc.message, exc.request_id))
            return
        handler = self._state.handlers.get(message["type"])
        if handler is None:
            self.send(
                error_frame(
                    ErrorCode.VALIDATION_ERROR,
                    f"unknown type {message['type'][:64]!r}",
                    request_id_of(message),
                )
            )
            return
        try:
            result = handler(self, message)
        except Exception:
            log.exception("handler for %r failed", message["type"])
            self.send(
                error_frame(ErrorCode.INTERNAL_ERROR, "internal error", request_id_of(message))
            )
            return
        if result is not None and inspect.isawaitable(result):  # None: answered in place (cheap)
            _ = self._state.spawn(self._await_handler(result, message))

    async def _await_handler(self, result: Any, message: Message) -> None:
        try:
            await result
        except Exception:
            log.exception("handler for %r failed", message["type"])
            self.send(
                error_frame(ErrorCode.INTERNAL_ERROR, "internal error", request_id_of(message))
            )

    # -- outbound -------------------------------------------------------------------------------
    def send(self, message: Message) -> None:
        """Encode one frame and queue it behind what the socket is owed; it is written at the end
        of the loop tick with the socket's other frames, in one write (an op's ack, replies).
        Dropped silently once the socket is no longer OPEN.

        Built like the hub's frames (unmasked, FIN, no extensions: asserted at subscribe, and
        ``negotiate`` offers none), so it skips websockets' per-frame serialization."""
        if not self.open:
            return
        codec = self.codec
        self._state.hub.queue_own(self, frame_bytes(codec.encode(message), binary=codec.binary))

    def slow_consumer(self) -> None:
        """The peer reads slower than we write: disconnect it rather than buffer without bound; it
        resumes from its cursor (realtime.md guarantee 3). Its buffer is full, so the close frame
        may never leave: the transport is aborted after ``SLOW_CLOSE_TIMEOUT_S``."""
        if not self.open:
            return
        metrics.SLOW_CLOSES_WS.inc()
        self.fail(CloseCode.SLOW_CONSUMER)
        if self._close_deadline is not None:
            self._close_deadline.cancel()
        self._close_deadline = self._loop.call_later(SLOW_CLOSE_TIMEOUT_S, self.transport.abort)

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Start the closing handshake (no-op unless OPEN)."""
        if not self.open:
            return
        self.protocol.send_close(code, code.reason() if reason is None else reason)
        self._send_data()
        self._arm_close_deadline()

    def fail(self, code: CloseCode, reason: str | None = None) -> None:
        """Close frame then end of stream, without waiting for the peer's close frame."""
        if self.protocol.state is State.CLOSED:
            return
        self.protocol.fail(code, code.reason() if reason is None else reason)
        self._send_data()
        self._arm_close_deadline()

    def abort(self) -> None:
        self.transport.abort()

    def write_frames(self, frames: list[bytes]) -> None:
        """Write prebuilt frames now, in one write with (and after) everything the socket is owed
        (broadcasts queued this tick, its own queued frames): the inbox's entries."""
        if self.open:
            self._state.hub.flush_member(self, frames)

    def flush_outbox(self) -> None:
        """Write the outbox as one write (the hub's flush); 4008 if that passes the outbound
        bound. The outbox holds what the hub put there in order: use ``send``/``write_frames``."""
        outbox = self.outbox
        if not outbox:
            return
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        if self.transport.is_closing():
            return
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > self._state.settings.ws_outbound_limit_bytes:
            self.slow_consumer()

    def _send_data(self) -> None:
        chunks = self.protocol.data_to_send()
        if not chunks:  # the usual case after data_received: nothing to write now
            return
        # Protocol data (the 101, pongs, pings, close frames) goes after everything queued before
        # it: this socket's broadcast frames and its own queued frames.
        self._state.hub.flush_member(self)
        for data in chunks:
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                # b"" means half-close: the server closes the TCP connection first (RFC 6455 7.1.1).
                self.transport.write_eof()
            else:  # TLS cannot half-close
                self.transport.close()

    # -- timers ---------------------------------------------------------------------------------
    def _arm_close_deadline(self) -> None:
        if self._close_deadline is None:
            self._close_deadline = self._loop.call_later(CLOSE_TIMEOUT_S, self.transport.abort)

    def _on_heartbeat(self) -> None:
        """The wheel's visit, once per ``heartbeat_s``: ping, and watch a silent socket closely."""
        if not self.open:
            return
        interval = self._state.settings.heartbeat_s
        silent_for = self._loop.time() - self._last_rx
        if silent_for >= 2 * interval:
            self.fail(CloseCode.INTERNAL_ERROR, "heartbeat timeout")
            return
        self.protocol.send_ping(os.urandom(4))
        self._send_data()
        if silent_for > interval and self._heartbeat is None:
            # The next visit would come after the 2 x deadline: a timer to the deadline itself.
            self._heartbeat = self._loop.call_later(2 * interval - silent_for, self._check_silence)

    def _check_silence(self) -> None:
        self._heartbeat = None
        if not self.open:
            return
        left = 2 * self._state.settings.heartbeat_s - (self._loop.time() - self._last_rx)
        if left <= 0:
            self.fail(CloseCode.INTERNAL_ERROR, "heartbeat timeout")
        elif left < self._state.settings.heartbeat_s:  # not yet (clock granularity): once more
            self._heartbeat = self._loop.call_later(left, self._check_silence)

"""Sans-I/O core of the client SDK: what a client does with each server frame, without any I/O.

No event loop, no sockets, no clock of its own (callers pass ``now``), no randomness of its own
(``ReconnectPolicy`` takes a ``random.Random``): decoded frames in, application events and frames
to send out, testable synchronously like websockets' own protocol tests. ``relay.client.aio`` glues
it to ``websockets.asyncio.client``; another client (a browser, a mobile app) can follow it as the
reference of realtime.md's client side.

One object per stream, living across reconnects:

* ``InboxProtocol`` (``/ws``): ``hello`` (cursor = inbox head), durable ``event`` frames deduped by
  cursor, cumulative ``ack`` of the highest *processed* cursor (coalesced: at most one every
  ``ack_delay`` seconds or ``ack_batch`` events), ``sync`` from the last cursor after reconnect
  when the server cannot resume by itself, ``synced``, ``reset``, ``filter``, and requests matched
  to their ``reply`` / ``pong`` / ``refreshed`` / ``error`` by ``request_id`` (re-sent with the same
  id after a reconnect: the server answers a repeated ``request_id`` with its first reply).
* ``BookProtocol`` (``/ws/relay/{book_id}``): ``crdt_operation`` deduped by ``seq``, ops sent with
  an ``id`` and re-sent with the same ``id`` until acked (the server acknowledges a re-sent id with
  its first seq), ``synced``, ``reset`` with ``seq`` / ``snapshot_seq``, presence notices.
* ``ReconnectPolicy``: the close-code and refused-upgrade policy with jittered exponential backoff.

The calling ritual, per connection::

    core.connection_made()
    for each decoded frame:  core.receive(frame, now)
    then:                    core.events_received() -> hand out;  core.frames_to_send() -> write
    timers:                  core.next_deadline() / core.on_timer(now)
    application done:        core.mark_processed(position, now)
    socket gone:             core.connection_lost(); policy.after_close(code, reason)

Dedupe is by high-water mark: cursors (and seqs) strictly increase, and one connection never
delivers them out of order (realtime.md "Replay and live delivery never interleave"), so anything
at or below the highest one delivered is a duplicate. A head (``hello.cursor``, ``synced``) below
that mark means the server lost history (a restarted in-memory sequence, a restored store): the
core then emits a ``Reset`` with ``reason="sequence_regressed"`` rather than drop every new event.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from relay.client.errors import (
    ClientError,
    ConnectionLost,
    ConnectionTerminated,
    HandshakeRejected,
    OpRejected,
    RequestError,
)

Message = dict[str, Any]

JSON_SUBPROTOCOL = "switchboard.v1.json"
MSGPACK_SUBPROTOCOL = "switchboard.v1.msgpack"


# -- wire codecs -----------------------------------------------------------------------------------


class FrameError(ValueError):
    """A server frame that is not one object with a string ``type`` (the client drops it)."""


class Codec:
    """One wire format (realtime.md "Encoding"): JSON text frames or MessagePack binary frames.

    ``payload`` values are ``bytes`` inside the SDK; the JSON codec writes them as standard base64
    (the book relay's rule), MessagePack as raw bytes.
    """

    __slots__ = ("subprotocol", "binary")

    def __init__(self, subprotocol: str, binary: bool) -> None:
        self.subprotocol = subprotocol
        self.binary = binary

    def encode(self, frame: Message) -> str | bytes:
        """The frame as one WebSocket message (``str`` for a text frame, ``bytes`` for binary)."""
        if self.binary:
            packed: bytes = msgpack.packb(frame, use_bin_type=True)
            return packed
        payload = frame.get("payload")
        if isinstance(payload, bytes | bytearray | memoryview):
            frame = {**frame, "payload": base64.b64encode(payload).decode("ascii")}
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)

    def decode(self, data: str | bytes) -> Message:
        """One server message as a dict; ``FrameError`` if it is not a frame."""
        try:
            if isinstance(data, str):
                value = json.loads(data)
            elif self.binary:
                value = msgpack.unpackb(data, raw=False)
            else:  # a binary frame on a JSON socket: still try JSON, servers may send either
                value = json.loads(data)
        except (ValueError, RecursionError, msgpack.UnpackException) as exc:
            raise FrameError(
                f"frame is not valid {'MessagePack' if self.binary else 'JSON'}"
            ) from exc
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise FrameError("a frame must be one object with a string 'type'")
        return value


JSON = Codec(JSON_SUBPROTOCOL, binary=False)
MSGPACK = Codec(MSGPACK_SUBPROTOCOL, binary=True)


def codec_for(subprotocol: str | None) -> Codec:
    """The codec the server chose (no subprotocol in the 101 means JSON)."""
    return MSGPACK if subprotocol == MSGPACK_SUBPROTOCOL else JSON


def decode_payload(value: Any) -> bytes | None:
    """An op's ``payload``: raw bytes (MessagePack) or standard base64 (JSON); None if neither."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


# -- credentials -----------------------------------------------------------------------------------


def token_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT, read without verifying it (the server verifies; the client only needs
    ``exp`` to refresh in time). None for opaque credentials (``sbt_…``, ``sbd_…``)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    body = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(body))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def token_expiry(token: str) -> int | None:
    """A JWT's ``exp`` (unix seconds), or None when the credential does not expire or is opaque."""
    claims = token_claims(token)
    exp = None if claims is None else claims.get("exp")
    return exp if isinstance(exp, int) and not isinstance(exp, bool) else None


def refresh_at(token: str, now: float, *, margin_s: float | None = None) -> float | None:
    """When to send ``refresh`` for ``token``: ``margin_s`` before ``exp``.

    The default margin is a quarter of the token's lifetime (``exp - iat``), between 0.5 s and
    60 s: a 15-minute access JWT is refreshed a minute before it expires. None: never (no ``exp``).
    """
    exp = token_expiry(token)
    if exp is None:
        return None
    if margin_s is None:
        claims = token_claims(token) or {}
        iat = claims.get("iat")
        lifetime = exp - iat if isinstance(iat, int) and iat < exp else 900
        margin_s = min(60.0, max(0.5, lifetime / 4))
    return max(now, exp - margin_s)


# -- what the core hands to the application ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame of a ``/ws`` socket. ``cursor`` is the head of the principal's inbox."""

    connection_id: str
    principal: dict[str, Any]
    heartbeat_s: int | None
    cursor: int | None
    raw: Message = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Event:
    """A durable inbox event: ``{"type": "event", "event", "cursor", "data"}``."""

    event: str
    cursor: int
    data: Any
    raw: Message = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Op:
    """A CRDT operation relayed from another device of the book (``payload`` is the ciphertext)."""

    seq: int
    device_id: str | None
    payload: bytes
    timestamp: int | None
    relay_timestamp: int | None
    raw: Message = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Reset:
    """The server cannot deliver what this client missed: reload state (inbox: over REST; book:
    full state exchange with the peers, or the snapshot at ``snapshot_seq`` then catch up).

    ``reason`` is the server's (``history_truncated``) or ``sequence_regressed`` when the client
    saw the server's head go backwards. ``seq`` / ``cursor`` is the head to continue from.
    """

    reason: str | None
    seq: int | None = None
    snapshot_seq: int | None = None
    cursor: int | None = None
    raw: Message = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Synced:
    """Catch-up is complete: everything up to ``position`` (the head) has been delivered."""

    position: int | None


@dataclass(frozen=True, slots=True)
class Notice:
    """An ephemeral frame (presence, ``device.online``, ``typing``, an unmatched ``error``, ...)."""

    frame: Message


@dataclass(frozen=True, slots=True)
class Settled:
    """A request (or op) got its answer: ``result`` (a reply's ``data``, an ack's ``seq``) or
    ``error``."""

    request_id: str
    result: Any = None
    error: ClientError | None = None


Output = Hello | Event | Op | Reset | Synced | Notice | Settled


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- reconnect policy ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a connection ended or could not be opened.

    ``action``: ``"reconnect"`` after ``delay`` seconds (with a token fresh from the getter, as
    always); ``"stop"``: the server ended the session normally; ``"fail"``: stop and raise ``error``.
    """

    action: Literal["reconnect", "stop", "fail"]
    delay: float = 0.0
    error: ClientError | None = None


# Close codes after which reconnecting cannot help (realtime.md "Heartbeats and close codes"):
# revoked / removed (1008), forbidden (4003), and the client's own protocol faults; 1009 too,
# because the frame that was too big would be re-sent on the next connection.
TERMINAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4003})
TOKEN_EXPIRED_CLOSE = 4001
RATE_LIMITED_CLOSE = 4029


class ReconnectPolicy:
    """Close-code policy with jittered exponential backoff ("equal jitter": half the ceiling plus
    a random half, so a fleet spreads out but nobody hammers the server at once).

    * 1000: the server ended the session -> stop.
    * 1001 (drain), 1006 (dropped), 1011, 1012, 1013, 4008 (slow consumer), anything unknown
      -> reconnect after ``base * 2**attempt`` seconds (capped at ``cap``), jittered.
    * 4001 (token expired) -> reconnect at once (jitter up to ``base``): the getter is called
      for every connection, so it is a fresh token.
    * 4029 (rate limited) -> reconnect, waiting at least ``rate_limited_s``.
    * 1008, 4003, 1002, 1003, 1007, 1009, 1010 -> fail with ``ConnectionTerminated``.
    * Upgrade refused: 401 ``TOKEN_EXPIRED`` once -> retry with a fresh token; 401 otherwise,
      400, 403, 404 and other 4xx -> fail with ``HandshakeRejected``; 429 / 503 / 5xx -> reconnect,
      waiting at least ``Retry-After``. Network errors and timeouts -> reconnect with backoff.

    ``connected()`` (called when a socket got its first frame) resets the attempt count.
    """

    def __init__(
        self,
        *,
        base: float = 0.5,
        cap: float = 30.0,
        rate_limited_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.rate_limited_s = rate_limited_s
        self.attempt = 0
        self._rng = rng or random.Random()
        self._expired_refusals = 0

    def connected(self) -> None:
        """A connection succeeded (first server frame received): start backoff from the bottom."""
        self.attempt = 0
        self._expired_refusals = 0

    def backoff(self) -> float:
        """The next jittered delay; each call counts one attempt."""
        ceiling = min(self.cap, self.base * float(2 ** min(self.attempt, 30)))
        self.attempt += 1
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def after_close(self, code: int | None, reason: str = "") -> Decision:
        """The socket closed with ``code`` (None or 1005/1006: no close frame)."""
        if code == 1000:
            return Decision("stop")
        if code in TERMINAL_CLOSE_CODES:
            assert code is not None
            return Decision("fail", error=ConnectionTerminated(code, reason))
        if code == TOKEN_EXPIRED_CLOSE:
            return Decision("reconnect", self._rng.random() * self.base)
        delay = self.backoff()
        if code == RATE_LIMITED_CLOSE:
            delay = max(delay, self.rate_limited_s * (1 + self._rng.random()))
        return Decision("reconnect", delay)

    def after_refusal(
        self,
        status: int,
        code: str | None = None,
        message: str | None = None,
        retry_after: float | None = None,
    ) -> Decision:
        """The upgrade was answered ``status`` (no 101), with the envelope's ``code``."""
        if status == 401 and code == "TOKEN_EXPIRED" and self._expired_refusals == 0:
            # The getter may have handed out a token that expired on the way; one more, fresh.
            self._expired_refusals += 1
            return Decision("reconnect", self._rng.random() * self.base)
        if status in (429, 503) or status >= 500:
            delay = self.backoff()
            if retry_after is not None:
                delay = max(delay, retry_after + self._rng.random() * self.base)
            return Decision("reconnect", delay)
        return Decision("fail", error=HandshakeRejected(status, code, message))

    def after_error(self) -> Decision:
        """The connection could not be opened (refused, reset, DNS, timeout): back off."""
        return Decision("reconnect", self.backoff())


# -- shared stream machinery ----------------------------------------------------------------------


class _Pending:
    __slots__ = ("frame", "resend", "sent")

    def __init__(self, frame: Message, resend: bool) -> None:
        self.frame = frame
        self.resend = resend
        self.sent = False


class _Stream:
    """What both endpoints share: output buffers, readiness, requests, checkpoint coalescing."""

    def __init__(self, *, checkpoint_delay: float, checkpoint_batch: int) -> None:
        self._out: list[Message] = []
        self._events: list[Output] = []
        self.connected = False
        self.ready = False  # the socket's first frame arrived (hello / presence)
        self._requests: OrderedDict[str, _Pending] = OrderedDict()
        self._counter = 0
        self._prefix = secrets.token_hex(3)
        self._checkpoint_delay = checkpoint_delay
        self._checkpoint_batch = max(1, checkpoint_batch)
        self._unsaved = 0
        self._unsaved_since: float | None = None
        self._checkpoint: int | None = None
        self.processed: int | None = None

    # -- buffers -----------------------------------------------------------------------------
    def frames_to_send(self) -> list[Message]:
        """Frames to write, in order (the caller encodes them with the socket's codec)."""
        out, self._out = self._out, []
        return out

    def events_received(self) -> list[Output]:
        """What happened since the last call, in order."""
        events, self._events = self._events, []
        return events

    def take_checkpoint(self) -> int | None:
        """A position to persist in the cursor store, if one is due. The caller saves it *before*
        writing the frames of the same step (an ``ack`` never runs ahead of the store)."""
        value, self._checkpoint = self._checkpoint, None
        return value

    # -- connection lifecycle -----------------------------------------------------------------
    def connection_made(self) -> None:
        """A socket is open (101 received); nothing is sent before its first frame."""
        self.connected = True
        self.ready = False
        self._out.clear()

    def connection_lost(self) -> None:
        """The socket is gone: requests that are re-sent wait for the next one, others fail."""
        self.connected = False
        self.ready = False
        self._out.clear()
        for rid, pending in list(self._requests.items()):
            pending.sent = False
            if not pending.resend:
                del self._requests[rid]
                self._events.append(Settled(rid, error=ConnectionLost("the connection was lost")))

    def _became_ready(self) -> None:
        self.ready = True
        for pending in self._requests.values():
            if not pending.sent:
                pending.sent = True
                self._out.append(pending.frame)

    # -- requests -----------------------------------------------------------------------------
    def new_request_id(self) -> str:
        """A request id unique to this client (``r-<random>-<n>``)."""
        self._counter += 1
        return f"r-{self._prefix}-{self._counter}"

    def request(
        self,
        type: str,
        fields: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        resend: bool = True,
    ) -> str:
        """Queue ``{"type": type, "request_id": …, **fields}``; its answer comes as ``Settled``.

        Sent now if the socket is ready, else on the next one. ``resend``: send it again with the
        same id after a reconnect (the server answers a repeated id with its first reply);
        otherwise it fails with ``ConnectionLost`` when the socket goes.
        """
        rid = request_id or self.new_request_id()
        frame: Message = {**(fields or {}), "type": type, "request_id": rid}
        pending = _Pending(frame, resend)
        self._requests[rid] = pending
        if self.ready:
            pending.sent = True
            self._out.append(frame)
        return rid

    def cancel(self, request_id: str) -> None:
        """Forget a request (timed out or abandoned); a late answer becomes a ``Notice``."""
        self._requests.pop(request_id, None)

    def pending_requests(self) -> list[str]:
        """Ids of the requests still waiting for an answer, oldest first."""
        return list(self._requests)

    def _settle_request(self, frame: Message) -> bool:
        """Match an answer to its request by ``request_id``; False if it answers none."""
        rid = frame.get("request_id")
        if not isinstance(rid, str) or rid not in self._requests:
            return False
        del self._requests[rid]
        kind = frame["type"]
        if kind == "reply":
            if frame.get("ok") is True:
                self._events.append(Settled(rid, result=frame.get("data")))
            else:
                self._events.append(
                    Settled(rid, error=_request_error(frame.get("error"), RequestError))
                )
        elif kind == "error":
            self._events.append(Settled(rid, error=_request_error(frame, RequestError)))
        else:  # pong, refreshed: the frame itself is the answer
            self._events.append(Settled(rid, result=frame))
        return True

    # -- checkpoints (what the cursor store persists) -------------------------------------------
    def _note_processed(self, now: float) -> None:
        self._unsaved += 1
        if self._unsaved_since is None:
            self._unsaved_since = now
        if self._unsaved >= self._checkpoint_batch:
            self._commit()

    def _commit(self) -> None:
        """The processed position is due: checkpoint it (and, for the inbox, ack it)."""
        self._unsaved = 0
        self._unsaved_since = None
        self._checkpoint = self.processed

    def next_deadline(self) -> float | None:
        """When ``on_timer`` must run next (the caller's clock), or None."""
        if self._unsaved_since is None:
            return None
        return self._unsaved_since + self._checkpoint_delay

    def on_timer(self, now: float) -> None:
        """Run what is due at ``now``."""
        if self._unsaved_since is not None and now >= self._unsaved_since + self._checkpoint_delay:
            self._commit()

    def flush(self) -> None:
        """Commit the processed position now (before a clean close)."""
        if self._unsaved_since is not None:
            self._commit()


def _request_error(body: Any, cls: type[RequestError]) -> RequestError:
    body = body if isinstance(body, dict) else {}
    code = _str(body.get("code")) or "UNKNOWN_ERROR"
    message = _str(body.get("message")) or ""
    return cls(code, message, body.get("details"))


def matches(patterns: Iterable[str], event: str) -> bool:
    """Whether ``event`` passes a ``filter``: exact names, ``prefix.*`` or ``*``."""
    for pattern in patterns:
        if pattern == "*" or pattern == event:
            return True
        if pattern.endswith(".*") and event.startswith(pattern[:-1]):
            return True
    return False


# -- /ws: the durable inbox ------------------------------------------------------------------------


class InboxProtocol(_Stream):
    """The client side of ``/ws`` for one principal (and ``device_id``), across reconnects.

    ``cursor``: the last processed cursor from the cursor store (None: start from the server's
    resume point, or ``hello``'s head for a connection without ``device_id``).

    ``device_id``: with one, the server resumes after the device's acked cursor by itself, so no
    ``sync`` is sent on connect (it would replay the same events twice) unless ``sync_on_connect``
    is True. Without one, the connection starts live at ``hello``'s head, so the client sends
    ``sync`` from its last cursor after every reconnect.

    ``filter``: sent after ``hello`` on every connection, and applied locally too (events the
    server sent before it saw the filter are not handed out).

    Acks: ``mark_processed(cursor)`` once the application handled an event; the highest processed
    cursor is acked at most every ``ack_delay`` seconds or ``ack_batch`` events (the server
    re-sends after ``ACK_TIMEOUT``, 5 s by default, so the delay must stay well under that). A
    duplicate of an already processed event is re-acked: the server re-sent it because our ack
    was lost.
    """

    def __init__(
        self,
        *,
        cursor: int | None = None,
        device_id: str | None = None,
        sync_on_connect: bool | None = None,
        filter: Sequence[str] | None = None,
        ack_delay: float = 0.2,
        ack_batch: int = 64,
    ) -> None:
        super().__init__(checkpoint_delay=ack_delay, checkpoint_batch=ack_batch)
        self.device_id = device_id
        self.sync_on_connect = (device_id is None) if sync_on_connect is None else sync_on_connect
        self.filter: tuple[str, ...] | None = None if filter is None else tuple(filter)
        self.delivered: int | None = cursor  # dedupe high-water: highest cursor handed out
        self.processed = cursor
        self.origin: int | None = None  # hello's head when we had no cursor: where we started
        self.hello: Hello | None = None
        self.committed: int | None = cursor  # the last processed cursor checkpointed (ackable)
        self._reacked = False  # a duplicate run was answered with an ack already

    @property
    def position(self) -> int | None:
        """Where this client is: the highest cursor handed out (or where it started)."""
        return self.delivered if self.delivered is not None else self.origin

    @property
    def sync_position(self) -> int | None:
        """What ``sync`` sends: the last processed cursor that is already checkpointed (the server
        takes a ``sync`` cursor as acked, so it must never run ahead of the store), else where
        this client started. Events above it that were handed out already come again and are
        dropped as duplicates."""
        return self.committed if self.committed is not None else self.origin

    def set_filter(self, patterns: Sequence[str] | None) -> None:
        """Narrow delivery to ``patterns`` (``["task.*", "publish"]``); None: everything."""
        self.filter = None if patterns is None else tuple(patterns)
        if self.ready and self.filter is not None:
            self._out.append({"type": "filter", "events": list(self.filter)})

    def sync(self, cursor: int | None = None) -> None:
        """Ask for a replay of everything after ``cursor`` (default: ``sync_position``)."""
        cursor = self.sync_position if cursor is None else cursor
        if self.ready and cursor is not None:
            self._out.append({"type": "sync", "cursor": cursor})

    # -- inbound -------------------------------------------------------------------------------
    def receive(self, frame: Message, now: float) -> None:
        """Handle one decoded server frame."""
        kind = frame["type"]
        if kind == "event":
            self._on_event(frame, now)
        elif kind == "hello":
            self._on_hello(frame)
        elif kind == "synced":
            self._on_synced(frame)
        elif kind == "reset":
            cursor = _int(frame.get("cursor"))
            if cursor is not None:
                self.delivered = cursor
            self._events.append(Reset(_str(frame.get("reason")), cursor=cursor, raw=frame))
        elif kind in ("reply", "pong", "refreshed", "error") and self._settle_request(frame):
            pass
        else:
            self._events.append(Notice(frame))

    def _on_hello(self, frame: Message) -> None:
        hello = Hello(
            connection_id=_str(frame.get("connection_id")) or "",
            principal=principal if isinstance(principal := frame.get("principal"), dict) else {},
            heartbeat_s=_int(frame.get("heartbeat_s")),
            cursor=_int(frame.get("cursor")),
            raw=frame,
        )
        self.hello = hello
        head = hello.cursor
        self._events.append(hello)
        if head is not None and self.delivered is not None and head < self.delivered:
            self._regressed(head, frame)
        if self.position is None and head is not None and self.device_id is None:
            self.origin = head
        self._became_ready()
        if self.filter is not None:
            self._out.append({"type": "filter", "events": list(self.filter)})
        position = self.sync_position
        if self.sync_on_connect and position is not None and (head is None or position < head):
            self._out.append({"type": "sync", "cursor": position})
        if self.committed is not None:
            # Acks sent on the last socket may have been lost with it: say where we are at once,
            # so the server does not wait for ACK_TIMEOUT to re-send what we already have.
            self._send_ack()
            self._reacked = True  # the replay of what this covers needs no more acks

    def _on_event(self, frame: Message, now: float) -> None:
        cursor = _int(frame.get("cursor"))
        name = _str(frame.get("event"))
        if cursor is None or name is None:
            self._events.append(Notice(frame))  # not an event we can order; never acked
            return
        if self.delivered is not None and cursor <= self.delivered:
            if self.committed is not None and cursor <= self.committed and not self._reacked:
                # A re-send: the server did not get our ack. Say it again, once per run of dupes.
                self._reacked = True
                self._send_ack()
            return
        self._reacked = False
        self.delivered = cursor
        if self.filter is not None and not matches(self.filter, name):
            return  # covered by the next cumulative ack
        self._events.append(Event(name, cursor, frame.get("data"), frame))

    def _on_synced(self, frame: Message) -> None:
        head = _int(frame.get("cursor"))
        if head is not None and self.delivered is not None and head < self.delivered:
            self._regressed(head, frame)
        self._events.append(Synced(head))

    def _regressed(self, head: int, frame: Message) -> None:
        """The server's head is behind what we saw: its history restarted. Start over from it."""
        self.delivered = head
        self.processed = head
        self._commit()
        self._events.append(Reset("sequence_regressed", cursor=head, raw=frame))

    # -- application progress -------------------------------------------------------------------
    def mark_processed(self, cursor: int, now: float) -> None:
        """The application handled everything up to ``cursor``: ack it (coalesced)."""
        if self.processed is not None and cursor <= self.processed:
            return
        self.processed = cursor
        self._note_processed(now)

    def reset_done(self, reset: Reset, now: float) -> None:
        """The application reloaded its state after ``reset``: continue from the reset's cursor."""
        if reset.cursor is not None:
            self.processed = reset.cursor
            self._note_processed(now)

    def _commit(self) -> None:
        super()._commit()
        self.committed = self.processed
        self._send_ack()  # when not ready, the next hello acks it

    def _send_ack(self) -> None:
        cursor = self.committed
        if cursor is not None and self.ready:
            self._out.append({"type": "ack", "cursor": cursor})


# -- /ws/relay/{book_id}: the book relay ---------------------------------------------------------

# Op errors after which the op is re-sent (the server did not accept it, nothing was relayed).
TRANSIENT_OP_ERRORS = frozenset({"SERVICE_UNAVAILABLE", "RATE_LIMIT_EXCEEDED", "INTERNAL_ERROR"})


class _OutOp:
    __slots__ = ("frame", "sent", "retry_at", "attempts")

    def __init__(self, frame: Message) -> None:
        self.frame = frame
        self.sent = False
        self.retry_at: float | None = None
        self.attempts = 0


class BookProtocol(_Stream):
    """The client side of ``/ws/relay/{book_id}`` for one device, across reconnects.

    ``seq``: the last processed seq from the store; the next connection asks for ``?since=`` the
    highest seq received (servers without catch-up ignore it; dedupe by seq works either way).

    Outgoing ops always carry an ``id`` (generated when the caller gives none), so an op re-sent
    after a reconnect is acknowledged with its first seq and relayed once. At most
    ``max_in_flight`` ops wait for their ack at a time (the server refuses a socket's ops beyond
    ``WS_BURST``); the others queue here, in order. Transient refusals (``SERVICE_UNAVAILABLE``,
    ``RATE_LIMIT_EXCEEDED``) are retried after ``retry_delay`` (doubling); others settle the op with
    ``OpRejected``. A device never receives its own ops live; in a replay they are recognised by
    their acked seq and dropped.
    """

    def __init__(
        self,
        *,
        seq: int | None = None,
        max_in_flight: int = 64,
        retry_delay: float = 0.5,
        checkpoint_delay: float = 0.5,
        checkpoint_batch: int = 256,
    ) -> None:
        super().__init__(checkpoint_delay=checkpoint_delay, checkpoint_batch=checkpoint_batch)
        self.delivered: int | None = seq
        self.processed = seq
        self.max_in_flight = max(1, max_in_flight)
        self.retry_delay = retry_delay
        self.online: list[str] = []
        self.head: int | None = None
        self._ops: OrderedDict[str, _OutOp] = OrderedDict()
        self._own: set[int] = set()
        # After a reset whose handler restored a snapshot covering up to ``lo``: ops in (lo, hi]
        # come from a catch-up connection (?since=lo) and are accepted once, in order.
        self._window: tuple[int, int] | None = None  # (window high-water, hi)
        self._window_open_on_connect = False

    @property
    def since(self) -> int | None:
        """The ``?since=`` of the next connection."""
        if self._window is not None:
            return self._window[0]
        return self.delivered

    def connection_made(self) -> None:
        super().connection_made()
        self._window_open_on_connect = self._window is not None
        for op in self._ops.values():
            op.sent = False

    def connection_lost(self) -> None:
        super().connection_lost()
        for op in self._ops.values():
            op.sent = False  # unacknowledged: re-sent with the same id on the next socket

    def pending_ops(self) -> list[str]:
        """Ids of the ops not yet acknowledged, in send order."""
        return list(self._ops)

    # -- outbound ------------------------------------------------------------------------------
    def send_op(self, payload: bytes, *, op_id: str | None = None, timestamp: int) -> str:
        """Queue one op (``payload``: the ciphertext); its ack comes as ``Settled(op_id, seq)``."""
        if not payload:
            raise ValueError("an op's payload must not be empty")
        op_id = op_id or "op-" + secrets.token_hex(8)
        if op_id in self._ops:
            raise ValueError(f"op id {op_id!r} is already waiting for its ack")
        frame: Message = {
            "type": "crdt_operation",
            "id": op_id,
            "payload": bytes(payload),
            "timestamp": timestamp,
        }
        self._ops[op_id] = _OutOp(frame)
        self._pump(None)
        return op_id

    def cancel_op(self, op_id: str) -> None:
        """Stop re-sending an op (the caller gave up waiting; it may still have been accepted)."""
        self._ops.pop(op_id, None)

    def _pump(self, now: float | None) -> None:
        """Send queued ops while fewer than ``max_in_flight`` wait for their ack."""
        if not self.ready:
            return
        in_flight = sum(1 for op in self._ops.values() if op.sent)
        for op in self._ops.values():
            if in_flight >= self.max_in_flight:
                break
            if op.sent or (op.retry_at is not None and (now is None or now < op.retry_at)):
                continue
            op.sent = True
            op.retry_at = None
            in_flight += 1
            self._out.append(op.frame)

    # -- inbound -------------------------------------------------------------------------------
    def receive(self, frame: Message, now: float) -> None:
        """Handle one decoded server frame."""
        kind = frame["type"]
        if kind == "crdt_operation":
            self._on_op(frame)
        elif kind == "ack":
            self._on_ack(frame, now)
        elif kind == "error" and isinstance(frame.get("id"), str) and frame["id"] in self._ops:
            self._on_op_error(frame, now)
        elif kind == "presence":
            online = frame.get("online")
            self.online = (
                [d for d in online if isinstance(d, str)] if isinstance(online, list) else []
            )
            self._events.append(Notice(frame))
            if not self.ready:
                self._became_ready()
                self._pump(now)
        elif kind == "synced":
            self._on_synced(frame)
        elif kind == "reset":
            self._on_reset(frame)
        elif kind in ("pong", "refreshed", "error") and self._settle_request(frame):
            pass
        else:
            if kind == "device.online" and isinstance(frame.get("device_id"), str):
                if frame["device_id"] not in self.online:
                    self.online.append(frame["device_id"])
            elif kind == "device.offline" and frame.get("device_id") in self.online:
                self.online.remove(frame["device_id"])
            self._events.append(Notice(frame))

    def _on_op(self, frame: Message) -> None:
        seq = _int(frame.get("seq"))
        payload = decode_payload(frame.get("payload"))
        if seq is None or payload is None:
            self._events.append(Notice(frame))  # cannot be ordered or applied
            return
        window = self._window
        if window is not None and window[0] < seq <= window[1]:
            self._window = (seq, window[1]) if seq < window[1] else None
        elif self.delivered is not None and seq <= self.delivered:
            return
        else:
            self.delivered = seq
            if len(self._own) > 1024:  # own seqs at or below the high-water can never come again
                self._own = {s for s in self._own if s > seq}
        if seq in self._own:
            self._own.discard(seq)
            return  # our own op, replayed
        self._events.append(
            Op(
                seq=seq,
                device_id=_str(frame.get("device_id")),
                payload=payload,
                timestamp=_int(frame.get("timestamp")),
                relay_timestamp=_int(frame.get("relay_timestamp")),
                raw=frame,
            )
        )

    def _on_ack(self, frame: Message, now: float) -> None:
        op_id = frame.get("id")
        seq = _int(frame.get("seq"))
        if not isinstance(op_id, str) or op_id not in self._ops or seq is None:
            self._events.append(Notice(frame))  # an ack we did not ask for (or after a cancel)
            return
        del self._ops[op_id]
        if self.delivered is None or seq > self.delivered:
            self._own.add(seq)
        self._events.append(Settled(op_id, result=seq))
        self._pump(now)

    def _on_op_error(self, frame: Message, now: float) -> None:
        op_id = frame["id"]
        op = self._ops[op_id]
        code = _str(frame.get("code")) or ""
        if code in TRANSIENT_OP_ERRORS:
            op.sent = False
            op.retry_at = now + self.retry_delay * (2 ** min(op.attempts, 6))
            op.attempts += 1
        else:
            del self._ops[op_id]
            self._events.append(Settled(op_id, error=_request_error(frame, OpRejected)))
        self._pump(now)

    def _on_synced(self, frame: Message) -> None:
        head = _int(frame.get("seq"))
        if self._window_open_on_connect:
            # The catch-up connection replayed what the server still had; what it lacked is gone.
            self._window = None
            self._window_open_on_connect = False
        if head is not None:
            self.head = head
            if self.delivered is not None and head < self.delivered:
                self.delivered = head
                self.processed = head
                self._own.clear()
                self._commit()
                self._events.append(Reset("sequence_regressed", seq=head, raw=frame))
        self._events.append(Synced(head))

    def _on_reset(self, frame: Message) -> None:
        head = _int(frame.get("seq"))
        if head is not None:
            self.head = head
            self.delivered = head
            self._own = {s for s in self._own if s > head}
        self._window = None
        self._events.append(
            Reset(
                _str(frame.get("reason")),
                seq=head,
                snapshot_seq=_int(frame.get("snapshot_seq")),
                raw=frame,
            )
        )

    # -- application progress -------------------------------------------------------------------
    def mark_processed(self, seq: int, now: float) -> None:
        """The application applied the op ``seq`` (checkpointed, coalesced)."""
        if self.processed is not None and seq <= self.processed:
            return
        self.processed = seq
        self._note_processed(now)

    def reset_done(self, reset: Reset, covered: int | None, now: float) -> bool:
        """The application handled ``reset``; ``covered``: the seq its state now covers (a
        snapshot's seq) or None (a full state exchange: it has everything up to the head).

        True when a catch-up connection with ``?since=covered`` is needed (the caller reconnects).
        """
        head = reset.seq
        if covered is None or head is None or covered >= head:
            if head is not None:
                self.processed = head
                self._note_processed(now)
            return False
        self._window = (covered, head)
        self.processed = covered
        self._note_processed(now)
        return True

    def next_deadline(self) -> float | None:
        deadlines = [op.retry_at for op in self._ops.values() if op.retry_at is not None]
        base = super().next_deadline()
        if base is not None:
            deadlines.append(base)
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> None:
        super().on_timer(now)
        self._pump(now)

    def _commit(self) -> None:
        super()._commit()
        if self._window is not None:
            self._checkpoint = min(self._window[0], self._checkpoint or self._window[0])


__all__ = [
    "JSON",
    "JSON_SUBPROTOCOL",
    "MSGPACK",
    "MSGPACK_SUBPROTOCOL",
    "BookProtocol",
    "Codec",
    "Decision",
    "Event",
    "FrameError",
    "Hello",
    "InboxProtocol",
    "Message",
    "Notice",
    "Op",
    "Output",
    "ReconnectPolicy",
    "Reset",
    "Settled",
    "Synced",
    "codec_for",
    "decode_payload",
    "matches",
    "refresh_at",
    "token_claims",
    "token_expiry",
]

"""Sans-I/O pieces of the ``/ws`` socket: wire codecs, frame shapes, the inbound rate bucket.

No event loop, no sockets: bytes and dicts in, bytes and dicts out (ruff bans ``asyncio`` here).
The WebSocket framing itself is websockets' Sans-I/O ``ServerProtocol``; ``relay.connection``
glues both to an asyncio transport.

Encodings (realtime.md "Encoding"): without a subprotocol, or with ``switchboard.v1.json``, one
JSON object per text frame; with ``switchboard.v1.msgpack``, one MessagePack map per binary frame.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from typing import Any

import msgpack
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from shared.codes import ErrorCode

JSON_SUBPROTOCOL = Subprotocol("switchboard.v1.json")
MSGPACK_SUBPROTOCOL = Subprotocol("switchboard.v1.msgpack")
SUBPROTOCOLS: list[Subprotocol] = [JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL]

DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_REQUEST_ID = 128

Message = dict[str, Any]


class MessageError(ValueError):
    """An inbound frame that is not a valid message; answered with an ``error`` frame."""

    def __init__(self, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


def select_subprotocol(
    protocol: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """Our first subprotocol the client offers; none offered (or none shared) means JSON.

    websockets' default refuses a client that offers no subprotocol; ours is optional.
    """
    for subprotocol in SUBPROTOCOLS:
        if subprotocol in offered:
            return subprotocol
    return None


def request_id_of(message: Any) -> Any:
    """The ``request_id`` to echo: a short string or an int, else None (never reflect junk)."""
    if not isinstance(message, dict):
        return None
    rid = message.get("request_id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int) or (isinstance(rid, str) and len(rid) <= _MAX_REQUEST_ID):
        return rid
    return None


def json_default(value: Any) -> Any:
    # bytes values (ciphertext payloads) travel as standard base64 in JSON, raw bytes in msgpack.
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot encode {type(value).__name__}")


class Codec:
    """One wire format. ``binary`` says which frame type carries it."""

    __slots__ = ("name", "binary")

    def __init__(self, name: str, binary: bool) -> None:
        self.name = name
        self.binary = binary

    def encode(self, message: Message) -> bytes:
        if self.binary:
            return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]
        return json.dumps(
            message, separators=(",", ":"), ensure_ascii=False, default=json_default
        ).encode()

    def decode(self, data: bytes) -> Message:
        """Decode one frame's payload. Text frames' UTF-8 is checked by the caller (close 1007)."""
        try:
            if self.binary:
                value = msgpack.unpackb(data, raw=False, strict_map_key=True)
            else:
                value = json.loads(data)
        except (ValueError, RecursionError, msgpack.UnpackException) as exc:
            raise MessageError(f"frame is not valid {self.name}") from exc
        if not isinstance(value, dict):
            raise MessageError("a frame must hold one object")
        if not isinstance(value.get("type"), str):
            raise MessageError("missing or invalid 'type'", request_id_of(value))
        return value


JSON = Codec("JSON", binary=False)
MSGPACK = Codec("MessagePack", binary=True)


def codec_for(subprotocol: str | None) -> Codec:
    return MSGPACK if subprotocol == MSGPACK_SUBPROTOCOL else JSON


class TokenBucket:
    """Inbound frame budget: ``rate`` per second, bursts up to ``burst``; the caller gives the clock."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# -- server -> client frames -------------------------------------------------------------------


def hello_frame(
    connection_id: str,
    kind: str,
    principal_id: str,
    device_id: str | None,
    heartbeat_s: float,
    cursor: int,
) -> Message:
    return {
        "type": "hello",
        "connection_id": connection_id,
        "principal": {"kind": kind, "id": principal_id, "device_id": device_id},
        "heartbeat_s": int(heartbeat_s),
        "cursor": cursor,
    }


def pong_frame(request: Message) -> Message:
    frame: Message = {"type": "pong"}
    rid = request_id_of(request)
    if rid is not None:
        frame["request_id"] = rid
    return frame


def error_frame(code: ErrorCode, message: str, request_id: Any = None) -> Message:
    return {"type": "error", "code": str(code), "message": message, "request_id": request_id}

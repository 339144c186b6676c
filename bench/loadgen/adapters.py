"""Targets as adapters: how each server names channels and frames a message.

Every payload carries ``@@<seq:16 hex><perf_counter_ns:16 hex>`` padded to the
payload size, so a sampled socket finds its send time by searching for ``@@`` in
whatever the server wraps around it (a NATS MSG line, a Yjs update, JSON...).
Counting sockets never look: they divide bytes received by `delivery_size`.
"""

from __future__ import annotations

import base64
import json
import random

from .wsproto import OP_BINARY, OP_PONG, OP_TEXT, client_frame, server_header_len

MARK = b"@@"
_STAMP_LEN = len(MARK) + 32


def make_payload(seq: int, ts_ns: int, size: int) -> bytes:
    """`size` bytes: marker, sequence number and send time in hex, then padding."""
    return (b"@@%016x%016x" % (seq, ts_ns)).ljust(size, b".")


def find_stamps(data: bytes) -> list[tuple[int, int]]:
    """Every (seq, send time ns) stamped in `data`; tolerant of binary noise."""
    out: list[tuple[int, int]] = []
    i = data.find(MARK)
    while i >= 0:
        chunk = data[i + 2 : i + _STAMP_LEN]
        try:
            out.append((int(chunk[:16], 16), int(chunk[16:32], 16)))
            i = data.find(MARK, i + _STAMP_LEN)
        except ValueError:
            i = data.find(MARK, i + 1)
    return out


def channel_name(i: int) -> str:
    """Fixed width, so every channel's frames have the same size."""
    return f"c{i:04d}"


class Adapter:
    """A target server. Subclasses override what differs; defaults fit /sub + /pub servers."""

    name = "base"
    default_port = 0
    payload_opcode = OP_TEXT
    # Unsolicited frame sent by every socket every `keepalive_s` (None: not needed).
    keepalive: bytes | None = None
    keepalive_s = 20.0

    def __init__(self, payload_size: int = 100) -> None:
        self.payload_size = payload_size

    def headers(self) -> dict[str, str]:
        return {}

    def sub_path(self, channel: str) -> str:
        return f"/sub/{channel}"

    def pub_path(self, channel: str) -> str:
        return f"/pub/{channel}"

    def sub_init(self, channel: str) -> bytes:
        """Frames a subscriber sends right after the 101."""
        return b""

    def pub_init(self, channel: str) -> bytes:
        return b""

    def pub_frame(self, channel: str, payload: bytes) -> bytes:
        return client_frame(payload, self.payload_opcode)

    def delivery_body(self, channel: str) -> int:
        """Bytes of the frame payload a subscriber receives per message."""
        return self.payload_size

    def delivery_size(self) -> int:
        body = self.delivery_body(channel_name(0))
        return server_header_len(body) + body

    def extract(self, frame: bytes) -> list[tuple[int, int]]:
        return find_stamps(frame)


class WebsocketsAdapter(Adapter):
    """bench/peers/ws_broadcast.py: text frame on /pub/<ch>, broadcast verbatim to /sub/<ch>."""

    name = "websockets"
    default_port = 18701


class NchanAdapter(Adapter):
    """nginx + nchan (bench/peers/nchan.conf): websocket publisher, websocket subscribers."""

    name = "nchan"
    default_port = 18702


class NatsAdapter(Adapter):
    """NATS over websocket: CONNECT/SUB/PUB text protocol inside frames.

    Subscribers receive ``MSG <subject> <sid> <n>\\r\\n<payload>\\r\\n``. NATS may pack
    several MSGs into one frame, which saves frame headers: counting by the
    one-message-per-frame size then under-counts by at most 2 bytes per message.
    """

    name = "nats"
    default_port = 18703
    _connect = b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"echo":false}\r\n'

    def sub_path(self, channel: str) -> str:
        return "/"

    def pub_path(self, channel: str) -> str:
        return "/"

    def sub_init(self, channel: str) -> bytes:
        return client_frame(self._connect + f"SUB {channel} 1\r\n".encode())

    def pub_init(self, channel: str) -> bytes:
        return client_frame(self._connect)

    def pub_frame(self, channel: str, payload: bytes) -> bytes:
        return client_frame(b"PUB %s %d\r\n%s\r\n" % (channel.encode(), len(payload), payload))

    def delivery_body(self, channel: str) -> int:
        return len(f"MSG {channel} 1 {self.payload_size}\r\n") + self.payload_size + 2


class YWebsocketAdapter(Adapter):
    """@y/websocket-server: every socket of a channel joins the room ``/<channel>``.

    The server applies each update to its Y.Doc and broadcasts what its doc emits,
    so updates must be valid. A template made once with pycrdt (a fresh client
    inserting text into root Text "t") is patched per message: a new client id of
    the same varint width and the stamped payload as the text. Every update then
    has the same size; the room's state vector grows by one client per message.
    The publisher's message is messageSync(0) / update(2) / varUint8Array(update).
    Sockets send an unsolicited pong every 20 s: the server drops sockets that do
    not answer its 30 s pings, and counting sockets never read them.
    """

    name = "ywebsocket"
    default_port = 18704
    payload_opcode = OP_BINARY
    keepalive = client_frame(b"", OP_PONG)
    _FIRST_ID = 1 << 28  # client ids in [2^28, 2^32) all take 5 varint bytes

    def __init__(self, payload_size: int = 100) -> None:
        super().__init__(payload_size)
        self._text_len = payload_size - 14  # the update's fixed overhead is 14 bytes
        self._next_id = self._FIRST_ID + random.randrange(1 << 30)
        prefix, suffix = self._template(self._FIRST_ID, b"x" * self._text_len)
        self._prefix, self._suffix = prefix, suffix
        # Self-check: a patched update equals what pycrdt makes for that client + text.
        probe = make_payload(1, 2, payload_size)[: self._text_len]
        if self._update(self._FIRST_ID + 5, probe) != self._pycrdt_update(
            self._FIRST_ID + 5, probe
        ):
            raise RuntimeError("Yjs update template does not match pycrdt's encoding")

    @staticmethod
    def _pycrdt_update(client_id: int, text: bytes) -> bytes:
        from pycrdt import Doc, Text

        doc: Doc = Doc(client_id=client_id)
        doc.get("t", type=Text).insert(0, text.decode("ascii"))
        return bytes(doc.get_update())

    def _template(self, client_id: int, text: bytes) -> tuple[bytes, bytes]:
        update = self._pycrdt_update(client_id, text)
        cid = _varuint(client_id)
        if (
            len(update) != self.payload_size
            or update[2:7] != cid
            or not update.endswith(text + b"\x00")
        ):
            raise RuntimeError(f"unexpected Yjs update layout: {update!r}")
        head = update[:2]
        middle = update[7 : len(update) - len(text) - 1]
        return head + b"%s" + middle, b"\x00"

    def _update(self, client_id: int, text: bytes) -> bytes:
        return self._prefix % _varuint(client_id) + text + self._suffix

    def sub_path(self, channel: str) -> str:
        return f"/{channel}"

    def pub_path(self, channel: str) -> str:
        return f"/{channel}"

    def pub_frame(self, channel: str, payload: bytes) -> bytes:
        self._next_id += 1
        if self._next_id >= 1 << 32:
            self._next_id = self._FIRST_ID
        update = self._update(self._next_id, payload[: self._text_len])
        return client_frame(b"\x00\x02" + _varuint(len(update)) + update, OP_BINARY)

    def delivery_body(self, channel: str) -> int:
        return 2 + len(_varuint(self.payload_size)) + self.payload_size


class SwitchboardAdapter(Adapter):
    """TODO(switchboard): book relay ``/ws/relay/{book_id}``; not runnable until the server exists.

    What is already right (realtime.md): one book = one channel, the publisher
    sends ``{"type":"crdt_operation","payload":<base64>,"timestamp":...}`` text
    frames, subscribers receive ``crdt_operation`` frames with the payload plus
    ``device_id``, ``relay_timestamp`` and ``seq`` (the stamp is found by decoding
    the payload). Still missing, see bench/README.md:
      - credentials per socket (``Authorization: Bearer``): N devices paired into
        one book, made through the REST API before connecting;
      - the settings that raise the protective limits (frames/s per connection,
        connections per device per 10 min) for the publisher and the load;
      - a fixed delivery size: ``seq`` and ``relay_timestamp`` change width, so
        pad them or calibrate bytes per delivery from a sampled socket (or use the
        ``switchboard.v1.msgpack`` subprotocol);
      - skipping the first ``presence`` frame and ``ack`` frames to the sender.
    """

    name = "switchboard"
    default_port = 8080

    def __init__(self, payload_size: int = 100) -> None:
        super().__init__(payload_size)
        raise NotImplementedError(
            "switchboard adapter is a stub (TODO: tokens, book setup, limits) -- see bench/README.md"
        )

    def sub_path(self, channel: str) -> str:
        return f"/ws/relay/{channel}"

    def pub_path(self, channel: str) -> str:
        return f"/ws/relay/{channel}"

    def pub_frame(self, channel: str, payload: bytes) -> bytes:
        body = {
            "type": "crdt_operation",
            "payload": base64.b64encode(payload).decode(),
            "timestamp": 0,
        }
        return client_frame(json.dumps(body, separators=(",", ":")).encode(), OP_TEXT)

    def extract(self, frame: bytes) -> list[tuple[int, int]]:
        try:
            msg = json.loads(frame)
            return (
                find_stamps(base64.b64decode(msg["payload"]))
                if msg.get("type") == "crdt_operation"
                else []
            )
        except (ValueError, KeyError, TypeError):
            return []


def _varuint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


ADAPTERS: dict[str, type[Adapter]] = {
    a.name: a
    for a in (WebsocketsAdapter, NchanAdapter, NatsAdapter, YWebsocketAdapter, SwitchboardAdapter)
}

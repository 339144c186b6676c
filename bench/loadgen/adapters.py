"""Targets as adapters: how each server names channels and frames a message.

Every payload carries ``@@<seq:16 hex><perf_counter_ns:16 hex>`` padded to the
payload size, so a sampled socket finds its send time by searching for ``@@`` in
whatever the server wraps around it (a NATS MSG line, a Yjs update, JSON...).
Counting sockets never look: they divide bytes received by `delivery_size`.
"""

from __future__ import annotations

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

    def headers(self, channel: str, socket: int) -> dict[str, str]:
        """Extra handshake headers of subscriber ``socket`` of ``channel`` (-1: its publisher)."""
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

    def delivery_size_at(self, seq: int) -> int:
        """Bytes of the delivery of message ``seq`` (of its channel); fixed unless overridden."""
        return self.delivery_size()

    def mean_delivery_size(self, first: list[int], last: list[int]) -> float:
        """Mean bytes per delivery of messages ``first[ch] < seq <= last[ch]`` of each channel."""
        if type(self).delivery_size_at is Adapter.delivery_size_at:
            return float(self.delivery_size())
        total = count = 0
        for a, b in zip(first, last, strict=True):
            # Widths change only at a few boundaries: sum runs of equal size, not every seq.
            seq = a + 1
            while seq <= b:
                size = self.delivery_size_at(seq)
                end = min(b, _next_width_boundary(seq) - 1)
                total += size * (end - seq + 1)
                count += end - seq + 1
                seq = end + 1
        return total / count if count else float(self.delivery_size_at(max(last, default=1)))

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
    """Switchboard's book relay ``/ws/relay/{book_id}``, subprotocol ``switchboard.v1.msgpack``.

    One book per channel; every socket is its own E2EE device, a member of the book, with a
    device JWT (``Authorization: Bearer``) made by ``sbsetup`` before the trial and handed to
    this class with ``configure`` (before the load processes fork). The publisher sends
    ``{"type": "crdt_operation", "payload": <raw bytes>, "timestamp": T}`` (no ``id``: no
    dedupe entry per op); subscribers receive the op with ``device_id`` (36-char uuid),
    ``relay_timestamp`` (uint32 until 2106) and ``seq`` added by the server. MessagePack keeps
    the payload raw (no base64) and every field but ``seq`` fixed in width; ``seq`` takes 1, 2,
    3 or 5 bytes (< 128, < 256, < 65536, above), so the bytes of a delivery are a function of
    its seq (``delivery_size_at``), which the session averages over the seqs of each phase.
    Frames that are not deliveries (``presence`` and ``synced`` on connect, ``device.online``
    when another member connects, server pings) carry no stamp: sampled sockets skip them,
    and counting sockets receive them only while connecting, before any phase starts (pings,
    6 bytes per socket per 30 s, are noise below 0.01 %). The publisher's ``ack`` frames are
    read and dropped by ``Publisher``.
    """

    name = "switchboard"
    default_port = 18705
    payload_opcode = OP_BINARY
    subprotocol = "switchboard.v1.msgpack"
    timestamp = 1706860800  # the op's client timestamp: fixed (5 bytes in MessagePack)
    # Sockets answer nothing (counting sockets never parse): an unsolicited pong every 20 s
    # keeps the server's heartbeat (HEARTBEAT_S 30, silent 2x = closed) satisfied.
    keepalive = client_frame(b"", OP_PONG)

    # Set by ``configure`` in the control process before the load processes fork.
    books: list[str] = []
    tokens: list[str] = []
    subs_per_channel = 0
    channels = 0

    @classmethod
    def configure(cls, books: list[str], tokens: list[str], subs_per_channel: int) -> None:
        cls.books, cls.tokens = books, tokens
        cls.channels, cls.subs_per_channel = len(books), subs_per_channel

    def __init__(self, payload_size: int = 100) -> None:
        super().__init__(payload_size)
        import time as _time

        import msgpack

        self._packb = msgpack.packb
        probe = {
            "type": "crdt_operation",
            "payload": b"x" * payload_size,
            "timestamp": self.timestamp,
            "device_id": "00000000-0000-0000-0000-000000000000",
            "relay_timestamp": int(_time.time()),
        }
        self._base = len(msgpack.packb(probe, use_bin_type=True))  # without "seq"
        self._seq_overhead = len(msgpack.packb("seq"))

    def _device(self, channel: str, socket: int) -> int:
        ch = int(channel[1:])
        if socket < 0:  # the channel's publisher
            return self.channels * self.subs_per_channel + ch
        return ch * self.subs_per_channel + socket

    def headers(self, channel: str, socket: int) -> dict[str, str]:
        if not self.tokens:
            raise RuntimeError("SwitchboardAdapter.configure was not called (no tokens)")
        return {
            "Authorization": f"Bearer {self.tokens[self._device(channel, socket)]}",
            "Sec-WebSocket-Protocol": self.subprotocol,
        }

    def _book(self, channel: str) -> str:
        return self.books[int(channel[1:])]

    def sub_path(self, channel: str) -> str:
        return f"/ws/relay/{self._book(channel)}"

    def pub_path(self, channel: str) -> str:
        return f"/ws/relay/{self._book(channel)}"

    def pub_frame(self, channel: str, payload: bytes) -> bytes:
        body = {"type": "crdt_operation", "payload": payload, "timestamp": self.timestamp}
        return client_frame(self._packb(body, use_bin_type=True), OP_BINARY)

    def delivery_body_at(self, seq: int) -> int:
        return self._base + self._seq_overhead + len(self._packb(seq))

    def delivery_body(self, channel: str) -> int:
        return self.delivery_body_at(1)

    def delivery_size_at(self, seq: int) -> int:
        body = self.delivery_body_at(seq)
        return server_header_len(body) + body


def _next_width_boundary(seq: int) -> int:
    """The smallest integer above ``seq`` where a MessagePack uint may change width."""
    for bound in (128, 256, 1 << 16, 1 << 32):
        if seq < bound:
            return bound
    return 1 << 64


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

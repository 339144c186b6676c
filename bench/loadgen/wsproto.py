"""The little of RFC 6455 a load generator needs, written by hand.

Client frames are masked with the all-zero key: the mask bit is set as the RFC
requires, and XOR with zero leaves the payload as is, so building a frame costs
one concatenation. Server frames are parsed only on sampled sockets.
"""

from __future__ import annotations

import struct

# Fixed key: its accept value is the RFC 6455 example, so checking it is one compare.
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_ZERO_MASK = b"\x00\x00\x00\x00"


def handshake_request(
    host: str, port: int, path: str, headers: dict[str, str] | None = None
) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY.decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


class HandshakeError(Exception):
    """The server did not answer the upgrade with a valid 101."""


def check_handshake(head: bytes) -> None:
    """Raise unless `head` (status line + headers, without the blank line) is a valid 101."""
    status, _, rest = head.partition(b"\r\n")
    if not status.startswith(b"HTTP/1.1 101"):
        raise HandshakeError(status.decode("latin-1"))
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            if value.strip() != WS_ACCEPT:
                raise HandshakeError("bad Sec-WebSocket-Accept")
            return
    raise HandshakeError("no Sec-WebSocket-Accept")


def client_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One final, masked (zero key) client frame."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


def server_header_len(payload_len: int) -> int:
    """Size of an unmasked server frame header for a payload of this length."""
    return 2 if payload_len < 126 else 4 if payload_len < 65536 else 10


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Pop every complete (unmasked) frame from `buf`; return (opcode, payload) pairs."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(buf)
    while end - pos >= 2:
        b1 = buf[pos + 1]
        n = b1 & 0x7F
        hl = 2
        if n == 126:
            if end - pos < 4:
                break
            n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            hl = 4
        elif n == 127:
            if end - pos < 10:
                break
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            hl = 10
        if b1 & 0x80:  # a masked server frame is a protocol error; skip the key anyway
            hl += 4
        if end - pos < hl + n:
            break
        out.append((buf[pos] & 0x0F, bytes(buf[pos + hl : pos + hl + n])))
        pos += hl + n
    del buf[:pos]
    return out

"""Sans-I/O reader of an HTTP/1.1 request head: only what the one-port router needs.

The relay reads the head of the first request on a connection to decide who serves it: a
WebSocket upgrade on ``/ws`` or ``/ws/...`` stays in the relay, anything else goes to the aiohttp
app together with every byte read so far (see ``relay.handoff``). This module takes bytes and gives
values; it does no I/O and imports no event loop (h11's rule: "no I/O code whatsoever"), so it is
tested byte by byte without sockets.

It parses the request line and the header fields, nothing else. It is deliberately not a full
HTTP parser: the body, chunking and the following pipelined requests are aiohttp's (or, for an
upgrade, websockets') business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs

HEAD_END = b"\r\n\r\n"

# RFC 9110 token characters for methods and field names.
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")


class HeadError(ValueError):
    """The request head is not valid HTTP/1.x; the connection gets 400 and is closed."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, value), in arrival order

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def query_param(self, name: str) -> str | None:
        """First value of query parameter ``name``, or None."""
        values = parse_qs(self.query, keep_blank_values=True).get(name)
        return values[0] if values else None

    @property
    def is_websocket_upgrade(self) -> bool:
        if self.method != "GET":
            return False
        upgrade = self.header("upgrade") or ""
        return any(t.strip().lower() == "websocket" for t in upgrade.split(","))

    @property
    def wants_relay(self) -> bool:
        """A WebSocket upgrade on ``/ws`` or ``/ws/...``: the relay serves it, not aiohttp."""
        path = self.path
        return self.is_websocket_upgrade and (path == "/ws" or path.startswith("/ws/"))


def find_head_end(buffer: bytes | bytearray, searched: int = 0) -> int:
    """Offset just past the blank line that ends the head, or -1.

    ``searched`` is how many bytes an earlier call already looked at, so bytes arriving one at a
    time cost O(n) overall rather than O(n^2).
    """
    index = buffer.find(HEAD_END, max(0, searched - len(HEAD_END) + 1))
    return -1 if index < 0 else index + len(HEAD_END)


def parse_head(head: bytes) -> RequestHead:
    """Parse a complete head (up to and including the blank line)."""
    # RFC 9112 section 2.2: a server SHOULD ignore at least one empty line before the request line.
    lines = head.lstrip(b"\r\n").split(b"\r\n")
    try:
        method, target, version = lines[0].split(b" ")
    except ValueError as exc:
        raise HeadError("malformed request line") from exc
    if not _TOKEN.match(method) or not _VERSION.match(version) or not target:
        raise HeadError("malformed request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):  # also refuses obsolete line folding
            raise HeadError("malformed header field")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError as exc:
        raise HeadError("request target is not ASCII") from exc
    return RequestHead(method.decode("ascii"), target_text, version.decode("ascii"), tuple(headers))

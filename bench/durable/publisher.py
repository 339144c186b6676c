"""``POST /api/v1/publish`` as raw pipelined HTTP/1.1 on asyncio Protocols (uvloop).

Each connection is keep-alive and carries up to ``depth`` requests in flight, written
back-to-back (pipelining) and answered in order; answers are split by ``Content-Length`` (the
server always sends it) and only the status code is read. A request is built from a per-user
prefix (request line, ``Authorization: Bearer <that user's token>``, headers) and a small JSON
body: ``{"type":"bench","data":{"ts":<monotonic ns at send>,"seq":N,"pad":"xx.."}}``. Each
publish goes to one user, round-robin, with that user's own token (the default target).

* ``run_peak``: closed loop, every connection kept at ``depth`` in flight: "as fast as the
  server keeps up", with a bounded queue (connections x depth).
* ``run_paced``: open loop at a fixed rate; a connection already at ``max_inflight`` is skipped,
  and requests that found every connection full are counted (``deficit``) rather than sent late.

aiohttp serves one request at a time per connection, so server-side concurrency (what the
group commit can batch) is the number of connections; pipelining only hides the round trip.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import time
from array import array
from typing import Any

_CL = re.compile(rb"[Cc]ontent-[Ll]ength: *(\d+)")


class Counts:
    def __init__(self, users: int) -> None:
        self.sent = 0
        self.ok = 0  # 202
        self.statuses: collections.Counter[bytes] = collections.Counter()
        self.first_error = ""
        self.per_user = [0] * users  # 202s per user (what each of its devices must receive)
        self.http_latency_ns = array("q")  # send -> 202 (this interval)
        self.deficit = 0


class HttpConn(asyncio.Protocol):
    def __init__(self, pub: Publisher) -> None:
        self.pub = pub
        self.transport: Any = None
        self.buf = bytearray()
        self.inflight: collections.deque[tuple[int, int]] = collections.deque()  # (ts, user)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        pub = self.pub
        c = pub.counts
        now = time.monotonic_ns()
        answered = 0
        while True:
            h = buf.find(b"\r\n\r\n", pos)
            if h < 0:
                break
            m = _CL.search(buf, pos, h)
            n = int(m.group(1)) if m is not None else 0
            if end < h + 4 + n:
                break
            status = bytes(buf[pos + 9 : pos + 12])
            ts, user = self.inflight.popleft()
            if status == b"202":
                c.ok += 1
                c.per_user[user] += 1
                c.http_latency_ns.append(now - ts)
            else:
                c.statuses[status] += 1
                if not c.first_error:
                    c.first_error = bytes(buf[pos : h + 4 + n])[-600:].decode("latin-1")
            pos = h + 4 + n
            answered += 1
        if pos:
            del buf[:pos]
        if answered and pub.closed_loop:
            pub.refill(self, answered)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pub.lost += 1


class Publisher:
    def __init__(
        self, host: str, port: int, tokens: list[str], *, payload: int = 100, connections: int = 64,
        depth: int = 4,
    ) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.prefixes = [
            (
                f"POST /api/v1/publish HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: "
            ).encode()
            for t in tokens
        ]
        self.users = len(tokens)
        self.pad = b"x" * max(0, payload - 40)
        self.connections = connections
        self.depth = depth
        self.conns: list[HttpConn] = []
        self.counts = Counts(self.users)
        self.seq = 0
        self.closed_loop = False
        self.lost = 0
        self._rr = 0

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.connections):
            _, proto = await loop.create_connection(lambda: HttpConn(self), self.host, self.port)
            await proto.ready
            self.conns.append(proto)

    def _request(self, conn: HttpConn) -> bytes:
        self.seq += 1
        seq = self.seq
        user = seq % self.users
        ts = time.monotonic_ns()
        body = b'{"type":"bench","data":{"ts":%d,"seq":%d,"pad":"%s"}}' % (ts, seq, self.pad)
        conn.inflight.append((ts, user))
        self.counts.sent += 1
        return b"%s%d\r\n\r\n%s" % (self.prefixes[user], len(body), body)

    def refill(self, conn: HttpConn, n: int) -> None:
        if conn.lost:
            return
        conn.transport.write(b"".join([self._request(conn) for _ in range(n)]))

    async def run_peak(self, seconds: float) -> None:
        self.closed_loop = True
        for conn in self.conns:
            self.refill(conn, self.depth - len(conn.inflight))
        await asyncio.sleep(seconds)
        self.closed_loop = False

    async def run_paced(self, seconds: float, rate: float, max_inflight: int, tick: float = 0.002) -> None:
        """Send ``rate`` requests/s for ``seconds``, spread over the connections."""
        self.closed_loop = False
        t0 = time.monotonic()
        end = t0 + seconds
        done = 0
        conns = self.conns
        k = len(conns)
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = int(rate * (now - t0)) - done
            if due > 0:
                batches: dict[int, list[bytes]] = {}
                for _ in range(due):
                    for _try in range(k):
                        self._rr = (self._rr + 1) % k
                        conn = conns[self._rr]
                        if not conn.lost and len(conn.inflight) < max_inflight:
                            break
                    else:
                        self.counts.deficit += 1
                        continue
                    batches.setdefault(self._rr, []).append(self._request(conn))
                for i, reqs in batches.items():
                    conns[i].transport.write(b"".join(reqs))
                done += due
            await asyncio.sleep(tick)

    def outstanding(self) -> int:
        return sum(len(c.inflight) for c in self.conns if not c.lost)

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.outstanding() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.outstanding() == 0

    def take_latencies(self) -> array:  # type: ignore[type-arg]
        lat, self.counts.http_latency_ns = self.counts.http_latency_ns, array("q")
        return lat

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()

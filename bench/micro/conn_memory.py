"""Memory of one idle authenticated book-relay socket, server side: what it is made of.

    .venv/bin/python -m bench.micro.conn_memory [--sockets 2000] [--top 25]

Starts the real server in this process (SQLite in a temporary DATA_DIR, in-process broker),
makes devices and books of 10 members straight in the store, opens ``--sockets`` relay sockets
from a forked process (raw asyncio clients, msgpack subprotocol) and reports, per socket:

* Python allocations of the server side (``tracemalloc``; allocations whose traceback passes
  through this file, i.e. the clients, are left out), grouped by the line that made them;
* live objects by type (``gc``);
* RSS growth of the server process.

The clients run in a forked process, so everything measured here is the server's.

Not a test, gates nothing. bench/micro/README.md has the figures and what they led to.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from bench.loadgen import sbsetup
from bench.loadgen.wsproto import check_handshake, handshake_request
from relay.server import start_server
from shared.config import load_settings

BOOK_SIZE = 10


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class Client(asyncio.Protocol):
    """Handshake, then read and drop everything (an idle device)."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.head = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.ready.done():
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            check_handshake(self.head.partition(b"\r\n\r\n")[0])
            self.head = b""
            self.ready.set_result(None)


async def make_devices(db: Any, n: int) -> tuple[list[str], list[str]]:
    """n devices in books of BOOK_SIZE, straight into the store; (tokens, book per socket)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    now_ms = int(time.time() * 1000)
    tokens, books = [], []
    book = ""
    for i in range(n):
        key = Ed25519PrivateKey.generate()
        device_id = str(uuid.uuid4())
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        await db.execute(
            "INSERT INTO devices (id, public_key, platform, created_at) VALUES ($1, $2, 'bench', $3)",
            device_id, sbsetup._b64(public), now_ms,
        )  # fmt: skip
        if i % BOOK_SIZE == 0:
            book = str(uuid.uuid4())
            await db.execute(
                "INSERT INTO books (id, created_by_device, created_at) VALUES ($1, $2, $3)",
                book, device_id, now_ms,
            )  # fmt: skip
        await db.execute(
            "INSERT INTO book_members (book_id, device_id, joined_at) VALUES ($1, $2, $3)",
            book, device_id, now_ms,
        )  # fmt: skip
        tokens.append(sbsetup.device_token(device_id, sbsetup._b64(key.private_bytes_raw()), int(time.time())))
        books.append(book)
    return tokens, books


async def open_clients(port: int, tokens: list[str], books: list[str]) -> list[Client]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(100)
    clients: list[Client] = []

    async def one(token: str, book: str) -> None:
        request = handshake_request(
            "127.0.0.1", port, f"/ws/relay/{book}",
            {"Authorization": f"Bearer {token}", "Sec-WebSocket-Protocol": "switchboard.v1.msgpack"},
        )  # fmt: skip
        async with sem:
            _, client = await loop.create_connection(lambda: Client(request), "127.0.0.1", port)
            await asyncio.wait_for(client.ready, 30)
        clients.append(client)

    await asyncio.gather(*(one(t, b) for t, b in zip(tokens, books, strict=True)))
    return clients


def client_process(port: int, tokens: list[str], books: list[str]) -> tuple[int, Any]:
    """Fork a process that opens the sockets, reports the seconds it took, and holds them."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def run() -> None:
        async def hold() -> None:
            t0 = time.perf_counter()
            clients = await open_clients(port, tokens, books)
            child.send(time.perf_counter() - t0)
            await asyncio.get_running_loop().run_in_executor(None, child.recv)
            for c in clients:
                c.transport.close()

        uvloop.run(hold())
        os._exit(0)

    proc = ctx.Process(target=run, daemon=True)
    proc.start()
    return proc, parent


def object_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


async def main(sockets: int, top: int, frames: int) -> None:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            env={},
            data_dir=tmp,
            host="127.0.0.1",
            port=0,
            log_level="WARNING",
            rate_relay_connect="1000000/600",
            max_handshakes_per_ip=100000,
        )
        server = await start_server(settings)
        try:
            tokens, books = await make_devices(server.services.db, sockets)
            # Warm up every code path once (imports, caches, first-use allocations).
            proc, pipe = client_process(server.port, tokens[:BOOK_SIZE], books[:BOOK_SIZE])
            await loop.run_in_executor(None, pipe.recv)
            await asyncio.sleep(0.5)
            gc.collect()
            tracemalloc.start(frames)
            before_objects = object_counts()
            before_snap = tracemalloc.take_snapshot()
            before_rss = rss_kb()
            proc2, pipe2 = client_process(server.port, tokens[BOOK_SIZE:], books[BOOK_SIZE:])
            took = await loop.run_in_executor(None, pipe2.recv)
            await asyncio.sleep(1.0)
            gc.collect()
            after_snap = tracemalloc.take_snapshot()
            after_objects = object_counts()
            after_rss = rss_kb()
            n = len(tokens) - BOOK_SIZE
            print(f"{n} sockets opened in {took:.1f}s ({n / took:,.0f}/s, tracemalloc on)")
            print(f"server RSS growth: {(after_rss - before_rss) / n:.2f} KB/socket")
            diff = after_snap.compare_to(before_snap, "traceback" if frames > 1 else "lineno")
            total = sum(d.size_diff for d in diff)
            print(f"server-side Python allocations: {total / n:,.0f} bytes/socket")
            for d in diff[:top]:
                where = " < ".join(
                    f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
                    for f in list(d.traceback)[:frames]
                )
                print(f"  {d.size_diff / n:8.0f} B  {d.count_diff / n:6.2f} blocks  {where}")
            print("live objects per socket (server):")
            for name, count in (after_objects - before_objects).most_common(top):
                print(f"  {count / n:6.2f}  {name}")
            for pp in (pipe, pipe2):
                pp.send("stop")
            proc.join(5)
            proc2.join(5)
        finally:
            tracemalloc.stop()
            await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--frames", type=int, default=1, help="traceback depth of allocations")
    args = parser.parse_args()
    uvloop.run(main(args.sockets + BOOK_SIZE, args.top, args.frames))

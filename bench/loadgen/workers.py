"""Load processes: each opens its share of counting subscribers and idles.

The control process forks them (before its own event loop exists) and talks to
them over a Pipe: "go" -> ("connected", ok, failed, seconds, first error) ->
"stop" -> ("stopped",). Byte counts go through shared memory, two slots per
worker: [bytes received, sockets lost]. A worker also stops on its own when the
pipe closes (the control process died) or after `max_seconds`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from .adapters import ADAPTERS, channel_name
from .clients import CountingSub, open_socket
from .wsproto import handshake_request


@dataclass(frozen=True)
class WorkerSpec:
    adapter: str
    payload_size: int
    host: str
    port: int
    sockets: list[int]  # global subscriber indexes: socket i % subs of channel i // subs
    subs_per_channel: int
    first_index: int  # global index of the first socket (spreads source addresses)
    src_addrs: list[str]
    rcvlowat: int
    concurrency: int
    timeout: float
    max_seconds: float


class Commands:
    """Pipe messages as an asyncio queue; EOF reads as "stop"."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(conn.fileno(), self._read)

    def _read(self) -> None:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            msg = ("stop",)
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.queue.put_nowait(msg)

    async def get(self, timeout: float) -> tuple[Any, ...]:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return ("timeout",)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.conn.fileno())


async def connect_counting(
    spec: WorkerSpec, counters: Any, slot: int, opened: list[CountingSub] | None = None
) -> tuple[list[CountingSub], list[BaseException]]:
    """Open the worker's sockets; each is appended to ``opened`` as soon as it is open."""
    adapter = ADAPTERS[spec.adapter](spec.payload_size)
    sem = asyncio.Semaphore(spec.concurrency)
    opened = [] if opened is None else opened

    async def one(i: int, index: int) -> None:
        ch, k = divmod(index, spec.subs_per_channel)
        name = channel_name(ch)
        request = handshake_request(
            spec.host, spec.port, adapter.sub_path(name), adapter.headers(name, k)
        )
        init = adapter.sub_init(name)
        src = spec.src_addrs[(spec.first_index + i) % len(spec.src_addrs)]
        async with sem:
            proto = await open_socket(
                lambda: CountingSub(request, init, counters, slot, spec.rcvlowat),
                spec.host,
                spec.port,
                src,
                spec.timeout,
            )
        assert isinstance(proto, CountingSub)
        opened.append(proto)

    results = await asyncio.gather(
        *(one(i, x) for i, x in enumerate(spec.sockets)), return_exceptions=True
    )
    return opened, [r for r in results if isinstance(r, BaseException)]


async def keepalive(protos: list[Any], frame: bytes, every: float) -> None:
    """Every socket of ``protos`` (a list that grows while connecting) sends ``frame`` every
    ``every`` s: started before the first connect, because connecting 15,000 sockets may take
    longer than a server's idle timeout (Switchboard: 2 x HEARTBEAT_S)."""
    while True:
        await asyncio.sleep(every)
        for p in list(protos):
            if p.transport is not None and not p.lost:
                p.transport.write(frame)


async def _worker(conn: Connection, spec: WorkerSpec, counters: Any, slot: int) -> None:
    deadline = time.monotonic() + spec.max_seconds
    cmds = Commands(conn)
    protos: list[CountingSub] = []
    ka: asyncio.Task[None] | None = None
    try:
        if (await cmds.get(deadline - time.monotonic()))[0] != "go":
            return
        adapter = ADAPTERS[spec.adapter]
        if adapter.keepalive is not None:
            ka = asyncio.create_task(keepalive(protos, adapter.keepalive, adapter.keepalive_s))
        t0 = time.perf_counter()
        _, failures = await connect_counting(spec, counters, slot, protos)
        elapsed = time.perf_counter() - t0
        conn.send(
            (
                "connected",
                len(protos),
                len(failures),
                elapsed,
                repr(failures[0]) if failures else "",
            )
        )
        await cmds.get(max(0.0, deadline - time.monotonic()))
    finally:
        if ka is not None:
            ka.cancel()
        for p in protos:
            if p.transport is not None:
                p.transport.close()
        await asyncio.sleep(0.05)
        cmds.close()
        try:
            conn.send(("stopped",))
        except OSError:
            pass


def worker_main(conn: Connection, spec: WorkerSpec, counters: Any, slot: int) -> None:
    try:
        uvloop.run(_worker(conn, spec, counters, slot))
    finally:
        conn.close()
        os._exit(0)  # skip inherited atexit handlers of the forking process


class WorkerHandle:
    """Control-side end of one load process."""

    def __init__(self, spec: WorkerSpec, counters: Any, slot: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.spec = spec
        self.slot = slot
        self.proc = ctx.Process(target=worker_main, args=(child, spec, counters, slot), daemon=True)
        self.proc.start()
        child.close()
        self._cmds: Commands | None = None

    def attach(self) -> None:
        """Call inside the control loop."""
        self._cmds = Commands(self.conn)

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    async def recv(self, timeout: float) -> tuple[Any, ...]:
        assert self._cmds is not None
        return await self._cmds.get(timeout)

    def detach(self) -> None:
        if self._cmds is not None:
            self._cmds.close()
            self._cmds = None

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the process; end it (by pid) if it did not stop."""
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()

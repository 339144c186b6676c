"""Device sockets on ``/ws`` for the load processes: hand-written handshake, cheap cumulative acks.

A ``Device`` is a raw ``asyncio.Protocol`` (uvloop). It walks the frame headers of what it reads
(no copy of a payload, no JSON decode of an event) and takes each event's cursor with one
anchored regex match on the frame's first bytes: the server encodes ``{"type":"event",
"event":...,"cursor":N,"data":...}`` in that key order (``Entry.frame``). Non-event frames
(``hello``, ``synced``, ``reset``, ``error``) are rare and decoded as JSON. Acks are cumulative
(realtime.md): one timer per process writes ``{"type":"ack","cursor":<highest>}`` every
``ack_every`` seconds to each device that processed something new since its last ack.

Sampled devices also find ``"ts":<monotonic ns>`` (the publisher's send time inside ``data``)
and record publish->delivery latency. ``time.monotonic_ns`` is CLOCK_MONOTONIC, the same clock in
every process of the machine, so the publisher and the devices may live in different processes.

Load processes are forked by the control process and driven over a Pipe, like
``bench/loadgen/workers.py``: "go" -> ("connected", ok, failed, seconds, first error); "mark" ->
("mark", counters..., latencies); "stop". EOF on the pipe (the control process died) or
``max_seconds`` also stops them.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import socket
import sys
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadgen.wsproto import (  # noqa: E402
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    check_handshake,
    client_frame,
    handshake_request,
)

IP_BIND_ADDRESS_NO_PORT = 24
_EVENT = re.compile(rb'\{"type":"event","event":"[^"]*","cursor":(\d+),')
_TS = re.compile(rb'"ts":(\d+)')


class Commands:
    """Pipe messages as an asyncio queue; EOF reads as "stop" (like bench/loadgen/workers.py,
    whose reader also takes an OSError for EOF; this one says which error it was and keeps the
    pipe blocking)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(conn.fileno(), self._read)
        # uvloop makes a watched fd non-blocking; a message bigger than the pipe buffer (a
        # mark with many latencies) must still be read and written whole.
        os.set_blocking(conn.fileno(), True)

    def _read(self) -> None:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError) as exc:
            msg = ("stop", repr(exc))
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.queue.put_nowait(msg)

    async def get(self, timeout: float) -> tuple[Any, ...]:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return ("timeout",)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.conn.fileno())


class Counters:
    """What one load process saw (since the last mark, except the totals)."""

    __slots__ = ("events", "dups", "other", "errors", "lost", "acks", "latency_ns", "processed")

    def __init__(self) -> None:
        self.events = 0  # event frames received (duplicates included)
        self.dups = 0  # event frames whose cursor the device had already processed
        self.other = 0  # synced, pong, ...
        self.errors: list[str] = []  # error / reset frames (first few)
        self.lost = 0  # sockets closed after their hello
        self.acks = 0  # ack frames written
        self.latency_ns = array("q")
        self.processed = 0  # sum over devices of the highest cursor processed (total)


class Device(asyncio.Protocol):
    __slots__ = (
        "request", "counters", "sampled", "transport", "opened", "buf", "hello",
        "processed", "acked", "dirty", "pending",
    )  # fmt: skip

    def __init__(self, request: bytes, counters: Counters, sampled: bool, pending: list[Device]):
        self.request = request
        self.counters = counters
        self.sampled = sampled
        self.pending = pending  # the process's devices owing an ack
        self.transport: Any = None
        self.opened = False
        self.buf = bytearray()
        self.hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.processed = 0
        self.acked = 0
        self.dirty = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.opened:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                check_handshake(bytes(buf[:end]))
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits for the hello
                if not self.hello.done():
                    self.hello.set_exception(
                        RuntimeError(bytes(buf[: min(len(buf), 400)]).decode("latin-1"))
                    )
                self.transport.close()
                del exc
                return
            del buf[: end + 4]
            self.opened = True
        c = self.counters
        pos, end = 0, len(buf)
        now = 0
        while end - pos >= 2:
            n = buf[pos + 1] & 0x7F
            hl = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if end - pos < hl + n:
                break
            op = buf[pos] & 0x0F
            start, stop = pos + hl, pos + hl + n
            pos = stop
            if op == OP_TEXT:
                m = _EVENT.match(buf, start, stop)
                if m is not None:
                    c.events += 1
                    cursor = int(m.group(1))
                    if cursor <= self.processed:
                        c.dups += 1
                        continue
                    c.processed += cursor - self.processed
                    self.processed = cursor
                    if not self.dirty:
                        self.dirty = True
                        self.pending.append(self)
                    if self.sampled:
                        t = _TS.search(buf, m.end(), stop)
                        if t is not None:
                            now = now or time.monotonic_ns()
                            c.latency_ns.append(now - int(t.group(1)))
                    continue
                self._other(json.loads(bytes(buf[start:stop])))
            elif op == OP_PING:
                self.transport.write(client_frame(bytes(buf[start:stop]), OP_PONG))
            elif op == OP_CLOSE:
                self.transport.close()
        del buf[:pos]

    def _other(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "hello":
            if not self.hello.done():
                self.hello.set_result(frame)
            return
        self.counters.other += 1
        if kind in ("error", "reset") and len(self.counters.errors) < 5:
            self.counters.errors.append(json.dumps(frame)[:300])

    def ack(self) -> None:
        self.dirty = False
        if self.processed > self.acked and not self.transport.is_closing():
            self.acked = self.processed
            self.transport.write(
                client_frame(b'{"type":"ack","cursor":%d}' % self.processed, OP_TEXT)
            )
            self.counters.acks += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.opened and self.hello.done():
            self.counters.lost += 1
        if not self.hello.done():
            self.hello.set_exception(exc or ConnectionError("closed before hello"))


@dataclass(frozen=True)
class DeviceSpec:
    host: str
    port: int
    sockets: list[tuple[str, str, bool]]  # (token, device_id, sampled) per socket
    src_addrs: list[str]
    concurrency: int
    ack_every: float
    timeout: float
    max_seconds: float
    cpus: str


async def open_device(
    host: str, port: int, src: str, request: bytes, counters: Counters, sampled: bool,
    pending: list[Device], timeout: float,
) -> Device:  # fmt: skip
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((src, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        _, proto = await loop.create_connection(
            lambda: Device(request, counters, sampled, pending), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    try:
        await asyncio.wait_for(asyncio.shield(proto.hello), timeout)
    except BaseException:
        proto.transport.close()
        raise
    return proto


async def acker(pending: list[Device], every: float) -> None:
    while True:
        await asyncio.sleep(every)
        if pending:
            owed = pending[:]
            pending.clear()
            for d in owed:
                d.ack()


async def _worker(conn: Connection, spec: DeviceSpec) -> None:
    deadline = time.monotonic() + spec.max_seconds
    cmds = Commands(conn)
    counters = Counters()
    pending: list[Device] = []
    devices: list[Device] = []
    task: asyncio.Task[None] | None = None
    try:
        if (await cmds.get(deadline - time.monotonic()))[0] != "go":
            return
        sem = asyncio.Semaphore(spec.concurrency)
        t0 = time.perf_counter()

        async def one(i: int, token: str, device_id: str, sampled: bool) -> None:
            path = f"/ws?token={token}&device_id={device_id}"
            request = handshake_request(spec.host, spec.port, path)
            src = spec.src_addrs[i % len(spec.src_addrs)]
            async with sem:
                d = await open_device(
                    spec.host, spec.port, src, request, counters, sampled, pending, spec.timeout
                )
            devices.append(d)

        results = await asyncio.gather(
            *(one(i, *s) for i, s in enumerate(spec.sockets)), return_exceptions=True
        )
        elapsed = time.perf_counter() - t0
        failures = [r for r in results if isinstance(r, BaseException)]
        conn.send(("connected", len(devices), len(failures), elapsed,
                   repr(failures[0])[:500] if failures else ""))  # fmt: skip
        task = asyncio.create_task(acker(pending, spec.ack_every))
        while True:
            msg = await cmds.get(max(0.0, deadline - time.monotonic()))
            if msg[0] == "mark":
                conn.send(("mark", counters.events, counters.dups, counters.other,
                           counters.lost, counters.acks, counters.processed,
                           counters.latency_ns.tobytes(), counters.errors[:]))  # fmt: skip
                counters.latency_ns = array("q")
                continue
            break
    finally:
        if task is not None:
            task.cancel()
        for d in devices:
            if d.transport is not None:
                d.transport.close()
        await asyncio.sleep(0.05)
        cmds.close()
        try:
            conn.send(("stopped",))
        except OSError:
            pass


def _worker_main(conn: Connection, spec: DeviceSpec) -> None:
    try:
        if spec.cpus:
            os.sched_setaffinity(0, {int(c) for c in spec.cpus.split(",")})
        uvloop.run(_worker(conn, spec))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        conn.close()
        os._exit(0)


class DeviceWorker:
    """Control-side end of one load process holding device sockets."""

    def __init__(self, spec: DeviceSpec) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.spec = spec
        self.proc = ctx.Process(target=_worker_main, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()
        self._cmds: Commands | None = None

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def attach(self) -> None:
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
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


@dataclass
class Mark:
    events: int = 0
    dups: int = 0
    other: int = 0
    lost: int = 0
    acks: int = 0
    processed: int = 0
    latency_ns: array | None = None  # type: ignore[type-arg]
    errors: list[str] | None = None


async def mark_all(workers: list[DeviceWorker], timeout: float = 10.0) -> Mark:
    """Ask every load process for its counters; sum them (latencies of this interval)."""
    for w in workers:
        w.send("mark")
    total = Mark(latency_ns=array("q"), errors=[])
    for w in workers:
        msg = await w.recv(timeout)
        if msg[0] != "mark":
            await asyncio.sleep(0.2)
            raise RuntimeError(f"load process answered {msg!r} (exit code {w.proc.exitcode})")
        _, events, dups, other, lost, acks, processed, lat, errors = msg
        total.events += events
        total.dups += dups
        total.other += other
        total.lost += lost
        total.acks += acks
        total.processed += processed
        a = array("q")
        a.frombytes(lat)
        assert total.latency_ns is not None and total.errors is not None
        total.latency_ns.extend(a)
        total.errors.extend(errors)
    return total

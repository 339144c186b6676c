"""Book relay devices in load processes: raw uvloop sockets on ``/ws/relay/{book_id}``.

A ``BookDevice`` is an ``asyncio.Protocol`` with the handshake written by hand
(bench/loadgen/wsproto.py: fixed key, 101 and accept checked, zero mask) and subprotocol
``switchboard.v1.msgpack``, so ``payload`` travels as raw bytes. The relay's rate is low (one op
per device every ``period`` s), so every frame is parsed: nothing is sampled or counted from bytes.

Each op is ``{"type": "crdt_operation", "id": "op-<16 hex>", "payload": <bytes>, "timestamp": T}``
(the SDK's id shape; ``--no-op-id`` leaves it out)
whose payload (the fake ciphertext, ``payload_size`` bytes) starts with ``<q I I``: the send time
(``time.monotonic_ns``, CLOCK_MONOTONIC: the same clock in every process of the machine), the
sender's index and the op's number; the rest is random padding. Then:

* a delivery (``crdt_operation`` with ``seq``) at another member gives the relay latency,
  arrival - send time, and its ``seq`` is checked to grow on each socket (book order);
* the sender's ``ack`` (``{id, seq}``) gives the send -> ack latency; with retention on, an ack
  means "stored", so this is the figure the durable path moves.

Ops are sent open loop: device ``d`` sends op ``k`` at ``t_start + phase(d) + k * period``
(phases spread evenly over the period, in a shuffled order), one timer per process sending what is
due; how late a send was against its schedule is recorded (the load generator keeping up). An op
counts for the measured window when its send time is in ``[m0, m1)``; its deliveries and ack count
whenever they arrive (the control process waits ``drain`` s after the last send).

Control (like bench/durable/devices.py): "go" -> ("connected", ok, failed, seconds, error);
("run", t_start, m0, m1, t_stop) -> sends on schedule until t_stop; "report" -> ("report", dict,
latency arrays as bytes); "stop". EOF on the pipe or ``max_seconds`` also stops a process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import struct
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from durable.devices import Commands  # noqa: E402
from loadgen.wsproto import (  # noqa: E402
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    check_handshake,
    client_frame,
    handshake_request,
)

SUBPROTOCOL = "switchboard.v1.msgpack"
STAMP = struct.Struct("<qII")  # send monotonic ns, sender index, op number


@dataclass(frozen=True)
class SocketSpec:
    index: int  # global device index
    token: str
    book_id: str
    book: int
    members: int
    hot: bool


@dataclass(frozen=True)
class DeviceSpec:
    host: str
    port: int
    sockets: list[SocketSpec]
    period: float
    payload_size: int
    concurrency: int
    timeout: float
    max_seconds: float
    cpus: str
    seed: int
    op_ids: bool = True  # False: ops without "id" (no dedupe entry on the server; acks say null)


class Counters:
    def __init__(self) -> None:
        self.sent = 0  # ops written (all)
        self.sent_win = 0  # ops whose send time is in the window
        self.expected_win = 0  # sum over window ops of (members of the book - 1)
        self.acks = 0
        self.acks_win = 0
        self.deliveries = 0
        self.deliveries_win = 0
        self.deliveries_hot_win = 0
        self.out_of_order = 0  # a delivery whose seq is not above the socket's previous one
        self.own_echo = 0  # a device received its own op (the relay must exclude the sender)
        self.presence_frames = 0  # presence / device.online / device.offline
        self.errors = 0
        self.error_samples: list[str] = []
        self.other = 0
        self.lost = 0  # sockets closed after they were open
        self.late_sends = 0  # window sends more than 5 ms behind their schedule
        self.max_late_ms = 0.0
        self.sum_late_ms = 0.0
        self.lat_ns = array("q")  # relay latency, deliveries of window ops, ordinary books
        self.lat_hot_ns = array("q")  # the same, hot book
        self.ack_ns = array("q")  # send -> ack, window ops
        self.lag_ns = array("q")  # the load process's own event-loop lag, sampled in the window
        self.per_s_sent: list[int] = []  # window ops per second of the window
        self.per_s_delivered: list[int] = []  # deliveries per second of arrival in the window
        self.per_s_max_us: list[int] = []  # the slowest delivery (window op) per second of arrival

    def report(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if not isinstance(v, array)}
        return out


class BookDevice(asyncio.Protocol):
    __slots__ = (
        "spec", "c", "request", "transport", "opened", "buf", "ready", "last_seq", "inflight",
        "proc", "unnamed",
    )  # fmt: skip

    def __init__(self, spec: SocketSpec, counters: Counters, request: bytes, proc: Proc) -> None:
        self.spec = spec
        self.c = counters
        self.request = request
        self.proc = proc
        self.transport: Any = None
        self.opened = False
        self.buf = bytearray()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_seq = 0
        self.inflight: dict[str, int] = {}  # op id -> send ns
        self.unnamed: deque[int] = deque()  # send ns of ops sent without id, in order

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
            except Exception:  # noqa: BLE001 - handed to whoever waits for ready
                if not self.ready.done():
                    head = bytes(buf[: min(len(buf), 400)]).decode("latin-1")
                    self.ready.set_exception(RuntimeError(head))
                self.transport.close()
                return
            del buf[: end + 4]
            self.opened = True
        pos, end = 0, len(buf)
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
            if op == OP_BINARY:
                self._frame(msgpack.unpackb(buf[start:stop]))
            elif op == OP_PING:
                self.transport.write(client_frame(bytes(buf[start:stop]), OP_PONG))
            elif op == OP_CLOSE:
                self.transport.close()
        del buf[:pos]

    def _frame(self, frame: Any) -> None:
        c = self.c
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "crdt_operation":
            now = time.monotonic_ns()
            sent_ns, sender, _ = STAMP.unpack_from(frame["payload"])
            c.deliveries += 1
            seq = frame.get("seq", 0)
            if seq <= self.last_seq:
                c.out_of_order += 1
            self.last_seq = seq
            if sender == self.spec.index:
                c.own_echo += 1
            p = self.proc
            if p.m0_ns <= sent_ns < p.m1_ns:
                c.deliveries_win += 1
                took = now - sent_ns
                if self.spec.hot:
                    c.deliveries_hot_win += 1
                    c.lat_hot_ns.append(took)
                else:
                    c.lat_ns.append(took)
                second = min(len(c.per_s_max_us) - 1, (now - p.m0_ns) // 1_000_000_000)
                if took // 1000 > c.per_s_max_us[second]:
                    c.per_s_max_us[second] = took // 1000
            if p.m0_ns <= now < p.m1_ns:
                c.per_s_delivered[(now - p.m0_ns) // 1_000_000_000] += 1
        elif kind == "ack":
            now = time.monotonic_ns()
            c.acks += 1
            op_id = frame.get("id")
            if op_id is None:
                sent_ns = self.unnamed.popleft() if self.unnamed else None
            else:
                sent_ns = self.inflight.pop(op_id, None)
            if sent_ns is not None and self.proc.m0_ns <= sent_ns < self.proc.m1_ns:
                c.acks_win += 1
                c.ack_ns.append(now - sent_ns)
        elif kind in ("presence", "device.online", "device.offline"):
            c.presence_frames += 1
        elif kind == "synced":
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            c.errors += 1
            if len(c.error_samples) < 5:
                c.error_samples.append(repr(frame)[:300])
        else:
            c.other += 1

    def send_op(self, k: int, unix_s: int) -> int:
        """Write op ``k`` now; its send time (monotonic ns)."""
        sent_ns = time.monotonic_ns()
        payload = STAMP.pack(sent_ns, self.spec.index, k) + self.proc.pad
        op: dict[str, Any] = {"type": "crdt_operation", "payload": payload, "timestamp": unix_s}
        if self.proc.spec.op_ids:
            # The SDK's shape and length ("op-" + 16 hex, relay/client/core.py send_op).
            op["id"] = op_id = f"op-{self.spec.index:08x}{k:08x}"
            self.inflight[op_id] = sent_ns
        else:  # acks come back in send order (one publisher task per socket), with id null
            self.unnamed.append(sent_ns)
        self.transport.write(client_frame(msgpack.packb(op), OP_BINARY))
        return sent_ns

    def connection_lost(self, exc: Exception | None) -> None:
        if self.opened and self.ready.done():
            self.c.lost += 1
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed before synced"))


class Proc:
    """One load process's state shared by its devices: the window and the padding."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.m0_ns = 0
        self.m1_ns = 0
        rnd = random.Random(spec.seed)
        self.pad = rnd.randbytes(max(0, spec.payload_size - STAMP.size))


async def open_device(
    spec: DeviceSpec, s: SocketSpec, counters: Counters, proc: Proc
) -> BookDevice:
    loop = asyncio.get_running_loop()
    headers = {"Authorization": f"Bearer {s.token}", "Sec-WebSocket-Protocol": SUBPROTOCOL}
    request = handshake_request(spec.host, spec.port, f"/ws/relay/{s.book_id}", headers)
    _, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: BookDevice(s, counters, request, proc), spec.host, spec.port
        ),
        spec.timeout,
    )
    try:
        await asyncio.wait_for(asyncio.shield(proto.ready), spec.timeout)
    except BaseException:
        proto.transport.close()
        raise
    return proto


async def send_loop(
    devices: list[BookDevice], spec: DeviceSpec, c: Counters, t_start: float, t_stop: float,
    m0: float, m1: float,
) -> None:  # fmt: skip
    """Open loop: every device one op per period at its own phase; one timer for the process."""
    rnd = random.Random(spec.seed + 1)
    order = devices[:]
    rnd.shuffle(order)
    n = len(order)
    if n == 0:
        return
    # Phases spread evenly over the period (this process's devices; the processes are offset).
    offset = rnd.random() * spec.period / n
    phases = [offset + spec.period * i / n for i in range(n)]
    m0_ns, m1_ns = int(m0 * 1e9), int(m1 * 1e9)
    seconds = max(1, int(m1 - m0 + 0.999))
    c.per_s_sent = [0] * seconds
    k = 0  # round
    i = 0
    while True:
        due = t_start + phases[i] + k * spec.period
        if due >= t_stop:
            return
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.monotonic()
        unix_s = int(time.time())
        # Everything due by now goes out in this step.
        while due <= now:
            d = order[i]
            if d.transport is not None and not d.transport.is_closing():
                sent_ns = d.send_op(k, unix_s)
                c.sent += 1
                if m0_ns <= sent_ns < m1_ns:
                    late_ms = (now - due) * 1000
                    c.sum_late_ms += late_ms
                    if late_ms > c.max_late_ms:
                        c.max_late_ms = late_ms
                    if late_ms > 5:
                        c.late_sends += 1
                    c.sent_win += 1
                    c.expected_win += d.spec.members - 1
                    c.per_s_sent[min(seconds - 1, (sent_ns - m0_ns) // 1_000_000_000)] += 1
            i += 1
            if i == n:
                i, k = 0, k + 1
            due = t_start + phases[i] + k * spec.period
            if due >= t_stop:
                return


async def lag_monitor(c: Counters, m0: float, m1: float, every: float = 0.005) -> None:
    """How late this process's loop wakes a ``every`` s sleep (its own stalls: GC, bursts).

    Every relay latency this process measures is inflated by at most its loop's lag."""
    await asyncio.sleep(max(0.0, m0 - time.monotonic()))
    while True:
        t = time.monotonic()
        if t >= m1:
            return
        await asyncio.sleep(every)
        c.lag_ns.append(int((time.monotonic() - t - every) * 1e9))


async def _worker(conn: Connection, spec: DeviceSpec) -> None:
    deadline = time.monotonic() + spec.max_seconds
    cmds = Commands(conn)
    counters = Counters()
    proc = Proc(spec)
    devices: list[BookDevice] = []
    sender: asyncio.Task[None] | None = None
    lag: asyncio.Task[None] | None = None
    try:
        if (await cmds.get(deadline - time.monotonic()))[0] != "go":
            return
        sem = asyncio.Semaphore(spec.concurrency)
        t0 = time.perf_counter()

        async def one(s: SocketSpec) -> None:
            async with sem:
                devices.append(await open_device(spec, s, counters, proc))

        results = await asyncio.gather(*(one(s) for s in spec.sockets), return_exceptions=True)
        elapsed = time.perf_counter() - t0
        failures = [r for r in results if isinstance(r, BaseException)]
        conn.send(("connected", len(devices), len(failures), elapsed,
                   repr(failures[0])[:500] if failures else ""))  # fmt: skip
        while True:
            msg = await cmds.get(max(0.0, deadline - time.monotonic()))
            if msg[0] == "run":
                _, t_start, m0, m1, t_stop = msg
                proc.m0_ns, proc.m1_ns = int(m0 * 1e9), int(m1 * 1e9)
                counters.per_s_delivered = [0] * max(1, int(m1 - m0 + 0.999))
                counters.per_s_max_us = [0] * max(1, int(m1 - m0 + 0.999))
                sender = asyncio.create_task(
                    send_loop(devices, spec, counters, t_start, t_stop, m0, m1)
                )
                lag = asyncio.create_task(lag_monitor(counters, m0, m1))
                continue
            if msg[0] == "report":
                conn.send(("report", counters.report(), counters.lat_ns.tobytes(),
                           counters.lat_hot_ns.tobytes(), counters.ack_ns.tobytes(),
                           counters.lag_ns.tobytes(),
                           sum(len(d.inflight) + len(d.unnamed) for d in devices)))  # fmt: skip
                continue
            break
    finally:
        for task in (sender, lag):
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
    """Control-side end of one load process (forked, driven over a Pipe)."""

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

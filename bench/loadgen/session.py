"""The control process of one trial: publishers, sampled sockets, counters, meters.

Flow control of an unpaced publisher ("as fast as the server keeps up"): it keeps
at most `window` messages per channel ahead of the slowest sampled socket, so the
server is never asked to buffer without bound and peak figures are steady state.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from .adapters import ADAPTERS, Adapter, channel_name, make_payload
from .clients import Publisher, SampledSub, Samples, open_socket
from .procstat import CpuMeter, rss_kb, tree
from .workers import WorkerHandle, WorkerSpec
from .wsproto import handshake_request


@dataclass
class Layout:
    """Who connects where: `channels` x `subs_per_channel` subscribers, `sampled` of them parsed."""

    adapter: str
    host: str
    port: int
    channels: int
    subs_per_channel: int
    sampled: int
    publishers: bool
    workers: int
    src_addrs: list[str]
    payload_size: int = 100
    rcvlowat: int = 8192
    concurrency: int = 200
    timeout: float = 10.0
    max_seconds: float = 1800.0

    @property
    def subscribers(self) -> int:
        return self.channels * self.subs_per_channel


@dataclass
class Phase:
    """Counters at one instant, for rates between two instants."""

    t: float
    delivered: float
    counted: int  # bytes received by the counting sockets
    sent: list[int]  # messages sent per channel (= the last seq, for sequenced targets)
    latency_index: int
    sample_messages: int
    server: CpuMeter
    load: CpuMeter


@dataclass
class Session:
    layout: Layout
    server_pid: int | None
    adapter: Adapter = field(init=False)
    samples: Samples = field(default_factory=Samples)
    sampled: list[SampledSub] = field(default_factory=list)
    pubs: list[Publisher] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    workers: list[WorkerHandle] = field(default_factory=list)
    counters: Any = None
    connect_seconds: float = 0.0
    connect_failures: int = 0
    first_error: str = ""

    def __post_init__(self) -> None:
        self.adapter = ADAPTERS[self.layout.adapter](self.layout.payload_size)
        self.sent = [0] * self.layout.channels
        self._rr = 0  # next channel of the paced round-robin
        self._sampled_channels: list[int] = []

    # -- setup (fork before any event loop) -------------------------------------------------

    def fork_workers(self) -> None:
        import multiprocessing.sharedctypes as shared

        lay = self.layout
        # Subscriber i (0..channels*subs-1) is socket i % subs of channel i // subs.
        total = lay.channels * lay.subs_per_channel
        sample_at = set(_spread(total, lay.sampled))
        self._sampled_index = sorted(sample_at)
        self._sampled_channels = [i // lay.subs_per_channel for i in self._sampled_index]
        counting = [i for i in range(total) if i not in sample_at]
        n = max(1, lay.workers) if counting else 0
        self.counters = shared.RawArray("q", 2 * max(1, n))
        per = math.ceil(len(counting) / n) if n else 0
        for w in range(n):
            part = counting[w * per : (w + 1) * per]
            spec = WorkerSpec(
                lay.adapter,
                lay.payload_size,
                lay.host,
                lay.port,
                part,
                lay.subs_per_channel,
                w * per,
                lay.src_addrs,
                lay.rcvlowat,
                lay.concurrency,
                lay.timeout,
                lay.max_seconds,
            )
            self.workers.append(WorkerHandle(spec, self.counters, 2 * w))

    def close_workers(self) -> None:
        for w in self.workers:
            w.join()

    # -- inside the loop -------------------------------------------------------------------

    async def connect(self) -> None:
        """Open everything: workers' counting sockets, sampled sockets, publishers."""
        lay, ad = self.layout, self.adapter
        self._progress_event = asyncio.Event()
        self.samples.on_progress = self._progress_event.set
        for w in self.workers:
            w.attach()
        t0 = time.perf_counter()
        for w in self.workers:
            w.send("go")
        sem = asyncio.Semaphore(lay.concurrency)

        async def sampled(i: int, index: int) -> SampledSub:
            ch, k = divmod(index, lay.subs_per_channel)
            name = channel_name(ch)
            req = handshake_request(lay.host, lay.port, ad.sub_path(name), ad.headers(name, k))
            async with sem:
                p = await open_socket(
                    lambda: SampledSub(req, ad.sub_init(name), ad, ch, self.samples),
                    lay.host,
                    lay.port,
                    lay.src_addrs[i % len(lay.src_addrs)],
                    lay.timeout,
                )
            assert isinstance(p, SampledSub)
            return p

        async def publisher(ch: int) -> Publisher:
            name = channel_name(ch)
            req = handshake_request(lay.host, lay.port, ad.pub_path(name), ad.headers(name, -1))
            async with sem:
                p = await open_socket(
                    lambda: Publisher(req, ad.pub_init(name)),
                    lay.host,
                    lay.port,
                    lay.src_addrs[0],
                    lay.timeout,
                )
            assert isinstance(p, Publisher)
            return p

        self.sampled = list(
            await asyncio.gather(*(sampled(i, x) for i, x in enumerate(self._sampled_index)))
        )
        own = time.perf_counter() - t0
        if lay.publishers:
            self.pubs = list(await asyncio.gather(*(publisher(ch) for ch in range(lay.channels))))
        worst = own
        for w in self.workers:
            msg = await w.recv(lay.timeout * 10 + lay.subscribers / 100)
            if msg[0] != "connected":
                raise RuntimeError(f"load process did not connect: {msg}")
            _, ok, failed, seconds, err = msg
            self.connect_failures += failed
            self.first_error = self.first_error or err
            worst = max(worst, seconds)
        self.connect_seconds = worst
        if self.connect_failures:
            raise RuntimeError(
                f"{self.connect_failures} sockets failed to connect, first: {self.first_error}"
            )

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Publish probes (send time 0) until every sampled socket has seen one."""
        if not self.pubs or not self.sampled:
            return
        deadline = time.monotonic() + timeout
        while any(s.last_seq == 0 for s in self.sampled):
            if time.monotonic() > deadline:
                raise TimeoutError("sampled sockets saw no probe: subscriptions not working")
            for ch in {s.channel for s in self.sampled if s.last_seq == 0}:
                self.sent[ch] += 1
                self.pubs[ch].transport.write(  # type: ignore[union-attr]
                    self.adapter.pub_frame(
                        channel_name(ch), make_payload(self.sent[ch], 0, self.layout.payload_size)
                    )
                )
            await asyncio.sleep(0.05)

    def counted(self) -> int:
        """Bytes received so far by all counting sockets."""
        return sum(self.counters[2 * i] for i in range(len(self.workers))) if self.workers else 0

    def delivered(self) -> float:
        """Deliveries so far: counted bytes / bytes per delivery, plus sampled messages."""
        return self.counted() / self.adapter.delivery_size() + self.samples.messages

    def lost(self) -> int:
        return sum(self.counters[2 * i + 1] for i in range(len(self.workers))) + self.samples.lost

    def load_pids(self) -> list[int]:
        return [os.getpid(), *(w.proc.pid for w in self.workers if w.proc.pid is not None)]

    def phase(self) -> Phase:
        now = time.perf_counter()
        server = CpuMeter(tree(self.server_pid) if self.server_pid else [])
        load = CpuMeter(self.load_pids())
        server.start(now)
        load.start(now)
        return Phase(
            now,
            self.delivered(),
            self.counted(),
            list(self.sent),
            len(self.samples.latency_ns),
            self.samples.messages,
            server,
            load,
        )

    def measure(self, start: Phase) -> dict[str, Any]:
        now = time.perf_counter()
        dt = now - start.t
        lat = sorted(self.samples.latency_ns[start.latency_index :])
        # Bytes per delivery over the messages sent in the phase (fixed for most adapters;
        # Switchboard's grows by a byte at seq 128, 256 and 65536).
        size = self.adapter.mean_delivery_size(start.sent, self.sent)
        delivered = (self.counted() - start.counted) / size
        delivered += self.samples.messages - start.sample_messages
        out: dict[str, Any] = {
            "seconds": round(dt, 3),
            "deliveries_per_s": delivered / dt,
            "bytes_per_delivery": size,
            "server_cpu_pct": start.server.percent(now),
            "load_cpu_pct": start.load.percent(now),
            "lost_sockets": self.lost(),
            "latency_samples": len(lat),
        }
        if self.sampled:
            # Exact (parsed) deliveries per sampled socket, scaled to all subscribers.
            per_socket = (self.samples.messages - start.sample_messages) / len(self.sampled) / dt
            out["sampled_rate_per_s"] = per_socket * self.layout.subscribers
        if lat:
            out.update(p50_ms=_pct(lat, 50) / 1e6, p99_ms=_pct(lat, 99) / 1e6, max_ms=lat[-1] / 1e6)
        return out

    def bytes_per_delivery_seen(self) -> float | None:
        s = self.samples
        return s.frame_bytes / s.messages if s.messages else None

    # -- publishing ------------------------------------------------------------------------

    def _send_rounds(self, rounds: int) -> None:
        """`rounds` messages on every channel, one coalesced write per publisher."""
        ad, size = self.adapter, self.layout.payload_size
        ts = time.perf_counter_ns()
        for ch, pub in enumerate(self.pubs):
            seq = self.sent[ch]
            name = channel_name(ch)
            pub.transport.write(  # type: ignore[union-attr]
                b"".join(
                    ad.pub_frame(name, make_payload(seq + k + 1, ts, size)) for k in range(rounds)
                )
            )
            self.sent[ch] = seq + rounds

    def _send_some(self, n: int) -> None:
        """`n` messages round-robin over channels (paced mode)."""
        ad, size = self.adapter, self.layout.payload_size
        ts = time.perf_counter_ns()
        nch = len(self.pubs)
        full, extra = divmod(n, nch)
        start = self._rr
        for k in range(min(n, nch)):
            ch = (start + k) % nch
            count = full + (1 if k < extra else 0)
            pub = self.pubs[ch]
            if count == 0 or pub.paused:
                continue
            seq, name = self.sent[ch], channel_name(ch)
            pub.transport.write(  # type: ignore[union-attr]
                b"".join(
                    ad.pub_frame(name, make_payload(seq + i + 1, ts, size)) for i in range(count)
                )
            )
            self.sent[ch] = seq + count
        self._rr = (start + extra) % nch

    def outstanding(self) -> int:
        return max((self.sent[s.channel] - s.last_seq for s in self.sampled), default=0)

    async def publish_unpaced(self, seconds: float, window: int, batch: int = 32) -> None:
        deadline = time.perf_counter() + seconds
        ev = self._progress_event
        while time.perf_counter() < deadline:
            room = window - self.outstanding()
            if room <= 0 or any(p.paused for p in self.pubs):
                ev.clear()
                try:
                    await asyncio.wait_for(ev.wait(), 0.05)
                except TimeoutError:
                    pass
                continue
            self._send_rounds(min(room, batch))
            await asyncio.sleep(0)

    async def publish_paced(self, seconds: float, msgs_per_s: float) -> None:
        self._rr = 0
        t0 = time.perf_counter()
        done = 0
        while (now := time.perf_counter()) < t0 + seconds:
            due = int((now - t0) * msgs_per_s) - done
            if due > 0:
                self._send_some(due)
                done += due
            await asyncio.sleep(0.001)

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until the sampled sockets have everything that was sent."""
        deadline = time.perf_counter() + timeout
        while self.outstanding() > 0 and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        return self.outstanding() == 0

    async def close(self) -> None:
        for p in [*self.pubs, *self.sampled]:
            if p.transport is not None:
                p.transport.close()
        for w in self.workers:
            w.send("stop")
        for w in self.workers:
            await w.recv(10.0)
            w.detach()

    def server_rss_kb(self) -> float:
        return rss_kb(tree(self.server_pid)) if self.server_pid else 0.0


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    k = min(k, n)
    return [int(i * n / k) for i in range(k)] if k else []


def _pct(sorted_values: list[int], p: float) -> float:
    i = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return float(sorted_values[i])


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)

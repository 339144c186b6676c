"""Durable publish throughput and latency: POST /publish -> acknowledged delivery on /ws devices.

    .venv/bin/python bench/durable.py                      # SQLite (embedded default), 3 runs
    .venv/bin/python bench/durable.py --postgres           # PostgreSQL at 127.0.0.1:5432/test
    .venv/bin/python bench/durable.py --quick              # smoke: 1 short run, 200 devices
    .venv/bin/python bench/durable.py --users 100 --devices-per-user 10

Every trial starts a fresh ``switchboard serve`` (this worktree's .venv) pinned to
--server-cpus, with the protective limits raised through their settings (recorded in the JSON),
creates --users accounts with one API token each (scopes publish + subscribe) through the REST
API, connects --devices-per-user /ws devices per user from load processes pinned to --load-cpus
(cumulative acks every --ack-every s), then:

  peak:  --connections keep-alive HTTP/1.1 connections x --depth pipelined POST /publish, each
         to one user (round-robin, the user's own token), for --warmup + --peak-seconds:
         acknowledged events/s (202s) and delivered events/s at the devices; then every
         acknowledged event must reach every device of its user (checked, "drained").
  paced: --paced-fraction of that trial's peak for --warmup + --paced-seconds: publish->delivery
         latency from the send time inside ``data``, on --samples devices; send->202 latency.

Server CPU (and its PostgreSQL backends' CPU) and the load generator's CPU are read from /proc.
Results: a table (median and min-max over --runs) and JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from durable.devices import DeviceSpec, DeviceWorker, Mark, mark_all  # noqa: E402
from durable.publisher import Publisher  # noqa: E402
from durable.server import BIN, Server, machine  # noqa: E402
from durable.setup import Account, create_accounts  # noqa: E402
from loadgen import procstat  # noqa: E402
from loadgen.session import median_spread  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t = p.add_argument_group("server")
    t.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    t.add_argument("--redis", action="store_true", help="REDIS_URL (broker, rate limits) too")
    t.add_argument("--server-cpus", default="0", help="taskset core list for the server")
    t.add_argument("--load-cpus", default="1", help="cores for this process and its load processes")
    t.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE",
        help="extra server setting (repeatable), e.g. INBOX_BATCH_MAX=500",
    )  # fmt: skip
    lay = p.add_argument_group("layout")
    lay.add_argument("--users", type=int, default=1000, help="accounts (one API token each)")
    lay.add_argument("--devices-per-user", type=int, default=1, help="/ws devices per user")
    lay.add_argument("--samples", type=int, default=50, help="devices that measure latency")
    lay.add_argument("--load-workers", type=int, default=1, help="load processes for devices")
    lay.add_argument("--src-addrs", type=int, default=1, help="loopback source addresses")
    lay.add_argument("--concurrency", type=int, default=100, help="handshakes in flight per process")
    lay.add_argument("--ack-every", type=float, default=0.02, help="seconds between cumulative acks")
    pub = p.add_argument_group("publishing")
    pub.add_argument("--connections", type=int, default=128, help="HTTP keep-alive connections")
    pub.add_argument("--depth", type=int, default=4, help="pipelined requests per connection (peak)")
    pub.add_argument("--max-inflight", type=int, default=32, help="per connection when paced")
    pub.add_argument("--payload", type=int, default=100, help="approximate bytes of `data`")
    r = p.add_argument_group("runs")
    r.add_argument("--runs", type=int, default=3, help="trials (median and spread)")
    r.add_argument("--warmup", type=float, default=3.0, help="seconds before each measured phase")
    r.add_argument("--peak-seconds", type=float, default=10.0)
    r.add_argument("--paced-seconds", type=float, default=15.0)
    r.add_argument("--paced-fraction", type=float, default=0.5, help="of the trial's peak")
    r.add_argument("--paced-rate", type=float, default=0.0, help="fixed events/s (overrides fraction)")
    r.add_argument("--skip-paced", action="store_true")
    r.add_argument("--profile", action="store_true", help="py-spy record the server during peak")
    r.add_argument("--quick", action="store_true", help="smoke: 1 run, short, 200 users")
    r.add_argument("--tag", default="", help="added to the JSON file name")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.warmup, args.peak_seconds, args.paced_seconds = 1, 1.0, 3.0, 3.0
        args.users = min(args.users, 200)
    return args


def _pct(values: list[int], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] / 1e6


def latency_summary(ns: Any) -> dict[str, Any]:
    v = sorted(ns)
    return {
        "n": len(v),
        "p50_ms": _pct(v, 0.50),
        "p90_ms": _pct(v, 0.90),
        "p99_ms": _pct(v, 0.99),
        "max_ms": v[-1] / 1e6 if v else None,
    }


def runqueue_wait_s(pids: list[int]) -> float:
    """Seconds the threads of ``pids`` were runnable but waiting for a CPU (/proc schedstat):
    how much the server was held back by other processes on its core."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


class Meters:
    """CPU % of one core of the server tree, its PG backends and the load processes; and the
    server's run-queue wait (% of the phase it was runnable but not running)."""

    def __init__(self, server: Server, load_pids: list[int]) -> None:
        self.server = procstat.CpuMeter(procstat.tree(server.pid))
        self.pg = procstat.CpuMeter(server.pg_backend_pids())
        self.load = procstat.CpuMeter(load_pids)
        self.pg_count = len(self.pg.pids)
        self._wait0 = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        now = time.monotonic()
        for m in (self.server, self.pg, self.load):
            m.start(now)
        self._wait0, self._t0 = runqueue_wait_s(self.server.pids), now

    def read(self) -> dict[str, float]:
        now = time.monotonic()
        waited = runqueue_wait_s(self.server.pids) - self._wait0
        return {
            "server_runqueue_wait_pct": round(100 * waited / max(1e-9, now - self._t0), 1),
            "server_cpu_pct": round(self.server.percent(now), 1),
            "pg_backends_cpu_pct": round(self.pg.percent(now), 1),
            "pg_backends": self.pg_count,
            "load_cpu_pct": round(self.load.percent(now), 1),
        }


async def wait_drained(
    workers: list[DeviceWorker], expected: int, timeout: float
) -> tuple[bool, float, Mark]:
    t0 = time.monotonic()
    while True:
        m = await mark_all(workers)
        if m.processed >= expected or time.monotonic() - t0 > timeout:
            return m.processed >= expected, time.monotonic() - t0, m
        await asyncio.sleep(0.1)


def start_profile(args: argparse.Namespace, server: Server, seconds: float, out: Path) -> Any:
    pyspy = BIN / "py-spy"
    if not pyspy.exists():
        print("  (py-spy not installed in .venv: pip install py-spy)", flush=True)
        return None
    cmd = [str(pyspy), "record", "--pid", str(server.pid), "--duration", str(int(seconds)),
           "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)]  # fmt: skip
    if args.load_cpus:
        cmd = ["taskset", "-c", args.load_cpus, *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(
    args: argparse.Namespace, server: Server, accounts: list[Account], workers: list[DeviceWorker],
    profile_out: Path | None,
) -> dict[str, Any]:  # fmt: skip
    for w in workers:
        w.attach()
    try:
        return await _measure(args, server, accounts, workers, profile_out)
    finally:
        for w in workers:
            w.detach()


async def _measure(
    args: argparse.Namespace, server: Server, accounts: list[Account], workers: list[DeviceWorker],
    profile_out: Path | None,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    for w in workers:
        w.send("go")
    connected = failed = 0
    slowest = 0.0
    first_error = ""
    for w in workers:
        msg = await w.recv(300)
        if msg[0] != "connected":
            raise RuntimeError(f"load process: {msg}")
        connected += msg[1]
        failed += msg[2]
        slowest = max(slowest, msg[3])
        first_error = first_error or msg[4]
    n_devices = len(accounts) * args.devices_per_user
    out["devices_connected"] = connected
    out["devices_failed"] = failed
    out["connect_seconds"] = round(slowest, 2)
    if failed:
        raise RuntimeError(f"{failed} of {n_devices} devices failed: {first_error}")

    publisher = Publisher(
        "127.0.0.1", server.port, [a.token for a in accounts], payload=args.payload,
        connections=args.connections, depth=args.depth,
    )  # fmt: skip
    await publisher.connect()
    meters = Meters(server, [os.getpid()] + [w.pid for w in workers])
    out["server_rss_kb_idle"] = round(procstat.rss_kb(procstat.tree(server.pid)))
    dpu = args.devices_per_user

    # -- peak -------------------------------------------------------------------------------
    run = asyncio.create_task(publisher.run_peak(args.warmup + args.peak_seconds))
    await asyncio.sleep(args.warmup)
    meters = Meters(server, meters.load.pids)  # PG backends opened by now
    m0 = await mark_all(workers)
    ok0, t0 = publisher.counts.ok, time.monotonic()
    w0 = time.time()
    publisher.take_latencies()
    meters.start()
    prof = (
        start_profile(args, server, args.peak_seconds, profile_out)
        if profile_out is not None
        else None
    )
    await asyncio.sleep(args.peak_seconds)
    cpu = meters.read()
    m1 = await mark_all(workers)
    ok1, t1 = publisher.counts.ok, time.monotonic()
    w1 = time.time()
    http_lat = publisher.take_latencies()
    await run
    responses_drained = await publisher.drain(30)
    expected = sum(publisher.counts.per_user) * dpu
    drained, drain_s, m_end = await wait_drained(workers, expected, 60)
    dt = t1 - t0
    peak_batches = server.batch_sizes(int(w0 * 1000), int(w1 * 1000))
    peak = {
        "seconds": round(dt, 2),
        "acked_events_per_s": round((ok1 - ok0) / dt),
        "delivered_events_per_s": round((m1.events - m0.events) / dt / dpu),
        "deliveries_per_s": round((m1.events - m0.events) / dt),
        "acks_per_s": round((m1.acks - m0.acks) / dt),
        "http_send_to_202": latency_summary(http_lat),
        "delivery_latency_sampled": latency_summary(m1.latency_ns or []),
        **cpu,
        "server_cpu_ms_per_event": round(cpu["server_cpu_pct"] * 10 / max(1, (ok1 - ok0) / dt), 3),
        "in_flight": args.connections * args.depth,
        "group_commit": peak_batches,
        "responses_drained": responses_drained,
        "every_acked_event_delivered": drained,
        "drain_seconds_after_stop": round(drain_s, 2),
        "duplicates_total": m_end.dups,
        # equal with 0 duplicates: every acknowledged event arrived exactly once on every device
        "events_received_total": m_end.events,
        "events_expected_total": expected,
        "non_202": {k.decode(): v for k, v in publisher.counts.statuses.items()},
        "first_error": publisher.counts.first_error,
        "device_errors": (m_end.errors or [])[:5],
        "devices_lost": m_end.lost,
        "server_rss_kb": round(procstat.rss_kb(procstat.tree(server.pid))),
    }
    if prof is not None:
        try:
            prof.wait(args.peak_seconds + 30)
        except subprocess.TimeoutExpired:
            prof.kill()
    out["peak"] = peak
    print(
        f"  peak: {peak['acked_events_per_s']:,} acked/s, {peak['delivered_events_per_s']:,} "
        f"delivered/s, server {cpu['server_cpu_pct']} % (pg {cpu['pg_backends_cpu_pct']} %), "
        f"load {cpu['load_cpu_pct']} %, drained={drained} in {drain_s:.1f} s, "
        f"batch {peak_batches.get('mean_batch')} ({peak_batches.get('batches_per_s')}/s)",
        flush=True,
    )
    if args.skip_paced:
        publisher.close()
        return out

    # -- paced ------------------------------------------------------------------------------
    rate = args.paced_rate or peak["acked_events_per_s"] * args.paced_fraction
    ok_before = publisher.counts.ok
    deficit_before = publisher.counts.deficit
    run = asyncio.create_task(
        publisher.run_paced(args.warmup + args.paced_seconds, rate, args.max_inflight)
    )
    await asyncio.sleep(args.warmup)
    meters.start()
    m0 = await mark_all(workers)
    ok0, t0 = publisher.counts.ok, time.monotonic()
    w0 = time.time()
    publisher.take_latencies()
    await asyncio.sleep(args.paced_seconds)
    cpu = meters.read()
    m1 = await mark_all(workers)
    ok1, t1 = publisher.counts.ok, time.monotonic()
    http_lat = publisher.take_latencies()
    await run
    responses_drained = await publisher.drain(30)
    expected = sum(publisher.counts.per_user) * dpu
    drained, drain_s, m_end = await wait_drained(workers, expected, 60)
    dt = t1 - t0
    paced_batches = server.batch_sizes(int(w0 * 1000), int(w0 * 1000 + dt * 1000))
    paced = {
        "target_events_per_s": round(rate),
        "seconds": round(dt, 2),
        "acked_events_per_s": round((ok1 - ok0) / dt),
        "delivered_events_per_s": round((m1.events - m0.events) / dt / dpu),
        "delivery_latency_sampled": latency_summary(m1.latency_ns or []),
        "http_send_to_202": latency_summary(http_lat),
        **cpu,
        "server_cpu_ms_per_event": round(cpu["server_cpu_pct"] * 10 / max(1, (ok1 - ok0) / dt), 3),
        "deficit": publisher.counts.deficit - deficit_before,
        "group_commit": paced_batches,
        "acked_in_phase_total": publisher.counts.ok - ok_before,
        "every_acked_event_delivered": drained,
        "responses_drained": responses_drained,
        "duplicates_total": m_end.dups,
        "non_202": {k.decode(): v for k, v in publisher.counts.statuses.items()},
        "devices_lost": m_end.lost,
    }
    out["paced"] = paced
    lat = paced["delivery_latency_sampled"]
    print(
        f"  paced {rate:,.0f}/s: {paced['acked_events_per_s']:,} acked/s, latency p50 "
        f"{lat['p50_ms']} / p99 {lat['p99_ms']} / max {lat['max_ms']} ms (n={lat['n']}), "
        f"server {cpu['server_cpu_pct']} %, load {cpu['load_cpu_pct']} %",
        flush=True,
    )
    publisher.close()
    return out


def wait_outbox(server: Server, expected: int, timeout: float) -> bool:
    outbox = server.data_dir / "outbox"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if outbox.is_dir() and sum(1 for f in outbox.iterdir() if f.suffix == ".eml") >= expected:
            time.sleep(0.5)
            return True
        time.sleep(0.2)
    return False


def sockets_spec(args: argparse.Namespace, accounts: list[Account]) -> list[tuple[str, str, bool]]:
    flat = [(a.token, d) for a in accounts for d in a.devices]
    n = len(flat)
    k = min(args.samples, n)
    sampled = {round(i * n / k) for i in range(k)} if k else set()
    return [(tok, dev, i in sampled) for i, (tok, dev) in enumerate(flat)]


def trial(args: argparse.Namespace, index: int, stamp: str) -> dict[str, Any]:
    extra = dict(s.split("=", 1) for s in args.setting)
    server = Server(
        store="postgresql" if args.postgres else "sqlite",
        redis=args.redis,
        cpus=args.server_cpus,
        extra=extra,
    )
    workers: list[DeviceWorker] = []
    result: dict[str, Any] = {"trial": index + 1}
    try:
        server.start()
        result["settings"] = server.settings()
        result["postgres"] = server.pg_settings()
        accounts, setup_s = asyncio.run(create_accounts(server.base, args.users, args.devices_per_user))
        result["setup_seconds"] = round(setup_s, 1)
        # Every registration queued a verification mail; let the outbox write them all before
        # anything is measured (else the .eml writer runs during the peak).
        result["mail_outbox_written"] = wait_outbox(server, args.users, 120)
        sockets = sockets_spec(args, accounts)
        n_workers = max(args.load_workers, math.ceil(len(sockets) / 15000))
        src = [f"127.0.0.{i + 1}" for i in range(max(1, args.src_addrs))]
        for w in range(n_workers):
            spec = DeviceSpec("127.0.0.1", server.port, sockets[w::n_workers], src,
                              args.concurrency, args.ack_every, 15.0, 1800.0, args.load_cpus)  # fmt: skip
            workers.append(DeviceWorker(spec))
        profile_out = None
        if args.profile:
            profile_out = RESULTS / f"durable-profile-{stamp}-t{index + 1}.txt"
        result.update(uvloop.run(measure(args, server, accounts, workers, profile_out)))
        if profile_out is not None and profile_out.exists():
            result["profile_raw"] = str(profile_out.relative_to(RESULTS.parent.parent))
    finally:
        try:
            for w in workers:
                w.join()
        finally:
            tail = server.log_tail(1500)
            server.stop()
        if "Traceback" in tail or "ERROR" in tail:
            result["server_log_tail"] = tail
    return result


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    def col(path: str) -> list[float]:
        vals = []
        for t in trials:
            v: Any = t
            for part in path.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            if isinstance(v, int | float):
                vals.append(float(v))
        return vals

    out: dict[str, Any] = {}
    for path in (
        "peak.acked_events_per_s", "peak.delivered_events_per_s", "peak.server_cpu_pct",
        "peak.pg_backends_cpu_pct", "peak.load_cpu_pct", "peak.server_runqueue_wait_pct", "peak.server_cpu_ms_per_event", "peak.http_send_to_202.p99_ms",
        "peak.delivery_latency_sampled.p99_ms", "paced.target_events_per_s",
        "paced.acked_events_per_s", "paced.delivery_latency_sampled.p50_ms",
        "paced.delivery_latency_sampled.p99_ms", "paced.delivery_latency_sampled.max_ms",
        "paced.http_send_to_202.p99_ms", "paced.server_cpu_pct", "paced.pg_backends_cpu_pct",
        "paced.load_cpu_pct", "paced.server_runqueue_wait_pct", "paced.server_cpu_ms_per_event", "connect_seconds",
    ):  # fmt: skip
        vals = col(path)
        if vals:
            med, lo, hi = median_spread(vals)
            out[path] = {"median": med, "min": lo, "max": hi, "values": vals}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",")})
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    store = "postgresql" if args.postgres else "sqlite"
    print(f"durable: {store}{' + redis' if args.redis else ''}, {args.users} users x "
          f"{args.devices_per_user} devices, {args.runs} runs, load avg {os.getloadavg()}", flush=True)  # fmt: skip
    trials = []
    for i in range(args.runs):
        print(f"trial {i + 1}/{args.runs}", flush=True)
        trials.append(trial(args, i, stamp))
    summary = summarize(trials)
    doc = {
        "benchmark": "durable",
        "store": store,
        "redis": args.redis,
        "command": " ".join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
        "started_utc": stamp,
        "finished_utc": datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": machine(),
        "layout": {"users": args.users, "devices_per_user": args.devices_per_user,
                   "devices": args.users * args.devices_per_user},  # fmt: skip
        "args": vars(args),
        "summary": summary,
        "trials": trials,
    }
    name = f"durable-{store}{'-redis' if args.redis else ''}{'-' + args.tag if args.tag else ''}-{stamp}.json"
    (RESULTS / name).write_text(json.dumps(doc, indent=2))
    print(f"\n{store}: median (min-max) of {len(trials)}")
    for key, v in summary.items():
        print(f"  {key:42s} {v['median']:>12,.1f}  ({v['min']:,.1f}-{v['max']:,.1f})")
    print(f"JSON: bench/results/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Book relay mix: many small books and one hot book on /ws/relay, sustained ops and relay latency.

    .venv/bin/python bench/book_relay.py                          # SQLite and PostgreSQL x 1 and 2 workers, 3 rounds
    .venv/bin/python bench/book_relay.py --stores sqlite --workers 1 --runs 1
    .venv/bin/python bench/book_relay.py --quick                  # smoke: 100 books, short, 1 round (~1 min)
    .venv/bin/python bench/book_relay.py --period 0.5             # 4x the offered load

performance.md "Book relay mix": --books (1,000) books x --devices-per-book (3) devices, plus one
hot book of --hot-devices (50); every device sends one --payload (200) byte op every --period
(2 s) on its own socket (open loop, phases spread over the period), and every other connected
member of its book receives it. Every socket is its own E2EE device (registered through the API,
books through the API, memberships straight into the store: bench/book_relay/setup.py).

For every configuration (--stores x --workers; 2 workers run with Redis at REDIS_URL under an own
REDIS_PREFIX, 1 worker on the in-process broker unless --redis-one-worker) and every round, a
fresh ``switchboard serve`` (this worktree's .venv), setup, all sockets connected from
--load-procs load processes, --warmup s of traffic, then --duration s measured:

  ops/s        ops sent in the window / s, and their acks (``{type: ack, id, seq}``) / s
  deliveries   crdt_operation frames of window ops at the other members; expected = sum over
               window ops of (book members - 1); all must arrive (the run waits --drain s)
  latency      relay: op send time (CLOCK_MONOTONIC, inside the payload) -> arrival at each other
               member, every delivery (no sampling); ack: send -> the sender's ack
  server       CPU % of one core (user+system of the process tree, /proc) over the window; RSS
               of the tree (supervisor + workers) at the end of it; run-queue wait
  load         CPU % of this process + the load processes (must stay well below its cores)

Configurations run interleaved, one trial of each per round, in a rotated order. Results: a table
(median and min-max over the rounds) and JSON in bench/results/book-relay-<stamp>.json.
``BOOK_RETENTION`` is left at its default (retention on); ``book_ops`` rows after each trial
tell whether the server under test retained ciphertext (0 on a live-only relay).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from book_relay.devices import DeviceSpec, DeviceWorker, SocketSpec  # noqa: E402
from book_relay.server import BookServer  # noqa: E402
from book_relay.setup import Layout, build, describe  # noqa: E402
from durable.server import machine  # noqa: E402
from loadgen import procstat  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t = p.add_argument_group("server")
    t.add_argument("--stores", default="sqlite,postgresql", help="comma list: sqlite, postgresql")
    t.add_argument("--workers", default="1,2", help="comma list of WORKERS values (>1: Redis)")
    t.add_argument("--redis-one-worker", action="store_true", help="1 worker with Redis too")
    t.add_argument(
        "--server-cpus", default="", help="taskset cores (default: 0 for 1 worker, 0,1 for more)"
    )
    t.add_argument(
        "--load-cpus", default="", help="load cores (default: 1 for 1 worker, unpinned for more)"
    )
    t.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE",
        help="extra server setting (repeatable), e.g. BOOK_RETENTION=0",
    )  # fmt: skip
    lay = p.add_argument_group("layout")
    lay.add_argument("--books", type=int, default=1000, help="ordinary books")
    lay.add_argument("--devices-per-book", type=int, default=3)
    lay.add_argument(
        "--hot-devices", type=int, default=50, help="devices of the hot book (0: none)"
    )
    lay.add_argument("--period", type=float, default=2.0, help="seconds between a device's ops")
    lay.add_argument("--payload", type=int, default=200, help="bytes of (fake) ciphertext per op")
    lay.add_argument(
        "--no-op-id", action="store_true",
        help="ops without 'id' (realtime.md: optional; no dedupe entry is kept for them)",
    )  # fmt: skip
    lay.add_argument("--load-procs", type=int, default=2, help="load processes")
    lay.add_argument("--concurrency", type=int, default=50, help="handshakes in flight per process")
    r = p.add_argument_group("runs")
    r.add_argument("--runs", type=int, default=3, help="rounds (median and spread)")
    r.add_argument(
        "--warmup", type=float, default=10.0, help="seconds of traffic before the window"
    )
    r.add_argument("--duration", type=float, default=60.0, help="measured seconds (steady state)")
    r.add_argument("--drain", type=float, default=3.0, help="seconds after the last send")
    r.add_argument(
        "--quiet-below", type=float, default=25.0,
        help="before a trial, wait until the machine is busy less than this %% of a core (0: no wait)",
    )  # fmt: skip
    r.add_argument("--quiet-seconds", type=float, default=5.0, help="over this many seconds")
    r.add_argument("--quiet-timeout", type=float, default=900.0, help="then start anyway")
    r.add_argument("--profile", action="store_true", help="py-spy record the server in the window")
    r.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames: gc)")
    r.add_argument(
        "--profile-format", default="raw", choices=["raw", "speedscope"],
        help="speedscope keeps the samples' order (a timeline)",
    )  # fmt: skip
    r.add_argument("--quick", action="store_true", help="smoke: 1 round, 100 books, 5 s")
    r.add_argument("--tag", default="", help="added to the JSON file name")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.warmup, args.duration, args.drain = 1, 2.0, 5.0, 2.0
        args.books = min(args.books, 100)
    return args


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for store, workers in itertools.product(args.stores.split(","), args.workers.split(",")):
        w = int(workers)
        redis = w > 1 or args.redis_one_worker
        out.append({
            "name": f"{store}-w{w}{'-redis' if redis else ''}",
            "store": store,
            "workers": w,
            "redis": redis,
            "server_cpus": args.server_cpus or ("0" if w == 1 else "0,1"),
            "load_cpus": args.load_cpus or ("1" if w == 1 else ""),
        })  # fmt: skip
    return out


# -- measurement helpers ----------------------------------------------------------------------
def pct(v: Any, q: float) -> float | None:
    if not v:
        return None
    return round(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))] / 1e6, 2)


def latency_summary(ns: Any) -> dict[str, Any]:
    v = sorted(ns)
    return {
        "n": len(v),
        "p50_ms": pct(v, 0.50),
        "p90_ms": pct(v, 0.90),
        "p99_ms": pct(v, 0.99),
        "p999_ms": pct(v, 0.999),
        "max_ms": round(v[-1] / 1e6, 2) if v else None,
    }


def runqueue_wait_s(pids: list[int]) -> float:
    """Seconds the threads of ``pids`` were runnable but waiting for a CPU (/proc schedstat)."""
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


def redis_pids(port: int = 6379) -> list[int]:
    """The machine's redis-server on ``port`` (shared: others' use counts too)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"redis-server" in cmd and f":{port}".encode() in cmd:
            out.append(int(name))
    return out


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has been busy (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_quiet(below: float, seconds: float, timeout: float) -> dict[str, float]:
    """Wait (at most ``timeout`` s) until the machine was busy less than ``below`` % of one core
    over ``seconds`` s: on a shared machine a trial should not start beside someone's test suite."""
    t0 = time.monotonic()
    while True:
        b0 = machine_busy_s()
        time.sleep(seconds)
        busy = 100 * (machine_busy_s() - b0) / seconds
        waited = time.monotonic() - t0
        if busy < below or waited >= timeout:
            return {"waited_s": round(waited, 1), "busy_pct": round(busy, 1)}


def process_rss(pids: list[int]) -> list[dict[str, Any]]:
    out = []
    for p in pids:
        try:
            comm = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        out.append({"pid": p, "comm": comm, "rss_kb": round(procstat.rss_kb([p]))})
    return out


def start_profile(
    args: argparse.Namespace, cfg: dict[str, Any], server: BookServer
) -> tuple[subprocess.Popen[bytes], Path] | None:
    """py-spy (``pip install py-spy``) on the server tree for the window, raw format."""
    pyspy = ROOT / ".venv" / "bin" / "py-spy"
    if not pyspy.exists():
        print("  (py-spy not installed in .venv: pip install py-spy)", flush=True)
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    ext = "txt" if args.profile_format == "raw" else "json"
    path = RESULTS / f"book-relay-profile-{cfg['name']}-{stamp}.{ext}"
    cmd = [str(pyspy), "record", "--pid", str(server.pid), "--subprocesses",
           "--duration", str(int(args.duration)), "--rate", "250",
           "--format", args.profile_format, "--output", str(path)]  # fmt: skip
    # --native (C frames, e.g. the garbage collector) must pause the process for each sample.
    cmd.append("--native" if args.profile_native else "--nonblocking")
    if cfg["load_cpus"]:
        cmd = ["taskset", "-c", cfg["load_cpus"], *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path


# -- one trial --------------------------------------------------------------------------------
def socket_specs(layout: Layout) -> list[SocketSpec]:
    return [
        SocketSpec(
            m.index, m.token, layout.books[m.book], m.book, m.members, m.book == layout.hot_book
        )  # fmt: skip
        for m in layout.members
    ]


async def measure(
    args: argparse.Namespace, cfg: dict[str, Any], server: BookServer, workers: list[DeviceWorker],
    n_sockets: int,
) -> dict[str, Any]:  # fmt: skip
    for w in workers:
        w.attach()
    try:
        return await _measure(args, cfg, server, workers, n_sockets)
    finally:
        for w in workers:
            w.detach()


async def _measure(
    args: argparse.Namespace, cfg: dict[str, Any], server: BookServer, workers: list[DeviceWorker],
    n_sockets: int,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    tree = procstat.tree(server.pid)
    out["server_rss_kb_before_connect"] = round(procstat.rss_kb(tree))
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
    out.update(sockets_connected=connected, sockets_failed=failed,
               connect_seconds=round(slowest, 2))  # fmt: skip
    if failed:
        raise RuntimeError(f"{failed} of {n_sockets} sockets failed: {first_error}")
    await asyncio.sleep(1.0)  # presence frames of the connect phase settle
    tree = procstat.tree(server.pid)
    out["server_rss_kb_connected_idle"] = round(procstat.rss_kb(tree))

    t_start = time.monotonic() + 0.5
    m0 = t_start + args.warmup
    m1 = m0 + args.duration
    for w in workers:
        w.send("run", t_start, m0, m1, m1)
    load_pids = [os.getpid()] + [w.pid for w in workers]
    await asyncio.sleep(max(0.0, m0 - time.monotonic()))
    tree = procstat.tree(server.pid)
    pg = server.pg_backend_pids()
    rpids = redis_pids()
    meters = {
        "server": procstat.CpuMeter(tree),
        "pg_backends": procstat.CpuMeter(pg),
        "redis_shared": procstat.CpuMeter(rpids),
        "load": procstat.CpuMeter(load_pids),
    }
    prof = start_profile(args, cfg, server) if args.profile or args.profile_native else None
    now = time.monotonic()
    for m in meters.values():
        m.start(now)
    wait0, tw0, busy0 = runqueue_wait_s(tree), now, machine_busy_s()
    wall0 = time.time()
    rss_max = 0.0
    while time.monotonic() < m1 - 0.05:
        await asyncio.sleep(min(5.0, max(0.0, m1 - time.monotonic() - 0.05)))
        rss_max = max(rss_max, procstat.rss_kb(tree))
    now = time.monotonic()
    cpu = {f"{k}_cpu_pct": round(m.percent(now), 1) for k, m in meters.items()}
    cpu["server_runqueue_wait_pct"] = round(
        100 * (runqueue_wait_s(tree) - wait0) / max(1e-9, now - tw0), 1
    )
    window = now - tw0
    wall1 = time.time()
    # Whatever else ran on the machine meanwhile (others' test suites; kernel softirq time of
    # our own loopback traffic not charged to a process lands here too).
    busy = 100 * (machine_busy_s() - busy0) / max(1e-9, window)
    ours = sum(v for k, v in cpu.items() if k.endswith("_cpu_pct"))
    cpu["machine_busy_pct"] = round(busy, 1)
    cpu["other_cpu_pct"] = round(max(0.0, busy - ours), 1)
    rss_end = procstat.rss_kb(tree)
    out["server_processes"] = process_rss(tree)
    # WORKERS > 1: the tree is the supervisor (the started pid) and its workers.
    workers_only = [p for p in tree if p != server.pid] or tree
    out["server_rss_kb_workers"] = round(procstat.rss_kb(workers_only))
    out["pg_backends"] = len(pg)
    await asyncio.sleep(max(0.0, m1 + args.drain - time.monotonic()))
    out["history_commits"] = server.history_batches(int(wall0 * 1000), int(wall1 * 1000))
    if prof is not None:
        proc, path = prof
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out["profile_raw"] = str(path.relative_to(ROOT))

    for w in workers:
        w.send("report")
    rep: dict[str, Any] = {}
    lat, lat_hot, ack, lag = array("q"), array("q"), array("q"), array("q")
    unacked = 0
    per_s_sent: list[int] = []
    per_s_delivered: list[int] = []
    per_s_max: list[int] = []
    samples: list[str] = []
    for w in workers:
        msg = await w.recv(60)
        if msg[0] != "report":
            raise RuntimeError(f"load process answered {msg[:1]!r} (exit {w.proc.exitcode})")
        _, counters, a, b, c, d, left = msg
        for key, value in counters.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                rep[key] = (
                    max(rep.get(key, 0), value) if key == "max_late_ms" else rep.get(key, 0) + value
                )
        per_s_sent = _add(per_s_sent, counters["per_s_sent"])
        per_s_delivered = _add(per_s_delivered, counters["per_s_delivered"])
        per_s_max = [max(a, b) for a, b in itertools.zip_longest(
            per_s_max, counters["per_s_max_us"], fillvalue=0)]  # fmt: skip
        samples.extend(counters["error_samples"])
        for arr, raw in ((lat, a), (lat_hot, b), (ack, c), (lag, d)):
            arr.frombytes(raw)
        unacked += left
    dur = args.duration
    relay_all = array("q", lat)
    relay_all.extend(lat_hot)
    ops_s = rep["sent_win"] / dur
    out.update({
        "window_seconds": round(window, 2),
        "ops_per_s": round(ops_s, 1),
        "acked_ops_per_s": round(rep["acks_win"] / dur, 1),
        "deliveries_per_s": round(rep["deliveries_win"] / dur, 1),
        "hot_deliveries_per_s": round(rep["deliveries_hot_win"] / dur, 1),
        "ops_per_s_min_second": min(per_s_sent) if per_s_sent else 0,
        "ops_per_s_max_second": max(per_s_sent) if per_s_sent else 0,
        "deliveries_min_second": min(per_s_delivered) if per_s_delivered else 0,
        "deliveries_max_second": max(per_s_delivered) if per_s_delivered else 0,
        "window_ops": rep["sent_win"],
        "window_acks": rep["acks_win"],
        "window_deliveries": rep["deliveries_win"],
        "window_deliveries_expected": rep["expected_win"],
        "every_window_op_acked": rep["acks_win"] == rep["sent_win"],
        "every_window_op_delivered": rep["deliveries_win"] == rep["expected_win"],
        "unacked_at_end": unacked,
        "relay_latency": latency_summary(relay_all),
        "relay_latency_books": latency_summary(lat),
        "relay_latency_hot": latency_summary(lat_hot),
        "ack_latency": latency_summary(ack),
        "load_loop_lag": latency_summary(lag),
        **cpu,
        "server_cpu_ms_per_op": round(cpu["server_cpu_pct"] * 10 / max(1e-9, ops_s), 3),
        "server_rss_kb": round(rss_end),
        "server_rss_kb_max": round(max(rss_max, rss_end)),
        "totals": {k: v for k, v in rep.items() if k not in ("max_late_ms", "sum_late_ms")},
        "send_lateness": {
            "max_ms": round(rep["max_late_ms"], 2),
            "mean_ms": round(rep["sum_late_ms"] / max(1, rep["sent_win"]), 3),
            "over_5ms": rep["late_sends"],
        },
        "error_samples": samples[:5],
        "per_second_ops": per_s_sent,
        "per_second_deliveries": per_s_delivered,
        "per_second_max_relay_ms": [round(v / 1000, 1) for v in per_s_max],
    })  # fmt: skip
    return out


def _add(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def trial(args: argparse.Namespace, cfg: dict[str, Any], round_: int) -> dict[str, Any]:
    extra = dict(s.split("=", 1) for s in args.setting)
    server = BookServer(store=cfg["store"], workers=cfg["workers"], redis=cfg["redis"],
                        cpus=cfg["server_cpus"], extra=extra)  # fmt: skip
    workers: list[DeviceWorker] = []
    result: dict[str, Any] = {"config": cfg["name"], "round": round_ + 1,
                              "loadavg_before": os.getloadavg()}  # fmt: skip
    try:
        if args.quiet_below > 0:
            result["quiet_wait"] = q = wait_quiet(
                args.quiet_below, args.quiet_seconds, args.quiet_timeout
            )
            print(f"  waited {q['waited_s']} s for a quiet machine (busy {q['busy_pct']} %)",
                  flush=True)  # fmt: skip
        server.start()
        result["settings"] = server.settings()
        result["postgres"] = server.pg_settings()
        layout = asyncio.run(
            build(server.base, server.setup_db_url, server.schema, args.books,
                  args.devices_per_book, args.hot_devices)
        )  # fmt: skip
        result["layout"] = describe(layout)
        sockets = socket_specs(layout)
        n = max(1, args.load_procs)
        for i in range(n):
            spec = DeviceSpec("127.0.0.1", server.port, sockets[i::n], args.period, args.payload,
                              args.concurrency, 30.0, 1800.0, cfg["load_cpus"], 1000 * round_ + i,
                              not args.no_op_id)  # fmt: skip
            workers.append(DeviceWorker(spec))
        result.update(uvloop.run(measure(args, cfg, server, workers, len(sockets))))
    finally:
        try:
            for w in workers:
                w.join()
        finally:
            result["book_ops_rows"] = server.count_rows("book_ops")
            tail = server.log_tail(1500)
            server.stop()
        if "Traceback" in tail or "ERROR" in tail:
            result["server_log_tail"] = tail
    return result


# -- summary ----------------------------------------------------------------------------------
FIGURES = (
    "ops_per_s", "acked_ops_per_s", "deliveries_per_s", "relay_latency.p50_ms",
    "relay_latency.p99_ms", "relay_latency.p999_ms", "relay_latency.max_ms",
    "relay_latency_books.p99_ms", "relay_latency_hot.p99_ms", "ack_latency.p50_ms",
    "ack_latency.p99_ms", "server_cpu_pct", "server_cpu_ms_per_op", "server_rss_kb",
    "server_runqueue_wait_pct", "pg_backends_cpu_pct", "redis_shared_cpu_pct", "load_cpu_pct",
    "server_rss_kb_workers", "connect_seconds", "send_lateness.max_ms", "load_loop_lag.p99_ms", "load_loop_lag.max_ms",
    "other_cpu_pct", "history_commits.ops_per_commit", "history_commits.commits_per_s",
)  # fmt: skip


def _get(t: dict[str, Any], path: str) -> Any:
    v: Any = t
    for part in path.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in FIGURES:
        vals = [float(v) for t in trials if isinstance(v := _get(t, path), int | float)]
        if vals:
            out[path] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                         "values": vals}  # fmt: skip
    out["all_delivered"] = all(t.get("every_window_op_delivered") for t in trials)
    out["all_acked"] = all(t.get("every_window_op_acked") for t in trials)
    out["out_of_order"] = sum(_get(t, "totals.out_of_order") or 0 for t in trials)
    out["errors"] = sum(_get(t, "totals.errors") or 0 for t in trials)
    out["sockets_lost"] = sum(_get(t, "totals.lost") or 0 for t in trials)
    out["book_ops_rows"] = [t.get("book_ops_rows") for t in trials]
    out["failed_trials"] = sum(1 for t in trials if "error" in t)
    return out


def fmt(s: dict[str, Any], path: str, digits: int = 1) -> str:
    v = s.get(path)
    if not v:
        return "-"
    f = f"{{:,.{digits}f}}"
    if len(v["values"]) == 1:
        return f.format(v["median"])
    return f"{f.format(v['median'])} ({f.format(v['min'])}-{f.format(v['max'])})"


def print_table(summaries: dict[str, dict[str, Any]]) -> None:
    rows = [
        ("ops/s sent (window)", "ops_per_s", 1), ("acks/s", "acked_ops_per_s", 1),
        ("deliveries/s", "deliveries_per_s", 1), ("relay p50 ms", "relay_latency.p50_ms", 2),
        ("relay p99 ms", "relay_latency.p99_ms", 2), ("relay p99.9 ms", "relay_latency.p999_ms", 2),
        ("relay max ms", "relay_latency.max_ms", 2),
        ("relay p99 ms, 3-device books", "relay_latency_books.p99_ms", 2),
        ("relay p99 ms, hot book", "relay_latency_hot.p99_ms", 2),
        ("ack p50 ms", "ack_latency.p50_ms", 2), ("ack p99 ms", "ack_latency.p99_ms", 2),
        ("server CPU % of a core", "server_cpu_pct", 1),
        ("server CPU ms per op", "server_cpu_ms_per_op", 3),
        ("server RSS KB (tree)", "server_rss_kb", 0),
        ("server RSS KB (workers)", "server_rss_kb_workers", 0),
        ("server run-queue wait %", "server_runqueue_wait_pct", 1),
        ("PG backends CPU %", "pg_backends_cpu_pct", 1),
        ("Redis CPU % (shared)", "redis_shared_cpu_pct", 1), ("load CPU %", "load_cpu_pct", 1),
        ("other processes' CPU %", "other_cpu_pct", 1),
        ("history: ops per commit", "history_commits.ops_per_commit", 1),
        ("history: commits/s", "history_commits.commits_per_s", 1),
        ("load loop lag p99 ms", "load_loop_lag.p99_ms", 2),
        ("load loop lag max ms", "load_loop_lag.max_ms", 2),
        ("connect s", "connect_seconds", 2), ("max send lateness ms", "send_lateness.max_ms", 2),
    ]  # fmt: skip
    names = list(summaries)
    print("\n| figure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, path, digits in rows:
        print(f"| {label} | " + " | ".join(fmt(summaries[n], path, digits) for n in names) + " |")
    for key in ("all_delivered", "all_acked", "out_of_order", "errors", "sockets_lost",
                "book_ops_rows", "failed_trials"):  # fmt: skip
        print(f"| {key} | " + " | ".join(str(summaries[n][key]) for n in names) + " |")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except OSError:
        return ""


def json_name(args: argparse.Namespace, stamp: str) -> str:
    return f"book-relay{'-' + args.tag if args.tag else ''}-{stamp}.json"


def write_doc(
    args: argparse.Namespace, cfgs: list[dict[str, Any]], trials: list[dict[str, Any]], stamp: str,
    complete: bool,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The JSON of the run so far (rewritten after every trial); the summaries per config."""
    summaries = {c["name"]: summarize([t for t in trials if t["config"] == c["name"]])
                 for c in cfgs}  # fmt: skip
    doc = {
        "benchmark": "book_relay",
        "complete": complete,
        "command": " ".join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
        "commit": git_commit(),
        "started_utc": stamp,
        "finished_utc": datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": machine(),
        "configs": cfgs,
        "args": vars(args),
        "summary": summaries,
        "trials": trials,
    }
    path = RESULTS / json_name(args, stamp)
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return summaries


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    cfgs = configs(args)
    devices = args.books * args.devices_per_book + args.hot_devices
    print(f"book relay: {args.books} books x {args.devices_per_book} + hot book of "
          f"{args.hot_devices} ({devices} sockets), one {args.payload} B op per device every "
          f"{args.period} s; {[c['name'] for c in cfgs]} x {args.runs} rounds; "
          f"load avg {os.getloadavg()}", flush=True)  # fmt: skip
    trials: list[dict[str, Any]] = []
    for r in range(args.runs):
        order = cfgs[r % len(cfgs) :] + cfgs[: r % len(cfgs)]
        for cfg in order:
            if cfg["load_cpus"]:
                os.sched_setaffinity(0, {int(c) for c in cfg["load_cpus"].split(",")})
            else:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            print(f"round {r + 1}/{args.runs}: {cfg['name']} (server cores {cfg['server_cpus']}, "
                  f"load cores {cfg['load_cpus'] or 'any'})", flush=True)  # fmt: skip
            try:
                t = trial(args, cfg, r)
            except Exception as exc:  # noqa: BLE001 - recorded; the other trials still run
                print(f"  FAILED: {exc!r}"[:800], flush=True)
                t = {"config": cfg["name"], "round": r + 1, "error": repr(exc)[:2000]}
            trials.append(t)
            write_doc(args, cfgs, trials, stamp, complete=False)  # a killed run keeps its trials
            rl, ak = t.get("relay_latency", {}), t.get("ack_latency", {})
            print(f"  {t.get('ops_per_s')} ops/s, {t.get('deliveries_per_s')} deliveries/s "
                  f"({t.get('window_deliveries')}/{t.get('window_deliveries_expected')}), relay "
                  f"p50 {rl.get('p50_ms')} / p99 {rl.get('p99_ms')} / max {rl.get('max_ms')} ms, "
                  f"ack p99 {ak.get('p99_ms')} ms, server {t.get('server_cpu_pct')} % "
                  f"(run-queue wait {t.get('server_runqueue_wait_pct')} %) "
                  f"{t.get('server_rss_kb')} KB, PG {t.get('pg_backends_cpu_pct')} %, load "
                  f"{t.get('load_cpu_pct')} %, others {t.get('other_cpu_pct')} %, "
                  f"book_ops {t.get('book_ops_rows')}", flush=True)  # fmt: skip
    summaries = write_doc(args, cfgs, trials, stamp, complete=True)
    print_table(summaries)
    print(
        f"\nmedian (min-max) of {args.runs} round(s); JSON: bench/results/{json_name(args, stamp)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

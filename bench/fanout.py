"""Fan-out benchmarks A-D of /work/shared/spec/performance.md against one target.

    .venv/bin/python bench/fanout.py --peer nats                     # A B C D, 3 runs each
    .venv/bin/python bench/fanout.py --peer nchan --tests A --quick  # seconds-long smoke run
    .venv/bin/python bench/fanout.py --adapter switchboard --port 8080 --server-pid PID

With --peer the peer is started fresh for every trial (bench/peers/run.py), pinned
to --server-cpus; the load (this process and its load processes) is pinned to
--load-cpus. Prints a table (median and min-max over --runs) and writes JSON to
bench/results/. See bench/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import sbsetup  # noqa: E402
from loadgen.adapters import ADAPTERS, SwitchboardAdapter  # noqa: E402
from loadgen.session import Layout, Session, median_spread  # noqa: E402
from peers.run import PEERS, SWITCHBOARD_DATA, Peer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
P99_BOUND_MS = 100.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    t = p.add_argument_group("target")
    t.add_argument("--peer", choices=list(PEERS), help="start this peer fresh for every trial")
    t.add_argument("--adapter", choices=list(ADAPTERS), help="protocol (default: the peer's)")
    t.add_argument("--host", default="127.0.0.1")
    t.add_argument("--port", type=int, help="target port (default: the peer's)")
    t.add_argument("--server-pid", type=int, help="pid of an already running target (CPU/RSS)")
    t.add_argument("--server-cpus", default="0", help="taskset core list for a started peer")
    t.add_argument(
        "--load-cpus", default="1", help="cores for the load processes ('' = no pinning)"
    )
    sb = p.add_argument_group("switchboard (see bench/README.md)")
    sb.add_argument(
        "--sb-data-dir",
        default=str(SWITCHBOARD_DATA),
        help="the server's DATA_DIR (devices and books of earlier runs are reused)",
    )
    sb.add_argument(
        "--sb-reset", action="store_true", help="delete --sb-data-dir first (fresh devices)"
    )
    sb.add_argument(
        "--sb-source",
        default="",
        metavar="DIR",
        help="serve the relay/api/shared packages of another checkout (PYTHONPATH=DIR), e.g."
        " a worktree of an older commit, for before/after figures from the same run",
    )
    sb.add_argument(
        "--sb-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra server setting, e.g. WORKERS=2 (repeatable)",
    )
    r = p.add_argument_group("runs")
    r.add_argument("--tests", default="ABCD", help="which tests, e.g. AC")
    r.add_argument("--runs", type=int, default=3, help="trials per test (median and spread)")
    r.add_argument(
        "--quick", action="store_true", help="smoke settings: 1 run, short phases, fewer sockets"
    )
    r.add_argument("--workers", type=int, default=2, help="load processes for counting sockets")
    r.add_argument("--src-addrs", type=int, default=0, help="loopback source addresses (0: auto)")
    r.add_argument(
        "--rcvlowat", type=int, default=8192, help="SO_RCVLOWAT of counting sockets (bytes)"
    )
    r.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per process")
    r.add_argument("--payload", type=int, default=100, help="payload bytes")
    r.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring a phase")
    r.add_argument("--tag", default="", help="added to the JSON file name")
    a = p.add_argument_group("A: 1 channel x N sockets, peak, then paced steps")
    a.add_argument("--a-subs", type=int, default=1000)
    a.add_argument("--a-seconds", type=float, default=10.0, help="peak measurement")
    a.add_argument(
        "--window", type=int, default=64, help="messages per channel ahead of the slowest sample"
    )
    a.add_argument("--samples", type=int, default=20, help="sampled (parsed) sockets in A and C")
    a.add_argument(
        "--a-steps",
        default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
        help="paced rates as fractions of the peak ('' = skip)",
    )
    a.add_argument("--step-seconds", type=float, default=4.0)
    b = p.add_argument_group("B: fixed rate latency")
    b.add_argument("--b-subs", type=int, default=1000)
    b.add_argument("--b-rate", type=float, default=20000.0, help="deliveries/s")
    b.add_argument("--b-seconds", type=float, default=15.0)
    b.add_argument(
        "--b-samples", type=int, default=20, help="sampled sockets, spread over all subscribers"
    )
    c = p.add_argument_group("C: many channels")
    c.add_argument("--c-channels", type=int, default=1000)
    c.add_argument("--c-subs", type=int, default=10, help="sockets per channel")
    c.add_argument("--c-seconds", type=float, default=10.0)
    c.add_argument(
        "--c-window", type=int, default=8, help="messages per channel ahead of the slowest sample"
    )
    c.add_argument(
        "--c-rcvlowat",
        type=int,
        default=1024,
        help="SO_RCVLOWAT of C's counting sockets: each gets 1/10,000 of the rate, so the A value"
        " (8 KB) would wake a slow target's sockets less than once per phase",
    )
    d = p.add_argument_group("D: idle sockets")
    d.add_argument("--d-sockets", type=int, default=10000)
    d.add_argument(
        "--d-channels", type=int, default=1, help="channels the idle sockets subscribe to"
    )
    d.add_argument("--d-settle", type=float, default=3.0, help="seconds before reading RSS")
    e = p.add_argument_group("E: many idle sockets over several workers (Switchboard only)")
    e.add_argument("--e-sockets", type=int, default=100000)
    e.add_argument("--e-channels", type=int, default=10000, help="books (sockets spread evenly)")
    e.add_argument("--e-hold", type=float, default=600.0, help="seconds to hold them all open")
    e.add_argument("--e-sample", type=float, default=30.0, help="seconds between RSS/CPU samples")
    sb.add_argument(
        "--sb-redis",
        type=int,
        default=0,
        metavar="PORT",
        help="start a private redis-server on PORT per trial and point REDIS_URL at it",
    )
    args = p.parse_args(argv)
    if not args.peer and not (args.adapter and args.port):
        p.error("give --peer, or --adapter and --port for a running target")
    args.adapter = args.adapter or args.peer
    args.port = args.port or PEERS[args.peer].port
    if args.quick:
        args.runs = 1
        args.warmup, args.a_seconds, args.c_seconds, args.b_seconds = 0.5, 2.0, 2.0, 3.0
        args.step_seconds, args.a_steps = 1.0, "0.25,0.5,1.0"
        args.a_subs, args.b_subs = 200, 200
        args.c_channels, args.d_sockets, args.d_settle = 100, 1000, 1.0
    return args


def layout(
    args: argparse.Namespace,
    channels: int,
    subs: int,
    sampled: int,
    publishers: bool,
    rcvlowat: int | None = None,
) -> Layout:
    total = channels * subs + (channels if publishers else 0)
    n_src = args.src_addrs or 1 + total // 25000  # ~28k ephemeral ports per source address
    workers = max(args.workers, math.ceil(total / 15000))  # stay under 20,000 open files each
    return Layout(
        args.adapter,
        args.host,
        args.port,
        channels,
        subs,
        sampled,
        publishers,
        workers,
        [f"127.0.0.{i + 1}" for i in range(n_src)],
        args.payload,
        args.rcvlowat if rcvlowat is None else rcvlowat,
        args.concurrency,
    )


# -- the tests: each gets a connected Session and returns one trial's figures ----------------


async def test_a(s: Session, args: argparse.Namespace) -> dict[str, Any]:
    await s.publish_unpaced(args.warmup, args.window)
    ph = s.phase()
    await s.publish_unpaced(args.a_seconds, args.window)
    out: dict[str, Any] = {
        "peak": s.measure(ph),
        "bytes_per_delivery_seen": s.bytes_per_delivery_seen(),
    }
    out["peak"]["drained"] = await s.drain()
    peak = out["peak"]["deliveries_per_s"]
    steps, best, fails = [], 0.0, 0
    for frac in [float(f) for f in args.a_steps.split(",") if f]:
        target = frac * peak
        msgs = target / s.layout.subscribers
        await s.publish_paced(min(1.0, args.warmup), msgs)
        ph = s.phase()
        await s.publish_paced(args.step_seconds, msgs)
        m = s.measure(ph)
        m["target_per_s"] = target
        # Counting sockets wake once per SO_RCVLOWAT bytes, too coarse for short paced
        # steps: the rate a step achieved is the sampled sockets' (parsed, exact) rate.
        achieved = m.get("sampled_rate_per_s", 0.0)
        m["ok"] = m.get("p99_ms", math.inf) <= P99_BOUND_MS and achieved >= 0.9 * target
        m["drained"] = await s.drain()
        steps.append(m)
        if m["ok"]:
            best, fails = max(best, achieved), 0
        else:
            fails += 1
            if fails >= 2:
                break
    out["steps"] = steps
    out["best_at_p99"] = best
    return out


async def test_b(s: Session, args: argparse.Namespace) -> dict[str, Any]:
    msgs = args.b_rate / s.layout.subscribers
    await s.publish_paced(args.warmup, msgs)
    ph = s.phase()
    await s.publish_paced(args.b_seconds, msgs)
    out = s.measure(ph)
    out["target_per_s"] = args.b_rate
    out["drained"] = await s.drain()
    return out


async def test_c(s: Session, args: argparse.Namespace) -> dict[str, Any]:
    await s.publish_unpaced(args.warmup, args.c_window)
    ph = s.phase()
    await s.publish_unpaced(args.c_seconds, args.c_window)
    out = s.measure(ph)
    out["bytes_per_delivery_seen"] = s.bytes_per_delivery_seen()
    out["drained"] = await s.drain()
    return out


async def test_d(s: Session, args: argparse.Namespace) -> dict[str, Any]:
    # Session.run measured the RSS before connecting and the time to connect.
    await asyncio_sleep(args.d_settle)
    n = s.layout.subscribers
    after = s.server_rss_kb()
    return {
        "sockets": n,
        "connect_seconds": s.connect_seconds,
        "sockets_per_s": n / s.connect_seconds if s.connect_seconds else 0.0,
        "rss_before_kb": s.rss_before_kb,
        "rss_after_kb": after,
        "kb_per_socket": (after - s.rss_before_kb) / n,
        "lost_sockets": s.lost(),
    }


async def test_e(s: Session, args: argparse.Namespace) -> dict[str, Any]:
    """Hold every socket open for --e-hold seconds (server heartbeats on), sampling the server."""
    import time as _time

    from loadgen.procstat import CpuMeter, tree

    n = s.layout.subscribers
    out: dict[str, Any] = {
        "sockets": n,
        "connect_seconds": s.connect_seconds,
        "sockets_per_s": n / s.connect_seconds if s.connect_seconds else 0.0,
        "rss_before_kb": s.rss_before_kb,
        "samples": [],
    }
    t0 = _time.perf_counter()
    while (elapsed := _time.perf_counter() - t0) < args.e_hold:
        pids = tree(s.server_pid) if s.server_pid else []
        meter = CpuMeter(pids)
        meter.start(_time.perf_counter())
        await asyncio_sleep(min(args.e_sample, args.e_hold - elapsed))
        pids = tree(s.server_pid) if s.server_pid else []
        rss = s.server_rss_kb()
        out["samples"].append(
            {
                "t": round(_time.perf_counter() - t0, 1),
                "server_rss_kb": rss,
                "kb_per_socket": (rss - s.rss_before_kb) / n,
                "server_cpu_pct": meter.percent(_time.perf_counter()),
                "server_processes": len(pids),
                "lost_sockets": s.lost(),
            }
        )
        print(f"    E t={out['samples'][-1]['t']:.0f}s {out['samples'][-1]}", flush=True)
    last = out["samples"][-1] if out["samples"] else {}
    out["kb_per_socket"] = last.get("kb_per_socket", 0.0)
    out["server_cpu_pct"] = statistics_mean([x["server_cpu_pct"] for x in out["samples"]])
    out["lost_sockets"] = s.lost()
    out["held_seconds"] = _time.perf_counter() - t0
    return out


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


TESTS: dict[
    str,
    tuple[
        Callable[[argparse.Namespace], Layout],
        Callable[[Session, argparse.Namespace], Awaitable[dict[str, Any]]],
    ],
] = {
    "A": (lambda a: layout(a, 1, a.a_subs, a.samples, True), test_a),
    "B": (lambda a: layout(a, 1, a.b_subs, a.b_samples, True), test_b),
    "C": (lambda a: layout(a, a.c_channels, a.c_subs, a.samples, True, a.c_rcvlowat), test_c),
    "D": (lambda a: layout(a, a.d_channels, a.d_sockets // a.d_channels, 0, False), test_d),
    "E": (lambda a: layout(a, a.e_channels, a.e_sockets // a.e_channels, 0, False), test_e),
}


async def run_session(
    s: Session,
    test: Callable[[Session, argparse.Namespace], Awaitable[dict[str, Any]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    s.rss_before_kb = s.server_rss_kb()
    try:
        await s.connect()
        await s.wait_subscribed()
        result = await test(s, args)
        result["connect_seconds"] = s.connect_seconds
        return result
    finally:
        await s.close()


@contextlib.contextmanager
def private_redis(port: int, cpus: str) -> Iterator[None]:
    """A fresh redis-server of our own (no persistence), so no shared instance is disturbed."""
    import socket as _socket

    proc = subprocess.Popen(
        ["taskset", "-c", cpus, "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--maxclients", "10000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with _socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def target(args: argparse.Namespace) -> Iterator[int | None]:
    if args.peer:
        env = dict(kv.split("=", 1) for kv in args.sb_env)
        with contextlib.ExitStack() as stack:
            if args.peer == "switchboard":
                env["DATA_DIR"] = args.sb_data_dir
                if args.sb_source:
                    env["PYTHONPATH"] = str(Path(args.sb_source).resolve())
                if args.sb_redis:
                    # Not pinned: it serves every worker, wherever they run.
                    every_cpu = ",".join(str(c) for c in sorted(os.sched_getaffinity(0) | {0, 1}))
                    stack.enter_context(private_redis(args.sb_redis, every_cpu))
                    env["REDIS_URL"] = f"redis://127.0.0.1:{args.sb_redis}/0"
            peer = stack.enter_context(Peer(args.peer, args.server_cpus, env=env))
            yield peer.pid
    else:
        yield args.server_pid


_TOKENS: dict[str, list[str]] = {}


def prepare_switchboard(args: argparse.Namespace, lay: Layout) -> None:
    """Devices, books and memberships for this layout (made once, reused), fresh JWTs."""
    data_dir = Path(args.sb_data_dir)
    base = f"http://{args.host}:{args.port}"
    manifest = uvloop.run(sbsetup.ensure(base, data_dir, [(lay.channels, lay.subs_per_channel)]))
    count = lay.channels * lay.subs_per_channel + lay.channels
    key = f"{data_dir}:{count}"
    if key not in _TOKENS:
        _TOKENS[key] = sbsetup.tokens(manifest, count)
    books = manifest.books[sbsetup.layout_key(lay.channels, lay.subs_per_channel)]
    SwitchboardAdapter.configure(books, _TOKENS[key], lay.subs_per_channel)


def run_trial(name: str, args: argparse.Namespace) -> dict[str, Any]:
    make_layout, test = TESTS[name]
    lay = make_layout(args)
    with target(args) as pid:
        if args.adapter == "switchboard":
            prepare_switchboard(args, lay)
        s = Session(lay, pid)
        s.fork_workers()
        try:
            return uvloop.run(run_session(s, test, args))
        finally:
            s.close_workers()


# -- summary ---------------------------------------------------------------------------------

FIGURES: dict[str, list[tuple[str, Callable[[dict[str, Any]], float | None]]]] = {
    "A": [
        ("A peak deliveries/s", lambda r: r["peak"]["deliveries_per_s"]),
        ("A server CPU %", lambda r: r["peak"]["server_cpu_pct"]),
        ("A load CPU %", lambda r: r["peak"]["load_cpu_pct"]),
        ("A @p99<=100ms deliveries/s", lambda r: r["best_at_p99"]),
    ],
    "B": [
        ("B p50 ms", lambda r: r.get("p50_ms")),
        ("B p99 ms", lambda r: r.get("p99_ms")),
        ("B max ms", lambda r: r.get("max_ms")),
        ("B deliveries/s (sampled)", lambda r: r.get("sampled_rate_per_s")),
        ("B load CPU %", lambda r: r["load_cpu_pct"]),
    ],
    "C": [
        ("C deliveries/s", lambda r: r["deliveries_per_s"]),
        ("C deliveries/s (sampled)", lambda r: r.get("sampled_rate_per_s")),
        ("C server CPU %", lambda r: r["server_cpu_pct"]),
        ("C load CPU %", lambda r: r["load_cpu_pct"]),
    ],
    "D": [
        ("D KB/socket", lambda r: r["kb_per_socket"]),
        ("D sockets/s", lambda r: r["sockets_per_s"]),
    ],
    "E": [
        ("E sockets held", lambda r: r["sockets"] - r["lost_sockets"]),
        ("E lost sockets", lambda r: r["lost_sockets"]),
        ("E KB/socket", lambda r: r["kb_per_socket"]),
        ("E server CPU % (hold)", lambda r: r["server_cpu_pct"]),
        ("E sockets/s", lambda r: r["sockets_per_s"]),
    ],
}


def summarize(name: str, trials: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for label, get in FIGURES[name]:
        values = [v for v in (get(t) for t in trials) if v is not None]
        if values:
            med, lo, hi = median_spread(values)
            out[label] = {"median": med, "min": lo, "max": hi, "n": len(values)}
    return out


def fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        ),
        "?",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sb_reset and args.peer == "switchboard":
        import shutil

        shutil.rmtree(args.sb_data_dir, ignore_errors=True)
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",")})
    started = datetime.datetime.now(datetime.UTC)
    report: dict[str, Any] = {
        "target": args.adapter,
        "peer": args.peer,
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "args": vars(args),
        "tests": {},
    }
    failed = False
    RESULTS.mkdir(exist_ok=True)
    path = (
        RESULTS
        / f"fanout-{args.adapter}{'-' + args.tag if args.tag else ''}-{started:%Y%m%dT%H%M%S}.json"
    )
    for name in args.tests.upper():
        trials, errors = [], []
        for i in range(args.runs):
            t0 = time.perf_counter()
            status = ""
            try:
                trials.append(run_trial(name, args))
            except Exception as exc:  # one failed trial must not lose the others
                errors.append(f"{type(exc).__name__}: {exc}")
                status, failed = f" FAILED {errors[-1]}", True
            took = time.perf_counter() - t0
            # Written after every trial: a long run (E) stopped midway keeps what it measured.
            report["tests"][name] = {"trials": trials, "errors": errors}
            path.write_text(json.dumps(report, indent=1, default=str))
            print(
                f"  {args.adapter} {name} run {i + 1}/{args.runs}: {took:.1f}s{status}", flush=True
            )
        report["tests"][name] = {
            "trials": trials,
            "errors": errors,
            "summary": summarize(name, trials),
        }
        for label, v in report["tests"][name]["summary"].items():
            print(
                f"    {label:28s} {fmt(v['median']):>12s}  ({fmt(v['min'])} - {fmt(v['max'])}, n={v['n']})",
                flush=True,
            )
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

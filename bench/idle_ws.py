"""Idle authenticated /ws sockets: server RSS per socket and sockets opened per second.

    .venv/bin/python bench/idle_ws.py                       # 10,000 sockets, SQLite, 3 runs
    .venv/bin/python bench/idle_ws.py --postgres
    .venv/bin/python bench/idle_ws.py --sockets 2000 --runs 1   # smoke

Every trial starts a fresh ``switchboard serve`` pinned to --server-cpus (limits raised as in
bench/durable.py), creates --users accounts with one API token each (scopes publish +
subscribe), and opens --sockets ``/ws?token=...&device_id=...`` sockets spread over the users,
each with its own device_id (so each registers a device for its user's inbox), from load
processes on --load-cpus. "Opened" = TCP connect, 101 checked, ``hello`` received (the socket
is authenticated, its device registered and subscribed). After --settle seconds:
KB/socket = (server RSS after - server RSS before connecting) / sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from durable.devices import DeviceSpec, DeviceWorker, mark_all  # noqa: E402
from durable.server import Server, machine  # noqa: E402
from durable.setup import create_accounts  # noqa: E402
from loadgen import procstat  # noqa: E402
from loadgen.session import median_spread  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    p.add_argument("--redis", action="store_true", help="REDIS_URL too")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--load-cpus", default="1")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--sockets", type=int, default=10000)
    p.add_argument("--users", type=int, default=100, help="accounts the sockets are spread over")
    p.add_argument("--load-workers", type=int, default=2, help="load processes (<= 15,000 sockets each)")
    p.add_argument("--src-addrs", type=int, default=2, help="loopback source addresses")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per process")
    p.add_argument("--settle", type=float, default=5.0, help="seconds before reading RSS")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


async def measure(args: argparse.Namespace, server: Server, workers: list[DeviceWorker]) -> dict[str, Any]:
    for w in workers:
        w.attach()
    try:
        tree = procstat.tree(server.pid)
        before = procstat.rss_kb(tree)
        cpu = procstat.CpuMeter(tree)
        cpu.start(time.monotonic())
        t0 = time.perf_counter()
        for w in workers:
            w.send("go")
        ok = failed = 0
        slowest = 0.0
        err = ""
        for w in workers:
            msg = await w.recv(600)
            if msg[0] != "connected":
                raise RuntimeError(f"load process: {msg}")
            ok, failed = ok + msg[1], failed + msg[2]
            slowest = max(slowest, msg[3])
            err = err or msg[4]
        wall = time.perf_counter() - t0
        connect_cpu = cpu.percent(time.monotonic())
        await asyncio.sleep(args.settle)
        after = procstat.rss_kb(procstat.tree(server.pid))
        m = await mark_all(workers)
        return {
            "sockets_open": ok,
            "sockets_failed": failed,
            "first_error": err,
            "connect_seconds": round(slowest, 2),
            "sockets_per_s": round(ok / slowest) if slowest else None,
            "connect_wall_seconds": round(wall, 2),
            "server_cpu_pct_while_connecting": round(connect_cpu, 1),
            "server_rss_kb_before": round(before),
            "server_rss_kb_after": round(after),
            "kb_per_socket": round((after - before) / max(1, ok), 2),
            "sockets_lost_after_open": m.lost,
            "unexpected_frames": m.other,
        }
    finally:
        for w in workers:
            w.detach()


def trial(args: argparse.Namespace, index: int) -> dict[str, Any]:
    server = Server(store="postgresql" if args.postgres else "sqlite", redis=args.redis,
                    cpus=args.server_cpus, extra=dict(s.split("=", 1) for s in args.setting))  # fmt: skip
    workers: list[DeviceWorker] = []
    result: dict[str, Any] = {"trial": index + 1}
    try:
        server.start()
        result["settings"] = server.settings()
        per_user = math.ceil(args.sockets / args.users)
        accounts, setup_s = asyncio.run(create_accounts(server.base, args.users, per_user))
        result["setup_seconds"] = round(setup_s, 1)
        outbox = server.data_dir / "outbox"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            outbox.is_dir() and sum(1 for _ in outbox.glob("*.eml")) >= args.users
        ):
            time.sleep(0.2)
        time.sleep(1.0)
        sockets = [(a.token, d, False) for a in accounts for d in a.devices][: args.sockets]
        n = max(args.load_workers, math.ceil(len(sockets) / 15000))
        src = [f"127.0.0.{i + 1}" for i in range(max(1, args.src_addrs))]
        for w in range(n):
            spec = DeviceSpec("127.0.0.1", server.port, sockets[w::n], src, args.concurrency,
                              1.0, 30.0, 1800.0, args.load_cpus)  # fmt: skip
            workers.append(DeviceWorker(spec))
        result.update(uvloop.run(measure(args, server, workers)))
        print(f"  {result['sockets_open']:,} open ({result['sockets_failed']} failed) in "
              f"{result['connect_seconds']} s = {result['sockets_per_s']:,}/s, "
              f"{result['kb_per_socket']} KB/socket", flush=True)  # fmt: skip
    finally:
        try:
            for w in workers:
                w.join()
        finally:
            server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",")})
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    store = "postgresql" if args.postgres else "sqlite"
    print(f"idle_ws: {store}, {args.sockets:,} sockets over {args.users} users, "
          f"load avg {os.getloadavg()}", flush=True)  # fmt: skip
    trials = []
    for i in range(args.runs):
        print(f"trial {i + 1}/{args.runs}", flush=True)
        trials.append(trial(args, i))
    summary = {}
    for key in ("kb_per_socket", "sockets_per_s", "connect_seconds", "server_cpu_pct_while_connecting"):
        vals = [float(t[key]) for t in trials if isinstance(t.get(key), int | float)]
        if vals:
            med, lo, hi = median_spread(vals)
            summary[key] = {"median": med, "min": lo, "max": hi, "values": vals}
    doc = {
        "benchmark": "idle_ws", "store": store, "redis": args.redis,
        "command": " ".join([sys.executable.replace(str(Path.cwd()) + "/", ""), *sys.argv]),
        "started_utc": stamp, "machine": machine(), "args": vars(args),
        "summary": summary, "trials": trials,
    }  # fmt: skip
    name = f"idle_ws-{store}{'-' + args.tag if args.tag else ''}-{stamp}.json"
    (RESULTS / name).write_text(json.dumps(doc, indent=2))
    for key, v in summary.items():
        print(f"  {key:34s} {v['median']:>10,.1f}  ({v['min']:,.1f}-{v['max']:,.1f})")
    print(f"JSON: bench/results/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

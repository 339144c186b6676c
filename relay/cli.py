"""The ``switchboard`` command: ``serve`` and ``migrate``; ``--help`` lists every setting.

``serve`` with ``WORKERS=N`` (N > 1) forks N worker processes that share the port through
SO_REUSEPORT. The parent only supervises: it forwards SIGTERM/SIGINT, restarts a worker that dies
unexpectedly (at most once a second), and tells the metrics module when a worker is gone.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from shared.config import ConfigError, Settings, describe_settings, load_settings
from shared.errors import BackendError

EXIT_CONFIG = 2
EXIT_STARTUP = 1
RESTART_MIN_INTERVAL_S = 1.0  # a worker crashing at start must not become a fork loop


def _parser() -> argparse.ArgumentParser:
    epilog = "settings (environment variables; SWITCHBOARD_CONFIG names an optional TOML file):\n"
    epilog += describe_settings()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="switchboard",
        description="Switchboard realtime relay and REST server.",
        epilog=epilog,
        formatter_class=fmt,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "serve",
        help="run the server (WORKERS processes on PORT)",
        epilog=epilog,
        formatter_class=fmt,
    )
    commands.add_parser(
        "migrate",
        help="apply pending database migrations and exit",
        epilog=epilog,
        formatter_class=fmt,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(EXIT_CONFIG)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"switchboard: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    from shared.logs import configure_logging

    configure_logging(settings.log_level)
    if settings.workers > 1 and args.command != "migrate":
        sys.exit(supervise(settings))
    try:
        sys.exit(_run(_migrate(settings) if args.command == "migrate" else _serve(settings)))
    except (OSError, BackendError) as exc:
        # A port in use or a backend that cannot be reached is an operator's problem, not a bug:
        # one clear line, no traceback.
        print(f"switchboard: cannot start: {exc}", file=sys.stderr)
        sys.exit(EXIT_STARTUP)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return int(uvloop.run(coro))


async def _migrate(settings: Settings) -> int:
    from shared.store import open_database

    db = await open_database(
        settings.effective_database_url, schema=settings.database_schema, migrate=False
    )
    try:
        applied = await db.migrate()
    finally:
        await db.close()
    for name in applied:
        print(f"applied {name}")
    print(f"{len(applied)} migration(s) applied" if applied else "database is up to date")
    return 0


async def _serve(settings: Settings) -> int:
    from relay.server import serve

    await serve(settings)
    return 0


# -- several workers ----------------------------------------------------------------------------
def _prepare_metrics() -> None:
    """Multiprocess metrics, when the metrics module offers them (it is optional here)."""
    try:
        from shared import metrics
    except ImportError:
        return
    prepare = getattr(metrics, "prepare_multiprocess", None)
    if prepare is not None:
        prepare(Path(tempfile.mkdtemp(prefix="switchboard-metrics-")))


def _mark_dead(pid: int) -> None:
    try:
        from shared import metrics
    except ImportError:
        return
    mark = getattr(metrics, "mark_process_dead", None)
    if mark is not None:
        mark(pid)


def _fork_worker(settings: Settings) -> int:
    pid = os.fork()
    if pid == 0:  # the worker: default signal handling, serve, never return into the parent's code
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = 1
        try:
            code = _run(_serve(settings))
        finally:
            os._exit(code)
    return pid


def supervise(settings: Settings) -> int:
    """Fork ``settings.workers`` servers, keep them running, forward the stop signal."""
    _prepare_metrics()
    stopping = False
    workers: set[int] = set()

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for _ in range(settings.workers):
        workers.add(_fork_worker(settings))
    last_restart = 0.0
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        workers.discard(pid)
        _mark_dead(pid)
        if stopping:
            continue
        print(f"switchboard: worker {pid} exited (status {status}); restarting", file=sys.stderr)
        wait = RESTART_MIN_INTERVAL_S - (time.monotonic() - last_restart)
        if wait > 0:
            time.sleep(wait)
        last_restart = time.monotonic()
        if not stopping:
            workers.add(_fork_worker(settings))
    return 0

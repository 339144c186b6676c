"""Start and stop ``switchboard serve`` for a benchmark: pinned, own data dir, own PG schema.

The server is the worktree's own (``.venv/bin/switchboard``), started in its own session under
``taskset``; its settings are environment variables (the README table), recorded in the JSON.
A PostgreSQL run gets a fresh ``DATABASE_SCHEMA`` (dropped in ``stop``) and an
``application_name`` on its connections, so the CPU of *its* PostgreSQL backends can be read
from ``pg_stat_activity`` even while other test suites use the same PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"

# The protective limits a benchmark's load would trip (performance.md "Method"), raised through
# their documented settings. Everything else keeps its default. Argon2 is lowered only so that
# creating 1,000 accounts takes seconds (setup is not measured; no password is checked later).
RAISED_LIMITS: dict[str, str] = {
    "RATE_PUBLISH": "1000000/1",
    "PUBLISH_BURST": "1000000",
    "WS_RATE": "100000/1",
    "WS_BURST": "100000",
    "RATE_WS_CONNECT": "1000000/600",
    "RATE_REGISTER_IP": "1000000/1",
    "RATE_LOGIN_IP": "1000000/1",
    "RATE_LOGIN_EMAIL": "1000000/1",
    "MAX_HANDSHAKES_PER_IP": "100000",
    "ARGON2_OPSLIMIT": "1",
    "ARGON2_MEMLIMIT": "8192",
    "LOG_LEVEL": "WARNING",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(
        self,
        *,
        store: str = "sqlite",
        redis: bool = False,
        cpus: str = "0",
        port: int = 0,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.redis = redis
        self.cpus = cpus
        self.port = port or free_port()
        self.tag = "durbench_" + uuid.uuid4().hex[:10]
        self.data_dir = Path(tempfile.mkdtemp(prefix="durbench-"))
        self.env: dict[str, str] = {
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": str(self.data_dir),
            **RAISED_LIMITS,
        }
        if store == "postgresql":
            self.env["DATABASE_URL"] = f"{PG_URL}?application_name={self.tag}"
            self.env["DATABASE_SCHEMA"] = self.tag
        if redis:
            self.env["REDIS_URL"] = REDIS_URL
            self.env["REDIS_PREFIX"] = self.tag + ":"
        self.env.update(extra or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "server.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> dict[str, str]:
        """The settings that differ from the defaults (secrets and paths left out)."""
        return {k: v for k, v in self.env.items() if k not in ("DATA_DIR",)}

    def start(self, timeout: float = 30.0) -> None:
        cmd = [str(BIN / "switchboard"), "serve"]
        if self.cpus:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
        env.update(self.env)
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not up within {timeout} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.store == "postgresql":
            self._psql(f'DROP SCHEMA IF EXISTS "{self.tag}" CASCADE')
        if self.redis:
            _redis_delete_prefix(self.tag + ":")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- PostgreSQL backends of this server -------------------------------------------------
    def _psql(self, sql: str) -> str:
        out = subprocess.run(
            ["psql", PG_URL, "-At", "-c", sql], capture_output=True, text=True, timeout=30
        )
        return out.stdout

    def pg_backend_pids(self) -> list[int]:
        if self.store != "postgresql":
            return []
        rows = self._psql(
            f"SELECT pid FROM pg_stat_activity WHERE application_name = '{self.tag}'"
        )
        return [int(x) for x in rows.split() if x.strip().isdigit()]

    def batch_sizes(self, t0_ms: int, t1_ms: int) -> dict[str, float]:
        """Group-commit batches in a window, from the store: a batch's entries share created_at
        (the writer stamps a batch once), so entries per distinct created_at ~ batch size (two
        batches within one millisecond count as one)."""
        table = f'"{self.tag}".inbox_entries' if self.store == "postgresql" else "inbox_entries"
        sql = (
            "SELECT SUM(n), COUNT(*), MAX(n) FROM (SELECT created_at, COUNT(*) AS n"
            f" FROM {table} WHERE created_at >= {int(t0_ms)} AND created_at < {int(t1_ms)}"
            " GROUP BY created_at) b"
        )
        try:
            if self.store == "postgresql":
                row = self._psql(sql).strip().split("|")
            else:
                import sqlite3

                db = self.data_dir / "switchboard.db"
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                try:
                    row = [str(v) for v in con.execute(sql).fetchone()]
                finally:
                    con.close()
            entries, batches, biggest = (float(v) if v not in ("", "None") else 0.0 for v in row)
        except Exception as exc:  # noqa: BLE001 - a statistic, never fatal
            return {"error": repr(exc)[:200]}  # type: ignore[dict-item]
        return {
            "entries": entries,
            "batches": batches,
            "mean_batch": round(entries / batches, 1) if batches else 0.0,
            "max_batch": biggest,
            "batches_per_s": round(batches / max(0.001, (t1_ms - t0_ms) / 1000), 1),
        }

    def pg_settings(self) -> dict[str, str]:
        if self.store != "postgresql":
            return {}
        names = ("server_version", "synchronous_commit", "fsync", "wal_sync_method", "commit_delay")
        rows = self._psql(
            "SELECT name || '=' || setting FROM pg_settings WHERE name IN ("
            + ",".join(f"'{n}'" for n in names)
            + ")"
        )
        return dict(line.split("=", 1) for line in rows.splitlines() if "=" in line)


def _redis_delete_prefix(prefix: str) -> None:
    try:
        import redis  # the project's own dependency

        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=prefix + "*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
    except Exception:  # noqa: BLE001 - cleanup is best effort
        pass


def machine() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"nproc": os.cpu_count(), "kernel": platform.release()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gib"] = round(
            int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1
        )
    except OSError:
        pass
    info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return info

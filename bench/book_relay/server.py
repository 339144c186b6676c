"""``switchboard serve`` for the book relay benchmark: bench/durable/server.py's ``Server`` with
this benchmark's settings instead of the durable ones.

Only what the benchmark's own setup and connect phase would trip is raised (performance.md
"Method"); the steady state runs on the defaults (``WS_RATE`` 200/1 and ``WS_BURST`` 400 per
socket are far above one op per 2 s; ``BOOK_RETENTION`` stays at its default, retention on).
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

from durable.server import PG_URL, REDIS_URL, Server

# Setup and connect only: 3,050 devices register from 127.0.0.1 (default 100 per IP per hour),
# every device opens its socket once per trial (default 5 per 10 min: reruns and retries would
# trip it), all 3,050 sockets open at once (default 64 unfinished handshakes per IP).
RAISED_LIMITS: dict[str, str] = {
    "RATE_DEVICE_REGISTER_IP": "1000000/3600",
    "RATE_RELAY_CONNECT": "1000000/600",
    "MAX_HANDSHAKES_PER_IP": "100000",
    "LOG_LEVEL": "WARNING",
}
# durable's settings that have nothing to do with this benchmark (left at their defaults here).
_DURABLE_ONLY = (
    "RATE_PUBLISH", "PUBLISH_BURST", "WS_RATE", "WS_BURST", "RATE_WS_CONNECT", "RATE_REGISTER_IP",
    "RATE_LOGIN_IP", "RATE_LOGIN_EMAIL", "MAX_HANDSHAKES_PER_IP", "ARGON2_OPSLIMIT",
    "ARGON2_MEMLIMIT", "LOG_LEVEL",
)  # fmt: skip


class BookServer(Server):
    """A fresh server: own DATA_DIR, own PostgreSQL schema / Redis prefix ``bookbench_<hex>``."""

    def __init__(
        self,
        *,
        store: str,
        workers: int,
        redis: bool,
        cpus: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(store=store, redis=redis or workers > 1, cpus=cpus)
        for name in _DURABLE_ONLY:
            self.env.pop(name, None)
        self.tag = "bookbench_" + uuid.uuid4().hex[:10]
        if store == "postgresql":
            self.env["DATABASE_URL"] = f"{PG_URL}?application_name={self.tag}"
            self.env["DATABASE_SCHEMA"] = self.tag
        if self.redis:
            self.env["REDIS_URL"] = REDIS_URL
            self.env["REDIS_PREFIX"] = self.tag + ":"
        self.env.update(RAISED_LIMITS)
        self.env["WORKERS"] = str(workers)
        self.env.update(extra or {})

    @property
    def setup_db_url(self) -> str:
        """Where the setup writes memberships (not counted as this server's PG backend)."""
        if self.store == "postgresql":
            return PG_URL
        return "sqlite:///" + str(Path(self.data_dir) / "switchboard.db")

    @property
    def schema(self) -> str:
        return self.tag if self.store == "postgresql" else ""

    def count_rows(self, table: str) -> int | None:
        """Rows of ``table`` (``book_ops``: ciphertext retained by the relay), None if unreadable."""
        try:
            if self.store == "postgresql":
                out = self._psql(f'SELECT COUNT(*) FROM "{self.tag}".{table}').strip()
                return int(out) if out.isdigit() else None
            db = Path(self.data_dir) / "switchboard.db"
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            try:
                return int(con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
            finally:
                con.close()
        except Exception:  # noqa: BLE001 - a statistic, never fatal
            return None

    def history_batches(self, t0_ms: int, t1_ms: int) -> dict[str, float] | None:
        """Group commits of the book history in a window: a commit stamps its ops' ``created_at``
        once, so ops per distinct ``created_at`` ~ ops per commit (two within 1 ms count as one).
        None when nothing was retained (a live-only relay)."""
        table = f'"{self.tag}".book_ops' if self.store == "postgresql" else "book_ops"
        sql = (
            "SELECT SUM(n), COUNT(*), MAX(n) FROM (SELECT created_at, COUNT(*) AS n"
            f" FROM {table} WHERE created_at >= {int(t0_ms)} AND created_at < {int(t1_ms)}"
            " GROUP BY created_at) b"
        )
        try:
            if self.store == "postgresql":
                row = self._psql(sql).strip().split("|")
            else:
                db = Path(self.data_dir) / "switchboard.db"
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
                try:
                    row = [str(v) for v in con.execute(sql).fetchone()]
                finally:
                    con.close()
            ops, commits, biggest = (float(v) if v not in ("", "None") else 0.0 for v in row)
        except Exception:  # noqa: BLE001 - a statistic, never fatal
            return None
        if not commits:
            return None
        seconds = max(0.001, (t1_ms - t0_ms) / 1000)
        return {
            "ops": ops,
            "commits": commits,
            "ops_per_commit": round(ops / commits, 1),
            "max_ops_per_commit": biggest,
            "commits_per_s": round(commits / seconds, 1),
        }

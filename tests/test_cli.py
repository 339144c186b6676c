"""The ``switchboard`` command as an operator runs it: real subprocesses of ``.venv/bin/switchboard``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.config import setting_fields
from tests.fixtures.server import free_port

SWITCHBOARD = str(Path(sys.executable).parent / "switchboard")
ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell leaks into the settings."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "SYSTEMROOT")}
    env.update(DATA_DIR=str(tmp_path / "data"), JWT_SECRET="cli-test-secret", ARGON2_MEMLIMIT="8192",
               ARGON2_OPSLIMIT="1", LOG_LEVEL="WARNING")
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SWITCHBOARD, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"]])
def test_help_lists_every_setting(args: list[str], tmp_path: Path) -> None:
    result = _run(args, _env(tmp_path))
    assert result.returncode == 0, result.stderr
    for f in setting_fields():
        assert f.metadata["env"] in result.stdout, f.metadata["env"]
        assert f.metadata["doc"] in " ".join(result.stdout.split())
    assert "default 8080" in result.stdout  # defaults are shown
    assert "serve" in result.stdout


def test_python_dash_m_relay_is_the_same_command(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "relay", "--help"], env=_env(tmp_path), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "HANDSHAKE_TIMEOUT_S" in result.stdout


@pytest.mark.parametrize("bad", [{"PORT": "eighty"}, {"WORKERS": "0"}, {"RATE_WS_CONNECT": "lots"}])
def test_bad_settings_are_one_line_and_exit_2(bad: dict[str, str], tmp_path: Path) -> None:
    result = _run(["serve"], _env(tmp_path, **bad), timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("switchboard: configuration error:")
    assert "Traceback" not in result.stderr


def test_migrate_on_sqlite_is_idempotent(tmp_path: Path) -> None:
    env = _env(tmp_path)
    first = _run(["migrate"], env)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "data" / "switchboard.db").exists()
    second = _run(["migrate"], env)
    assert second.returncode == 0, second.stderr
    assert "database is up to date" in second.stdout
    assert "applied " not in second.stdout


def test_migrate_on_postgresql(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    env = _env(tmp_path, DATABASE_URL=pg_url, DATABASE_SCHEMA=pg_schema)
    assert _run(["migrate"], env).returncode == 0
    second = _run(["migrate"], env)
    assert second.returncode == 0 and "database is up to date" in second.stdout, second.stderr


async def _wait_healthy(port: int, proc: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "server exited early"
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    body: dict[str, Any] = await resp.json()
                    if resp.status == 200:
                        return body
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("server did not answer /health")


async def _stop(proc: Any, timeout: float = 10.0) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return int(await asyncio.wait_for(proc.wait(), timeout))
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("server did not exit within 10 s of SIGTERM") from None


async def test_serve_answers_and_exits_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        SWITCHBOARD, "serve", env=_env(tmp_path, HOST="127.0.0.1", PORT=str(port)), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        body = await _wait_healthy(port, proc)
        assert body["data"]["status"] == "ok"
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/nope") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "NOT_FOUND"
    finally:
        code = await _stop(proc)
    assert code == 0


@pytest.mark.slow
async def test_workers_share_the_port_and_a_dead_worker_is_restarted(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        SWITCHBOARD, "serve",
        env=_env(tmp_path, HOST="127.0.0.1", PORT=str(port), WORKERS="2", REDIS_URL=redis_url, REDIS_PREFIX=redis_prefix),
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_healthy(port, proc)
        workers = _children(proc.pid)
        for _ in range(100):
            if len(workers) == 2:
                break
            await asyncio.sleep(0.1)
            workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        for _ in range(100):
            now = _children(proc.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            await asyncio.sleep(0.1)
        assert len(now) == 2 and workers[0] not in now, now
        await _wait_healthy(port, proc)
    finally:
        code = await _stop(proc)
    assert code == 0
    assert _children(proc.pid) == []


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def test_serve_on_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    """An operator mistake (port in use) is one clear line and exit 1, never a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run(["serve"], _env(tmp_path, HOST="127.0.0.1", PORT=str(port)))
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    result = _run(["migrate"], _env(tmp_path, DATABASE_URL="postgresql://postgres@127.0.0.1:1/nothing"))
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr

"""Start and stop the fan-out peers, each pinned to one core on its own port.

    .venv/bin/python bench/peers/run.py check                  # start, probe, stop each peer
    .venv/bin/python bench/peers/run.py serve nats --seconds 600  # run one, bounded

bench/fanout.py uses `Peer` directly (a fresh peer per trial). A peer runs in its
own session (process group) so stop() reaches nginx's worker too; stop() is
SIGTERM, then SIGKILL after a grace period, and always runs (context manager).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RUN_DIR = Path("/tmp/switchboard-bench")
sys.path.insert(0, str(HERE.parent))

from loadgen import procstat  # noqa: E402
from loadgen.wsproto import check_handshake, handshake_request  # noqa: E402

SWITCHBOARD_DATA = RUN_DIR / "switchboard-data"
SWITCHBOARD_ENV = {
    "HOST": "127.0.0.1",
    "PORT": "18705",
    "DATA_DIR": str(SWITCHBOARD_DATA),
    "LOG_LEVEL": "WARNING",
    "WS_RATE": "1000000/1",  # publisher frames/s (default 200/1)
    "WS_BURST": "100000",  # frame burst, also the ops one socket may queue (default 400)
    "RATE_RELAY_CONNECT": "1000000/600",  # relay connections per device (default 5/600)
    "RATE_DEVICE_REGISTER_IP": "1000000/3600",  # setup: registrations per IP (default 100/3600)
    "RATE_BOOK_CREATE": "1000000/3600",  # setup: books per device (default 20/3600)
    "MAX_HANDSHAKES_PER_IP": "100000",  # unfinished handshakes per IP (default 64)
}


@dataclass(frozen=True)
class PeerSpec:
    name: str
    port: int
    cmd: list[str]
    probe_path: str
    env: dict[str, str] = field(default_factory=dict)
    dirs: tuple[str, ...] = ()
    http_probe: bool = False  # probe_path is an HTTP GET that must answer 200 (not a 101)


PEERS: dict[str, PeerSpec] = {
    spec.name: spec
    for spec in (
        PeerSpec(
            "websockets",
            18701,
            [str(ROOT / ".venv/bin/python"), str(HERE / "ws_broadcast.py"), "--port", "18701"],
            "/sub/probe",
        ),
        PeerSpec(
            "nchan",
            18702,
            [
                "nginx",
                "-p",
                str(RUN_DIR / "nginx"),
                "-c",
                str(HERE / "nchan.conf"),
                "-g",
                "daemon off;",
            ],
            "/sub/probe",
            dirs=("nginx/logs", "nginx/tmp"),
        ),
        PeerSpec("nats", 18703, ["nats-server", "-c", str(HERE / "nats.conf")], "/"),
        # The server under test, started exactly like the peers (fresh process per trial, pinned),
        # on the embedded default: SQLite in DATA_DIR, in-process broker. The protective
        # limits are raised through their documented settings so they cannot cap the load
        # (BENCHMARKS.md lists them); the rest are defaults (HEARTBEAT_S 30, outbound bound
        # 1 MiB). LOG_LEVEL=WARNING: no access line per setup request.
        PeerSpec(
            "switchboard",
            18705,
            [str(ROOT / ".venv/bin/switchboard"), "serve"],
            "/health",
            env=SWITCHBOARD_ENV,
            dirs=("switchboard-data",),
            http_probe=True,
        ),
        PeerSpec(
            "ywebsocket",
            18704,
            ["node", str(HERE / "node_modules/@y/websocket-server/src/server.js")],
            "/probe",
            env={"HOST": "127.0.0.1", "PORT": "18704"},
        ),
    )
}


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def probe(host: str, port: int, path: str, timeout: float = 2.0) -> None:
    """One blocking websocket handshake; raises unless the server answers 101."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(handshake_request(host, port, path))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the 101")
            head += chunk
        check_handshake(head.partition(b"\r\n\r\n")[0])


def http_probe(host: str, port: int, path: str, timeout: float = 2.0) -> None:
    """One blocking HTTP GET; raises unless the answer is 200."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(4096)
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head[:80].decode("latin-1"))


class Peer:
    """A running peer: `with Peer("nats") as p: ... p.pid ...`."""

    def __init__(
        self,
        name: str,
        cpu: str = "0",
        ready_timeout: float = 20.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.spec = PEERS[name]
        self.env = {**self.spec.env, **(env or {})}
        self.cpu = cpu
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = RUN_DIR / f"{name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return self.spec.port

    def start(self) -> Peer:
        if port_open(self.spec.port):
            raise RuntimeError(
                f"port {self.spec.port} is already in use (a stray {self.spec.name}?)"
            )
        for d in self.spec.dirs:
            (RUN_DIR / d).mkdir(parents=True, exist_ok=True)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["taskset", "-c", self.cpu, *self.spec.cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited ({self.proc.returncode}): {self.tail()}"
                )
            try:
                if self.spec.http_probe:
                    http_probe("127.0.0.1", self.spec.port, self.spec.probe_path)
                else:
                    probe("127.0.0.1", self.spec.port, self.spec.probe_path)
                return
            except (OSError, Exception) as exc:  # not listening yet, or not answering yet
                last = exc
                time.sleep(0.05)
        raise TimeoutError(
            f"{self.spec.name} not ready in {self.ready_timeout}s ({last}): {self.tail()}"
        )

    def tail(self, n: int = 800) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pids = procstat.tree(proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # Descendants that left the group (none expected) are ended by pid.
        for p in pids[1:]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while port_open(self.spec.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="start/stop the fan-out peers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="start each peer, probe it, stop it")
    check.add_argument("peers", nargs="*", default=list(PEERS))
    serve = sub.add_parser("serve", help="run one peer for a bounded time")
    serve.add_argument("peer", choices=list(PEERS))
    serve.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--cpu", default="0", help="taskset core list for the peer")
    args = parser.parse_args()

    if args.cmd == "check":
        failed = 0
        for name in args.peers:
            try:
                with Peer(name, args.cpu) as peer:
                    pids = procstat.tree(peer.pid)
                    print(
                        f"{name:11s} ok  port {peer.port}  pids {pids}  rss {procstat.rss_kb(pids):.0f} KB"
                    )
            except Exception as exc:
                failed += 1
                print(f"{name:11s} FAILED: {exc}")
        return 1 if failed else 0

    with Peer(args.peer, args.cpu) as peer:
        print(
            f"{args.peer} pid {peer.pid} on 127.0.0.1:{peer.port}, stopping in {args.seconds:.0f}s",
            flush=True,
        )
        try:
            time.sleep(args.seconds)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

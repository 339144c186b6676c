"""Durable delivery under faults (realtime.md guarantees 1, 2 and 4), with real processes:

* two ``switchboard serve`` nodes on PostgreSQL + Redis, one killed with SIGKILL while about
  1,000 events/s are published: everything the publish API acknowledged reaches every device
  after it reconnects to the survivor, with no duplicate after client-side dedupe;
* a private Redis restarted mid-stream: nodes reconnect by themselves and nothing acknowledged
  is lost (the store is the truth; the poll replays what the lost wake-ups carried);
* an API token revoked on one node closes its socket on the other (1008) within 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.config import Settings
from shared.inbox.store import NewEntry
from shared.inbox.writer import writer_for
from tests.fixtures.inbox import FAST
from tests.fixtures.server import free_port
from tests.inbox_helpers import Api, Device
from tests.test_broker import RedisServer
from tests.test_cli import ROOT, SWITCHBOARD, _env, _wait_healthy

pytestmark = pytest.mark.slow

NODE_ENV = {
    "RATE_PUBLISH": "100000/1", "PUBLISH_BURST": "100000", "RATE_WS_CONNECT": "1000/60",
    "MAX_HANDSHAKES_PER_IP": "1000", "ACK_TIMEOUT": "0.5", "INBOX_ACK_FLUSH_S": "0.2", "INBOX_POLL_S": "0.5",
    "RATE_LOGIN_IP": "1000/60", "RATE_REGISTER_IP": "1000/60",
}  # fmt: skip


@dataclasses.dataclass
class Node:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.fixture
async def two_nodes(tmp_path: Path, pg_url: str, pg_schema: str, redis_url: str,
                    redis_prefix: str) -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for i in range(2):
            port = free_port()
            env = _env(tmp_path / f"n{i}", HOST="127.0.0.1", PORT=str(port), DATABASE_URL=pg_url,
                       DATABASE_SCHEMA=pg_schema, REDIS_URL=redis_url, REDIS_PREFIX=redis_prefix, **NODE_ENV)
            proc = await asyncio.create_subprocess_exec(
                SWITCHBOARD, "serve", env=env, cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            nodes.append(Node(proc, port))
        for node in nodes:
            await _wait_healthy(node.port, node.proc)
        yield nodes
    finally:
        for node in nodes:
            if node.proc.returncode is None:
                node.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(node.proc.wait(), 15)
                except TimeoutError:
                    node.proc.kill()
                    await node.proc.wait()


class Follower:
    """A device that reconnects to the surviving node when its socket dies, keeping its cursor."""

    def __init__(self, device_id: str, token: str, first: Node, fallback: Node) -> None:
        self.device_id, self.token = device_id, token
        self.nodes = [first, fallback]
        self.sockets: list[Device] = []
        self.task: asyncio.Task[None] | None = None
        self.errors: list[str] = []

    async def start(self) -> None:
        self.sockets.append(await Device.open(self.nodes[0].ws, self.token, self.device_id))
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        await self.sockets[-1].closed.wait()
        processed = self.sockets[-1].processed
        for _ in range(100):  # the survivor may be busy: retry until it takes us
            try:
                self.sockets.append(await Device.open(self.nodes[1].ws, self.token, self.device_id,
                                                      processed=processed))
                return
            except Exception as exc:  # noqa: BLE001 - any failure to connect: try again
                self.errors.append(repr(exc))
            await asyncio.sleep(0.1)

    def unique(self) -> list[dict[str, Any]]:
        seen: set[int] = set()
        out = []
        for s in self.sockets:
            for e in s.events:
                if e["cursor"] not in seen:
                    seen.add(e["cursor"])
                    out.append(e)
        return out


async def test_kill_9_a_node_mid_stream_loses_nothing_acknowledged(two_nodes: list[Node]) -> None:
    a, b = two_nodes
    async with aiohttp.ClientSession() as http:
        api_b = Api(http, b.http)
        ada = await api_b.account("ada@example.com")
        followers = [Follower(f"dev{i}", ada.token, a if i < 3 else b, b) for i in range(6)]
        for f in followers:
            await f.start()
        apis = [Api(http, a.http), api_b]
        acknowledged: dict[str, int] = {}  # message id -> cursor
        attempted = 0
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 4.0
        kill_at = loop.time() + 1.5
        killed = False

        async def publisher(k: int) -> None:
            nonlocal attempted
            i = 0
            while loop.time() < stop_at:
                api = apis[(k + i) % 2]  # half the publishes go to the node that will die
                i += 1
                attempted += 1
                with contextlib.suppress(aiohttp.ClientError, AssertionError, asyncio.TimeoutError):
                    reply = await asyncio.wait_for(api.publish(ada.token, {"k": k, "i": i}), 5)
                    acknowledged[reply["message_id"]] = reply["cursor"]
                await asyncio.sleep(0.01)  # ~20 publishers x 50/s: about 1,000 events/s offered

        async def killer() -> None:
            nonlocal killed
            await asyncio.sleep(max(0.0, kill_at - loop.time()))
            os.kill(a.proc.pid, signal.SIGKILL)
            killed = True

        await asyncio.gather(killer(), *(publisher(k) for k in range(20)))
        assert killed and len(acknowledged) > 500, len(acknowledged)
        want = set(acknowledged)
        for f in followers:
            async def complete(f: Follower = f) -> bool:
                return want <= {e["data"]["message_id"] for e in f.unique()}

            for _ in range(600):
                if await complete():
                    break
                await asyncio.sleep(0.05)
            got = f.unique()
            ids = [e["data"]["message_id"] for e in got]
            assert want <= set(ids), (f"{f.device_id}: {len(want - set(ids))} acknowledged events missing;"
                                      f" sockets {len(f.sockets)}, errors {f.errors[:3]},"
                                      f" others {[s.others[:3] for s in f.sockets]}")
            assert len(ids) == len(set(ids))  # dedupe by cursor leaves no duplicate message
            cursors = [e["cursor"] for e in got]
            assert cursors == sorted(cursors), f.device_id  # per-inbox order
            for e in got:  # a message's cursor is the one its 202 named
                if e["data"]["message_id"] in acknowledged:
                    assert acknowledged[e["data"]["message_id"]] == e["cursor"]
        moved = [f for f in followers[:3] if len(f.sockets) == 2]
        assert len(moved) == 3  # the dead node's devices reconnected to the survivor
        for f in followers:
            for s in f.sockets:
                await s.close()


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_redis_restarted_mid_stream_nothing_acknowledged_is_lost(
    server_factory: Any, make_settings: Any, pg_url: str, pg_schema: str, private_redis: RedisServer, tmp_path: Path
) -> None:
    base: Settings = make_settings(database_url=pg_url, database_schema=pg_schema, redis_url=private_redis.url,
                                   redis_prefix="sbt:restart:", inbox_poll_s=0.3)
    nodes = [await server_factory(dataclasses.replace(base, data_dir=str(tmp_path / f"n{i}"), **FAST))
             for i in range(2)]
    async with aiohttp.ClientSession() as http:
        api = Api(http, f"http://127.0.0.1:{nodes[0].port}")
        bo = await api.account("bo@example.com")
        devices = [await Device.open(f"ws://127.0.0.1:{nodes[i % 2].port}", bo.token, f"d{i}") for i in range(4)]
        acknowledged: list[int] = []

        async def publish_some(n: int) -> None:
            for i in range(n):
                with contextlib.suppress(AssertionError, aiohttp.ClientError):
                    acknowledged.append((await api.publish(bo.token, i))["cursor"])

        await publish_some(20)
        await private_redis.stop()
        # With Redis down the publish API refuses (its rate limiter is in Redis): not acknowledged.
        failed = await api.call("POST", "/publish", bo.token, json={"type": "note", "data": "x"})
        assert failed[0] == 503 and failed[1]["error"]["code"] == "SERVICE_UNAVAILABLE"
        # Appends that do commit meanwhile (the store is up) lose their wake-ups with Redis.
        writer = writer_for(nodes[1].services)
        for _ in range(10):
            acknowledged.append(await writer.append(NewEntry(bo.user_id, "publish", '{"data": "during"}')))
        await private_redis.start()
        await publish_some(20)
        for d in devices:
            await d.until(lambda x: set(acknowledged) <= {e["cursor"] for e in x.events}, timeout=20)
            cursors = [e["cursor"] for e in d.unique()]
            assert cursors == sorted(cursors)
            await d.close()


async def test_a_revoked_token_s_socket_closes_on_the_other_node(
    server_factory: Any, make_settings: Any, pg_url: str, pg_schema: str, redis_url: str, redis_prefix: str,
    tmp_path: Path,
) -> None:
    base: Settings = make_settings(database_url=pg_url, database_schema=pg_schema, redis_url=redis_url,
                                   redis_prefix=redis_prefix)
    a, b = [await server_factory(dataclasses.replace(base, data_dir=str(tmp_path / f"n{i}"))) for i in range(2)]
    async with aiohttp.ClientSession() as http:
        api_a = Api(http, f"http://127.0.0.1:{a.port}")
        cy = await api_a.account("cy@example.com")
        other = await api_a.ok("POST", "/tokens", cy.jwt, json={"name": "o", "scopes": ["subscribe"]}, status=201)
        doomed = await Device.open(f"ws://127.0.0.1:{b.port}", cy.token, "laptop")
        keeper = await Device.open(f"ws://127.0.0.1:{b.port}", other["token"], "phone")
        by_jwt = await Device.open(f"ws://127.0.0.1:{b.port}", cy.jwt, "tablet")
        loop = asyncio.get_running_loop()
        api_b = Api(http, f"http://127.0.0.1:{b.port}")
        await api_b.ok("GET", "/tokens/current", cy.token)  # node b has the token's lookup cached
        await api_a.ok("DELETE", f"/tokens/{cy.token_id}", cy.jwt, status=204)
        revoked_at = loop.time()
        await asyncio.wait_for(doomed.closed.wait(), 1.0)  # realtime.md guarantee 4: within 1 s
        assert loop.time() - revoked_at < 1.0 and doomed.close_code == 1008
        assert not keeper.closed.is_set() and not by_jwt.closed.is_set()  # other credentials live on
        # The notice also dropped node b's cached lookup: REST refuses the token there too.
        await api_b.fails("GET", "/tokens/current", 401, "INVALID_TOKEN", cy.token)
        # Logging out kills the session: the socket opened with its access token closes too.
        await api_a.ok("POST", "/auth/logout", cy.jwt)
        await asyncio.wait_for(by_jwt.closed.wait(), 1.0)
        assert by_jwt.close_code == 1008 and not keeper.closed.is_set()
        await keeper.close()

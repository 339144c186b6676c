"""Presence (realtime.md guarantee 5, "User/device socket"; rest.md ``online_devices``).

Three layers:

* the ``Presence`` contract, run against ``MemoryPresence`` and ``RedisPresence`` alike: first
  socket -> one online, last close -> one offline after the grace, a reconnect within the grace
  is silent, a heartbeat-only device goes offline once after the timeout, sessions count once;
* several ``RedisPresence`` nodes on one Redis: each transition reported exactly once whatever
  node notices it, a dead (stalled) node's devices expire after the TTL on a live node, a
  stalled node writes its entries again, a drained node's devices get the grace, not the TTL;
* the relay on real sockets: ``device.online`` / ``device.offline`` frames on one and on two
  nodes, a ``switchboard serve`` subprocess killed with SIGKILL, ``online_devices`` across nodes,
  the ``heartbeat`` request, and heartbeat timestamps written to the store in batches.

Durations come from the settings (fractions of a second); nothing asserts how long anything took:
the tests wait for events with generous timeouts, and wait past a deadline before checking that
something did NOT happen.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from api.keys import SERVICES
from api.middleware import envelope_middleware
from api.routes import ops
from relay import inbox
from relay import presence as relay_presence
from shared import presence as shared_presence
from shared.codes import ErrorCode
from shared.config import Settings
from shared.errors import ApiError, BackendUnavailable
from shared.presence import Presence, Timing, Transition, make_presence, parse_heartbeat
from shared.presence.redis import RedisPresence
from shared.principals import SCOPES, Principal
from shared.services import Services
from shared.store import open_database
from tests.auth_helpers import PASSWORD
from tests.device_helpers import insert_book, insert_device
from tests.fixtures.server import free_port
from tests.test_book_relay import open_peer

TIMEOUT = 15.0  # how long to wait for an expected event (generous: a loaded CI machine)
SETTLE_S = 1.0  # how long to keep listening for a duplicate after an event arrived

FAST = {"presence_grace_s": 0.3, "presence_timeout_s": 0.6, "presence_ttl_s": 0.9}


async def eventually(check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``check`` (sync or async) until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def sleep_past(deadline: float, timing: Timing) -> None:
    """Wait until ``deadline`` (monotonic) has passed and a few sweeps have run after it."""
    await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 3 * timing.sweep_interval + 0.1)


def on(key: str, user: str = "u-1") -> Transition:
    return Transition(user, key, True)


def off(key: str, user: str = "u-1") -> Transition:
    return Transition(user, key, False)


# -- nodes: a Presence driven the way relay.presence drives it ----------------------------------------


class Node:
    """One ``Presence`` with refresh and sweep running in the background (as the relay runs
    them); ``seen`` collects what it reports. ``stop()`` stops the passes (a stalled or dead node);
    ``resume()`` starts them again."""

    def __init__(self, presence: Presence, settings: Settings, seen: list[Transition] | None = None) -> None:
        self.presence = presence
        self.timing = Timing.of(settings)
        self.seen: list[Transition] = [] if seen is None else seen
        self.mine: list[Transition] = []  # what this node reported
        presence.add_handler(self.seen.append)
        if seen is not None:
            presence.add_handler(self.mine.append)
        self.task: asyncio.Task[None] | None = None
        self.running = False
        self.resume()

    def resume(self) -> None:
        self.running = True
        self.task = asyncio.ensure_future(self._drive())

    async def _drive(self) -> None:
        next_refresh = time.monotonic()
        # A flag as well as the cancellation: Python 3.11's wait_for (in redis-py) may swallow one.
        while self.running:
            if time.monotonic() >= next_refresh:
                await self.presence.refresh()
                next_refresh = time.monotonic() + self.timing.refresh_interval
            await self.presence.sweep()
            await asyncio.sleep(self.timing.sweep_interval)

    async def stop(self) -> None:
        self.running = False
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


NodeFactory = Callable[..., Node]


@pytest.fixture
async def redis_nodes(make_settings: Callable[..., Settings], redis_url: str, redis_prefix: str) -> AsyncIterator[NodeFactory]:
    made: list[Node] = []

    def start(seen: list[Transition] | None = None, **overrides: Any) -> Node:
        settings = make_settings(redis_url=redis_url, redis_prefix=redis_prefix, **{**FAST, **overrides})
        node = Node(RedisPresence(settings), settings, seen)
        made.append(node)
        return node

    yield start
    for node in made:
        await node.stop()
        await node.presence.close()


@pytest.fixture(params=["memory", "redis"])
async def node_factory(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], redis_url: str, redis_prefix: str
) -> AsyncIterator[NodeFactory]:
    """One node of either implementation (the contract suite)."""
    made: list[Node] = []

    def start(**overrides: Any) -> Node:
        redis = {"redis_url": redis_url, "redis_prefix": redis_prefix} if request.param == "redis" else {}
        settings = make_settings(**{**FAST, **redis, **overrides})
        node = Node(make_presence(settings), settings)
        made.append(node)
        return node

    yield start
    for node in made:
        await node.stop()
        await node.presence.close()


# -- the contract ----------------------------------------------------------------------------------


async def test_first_socket_is_one_online_and_the_last_close_one_offline_after_the_grace(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(presence_grace_s=2.0)
    p = node.presence
    await p.socket_opened("u-1", "phone")
    await eventually(lambda: node.seen == [on("phone")])
    await p.socket_opened("u-1", "phone")  # a second socket of the same device: nothing new
    await p.socket_closed("u-1", "phone")
    assert await p.online_devices("u-1") == ["phone"]
    await p.socket_closed("u-1", "phone")
    assert await p.online_devices("u-1") == []  # no socket open any more...
    assert await p.online("u-1") == ["phone"]  # ...but online through the grace
    assert node.seen == [on("phone")]
    await eventually(lambda: node.seen == [on("phone"), off("phone")])
    await asyncio.sleep(SETTLE_S)
    assert node.seen == [on("phone"), off("phone")]
    assert await p.online("u-1") == []


async def test_a_reconnect_within_the_grace_is_silent(node_factory: NodeFactory) -> None:
    node = node_factory(presence_grace_s=2.0)
    p = node.presence
    await p.socket_opened("u-1", "phone")
    await eventually(lambda: node.seen == [on("phone")])
    await p.socket_closed("u-1", "phone")
    await p.socket_opened("u-1", "phone")  # right away: well within the 2 s grace
    await sleep_past(time.monotonic() + 2.0, node.timing)  # past the grace the close started
    assert node.seen == [on("phone")]  # no offline, no second online
    assert await p.online("u-1") == ["phone"]


async def test_a_heartbeat_only_device_goes_offline_once_after_the_timeout(node_factory: NodeFactory) -> None:
    node = node_factory()
    p = node.presence
    await p.heartbeat("u-1", "gpu-host")
    await eventually(lambda: node.seen == [on("gpu-host")])
    await p.heartbeat("u-1", "gpu-host")
    assert await p.online("u-1") == ["gpu-host"]
    assert await p.online_devices("u-1") == []  # online, but without a socket
    await eventually(lambda: node.seen == [on("gpu-host"), off("gpu-host")])
    await sleep_past(time.monotonic() + node.timing.timeout_ms / 1000, node.timing)
    assert node.seen == [on("gpu-host"), off("gpu-host")]
    assert await p.online("u-1") == []


async def test_a_recent_heartbeat_keeps_a_device_online_after_its_socket_closes(node_factory: NodeFactory) -> None:
    node = node_factory(presence_grace_s=0.2, presence_timeout_s=2.5)
    p = node.presence
    await p.socket_opened("u-1", "daemon")
    await p.heartbeat("u-1", "daemon")
    await p.socket_closed("u-1", "daemon")
    await sleep_past(time.monotonic() + 0.2, node.timing)  # the grace is over, the heartbeat is not
    assert node.seen == [on("daemon")]
    assert await p.online("u-1") == ["daemon"]
    await eventually(lambda: node.seen == [on("daemon"), off("daemon")])


async def test_online_devices_counts_devices_with_a_socket_and_each_session_once(node_factory: NodeFactory) -> None:
    node = node_factory(presence_grace_s=5.0)
    p = node.presence
    for key in ("phone", "phone", "laptop", "~c-1", "~c-2"):
        await p.socket_opened("u-1", key)
    await p.heartbeat("u-1", "gpu-host")
    await p.socket_opened("u-2", "other-users-device")
    assert await p.online_devices("u-1") == ["laptop", "phone", "~c-1", "~c-2"]
    assert await p.online("u-1") == ["gpu-host", "laptop", "phone", "~c-1", "~c-2"]
    await p.socket_closed("u-1", "~c-1")  # a session never comes back: no grace
    await p.socket_closed("u-1", "laptop")  # a device does: online through the grace
    assert await p.online_devices("u-1") == ["phone", "~c-2"]
    assert await p.online("u-1") == ["gpu-host", "laptop", "phone", "~c-2"]
    await eventually(lambda: off("~c-1") in node.seen)
    assert off("laptop") not in node.seen
    assert Counter(t for t in node.seen if t.online) == Counter(
        on(k) for k in ("phone", "laptop", "~c-1", "~c-2", "gpu-host")
    ) + Counter([on("other-users-device", "u-2")])


async def test_closing_an_unknown_socket_changes_nothing(node_factory: NodeFactory) -> None:
    node = node_factory()
    await node.presence.socket_closed("u-1", "never-opened")
    await node.presence.socket_opened("u-1", "phone")
    await node.presence.socket_closed("u-1", "phone")
    await node.presence.socket_closed("u-1", "phone")  # one close too many
    await eventually(lambda: node.seen == [on("phone"), off("phone")])
    assert await node.presence.online("u-1") == []


# -- several Redis nodes -------------------------------------------------------------------------


async def test_each_transition_is_reported_once_whatever_node_notices_it(redis_nodes: NodeFactory) -> None:
    seen: list[Transition] = []
    nodes = [redis_nodes(seen, presence_grace_s=0.1) for _ in range(3)]
    rng = random.Random(5)
    for round_ in range(8):
        # The device's sockets open and close on all three nodes at once, in a shuffled order.
        ops: list[tuple[Node, bool]] = [(n, True) for n in nodes for _ in range(2)]
        rng.shuffle(ops)
        await asyncio.gather(*(n.presence.socket_opened("u-1", "phone") for n, _ in ops))
        await eventually(lambda n=round_ + 1: seen.count(on("phone")) == n)
        rng.shuffle(ops)
        await asyncio.gather(*(n.presence.socket_closed("u-1", "phone") for n, _ in ops))
        await eventually(lambda n=round_ + 1: seen.count(off("phone")) == n)
    await asyncio.sleep(SETTLE_S)
    assert seen == [on("phone"), off("phone")] * 8  # alternating, each exactly once


async def test_devices_on_two_nodes_count_once_and_go_offline_when_the_last_socket_closes(
    redis_nodes: NodeFactory,
) -> None:
    seen: list[Transition] = []
    a, b = redis_nodes(seen), redis_nodes(seen)
    await a.presence.socket_opened("u-1", "phone")
    await b.presence.socket_opened("u-1", "phone")
    await b.presence.socket_opened("u-1", "~c-b")
    await a.presence.socket_opened("u-1", "~c-a")
    for node in (a, b):
        assert await node.presence.online_devices("u-1") == ["phone", "~c-a", "~c-b"]
    await a.presence.socket_closed("u-1", "phone")
    await sleep_past(time.monotonic() + a.timing.grace_ms / 1000, a.timing)
    assert off("phone") not in seen  # still open on b
    await b.presence.socket_closed("u-1", "phone")
    await eventually(lambda: off("phone") in seen)
    await asyncio.sleep(SETTLE_S)
    assert Counter(seen) == Counter([on("phone"), off("phone"), on("~c-a"), on("~c-b")])


async def test_a_dead_nodes_devices_go_offline_after_the_ttl_on_a_live_node_exactly_once(
    redis_nodes: NodeFactory,
) -> None:
    seen: list[Transition] = []
    dead, live = redis_nodes(seen), redis_nodes(seen)
    await dead.presence.socket_opened("u-1", "phone")
    await dead.presence.socket_opened("u-1", "~c-1")
    await live.presence.socket_opened("u-1", "laptop")
    await eventually(lambda: len(seen) == 3)
    await dead.stop()  # no refresh, no sweep, no close: what a SIGKILL leaves behind
    await eventually(lambda: Counter(live.mine) == Counter([on("laptop"), off("phone"), off("~c-1")]))
    await asyncio.sleep(SETTLE_S)
    assert Counter(seen) == Counter([on("phone"), on("~c-1"), on("laptop"), off("phone"), off("~c-1")])
    assert not [t for t in dead.mine if not t.online]  # the dead node said nothing
    assert await live.presence.online_devices("u-1") == ["laptop"]


async def test_a_stalled_node_writes_its_entries_again_when_it_resumes(redis_nodes: NodeFactory) -> None:
    seen: list[Transition] = []
    stalled, live = redis_nodes(seen), redis_nodes(seen)
    await stalled.presence.socket_opened("u-1", "phone")
    await eventually(lambda: seen == [on("phone")])
    await stalled.stop()
    await eventually(lambda: seen == [on("phone"), off("phone")])  # the TTL ran out
    stalled.resume()  # its socket is still open: the next refresh finds the entry gone
    await eventually(lambda: seen == [on("phone"), off("phone"), on("phone")])
    assert await live.presence.online_devices("u-1") == ["phone"]


async def test_a_drained_node_leaves_the_grace_not_the_ttl(redis_nodes: NodeFactory) -> None:
    seen: list[Transition] = []
    # A TTL far beyond the wait below: only the drain's close can make the offline arrive in time.
    slow = {"presence_ttl_s": 120.0, "presence_grace_s": 2.0}
    drained, live = redis_nodes(seen, **slow), redis_nodes(seen, **slow)
    await drained.presence.socket_opened("u-1", "phone")
    await drained.presence.socket_opened("u-1", "tablet")
    await eventually(lambda: len(seen) == 2)
    await drained.stop()
    await drained.presence.close()
    await live.presence.socket_opened("u-1", "tablet")  # reconnected elsewhere within the grace
    await eventually(lambda: off("phone") in live.mine)
    await sleep_past(time.monotonic() + live.timing.grace_ms / 1000, live.timing)
    assert Counter(seen) == Counter([on("phone"), on("tablet"), off("phone")])


async def test_a_users_keys_share_one_hash_slot(make_settings: Callable[..., Settings], redis_url: str) -> None:
    settings = make_settings(redis_url=redis_url, redis_prefix="sb:")
    presence = RedisPresence(settings)
    try:
        for user in ("u-1", "user:with:colons", "a{b}c"):
            x, d = presence.keys(user)
            assert key_slot(x.encode()) == key_slot(d.encode())
        slots = {key_slot(presence.keys(f"u-{i}")[0].encode()) for i in range(50)}
        assert len(slots) > 1  # different users spread over the cluster
    finally:
        await presence.close()


async def test_an_unreachable_redis_fails_fast_and_closing_does_not_hang(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", **FAST)  # nobody listens
    presence = RedisPresence(settings)
    with pytest.raises(BackendUnavailable):
        await presence.socket_opened("u-1", "phone")
    with pytest.raises(BackendUnavailable):
        await presence.online_devices("u-1")
    with pytest.raises(BackendUnavailable):
        await presence.sweep()
    await asyncio.wait_for(presence.close(), TIMEOUT)  # the phone's close fails once, quickly


async def test_on_a_redis_cluster_every_user_s_scripts_run_and_a_dead_node_expires(
    make_settings: Callable[..., Settings], redis_cluster: Any
) -> None:
    # The shared cluster of tests/fixtures/redis_cluster.py; a prefix of this test's own.
    settings = make_settings(redis_url=redis_cluster.url, redis_cluster=True,
                             redis_prefix=f"sbt:{secrets.token_hex(4)}:", **FAST)
    seen: list[Transition] = []
    dead, live = Node(RedisPresence(settings), settings, seen), Node(RedisPresence(settings), settings, seen)
    users = [f"u-{i}" for i in range(12)]  # spread over the three masters' slots
    try:
        for user in users:
            await dead.presence.socket_opened(user, "phone")
            await live.presence.heartbeat(user, "gpu-host")
        await eventually(lambda: len(seen) == 2 * len(users))
        assert await live.presence.online_devices("u-3") == ["phone"]
        assert await live.presence.online("u-3") == ["gpu-host", "phone"]
        await dead.stop()  # its socket entries, on every master, expire; the live node notices
        await eventually(lambda: Counter(live.mine) == Counter(
            [on("gpu-host", u) for u in users] + [off("phone", u) for u in users] + [off("gpu-host", u) for u in users]
        ))  # fmt: skip
    finally:
        for node in (dead, live):
            await node.stop()
            await node.presence.close()


def test_presence_timings_must_be_positive(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="PRESENCE_GRACE_S"):
        make_presence(make_settings(presence_grace_s=0))


# -- heartbeat bodies ------------------------------------------------------------------------------

GOOD_METRICS = {
    "cpu": 12.5,
    "memory": 61.0,
    "gpus": [{"index": 0, "model": "RTX 4090", "memory_total": 24564, "memory_used": 1024, "utilization": 37}],
    "disk": 40,  # not a field we know: passed through
}


def test_heartbeat_bodies_that_are_accepted() -> None:
    assert parse_heartbeat({}).metrics is None
    report = parse_heartbeat({"status": "busy", "metrics": GOOD_METRICS})
    assert report.status == "busy" and report.metrics == GOOD_METRICS
    assert parse_heartbeat({"metrics": {"gpus": []}}).metrics == {"gpus": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": 5}, "'status'"),
        ({"status": ""}, "'status'"),
        ({"status": "x" * 65}, "'status'"),
        ({"metrics": [1, 2]}, "'metrics'"),
        ({"metrics": {"cpu": "high"}}, "'metrics.cpu'"),
        ({"metrics": {"cpu": -1}}, "'metrics.cpu'"),
        ({"metrics": {"cpu": True}}, "'metrics.cpu'"),
        ({"metrics": {"cpu": float("nan")}}, "'metrics.cpu'"),
        ({"metrics": {"memory": float("inf")}}, "'metrics.memory'"),
        ({"metrics": {"gpus": {"index": 0}}}, "'metrics.gpus'"),
        ({"metrics": {"gpus": [{"index": 0}] * 65}}, "'metrics.gpus'"),
        ({"metrics": {"gpus": ["gpu0"]}}, "'metrics.gpus[0]'"),
        ({"metrics": {"gpus": [{"model": "A100"}]}}, "'metrics.gpus[0].index'"),
        ({"metrics": {"gpus": [{"index": 0}, {"index": -1}]}}, "'metrics.gpus[1].index'"),
        ({"metrics": {"gpus": [{"index": 0, "model": 7}]}}, "'metrics.gpus[0].model'"),
        ({"metrics": {"gpus": [{"index": 0, "utilization": 150}]}}, "'metrics.gpus[0].utilization'"),
        ({"metrics": {"gpus": [{"index": 0, "memory_total": 8, "memory_used": 9}]}}, "'metrics.gpus[0].memory_used'"),
        ({"metrics": {"disk": float("nan")}}, "'metrics'"),
        ({"metrics": {"blob": b"raw"}}, "'metrics'"),
        ({"metrics": {"log": "x" * 20000}}, "'metrics'"),
    ],
)
def test_heartbeat_bodies_that_are_refused_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_heartbeat(body)
    assert str(info.value).startswith(field), info.value


# -- the relay on real sockets -----------------------------------------------------------------------

USER = Principal("user", "u-1", user_id="u-1", scopes=SCOPES - {"admin"})
DAEMON = Principal("daemon", "gpu-1", user_id="u-1", device_id="gpu-1")
OTHER = Principal("user", "u-2", user_id="u-2", scopes=SCOPES - {"admin"})
TOKENS = {"user": USER, "daemon": DAEMON, "other": OTHER}


async def stub_authenticator(token: str) -> Principal:
    try:
        return TOKENS[token]
    except KeyError:
        raise ApiError(ErrorCode.INVALID_TOKEN, "invalid token") from None


def rest_shell(services: Services) -> web.Application:
    app = web.Application(middlewares=[envelope_middleware])
    app[SERVICES] = services
    app.add_routes(ops.routes)
    return app


class Sock:
    """A ``/ws`` client; ``frames`` keeps everything read after ``hello`` and ``synced``."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
        self.frames.append(frame)
        return frame

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            frame = await self.recv()
            if predicate(frame):
                return frame

    def presence(self) -> list[tuple[str, str]]:
        return [(f["type"], f["device_id"]) for f in self.frames if f["type"] in ("device.online", "device.offline")]

    async def settled(self, server: Any, user_id: str = "u-1") -> list[tuple[str, str]]:
        """Listen a while longer, then read up to a marker published now: every presence frame so far."""
        await asyncio.sleep(SETTLE_S)
        marker = {"type": "test.marker", "n": random.random()}
        await inbox.for_state(server.state).publish_ephemeral(user_id, marker)
        await self.until(lambda f: f == marker)
        return self.presence()


async def open_ws(port: int, device_id: str | None = None, token: str = "user") -> Sock:
    query = f"?token={token}" + (f"&device_id={device_id}" if device_id else "")
    ws = await connect(f"ws://127.0.0.1:{port}/ws{query}", ping_interval=None, open_timeout=TIMEOUT)
    sock = Sock(ws)
    hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert hello["type"] == "hello", hello
    assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT)) == {"type": "synced", "cursor": hello["cursor"]}
    return sock


@pytest.fixture
def start(server_factory: Any, make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Any]:
    count = 0

    async def start(**overrides: Any) -> Any:
        nonlocal count
        count += 1
        settings = make_settings(data_dir=str(tmp_path / f"node{count}"), **{**FAST, **overrides})
        return await server_factory(settings, stub_authenticator, app_factory=rest_shell)

    return start


# SEQUENCED: tests open a user's next socket only once the last device.online has been delivered.
# relay.inbox sends ephemeral frames to a socket as soon as it is subscribed, which is before its
# ``hello`` (reported to the lead); these tests are about presence, not about that ordering.


async def close_code(sock: Sock) -> int | None:
    """Read until the server closes the socket; the close code it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await sock.recv()
    return None if info.value.rcvd is None else info.value.rcvd.code


def online(device: str) -> tuple[str, str]:
    return ("device.online", device)


def offline(device: str) -> tuple[str, str]:
    return ("device.offline", device)


async def test_devices_see_each_other_come_and_go_and_sessions_are_not_devices(start: Any) -> None:
    server = await start()
    watcher = await open_ws(server.port, "watcher")
    phone = await open_ws(server.port, "phone")
    assert await watcher.until(lambda f: f["type"].startswith("device.")) == {"type": "device.online", "device_id": "phone"}
    session = await open_ws(server.port)  # no device_id: counts for publish, but is no device
    await phone.ws.close()
    await session.ws.close()
    assert await watcher.until(lambda f: f["type"] == "device.offline") == {"type": "device.offline", "device_id": "phone"}
    other_user = await open_ws(server.port, "elsewhere", token="other")
    # The watcher was not told about itself, nor about the session or another user's device...
    assert await watcher.settled(server) == [online("phone"), offline("phone")]
    # ...and u-1's devices are none of u-2's business.
    assert await other_user.settled(server, "u-2") == []


async def test_a_reconnect_within_the_grace_sends_no_frames(start: Any) -> None:
    server = await start(presence_grace_s=2.0)
    watcher = await open_ws(server.port, "watcher")
    phone = await open_ws(server.port, "phone")
    await watcher.until(lambda f: f.get("device_id") == "phone")
    await phone.ws.close()
    phone = await open_ws(server.port, "phone")
    await sleep_past(time.monotonic() + 2.0, Timing.of(server.settings))
    assert await watcher.settled(server) == [online("phone")]
    await phone.ws.close()


async def test_two_nodes_send_one_online_and_one_offline_to_sockets_on_both(
    start: Any, redis_url: str, redis_prefix: str
) -> None:
    nodes = [await start(redis_url=redis_url, redis_prefix=redis_prefix) for _ in range(2)]
    watchers = [await open_ws(n.port, f"watcher{i}") for i, n in enumerate(nodes)]
    await watchers[0].until(lambda f: f == {"type": "device.online", "device_id": "watcher1"})
    phones = [await open_ws(n.port, "phone") for n in nodes]  # the same device on both nodes
    for watcher in watchers:
        await watcher.until(lambda f: f.get("device_id") == "phone")
    for phone in phones:
        await phone.ws.close()
    for watcher in watchers:
        await watcher.until(lambda f: f == {"type": "device.offline", "device_id": "phone"})
    assert await watchers[0].settled(nodes[0]) == [online("watcher1"), online("phone"), offline("phone")]
    # watcher1 may or may not see watcher0's own online: it is published asynchronously and can
    # land just after watcher1's hello. The phone's transitions: exactly once each, on both.
    seen = [f for f in await watchers[1].settled(nodes[1]) if f != online("watcher0")]
    assert seen == [online("phone"), offline("phone")]


async def test_online_devices_counts_across_nodes_with_each_session_once(
    start: Any, redis_url: str, redis_prefix: str
) -> None:
    a, b = [await start(redis_url=redis_url, redis_prefix=redis_prefix, presence_grace_s=30.0) for _ in range(2)]
    socks = [await open_ws(a.port, "phone"), await open_ws(b.port, "phone")]  # one device on both nodes
    socks.append(await open_ws(a.port, "laptop"))
    await socks[0].until(lambda f: f.get("device_id") == "laptop")  # SEQUENCED
    socks.append(await open_ws(a.port))  # two sessions without device_id: one each
    socks.append(await open_ws(b.port))
    socks.append(await open_ws(b.port, token="daemon"))  # a daemon: its key implies its device

    async def counts(expected: int) -> bool:
        return [await shared_presence.online_devices(n.services, "u-1") for n in (a, b)] == [expected, expected]

    await eventually(lambda: counts(5))
    await socks[3].ws.close()  # a session: gone at once
    await socks[2].ws.close()  # a device in its grace: online, but no socket open
    await eventually(lambda: counts(3))
    assert await shared_presence.online_devices(a.services, "u-2") == 0
    for sock in socks:
        await sock.ws.close()


async def test_a_killed_node_s_devices_go_offline_after_the_ttl_exactly_once(
    server_factory: Any, make_settings: Callable[..., Settings], pg_url: str, pg_schema: str,
    redis_url: str, redis_prefix: str, tmp_path: Path,
) -> None:
    secret = "presence-kill-test-" + "0" * 32
    common = {"DATABASE_URL": pg_url, "DATABASE_SCHEMA": pg_schema, "REDIS_URL": redis_url, "REDIS_PREFIX": redis_prefix,
              "JWT_SECRET": secret, "PRESENCE_GRACE_S": "0.3", "PRESENCE_TIMEOUT_S": "1",
              "PRESENCE_TTL_S": "1.2"}
    survivor = await server_factory(make_settings(
        database_url=pg_url, database_schema=pg_schema, redis_url=redis_url, redis_prefix=redis_prefix,
        jwt_secret=secret, presence_grace_s=0.3, presence_timeout_s=1.0, presence_ttl_s=1.2,
    ))  # fmt: skip
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{survivor.port}/api/v1"
        async with http.post(base + "/auth/register", json={"email": "ada@example.com", "password": PASSWORD}) as resp:
            assert resp.status == 201, await resp.text()
        async with http.post(base + "/auth/login", json={"email": "ada@example.com", "password": PASSWORD}) as resp:
            login = (await resp.json())["data"]
    token, user_id = login["access_token"], login["user"]["id"]

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env.update(common, HOST="127.0.0.1", PORT=str(port), DATA_DIR=str(tmp_path / "victim"), LOG_LEVEL="WARNING")
    victim = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "switchboard"), "serve", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        watcher = await open_ws(survivor.port, "watcher", token=token)

        async def victim_socket() -> Sock | None:
            try:
                return await open_ws(port, "doomed", token=token)
            except OSError:
                return None  # not listening yet

        doomed: list[Sock] = []

        async def connected() -> bool:
            assert victim.returncode is None, "the node exited early"
            sock = await victim_socket()
            if sock is not None:
                doomed.append(sock)
            return bool(doomed)

        await eventually(connected, timeout=60)
        await watcher.until(lambda f: f == {"type": "device.online", "device_id": "doomed"})
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        assert await watcher.until(lambda f: f["type"] == "device.offline") == {
            "type": "device.offline", "device_id": "doomed"
        }  # fmt: skip
        assert await watcher.settled(survivor, user_id) == [online("doomed"), offline("doomed")]
        with pytest.raises(ConnectionClosed):  # (the doomed socket really is gone)
            await doomed[0].recv()
    finally:
        if victim.returncode is None:
            victim.kill()
            await victim.wait()


async def test_a_draining_node_s_devices_get_the_grace_and_may_reconnect_elsewhere(
    start: Any, redis_url: str, redis_prefix: str
) -> None:
    # The TTL is far beyond the waits: only the drain removing its entries lets the offline come.
    draining, staying = [await start(redis_url=redis_url, redis_prefix=redis_prefix, presence_grace_s=1.0,
                                     presence_ttl_s=120.0) for _ in range(2)]  # fmt: skip
    watcher = await open_ws(staying.port, "watcher")
    leaving = await open_ws(draining.port, "leaving")
    # One at a time (SEQUENCED): a frame that reaches a socket still opening would come before its hello.
    await watcher.until(lambda f: f == {"type": "device.online", "device_id": "leaving"})
    moving = await open_ws(draining.port, "moving")
    await watcher.until(lambda f: f == {"type": "device.online", "device_id": "moving"})
    closing = asyncio.ensure_future(draining.close())
    assert await close_code(moving) == 1001
    moved = await open_ws(staying.port, "moving")  # reconnects elsewhere at once
    assert await close_code(leaving) == 1001
    await closing
    await watcher.until(lambda f: f == {"type": "device.offline", "device_id": "leaving"})
    await sleep_past(time.monotonic() + 1.0, Timing.of(staying.settings))
    assert await watcher.settled(staying) == [online("leaving"), online("moving"), offline("leaving")]
    await moved.ws.close()


# -- the heartbeat request ---------------------------------------------------------------------------


async def test_heartbeat_replies_with_server_time_and_keeps_a_daemon_online(start: Any) -> None:
    server = await start(presence_grace_s=0.2, presence_timeout_s=2.5)
    watcher = await open_ws(server.port, "watcher")
    daemon = await open_ws(server.port, token="daemon")
    await watcher.until(lambda f: f == {"type": "device.online", "device_id": "gpu-1"})
    before = int(time.time())
    await daemon.send({"type": "heartbeat", "request_id": "hb-1", "status": "idle", "metrics": GOOD_METRICS})
    reply = await daemon.until(lambda f: f["type"] == "reply")
    assert reply == {"type": "reply", "request_id": "hb-1", "ok": True, "data": {"server_time": reply["data"]["server_time"]}}
    assert before <= reply["data"]["server_time"] <= int(time.time())
    await daemon.send({"type": "heartbeat"})  # no request_id: still answered
    assert (await daemon.until(lambda f: f["type"] == "reply"))["request_id"] is None
    await daemon.ws.close()
    await sleep_past(time.monotonic() + 0.2, Timing.of(server.settings))  # past the grace
    assert await shared_presence.for_services(server.services).online("u-1") == ["gpu-1", "watcher"]
    await watcher.until(lambda f: f == {"type": "device.offline", "device_id": "gpu-1"})  # after the timeout


async def test_bad_heartbeats_get_a_clear_error_and_the_socket_stays(start: Any) -> None:
    server = await start()
    daemon = await open_ws(server.port, token="daemon")
    await daemon.send({"type": "heartbeat", "request_id": "hb-1", "metrics": {"gpus": [{"index": 0, "utilization": 150}]}})
    assert await daemon.until(lambda f: f["type"] == "reply") == {
        "type": "reply", "request_id": "hb-1", "ok": False,
        "error": {"code": "VALIDATION_ERROR", "message": "'metrics.gpus[0].utilization' must be a number between 0 and 100"},
    }  # fmt: skip
    await daemon.send('{"type": "heartbeat", "metrics": {"cpu": NaN}}')  # JSON that Python would take
    error = await daemon.until(lambda f: f["type"] == "error")
    assert error["code"] == "VALIDATION_ERROR" and error["message"].startswith("'metrics.cpu'"), error
    await daemon.send({"type": "heartbeat", "request_id": "hb-2", "status": ["busy"]})
    reply = await daemon.until(lambda f: f["type"] == "reply")
    assert reply["ok"] is False and reply["error"]["message"].startswith("'status'"), reply
    await daemon.send({"type": "ping", "request_id": "still-there"})
    assert await daemon.until(lambda f: f["type"] == "pong") == {"type": "pong", "request_id": "still-there"}


async def test_book_relay_sockets_are_not_in_presence_and_cannot_heartbeat(
    server_factory: Any, make_settings: Callable[..., Settings]
) -> None:
    server = await server_factory(make_settings(**FAST))  # the real authenticator: device JWTs
    key = await insert_device(server.services.db)
    book = await insert_book(server.services.db, key)
    peer = await open_peer(server, key, book)
    await peer.send({"type": "heartbeat", "request_id": "hb"})
    reply = await peer.until(lambda f: f["type"] == "reply")
    assert reply == {"type": "reply", "request_id": "hb", "ok": False,
                     "error": {"code": "VALIDATION_ERROR", "message": "heartbeat is a /ws request"}}  # fmt: skip
    assert relay_presence.for_state(server.state).sockets == {}
    assert await shared_presence.for_services(server.services).online(peer.id) == []
    await peer.ws.close()


class CountingDb:
    """The store, counting every statement that writes ``last_seen_at``."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.writes: list[tuple[str, int]] = []  # (sql, rows)
        self.rows: list[tuple[str, tuple[Any, ...]]] = []  # (sql, arguments) per row written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def execute(self, sql: str, *args: Any) -> int:
        if "last_seen_at" in sql:
            self.writes.append((sql, 1))
            self.rows.append((sql, args))
        return int(await self._db.execute(sql, *args))

    async def executemany(self, sql: str, args: list[tuple[Any, ...]]) -> None:
        if "last_seen_at" in sql:
            self.writes.append((sql, len(args)))
            self.rows.extend((sql, row) for row in args)
        await self._db.executemany(sql, args)


async def last_seen(db: Any) -> dict[str, int]:
    rows = await db.fetch("SELECT device_id, last_seen_at FROM inbox_devices WHERE user_id = 'u-1'")
    return {r["device_id"]: int(r["last_seen_at"]) for r in rows}


async def test_heartbeat_timestamps_reach_the_store_in_one_batch_per_flush(start: Any) -> None:
    # No periodic flush during the test (the inbox's acks share the interval): the test flushes.
    server = await start(inbox_ack_flush_s=3600.0)
    devices = ["gpu-a", "gpu-b", "gpu-c"]
    socks = [await open_ws(server.port, d) for d in devices]
    counting = CountingDb(server.services.db)
    server.services.db = counting
    last_reply: dict[str, int] = {}
    for round_ in range(10):
        for device, sock in zip(devices, socks, strict=True):
            await sock.send({"type": "heartbeat", "request_id": f"{device}-{round_}"})
            reply = await sock.until(lambda f: f["type"] == "reply")
            last_reply[device] = reply["data"]["server_time"]
    assert counting.writes == []  # 30 heartbeats, not one store write yet
    await relay_presence.for_state(server.state).flush_heartbeats()
    assert [rows for _, rows in counting.writes] == [3]  # one statement, one row per device
    seen = await last_seen(counting)
    for device in devices:
        assert seen[device] // 1000 == last_reply[device]  # the newest heartbeat's time
    await relay_presence.for_state(server.state).flush_heartbeats()
    assert len(counting.writes) == 1  # nothing new: nothing written
    for sock in socks:
        await sock.ws.close()


async def test_heartbeat_timestamps_are_flushed_periodically(start: Any) -> None:
    server = await start(inbox_ack_flush_s=0.2)
    sock = await open_ws(server.port, "gpu-a")
    connected = (await last_seen(server.services.db))["gpu-a"]
    # Let the inbox write its own connect-time last_seen_at first (its ack flush shares the
    # interval and does not only move forward), so what changes next is the heartbeat's.
    await asyncio.sleep(0.5)
    await sock.send({"type": "heartbeat", "request_id": "1"})
    reply = await sock.until(lambda f: f["type"] == "reply")

    async def written() -> bool:
        return (await last_seen(server.services.db))["gpu-a"] > connected

    await eventually(written)
    assert (await last_seen(server.services.db))["gpu-a"] // 1000 == reply["data"]["server_time"]
    await sock.ws.close()


async def test_heartbeat_timestamps_are_written_on_drain(start: Any) -> None:
    server = await start(inbox_ack_flush_s=3600.0)  # no periodic flush: only the drain writes
    sock = await open_ws(server.port, "gpu-b")
    counting = CountingDb(server.services.db)
    server.services.db = counting
    await sock.send({"type": "heartbeat", "request_id": "1"})
    reply = await sock.until(lambda f: f["type"] == "reply")
    assert counting.writes == []
    await server.close()
    # The heartbeat log's statement (only forward), with this device's heartbeat time.
    (at,) = [row[2] for sql, row in counting.rows if "last_seen_at < $3" in sql and row[:2] == ("u-1", "gpu-b")]
    assert at // 1000 == reply["data"]["server_time"]
    db = await open_database(server.settings.effective_database_url, migrate=False)
    try:
        assert (await last_seen(db))["gpu-b"] >= at  # (the inbox's close may write a later time)
    finally:
        await db.close()

"""The ``Broker`` contract, run against ``MemoryBroker`` and ``RedisBroker`` on a real Redis and on
a real Redis Cluster (sharded pub/sub; its own node-level tests are in test_broker_cluster.py).

Absence of a delivery is never proven by sleeping: a marker published afterwards on a subscribed
channel arrives after anything that would have been delivered before it (one publisher, one
subscriber connection: Redis keeps that order, and the memory broker delivers synchronously).
The Redis-only tests cover what one process cannot show: two nodes, a publisher that never
started, a dropped pub/sub connection and an unreachable server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis

from shared.broker import Broker
from shared.broker.memory import MemoryBroker
from shared.broker.redis import RedisBroker, subscriber_name
from shared.errors import BackendUnavailable
from tests.conftest import wait_for

Received = list[tuple[str, bytes]]


class Recorder:
    """The handler: records every delivery."""

    def __init__(self) -> None:
        self.got: Received = []

    def __call__(self, channel: str, data: bytes) -> None:
        self.got.append((channel, data))

    def on(self, channel: str) -> list[bytes]:
        return [data for ch, data in self.got if ch == channel]

    async def until(self, channel: str, data: bytes) -> None:
        await wait_for(lambda: (channel, data) in self.got)


BrokerFactory = Callable[[], Broker]


@pytest.fixture(params=["memory", "redis", "cluster"])
def broker_kind(request: pytest.FixtureRequest, redis_url: str) -> tuple[str, str]:
    """The backend under test and its URL (the cluster is started only when asked for)."""
    if request.param == "cluster":
        return "cluster", request.getfixturevalue("redis_cluster").url
    return str(request.param), redis_url


@pytest.fixture
async def make_broker(broker_kind: tuple[str, str], redis_prefix: str) -> AsyncIterator[BrokerFactory]:
    kind, url = broker_kind
    made: list[Broker] = []

    def make() -> Broker:
        broker: Broker = (
            MemoryBroker()
            if kind == "memory"
            else RedisBroker(url, prefix=redis_prefix, cluster=kind == "cluster")
        )
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


@pytest.fixture
async def started(make_broker: BrokerFactory) -> tuple[Broker, Recorder]:
    broker, recorder = make_broker(), Recorder()
    await broker.start(recorder)
    return broker, recorder


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


# -- the contract, both backends -------------------------------------------------------------


async def test_publish_subscribe_unsubscribe(started: tuple[Broker, Recorder]) -> None:
    broker, rec = started
    await broker.subscribe("a")
    await broker.subscribe("marker")
    await broker.publish("a", b"1")  # right after subscribe returned: must arrive
    await rec.until("a", b"1")

    await broker.unsubscribe("a")
    await broker.publish("a", b"2")
    await broker.publish("marker", b"m1")
    await rec.until("marker", b"m1")
    assert rec.on("a") == [b"1"]

    await broker.subscribe("a")  # subscribing again works
    await broker.publish("a", b"3")
    await rec.until("a", b"3")
    assert rec.on("a") == [b"1", b"3"]


async def test_subscribe_is_idempotent_and_one_unsubscribe_drops_it(
    started: tuple[Broker, Recorder],
) -> None:
    broker, rec = started
    await broker.subscribe("a")
    await broker.subscribe("a")
    await broker.subscribe("marker")
    await broker.publish("a", b"once")
    await broker.publish("marker", b"m1")
    await rec.until("marker", b"m1")
    assert rec.on("a") == [b"once"]  # subscribed twice, delivered once

    await broker.unsubscribe("a")
    await broker.unsubscribe("a")  # unsubscribing an unknown channel is harmless
    await broker.publish("a", b"gone")
    await broker.publish("marker", b"m2")
    await rec.until("marker", b"m2")
    assert rec.on("a") == [b"once"]


async def test_only_subscribed_channels_are_delivered(started: tuple[Broker, Recorder]) -> None:
    broker, rec = started
    await broker.subscribe("wanted")
    for channel in ("other", "wanted-not", "WANTED", "want"):
        await broker.publish(channel, b"x")
    await broker.publish("wanted", b"yes")
    await rec.until("wanted", b"yes")
    assert rec.got == [("wanted", b"yes")]


async def test_per_channel_order_with_thousands_of_messages(
    started: tuple[Broker, Recorder],
) -> None:
    broker, rec = started
    await broker.subscribe("a")
    await broker.subscribe("b")
    n = 3000
    for i in range(n):
        await broker.publish("a" if i % 3 else "b", str(i).encode())
    await wait_for(lambda: len(rec.got) == n, timeout=20)
    expected_a = [str(i).encode() for i in range(n) if i % 3]
    expected_b = [str(i).encode() for i in range(n) if not i % 3]
    assert rec.on("a") == expected_a
    assert rec.on("b") == expected_b


async def test_a_burst_of_concurrent_publishes_all_arrive(started: tuple[Broker, Recorder]) -> None:
    broker, rec = started
    await broker.subscribe("a")
    n = 500  # more than the publish connection pool holds: callers wait, none fails
    await asyncio.gather(*(broker.publish("a", str(i).encode()) for i in range(n)))
    await wait_for(lambda: len(rec.got) == n)
    assert sorted(int(data) for data in rec.on("a")) == list(range(n))


async def test_binary_payloads_arrive_byte_for_byte(started: tuple[Broker, Recorder]) -> None:
    broker, rec = started
    channel = "bin/ärger:\u2603"  # channel names are text, any text
    await broker.subscribe(channel)
    payloads = [
        b"",
        bytes(range(256)),
        b"\x00\r\n*1\r\n$3\r\nFOO\r\n",  # looks like RESP: must not be interpreted
        "✓ utf-8".encode(),
        bytes(range(256)) * 4096,  # 1 MiB
    ]
    for data in payloads:
        await broker.publish(channel, data)
    await wait_for(lambda: len(rec.got) == len(payloads))
    assert rec.on(channel) == payloads
    assert all(isinstance(data, bytes) for data in rec.on(channel))


async def test_publish_sequenced_numbers_in_order_and_appends_the_seq(
    started: tuple[Broker, Recorder],
) -> None:
    broker, rec = started
    channel, counter = "book:{1}", "bookseq:{1}"  # one hash tag: one slot on a cluster
    await broker.subscribe(channel)
    assert await broker.sequence_head(counter) == 0
    seqs = [await broker.publish_sequenced(counter, channel, b"\x92\xa1x") for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    await wait_for(lambda: len(rec.got) == 5)
    assert [msgpack.unpackb(data) for data in rec.on(channel)] == [["x", i] for i in range(1, 6)]
    assert await broker.sequence_head(counter) == 5
    assert await broker.sequence_head("bookseq:{2}") == 0


async def test_subscribe_before_start_is_remembered(make_broker: BrokerFactory) -> None:
    broker, rec = make_broker(), Recorder()
    await broker.subscribe("early")
    await broker.start(rec)
    await broker.publish("early", b"hello")
    await rec.until("early", b"hello")


async def test_publish_before_start_does_not_fail(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    await broker.publish("anything", b"x")  # REST-only processes never start the broker
    await broker.ping()


async def test_a_failing_handler_does_not_stop_delivery(make_broker: BrokerFactory) -> None:
    broker, rec = make_broker(), Recorder()

    def handler(channel: str, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("handler bug")
        rec(channel, data)

    await broker.start(handler)
    await broker.subscribe("a")
    await broker.publish("a", b"boom")  # the publisher does not see the subscriber's failure
    await broker.publish("a", b"after")
    await rec.until("a", b"after")


async def test_closed_broker_refuses_to_publish(make_broker: BrokerFactory) -> None:
    broker = make_broker()
    await broker.start(Recorder())
    await broker.close()
    with pytest.raises(BackendUnavailable):
        await broker.publish("a", b"x")
    await broker.close()  # idempotent


# -- Redis only: several nodes, reconnects, failures -----------------------------------------


@pytest.fixture
async def redis_brokers(
    redis_url: str, redis_prefix: str
) -> AsyncIterator[Callable[[], RedisBroker]]:
    made: list[RedisBroker] = []

    def make() -> RedisBroker:
        made.append(RedisBroker(redis_url, prefix=redis_prefix))
        return made[-1]

    yield make
    for broker in made:
        await broker.close()


async def test_two_nodes_exchange_messages(redis_brokers: Callable[[], RedisBroker]) -> None:
    node_a, node_b = redis_brokers(), redis_brokers()
    rec_a, rec_b = Recorder(), Recorder()
    await node_a.start(rec_a)
    await node_b.start(rec_b)
    await node_a.subscribe("to-a")
    await node_b.subscribe("to-b")
    await node_a.subscribe("both")
    await node_b.subscribe("both")

    await node_a.publish("to-b", b"from a")
    await node_b.publish("to-a", b"from b")
    await node_a.publish("both", b"everyone")  # the publisher's own node receives it too
    await rec_a.until("both", b"everyone")
    await rec_b.until("both", b"everyone")
    assert rec_a.got == [("to-a", b"from b"), ("both", b"everyone")]
    assert rec_b.got == [("to-b", b"from a"), ("both", b"everyone")]


async def test_prefixes_isolate_deployments(redis_url: str, redis_prefix: str) -> None:
    mine = RedisBroker(redis_url, prefix=redis_prefix)
    other = RedisBroker(redis_url, prefix=redis_prefix + "other:")
    rec = Recorder()
    try:
        await mine.start(rec)
        await mine.subscribe("a")
        await other.publish("a", b"not for us")
        await mine.publish("a", b"ours")
        await rec.until("a", b"ours")
        assert rec.got == [("a", b"ours")]
    finally:
        await mine.close()
        await other.close()


async def test_a_node_that_never_started_publishes(
    redis_brokers: Callable[[], RedisBroker],
) -> None:
    rest_only, node = redis_brokers(), redis_brokers()
    rec = Recorder()
    await node.start(rec)
    await node.subscribe("events")
    await rest_only.publish("events", b"from REST")
    await rec.until("events", b"from REST")


async def test_subscribes_on_redis_only_to_the_channels_asked_for(
    redis_brokers: Callable[[], RedisBroker], redis_client: Any, redis_prefix: str
) -> None:
    broker = redis_brokers()
    await broker.start(Recorder())
    await broker.subscribe("a")
    await broker.subscribe("b")
    await broker.unsubscribe("b")
    await wait_for_channels(redis_client, redis_prefix, {"a"})


async def test_subscribe_returns_once_redis_has_the_subscription(
    redis_brokers: Callable[[], RedisBroker], redis_client: Any, redis_prefix: str
) -> None:
    broker = redis_brokers()
    await broker.start(Recorder())
    channels = [f"c{i}" for i in range(300)]
    await asyncio.gather(*(broker.subscribe(ch) for ch in channels))
    # No polling: each subscribe returned after Redis confirmed it.
    names = await redis_client.pubsub_channels(redis_prefix + "c*")
    assert len(names) == len(channels)


async def test_nothing_is_delivered_after_unsubscribe_returns(
    redis_brokers: Callable[[], RedisBroker], redis_client: Any, redis_prefix: str
) -> None:
    broker, rec = redis_brokers(), Recorder()
    await broker.start(rec)
    await broker.subscribe("a")
    await broker.subscribe("marker")
    flood = redis_client.pipeline(transaction=False)
    for i in range(20000):
        flood.publish(redis_prefix + "a", str(i).encode())
    sending = asyncio.ensure_future(flood.execute())
    await wait_for(lambda: len(rec.got) >= 100)  # the flood is arriving, most of it in flight
    await broker.unsubscribe("a")
    seen = len(rec.on("a"))
    await sending
    assert seen < 20000, "the flood was read before unsubscribe: the test proves nothing"
    await broker.publish("marker", b"m")
    await rec.until("marker", b"m")
    assert len(rec.on("a")) == seen


async def test_reconnects_and_resubscribes_after_the_connection_is_killed(
    redis_brokers: Callable[[], RedisBroker], redis_client: Any, redis_prefix: str
) -> None:
    broker, rec = redis_brokers(), Recorder()
    await broker.start(rec)
    await broker.subscribe("a")
    await broker.subscribe("b")
    await broker.subscribe("gone")
    await broker.unsubscribe("gone")
    await broker.publish("a", b"before")
    await rec.until("a", b"before")
    old_ids = await subscriber_ids(redis_client, redis_prefix)
    assert len(old_ids) == 1

    for client_id in old_ids:  # only our connection: other tests share this Redis
        await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "ID", client_id)

    # A new connection appears by itself and carries exactly the wanted channels again.
    await wait_for_channels(redis_client, redis_prefix, {"a", "b"})
    new_ids = await subscriber_ids(redis_client, redis_prefix)
    assert len(new_ids) == 1 and new_ids.isdisjoint(old_ids)

    for i in range(100):
        await broker.publish("a" if i % 2 else "b", str(i).encode())
    await wait_for(lambda: len(rec.got) == 101)
    assert rec.on("a") == [b"before"] + [str(i).encode() for i in range(100) if i % 2]
    assert rec.on("b") == [str(i).encode() for i in range(100) if not i % 2]

    await broker.subscribe("c")  # new subscriptions work on the new connection
    await broker.publish("c", b"fresh")
    await rec.until("c", b"fresh")


async def test_publish_and_start_fail_as_backend_unavailable_without_redis() -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    broker = RedisBroker(url, prefix="sbt:none:")
    try:
        with pytest.raises(BackendUnavailable):
            await broker.publish("a", b"x")
        with pytest.raises(BackendUnavailable):
            await broker.ping()
        with pytest.raises(BackendUnavailable):
            await broker.start(Recorder())
    finally:
        await broker.close()


async def test_subscriber_name_is_a_valid_client_name() -> None:
    assert subscriber_name("sb:") == "switchboard-broker:sb:"
    assert subscriber_name("my app\n:") == "switchboard-broker:my_app_:"


async def test_survives_a_redis_restart(private_redis: RedisServer) -> None:
    broker, rec = RedisBroker(private_redis.url, prefix="sbt:restart:"), Recorder()
    try:
        await broker.start(rec)
        await broker.subscribe("a")
        await broker.publish("a", b"before")
        await rec.until("a", b"before")

        await private_redis.stop()
        with pytest.raises(BackendUnavailable):
            await broker.publish("a", b"lost")
        with pytest.raises(BackendUnavailable):
            await broker.ping()

        await private_redis.start()
        await publish_until_delivered(broker, rec, "a")  # the reader reconnected by itself
        await broker.publish("a", b"after")
        await rec.until("a", b"after")
        await broker.ping()
    finally:
        await broker.close()


# -- helpers ---------------------------------------------------------------------------------


async def subscriber_ids(client: Any, prefix: str) -> set[str]:
    """Redis ids of this test's broker pub/sub connections (found by their client name)."""
    clients = await client.client_list(_type="pubsub")
    return {str(c["id"]) for c in clients if c.get("name") == subscriber_name(prefix)}


async def wait_for_channels(client: Any, prefix: str, expected: set[str]) -> None:
    """Poll PUBSUB CHANNELS until Redis has exactly ``expected`` subscribed under ``prefix``."""
    pattern = prefix.replace("*", r"\*") + "*"
    for _ in range(500):
        names = await client.pubsub_channels(pattern)
        if {n.decode()[len(prefix) :] for n in names} == expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"subscribed channels never became {expected}: {names}")


async def publish_until_delivered(broker: Broker, rec: Recorder, channel: str) -> None:
    """Publish probes until one arrives (the subscriber may still be reconnecting)."""
    for i in range(1000):
        probe = f"probe-{i}".encode()
        with contextlib.suppress(BackendUnavailable):
            await broker.publish(channel, probe)
        for _ in range(5):
            if (channel, probe) in rec.got:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("no probe was delivered")


class RedisServer:
    """A private redis-server on a free port, which a test may stop and start again."""

    def __init__(self) -> None:
        self.port = closed_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = aioredis.from_url(self.url)
        try:
            for _ in range(500):
                with contextlib.suppress(OSError, aioredis.ConnectionError):
                    await client.ping()
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("redis-server did not start")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    try:
        await server.start()
    except FileNotFoundError:
        pytest.fail("redis-server is required on PATH (the restart tests run their own)")
    try:
        yield server
    finally:
        await server.stop()


def closed_port() -> int:
    """A local port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

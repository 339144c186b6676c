"""``RedisBroker(cluster=True)`` on a real Redis Cluster (tests/fixtures/redis_cluster.py).

The shared contract runs in test_broker.py (the "cluster" parameter). Here: what only a cluster
shows. Each SSUBSCRIBE lands on the master owning the channel's slot and nowhere else; two nodes
and two hubs share one gapless sequence; a killed connection, a killed and restarted master and a
slot moved to another master are all recovered by the broker itself.

Nothing is proven by sleeping: absence is shown with a marker published afterwards, recovery by
polling what the Redis nodes report (PUBSUB SHARDCHANNELS, CLIENT LIST).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from relay.hub import Hub
from shared.broker.redis import RedisBroker, subscriber_name
from shared.config import Settings
from shared.errors import BackendUnavailable
from shared.ratelimit import Limit
from shared.ratelimit.redis import RedisRateLimiter
from shared.services import make_broker, make_limiter
from tests.conftest import wait_for
from tests.fixtures.redis_cluster import ClusterNodeServer, RedisClusterServer
from tests.test_broker import Recorder, closed_port, publish_until_delivered
from tests.test_hub import FakeConn, json_frames, tick

BrokerMaker = Callable[[], RedisBroker]


@pytest.fixture
async def cluster_brokers(redis_cluster: RedisClusterServer, redis_prefix: str) -> AsyncIterator[BrokerMaker]:
    made: list[RedisBroker] = []

    def make() -> RedisBroker:
        made.append(RedisBroker(redis_cluster.url, prefix=redis_prefix, cluster=True))
        return made[-1]

    yield make
    for broker in made:
        await broker.close()


@pytest.fixture
async def node_clients(redis_cluster: RedisClusterServer) -> AsyncIterator[dict[int, Any]]:
    """A plain client per cluster node (port -> client), to ask each node what it holds."""
    clients = {node.port: aioredis.Redis(host="127.0.0.1", port=node.port) for node in redis_cluster.nodes}
    yield clients
    for client in clients.values():
        await client.aclose()


# -- helpers ---------------------------------------------------------------------------------


async def slot_owners(client: Any) -> dict[int, int]:
    """slot -> port of its master, as one node sees the cluster."""
    owners: dict[int, int] = {}
    for start, end, master, *_ in await client.execute_command("CLUSTER", "SLOTS"):
        for slot in range(int(start), int(end) + 1):
            owners[slot] = int(master[1])
    return owners


async def owner_port(node_clients: dict[int, Any], name: str) -> int:
    """The port of the master owning ``name``'s slot."""
    any_client = next(iter(node_clients.values()))
    return (await slot_owners(any_client))[key_slot(name.encode())]


async def shard_channels(node_clients: dict[int, Any], prefix: str) -> dict[int, set[str]]:
    """port -> the sharded channels under ``prefix`` that node has subscribers for."""
    pattern = prefix.replace("*", r"\*") + "*"
    found: dict[int, set[str]] = {}
    for port, client in node_clients.items():
        names = await client.execute_command("PUBSUB", "SHARDCHANNELS", pattern)
        found[port] = {n.decode()[len(prefix) :] for n in names}
    return found


async def expected_layout(node_clients: dict[int, Any], prefix: str, channels: set[str]) -> dict[int, set[str]]:
    """Where ``channels`` must be subscribed: each on its slot's master only."""
    layout: dict[int, set[str]] = {port: set() for port in node_clients}
    for channel in channels:
        layout[await owner_port(node_clients, prefix + channel)].add(channel)
    return layout


async def wait_for_layout(node_clients: dict[int, Any], prefix: str, channels: set[str], timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(aioredis.ConnectionError):
            want = await expected_layout(node_clients, prefix, channels)
            got = await shard_channels(node_clients, prefix)
            if got == want:
                return
        if loop.time() > deadline:
            raise AssertionError(f"sharded subscriptions never became {channels} on their owners")
        await asyncio.sleep(0.02)


async def subscriber_ids(client: Any, prefix: str) -> set[str]:
    clients = await client.client_list(_type="pubsub")
    return {str(c["id"]) for c in clients if c.get("name") == subscriber_name(prefix)}


def channels_on_distinct_masters(owners: dict[int, int], prefix: str, count: int) -> list[str]:
    """``count`` channel names whose slots belong to ``count`` different masters."""
    picked: dict[int, str] = {}
    for i in range(10_000):
        name = f"ch{i}"
        port = owners[key_slot((prefix + name).encode())]
        picked.setdefault(port, name)
        if len(picked) == count:
            return list(picked.values())
    raise AssertionError("the cluster has fewer masters than asked for")


# -- where subscriptions live ----------------------------------------------------------------


async def test_each_channel_is_subscribed_on_the_master_owning_its_slot(
    cluster_brokers: BrokerMaker, node_clients: dict[int, Any], redis_prefix: str
) -> None:
    broker = cluster_brokers()
    await broker.start(Recorder())
    channels = {f"c{i}" for i in range(30)}
    for channel in channels:
        await broker.subscribe(channel)
    # No polling: each subscribe returned once its owner confirmed it.
    layout = await shard_channels(node_clients, redis_prefix)
    assert layout == await expected_layout(node_clients, redis_prefix, channels)
    assert sum(bool(names) for names in layout.values()) >= 2, "30 channels all on one master?"
    for client in node_clients.values():  # sharded pub/sub only, never the cluster-wide kind
        assert await client.pubsub_channels(redis_prefix + "*") == []

    for channel in sorted(channels)[:10]:
        await broker.unsubscribe(channel)
    await wait_for_layout(node_clients, redis_prefix, set(sorted(channels)[10:]))


async def test_concurrent_subscribes_are_each_confirmed_before_they_return(
    cluster_brokers: BrokerMaker, node_clients: dict[int, Any], redis_prefix: str
) -> None:
    broker = cluster_brokers()
    await broker.start(Recorder())
    channels = [f"c{i}" for i in range(300)]
    await asyncio.gather(*(broker.subscribe(ch) for ch in channels))
    layout = await shard_channels(node_clients, redis_prefix)
    assert sum(len(names) for names in layout.values()) == len(channels)


async def test_nothing_is_delivered_after_unsubscribe_returns(
    cluster_brokers: BrokerMaker, node_clients: dict[int, Any], redis_prefix: str
) -> None:
    broker, rec = cluster_brokers(), Recorder()
    await broker.start(rec)
    await broker.subscribe("a")
    await broker.subscribe("marker")
    owner = node_clients[await owner_port(node_clients, redis_prefix + "a")]
    flood = owner.pipeline(transaction=False)
    for i in range(20000):
        flood.execute_command("SPUBLISH", redis_prefix + "a", str(i).encode())
    sending = asyncio.ensure_future(flood.execute())
    await wait_for(lambda: len(rec.got) >= 100)  # the flood is arriving, most of it in flight
    await broker.unsubscribe("a")
    seen = len(rec.on("a"))
    await sending
    assert seen < 20000, "the flood was read before unsubscribe: the test proves nothing"
    await broker.publish("marker", b"m")
    await rec.until("marker", b"m")
    assert len(rec.on("a")) == seen


# -- several nodes, one order ----------------------------------------------------------------


async def test_two_nodes_share_one_gapless_sequence(cluster_brokers: BrokerMaker) -> None:
    nodes, recs = [cluster_brokers(), cluster_brokers()], [Recorder(), Recorder()]
    for node, rec in zip(nodes, recs, strict=True):
        await node.start(rec)
        await node.subscribe("book:{7}")
        await node.subscribe("to-b" if node is nodes[1] else "to-a")
    await nodes[0].publish("to-b", b"from a")
    await nodes[1].publish("to-a", b"from b")
    n = 200

    async def publish_from(i: int) -> list[int]:
        body = b"\x92" + msgpack.packb(f"n{i}")  # [tag, seq]: the broker appends the seq
        return [await nodes[i].publish_sequenced("bookseq:{7}", "book:{7}", body) for _ in range(n)]

    seqs = await asyncio.gather(publish_from(0), publish_from(1))
    assert sorted(seqs[0] + seqs[1]) == list(range(1, 2 * n + 1))
    for rec in recs:
        await wait_for(lambda rec=rec: len(rec.on("book:{7}")) == 2 * n, timeout=20)
    orders = [[msgpack.unpackb(data) for data in rec.on("book:{7}")] for rec in recs]
    assert [seq for _, seq in orders[0]] == list(range(1, 2 * n + 1))  # in order, no gaps
    assert orders[0] == orders[1]  # the same order on both nodes, whoever published
    assert sum(tag == "n0" for tag, _ in orders[0]) == n
    assert await nodes[1].sequence_head("bookseq:{7}") == 2 * n
    assert await nodes[0].sequence_head("bookseq:{8}") == 0
    assert recs[0].on("to-a") == [b"from b"] and recs[1].on("to-b") == [b"from a"]


async def test_sequenced_names_in_different_slots_are_refused(
    cluster_brokers: BrokerMaker, redis_prefix: str
) -> None:
    broker, rec = cluster_brokers(), Recorder()
    await broker.start(rec)
    counter, channel = "bookseq:1", "book:1"
    assert key_slot(f"{redis_prefix}seq:{counter}".encode()) != key_slot(f"{redis_prefix}{channel}".encode())
    await broker.subscribe(channel)
    with pytest.raises(ValueError, match="hash tag"):
        await broker.publish_sequenced(counter, channel, b"\x92\xa1x")
    assert await broker.sequence_head(counter) == 0  # nothing was taken
    await broker.publish(channel, b"marker")
    await rec.until(channel, b"marker")
    assert rec.got == [(channel, b"marker")]


async def test_two_hubs_on_the_cluster_relay_one_gapless_sequence(
    redis_cluster: RedisClusterServer, redis_prefix: str
) -> None:
    hubs = [Hub(RedisBroker(redis_cluster.url, prefix=redis_prefix, cluster=True)) for _ in range(2)]
    members = [FakeConn(f"d{i}") for i in range(4)]
    try:
        for hub in hubs:
            await hub.start()
        for i, conn in enumerate(members):
            await hubs[i % 2].subscribe(conn, "book:{42}")  # type: ignore[arg-type]
        n = 100

        async def publish_from(hub: Hub, tag: str) -> list[int | None]:
            return [
                await hub.publish("book:{42}", {"type": "op", "from": tag}, sequence_key="bookseq:{42}")
                for _ in range(n)
            ]

        seqs = await asyncio.gather(publish_from(hubs[0], "h0"), publish_from(hubs[1], "h1"))
        assert sorted(s for s in seqs[0] + seqs[1] if s is not None) == list(range(1, 2 * n + 1))

        def received(conn: FakeConn) -> list[dict[str, Any]]:
            return [m for data in conn.transport.written for m in json_frames(data)]

        await wait_for(lambda: all(len(received(c)) == 2 * n for c in members), timeout=20)
        await tick()
        orders = [received(conn) for conn in members]
        assert [m["seq"] for m in orders[0]] == list(range(1, 2 * n + 1))
        assert all(order == orders[0] for order in orders)  # one order, on both hubs
        assert sum(m["from"] == "h0" for m in orders[0]) == n
        assert await hubs[0].sequence_head("bookseq:{42}") == 2 * n
    finally:
        for hub in hubs:
            await hub.close()
            await hub.broker.close()


# -- recovery ----------------------------------------------------------------------------------


async def test_a_killed_shard_connection_is_replaced_by_itself(
    cluster_brokers: BrokerMaker, node_clients: dict[int, Any], redis_prefix: str
) -> None:
    broker, rec = cluster_brokers(), Recorder()
    await broker.start(rec)
    owners = await slot_owners(next(iter(node_clients.values())))
    channels = channels_on_distinct_masters(owners, redis_prefix, 3)
    for channel in channels:
        await broker.subscribe(channel)
    victim = owners[key_slot((redis_prefix + channels[0]).encode())]
    ids = {port: await subscriber_ids(client, redis_prefix) for port, client in node_clients.items()}
    assert all(len(found) == 1 for found in ids.values())  # one connection per master in use

    for client_id in ids[victim]:
        await node_clients[victim].execute_command("CLIENT", "KILL", "TYPE", "pubsub", "ID", client_id)

    async def replaced() -> bool:
        now = await subscriber_ids(node_clients[victim], redis_prefix)
        return len(now) == 1 and now.isdisjoint(ids[victim])

    for _ in range(1000):
        if await replaced():
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("no new connection to the master whose connection was killed")
    await wait_for_layout(node_clients, redis_prefix, set(channels))
    for port, client in node_clients.items():  # the other masters' connections were left alone
        if port != victim:
            assert await subscriber_ids(client, redis_prefix) == ids[port]
    for channel in channels:
        await broker.publish(channel, b"after")
        await rec.until(channel, b"after")


async def test_survives_a_restart_of_the_master_owning_a_channel(
    redis_cluster: RedisClusterServer, cluster_brokers: BrokerMaker, node_clients: dict[int, Any], redis_prefix: str
) -> None:
    broker, rec = cluster_brokers(), Recorder()
    await broker.start(rec)
    owners = await slot_owners(next(iter(node_clients.values())))
    a, b = channels_on_distinct_masters(owners, redis_prefix, 2)
    await broker.subscribe(a)
    await broker.subscribe(b)
    await broker.publish(a, b"before")
    await rec.until(a, b"before")
    victim: ClusterNodeServer = redis_cluster.node_at(owners[key_slot((redis_prefix + a).encode())])

    await redis_cluster.kill(victim)
    with pytest.raises(BackendUnavailable):
        await broker.publish(a, b"lost")
    with pytest.raises(BackendUnavailable):
        await broker.ping()  # a master is missing: the broker is not healthy

    await redis_cluster.revive(victim)  # same id and slots, no data, no scripts
    await publish_until_delivered(broker, rec, a)  # resubscribed by itself
    await publish_until_delivered(broker, rec, b)
    await wait_for_layout(node_clients, redis_prefix, {a, b})
    await broker.publish(a, b"after")
    await rec.until(a, b"after")
    await broker.ping()
    # The script cache of the restarted master is empty: the sequenced publish loads it again.
    tagged = "{" + a + "}"
    await broker.subscribe(tagged)
    assert await broker.publish_sequenced(tagged, tagged, b"\x91") == 1
    await rec.until(tagged, b"\x91\x01")


async def test_a_subscription_follows_its_slot_to_another_master(
    cluster_brokers: BrokerMaker, node_clients: dict[int, Any], redis_prefix: str
) -> None:
    broker, rec = cluster_brokers(), Recorder()
    await broker.start(rec)
    owners = await slot_owners(next(iter(node_clients.values())))
    source_port = owners[0]
    channel, slot = await movable_channel(node_clients, owners, redis_prefix, source_port)
    target_port = next(port for port in node_clients if port != source_port)
    await broker.subscribe(channel)
    await broker.subscribe("marker")
    assert channel in (await shard_channels(node_clients, redis_prefix))[source_port]

    await move_slot(node_clients, slot, source_port, target_port)
    # Redis dropped the subscription on the old owner; the broker re-placed it on the new one.
    await wait_for_layout(node_clients, redis_prefix, {channel, "marker"})
    assert channel in (await shard_channels(node_clients, redis_prefix))[target_port]
    await publish_until_delivered(broker, rec, channel)
    await broker.publish(channel, b"moved")
    await rec.until(channel, b"moved")


async def test_subscribing_with_a_stale_slot_map_follows_moved(
    cluster_brokers: BrokerMaker, node_clients: dict[int, Any], redis_prefix: str
) -> None:
    broker, rec = cluster_brokers(), Recorder()
    await broker.start(rec)
    owners = await slot_owners(next(iter(node_clients.values())))
    source_port = owners[0]
    staying = next(
        f"stay{i}" for i in range(10_000) if owners[key_slot(f"{redis_prefix}stay{i}".encode())] == source_port
    )
    await broker.subscribe(staying)  # the broker's connection to the old owner, in use
    connection = await subscriber_ids(node_clients[source_port], redis_prefix)
    channel, slot = await movable_channel(node_clients, owners, redis_prefix, source_port)
    target_port = next(port for port in node_clients if port != source_port)
    await move_slot(node_clients, slot, source_port, target_port)  # the broker's slot map is stale

    await broker.subscribe(channel)  # MOVED from the old owner, then placed on the new one
    layout = await shard_channels(node_clients, redis_prefix)
    assert channel in layout[target_port] and channel not in layout[source_port]
    assert await subscriber_ids(node_clients[source_port], redis_prefix) == connection  # kept
    await broker.publish(channel, b"on the new owner")
    await broker.publish(staying, b"on the old one")
    await rec.until(channel, b"on the new owner")
    await rec.until(staying, b"on the old one")


async def movable_channel(
    node_clients: dict[int, Any], owners: dict[int, int], prefix: str, port: int
) -> tuple[str, int]:
    """A channel owned by ``port`` whose slot holds no keys (SETSLOT NODE refuses to move keys)."""
    for i in range(10_000):
        channel = f"moving{i}"
        slot = key_slot((prefix + channel).encode())
        if owners[slot] == port and not await node_clients[port].execute_command("CLUSTER", "COUNTKEYSINSLOT", slot):
            return channel, slot
    raise AssertionError("no empty slot found")


async def move_slot(node_clients: dict[int, Any], slot: int, source_port: int, target_port: int) -> None:
    """Hand an empty slot to another master, as ``redis-cli --cluster reshard`` does."""
    ids = {port: (await client.execute_command("CLUSTER", "MYID")).decode() for port, client in node_clients.items()}
    source, target = node_clients[source_port], node_clients[target_port]
    await target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source_port])
    await source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target_port])
    others = [port for port in node_clients if port not in (source_port, target_port)]
    for port in (target_port, source_port, *others):
        await node_clients[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target_port])


# -- unreachable, settings ---------------------------------------------------------------------


async def test_start_publish_and_ping_fail_as_backend_unavailable_without_a_cluster() -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{closed_port()}/0", prefix="sbt:none:", cluster=True)
    try:
        with pytest.raises(BackendUnavailable):
            await broker.publish("a", b"x")
        with pytest.raises(BackendUnavailable):
            await broker.publish_sequenced("{a}", "{a}", b"x")
        with pytest.raises(BackendUnavailable):
            await broker.ping()
        with pytest.raises(BackendUnavailable):
            await broker.start(Recorder())
    finally:
        await broker.close()


async def test_services_use_the_cluster_clients_when_redis_cluster_is_set(
    redis_cluster: RedisClusterServer,
    node_clients: dict[int, Any],
    make_settings: Callable[..., Settings],
    redis_url: str,
    redis_prefix: str,
) -> None:
    settings = make_settings(redis_url=redis_cluster.url, redis_prefix=redis_prefix, redis_cluster=True)
    broker, limiter = make_broker(settings), make_limiter(settings)
    rec = Recorder()
    standalone = aioredis.from_url(redis_url)
    try:
        assert isinstance(broker, RedisBroker) and isinstance(limiter, RedisRateLimiter)
        await broker.start(rec)
        await broker.subscribe("a")
        await broker.publish("a", b"through the cluster")
        await rec.until("a", b"through the cluster")
        # Sharded, on the owner of the channel's slot.
        owner = await owner_port(node_clients, redis_prefix + "a")
        assert (await shard_channels(node_clients, redis_prefix))[owner] == {"a"}
        assert [(await limiter.hit("k", Limit(2, 60))).allowed for _ in range(3)] == [True, True, False]
        bucket = limiter._key("k")  # rl:<kind>:<digest>: Redis never sees what a key counts
        assert await node_clients[await owner_port(node_clients, bucket)].exists(bucket) == 1
        assert await standalone.exists(bucket) == 0
    finally:
        await standalone.aclose()
        await broker.close()
        await limiter.close()

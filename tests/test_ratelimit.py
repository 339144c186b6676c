"""The ``RateLimiter`` contract, run against ``MemoryRateLimiter`` and ``RedisRateLimiter`` (on a
real Redis and on a real Redis Cluster, tests/fixtures/redis_cluster.py).

Refill is checked by polling with short periods, never by asserting how long something took.
Decision semantics (shared/ratelimit/base.py): ``remaining`` is what is allowed right now,
``reset_at`` the unix second (rounded up) at which the bucket is full again, ``retry_after`` the
whole seconds (rounded up, >= 1 when denied, 0 when allowed) until the request would fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from shared.errors import BackendUnavailable, RateLimited
from shared.ratelimit import Decision, Limit, RateLimiter
from shared.ratelimit.memory import MemoryRateLimiter, gcra
from shared.ratelimit.redis import RedisRateLimiter
from tests.fixtures.redis_cluster import RedisClusterServer
from tests.test_broker import RedisServer

LimiterFactory = Callable[[], RateLimiter]


@pytest.fixture(params=["memory", "redis", "cluster"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def limiter_url(kind: str, request: pytest.FixtureRequest, redis_url: str) -> str:
    """Where the Redis limiters of this test point (the cluster is started only when asked for)."""
    if kind == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return redis_url


@pytest.fixture
async def make_limiter(
    kind: str, limiter_url: str, redis_prefix: str
) -> AsyncIterator[LimiterFactory]:
    made: list[RateLimiter] = []

    def make() -> RateLimiter:
        limiter: RateLimiter = (
            MemoryRateLimiter()
            if kind == "memory"
            else RedisRateLimiter(limiter_url, prefix=redis_prefix, cluster=kind == "cluster")
        )
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


@pytest.fixture
def limiter(make_limiter: LimiterFactory) -> RateLimiter:
    return make_limiter()


async def poll(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Await ``check()`` until it returns true (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def assert_consistent(d: Decision) -> None:
    """Invariants of every decision, and the headers that carry it."""
    assert 0 <= d.remaining <= d.limit
    assert (d.retry_after == 0) == d.allowed
    assert d.headers == {
        "X-RateLimit-Limit": str(d.limit),
        "X-RateLimit-Remaining": str(d.remaining),
        "X-RateLimit-Reset": str(d.reset_at),
    }
    assert isinstance(d.reset_at, int) and isinstance(d.retry_after, int)


async def test_allows_exactly_capacity_then_denies(limiter: RateLimiter) -> None:
    limit = Limit(5, 60)
    before = time.time()
    decisions = [await limiter.hit("k", limit) for _ in range(7)]
    after = time.time()
    for d in decisions:
        assert_consistent(d)
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0]
    assert {d.limit for d in decisions} == {5}
    # Five events of a 60 s / 5 bucket: full again 60 s after the first.
    for d in decisions[4:]:
        assert math.ceil(before + 60) <= d.reset_at <= math.ceil(after + 60)
    # One more event fits when one emission interval (12 s) has passed since the first.
    for d in decisions[5:]:
        assert 11 <= d.retry_after <= 12


async def test_first_hit_reports_a_nearly_full_bucket(limiter: RateLimiter) -> None:
    before = time.time()
    d = await limiter.hit("k", Limit(10, 100))
    assert_consistent(d)
    assert (d.allowed, d.limit, d.remaining, d.retry_after) == (True, 10, 9, 0)
    assert math.ceil(before + 10) <= d.reset_at <= math.ceil(time.time() + 10)


async def test_burst_sets_the_capacity(limiter: RateLimiter) -> None:
    limit = Limit(10, 60, burst=3)  # 1 event per 6 s, at most 3 at once
    decisions = [await limiter.hit("k", limit) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[-1].limit == 3
    assert 5 <= decisions[-1].retry_after <= 6


async def test_denial_raises_with_the_contract_headers(limiter: RateLimiter) -> None:
    limit = Limit(1, 30)
    (await limiter.hit("k", limit)).raise_if_denied()
    denied = await limiter.hit("k", limit)
    with pytest.raises(RateLimited) as caught:
        denied.raise_if_denied("slow down")
    assert caught.value.headers == {
        **denied.headers,
        "Retry-After": str(denied.retry_after),
    }
    assert caught.value.status == 429


async def test_refills_over_time(limiter: RateLimiter) -> None:
    limit = Limit(4, 0.4)  # one event back every 0.1 s
    for _ in range(4):
        assert (await limiter.hit("k", limit)).allowed
    assert not (await limiter.hit("k", limit)).allowed

    async def one_more_fits() -> bool:
        return (await limiter.peek("k", limit)).allowed

    await poll(one_more_fits)
    assert (await limiter.hit("k", limit)).allowed

    async def full_again() -> bool:
        return (await limiter.peek("k", limit)).remaining == 4

    await poll(full_again)
    assert [(await limiter.hit("k", limit)).allowed for _ in range(5)] == [True] * 4 + [False]


async def test_denied_hits_do_not_consume(limiter: RateLimiter) -> None:
    limit = Limit(2, 0.4)
    for _ in range(2):
        await limiter.hit("k", limit)
    for _ in range(20):  # hammering while denied must not push the refill further away
        assert not (await limiter.hit("k", limit)).allowed

    async def allowed_again() -> bool:
        return (await limiter.hit("k", limit)).allowed

    await poll(allowed_again, timeout=2.0)


async def test_peek_does_not_count(limiter: RateLimiter) -> None:
    limit = Limit(3, 60)
    for _ in range(10):
        d = await limiter.peek("k", limit)
        assert_consistent(d)
        assert (d.allowed, d.remaining) == (True, 3)
    assert [(await limiter.hit("k", limit)).remaining for _ in range(3)] == [2, 1, 0]
    d = await limiter.peek("k", limit)
    assert_consistent(d)
    assert (d.allowed, d.remaining) == (False, 0)
    assert 19 <= d.retry_after <= 20


async def test_reset_empties_the_bucket(limiter: RateLimiter) -> None:
    limit = Limit(2, 60)
    for _ in range(3):
        await limiter.hit("k", limit)
    await limiter.reset("k")
    d = await limiter.hit("k", limit)
    assert (d.allowed, d.remaining) == (True, 1)
    await limiter.reset("never-used")  # harmless


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    limit = Limit(2, 60)
    for _ in range(3):
        await limiter.hit("alice", limit)
    d = await limiter.hit("bob", limit)
    assert (d.allowed, d.remaining) == (True, 1)
    assert not (await limiter.hit("alice", limit)).allowed


async def test_cost_counts_several_events(limiter: RateLimiter) -> None:
    limit = Limit(10, 100)  # 10 s per event
    d = await limiter.hit("k", limit, cost=4)
    assert (d.allowed, d.remaining) == (True, 6)
    d = await limiter.hit("k", limit, cost=7)  # does not fit, and takes nothing
    assert_consistent(d)
    assert (d.allowed, d.remaining) == (False, 6)
    assert 9 <= d.retry_after <= 10  # one event must drain first
    d = await limiter.hit("k", limit, cost=6)
    assert (d.allowed, d.remaining) == (True, 0)
    with pytest.raises(ValueError):
        await limiter.hit("k", limit, cost=0)


async def test_concurrent_hits_never_over_admit(limiter: RateLimiter) -> None:
    limit = Limit(50, 60)
    decisions = await asyncio.gather(*(limiter.hit("hot", limit) for _ in range(300)))
    assert sum(d.allowed for d in decisions) == 50
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))


async def test_fractional_intervals_do_not_lose_events(limiter: RateLimiter) -> None:
    limit = Limit(3, 1)  # 1/3 s per event: float arithmetic must still allow exactly 3
    assert [(await limiter.hit("k", limit)).allowed for _ in range(4)] == [True] * 3 + [False]


@pytest.mark.parametrize(
    "limit",
    [Limit(1667, 1.0008239979344662), Limit(7, 0.7), Limit(1000, 3), Limit(3, 900, burst=2)],
)
def test_gcra_fills_exactly_the_capacity_at_one_instant(limit: Limit) -> None:
    """No time passes between hits, so nothing hides rounding: the worst case for the floats."""
    now = 1_795_000_000_123_457  # unix microseconds, where a double only resolves 0.25 us
    stamp, ahead = now, 0.0
    for n in range(1, limit.capacity + 1):
        allowed, ahead, remaining, _ = gcra(stamp, ahead, now, limit, 1, True)
        stamp = now
        assert (allowed, remaining) == (True, limit.capacity - n)
    assert not gcra(stamp, ahead, now, limit, 1, True)[0]


# -- Redis only --------------------------------------------------------------------------------


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_two_redis_limiters_share_one_budget(redis_url: str, redis_prefix: str) -> None:
    nodes = [RedisRateLimiter(redis_url, prefix=redis_prefix) for _ in range(2)]
    limit = Limit(40, 60)
    try:
        decisions = await asyncio.gather(*(nodes[i % 2].hit("shared", limit) for i in range(120)))
        assert sum(d.allowed for d in decisions) == 40
        assert not (await nodes[0].hit("shared", limit)).allowed
        await nodes[1].reset("shared")
        assert (await nodes[0].hit("shared", limit)).remaining == 39
    finally:
        for node in nodes:
            await node.close()


async def test_redis_keys_expire_when_the_bucket_is_full_again(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    limiter = RedisRateLimiter(redis_url, prefix=redis_prefix)
    try:
        await limiter.hit("idle", Limit(2, 60))
        keys = [k async for k in redis_client.scan_iter(match=redis_prefix + "*")]
        assert len(keys) == 1
        ttl_ms = await redis_client.pttl(keys[0])
        assert 0 < ttl_ms <= 30_000  # one event of 2 per 60 s: full again after 30 s

        await limiter.hit("brief", Limit(2, 0.2))
        key = keys[0].decode().replace("idle", "brief")

        async def vanished() -> bool:
            return not await redis_client.exists(key)

        await poll(vanished)
        await limiter.peek("brief", Limit(2, 0.2))  # a peek never creates a key
        assert not await redis_client.exists(key)
    finally:
        await limiter.close()


async def test_redis_uses_the_server_clock(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisRateLimiter(redis_url, prefix=redis_prefix)
    real_now = time.time()
    monkeypatch.setattr(time, "time", lambda: real_now - 100_000)  # a badly skewed node
    try:
        d = await limiter.hit("k", Limit(1, 10))
    finally:
        monkeypatch.undo()
        await limiter.close()
    assert real_now + 9 <= d.reset_at <= time.time() + 11


async def test_redis_reloads_the_script_after_noscript(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    limiter = RedisRateLimiter(redis_url, prefix=redis_prefix)
    try:
        limit = Limit(3, 60)
        await limiter.hit("k", limit)
        await redis_client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
        d = await limiter.hit("k", limit)
        assert (d.allowed, d.remaining) == (True, 1)
    finally:
        await limiter.close()


async def test_redis_unreachable_is_backend_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{port}/0", prefix="sbt:none:")
    try:
        with pytest.raises(BackendUnavailable):
            await limiter.hit("k", Limit(1, 1))
        with pytest.raises(BackendUnavailable):
            await limiter.peek("k", Limit(1, 1))
        with pytest.raises(BackendUnavailable):
            await limiter.reset("k")
    finally:
        await limiter.close()


async def test_redis_limiter_survives_a_redis_restart() -> None:
    server = RedisServer()
    await server.start()
    limiter = RedisRateLimiter(server.url, prefix="sbt:restart:")
    limit = Limit(3, 60)
    try:
        assert (await limiter.hit("k", limit)).remaining == 2
        await server.stop()
        with pytest.raises(BackendUnavailable):
            await limiter.hit("k", limit)
        await server.start()  # empty again: no key, and no cached script (NOSCRIPT)
        assert (await limiter.hit("k", limit)).remaining == 2
    finally:
        await limiter.close()
        await server.stop()


# -- Redis Cluster only --------------------------------------------------------------------------


@pytest.fixture
async def cluster_limiters(
    redis_cluster: RedisClusterServer, redis_prefix: str
) -> AsyncIterator[Callable[[], RedisRateLimiter]]:
    made: list[RedisRateLimiter] = []

    def make() -> RedisRateLimiter:
        made.append(RedisRateLimiter(redis_cluster.url, prefix=redis_prefix, cluster=True))
        return made[-1]

    yield make
    for limiter in made:
        await limiter.close()


async def test_cluster_limiters_share_budgets_spread_over_the_masters(
    cluster_limiters: Callable[[], RedisRateLimiter], redis_cluster: RedisClusterServer, redis_prefix: str
) -> None:
    nodes = [cluster_limiters(), cluster_limiters()]
    limit = Limit(10, 60)
    keys = [f"user-{i}" for i in range(12)]
    decisions = await asyncio.gather(
        *(nodes[i % 2].hit(key, limit) for key in keys for i in range(15))
    )
    for n, key in enumerate(keys):
        assert sum(d.allowed for d in decisions[n * 15 : (n + 1) * 15]) == 10, key
    # Every key lives on the master owning its slot, and the keys cover more than one master.
    holders = set()
    for node in redis_cluster.nodes:
        client = aioredis.Redis(host="127.0.0.1", port=node.port)
        try:
            found = [k async for k in client.scan_iter(match=redis_prefix + "*")]
            for key in found:
                assert await client.execute_command("CLUSTER", "KEYSLOT", key) == key_slot(key)
            if found:
                holders.add(node.port)
        finally:
            await client.aclose()
    assert len(holders) >= 2
    await nodes[1].reset("user-0")
    assert (await nodes[0].hit("user-0", limit)).remaining == 9


async def test_cluster_limiter_survives_a_master_restart(
    cluster_limiters: Callable[[], RedisRateLimiter], redis_cluster: RedisClusterServer, redis_prefix: str
) -> None:
    limiter = cluster_limiters()
    limit = Limit(3, 60)
    assert (await limiter.hit("k", limit)).remaining == 2
    seed = aioredis.from_url(redis_cluster.url)
    try:
        slot = key_slot(limiter._key("k").encode())  # the bucket is named by its digest
        for start, end, master, *_ in await seed.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                owner = redis_cluster.node_at(int(master[1]))
    finally:
        await seed.aclose()
    await redis_cluster.kill(owner)
    with pytest.raises(BackendUnavailable):
        await limiter.hit("k", limit)
    await redis_cluster.revive(owner)  # empty again: no key, and no cached script (NOSCRIPT)

    async def counts_again() -> bool:
        with contextlib.suppress(BackendUnavailable):
            return (await limiter.hit("k", limit)).remaining == 2
        return False

    await poll(counts_again, timeout=20)


async def test_cluster_limiter_unreachable_is_backend_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{port}/0", prefix="sbt:none:", cluster=True)
    try:
        with pytest.raises(BackendUnavailable):
            await limiter.hit("k", Limit(1, 1))
        with pytest.raises(BackendUnavailable):
            await limiter.reset("k")
    finally:
        await limiter.close()


# -- memory only -------------------------------------------------------------------------------


async def test_memory_limiter_forgets_full_buckets() -> None:
    limiter = MemoryRateLimiter(sweep_s=0)
    for i in range(100):
        await limiter.hit(f"k{i}", Limit(2, 0.1))
    await limiter.hit("long", Limit(2, 60))
    assert len(limiter) == 101

    async def swept() -> bool:
        await limiter.peek("any", Limit(1, 1))  # every call may sweep (sweep_s=0)
        return len(limiter) == 1

    await poll(swept)
    assert not (await limiter.hit("long", Limit(1, 60))).allowed  # the live bucket was kept

"""``RedisBroker``: fan-out between workers and nodes through Redis pub/sub.

Standalone Redis (the default): two connections per broker.

* a pooled command client for ``publish`` (usable before ``start``: REST-only processes publish
  without ever subscribing);
* one dedicated pub/sub connection, owned by a reader task that dispatches every message to the
  handler. It subscribes only to the channels this node asked for.

When the pub/sub connection drops (Redis restart, ``CLIENT KILL``, network), the reader task opens a
new one with jittered exponential backoff and re-subscribes every channel in ``_subs``, the one
source of truth for what this node wants. redis-py's own retry is switched off on that connection
so there is exactly one reconnect path.

Redis Cluster (``cluster=True``, setting ``REDIS_CLUSTER``): sharded pub/sub. ``SPUBLISH`` and
``SSUBSCRIBE`` are served by the master owning the channel's hash slot, so a message crosses only
that shard instead of being broadcast over the whole cluster bus. Publishing goes through
redis-py's ``RedisCluster`` (slot routing, MOVED, topology refresh). Subscribing does not use
redis-py's ``ClusterPubSub``: it polls its per-node connections round-robin with a timeout
(latency, or a busy loop) and reconnects and re-subscribes by itself, beside our reader. Instead
``_ShardedSubscriber`` keeps one pub/sub connection per master that owns a wanted channel, each with
its own reader task, and sends each ``SSUBSCRIBE`` to the owner the slot map names. A lost
connection hands its channels back: the topology is fetched again (the slot may have moved: a
failover, a resharding) and each channel is subscribed on its owner, with jittered exponential
backoff until that works. Redis also drops a sharded subscription by itself when its slot moves
away (an ``sunsubscribe`` we did not ask for): that channel is re-placed the same way. An error
reply to an ``SSUBSCRIBE`` (MOVED from a stale slot map, CLUSTERDOWN while a restarted master
rejoins) re-places only that connection's unconfirmed channels and keeps the connection; the
``subscribe`` that met it reads the slot map again and retries once.

``subscribe`` returns once Redis confirmed the subscription, so a message published after it
returns is delivered. Messages are matched to the wanted channels on arrival: anything still in
flight for a channel that was unsubscribed meanwhile is dropped.

Key layout (both modes), ``P`` being ``REDIS_PREFIX``: channel ``C`` is the pub/sub channel
``P + C``; ``publish_sequenced``'s counter ``K`` is the string key ``P + "seq:" + K``. On a cluster
the hash slot of a name is Redis's rule: the text between its first ``{`` and the next ``}`` when
that is not empty (a hash tag), else the whole name. ``publish_sequenced`` runs ``INCR`` and
``SPUBLISH`` in one script on one master, so there the counter key and the channel must share a
slot: give both the same hash tag (``bookseq:{42}`` with ``book:{42}``); names in different slots
raise ``ValueError`` before anything is sent. Do not put braces in the prefix on a cluster unless
every key and channel of the deployment should live on one shard.

Every redis-py exception is translated to ``BackendUnavailable`` at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from shared.broker.base import Broker, MessageHandler
from shared.errors import BackendUnavailable
from shared.redis_cluster import run_on_cluster

if TYPE_CHECKING:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

log = logging.getLogger("switchboard.broker")

CONNECT_TIMEOUT_S = 5.0  # TCP connect to Redis
COMMAND_TIMEOUT_S = 5.0  # publish / ping round trip
CONFIRM_TIMEOUT_S = 5.0  # SUBSCRIBE sent -> confirmation read by the reader task
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
NAME_CACHE_MAX = 10_000  # encoded channel names kept so a hot publish allocates nothing
# Publish connections per process (per cluster node). A burst larger than this waits for a free
# connection (up to COMMAND_TIMEOUT_S on a standalone Redis) instead of failing: redis-py's
# default pool raises "Too many connections", RedisCluster raises MaxConnectionsError.
POOL_SIZE = 64

# RedisCluster raises RedisClusterException (not a RedisError) when no node can be reached.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


@contextlib.contextmanager
def map_redis_errors(action: str) -> Iterator[None]:
    """Translate redis-py (and socket) failures into ``BackendUnavailable``."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"redis {action} failed: {exc.__class__.__name__}") from exc


# KEYS[1] counter; ARGV[1] channel, ARGV[2] body, ARGV[3] PUBLISH|SPUBLISH. Returns the seq.
# The seq is appended to the body as one MessagePack integer (the Broker contract in base.py);
# Redis ships cmsgpack in its Lua environment.
SEQUENCED_PUBLISH = """
local seq = redis.call('INCR', KEYS[1])
redis.call(ARGV[3], ARGV[1], ARGV[2] .. cmsgpack.pack(seq))
return seq
"""


class RedisBroker:
    def __init__(self, url: str, *, prefix: str = "sb:", cluster: bool = False) -> None:
        self._prefix = prefix.encode()
        self._cluster = cluster
        common: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_keepalive": True,
        }
        # One retry: after a Redis restart the pooled connection is dead, the second attempt on a
        # fresh one succeeds; when Redis is really down publish fails fast.
        publish_kwargs: dict[str, Any] = {
            "socket_timeout": COMMAND_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 1),
            **common,
        }
        self._sharded: _ShardedSubscriber | None = None
        # RedisCluster has no blocking pool: more commands in flight than connections raise
        # MaxConnectionsError. The gate makes a burst wait instead (each holder is bounded by
        # its own connect and command timeouts).
        self._gate: asyncio.Semaphore | None = None
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            self._client: Any = RedisCluster.from_url(
                url, max_connections=POOL_SIZE, **publish_kwargs
            )
            self._gate = asyncio.Semaphore(POOL_SIZE)
            self._sharded = _ShardedSubscriber(self._client, url, subscriber_name(prefix), common)
            self._publish: Callable[[bytes, bytes], Awaitable[int]] = self._spublish
        else:
            self._client = Redis.from_pool(
                BlockingConnectionPool.from_url(
                    url, max_connections=POOL_SIZE, timeout=COMMAND_TIMEOUT_S, **publish_kwargs
                )
            )
            self._publish = self._client.publish
        # The reader's connection: no socket timeout (it idles between messages), no retry (the
        # reader task is the only reconnect path, see the module docstring). Named, so CLIENT LIST
        # shows which pub/sub connection belongs to which deployment.
        self._sub_client: Redis | None = (
            None
            if cluster
            else Redis.from_url(
                url, retry=Retry(NoBackoff(), 0), client_name=subscriber_name(prefix), **common
            )
        )
        self._sequenced = self._client.register_script(SEQUENCED_PUBLISH)
        self._publish_command = b"SPUBLISH" if cluster else b"PUBLISH"
        self._names: dict[str, bytes] = {}  # channel -> prefixed, encoded name (bounded cache)
        self._subs: dict[bytes, str] = {}  # prefixed name -> channel, for every wanted channel
        self._live: set[bytes] = set()  # the wanted names Redis confirmed on this connection
        self._confirms: dict[bytes, list[asyncio.Future[None]]] = {}  # awaiting SUBSCRIBE acks
        self._handler: MessageHandler | None = None
        self._pubsub: PubSub | None = None  # set while connected and reading
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    # -- publishing --------------------------------------------------------------------------

    def _name(self, channel: str) -> bytes:
        name = self._names.get(channel)
        if name is None:
            if len(self._names) >= NAME_CACHE_MAX:
                self._names.clear()
            name = self._names[channel] = self._prefix + channel.encode()
        return name

    async def publish(self, channel: str, data: bytes) -> None:
        if self._closed:
            raise BackendUnavailable("broker is closed")
        try:
            await self._publish(self._name(channel), data)
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"redis publish failed: {exc.__class__.__name__}") from exc

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if self._closed:
            raise BackendUnavailable("broker is closed")
        if not messages:
            return
        try:
            if self._gate is None:  # one pipeline: one round trip for the whole batch
                pipe = self._client.pipeline(transaction=False)
                for channel, data in messages:
                    pipe.execute_command(self._publish_command, self._name(channel), data)
                await pipe.execute()
            else:  # a cluster: each message on its own slot's master, bounded by the gate
                await asyncio.gather(
                    *(self._spublish(self._name(channel), data) for channel, data in messages)
                )
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"redis publish failed: {exc.__class__.__name__}") from exc

    async def _spublish(self, name: bytes, data: bytes) -> int:
        return int(await self._on_cluster(self._client.spublish, name, data))

    async def _on_cluster(
        self, command: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        assert self._gate is not None
        return await run_on_cluster(self._client, self._gate, command, *args, **kwargs)

    async def publish_sequenced(self, counter_key: str, channel: str, data: bytes) -> int:
        # INCR and PUBLISH in one script: Redis runs it atomically, so the channel carries the
        # messages in seq order whichever node published them. On a cluster the script runs on
        # the master of the counter's slot, which must also own the channel's (module docstring).
        if self._closed:
            raise BackendUnavailable("broker is closed")
        counter, name = self._counter(counter_key), self._name(channel)
        if self._gate is None:
            try:
                seq = await self._sequenced(
                    keys=[counter], args=[name, data, self._publish_command]
                )
            except REDIS_ERRORS as exc:
                raise BackendUnavailable(f"redis publish failed: {exc.__class__.__name__}") from exc
            return int(seq)
        if key_slot(counter) != key_slot(name):
            raise ValueError(
                f"on a Redis Cluster the counter key {counter_key!r} and the channel {channel!r} must "
                "share a hash slot: give both the same hash tag, e.g. 'bookseq:{42}' and 'book:{42}'"
            )
        try:
            seq = await self._on_cluster(
                self._sequenced, keys=[counter], args=[name, data, self._publish_command]
            )
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"redis publish failed: {exc.__class__.__name__}") from exc
        return int(seq)

    async def sequence_head(self, counter_key: str) -> int:
        with map_redis_errors("get"):
            if self._gate is None:
                value = await self._client.get(self._counter(counter_key))
            else:
                value = await self._on_cluster(self._client.get, self._counter(counter_key))
        return int(value or 0)

    def _counter(self, counter_key: str) -> bytes:
        return self._prefix + b"seq:" + counter_key.encode()

    async def ping(self) -> None:
        """On a cluster every master must answer: a missing one means lost channels."""
        with map_redis_errors("ping"):
            if self._cluster:
                await self._on_cluster(self._client.ping, target_nodes=self._client.PRIMARIES)
            else:
                await self._client.ping()

    # -- subscribing -------------------------------------------------------------------------

    async def start(self, handler: MessageHandler) -> None:
        """Open the pub/sub connection (raises ``BackendUnavailable``), then keep it open."""
        if self._sharded is not None:
            await self._sharded.start(handler)
            return
        if self._reader is not None:
            raise RuntimeError("broker already started")
        self._handler = handler
        pubsub = await self._connect()
        self._reader = asyncio.create_task(self._run(pubsub), name="redis-broker-reader")

    async def subscribe(self, channel: str) -> None:
        """Subscribe and wait for Redis to confirm (a no-op when it already did).

        While the connection is down this raises ``BackendUnavailable``, but the channel stays
        wanted: it is subscribed again on reconnect, until ``unsubscribe``.
        """
        name = self._name(channel)
        if self._sharded is not None:
            await self._sharded.subscribe(name, channel)
            return
        if name in self._live:
            return
        self._subs[name] = channel
        pubsub = self._pubsub
        if pubsub is None:
            if self._reader is None:
                return  # not started yet: start() subscribes everything wanted
            raise BackendUnavailable("redis broker is reconnecting")
        confirmed = asyncio.get_running_loop().create_future()
        self._confirms.setdefault(name, []).append(confirmed)
        try:
            await self._send(pubsub, True, [name])
            await asyncio.wait_for(confirmed, CONFIRM_TIMEOUT_S)
        except TimeoutError as exc:
            raise BackendUnavailable("redis did not confirm the subscription") from exc
        finally:
            _forget_confirm(self._confirms, name, confirmed)

    async def unsubscribe(self, channel: str) -> None:
        name = self._name(channel)
        if self._sharded is not None:
            await self._sharded.unsubscribe(name)
            return
        self._live.discard(name)
        if self._subs.pop(name, None) is None:
            return
        pubsub = self._pubsub
        if pubsub is not None:
            # Best effort: if the connection is broken, the reconnect will not re-subscribe it.
            with contextlib.suppress(BackendUnavailable):
                await self._send(pubsub, False, [name])

    async def close(self) -> None:
        self._closed = True
        if self._sharded is not None:
            await self._sharded.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._handler = None
        self._subs.clear()
        if self._sub_client is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._sub_client.aclose()
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()

    # -- the reader task (standalone Redis) --------------------------------------------------

    async def _send(self, pubsub: PubSub, subscribe: bool, names: list[bytes]) -> None:
        """Write (UN)SUBSCRIBE; the reader task reads the confirmation.

        Written on the raw connection, not through ``PubSub.subscribe``: that path reconnects by
        itself on a failed write and would read the handshake while the reader task is reading
        (and redis-py would replay its own channel list). A broken connection is the reader's to
        replace, so a write only ever goes to a connection that is up.
        """
        conn = pubsub.connection
        if conn is None or not conn.is_connected:
            raise BackendUnavailable("redis broker is reconnecting")
        with map_redis_errors("subscribe"):
            await conn.send_command(
                "SUBSCRIBE" if subscribe else "UNSUBSCRIBE", *names, check_health=False
            )

    async def _connect(self) -> PubSub:
        """A connected pub/sub with every wanted channel subscribed; ``BackendUnavailable``."""
        assert self._sub_client is not None
        pubsub: PubSub = self._sub_client.pubsub()
        try:
            with map_redis_errors("connect"):
                await pubsub.connect()  # type: ignore[no-untyped-call]
                # Publish the connection before snapshotting _subs (no await in between): a
                # concurrent subscribe() either is in the snapshot or sends its own SUBSCRIBE.
                self._pubsub = pubsub
            if self._subs:
                await self._send(pubsub, True, list(self._subs))
        except BaseException:
            self._pubsub = None
            await _discard(pubsub)
            raise
        return pubsub

    async def _run(self, pubsub: PubSub) -> None:
        delay = BACKOFF_MIN_S
        while True:
            try:
                await self._read(pubsub)
            except Exception as exc:  # noqa: BLE001 - whatever broke the connection, replace it
                log.warning("redis broker connection lost: %s", exc.__class__.__name__)
            finally:
                self._pubsub = None
                self._connection_lost()
                await _discard(pubsub)
            while True:
                # Jitter, so the nodes of a cluster do not all reconnect in the same instant.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)
                try:
                    pubsub = await self._connect()
                except Exception:  # noqa: BLE001 - still down (BackendUnavailable) or worse: retry
                    continue
                log.info("redis broker reconnected (%d channels)", len(self._subs))
                delay = BACKOFF_MIN_S
                break

    async def _read(self, pubsub: PubSub) -> None:
        subs = self._subs
        while True:
            msg = await pubsub.get_message(timeout=None)
            if msg is None:
                continue
            kind = msg["type"]
            if kind == "message":
                deliver(subs, self._handler, msg["channel"], msg["data"])
            elif kind == "subscribe":
                name = msg["channel"]
                if name in subs:
                    self._live.add(name)
                _confirm(self._confirms, name)

    def _connection_lost(self) -> None:
        self._live.clear()
        _fail_confirms(self._confirms)


# -- Redis Cluster: sharded pub/sub ------------------------------------------------------------


class _Refused(BackendUnavailable):
    """A master answered an SSUBSCRIBE with an error (MOVED, CLUSTERDOWN)."""


class _Shard:
    """One pub/sub connection to one cluster master, carrying the channels of its slots."""

    __slots__ = ("confirms", "names", "node", "pubsub", "reader", "unsubscribing")

    def __init__(self, node: str, pubsub: PubSub) -> None:
        self.node = node  # "host:port", redis-py's node name
        self.pubsub = pubsub
        self.names: set[bytes] = set()  # wanted names SSUBSCRIBEd here (confirmed or in flight)
        self.confirms: dict[bytes, list[asyncio.Future[None]]] = {}
        # Our own SUNSUBSCRIBEs not answered yet: any other sunsubscribe is Redis dropping the
        # channel because its slot moved away.
        self.unsubscribing: dict[bytes, int] = {}
        self.reader: asyncio.Task[None] | None = None

    async def send(self, command: str, names: Iterable[bytes]) -> None:
        """Write ``command`` for ``names``, one command per hash slot (Redis refuses an SSUBSCRIBE
        whose channels span slots), all in one write; the reader reads the confirmations.

        On the raw connection, for the reason ``RedisBroker._send`` gives: a broken connection is
        the reader's to replace.
        """
        conn = self.pubsub.connection
        if conn is None or not conn.is_connected:
            raise BackendUnavailable(f"redis cluster node {self.node} is reconnecting")
        by_slot: dict[int, list[bytes]] = {}
        for name in names:
            by_slot.setdefault(key_slot(name), []).append(name)
        if not by_slot:
            return
        with map_redis_errors(command.lower()):
            await conn.send_packed_command(
                conn.pack_commands([(command, *group) for group in by_slot.values()]),
                check_health=False,
            )


class _ShardedSubscriber:
    """The subscribing half of ``RedisBroker`` on a Redis Cluster (see the module docstring).

    ``subs`` is the one source of truth for what this node wants; ``route`` says which shard
    connection each wanted name was sent to; ``pending`` holds the wanted names that are on no
    connection (their shard was lost, their slot moved, their owner was unreachable) until the
    repair task places them again.
    """

    def __init__(
        self, cluster: RedisCluster, url: str, client_name: str, common: dict[str, Any]
    ) -> None:
        self._cluster = cluster
        node_kwargs: dict[str, Any] = dict(parse_url(url))
        for key in ("host", "port", "db"):
            node_kwargs.pop(key, None)
        # Same rules as the standalone reader's connection: no socket timeout, no retry.
        self._node_kwargs = {
            **node_kwargs,
            **common,
            "retry": Retry(NoBackoff(), 0),
            "client_name": client_name,
        }
        self._handler: MessageHandler | None = None
        self._subs: dict[bytes, str] = {}
        self._live: set[bytes] = set()  # wanted names confirmed on the shard they are routed to
        self._route: dict[bytes, _Shard] = {}
        self._shards: dict[str, _Shard] = {}  # node name -> its open connection
        self._opening: dict[str, asyncio.Future[_Shard]] = {}
        self._pending: set[bytes] = set()
        self._repair: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    async def start(self, handler: MessageHandler) -> None:
        if self._started:
            raise RuntimeError("broker already started")
        with map_redis_errors("connect"):
            _ = await self._cluster.initialize()  # the slot map; raises when no node answers
        self._handler = handler
        self._started = True
        if self._subs:  # subscribed before start
            self._pending.update(self._subs)
            await self._place()
            if self._pending:
                self._kick()

    async def subscribe(self, name: bytes, channel: str) -> None:
        if name in self._live:
            return
        self._subs[name] = channel
        if not self._started:
            return  # start() places everything wanted
        try:
            await self._subscribe_once(name)
        except _Refused:
            # The master said no (MOVED: our slot map is stale; CLUSTERDOWN): read the map again
            # and try once more, so a resharding does not fail the sockets joining meanwhile.
            with map_redis_errors("cluster topology"):
                await self._cluster.nodes_manager.initialize()
            if name in self._subs and name not in self._live:
                await self._subscribe_once(name)

    async def _subscribe_once(self, name: bytes) -> None:
        shard = self._route.get(name)
        if shard is None:
            try:
                with map_redis_errors("ssubscribe"):
                    node = self._owner(name)
                shard = await self._shard(node)
            except BackendUnavailable:
                self._pending.add(name)
                self._kick()
                raise
            if name not in self._subs:
                return  # unsubscribed while the connection opened
            routed = self._route.get(name)
            if routed is not None:
                shard = routed  # a concurrent subscribe (or the repair task) placed it meanwhile
            else:
                self._pending.discard(name)
                self._assign(name, shard)
        confirmed = asyncio.get_running_loop().create_future()
        shard.confirms.setdefault(name, []).append(confirmed)
        try:
            await shard.send("SSUBSCRIBE", [name])
            await asyncio.wait_for(confirmed, CONFIRM_TIMEOUT_S)
        except TimeoutError as exc:
            raise BackendUnavailable("redis did not confirm the subscription") from exc
        finally:
            _forget_confirm(shard.confirms, name, confirmed)

    async def unsubscribe(self, name: bytes) -> None:
        self._live.discard(name)
        if self._subs.pop(name, None) is None:
            return
        self._pending.discard(name)
        shard = self._route.pop(name, None)
        if shard is None:
            return
        shard.names.discard(name)
        shard.unsubscribing[name] = shard.unsubscribing.get(name, 0) + 1
        # Best effort: a broken connection is discarded with everything on it anyway.
        with contextlib.suppress(BackendUnavailable):
            await shard.send("SUNSUBSCRIBE", [name])

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._repair, *self._opening.values()) if t is not None]
        tasks += [shard.reader for shard in self._shards.values() if shard.reader is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, *REDIS_ERRORS, BackendUnavailable):
                await task
        for shard in list(self._shards.values()):  # a reader that never ran its finally
            await _discard_shard(shard.pubsub)
        self._shards.clear()
        self._subs.clear()
        self._handler = None

    # -- shard connections ---------------------------------------------------------------------

    def _owner(self, name: bytes) -> ClusterNode:
        """The master of ``name``'s slot in the slot map (``SlotNotCoveredError`` if none)."""
        return self._cluster.nodes_manager.get_node_from_slot(key_slot(name))

    def _assign(self, name: bytes, shard: _Shard) -> None:
        self._route[name] = shard
        shard.names.add(name)

    async def _shard(self, node: ClusterNode) -> _Shard:
        """The open connection to ``node``, opened if needed (concurrent callers share one)."""
        shard = self._shards.get(node.name)
        if shard is not None:
            return shard
        opening = self._opening.get(node.name)
        if opening is None:
            opening = self._opening[node.name] = asyncio.ensure_future(self._open(node))
            opening.add_done_callback(self._opened)
        return await asyncio.shield(opening)

    def _opened(self, opening: asyncio.Future[_Shard]) -> None:
        for name, pending in list(self._opening.items()):
            if pending is opening:
                del self._opening[name]
        if not opening.cancelled():
            opening.exception()  # retrieved here: every waiter may have been cancelled

    async def _open(self, node: ClusterNode) -> _Shard:
        pool = ConnectionPool(host=node.host, port=node.port, **self._node_kwargs)
        pubsub = PubSub(connection_pool=pool)
        try:
            with map_redis_errors("connect"):
                await pubsub.connect()  # type: ignore[no-untyped-call]
            if self._closed:
                raise BackendUnavailable("broker is closed")
        except BaseException:
            await _discard_shard(pubsub)
            raise
        shard = self._shards[node.name] = _Shard(node.name, pubsub)
        shard.reader = asyncio.create_task(self._read(shard), name=f"redis-broker-{node.name}")
        return shard

    async def _read(self, shard: _Shard) -> None:
        pubsub, subs, route = shard.pubsub, self._subs, self._route
        try:
            while True:
                try:
                    msg = await pubsub.get_message(timeout=None)
                except ResponseError as exc:
                    self._refused(shard, exc)  # an error reply: the connection itself is fine
                    continue
                if msg is None:
                    continue
                kind = msg["type"]
                if kind == "smessage":
                    deliver(subs, self._handler, msg["channel"], msg["data"])
                elif kind == "ssubscribe":
                    name = msg["channel"]
                    if name in subs and route.get(name) is shard:
                        self._live.add(name)
                    _confirm(shard.confirms, name)
                elif kind == "sunsubscribe":
                    self._unsubscribed(shard, msg["channel"])
        except Exception as exc:  # noqa: BLE001 - whatever broke the connection, replace it
            log.warning("redis cluster node %s: pub/sub connection lost: %s", shard.node, exc)
        finally:
            self._shard_lost(shard)
            await _discard_shard(pubsub)

    def _unsubscribed(self, shard: _Shard, name: bytes) -> None:
        own = shard.unsubscribing.get(name)
        if own:
            if own == 1:
                del shard.unsubscribing[name]
            else:
                shard.unsubscribing[name] = own - 1
            return
        # Not asked for: the slot moved to another master (resharding, failover).
        if self._route.get(name) is shard:
            del self._route[name]
            shard.names.discard(name)
            self._live.discard(name)
            if name in self._subs:
                log.info("redis cluster node %s dropped a channel (slot moved)", shard.node)
                self._pending.add(name)
                self._kick()

    def _refused(self, shard: _Shard, exc: ResponseError) -> None:
        """An error reply to one of the SSUBSCRIBEs in flight on ``shard`` (MOVED: the slot map was
        stale; CLUSTERDOWN: a restarted master still rejoining). Which one is not said, so every
        unconfirmed channel of the shard is placed again (with a fresh slot map); the confirmed
        ones keep their subscription, and this connection."""
        log.warning("redis cluster node %s refused a subscription: %r", shard.node, exc)
        for name in [n for n in shard.names if n not in self._live]:
            shard.names.discard(name)
            if self._route.get(name) is shard:
                del self._route[name]
                if name in self._subs:
                    self._pending.add(name)
        _fail_confirms(shard.confirms, _Refused(f"redis cluster node {shard.node}: {exc}"))
        if self._pending:
            self._kick()

    def _shard_lost(self, shard: _Shard) -> None:
        """Hand the shard's channels back (no await: nothing can interleave)."""
        if self._shards.get(shard.node) is shard:
            del self._shards[shard.node]
        for name in shard.names:
            self._live.discard(name)
            if self._route.get(name) is shard:
                del self._route[name]
                if name in self._subs:
                    self._pending.add(name)
        shard.names.clear()
        _fail_confirms(shard.confirms)
        if self._pending:
            self._kick()

    # -- putting wanted channels back on their owners --------------------------------------------

    def _kick(self) -> None:
        if self._repair is None and self._started and not self._closed:
            self._repair = asyncio.create_task(self._repairing(), name="redis-broker-repair")

    async def _repairing(self) -> None:
        delay = BACKOFF_MIN_S
        try:
            while self._pending and not self._closed:
                # Jitter, so the nodes of a deployment do not all come back in the same instant.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)
                try:
                    with map_redis_errors("cluster topology"):
                        await self._cluster.nodes_manager.initialize()
                except BackendUnavailable:
                    continue
                wanted = len(self._pending)
                await self._place()
                log.info(
                    "redis broker resubscribed %d of %d channels",
                    wanted - len(self._pending),
                    wanted,
                )
        finally:
            self._repair = None

    async def _place(self) -> None:
        """Send every pending name to the master owning its slot (confirmations arrive on the
        shard's reader). Names whose owner cannot be reached stay pending."""
        by_node: dict[str, tuple[ClusterNode, list[bytes]]] = {}
        for name in list(self._pending):
            if name not in self._subs:
                self._pending.discard(name)
                continue
            try:
                node = self._owner(name)
            except REDIS_ERRORS:
                continue  # the slot map has no owner for it right now
            by_node.setdefault(node.name, (node, []))[1].append(name)
        for node, names in by_node.values():
            try:
                shard = await self._shard(node)
            except BackendUnavailable:
                continue
            placed = [n for n in names if n in self._pending and n in self._subs]
            for name in placed:
                self._pending.discard(name)
                self._assign(name, shard)
            # A failed write is also seen by the shard's reader, which hands the names back.
            with contextlib.suppress(BackendUnavailable):
                await shard.send("SSUBSCRIBE", placed)


# -- helpers -----------------------------------------------------------------------------------


def _confirm(confirms: dict[bytes, list[asyncio.Future[None]]], name: bytes) -> None:
    waiting = confirms.get(name)
    if waiting:
        confirmed = waiting.pop(0)
        if not waiting:
            del confirms[name]
        if not confirmed.done():
            confirmed.set_result(None)


def _forget_confirm(
    confirms: dict[bytes, list[asyncio.Future[None]]], name: bytes, confirmed: asyncio.Future[None]
) -> None:
    waiting = confirms.get(name)
    if waiting and confirmed in waiting:
        waiting.remove(confirmed)
        if not waiting:
            del confirms[name]
    elif confirmed.done() and not confirmed.cancelled():
        confirmed.exception()  # failed by a connection loss while the send failed too


def _fail_confirms(
    confirms: dict[bytes, list[asyncio.Future[None]]], error: BackendUnavailable | None = None
) -> None:
    for waiting in confirms.values():
        for confirmed in waiting:
            if not confirmed.done():
                confirmed.set_exception(error or BackendUnavailable("redis connection lost"))
    confirms.clear()


def deliver(
    subs: dict[bytes, str], handler: MessageHandler | None, name: bytes, data: bytes
) -> None:
    """One message to the handler (the hub), if its channel is still wanted."""
    channel = subs.get(name)
    if channel is None or handler is None:
        return  # unsubscribed while the message was in flight
    try:
        handler(channel, data)
    except Exception:
        log.exception("broker handler failed")


def subscriber_name(prefix: str) -> str:
    """CLIENT SETNAME of the pub/sub connection: the prefix, spaces and controls replaced."""
    return "switchboard-broker:" + "".join(
        c if c.isprintable() and c != " " else "_" for c in prefix
    )


async def _discard(pubsub: PubSub) -> None:
    with contextlib.suppress(*REDIS_ERRORS):
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _discard_shard(pubsub: PubSub) -> None:
    """A shard's pub/sub owns its pool (one connection): close both."""
    await _discard(pubsub)
    with contextlib.suppress(*REDIS_ERRORS):
        await pubsub.connection_pool.aclose()


_: type[Broker] = RedisBroker

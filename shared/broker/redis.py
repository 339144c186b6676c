"""``RedisBroker``: fan-out between workers and nodes through Redis pub/sub.

Two connections per broker:

* a pooled command client for ``publish`` (usable before ``start``: REST-only processes publish
  without ever subscribing);
* one dedicated pub/sub connection, owned by a reader task that dispatches every message to the
  handler. It subscribes only to the channels this node asked for.

When the pub/sub connection drops (Redis restart, ``CLIENT KILL``, network), the reader task opens a
new one with jittered exponential backoff and re-subscribes every channel in ``_subs``, the one
source of truth for what this node wants. redis-py's own retry is switched off on that connection
so there is exactly one reconnect path.

``subscribe`` returns once Redis confirmed the subscription, so a message published after it
returns is delivered. Messages are matched to ``_subs`` on arrival: anything still in flight for a
channel that was unsubscribed meanwhile is dropped.

Every redis-py exception is translated to ``BackendUnavailable`` at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from shared.broker.base import Broker, MessageHandler
from shared.errors import BackendUnavailable

log = logging.getLogger("switchboard.broker")

CONNECT_TIMEOUT_S = 5.0  # TCP connect to Redis
COMMAND_TIMEOUT_S = 5.0  # publish / ping round trip
CONFIRM_TIMEOUT_S = 5.0  # SUBSCRIBE sent -> confirmation read by the reader task
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
CLUSTER_POLL_S = 0.1  # the cluster reader polls the per-node connections round-robin
NAME_CACHE_MAX = 10_000
# Publish connections per process. A burst larger than this waits for a free connection (up to
# COMMAND_TIMEOUT_S) instead of failing: redis-py's default pool raises "Too many connections".
POOL_SIZE = 64  # encoded channel names kept so a hot publish allocates nothing


@contextlib.contextmanager
def map_redis_errors(action: str) -> Iterator[None]:
    """Translate redis-py (and socket) failures into ``BackendUnavailable``."""
    try:
        yield
    except (RedisError, OSError) as exc:
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
        if cluster:  # RedisCluster keeps a pool per node
            self._client: Any = _client_class(cluster).from_url(url, **publish_kwargs)
        else:
            self._client = Redis.from_pool(
                BlockingConnectionPool.from_url(
                    url, max_connections=POOL_SIZE, timeout=COMMAND_TIMEOUT_S, **publish_kwargs
                )
            )
        # The reader's connection: no socket timeout (it idles between messages), no retry (the
        # reader task is the only reconnect path, see the module docstring). Named, so CLIENT LIST
        # shows which pub/sub connection belongs to which deployment.
        self._sub_client: Any = _client_class(cluster).from_url(
            url, retry=Retry(NoBackoff(), 0), client_name=subscriber_name(prefix), **common
        )
        self._publish: Callable[[bytes, bytes], Awaitable[int]] = (
            self._client.spublish if cluster else self._client.publish
        )
        self._sequenced = self._client.register_script(SEQUENCED_PUBLISH)
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
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis publish failed: {exc.__class__.__name__}") from exc

    async def publish_sequenced(self, counter_key: str, channel: str, data: bytes) -> int:
        # INCR and PUBLISH in one script: Redis runs it atomically, so the channel carries the
        # messages in seq order whichever node published them. On a Redis Cluster the counter key
        # and the channel would have to share a hash slot; that path is untested (no cluster here).
        if self._closed:
            raise BackendUnavailable("broker is closed")
        try:
            seq = await self._sequenced(
                keys=[self._counter(counter_key)],
                args=[self._name(channel), data, b"SPUBLISH" if self._cluster else b"PUBLISH"],
            )
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis publish failed: {exc.__class__.__name__}") from exc
        return int(seq)

    async def sequence_head(self, counter_key: str) -> int:
        with map_redis_errors("get"):
            value = await self._client.get(self._counter(counter_key))
        return int(value or 0)

    def _counter(self, counter_key: str) -> bytes:
        return self._prefix + b"seq:" + counter_key.encode()

    async def ping(self) -> None:
        with map_redis_errors("ping"):
            await self._client.ping()

    # -- subscribing -------------------------------------------------------------------------

    async def start(self, handler: MessageHandler) -> None:
        """Open the pub/sub connection (raises ``BackendUnavailable``), then keep it open."""
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
            waiting = self._confirms.get(name)
            if waiting and confirmed in waiting:
                waiting.remove(confirmed)
            elif confirmed.done() and not confirmed.cancelled():
                confirmed.exception()  # failed by a connection loss while the send failed too

    async def unsubscribe(self, channel: str) -> None:
        name = self._name(channel)
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
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._handler = None
        self._subs.clear()
        with contextlib.suppress(RedisError, OSError):
            await self._sub_client.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    # -- the reader task ---------------------------------------------------------------------

    async def _send(self, pubsub: PubSub, subscribe: bool, names: list[bytes]) -> None:
        """Write (UN)SUBSCRIBE; the reader task reads the confirmation.

        Written on the raw connection, not through ``PubSub.subscribe``: that path reconnects by
        itself on a failed write and would read the handshake while the reader task is reading
        (and redis-py would replay its own channel list). A broken connection is the reader's to
        replace, so a write only ever goes to a connection that is up.
        """
        if self._cluster:
            # Sharded pub/sub on a Redis Cluster: ClusterPubSub keeps one connection per node
            # owning the channels' slots, so go through its methods. Untested here (no cluster to
            # test against): keep this path small.
            with map_redis_errors("ssubscribe"):
                if subscribe:
                    await pubsub.ssubscribe(*names)
                else:
                    await pubsub.sunsubscribe(*names)
            return
        conn = pubsub.connection
        if conn is None or not conn.is_connected:
            raise BackendUnavailable("redis broker is reconnecting")
        with map_redis_errors("subscribe"):
            await conn.send_command(
                "SUBSCRIBE" if subscribe else "UNSUBSCRIBE", *names, check_health=False
            )

    async def _connect(self) -> PubSub:
        """A connected pub/sub with every wanted channel subscribed; ``BackendUnavailable``."""
        pubsub: PubSub = self._sub_client.pubsub()
        try:
            with map_redis_errors("connect"):
                if self._cluster:
                    await self._sub_client.ping()
                else:
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
        if self._cluster:
            kind_message, kind_confirm = "smessage", "ssubscribe"
        else:
            kind_message, kind_confirm = "message", "subscribe"
        while True:
            if self._cluster:
                msg = await pubsub.get_sharded_message(timeout=CLUSTER_POLL_S)  # type: ignore[attr-defined]
                if msg is None:
                    if not subs:
                        await asyncio.sleep(CLUSTER_POLL_S)  # no node connection to wait on
                    continue
            else:
                msg = await pubsub.get_message(timeout=None)
                if msg is None:
                    continue
            kind = msg["type"]
            if kind == kind_message:
                channel = subs.get(msg["channel"])
                handler = self._handler
                if channel is None or handler is None:
                    continue  # unsubscribed while the message was in flight
                try:
                    handler(channel, msg["data"])
                except Exception:
                    log.exception("broker handler failed")
            elif kind == kind_confirm:
                name = msg["channel"]
                if name in subs:
                    self._live.add(name)
                waiting = self._confirms.get(name)
                if waiting:
                    confirmed = waiting.pop(0)
                    if not confirmed.done():
                        confirmed.set_result(None)

    def _connection_lost(self) -> None:
        self._live.clear()
        for waiting in self._confirms.values():
            for confirmed in waiting:
                if not confirmed.done():
                    confirmed.set_exception(BackendUnavailable("redis connection lost"))
        self._confirms.clear()


def subscriber_name(prefix: str) -> str:
    """CLIENT SETNAME of the pub/sub connection: the prefix, spaces and controls replaced."""
    return "switchboard-broker:" + "".join(
        c if c.isprintable() and c != " " else "_" for c in prefix
    )


def _client_class(cluster: bool) -> Any:
    if not cluster:
        return Redis
    from redis.asyncio.cluster import RedisCluster

    if not hasattr(RedisCluster, "spublish") or not hasattr(RedisCluster, "pubsub"):
        raise RuntimeError("REDIS_CLUSTER needs a redis-py with async sharded pub/sub (>= 5.1)")
    return RedisCluster


async def _discard(pubsub: PubSub) -> None:
    with contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()  # type: ignore[no-untyped-call]


_: type[Broker] = RedisBroker

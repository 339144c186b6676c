"""``RedisPresence``: presence shared by every worker and node through Redis.

Per user, two keys in one hash slot (hash tag ``{user_id}``, so the scripts also run on a Redis
Cluster)::

    <prefix>pr:{<user>}:x   ZSET  entry -> expiry (unix ms)
                                  s|<node>|<device>   a socket of <device> on <node>
                                  h|<device>          the last heartbeat + PRESENCE_TIMEOUT
                                  g|<device>          the last close + PRESENCE_GRACE
    <prefix>pr:{<user>}:d   HASH  device -> number of entries it has in x

A device is online while it has an entry, so a transition is an entry count going 0 -> 1 (online)
or 1 -> 0 (offline). Every change runs as one Lua script that also drops the user's expired
entries, so the count and the report happen atomically: whichever node adds the first or removes
the last entry reports the transition, and only that one (exactly once, on any number of nodes).
A reconnect adds its socket entry before the grace entry goes: the count never touches 0, so no
offline and no second online.

A node only tells Redis about a device's first socket on it and its last one (it counts its own
sockets). Its socket entries expire after ``PRESENCE_TTL_S`` unless ``refresh`` (every third of
it) pushes them on, so a node killed with ``kill -9`` leaves nothing online for long.

**Who notices an expiry.** A global due set (``<prefix>pr:{due}``) says when to look at a user:
member ``<node>|<user>`` at that node's socket entries' expiry (pushed on by each refresh), member
``|<user>`` at the earliest grace or heartbeat deadline. Every node's ``sweep`` pops what is due,
atomically (one node gets each member), and runs the user's sweep script, which reports what
expired and returns the next deadlines. A popped member waits in ``...:inflight`` until its
sweep is settled; one whose sweeper died is due again after a TTL. Writers lower a member's score
(``ZADD LT``) after their script, so a deadline written while a sweep is running is kept.

Time: scripts take "now" from the node, whose clock is corrected by its offset to Redis ``TIME``
(measured at every refresh), so nodes with skewed clocks agree on expiries.

Order: changes of one user go through one lane (a queue worked by one task), so this node's open
and close of a device reach Redis in that order; different users' lanes run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from shared.config import Settings
from shared.errors import BackendUnavailable
from shared.presence.base import Presence, Timing, Transition, TransitionHandler, is_session

log = logging.getLogger("switchboard.presence")

CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 5.0
POOL_SIZE = 32
LANES = 8  # concurrent writers per node (ordered per user)
SWEEP_BATCH = 200  # due members popped per round trip
SWEEP_CONCURRENCY = 16  # user sweep scripts in flight at once
REFRESH_CHUNK = 500  # users per refresh pipeline

_PRELUDE = """
local x, d = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local out = {}
local function dev_of(m)
  if string.sub(m, 1, 2) == 's|' then return string.match(m, '^s|[^|]*|(.*)$') end
  return string.sub(m, 3)
end
local function add(m, dev, score)
  if redis.call('ZSCORE', x, m) then
    redis.call('ZADD', x, 'GT', score, m)
  else
    redis.call('ZADD', x, score, m)
    if redis.call('HINCRBY', d, dev, 1) == 1 then out[#out + 1] = '+' .. dev end
  end
end
local function drop(m, dev)
  if redis.call('ZREM', x, m) == 1 then
    if redis.call('HINCRBY', d, dev, -1) <= 0 then
      redis.call('HDEL', d, dev)
      out[#out + 1] = '-' .. dev
    end
  end
end
local function finish()
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', x, '-inf', now)) do drop(m, dev_of(m)) end
  if redis.call('EXISTS', x) == 1 then
    redis.call('PEXPIRE', x, keep)
    redis.call('PEXPIRE', d, keep)
  end
  return out
end
"""

# ARGV[3] node, ARGV[4] expiry, ARGV[5..] devices. Socket entry first, then the grace goes.
OPEN_LUA = (
    _PRELUDE
    + """
local node, exp = ARGV[3], tonumber(ARGV[4])
for i = 5, #ARGV do
  local dev = ARGV[i]
  add('s|' .. node .. '|' .. dev, dev, exp)
  drop('g|' .. dev, dev)
end
return finish()
"""
)

# ARGV[3] node, ARGV[4] grace end, ARGV[5..] devices. Grace first (sessions have none), then the
# socket entry goes: the device stays online through the grace.
CLOSE_LUA = (
    _PRELUDE
    + """
local node, grace = ARGV[3], tonumber(ARGV[4])
for i = 5, #ARGV do
  local dev = ARGV[i]
  if string.sub(dev, 1, 1) ~= '~' then add('g|' .. dev, dev, grace) end
  drop('s|' .. node .. '|' .. dev, dev)
end
return finish()
"""
)

# ARGV[3] heartbeat deadline, ARGV[4] device.
HEARTBEAT_LUA = (
    _PRELUDE
    + """
add('h|' .. ARGV[4], ARGV[4], tonumber(ARGV[3]))
return finish()
"""
)

# Expire, then the next deadlines: {transitions, {node, soonest, ...}} (node '' = graces and
# heartbeats).
SWEEP_LUA = (
    _PRELUDE
    + """
finish()
local soonest, order = {}, {}
local rest = redis.call('ZRANGE', x, 0, -1, 'WITHSCORES')
for i = 1, #rest, 2 do
  local m, s = rest[i], tonumber(rest[i + 1])
  local node = ''
  if string.sub(m, 1, 2) == 's|' then node = string.match(m, '^s|([^|]*)|') end
  if soonest[node] == nil then order[#order + 1] = node end
  if soonest[node] == nil or s < soonest[node] then soonest[node] = s end
end
local deadlines = {}
for _, node in ipairs(order) do
  deadlines[#deadlines + 1] = node
  deadlines[#deadlines + 1] = soonest[node]
end
return {out, deadlines}
"""
)

# KEYS due, inflight; ARGV now, limit, lease. Claims older than the lease (their sweeper died)
# are due again; then up to ``limit`` due members move to inflight, stamped with now.
POP_LUA = """
local now, limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - lease, 'LIMIT', 0, limit)) do
  redis.call('ZADD', KEYS[1], 'LT', now, m)
  redis.call('ZREM', KEYS[2], m)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZADD', KEYS[2], now, m)
end
return due
"""

# KEYS due, inflight; ARGV n, n swept members, then (score, member) pairs of next deadlines.
# Deadlines first, with LT: one a writer added meanwhile is kept when it is sooner.
SETTLE_LUA = """
local n = tonumber(ARGV[1])
for i = n + 2, #ARGV, 2 do redis.call('ZADD', KEYS[1], 'LT', ARGV[i], ARGV[i + 1]) end
for i = 2, n + 1 do redis.call('ZREM', KEYS[2], ARGV[i]) end
return 0
"""


@contextlib.contextmanager
def map_redis_errors(action: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BackendUnavailable(
            f"redis presence {action} failed: {exc.__class__.__name__}"
        ) from exc


def _client(settings: Settings) -> Any:
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": COMMAND_TIMEOUT_S,
        "socket_keepalive": True,
        # One retry on a fresh connection (the pooled one died with a Redis restart).
        "retry": Retry(NoBackoff(), 1),
    }
    if settings.redis_cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(settings.redis_url, **kwargs)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=POOL_SIZE, timeout=COMMAND_TIMEOUT_S, **kwargs
    )
    return Redis.from_pool(pool)


class _Op:
    __slots__ = ("kind", "user_id", "keys", "done")

    def __init__(self, kind: str, user_id: str, keys: Sequence[str]) -> None:
        self.kind = kind  # "open" | "close" | "heartbeat"
        self.user_id = user_id
        self.keys = keys
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class RedisPresence:
    def __init__(self, settings: Settings, *, node_id: str | None = None) -> None:
        self.timing = Timing.of(settings)
        self.node_id = node_id or os.urandom(6).hex()
        self._prefix = settings.redis_prefix + "pr:"
        self._due = self._prefix + "{due}"
        self._inflight = self._due + ":inflight"
        t = self.timing
        # Keys outlive their longest entry; every write and refresh pushes this on.
        self._keep_ms = 2 * max(t.timeout_ms, t.grace_ms, t.ttl_ms)
        self._lease_ms = max(1000, t.ttl_ms)
        self._client: Any = _client(settings)
        self._open = self._client.register_script(OPEN_LUA)
        self._close = self._client.register_script(CLOSE_LUA)
        self._heartbeat = self._client.register_script(HEARTBEAT_LUA)
        self._sweep = self._client.register_script(SWEEP_LUA)
        self._pop = self._client.register_script(POP_LUA)
        self._settle = self._client.register_script(SETTLE_LUA)
        self._handlers: list[TransitionHandler] = []
        self._local: dict[str, dict[str, int]] = {}  # user -> device key -> sockets on this node
        self._lanes: list[deque[_Op]] = [deque() for _ in range(LANES)]
        self._workers: list[asyncio.Task[None] | None] = [None] * LANES
        self._queued: dict[str, int] = {}  # user -> changes not written yet
        self._offset_ms = 0  # Redis TIME minus our clock
        self._closing = False
        self._unreachable = False  # a write failed while closing: fail the rest fast
        self._closed = False

    def add_handler(self, handler: TransitionHandler) -> None:
        self._handlers.append(handler)

    def keys(self, user_id: str) -> tuple[str, str]:
        """The user's two keys (same hash slot)."""
        base = self._prefix + "{" + user_id + "}"
        return base + ":x", base + ":d"

    def _now(self) -> int:
        return int(time.time() * 1000) + self._offset_ms

    # -- changes ------------------------------------------------------------------------------
    async def socket_opened(self, user_id: str, device_key: str) -> None:
        devices = self._local.setdefault(user_id, {})
        count = devices.get(device_key, 0) + 1
        devices[device_key] = count
        if count == 1:
            await self._submit(_Op("open", user_id, (device_key,)))

    async def socket_closed(self, user_id: str, device_key: str) -> None:
        devices = self._local.get(user_id)
        count = 0 if devices is None else devices.get(device_key, 0)
        if count == 0 or devices is None:
            return
        if count > 1:
            devices[device_key] = count - 1
            return
        del devices[device_key]
        if not devices:
            del self._local[user_id]
        await self._submit(_Op("close", user_id, (device_key,)))

    async def heartbeat(self, user_id: str, device_id: str) -> None:
        await self._submit(_Op("heartbeat", user_id, (device_id,)))

    def _submit(self, op: _Op) -> asyncio.Future[None]:
        if self._closed:
            raise BackendUnavailable("presence is closed")
        lane = zlib.crc32(op.user_id.encode()) % LANES
        self._lanes[lane].append(op)
        self._queued[op.user_id] = self._queued.get(op.user_id, 0) + 1
        worker = self._workers[lane]
        if worker is None or worker.done():
            self._workers[lane] = asyncio.get_running_loop().create_task(
                self._work(lane), name=f"presence-lane-{lane}"
            )
        return op.done

    async def _work(self, lane: int) -> None:
        queue = self._lanes[lane]
        while queue:
            op = queue[0]
            try:
                if self._unreachable:
                    raise BackendUnavailable(
                        "redis presence is unreachable; not waiting at shutdown"
                    )
                await self._apply(op)
            except asyncio.CancelledError:
                if not op.done.done():
                    op.done.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - one failed write must not stop the lane
                # Self-healing: a lost open is re-added by the next refresh (its entry is missing);
                # a lost close leaves an entry nobody refreshes, which expires after the TTL.
                if not self._unreachable:  # once is enough when Redis is gone at shutdown
                    log.warning("presence %s not written: %s", op.kind, exc)
                self._unreachable = self._closing
                if not op.done.done():
                    op.done.set_exception(
                        exc if isinstance(exc, BackendUnavailable) else BackendUnavailable(str(exc))
                    )
                    op.done.exception()  # retrieved: callers may not await it
            else:
                if not op.done.done():
                    op.done.set_result(None)
            finally:
                left = self._queued.get(op.user_id, 1) - 1
                if left > 0:
                    self._queued[op.user_id] = left
                else:
                    self._queued.pop(op.user_id, None)
            queue.popleft()

    async def _apply(self, op: _Op) -> None:
        x, d = self.keys(op.user_id)
        now = self._now()
        t = self.timing
        head = [now, self._keep_ms]
        member: str | None = ""  # the due member for this change's deadline (None: none)
        if op.kind == "open":
            until = now + t.ttl_ms
            script, args, member = self._open, [*head, self.node_id, until, *op.keys], self.node_id
        elif op.kind == "close":
            until = now + t.grace_ms
            script, args = self._close, [*head, self.node_id, until, *op.keys]
            if all(is_session(k) for k in op.keys):
                member = None  # a session has no grace: nothing left to wait for
        else:
            until = now + t.timeout_ms
            script, args = self._heartbeat, [*head, until, op.keys[0]]
        with map_redis_errors(op.kind):
            out = await script(keys=[x, d], args=args)
            self._report(op.user_id, out)
            if member is not None:
                # After the script: a sweep running in between sees the entry itself.
                await self._client.zadd(self._due, {f"{member}|{op.user_id}": until}, lt=True)

    def _report(self, user_id: str, out: Sequence[Any]) -> None:
        for item in out:
            text = item.decode() if isinstance(item, bytes) else str(item)
            transition = Transition(user_id, text[1:], text[0] == "+")
            for handler in self._handlers:
                try:
                    handler(transition)
                except Exception:
                    log.exception("presence handler failed")

    # -- reads --------------------------------------------------------------------------------
    async def _live(self, user_id: str) -> list[str]:
        x, _ = self.keys(user_id)
        with map_redis_errors("read"):
            members = await self._client.zrangebyscore(x, f"({self._now()}", "+inf")
        return [m.decode() for m in members]

    async def online_devices(self, user_id: str) -> list[str]:
        return sorted({m.split("|", 2)[2] for m in await self._live(user_id) if m[0] == "s"})

    async def online(self, user_id: str) -> list[str]:
        return sorted(
            {m.split("|", 2)[2] if m[0] == "s" else m[2:] for m in await self._live(user_id)}
        )

    # -- timing -------------------------------------------------------------------------------
    async def _sync_clock(self) -> None:
        before = time.time()
        with map_redis_errors("time"):
            seconds, micros = await self._client.time()
        after = time.time()
        ours = (before + after) / 2  # Redis read its clock about half way through the round trip
        self._offset_ms = round((seconds + micros / 1e6 - ours) * 1000)

    async def refresh(self) -> None:
        """Push this node's socket entries (and their due members) a TTL into the future.

        One pipeline per chunk of users: ``ZADD XX GT CH`` never re-creates an entry a sweep or a
        close removed meanwhile, and its count tells which users lost one (a sweep found it
        expired while this node was stalled, or the open was never written): those devices are
        opened again through their lane, which reports them online again if they went offline.
        """
        if self._closed:
            return
        await self._sync_clock()
        until = self._now() + self.timing.ttl_ms
        node = self.node_id
        users = [(u, list(devices)) for u, devices in self._local.items() if devices]
        missing: list[str] = []
        for i in range(0, len(users), REFRESH_CHUNK):
            chunk = users[i : i + REFRESH_CHUNK]
            pipe = self._client.pipeline(transaction=False)
            for user_id, devices in chunk:
                x, d = self.keys(user_id)
                pipe.zadd(x, {f"s|{node}|{k}": until for k in devices}, xx=True, gt=True, ch=True)
                pipe.pexpire(x, self._keep_ms)
                pipe.pexpire(d, self._keep_ms)
            pipe.zadd(self._due, {f"{node}|{u}": until for u, _ in chunk})
            with map_redis_errors("refresh"):
                replies = await pipe.execute()
            for j, (user_id, devices) in enumerate(chunk):
                # A user with a change still queued may simply not be written yet.
                if int(replies[3 * j]) < len(devices) and user_id not in self._queued:
                    missing.append(user_id)
        for user_id in missing:
            devices = [k for k, n in self._local.get(user_id, {}).items() if n > 0]
            if devices:
                log.warning("presence entries of this node were gone; writing them again")
                _ = self._submit(_Op("open", user_id, devices))  # failures are logged by the lane

    async def sweep(self) -> None:
        """Pop what is due (in batches while there is a backlog) and sweep those users."""
        if self._closed:
            return
        while True:
            now = self._now()
            with map_redis_errors("sweep"):
                popped = await self._pop(
                    keys=[self._due, self._inflight], args=[now, SWEEP_BATCH, self._lease_ms]
                )
            if not popped:
                return
            members = [m.decode() for m in popped]
            users = sorted({m.split("|", 1)[1] for m in members})
            limit = asyncio.Semaphore(SWEEP_CONCURRENCY)
            with map_redis_errors("sweep"):
                found = await asyncio.gather(*(self._sweep_user(u, now, limit) for u in users))
                deadlines = [item for pairs in found for item in pairs]
                # A failure above leaves the members in inflight: swept again after the lease.
                await self._settle(
                    keys=[self._due, self._inflight], args=[len(members), *members, *deadlines]
                )
            if len(members) < SWEEP_BATCH:
                return

    async def _sweep_user(self, user_id: str, now: int, limit: asyncio.Semaphore) -> list[Any]:
        """Report what expired for ``user_id``; its next deadlines as (score, due member) items."""
        async with limit:
            x, d = self.keys(user_id)
            out, pending = await self._sweep(keys=[x, d], args=[now, self._keep_ms])
        self._report(user_id, out)
        deadlines: list[Any] = []
        for k in range(0, len(pending), 2):
            node = pending[k].decode() if isinstance(pending[k], bytes) else str(pending[k])
            deadlines.extend((int(pending[k + 1]), f"{node}|{user_id}"))
        return deadlines

    async def drain(self) -> None:
        """Wait until every queued change is written."""
        while True:
            pending = [w for w in self._workers if w is not None and not w.done()]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Close this node's remaining sockets (their graces start, so other nodes report the
        offlines without waiting for the TTL), write everything queued, close the client."""
        if self._closed:
            return
        self._closing = True
        try:
            for user_id, devices in list(self._local.items()):
                keys = [k for k, n in devices.items() if n > 0]
                if keys:
                    _ = self._submit(_Op("close", user_id, keys))
            self._local.clear()
            await self.drain()
        finally:
            self._closed = True
            self._handlers.clear()
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()


_: type[Presence] = RedisPresence

"""The open sockets of one worker, sharded and indexed by whom they act for.

A connection is added when its first frame is about to go out and removed in ``connection_lost``,
whatever the cause (``relay.connection``). Besides counting and draining them, the registry answers
"which sockets on this node ..." for the code that has to reach them:

* ``by_principal(kind, id)``: one principal's sockets (delivering its inbox);
* ``by_user(user_id)``: every socket acting for a user: its sessions, API tokens and daemons;
* ``by_token(token_id)``, ``by_session(session_id)``, ``by_device(device_id)``: what a revocation
  closes (realtime.md guarantee 4: a revoked token or a removed device is gone within 1 s). The
  device is the one the *credential* names (a daemon's key, an E2EE device's JWT); the
  ``device_id`` a user's socket picks for itself is a label, not a credential: find those sockets
  with ``by_user`` and filter.

Lookups return a tuple: a snapshot the caller may close sockets from while it walks it.

Shards (STYLE.md 9, centrifuge's ``hub.go``): N shards chosen by a stable hash (crc32, not
``hash()``, which PYTHONHASHSEED changes per process). A connection lives in the shard of its
owner (the user id, or the principal id of an E2EE device, which has no user), so one user's
sockets are one shard's; an index entry lives in the shard its own key hashes to. Adding or
removing a socket touches a handful of dicts holding about 1/N of the node's entries each, so no
resize ever rehashes a node-sized table, and ``close_all`` drains shard by shard, yielding to the
loop in between: a node with 50,000 sockets keeps serving while it says 1001 to all of them.

Memory (a socket's whole budget is a few KB): a key held by one socket maps to that connection
itself; a second socket under the same key promotes the entry to a dict (an inner dict per key
would cost ~200 bytes each, for keys that nearly always have one socket). Keys are the principal's
own strings, never copies. ``WsConnection.principal``'s setter calls ``reindex`` when a live
refresh brings another token or session.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from shared.codes import CloseCode
from shared.principals import Principal

DEFAULT_SHARDS = 64

# The indexes, in the order of ``_keys``.
_ID, _USER, _TOKEN, _SESSION, _DEVICE = range(5)
_INDEXES = 5


class Member(Protocol):
    """What the registry needs of a connection."""

    @property
    def principal(self) -> Principal: ...

    def close(self, code: CloseCode, reason: str | None = None) -> None: ...

    def abort(self) -> None: ...


C = TypeVar("C", bound=Member)


def _keys(p: Principal) -> tuple[str | None, str | None, str | None, str | None, str | None]:
    return (p.id, p.user_id, p.token_id, p.session_id, p.device_id)


def _owner(p: Principal) -> str:
    return p.user_id or p.id


class _Shard(Generic[C]):
    __slots__ = ("conns", "indexes")

    def __init__(self) -> None:
        self.conns: dict[C, None] = {}  # an ordered set, like the hub's member dicts
        self.indexes: list[dict[str, C | dict[C, None]]] = [{} for _ in range(_INDEXES)]


class ConnectionRegistry(Generic[C]):
    __slots__ = ("_shards", "_count", "_empty")

    def __init__(self, shards: int = DEFAULT_SHARDS) -> None:
        if shards < 1:
            raise ValueError("a registry needs at least one shard")
        self._shards: list[_Shard[C]] = [_Shard() for _ in range(shards)]
        self._count = 0
        self._empty: asyncio.Event | None = None

    def _shard(self, key: str) -> _Shard[C]:
        # surrogatepass: any str a credential produced hashes, none raises.
        return self._shards[zlib.crc32(key.encode("utf-8", "surrogatepass")) % len(self._shards)]

    # -- membership -----------------------------------------------------------------------------
    def add(self, conn: C) -> None:
        principal = conn.principal
        conns = self._shard(_owner(principal)).conns
        if conn in conns:
            return
        conns[conn] = None
        self._count += 1
        self._index(conn, principal)

    def discard(self, conn: C) -> None:
        principal = conn.principal
        conns = self._shard(_owner(principal)).conns
        if conn not in conns:
            return
        del conns[conn]
        self._count -= 1
        self._unindex(conn, principal)
        if not self._count and self._empty is not None:
            self._empty.set()

    def reindex(self, conn: C, old: Principal) -> None:
        """``conn.principal`` replaced ``old``: move its entries (no-op if ``conn`` is not here)."""
        new = conn.principal
        if new is old:
            return
        old_conns = self._shard(_owner(old)).conns
        if conn not in old_conns:
            return
        self._unindex(conn, old)
        del old_conns[conn]
        self._shard(_owner(new)).conns[conn] = None
        self._index(conn, new)

    def _index(self, conn: C, principal: Principal) -> None:
        for i, key in enumerate(_keys(principal)):
            if key is None:
                continue
            index = self._shard(key).indexes[i]
            entry = index.get(key)
            if entry is None:
                index[key] = conn
            elif isinstance(entry, dict):
                entry[conn] = None
            elif entry is not conn:
                index[key] = {entry: None, conn: None}

    def _unindex(self, conn: C, principal: Principal) -> None:
        for i, key in enumerate(_keys(principal)):
            if key is None:
                continue
            index = self._shard(key).indexes[i]
            entry = index.get(key)
            if entry is conn:
                del index[key]
            elif isinstance(entry, dict):
                entry.pop(conn, None)
                if len(entry) == 1:  # back to the one-socket form
                    (index[key],) = entry

    def __len__(self) -> int:
        return self._count

    def __contains__(self, conn: object) -> bool:
        principal = getattr(conn, "principal", None)
        if not isinstance(principal, Principal):
            return False
        return conn in self._shard(_owner(principal)).conns

    def __iter__(self) -> Iterator[C]:
        """A snapshot, shard by shard: safe to close connections while iterating."""
        return iter([conn for shard in self._shards for conn in shard.conns])

    # -- lookups --------------------------------------------------------------------------------
    def _lookup(self, index: int, key: str) -> tuple[C, ...]:
        entry = self._shard(key).indexes[index].get(key)
        if entry is None:
            return ()
        if isinstance(entry, dict):
            return tuple(entry)
        return (entry,)

    def by_principal(self, kind: str, principal_id: str) -> tuple[C, ...]:
        """The sockets of one principal (``Principal.kind`` and ``.id``)."""
        return tuple(c for c in self._lookup(_ID, principal_id) if c.principal.kind == kind)

    def by_user(self, user_id: str) -> tuple[C, ...]:
        """Every socket acting for ``user_id``: user sessions, API tokens and daemons."""
        return self._lookup(_USER, user_id)

    def by_token(self, token_id: str) -> tuple[C, ...]:
        """The sockets opened (or last refreshed) with one API token."""
        return self._lookup(_TOKEN, token_id)

    def by_session(self, session_id: str) -> tuple[C, ...]:
        """The sockets of one login session (refresh family) of a user."""
        return self._lookup(_SESSION, session_id)

    def by_device(self, device_id: str) -> tuple[C, ...]:
        """The sockets whose credential names ``device_id`` (daemon key, E2EE device JWT)."""
        return self._lookup(_DEVICE, device_id)

    # -- drain ----------------------------------------------------------------------------------
    async def close_all(self, code: CloseCode) -> None:
        """Start the closing handshake on every socket (1001 on drain: reconnect elsewhere).

        One shard per loop iteration: between shards the loop reads, writes and answers (close
        frames of the shards already done get through while the rest wait their turn). A socket
        registered into a shard already walked is the caller's to close (``WsConnection.start``
        closes sockets that open while the server drains).
        """
        for shard in self._shards:
            if not shard.conns:
                continue
            for conn in list(shard.conns):
                conn.close(code)
            await asyncio.sleep(0)

    def abort_all(self) -> None:
        for shard in self._shards:
            for conn in list(shard.conns):
                conn.abort()

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until every socket is gone; False if some are left after ``timeout``."""
        if not self._count:
            return True
        self._empty = asyncio.Event()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._empty = None
        return True

"""The open sockets of one worker, so shutdown (and later the hub) can reach every one of them.

The sharded hub of a later issue indexes connections by user and channel; this registry is the
flat set underneath it: a connection is added once its ``hello`` is about to go out and removed
in ``connection_lost``, whatever the cause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from shared.codes import CloseCode


class Closable(Protocol):
    def close(self, code: CloseCode, reason: str | None = None) -> None: ...

    def abort(self) -> None: ...


C = TypeVar("C", bound=Closable)


class ConnectionRegistry(Generic[C]):
    __slots__ = ("_conns", "_empty")

    def __init__(self) -> None:
        self._conns: set[C] = set()
        self._empty: asyncio.Event | None = None

    def add(self, conn: C) -> None:
        self._conns.add(conn)

    def discard(self, conn: C) -> None:
        self._conns.discard(conn)
        if not self._conns and self._empty is not None:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, conn: object) -> bool:
        return conn in self._conns

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._conns))

    def close_all(self, code: CloseCode) -> None:
        """Start the closing handshake on every socket (1001 on drain: reconnect elsewhere)."""
        for conn in list(self._conns):
            conn.close(code)

    def abort_all(self) -> None:
        for conn in list(self._conns):
            conn.abort()

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until every socket is gone; False if some are left after ``timeout``."""
        if not self._conns:
            return True
        self._empty = asyncio.Event()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._empty = None
        return True

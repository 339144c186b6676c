"""Cursor stores: where a client keeps the last cursor (``/ws``) or seq (book relay) it processed,
so a restarted client resumes instead of starting over.

A store is anything with ``async load(key) -> int | None`` and ``async save(key, value)``
(``CursorStore``). The client saves a position only after the application processed it, and before
it acknowledges it to the server, coalesced (at most every ``ack_delay`` or ``ack_batch`` events):
after a crash, what was processed since the last save is delivered again. For exactly-once across
restarts, write the position in the same transaction as the effect of the event (``event.cursor``,
``op.seq``) and give the client a store that reads it back.

Keys: ``inbox:<device_id>`` (``inbox:`` for a connection without ``device_id``) and
``book:<book_id>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class CursorStore(Protocol):
    """Persists one integer position per stream key."""

    async def load(self, key: str) -> int | None:
        """The saved position of ``key``, or None if there is none."""
        ...

    async def save(self, key: str, value: int) -> None:
        """Remember ``value`` for ``key`` (called with increasing values, except after a reset)."""
        ...


class MemoryCursorStore:
    """The default: positions live as long as the process (a reconnect resumes, a restart does not)."""

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}

    async def load(self, key: str) -> int | None:
        """The position saved for ``key`` in this process."""
        return self.positions.get(key)

    async def save(self, key: str, value: int) -> None:
        """Keep ``value`` for ``key`` in memory."""
        self.positions[key] = value


class FileCursorStore:
    """Positions in one small JSON file, replaced atomically (write to a temporary file, fsync,
    rename), so a crash leaves either the old or the new content. Good for daemons and examples."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._positions: dict[str, int] | None = None

    def _read(self) -> dict[str, int]:
        if self._positions is None:
            try:
                data = json.loads(self.path.read_text())
            except FileNotFoundError:
                data = {}
            except ValueError as exc:
                raise ValueError(f"{self.path} is not a cursor file: {exc}") from exc
            self._positions = {k: v for k, v in data.items() if isinstance(v, int)}
        return self._positions

    async def load(self, key: str) -> int | None:
        """The position saved for ``key`` in the file."""
        return self._read().get(key)

    async def save(self, key: str, value: int) -> None:
        """Write ``value`` for ``key`` to the file (in a thread: it fsyncs)."""
        positions = self._read()
        positions[key] = value
        await asyncio.to_thread(self._write, dict(positions))

    def _write(self, positions: dict[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".part")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(positions, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


__all__ = ["CursorStore", "FileCursorStore", "MemoryCursorStore"]

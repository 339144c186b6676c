"""Sans-I/O delivery state of one ``/ws`` socket's inbox: which cursors to send, and when.

No loop, no store: ``relay.inbox`` feeds it entries (live from the broker, or read from the store
during a replay) and acks, and does what it answers. Everything that makes delivery correct
lives here, where it can be tested frame by frame:

* ``scanned`` is the highest cursor of the user's stream this socket has considered (sent, or
  skipped because it is for another device, outside the filter, or expired). A user's cursors are
  contiguous, so a live entry that is not ``scanned + 1`` means a wake-up was lost or overtaken:
  the socket replays from the store instead of guessing (``Decision.replay_from``).
* While a replay runs, live entries are held and applied after it, so replay and live delivery
  never interleave out of order (realtime.md "User/device socket").
* ``sent`` is the highest cursor actually sent, ``acked`` the highest the client acked. Acks are
  cumulative. When everything sent is acked, the effective ack moves to ``scanned``: skipped
  entries hold no retention for this device (realtime.md "filter").
* Re-sends: while ``acked < sent`` the socket owes a re-send after ``ack_timeout``, doubling to
  ``ack_timeout_max`` while no ack makes progress; progress resets the interval.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.inbox.events import Entry, EventFilter

HELD_MAX = 10_000  # live entries held during one replay; beyond that the replay simply re-reads


@dataclass(slots=True)
class Decision:
    """What the caller must do after feeding the state."""

    send: list[Entry] = field(default_factory=list)
    replay_from: int | None = None  # start (another) replay after this cursor


class InboxCursor:
    __slots__ = (
        "device_id",
        "filter",
        "acked",
        "scanned",
        "sent",
        "replaying",
        "held",
        "held_overflow",
        "retry_interval",
        "ack_timeout",
        "ack_timeout_max",
    )

    def __init__(
        self,
        device_id: str | None,
        acked: int,
        *,
        filter: EventFilter | None = None,
        ack_timeout: float = 5.0,
        ack_timeout_max: float = 60.0,
    ) -> None:
        self.device_id = device_id
        self.filter = filter
        self.acked = acked
        self.scanned = acked
        self.sent = acked
        self.replaying = False
        self.held: list[Entry] = []
        self.held_overflow = False
        self.ack_timeout = ack_timeout
        self.ack_timeout_max = ack_timeout_max
        self.retry_interval = ack_timeout

    # -- what is owed -----------------------------------------------------------------------
    @property
    def unacked(self) -> bool:
        return self.acked < self.sent

    @property
    def effective_ack(self) -> int:
        """What the store may remember: ``scanned`` once nothing sent is waiting for an ack."""
        return self.acked if self.unacked else self.scanned

    def wants(self, entry: Entry, now_ms: int) -> bool:
        """Is ``entry`` for this socket (target device, filter, ttl)?"""
        if entry.target_device is not None and entry.target_device != self.device_id:
            return False
        if entry.expires_at is not None and entry.expires_at <= now_ms:
            return False
        return self.filter is None or self.filter.matches(entry.event)

    # -- live entries -------------------------------------------------------------------------
    def on_live(self, entries: Iterable[Entry], now_ms: int) -> Decision:
        decision = Decision()
        if self.replaying:
            for e in entries:
                if len(self.held) >= HELD_MAX:
                    self.held_overflow = True  # the next replay reads them from the store
                    self.held.clear()
                if not self.held_overflow:
                    self.held.append(e)
            return decision
        self._apply(entries, now_ms, decision)
        return decision

    def _apply(self, entries: Iterable[Entry], now_ms: int, decision: Decision) -> None:
        for e in entries:
            if e.cursor <= self.scanned:
                continue  # already considered (a duplicate wake-up, or replayed meanwhile)
            if e.cursor != self.scanned + 1:
                # A gap: an earlier entry's wake-up is late or lost. It is committed (cursors
                # commit in order), so the store has it: replay from what we have.
                decision.replay_from = self.scanned
                return
            self.scanned = e.cursor
            if self.wants(e, now_ms):
                decision.send.append(e)
                self.sent = e.cursor

    # -- replays ----------------------------------------------------------------------------
    def begin_replay(self, after: int) -> None:
        """A replay of everything after ``after`` starts; live entries are held meanwhile."""
        self.replaying = True
        self.held_overflow = False
        self.scanned = min(self.scanned, after)
        if self.sent > after:
            self.sent = max(after, self.acked)

    def replayed(self, entries: Iterable[Entry], now_ms: int) -> list[Entry]:
        """One page read from the store, in cursor order: the entries to send."""
        out: list[Entry] = []
        for e in entries:
            if e.cursor <= self.scanned:
                continue
            self.scanned = e.cursor  # a gap inside a replay is pruned history: nothing to wait for
            if self.wants(e, now_ms):
                out.append(e)
                self.sent = e.cursor
        return out

    def end_replay(self, head: int, now_ms: int) -> Decision:
        """The replay read everything up to ``head`` (the user's head when it started)."""
        self.replaying = False
        self.scanned = max(self.scanned, head)
        decision = Decision()
        if self.held_overflow:
            self.held_overflow = False
            self.held.clear()
            decision.replay_from = self.scanned
            return decision
        held, self.held = self.held, []
        held.sort(key=lambda e: e.cursor)
        self._apply(held, now_ms, decision)
        return decision

    def reset_to(self, head: int) -> None:
        """History the socket needed is gone (``reset``): start over at ``head``."""
        self.acked = self.scanned = self.sent = head
        self.retry_interval = self.ack_timeout

    # -- acks -------------------------------------------------------------------------------
    def on_ack(self, cursor: int) -> bool:
        """A cumulative ack; True when it made progress (the re-send interval starts over)."""
        cursor = min(cursor, self.scanned)  # nothing beyond what was considered can be acked
        if cursor <= self.acked:
            return False
        self.acked = cursor
        if self.acked >= self.sent:
            self.sent = self.acked
        self.retry_interval = self.ack_timeout
        return True

    def next_retry_interval(self) -> float:
        """The wait before the next re-send; doubles each time, up to ``ack_timeout_max``."""
        interval = self.retry_interval
        self.retry_interval = min(self.retry_interval * 2, self.ack_timeout_max)
        return interval


__all__ = ["Decision", "InboxCursor"]

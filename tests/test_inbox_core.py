"""The Sans-I/O delivery state (relay/inbox_core.py), fed entry by entry: no loop, no store."""

from __future__ import annotations

import json

from relay.inbox_core import HELD_MAX, InboxCursor
from shared.inbox.events import Entry, EventFilter, pack_entries, pack_ephemeral, unpack_wake

NOW = 1_000_000


def entry(cursor: int, event: str = "publish", target: str | None = None, expires: int | None = None) -> Entry:
    return Entry(cursor, event, json.dumps({"n": cursor}), target, expires, NOW)


def cursors(entries: list[Entry]) -> list[int]:
    return [e.cursor for e in entries]


def test_live_entries_in_order_are_sent_and_duplicates_dropped() -> None:
    c = InboxCursor("d1", 0)
    assert cursors(c.on_live([entry(1), entry(2)], NOW).send) == [1, 2]
    assert cursors(c.on_live([entry(2), entry(1)], NOW).send) == []  # a duplicate wake-up
    assert (c.scanned, c.sent, c.acked) == (2, 2, 0)


def test_a_gap_asks_for_a_replay_instead_of_guessing() -> None:
    c = InboxCursor("d1", 4)
    decision = c.on_live([entry(7)], NOW)  # 5 and 6 are committed but their wake-up is late
    assert decision.send == [] and decision.replay_from == 4
    assert c.scanned == 4


def test_entries_for_other_devices_filters_and_ttl_are_skipped_but_scanned() -> None:
    c = InboxCursor("d1", 0, filter=EventFilter(["task.*"]))
    live = [
        entry(1, "task.assigned", target="d2"),  # another device's
        entry(2, "message.new"),  # outside the filter
        entry(3, "task.updated", expires=NOW),  # expired exactly now
        entry(4, "task.updated"),
    ]
    assert cursors(c.on_live(live, NOW).send) == [4]
    assert c.scanned == 4 and c.sent == 4


def test_effective_ack_skips_what_this_device_never_needed() -> None:
    c = InboxCursor("d1", 0, filter=EventFilter(["publish"]))
    c.on_live([entry(1), entry(2, "message.new"), entry(3, "message.new")], NOW)
    assert c.unacked and c.effective_ack == 0
    assert c.on_ack(1)
    assert not c.unacked and c.effective_ack == 3  # 2 and 3 hold no retention for it


def test_acks_are_cumulative_clamped_and_only_forward() -> None:
    c = InboxCursor(None, 0)
    c.on_live([entry(i) for i in range(1, 6)], NOW)
    assert c.on_ack(3) and c.acked == 3 and c.unacked
    assert not c.on_ack(2)  # backwards: ignored
    assert c.on_ack(99) and c.acked == 5 and not c.unacked  # beyond what was scanned: clamped


def test_live_entries_are_held_during_a_replay_and_follow_it() -> None:
    c = InboxCursor("d1", 0)
    c.begin_replay(0)
    assert c.on_live([entry(4), entry(5)], NOW).send == []  # held
    assert cursors(c.replayed([entry(1), entry(2), entry(3)], NOW)) == [1, 2, 3]
    decision = c.end_replay(3, NOW)
    assert cursors(decision.send) == [4, 5] and decision.replay_from is None
    assert c.scanned == 5


def test_held_entries_already_replayed_are_not_sent_twice() -> None:
    c = InboxCursor("d1", 0)
    c.begin_replay(0)
    c.on_live([entry(2), entry(3)], NOW)
    assert cursors(c.replayed([entry(1), entry(2), entry(3)], NOW)) == [1, 2, 3]
    assert c.end_replay(3, NOW).send == []


def test_a_held_entry_beyond_the_head_with_a_gap_asks_for_another_replay() -> None:
    c = InboxCursor("d1", 0)
    c.begin_replay(0)
    c.on_live([entry(6)], NOW)
    c.replayed([entry(1), entry(2)], NOW)
    decision = c.end_replay(2, NOW)
    assert decision.send == [] and decision.replay_from == 2


def test_held_overflow_falls_back_to_the_store() -> None:
    c = InboxCursor("d1", 0)
    c.begin_replay(0)
    c.on_live([entry(i) for i in range(1, HELD_MAX + 2)], NOW)
    assert c.held == []  # dropped: the store has them
    decision = c.end_replay(0, NOW)
    assert decision.send == [] and decision.replay_from == 0


def test_a_re_send_replays_from_the_acked_cursor() -> None:
    c = InboxCursor("d1", 0)
    c.on_live([entry(1), entry(2), entry(3)], NOW)
    c.on_ack(1)
    c.begin_replay(c.acked)
    assert (c.scanned, c.sent) == (1, 1)
    assert cursors(c.replayed([entry(2), entry(3)], NOW)) == [2, 3]


def test_retry_interval_doubles_to_the_cap_and_restarts_on_progress() -> None:
    c = InboxCursor("d1", 0, ack_timeout=5, ack_timeout_max=60)
    c.on_live([entry(1), entry(2)], NOW)
    assert [c.next_retry_interval() for _ in range(6)] == [5, 10, 20, 40, 60, 60]
    c.on_ack(1)
    assert c.retry_interval == 5


def test_reset_starts_over_at_the_head() -> None:
    c = InboxCursor("d1", 3)
    c.reset_to(40)
    assert (c.acked, c.scanned, c.sent) == (40, 40, 40)


def test_filter_patterns() -> None:
    f = EventFilter.parse(["task.*", "publish"])
    assert f.matches("task.assigned") and f.matches("publish")
    assert not f.matches("taskx.y") and not f.matches("message.new")
    assert EventFilter.parse(["*"]).matches("anything.at_all")
    for bad in ([], "task.*", ["Task"], ["task.**"], [1], ["a.b.c"], ["x"] * 65):
        try:
            EventFilter.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} should be refused")


def test_wake_up_envelopes_round_trip_and_junk_is_refused() -> None:
    entries = [entry(1), entry(2, target="d2", expires=5)]
    kind, body, exclude = unpack_wake(pack_entries(entries))
    assert kind == 0 and body == entries and exclude is None
    kind, body, exclude = unpack_wake(pack_ephemeral({"type": "device.online", "device_id": "d"}, "d"))
    assert (kind, body, exclude) == (1, {"type": "device.online", "device_id": "d"}, "d")
    for junk in (b"", b"\xc1", b"\x90", b"\x92\x07\x90", b"\x93\x01\x01\xc0"):
        try:
            unpack_wake(junk)
        except ValueError:
            continue
        raise AssertionError(f"{junk!r} should be refused")

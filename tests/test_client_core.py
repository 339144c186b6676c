"""The client SDK's Sans-I/O core (relay.client.core), fed frame sequences synchronously: no loop,
no socket, the clock and the randomness are the test's. Sections follow realtime.md: "/ws" (hello,
events, acks, sync, synced, reset, filter, requests), "Book relay", "Heartbeats and close codes",
"Handshake", "Credential refresh", "Encoding"."""

from __future__ import annotations

import ast
import base64
import json
import random
from pathlib import Path
from typing import Any

import jwt
import msgpack
import pytest

from relay.client import core
from relay.client.core import (
    JSON,
    MSGPACK,
    BookProtocol,
    Event,
    FrameError,
    Hello,
    InboxProtocol,
    Notice,
    Op,
    ReconnectPolicy,
    Reset,
    Settled,
    Synced,
)
from relay.client.errors import (
    ConnectionLost,
    ConnectionTerminated,
    HandshakeRejected,
    OpRejected,
    RequestError,
)


def hello(cursor: int = 0, cid: str = "c-1") -> dict[str, Any]:
    return {"type": "hello", "connection_id": cid, "principal": {"kind": "user", "id": "u-1", "device_id": "d"},
            "heartbeat_s": 30, "cursor": cursor}


def event(cursor: int, name: str = "message.new", **data: Any) -> dict[str, Any]:
    return {"type": "event", "event": name, "cursor": cursor, "data": data or {"n": cursor}}


def feed(proto: Any, *frames: dict[str, Any], now: float = 0.0) -> list[Any]:
    for frame in frames:
        proto.receive(frame, now)
    return proto.events_received()


def kinds(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


def delivered(events: list[Any]) -> list[int]:
    return [e.cursor for e in events if isinstance(e, Event)]


def connect(proto: Any, *first: dict[str, Any]) -> list[Any]:
    proto.connection_made()
    return feed(proto, *first)


# -- /ws: hello, events, dedupe ----------------------------------------------------------------------


def test_nothing_is_sent_before_hello_and_hello_makes_the_socket_ready() -> None:
    inbox = InboxProtocol(device_id="laptop")
    inbox.connection_made()
    rid = inbox.request("ping")
    assert inbox.frames_to_send() == [] and not inbox.ready
    events = feed(inbox, hello(7))
    assert kinds(events) == ["Hello"] and isinstance(events[0], Hello)
    assert events[0].cursor == 7 and events[0].connection_id == "c-1" and events[0].heartbeat_s == 30
    assert inbox.ready
    # With a device_id the server resumes by itself: no sync, and nothing to ack yet.
    assert inbox.frames_to_send() == [{"type": "ping", "request_id": rid}]


def test_events_are_handed_out_in_order_and_duplicates_dropped_by_cursor() -> None:
    inbox = InboxProtocol(device_id="laptop")
    connect(inbox, hello(100))
    events = feed(inbox, event(101), event(105), event(105), event(103), event(101), event(110))
    # Cursors need not be contiguous (105 after 101); anything at or below the highest is a dupe.
    assert delivered(events) == [101, 105, 110]
    assert [e.data for e in events] == [{"n": 101}, {"n": 105}, {"n": 110}]
    assert inbox.position == 110


def test_a_reconnect_replay_overlapping_what_was_delivered_is_deduped() -> None:
    inbox = InboxProtocol(device_id="laptop")
    connect(inbox, hello(0))
    assert delivered(feed(inbox, event(1), event(2), event(3))) == [1, 2, 3]
    inbox.mark_processed(1, now=0.0)
    inbox.on_timer(1.0)
    inbox.connection_lost()
    events = connect(inbox, hello(5), event(2), event(3), event(4), {"type": "synced", "cursor": 5}, event(5))
    assert delivered(events) == [4, 5]
    assert kinds(events)[-2:] == ["Synced", "Event"]


def test_an_event_without_a_cursor_is_a_notice_never_delivered() -> None:
    inbox = InboxProtocol()
    connect(inbox, hello(0))
    events = feed(inbox, {"type": "event", "event": "x", "data": {}}, {"type": "event", "cursor": 3})
    assert kinds(events) == ["Notice", "Notice"]
    assert inbox.position == 0


def test_ephemeral_frames_are_notices() -> None:
    inbox = InboxProtocol(device_id="d")
    connect(inbox, hello(0))
    frames = [{"type": "typing", "conversation_id": "c"}, {"type": "presence", "online": []},
              {"type": "device.online", "device_id": "x"}, {"type": "error", "code": "X", "message": "m"}]
    events = feed(inbox, *frames)
    assert [e.frame for e in events if isinstance(e, Notice)] == frames


# -- /ws: acks ---------------------------------------------------------------------------------------


def test_acks_are_cumulative_and_coalesced_by_delay() -> None:
    inbox = InboxProtocol(device_id="d", ack_delay=0.2, ack_batch=100)
    connect(inbox, hello(0))
    feed(inbox, event(1), event(2), event(3))
    inbox.mark_processed(1, now=10.0)
    inbox.mark_processed(2, now=10.05)
    assert inbox.frames_to_send() == []
    assert inbox.next_deadline() == pytest.approx(10.2)
    inbox.on_timer(10.1)
    assert inbox.frames_to_send() == []
    inbox.mark_processed(3, now=10.15)
    inbox.on_timer(10.2)
    assert inbox.take_checkpoint() == 3  # saved before the ack goes out
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 3}]  # one ack, the highest
    assert inbox.next_deadline() is None
    inbox.on_timer(99.0)
    assert inbox.frames_to_send() == [] and inbox.take_checkpoint() is None


def test_acks_are_sent_at_once_after_ack_batch_events() -> None:
    inbox = InboxProtocol(device_id="d", ack_delay=60.0, ack_batch=3)
    connect(inbox, hello(0))
    feed(inbox, *[event(i) for i in range(1, 8)])
    for cursor in range(1, 8):
        inbox.mark_processed(cursor, now=0.0)
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 3}, {"type": "ack", "cursor": 6}]
    inbox.flush()  # a clean close acks the rest
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 7}]


def test_processing_an_older_cursor_again_changes_nothing() -> None:
    inbox = InboxProtocol(device_id="d", ack_batch=1)
    connect(inbox, hello(0))
    feed(inbox, event(5))
    inbox.mark_processed(5, now=0)
    inbox.mark_processed(4, now=0)
    inbox.mark_processed(5, now=0)
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 5}]


def test_a_resent_event_already_acked_is_acked_again() -> None:
    """The server re-sends from acked + 1 after ACK_TIMEOUT when our ack was lost."""
    inbox = InboxProtocol(device_id="d", ack_batch=1)
    connect(inbox, hello(0))
    feed(inbox, event(1), event(2))
    inbox.mark_processed(2, now=0)
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 2}]
    assert delivered(feed(inbox, event(1), event(2))) == []
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 2}]  # once for the run of re-sends
    feed(inbox, event(1), event(2))  # still the same run
    assert inbox.frames_to_send() == []
    feed(inbox, event(3), event(2))  # a new run
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 2}]


def test_progress_made_while_disconnected_is_checkpointed_and_acked_on_the_next_hello() -> None:
    inbox = InboxProtocol(device_id="d", ack_delay=0.2)
    connect(inbox, hello(0))
    feed(inbox, event(1), event(2))
    inbox.connection_lost()
    inbox.mark_processed(2, now=1.0)
    inbox.on_timer(2.0)
    assert inbox.take_checkpoint() == 2
    assert inbox.frames_to_send() == []
    connect(inbox, hello(2))
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 2}]


def test_a_stored_cursor_is_acked_on_hello_and_dedupes_from_the_start() -> None:
    inbox = InboxProtocol(cursor=40, device_id="d")
    events = connect(inbox, hello(50), event(39), event(40), event(41))
    assert delivered(events) == [41]
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 40}]


# -- /ws: sync ------------------------------------------------------------------------------------


def test_a_session_without_device_id_starts_at_hello_and_syncs_from_its_cursor_after_reconnect() -> None:
    session = InboxProtocol()  # no device_id: the server tracks nothing for us
    connect(session, hello(10))
    assert session.frames_to_send() == []  # nothing missed yet: live from hello's head
    feed(session, event(11), event(12))
    session.connection_lost()
    connect(session, hello(20))
    # 11 and 12 were handed out but not processed: the server takes a sync cursor as acked, so
    # the sync starts where the client started; the replayed 11 and 12 are dropped as dupes.
    assert session.frames_to_send() == [{"type": "sync", "cursor": 10}]
    events = feed(session, event(11), event(12), event(13), event(18), {"type": "synced", "cursor": 20},
                  event(21))
    assert delivered(events) == [13, 18, 21]
    session.mark_processed(18, now=0.0)
    session.flush()
    assert session.take_checkpoint() == 18
    session.frames_to_send()
    session.connection_lost()
    connect(session, hello(30))
    assert session.frames_to_send() == [{"type": "sync", "cursor": 18}, {"type": "ack", "cursor": 18}]


def test_a_session_that_saw_no_event_syncs_from_where_it_started() -> None:
    session = InboxProtocol()
    connect(session, hello(10))
    session.connection_lost()
    connect(session, hello(15))
    assert session.frames_to_send() == [{"type": "sync", "cursor": 10}]


def test_a_session_with_a_stored_cursor_syncs_on_its_first_connection() -> None:
    session = InboxProtocol(cursor=3)
    connect(session, hello(9))
    assert session.frames_to_send() == [{"type": "sync", "cursor": 3}, {"type": "ack", "cursor": 3}]


def test_sync_order_on_hello_filter_then_sync_then_requests() -> None:
    session = InboxProtocol(cursor=3, filter=["task.*"])
    session.connection_made()
    rid = session.request("message.send", {"conversation_id": "c"})
    feed(session, hello(9))
    assert session.frames_to_send() == [
        {"type": "message.send", "conversation_id": "c", "request_id": rid},
        {"type": "filter", "events": ["task.*"]},
        {"type": "sync", "cursor": 3},
        {"type": "ack", "cursor": 3},
    ]


def test_a_device_does_not_sync_on_connect_unless_asked() -> None:
    device = InboxProtocol(cursor=3, device_id="d")
    connect(device, hello(9))
    assert {"type": "sync", "cursor": 3} not in device.frames_to_send()
    forced = InboxProtocol(cursor=3, device_id="d", sync_on_connect=True)
    connect(forced, hello(9))
    assert {"type": "sync", "cursor": 3} in forced.frames_to_send()
    forced.sync(1)
    assert forced.frames_to_send() == [{"type": "sync", "cursor": 1}]


def test_synced_is_reported_with_the_head() -> None:
    inbox = InboxProtocol(device_id="d")
    events = connect(inbox, hello(3), event(2), event(3), {"type": "synced", "cursor": 3})
    assert events[-1] == Synced(3)


def test_a_head_behind_what_was_seen_means_the_server_lost_history() -> None:
    inbox = InboxProtocol(device_id="d")
    connect(inbox, hello(0))
    feed(inbox, event(50))
    inbox.connection_lost()
    events = connect(inbox, hello(2))
    assert kinds(events) == ["Hello", "Reset"]
    assert events[1].reason == "sequence_regressed" and events[1].cursor == 2
    assert inbox.take_checkpoint() == 2
    assert delivered(feed(inbox, event(3))) == [3]  # not dropped as "older than 50"
    events = feed(inbox, {"type": "synced", "cursor": 1})
    assert kinds(events) == ["Reset", "Synced"]


# -- /ws: reset ---------------------------------------------------------------------------------------


def test_reset_is_handed_out_in_stream_order() -> None:
    inbox = InboxProtocol(device_id="d", ack_batch=1)
    connect(inbox, hello(0))
    events = feed(inbox, event(1), {"type": "reset"}, event(9))
    assert kinds(events) == ["Event", "Reset", "Event"]
    assert events[1].reason is None and events[1].cursor is None
    inbox.reset_done(events[1], now=0)
    assert inbox.frames_to_send() == []  # no cursor in the reset: nothing new to ack


def test_a_reset_with_a_cursor_continues_from_it() -> None:
    inbox = InboxProtocol(cursor=5, device_id="d", ack_batch=1)
    connect(inbox, hello(100))
    inbox.frames_to_send()
    events = feed(inbox, {"type": "reset", "cursor": 100}, event(100), event(101))
    assert kinds(events) == ["Reset", "Event"] and delivered(events) == [101]
    inbox.reset_done(events[0], now=0)
    assert inbox.take_checkpoint() == 100
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 100}]


# -- /ws: filter ------------------------------------------------------------------------------------


def test_the_filter_is_sent_on_every_connection_and_applied_locally() -> None:
    inbox = InboxProtocol(device_id="d", filter=["task.*", "publish"], ack_batch=1)
    connect(inbox, hello(0))
    assert inbox.frames_to_send() == [{"type": "filter", "events": ["task.*", "publish"]}]
    events = feed(inbox, event(1, "message.new"), event(2, "task.assigned"), event(3, "publish"),
                  event(4, "taskforce"))
    assert [(e.cursor, e.event) for e in events] == [(2, "task.assigned"), (3, "publish")]
    inbox.mark_processed(3, now=0)
    assert inbox.frames_to_send() == [{"type": "ack", "cursor": 3}]  # covers the skipped 1
    assert inbox.position == 4  # 4 was seen (and skipped): a replay of it is a dupe
    inbox.connection_lost()
    connect(inbox, hello(4))
    assert {"type": "filter", "events": ["task.*", "publish"]} in inbox.frames_to_send()
    inbox.set_filter(None)
    assert inbox.frames_to_send() == []
    assert delivered(feed(inbox, event(5, "message.new"))) == [5]
    inbox.set_filter(["*"])
    assert inbox.frames_to_send() == [{"type": "filter", "events": ["*"]}]


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("task.*", "task.created", True), ("task.*", "task", False), ("task.*", "tasks.x", False),
    ("publish", "publish", True), ("publish", "publish.x", False), ("*", "anything", True),
])
def test_filter_patterns(pattern: str, name: str, expected: bool) -> None:
    assert core.matches([pattern], name) is expected


# -- /ws: requests -------------------------------------------------------------------------------------


def test_replies_out_of_order_settle_their_own_requests() -> None:
    inbox = InboxProtocol(device_id="d")
    connect(inbox, hello(0))
    r1 = inbox.request("message.send", {"conversation_id": "a", "body": {"kind": "text", "text": "1"}})
    r2 = inbox.request("message.send", {"conversation_id": "b", "body": {"kind": "text", "text": "2"}})
    r3 = inbox.request("ping")
    assert r1 != r2 != r3
    assert [f["request_id"] for f in inbox.frames_to_send()] == [r1, r2, r3]
    events = feed(
        inbox,
        {"type": "pong", "request_id": r3},
        {"type": "reply", "request_id": r2, "ok": False, "error": {"code": "MUTED", "message": "muted"}},
        {"type": "reply", "request_id": r1, "ok": True, "data": {"message_id": "m", "seq": 88}},
        {"type": "reply", "request_id": r1, "ok": True, "data": {"again": True}},  # answers nothing now
    )
    assert isinstance(events[0], Settled) and events[0].result == {"type": "pong", "request_id": r3}
    assert isinstance(events[1].error, RequestError)
    assert (events[1].request_id, events[1].error.code, events[1].error.message) == (r2, "MUTED", "muted")
    assert events[2] == Settled(r1, result={"message_id": "m", "seq": 88})
    assert isinstance(events[3], Notice)
    assert inbox.pending_requests() == []


def test_an_error_frame_naming_a_request_settles_it() -> None:
    inbox = InboxProtocol(device_id="d")
    connect(inbox, hello(0))
    rid = inbox.request("message.send", {})
    events = feed(inbox, {"type": "error", "code": "VALIDATION_ERROR", "message": "unknown type",
                          "request_id": rid}, {"type": "reply", "request_id": "r-x", "ok": False})
    assert isinstance(events[0], Settled) and isinstance(events[0].error, RequestError)
    assert events[0].error.code == "VALIDATION_ERROR"
    assert isinstance(events[1], Notice)  # a reply to a request we do not have
    rid = inbox.request("x", {})
    events = feed(inbox, {"type": "reply", "request_id": rid, "ok": False})
    assert events[0].error.code == "UNKNOWN_ERROR"


def test_requests_are_resent_with_the_same_id_after_a_reconnect() -> None:
    inbox = InboxProtocol(device_id="d")
    connect(inbox, hello(0))
    rid = inbox.request("message.send", {"conversation_id": "c"})
    first = inbox.frames_to_send()
    refresh = inbox.request("refresh", {"token": "t"}, resend=False)
    inbox.frames_to_send()
    inbox.connection_lost()
    events = inbox.events_received()
    assert len(events) == 1 and events[0].request_id == refresh
    assert isinstance(events[0].error, ConnectionLost)
    connect(inbox, hello(0))
    assert inbox.frames_to_send() == first  # same frame, same request_id
    assert feed(inbox, {"type": "reply", "request_id": rid, "ok": True, "data": {}})[0] == Settled(rid, result={})


def test_a_cancelled_request_is_not_resent_and_its_late_answer_is_a_notice() -> None:
    inbox = InboxProtocol(device_id="d")
    connect(inbox, hello(0))
    rid = inbox.request("ping")
    inbox.cancel(rid)
    inbox.connection_lost()
    connect(inbox, hello(0))
    assert inbox.frames_to_send() == []
    assert kinds(feed(inbox, {"type": "pong", "request_id": rid})) == ["Notice"]


def test_refreshed_answers_its_refresh_request() -> None:
    inbox = InboxProtocol(device_id="d")
    connect(inbox, hello(0))
    rid = inbox.request("refresh", {"token": "new"}, resend=False)
    assert inbox.frames_to_send() == [{"token": "new", "type": "refresh", "request_id": rid}]
    events = feed(inbox, {"type": "refreshed", "exp": 123, "request_id": rid})
    assert events == [Settled(rid, result={"type": "refreshed", "exp": 123, "request_id": rid})]
    assert kinds(feed(inbox, {"type": "refreshed", "exp": 1})) == ["Notice"]


# -- book relay -----------------------------------------------------------------------------------


def presence(*online: str) -> dict[str, Any]:
    return {"type": "presence", "online": list(online)}


def op(seq: int, payload: bytes = b"x", device: str = "other") -> dict[str, Any]:
    return {"type": "crdt_operation", "payload": base64.b64encode(payload).decode(), "timestamp": 1,
            "device_id": device, "relay_timestamp": 2, "seq": seq}


def seqs(events: list[Any]) -> list[int]:
    return [e.seq for e in events if isinstance(e, Op)]


def test_ops_are_sent_with_ids_after_presence_and_settled_by_their_ack() -> None:
    book = BookProtocol()
    book.connection_made()
    a = book.send_op(b"one", timestamp=1)
    assert book.send_op(b"two", op_id="mine", timestamp=2) == "mine"
    assert book.frames_to_send() == []  # before the first frame: wait
    events = feed(book, presence("me", "other"))
    assert kinds(events) == ["Notice"] and book.online == ["me", "other"]
    assert book.frames_to_send() == [
        {"type": "crdt_operation", "id": a, "payload": b"one", "timestamp": 1},
        {"type": "crdt_operation", "id": "mine", "payload": b"two", "timestamp": 2},
    ]
    assert a.startswith("op-")
    events = feed(book, {"type": "ack", "id": "mine", "seq": 8}, {"type": "ack", "id": a, "seq": 7},
                  {"type": "ack", "id": a, "seq": 7}, {"type": "ack", "id": None, "seq": 9})
    assert events[:2] == [Settled("mine", result=8), Settled(a, result=7)]
    assert kinds(events[2:]) == ["Notice", "Notice"]
    assert book.pending_ops() == []
    with pytest.raises(ValueError):
        book.send_op(b"", timestamp=1)


def test_received_ops_are_deduped_by_seq_and_decoded() -> None:
    book = BookProtocol()
    connect(book, presence("me"))
    events = feed(book, op(3, b"a"), op(5, b"b"), op(5, b"b"), op(4, b"late"), op(9, b"c"),
                  {"type": "synced", "seq": 9})
    assert seqs(events) == [3, 5, 9]
    first = events[0]
    assert isinstance(first, Op)
    assert (first.payload, first.device_id, first.timestamp, first.relay_timestamp) == (b"a", "other", 1, 2)
    assert events[-1] == Synced(9)
    assert book.since == 9
    raw = feed(book, {**op(10), "payload": b"\x00raw"}, {**op(11), "payload": "not base64!"},
               {**op(12), "seq": "12"})
    assert seqs(raw) == [10] and raw[0].payload == b"\x00raw"
    assert kinds(raw) == ["Op", "Notice", "Notice"]


def test_unacked_ops_are_resent_with_the_same_id_after_a_reconnect() -> None:
    book = BookProtocol()
    connect(book, presence("me"))
    a = book.send_op(b"one", timestamp=1)
    b = book.send_op(b"two", timestamp=1)
    sent = book.frames_to_send()
    feed(book, {"type": "ack", "id": a, "seq": 1})
    book.connection_lost()
    assert book.pending_ops() == [b]
    c = book.send_op(b"three", timestamp=1)  # queued while offline
    connect(book, presence("me"))
    assert book.frames_to_send() == [sent[1], {"type": "crdt_operation", "id": c, "payload": b"three",
                                               "timestamp": 1}]
    # The server acknowledges the re-sent id with its first seq.
    assert feed(book, {"type": "ack", "id": b, "seq": 2}) == [Settled(b, result=2)]


def test_at_most_max_in_flight_ops_wait_for_their_ack() -> None:
    book = BookProtocol(max_in_flight=2)
    connect(book, presence())
    ids = [book.send_op(bytes([i + 1]), timestamp=1) for i in range(5)]
    assert [f["id"] for f in book.frames_to_send()] == ids[:2]
    feed(book, {"type": "ack", "id": ids[0], "seq": 1})
    assert [f["id"] for f in book.frames_to_send()] == ids[2:3]
    book.connection_lost()
    connect(book, presence())
    assert [f["id"] for f in book.frames_to_send()] == ids[1:3]


def test_a_transient_op_error_is_retried_and_a_permanent_one_rejects_the_op() -> None:
    book = BookProtocol(retry_delay=0.5)
    connect(book, presence())
    a = book.send_op(b"a", timestamp=1)
    b = book.send_op(b"b", timestamp=1)
    book.frames_to_send()
    events = feed(book, {"type": "error", "id": a, "code": "SERVICE_UNAVAILABLE", "message": "re-send"},
                  {"type": "error", "id": b, "code": "VALIDATION_ERROR", "message": "bad"}, now=10.0)
    assert len(events) == 1 and isinstance(events[0].error, OpRejected)
    assert (events[0].request_id, events[0].error.code) == (b, "VALIDATION_ERROR")
    assert book.frames_to_send() == []
    assert book.next_deadline() == pytest.approx(10.5)
    book.on_timer(10.2)
    assert book.frames_to_send() == []
    book.on_timer(10.5)
    assert [f["id"] for f in book.frames_to_send()] == [a]
    feed(book, {"type": "error", "id": a, "code": "RATE_LIMIT_EXCEEDED", "message": "slow"}, now=11.0)
    assert book.next_deadline() == pytest.approx(12.0)  # doubled
    events = feed(book, {"type": "error", "id": None, "code": "VALIDATION_ERROR", "message": "?"})
    assert kinds(events) == ["Notice"]


def test_own_ops_replayed_are_dropped_by_their_acked_seq() -> None:
    book = BookProtocol(seq=10)
    connect(book, presence())
    mine = book.send_op(b"mine", timestamp=1)
    book.frames_to_send()
    feed(book, {"type": "ack", "id": mine, "seq": 12})
    book.connection_lost()
    assert book.since == 10  # our own seq says nothing about others' ops below it
    events = connect(book, presence(), op(11), op(12, b"mine", device="me"), op(13))
    assert seqs(events) == [11, 13]


def test_synced_below_what_was_seen_resets_and_keeps_working() -> None:
    book = BookProtocol()
    connect(book, presence(), op(41))
    book.connection_lost()
    events = connect(book, presence(), {"type": "synced", "seq": 0})  # a restarted in-memory sequence
    assert kinds(events) == ["Notice", "Reset", "Synced"]
    assert events[1].reason == "sequence_regressed" and events[1].seq == 0
    assert book.take_checkpoint() == 0
    assert seqs(feed(book, op(1))) == [1]


def test_reset_without_snapshot_continues_live_from_the_head() -> None:
    book = BookProtocol(seq=3)
    events = connect(book, presence(), {"type": "reset", "reason": "history_truncated", "seq": 50}, op(50), op(51))
    reset = events[1]
    assert isinstance(reset, Reset)
    assert (reset.reason, reset.seq, reset.snapshot_seq) == ("history_truncated", 50, None)
    assert seqs(events) == [51]
    assert book.reset_done(reset, None, now=0) is False
    book.flush()
    assert book.take_checkpoint() == 50


def test_reset_with_a_snapshot_catches_up_from_its_seq_once() -> None:
    book = BookProtocol(seq=3, checkpoint_batch=1)
    events = connect(book, presence(), {"type": "reset", "reason": "history_truncated", "seq": 50,
                                        "snapshot_seq": 40}, op(51))
    reset = events[1]
    assert reset.snapshot_seq == 40 and seqs(events) == [51]
    # The handler loaded the snapshot (state up to 40): reconnect with ?since=40.
    assert book.reset_done(reset, 40, now=0) is True
    assert book.since == 40
    assert book.take_checkpoint() == 40  # never persist past what the state covers
    book.connection_lost()
    events = connect(book, presence(), op(41), op(45), op(45), op(50), op(51), op(52),
                     {"type": "synced", "seq": 52})
    assert seqs(events) == [41, 45, 50, 52]
    assert book.since == 52


# -- close codes and refusals ------------------------------------------------------------------------


def policy(seed: int = 1) -> ReconnectPolicy:
    return ReconnectPolicy(base=0.5, cap=8.0, rate_limited_s=5.0, rng=random.Random(seed))


def test_a_normal_close_ends_the_session() -> None:
    assert policy().after_close(1000).action == "stop"


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 1013, 4008, None, 1005, 4999, 1014])
def test_transient_closes_reconnect_with_backoff(code: int | None) -> None:
    decision = policy().after_close(code)
    assert decision.action == "reconnect" and 0.25 <= decision.delay <= 0.5


@pytest.mark.parametrize("code", [1008, 4003, 1002, 1003, 1007, 1009, 1010])
def test_terminal_closes_fail_with_the_code(code: int) -> None:
    decision = policy().after_close(code, "why")
    assert decision.action == "fail" and isinstance(decision.error, ConnectionTerminated)
    assert (decision.error.code, decision.error.reason) == (code, "why")


def test_token_expired_reconnects_at_once_without_growing_the_backoff() -> None:
    p = policy()
    for _ in range(5):
        decision = p.after_close(4001)
        assert decision.action == "reconnect" and decision.delay <= 0.5
    assert p.attempt == 0


def test_rate_limited_backs_off_longer() -> None:
    decision = policy().after_close(4029)
    assert decision.action == "reconnect" and decision.delay >= 5.0


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets_after_a_connection() -> None:
    p = policy(seed=7)
    delays = [p.after_close(1006).delay for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    p.connected()
    assert p.after_error().delay <= 0.5


def test_refused_upgrades() -> None:
    p = policy()
    for status, code in [(401, "INVALID_TOKEN"), (403, "FORBIDDEN"), (404, "NOT_FOUND"), (400, "VALIDATION_ERROR")]:
        decision = p.after_refusal(status, code, "no")
        assert decision.action == "fail" and isinstance(decision.error, HandshakeRejected)
        assert (decision.error.status, decision.error.code, decision.error.message) == (status, code, "no")
    # An expired token once: the getter gets one more chance; twice in a row: give up.
    assert p.after_refusal(401, "TOKEN_EXPIRED").action == "reconnect"
    assert p.after_refusal(401, "TOKEN_EXPIRED").action == "fail"
    p.connected()
    assert p.after_refusal(401, "TOKEN_EXPIRED").action == "reconnect"
    decision = p.after_refusal(429, "RATE_LIMIT_EXCEEDED", retry_after=120)
    assert decision.action == "reconnect" and decision.delay >= 120
    assert p.after_refusal(503, "SERVICE_UNAVAILABLE", retry_after=1).delay >= 1
    assert p.after_refusal(502).action == "reconnect"
    assert "HTTP 403 FORBIDDEN: nope" in str(HandshakeRejected(403, "FORBIDDEN", "nope"))


# -- encoding and credentials -----------------------------------------------------------------------


def test_json_frames_carry_payloads_as_base64_and_msgpack_as_raw_bytes() -> None:
    frame = {"type": "crdt_operation", "id": "o", "payload": b"\x00\xff", "timestamp": 1}
    text = JSON.encode(frame)
    assert isinstance(text, str) and json.loads(text)["payload"] == "AP8="
    assert frame["payload"] == b"\x00\xff"  # the caller's frame is not changed
    binary = MSGPACK.encode(frame)
    assert isinstance(binary, bytes) and msgpack.unpackb(binary, raw=False) == frame
    assert JSON.decode('{"type": "pong"}') == {"type": "pong"}
    assert MSGPACK.decode(msgpack.packb({"type": "x", "payload": b"\x01"})) == {"type": "x", "payload": b"\x01"}
    for bad in ("not json", "[1]", '{"type": 3}', "{}"):
        with pytest.raises(FrameError):
            JSON.decode(bad)
    with pytest.raises(FrameError):
        MSGPACK.decode(b"\xc1")
    assert core.codec_for("switchboard.v1.msgpack") is MSGPACK and core.codec_for(None) is JSON


KEY = "k" * 32


def test_token_expiry_is_read_from_jwts_only() -> None:
    token = jwt.encode({"sub": "u", "iat": 1000, "exp": 1900}, KEY, algorithm="HS256")
    assert core.token_expiry(token) == 1900
    assert core.token_expiry("sbt_opaque") is None
    assert core.token_expiry("a.b.c") is None
    assert core.token_expiry(jwt.encode({"sub": "u"}, KEY, algorithm="HS256")) is None
    # A quarter of the lifetime before exp, between 0.5 s and 60 s.
    assert core.refresh_at(token, now=1000) == 1900 - 60
    short = jwt.encode({"iat": 1000, "exp": 1002}, KEY, algorithm="HS256")
    assert core.refresh_at(short, now=1000) == 1001.5
    assert core.refresh_at(short, now=1001.8) == 1001.8  # already due
    assert core.refresh_at(token, now=1000, margin_s=10) == 1890
    assert core.refresh_at("sbt_opaque", now=0) is None


def test_the_core_is_sans_io() -> None:
    """relay/client/core.py imports no event loop, socket or clock (checked on its source)."""
    tree = ast.parse(Path(core.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0] if not node.module.startswith("relay.") else node.module)
    assert not imported & {"asyncio", "socket", "time", "websockets", "threading", "selectors"}, imported
    assert imported <= {"__future__", "base64", "binascii", "json", "random", "secrets", "collections",
                        "dataclasses", "typing", "msgpack", "relay.client.errors"}, imported


def test_importing_the_sdk_does_not_load_the_server() -> None:
    import subprocess
    import sys

    code = "import sys, relay.client; print(sorted(m for m in ('relay.server', 'aiohttp', 'asyncpg') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout

"""Durable delivery on ``/ws`` end to end (realtime.md "User/device socket", guarantees 1-2),
with real users, API tokens, POST /publish and sockets, on SQLite and on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.inbox_helpers import Account, Device


async def test_three_devices_one_offline_all_end_with_every_event_in_order(node: Any) -> None:
    server, api, ws = node
    ada: Account = await api.account("ada@example.com")
    phone = await Device.open(ws, ada.token, "phone")
    laptop = await Device.open(ws, ada.token, "laptop")
    tablet = await Device.open(ws, ada.token, "tablet")  # registered, then offline
    await tablet.until(lambda d: any(f["type"] == "synced" for f in d.others))
    await tablet.close()

    n = 1000
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> int:
        async with sem:
            return int((await api.publish(ada.token, {"i": i}))["cursor"])

    cursors = await asyncio.gather(*(one(i) for i in range(1, n + 1)))
    assert sorted(cursors) == list(range(1, n + 1))  # one inbox, no gap
    order = [i for _, i in sorted(zip(cursors, range(1, n + 1), strict=True))]  # the inbox's order

    tablet = await Device.open(ws, ada.token, "tablet")
    assert tablet.hello["cursor"] == n
    for device in (phone, laptop, tablet):
        await device.until(lambda d: d.processed == n, timeout=30)
    await tablet.until(lambda d: {"type": "synced", "cursor": n} in d.others)
    for device in (phone, laptop, tablet):
        got = device.unique()
        assert [e["cursor"] for e in got] == list(range(1, n + 1)), device.device_id
        assert [d["i"] for d in device.data()] == order
        assert all(e["event"] == "publish" and e["data"]["publisher"]["token_id"] == ada.token_id for e in got)
        await device.close()


async def test_a_device_that_never_acks_gets_re_sends_with_growing_intervals(node: Any) -> None:
    server, api, ws = node
    bob = await api.account("bob@example.com")
    silent = await Device.open(ws, bob.token, "silent", auto_ack=False)
    acking = await Device.open(ws, bob.token, "acking")
    await api.publish(bob.token, {"hello": 1})
    await silent.until(lambda d: len(d.events) == 5, timeout=15)  # the delivery and four re-sends
    assert all(e["cursor"] == 1 for e in silent.events)
    gaps = [b - a for a, b in zip(silent.arrived, silent.arrived[1:], strict=False)]
    # ACK_TIMEOUT 0.2 s doubling to 1.6 s: about 0.2, 0.4, 0.8, 1.6 s. Each wait is longer than
    # the one before (a loaded machine stretches waits, it cannot shorten them below the timer).
    assert all(b > a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[0] >= 0.15 and gaps[-1] >= 1.5, gaps
    assert [e["cursor"] for e in acking.events] == [1]  # it acked: never re-sent
    # The silent one acks at last: the re-sends stop.
    await silent.send({"type": "ack", "cursor": 1})
    count = len(silent.events)
    await asyncio.sleep(2.0)
    assert len(silent.events) == count
    await silent.close()
    await acking.close()


async def test_reconnecting_device_resumes_after_its_ack_and_new_device_starts_at_head(node: Any) -> None:
    server, api, ws = node
    cy = await api.account("cy@example.com")
    phone = await Device.open(ws, cy.token, "phone", auto_ack=False)
    for i in range(10):
        await api.publish(cy.token, i)
    await phone.until(lambda d: d.processed == 10)
    await phone.send({"type": "ack", "cursor": 6})
    await asyncio.sleep(0.3)  # > INBOX_ACK_FLUSH_S: the ack is in the store
    await phone.close()
    again = await Device.open(ws, cy.token, "phone")
    assert again.hello["cursor"] == 10
    await again.until(lambda d: {"type": "synced", "cursor": 10} in d.others)
    assert [e["cursor"] for e in again.events] == [7, 8, 9, 10]  # first what it missed, in order
    fresh = await Device.open(ws, cy.token, "brand-new")
    await fresh.until(lambda d: {"type": "synced", "cursor": 10} in d.others)
    await api.publish(cy.token, "live")
    await fresh.until(lambda d: d.processed == 11)
    assert [e["cursor"] for e in fresh.events] == [11]  # a new device starts after hello's cursor
    await again.until(lambda d: d.processed == 11)
    await again.close()
    await fresh.close()


async def test_sync_replays_after_the_cursor_and_answers_synced(node: Any) -> None:
    server, api, ws = node
    di = await api.account("di@example.com")
    for i in range(5):
        await api.publish(di.token, i)
    d = await Device.open(ws, di.token, None)  # a session of its own: live from hello's cursor
    await d.until(lambda x: {"type": "synced", "cursor": 5} in x.others)
    assert d.events == []
    await d.send({"type": "sync", "cursor": 2})
    await d.until(lambda x: x.others.count({"type": "synced", "cursor": 5}) == 2)
    assert [e["cursor"] for e in d.events] == [3, 4, 5]
    await d.send({"type": "sync", "cursor": 5})
    await d.until(lambda x: x.others.count({"type": "synced", "cursor": 5}) == 3)
    assert len(d.events) == 3
    for bad in ({"type": "sync"}, {"type": "sync", "cursor": -1}, {"type": "ack", "cursor": "7"},
                {"type": "ack", "cursor": True}):
        await d.send(bad)
        await d.until(lambda x, b=bad: any(f["type"] == "error" for f in x.others[-1:]))
        assert d.others[-1]["code"] == "VALIDATION_ERROR"
    await d.send({"type": "ping"})
    await d.until(lambda x: x.others[-1] == {"type": "pong"})  # the socket stayed open
    await d.close()


async def test_live_events_published_during_a_catch_up_follow_it_in_order(node: Any) -> None:
    server, api, ws = node
    ed = await api.account("ed@example.com")
    first = await Device.open(ws, ed.token, "slowpoke")
    await first.close()
    for i in range(300):
        await api.publish(ed.token, i)
    catching_up = asyncio.ensure_future(Device.open(ws, ed.token, "slowpoke"))
    more = asyncio.ensure_future(asyncio.gather(*(api.publish(ed.token, 300 + i) for i in range(100))))
    device = await catching_up
    await more
    await device.until(lambda d: d.processed == 400, timeout=20)
    cursors = [e["cursor"] for e in device.events]
    assert cursors == sorted(cursors) and cursors == list(range(1, 401))  # never interleaved
    await device.close()


async def test_filters_targets_and_ttl(node: Any) -> None:
    server, api, ws = node
    fi = await api.account("fi@example.com")
    tasks_only = await Device.open(ws, fi.token, "daemon-ish")
    everything = await Device.open(ws, fi.token, "laptop")
    await tasks_only.send({"type": "filter", "events": ["task.*"], "request_id": "f1"})
    await tasks_only.until(lambda d: any(f.get("request_id") == "f1" for f in d.others))
    assert tasks_only.others[-1] == {"type": "reply", "request_id": "f1", "ok": True, "data": {"events": ["task.*"]}}
    await api.publish(fi.token, "to everyone")  # a publish event: outside the filter
    await api.publish(fi.token, "to the laptop", target={"device_id": "laptop"})
    await api.publish(fi.token, "expired", ttl_s=1)
    await everything.until(lambda d: d.processed >= 2)
    assert everything.data()[:2] == ["to everyone", "to the laptop"]
    assert tasks_only.events == []
    await asyncio.sleep(1.1)  # past ttl_s: a device connecting now never sees the third
    late = await Device.open(ws, fi.token, "late-tablet")
    await late.until(lambda d: any(f["type"] == "synced" for f in d.others))
    assert late.events == []
    # The filter belongs to the device: it holds on the next connection too.
    await tasks_only.close()
    again = await Device.open(ws, fi.token, "daemon-ish")
    await again.until(lambda d: any(f["type"] == "synced" for f in d.others))
    assert again.events == []
    bad = [{"type": "filter", "events": []}, {"type": "filter", "events": ["Bad!"]}, {"type": "filter", "events": "x"}]
    for frame in bad:
        await again.send(frame)
        await again.until(lambda d: d.others[-1]["type"] == "error")
        assert again.others[-1]["code"] == "VALIDATION_ERROR"
    for d in (everything, late, again):
        await d.close()


async def test_a_device_back_after_the_retention_gets_reset(node: Any) -> None:
    server, api, ws = node
    gu = await api.account("gu@example.com")
    old = await Device.open(ws, gu.token, "old-phone")
    await old.close()
    for i in range(3):
        await api.publish(gu.token, i)
    db = server.services.db
    # The device was last seen 31 days ago; what it needed has been pruned.
    await db.execute("UPDATE inbox_devices SET last_seen_at = last_seen_at - $1 WHERE device_id = $2",
                     31 * 86_400_000, "old-phone")
    back = await Device.open(ws, gu.token, "old-phone")
    await back.until(lambda d: {"type": "synced", "cursor": 3} in d.others)
    assert back.others[0] == {"type": "reset", "cursor": 3} and back.events == []
    await api.publish(gu.token, "after the reset")
    await back.until(lambda d: d.processed == 4)
    # A sync from before the retained history: reset too.
    await db.execute("DELETE FROM inbox_entries WHERE user_id = $1 AND seq <= 2", gu.user_id)
    await back.send({"type": "sync", "cursor": 0})
    await back.until(lambda d: d.others.count({"type": "synced", "cursor": 4}) == 1)
    assert {"type": "reset", "cursor": 4} in back.others
    await back.close()


async def test_two_sockets_of_one_device_and_an_idempotent_publish(node: Any) -> None:
    server, api, ws = node
    hy = await api.account("hy@example.com")
    a = await Device.open(ws, hy.token, "phone")
    b = await Device.open(ws, hy.token, "phone")
    first = await api.publish(hy.token, "once", idempotency_key="k-1")
    again = await api.publish(hy.token, "once", idempotency_key="k-1")
    assert again == first and first["online_devices"] == 1  # two sockets, one device
    other = await api.publish(hy.token, "twice", idempotency_key="k-2")
    assert other["cursor"] == first["cursor"] + 1
    for d in (a, b):
        await d.until(lambda x: x.processed == 2)
        assert d.data() == ["once", "twice"]
        await d.close()

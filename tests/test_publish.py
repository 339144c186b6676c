"""POST /publish, GET /publish/messages, GET /publish/stats (rest.md "Publish") over a real socket,
on SQLite and on PostgreSQL + Redis: scopes, targets, limits, history, statistics."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp

from tests.inbox_helpers import Api, Device


async def test_publish_validates_its_input_and_scopes(node: Any) -> None:
    server, api, ws = node
    ada = await api.account("ada@example.com")
    sub_only = await api.ok("POST", "/tokens", ada.jwt, json={"name": "s", "scopes": ["subscribe"]}, status=201)
    await api.fails("POST", "/publish", 401, "INVALID_TOKEN", None, json={"type": "x", "data": 1})
    error = await api.fails("POST", "/publish", 403, "FORBIDDEN", sub_only["token"], json={"type": "x", "data": 1})
    assert error["details"] == {"scope": "publish"}
    cases: list[tuple[Any, str]] = [
        ({"data": 1}, "type"),
        ({"type": "", "data": 1}, "type"),
        ({"type": "has space", "data": 1}, "type"),
        ({"type": "x" * 65, "data": 1}, "type"),
        ({"type": "x"}, "data"),
        ({"type": "x", "data": 1, "target": "bob"}, "target"),
        ({"type": "x", "data": 1, "target": {"device_id": "no/slash"}}, "target.device_id"),
        ({"type": "x", "data": 1, "ttl_s": 0}, "ttl_s"),
        ({"type": "x", "data": 1, "ttl_s": "60"}, "ttl_s"),
        ({"type": "x", "data": 1, "idempotency_key": ""}, "idempotency_key"),
    ]
    for body, field in cases:
        error = await api.fails("POST", "/publish", 400, "VALIDATION_ERROR", ada.token, json=body)
        assert error["details"]["field"] == field, (body, error)
    error = await api.fails("POST", "/publish", 413, "PAYLOAD_TOO_LARGE", ada.token,
                            json={"type": "x", "data": "y" * 70_000})
    assert error["details"]["limit"] == 65536
    await api.fails("POST", "/publish", 400, "VALIDATION_ERROR", ada.token, data=b"{not json",
                    headers={"Content-Type": "application/json"})
    # Another user needs admin; a user JWT publishes for itself like a token does.
    bob = await api.account("bob@example.com")
    await api.fails("POST", "/publish", 403, "FORBIDDEN", ada.token,
                    json={"type": "x", "data": 1, "target": {"user_id": bob.user_id}})
    mine = await api.ok("POST", "/publish", ada.jwt, json={"type": "x", "data": {"any": ["json", 1, None]}},
                        status=202)
    assert set(mine) == {"message_id", "cursor", "online_devices"} and mine["cursor"] == 1


async def test_admin_publishes_to_another_user_and_unknown_users_are_404(
    server_factory: Any, backend_settings: Any
) -> None:
    from tests.fixtures.inbox import FAST

    settings = dataclasses.replace(backend_settings, admin_emails="root@example.com", **FAST)
    server = await server_factory(settings)
    async with aiohttp.ClientSession() as http:
        api = Api(http, f"http://127.0.0.1:{server.port}")
        root = await api.account("root@example.com", scopes=("publish", "admin"))
        bob = await api.account("bob@example.com")
        phone = await Device.open(f"ws://127.0.0.1:{server.port}", bob.token, "phone")
        sent = await api.publish(root.token, {"hi": "bob"}, target={"user_id": bob.user_id})
        assert sent["online_devices"] == 1
        await phone.until(lambda d: d.processed == sent["cursor"])
        event = phone.events[-1]
        assert event["event"] == "publish" and event["data"]["data"] == {"hi": "bob"}
        assert event["data"]["publisher"] == {"user_id": root.user_id, "token_id": root.token_id}
        assert set(event["data"]) == {"message_id", "type", "data", "publisher", "created_at"}
        await api.fails("POST", "/publish", 404, "NOT_FOUND", root.token,
                        json={"type": "x", "data": 1, "target": {"user_id": "no-such-user"}})
        await phone.close()


async def test_online_devices_counts_devices_and_sessions(node: Any) -> None:
    server, api, ws = node
    cy = await api.account("cy@example.com")
    sockets = [
        await Device.open(ws, cy.token, "phone"),
        await Device.open(ws, cy.token, "phone"),  # the same device twice: one device
        await Device.open(ws, cy.token, "laptop"),
        await Device.open(ws, cy.token, None),  # a session without device_id counts as one
    ]
    assert (await api.publish(cy.token, 1))["online_devices"] == 3
    for s in sockets:
        await s.close()


async def test_the_publish_rate_limit_answers_429_with_headers(server_factory: Any, make_settings: Any) -> None:
    server = await server_factory(make_settings(rate_publish="2/60", publish_burst=2))
    async with aiohttp.ClientSession() as http:
        api = Api(http, f"http://127.0.0.1:{server.port}")
        di = await api.account("di@example.com")
        for _ in range(2):
            await api.publish(di.token, 1)
        async with http.post(f"http://127.0.0.1:{server.port}/api/v1/publish",
                             headers={"Authorization": f"Bearer {di.token}"}, json={"type": "x", "data": 1}) as resp:
            body = await resp.json()
            assert resp.status == 429 and body["error"]["code"] == "RATE_LIMIT_EXCEEDED"
            for header in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After"):
                assert header in resp.headers


async def test_history_filters_and_pagination(node: Any) -> None:
    server, api, ws = node
    ed = await api.account("ed@example.com")
    other = await api.account("fi@example.com")
    for i in range(5):
        await api.ok("POST", "/publish", ed.token, json={"type": "even" if i % 2 == 0 else "odd", "data": i},
                     status=202)
    await api.publish(other.token, "not ed's")
    page = await api.ok("GET", "/publish/messages?limit=2", ed.token)
    assert [m["data"] for m in page["items"]] == [4, 3] and page["next_cursor"]  # newest first
    rest = await api.ok("GET", f"/publish/messages?limit=10&cursor={page['next_cursor']}", ed.token)
    assert [m["data"] for m in rest["items"]] == [2, 1, 0] and rest["next_cursor"] is None
    item = rest["items"][0]
    assert set(item) == {"message_id", "type", "data", "target", "publisher", "cursor", "created_at", "expires_at",
                         "delivered_at"}
    evens = await api.ok("GET", "/publish/messages?type=even", ed.token)
    assert [m["data"] for m in evens["items"]] == [4, 2, 0]
    future = await api.ok("GET", "/publish/messages?since=2999-01-01T00:00:00Z", ed.token)
    assert future["items"] == []
    past = await api.ok("GET", "/publish/messages?until=2000-01-01T00:00:00Z", ed.token)
    assert past["items"] == []
    for bad in ("since=yesterday", "limit=0", "limit=500", "cursor=!!", "type=a b"):
        await api.fails("GET", f"/publish/messages?{bad}", 400, "VALIDATION_ERROR", ed.token)
    tasks_only = await api.ok("POST", "/tokens", ed.jwt, json={"name": "t", "scopes": ["tasks:read"]}, status=201)
    await api.fails("GET", "/publish/messages", 403, "FORBIDDEN", tasks_only["token"])


async def test_stats_count_by_type_and_day_and_report_delivery_latency(node: Any) -> None:
    server, api, ws = node
    gu = await api.account("gu@example.com")
    phone = await Device.open(ws, gu.token, "phone")
    for kind in ("alert", "alert", "note"):
        await api.ok("POST", "/publish", gu.token, json={"type": kind, "data": kind}, status=202)
    await phone.until(lambda d: d.processed == 3)
    for _ in range(100):  # delivery times are written with the acks, in batches
        stats = await api.ok("GET", "/publish/stats", gu.token)
        if stats["delivery_latency_ms"]["samples"] == 3:
            break
        await asyncio.sleep(0.05)
    assert stats["total"] == 3
    assert stats["by_type"] == [{"type": "alert", "count": 2}, {"type": "note", "count": 1}]
    assert len(stats["by_day"]) == 1 and stats["by_day"][0]["count"] == 3
    latency = stats["delivery_latency_ms"]
    assert latency["samples"] == 3 and 0 <= latency["p50"] <= latency["p99"] <= latency["max"]
    assert stats["online_clients"] == 1
    await api.fails("GET", "/publish/stats?days=0", 400, "VALIDATION_ERROR", gu.token)
    await phone.close()


async def test_a_changed_or_revoked_token_is_not_served_from_the_lookup_cache(node: Any) -> None:
    server, api, ws = node
    hy = await api.account("hy@example.com")
    await api.publish(hy.token, "cached now")  # the token's lookup is cached (AUTH_CACHE_S)
    await api.ok("PATCH", f"/tokens/{hy.token_id}", hy.jwt, json={"scopes": ["subscribe"]})
    await api.fails("POST", "/publish", 403, "FORBIDDEN", hy.token, json={"type": "x", "data": 1})
    await api.ok("PATCH", f"/tokens/{hy.token_id}", hy.jwt, json={"scopes": ["publish"]})
    await api.publish(hy.token, "allowed again")
    await api.ok("DELETE", f"/tokens/{hy.token_id}", hy.jwt, status=204)
    await api.fails("POST", "/publish", 401, "INVALID_TOKEN", hy.token, json={"type": "x", "data": 1})

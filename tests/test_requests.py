"""``/ws`` requests (relay/requests.py): one reply per request_id, the first one again on a repeat,
also from another node (the claim lives in the store)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp

from relay import requests
from shared.codes import ErrorCode
from shared.config import Settings
from shared.errors import ApiError, BackendUnavailable
from tests.fixtures.inbox import FAST
from tests.inbox_helpers import Api, Device


def install_counter(server: Any, calls: list[dict[str, Any]], gate: asyncio.Event | None = None) -> None:
    async def count(conn: Any, message: dict[str, Any]) -> dict[str, Any]:
        calls.append(message)
        if gate is not None:
            await gate.wait()
        if message.get("fail") == "muted":
            raise ApiError(ErrorCode.MUTED, "you are muted")
        if message.get("fail") == "down" and len(calls) == 1:
            raise BackendUnavailable("store down")
        return {"n": len(calls)}

    requests.install(server.state, "test.count", count)


async def reply_to(device: Device, rid: Any, index: int = 1) -> dict[str, Any]:
    """The ``index``-th reply (1-based) carrying ``rid``."""
    await device.until(lambda d: sum(1 for f in d.others if f.get("request_id") == rid) >= index)
    return [f for f in device.others if f.get("request_id") == rid][index - 1]


async def test_a_repeated_request_id_gets_the_first_reply_without_running_again(
    server_factory: Any, make_settings: Any, pg_url: str, pg_schema: str, redis_url: str, redis_prefix: str,
    tmp_path: Path,
) -> None:
    base: Settings = make_settings(database_url=pg_url, database_schema=pg_schema, redis_url=redis_url,
                                   redis_prefix=redis_prefix)
    a, b = [await server_factory(dataclasses.replace(base, data_dir=str(tmp_path / f"n{i}"), **FAST)) for i in range(2)]
    calls: list[dict[str, Any]] = []
    for server in (a, b):
        install_counter(server, calls)
    async with aiohttp.ClientSession() as http:
        api = Api(http, f"http://127.0.0.1:{a.port}")
        ada = await api.account("ada@example.com")
        on_a = await Device.open(f"ws://127.0.0.1:{a.port}", ada.token, "phone")
        await on_a.send({"type": "test.count", "request_id": "r-1"})
        first = await reply_to(on_a, "r-1")
        assert first == {"type": "reply", "request_id": "r-1", "ok": True, "data": {"n": 1}}
        await on_a.send({"type": "test.count", "request_id": "r-1"})
        assert await reply_to(on_a, "r-1", 2) == first and len(calls) == 1
        # The client reconnects to the other node and repeats: still the first reply.
        await on_a.close()
        on_b = await Device.open(f"ws://127.0.0.1:{b.port}", ada.token, "phone")
        await on_b.send({"type": "test.count", "request_id": "r-1"})
        assert await reply_to(on_b, "r-1") == first and len(calls) == 1
        # Integer ids are ids too; another id is another request.
        await on_b.send({"type": "test.count", "request_id": 7})
        assert (await reply_to(on_b, 7))["data"] == {"n": 2}
        # Another principal with the same id is not a repeat.
        bob = await api.account("bob@example.com")
        other = await Device.open(f"ws://127.0.0.1:{b.port}", bob.token, "phone")
        await other.send({"type": "test.count", "request_id": "r-1"})
        assert (await reply_to(other, "r-1"))["data"] == {"n": 3}
        for d in (on_b, other):
            await d.close()


async def test_error_replies_missing_ids_and_requests_in_flight(node: Any) -> None:
    server, api, ws = node
    calls: list[dict[str, Any]] = []
    gate = asyncio.Event()
    install_counter(server, calls, gate)
    cy = await api.account("cy@example.com")
    d = await Device.open(ws, cy.token, "phone")
    await d.send({"type": "test.count"})
    await d.until(lambda x: any(f["type"] == "error" for f in x.others))
    assert [f for f in d.others if f["type"] == "error"][0]["code"] == "VALIDATION_ERROR"
    # While the first attempt runs, a repeat is refused (CONFLICT), not run twice.
    await d.send({"type": "test.count", "request_id": "slow"})
    await d.until(lambda x: len(calls) == 1)
    await d.send({"type": "test.count", "request_id": "slow"})
    assert (await reply_to(d, "slow"))["error"]["code"] == "CONFLICT"
    gate.set()
    assert (await reply_to(d, "slow", 2))["data"] == {"n": 1}
    # A definite error is the first reply too; a transient one is not remembered.
    await d.send({"type": "test.count", "request_id": "m", "fail": "muted"})
    muted = await reply_to(d, "m")
    assert muted["ok"] is False and muted["error"]["code"] == "MUTED"
    await d.send({"type": "test.count", "request_id": "m"})
    assert await reply_to(d, "m", 2) == muted
    calls.clear()
    await d.send({"type": "test.count", "request_id": "t", "fail": "down"})
    assert (await reply_to(d, "t"))["error"]["code"] == "SERVICE_UNAVAILABLE"
    await d.send({"type": "test.count", "request_id": "t", "fail": "down"})
    assert (await reply_to(d, "t", 2))["ok"] is True  # the retry ran
    await d.close()


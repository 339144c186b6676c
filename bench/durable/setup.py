"""Users, API tokens and device ids through the REST API (rest.md), before anything is measured.

Each user: ``POST /auth/register`` -> ``POST /auth/login`` -> ``POST /tokens`` with scopes
``publish`` and ``subscribe``: the token both publishes to its own user (the default target) and
opens that user's ``/ws`` sockets. Devices are ``device_id`` query parameters (realtime.md): the
first connection with a new one registers it for the user's inbox.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PASSWORD = "bench password 123"


@dataclass
class Account:
    index: int
    user_id: str
    token: str
    devices: list[str] = field(default_factory=list)


async def _ok(http: aiohttp.ClientSession, method: str, url: str, status: int, **kw: Any) -> Any:
    for attempt in range(5):
        async with http.request(method, url, **kw) as resp:
            body = await resp.json(content_type=None)
            if resp.status == status:
                return body["data"]
            if resp.status in (429, 503) and attempt < 4:
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            raise RuntimeError(f"{method} {url}: {resp.status} {body}")
    raise AssertionError("unreachable")


async def create_accounts(
    base: str, users: int, devices_per_user: int, *, concurrency: int = 32, prefix: str = "u"
) -> tuple[list[Account], float]:
    """``users`` accounts with one token each; (accounts, seconds it took)."""
    t0 = time.monotonic()
    api = base + "/api/v1"
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as http:

        async def one(i: int) -> Account:
            email = f"{prefix}{i}@bench.example.com"
            async with sem:
                user = await _ok(http, "POST", api + "/auth/register", 201,
                                 json={"email": email, "password": PASSWORD})  # fmt: skip
                login = await _ok(http, "POST", api + "/auth/login", 200,
                                  json={"email": email, "password": PASSWORD})  # fmt: skip
                token = await _ok(
                    http, "POST", api + "/tokens", 201,
                    headers={"Authorization": f"Bearer {login['access_token']}"},
                    json={"name": "bench", "scopes": ["publish", "subscribe"]},
                )  # fmt: skip
            devices = [f"d{i}-{k}" for k in range(devices_per_user)]
            return Account(i, user["user"]["id"], token["token"], devices)

        accounts = await asyncio.gather(*(one(i) for i in range(users)))
    return list(accounts), time.monotonic() - t0

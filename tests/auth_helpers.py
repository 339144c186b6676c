"""Helpers for the account, token and audit tests: a running app on a real socket, and clients
written from the contract (rest.md) rather than from the implementation."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from shared.config import Settings
from shared.services import Services, open_services

PASSWORD = "correct horse battery"
TOKEN_IN_LINK = re.compile(r"[?&]token=([A-Za-z0-9_-]{32,})")
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")
USER_KEYS = {"id", "email", "display_name", "email_verified", "created_at"}

Client = TestClient[web.Request, web.Application]


@dataclass
class Harness:
    client: Client
    services: Services

    async def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> ClientResponse:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.client.request(method, "/api/v1" + path, headers=headers, **kwargs)

    async def ok(self, method: str, path: str, token: str | None = None, status: int = 200, **kwargs: Any) -> Any:
        resp = await self.call(method, path, token, **kwargs)
        body = await resp.json()
        assert resp.status == status, body
        assert body["success"] is True
        return body["data"]

    async def fails(self, method: str, path: str, status: int, code: str, token: str | None = None,
                    **kwargs: Any) -> dict[str, Any]:
        resp = await self.call(method, path, token, **kwargs)
        body = await resp.json()
        assert resp.status == status, body
        assert body["error"]["code"] == code, body
        assert body["success"] is False
        return dict(body["error"])

    async def register(self, email: str, password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
        data = await self.ok("POST", "/auth/register", json={"email": email, "password": password, **extra}, status=201)
        return dict(data["user"])

    async def login(self, email: str, password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
        return dict(await self.ok("POST", "/auth/login", json={"email": email, "password": password, **extra}))

    async def signup(self, email: str, **extra: Any) -> dict[str, Any]:
        """Register and log in; the login answer (access_token, refresh_token, user, ...)."""
        await self.register(email, **extra)
        return await self.login(email)

    async def mail_token(self, to: str, template: str) -> str:
        """The token in the link of the newest ``template`` mail queued for ``to`` (the outbox)."""
        row = await self.services.db.fetchrow(
            "SELECT body_text FROM outbox WHERE to_addr = $1 AND template = $2 ORDER BY created_at DESC, id LIMIT 1",
            to, template,
        )
        assert row is not None, f"no {template} mail for {to}"
        found = TOKEN_IN_LINK.search(row["body_text"])
        assert found, row["body_text"]
        return found.group(1)

    async def mail_count(self, to: str, template: str) -> int:
        count = await self.services.db.fetchval(
            "SELECT COUNT(*) FROM outbox WHERE to_addr = $1 AND template = $2", to, template
        )
        return int(count)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Harness]:
    services = await open_services(settings)
    try:
        async with TestClient(TestServer(create_app(services))) as client:
            yield Harness(client, services)
    finally:
        await services.close()

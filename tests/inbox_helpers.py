"""Clients for the durable-delivery tests, written from the contract (realtime.md, rest.md).

``Api`` talks REST to a running server (real socket), ``Device`` is one ``/ws`` socket that keeps
what it received and (optionally) acks as it goes, the way the spec tells clients to behave:
drop any event whose cursor it already processed, ack cumulatively.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.auth_helpers import PASSWORD

TIMEOUT = 10.0
ACK_EVERY_S = 0.02


@dataclass
class Api:
    http: aiohttp.ClientSession
    base: str  # http://127.0.0.1:PORT

    async def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.base + "/api/v1" + path, headers=headers, **kw) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)

    async def ok(self, method: str, path: str, token: str | None = None, status: int = 200, **kw: Any) -> Any:
        got, body = await self.call(method, path, token, **kw)
        assert got == status, body
        return body["data"] if body else None

    async def fails(self, method: str, path: str, status: int, code: str, token: str | None = None,
                    **kw: Any) -> dict[str, Any]:
        got, body = await self.call(method, path, token, **kw)
        assert (got, body["error"]["code"]) == (status, code), body
        return dict(body["error"])

    async def account(self, email: str, scopes: tuple[str, ...] = ("publish", "subscribe")) -> Account:
        """A user (registered, logged in) and an API token with ``scopes``."""
        user = (await self.ok("POST", "/auth/register", json={"email": email, "password": PASSWORD}, status=201))["user"]
        login = await self.ok("POST", "/auth/login", json={"email": email, "password": PASSWORD})
        token = await self.ok("POST", "/tokens", login["access_token"], json={"name": "t", "scopes": list(scopes)},
                              status=201)
        return Account(user["id"], login["access_token"], token["token"], token["id"])

    async def publish(self, token: str, data: Any, **kw: Any) -> dict[str, Any]:
        return dict(await self.ok("POST", "/publish", token, json={"type": "note", "data": data, **kw}, status=202))


@dataclass
class Account:
    user_id: str
    jwt: str
    token: str
    token_id: str


@dataclass
class Device:
    """One ``/ws`` socket of a device (``device_id``), or a device-less session (None)."""

    ws: ClientConnection
    device_id: str | None
    auto_ack: bool = True
    hello: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # every event frame, duplicates too
    arrived: list[float] = field(default_factory=list)  # loop time of each event frame
    others: list[dict[str, Any]] = field(default_factory=list)  # synced, reset, replies, errors ...
    processed: int = 0  # highest cursor processed (client-side dedupe)
    _reader: asyncio.Task[None] | None = None
    _acker: asyncio.Task[None] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def open(cls, ws_base: str, token: str, device_id: str | None, *, auto_ack: bool = True,
                   processed: int = 0) -> Device:
        query = f"?token={token}" + (f"&device_id={device_id}" if device_id else "")
        ws = await connect(ws_base + "/ws" + query, max_queue=None, open_timeout=TIMEOUT)
        device = cls(ws, device_id, auto_ack, processed=processed)
        device.hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert device.hello["type"] == "hello", device.hello
        device._reader = asyncio.ensure_future(device._read())
        return device

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                if frame["type"] != "event":
                    self.others.append(frame)
                    continue
                self.events.append(frame)
                self.arrived.append(asyncio.get_running_loop().time())
                if frame["cursor"] > self.processed:
                    self.processed = frame["cursor"]
                    if self.auto_ack and self._acker is None:
                        self._acker = asyncio.ensure_future(self._ack_soon())
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def _ack_soon(self) -> None:
        # Acks are cumulative: one per ACK_EVERY_S for everything processed meanwhile, like the
        # SDK (one ack per event would spend the socket's frame budget at high rates).
        await asyncio.sleep(ACK_EVERY_S)
        self._acker = None
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps({"type": "ack", "cursor": self.processed}))

    def unique(self) -> list[dict[str, Any]]:
        """Events after client-side dedupe by cursor, in arrival order."""
        seen: set[int] = set()
        out = []
        for e in self.events:
            if e["cursor"] not in seen:
                seen.add(e["cursor"])
                out.append(e)
        return out

    def data(self) -> list[Any]:
        """The published ``data`` of each unique ``publish`` event."""
        return [e["data"]["data"] for e in self.unique() if e["event"] == "publish"]

    async def until(self, predicate: Any, timeout: float = TIMEOUT) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(
                    f"{self.device_id}: condition not met; {len(self.events)} events, others {self.others[-5:]}"
                )
            await asyncio.sleep(0.01)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def close(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close()
        if self._reader is not None:
            await self._reader

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

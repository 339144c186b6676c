"""Listen to your inbox on ``/ws`` with the client SDK, resuming where the last run stopped.

With ``make run`` in another terminal and a verified account (README "A first walk with curl")::

    .venv/bin/python examples/inbox_listener.py --email ada@example.com --password 'correct horse battery'
    .venv/bin/python examples/inbox_listener.py --token sbt_...        # an API token with "subscribe"

It logs in over REST, hands the SDK a token *getter* (each new socket or refresh gets a fresh access
token from ``/auth/refresh``), prints ``hello``, every durable event (deduped by cursor, acked once
printed) and the ephemeral frames, and keeps its cursor in ``--cursor-file``. Stop it with Ctrl-C;
kill the server and start it again: the listener reconnects by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from typing import Any

import aiohttp

from relay.client import FileCursorStore, InboxClient, RequestError, Reset


class UserSession:
    """Email + password login; the getter returns a fresh access token from the refresh token."""

    def __init__(self, http: aiohttp.ClientSession, api: str, email: str, password: str) -> None:
        self.http, self.api, self.email, self.password = http, api, email, password
        self.refresh_token: str | None = None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(self.api + path, json=body) as resp:
            answer = await resp.json()
        if not answer.get("success"):
            error = answer["error"]
            raise SystemExit(f"{path}: {error['code']}: {error['message']}")
        return dict(answer["data"])

    async def __call__(self) -> str:
        if self.refresh_token is None:
            data = await self._post("/auth/login", {"email": self.email, "password": self.password})
        else:
            data = await self._post("/auth/refresh", {"refresh_token": self.refresh_token})
        self.refresh_token = data["refresh_token"]
        return str(data["access_token"])


async def main(args: argparse.Namespace) -> None:
    async with aiohttp.ClientSession() as http:
        if args.token:
            token: Any = lambda: args.token  # noqa: E731 - API tokens do not expire by themselves
        else:
            token = UserSession(http, args.url.rstrip("/") + "/api/v1", args.email, args.password)

        def on_reset(reset: Reset) -> None:
            print(f"! reset ({reset.reason}): reload your state over REST, then carry on")

        def on_notice(frame: dict[str, Any]) -> None:
            print("~", json.dumps(frame))

        inbox = InboxClient(
            args.url, token=token, device_id=args.device_id, store=FileCursorStore(args.cursor_file),
            filter=args.filter, on_reset=on_reset, on_notice=on_notice,
        )
        async with inbox:
            await inbox.wait_ready(timeout=30)
            assert inbox.hello is not None
            print(f"hello: {inbox.hello.principal} inbox head {inbox.hello.cursor}")
            pong = await inbox.ping(timeout=10)
            print(f"ping -> {pong['type']}")
            if args.send:
                conversation_id, text = args.send
                try:
                    reply = await inbox.send_message(conversation_id, {"kind": "text", "text": text})
                    print(f"sent: {reply}")
                except RequestError as exc:
                    print(f"send refused: {exc.code}: {exc.message}")
            async for event in inbox:  # the previous event is acked when the loop asks for the next
                print(f"[{event.cursor}] {event.event}: {json.dumps(event.data)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8080", help="the server (default %(default)s)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--email")
    who.add_argument("--token", help="an API token (sbt_...) with the subscribe scope, or a daemon key")
    parser.add_argument("--password", default="")
    parser.add_argument("--device-id", default="inbox-listener", help="this client's stable name")
    parser.add_argument("--cursor-file", default="inbox-cursor.json", help="where the cursor is kept")
    parser.add_argument("--filter", nargs="*", help="event patterns, e.g. 'task.*' publish")
    parser.add_argument("--send", nargs=2, metavar=("CONVERSATION_ID", "TEXT"), help="send one message first")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args()))

"""Echo endpoint for the Autobahn|Testsuite fuzzing client, on the project's own transport.

It runs ``relay.server.start_server`` (the real one-port server: ``HeadReader``, the upgrade,
``WsConnection`` around websockets' Sans-I/O) with a stub authenticator, and swaps in a
``WsConnection`` subclass that echoes every complete message, text or binary, byte for byte,
instead of decoding it as a JSON envelope. Nothing in ``relay/`` is changed: the subclass replaces
only ``_on_message`` (the envelope dispatch) and ``send`` (so the ``hello`` frame, which Autobahn
would count as an unexpected message, is not written). Framing, fragment reassembly, UTF-8
checks, size limits and the closing handshake are the production code paths.

Test-only: never run this as a service.

    .venv/bin/python bench/autobahn/echo_server.py --port 9001
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile

from relay import handoff
from relay.connection import WsConnection
from relay.protocol import Message
from relay.server import start_server
from shared.config import load_settings
from shared.principals import Principal

ECHO = Principal("user", "autobahn", user_id="autobahn", scopes=frozenset({"subscribe"}))


async def any_token(token: str) -> Principal:
    return ECHO


class EchoConnection(WsConnection):
    __slots__ = ()

    def _on_message(self, data: bytes) -> None:
        # Called once per complete message (after reassembly and, for text, the UTF-8 check).
        if not self.open:
            return
        if self._fragment_text:
            self.protocol.send_text(data)
        else:
            self.protocol.send_binary(data)
        self._send_data()

    def send(self, message: Message) -> None:
        pass  # no envelope frames (hello, errors): Autobahn expects only the echoes


async def main(port: int) -> None:
    with tempfile.TemporaryDirectory(prefix="switchboard-autobahn-") as data_dir:
        settings = load_settings(
            env={},
            host="127.0.0.1",
            port=port,
            data_dir=data_dir,
            jwt_secret="autobahn-echo-only",
            # Autobahn sends messages up to 16 MiB and floods of thousands of frames; the limits
            # under test are the protocol's, not the production defaults.
            ws_max_frame_bytes=64 * 1024 * 1024,
            ws_outbound_limit_bytes=256 * 1024 * 1024,
            ws_rate="1000000/1",
            ws_burst=1000000,
            ws_max_fragments=10_000_000,  # cases 9.3.x/9.4.x split 4 MiB into up to 1-byte fragments
            rate_ws_connect="1000000/1",  # one connection per case, ~500 cases from one principal
            heartbeat_s=3600.0,  # no server pings in the middle of a case
        )
        handoff.WsConnection = EchoConnection  # type: ignore[attr-defined,misc]  # what HeadReader builds
        server = await start_server(settings, authenticator=any_token)
        logging.getLogger("switchboard").info(
            "autobahn echo server on ws://127.0.0.1:%d/ws", server.port
        )
        print(f"listening on {server.port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(main(args.port))
    except KeyboardInterrupt:
        pass

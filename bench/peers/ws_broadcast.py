"""Plain `websockets` broadcast server under uvloop: the fan-out peer with no tricks.

A connection on ``/sub/<channel>`` joins the channel; every message received on
``/pub/<channel>`` is sent to all of the channel's subscribers with
``websockets.broadcast`` (one encode per broadcast, no per-socket queueing of ours).
Keepalive pings and compression are off so idle sockets cost what the library costs.

    .venv/bin/python bench/peers/ws_broadcast.py --port 18701
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections import defaultdict

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

CHANNELS: defaultdict[str, set[ServerConnection]] = defaultdict(set)


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else "/"
    kind, _, channel = path.strip("/").partition("/")
    if kind == "sub" and channel:
        members = CHANNELS[channel]
        members.add(ws)
        try:
            await ws.wait_closed()
        finally:
            members.discard(ws)
    elif kind == "pub" and channel:
        async for message in ws:
            broadcast(CHANNELS[channel], message)
    else:
        await ws.close(1008, "path must be /sub/<channel> or /pub/<channel>")


async def main(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler, host, port, ping_interval=None, compression=None, backlog=4096, max_queue=None
    ):
        print(f"ws_broadcast listening on {host}:{port}", flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18701)
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port))

"""The relay: the one-port server, its ``/ws`` sockets, and the hand-off of everything else to aiohttp."""

from relay.server import RunningServer, serve, start_server

__all__ = ["RunningServer", "serve", "start_server"]

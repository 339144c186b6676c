"""The relay: the one-port server, its ``/ws`` sockets, and the hand-off of everything else to aiohttp.

The server names are loaded on first use (PEP 562), so ``import relay.client`` (the SDK, which
devices and scripts import) does not pull in the server, aiohttp and the store drivers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.server import RunningServer, serve, start_server

__all__ = ["RunningServer", "serve", "start_server"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from relay import server

        return getattr(server, name)
    raise AttributeError(f"module 'relay' has no attribute {name!r}")

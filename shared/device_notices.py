"""Device notices: REST hands a frame to one device's book sockets, on every node.

Every node listens on one broker channel (``DEVICE_NOTICE_CHANNEL``, see ``relay.device_notices``),
as it does for revocations (``shared.revocation``). A notice is a small JSON object::

    {"device_id": "...", "book": "<digest of the book id>", "frame": {"type": "...", ...}}

and each node writes ``frame`` to that device's open ``/ws/relay/{book_id}`` sockets, if it has
any. The book travels as ``book_digest`` (the digest its channel is named by): Redis never sees a
book id. The first user is ``/pairing/verify``: ``{"type": "pairing.matched", "device_id",
"public_key"}`` to the device that generated the code (realtime.md "Book relay").

A notice is ephemeral, like the frames it carries: sent after the change committed; a device with
no socket open misses it (for pairing, ``/pairing/exchange`` answers the same), and if the broker
is down it is logged and lost.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from shared.books.writer import BOOK_DIGEST
from shared.errors import BackendUnavailable
from shared.secrets import hash_id
from shared.services import Services

log = logging.getLogger("switchboard.device_notices")

DEVICE_NOTICE_CHANNEL = "device_notice"


def book_digest(book_id: str) -> str:
    return hash_id(book_id, BOOK_DIGEST)


async def notify(services: Services, device_id: str, book_id: str, frame: dict[str, Any]) -> bool:
    """Publish ``frame`` for ``device_id``'s sockets on ``book_id``; False if the broker failed."""
    notice = {"device_id": device_id, "book": book_digest(book_id), "frame": frame}
    try:
        await services.broker.publish(
            DEVICE_NOTICE_CHANNEL, json.dumps(notice, separators=(",", ":")).encode()
        )
    except BackendUnavailable as exc:
        log.error(
            "could not send a device notice",
            extra={
                "device": hash_id(device_id),
                "frame_type": frame.get("type"),
                "error": str(exc),
            },
        )
        return False
    return True


async def pairing_matched(
    services: Services, generator_id: str, book_id: str, peer_id: str, peer_public_key: str
) -> bool:
    """realtime.md: ``pairing.matched`` to the device that generated the code."""
    frame = {"type": "pairing.matched", "device_id": peer_id, "public_key": peer_public_key}
    return await notify(services, generator_id, book_id, frame)


__all__ = ["DEVICE_NOTICE_CHANNEL", "notify", "pairing_matched"]

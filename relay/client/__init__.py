"""The Python client SDK (realtime.md "Client SDK"): the reference client of both socket endpoints.

* ``InboxClient`` — ``/ws``: the durable inbox (deduped by cursor, cumulative coalesced acks,
  ``sync`` after reconnect, ``reset``), ``filter``, requests with replies (``message.send``, ...).
* ``BookClient`` — ``/ws/relay/{book_id}``: encrypted CRDT ops in book order (deduped by seq),
  ``send_op`` waiting for the ack and re-sent with the same id after a reconnect.

Both take a token *getter* (never a string: every connection and refresh asks it for a fresh
credential), reconnect by themselves with jittered exponential backoff, refresh the credential on
the live socket before it expires, and keep their position in a pluggable ``CursorStore``.
The Sans-I/O core (``relay.client.core``) holds every rule and can be driven without asyncio.
"""

from relay.client.aio import BookClient, InboxClient, NoticeHandler, ResetHandler, TokenGetter
from relay.client.core import (
    BookProtocol,
    Codec,
    Decision,
    Event,
    Hello,
    InboxProtocol,
    Notice,
    Op,
    ReconnectPolicy,
    Reset,
    Settled,
    Synced,
)
from relay.client.errors import (
    ClientClosed,
    ClientError,
    ConnectionLost,
    ConnectionTerminated,
    HandshakeRejected,
    OpRejected,
    RequestError,
    RequestTimeout,
)
from relay.client.store import CursorStore, FileCursorStore, MemoryCursorStore

__all__ = [
    "BookClient",
    "BookProtocol",
    "ClientClosed",
    "ClientError",
    "Codec",
    "ConnectionLost",
    "ConnectionTerminated",
    "CursorStore",
    "Decision",
    "Event",
    "FileCursorStore",
    "HandshakeRejected",
    "Hello",
    "InboxClient",
    "InboxProtocol",
    "MemoryCursorStore",
    "Notice",
    "NoticeHandler",
    "Op",
    "OpRejected",
    "ReconnectPolicy",
    "RequestError",
    "RequestTimeout",
    "Reset",
    "ResetHandler",
    "Settled",
    "Synced",
    "TokenGetter",
]

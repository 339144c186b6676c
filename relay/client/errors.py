"""Exceptions of the client SDK.

::

    ClientError
    ├── HandshakeRejected      the upgrade was refused for good (401, 403, 404, 400: no 101)
    ├── ConnectionTerminated   the server closed with a terminal close code (1008, 4003, 1002, ...)
    ├── ClientClosed           the client was closed while the call was waiting
    ├── ConnectionLost         the socket went away with a request that must not be re-sent
    ├── RequestError           a request was answered ``ok: false`` or with an ``error`` frame
    │   └── OpRejected         the book relay refused an op (``error`` frame with the op's id)
    └── RequestTimeout         no answer in time (also a ``TimeoutError``)

A client that stops for good (``HandshakeRejected``, ``ConnectionTerminated``) fails every waiting
call with that same exception, and ``async for`` over the client raises it.
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base class of every exception the SDK raises on its own."""


class HandshakeRejected(ClientError):
    """The server refused the WebSocket upgrade with a status that retrying cannot fix.

    ``status`` is the HTTP status, ``code`` and ``message`` come from the REST error envelope
    of the answer (``INVALID_TOKEN``, ``TOKEN_EXPIRED``, ``FORBIDDEN``, ``NOT_FOUND``, ...).
    """

    def __init__(self, status: int, code: str | None, message: str | None) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(
            f"upgrade refused: HTTP {status} {code or ''}: {message or ''}".rstrip(": ")
        )


class ConnectionTerminated(ClientError):
    """The server closed the socket with a code after which the client does not reconnect.

    1008 (policy: credential revoked, device removed), 4003 (forbidden), 1002/1003/1007 (the
    client broke the protocol), 1009 (a frame of ours was too big: re-sending it would loop).
    """

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"connection closed by the server with {code} {reason}".rstrip())


class ClientClosed(ClientError):
    """The client was closed (``close()``) before the call completed."""


class ConnectionLost(ClientError):
    """The socket went away while a request that is not re-sent (``refresh``) was waiting."""


class RequestError(ClientError):
    """A request got ``{"type": "reply", "ok": false, "error": {code, message}}`` or an
    ``error`` frame naming its ``request_id``."""

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        self.code = code
        self.message = message
        self.details = details
        super().__init__(f"{code}: {message}")


class OpRejected(RequestError):
    """The book relay answered an op with ``{"type": "error", "id": <op id>, "code", "message"}``."""


class RequestTimeout(ClientError, TimeoutError):
    """No answer within the call's timeout (the request may still have been applied)."""


__all__ = [
    "ClientClosed",
    "ClientError",
    "ConnectionLost",
    "ConnectionTerminated",
    "HandshakeRejected",
    "OpRejected",
    "RequestError",
    "RequestTimeout",
]

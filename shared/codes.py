"""The one registry of error codes (REST envelope, WebSocket ``error`` frames) and close codes.

Ranges of WebSocket close codes (RFC 6455 section 7.4):

* 1000-1015  protocol-level, defined by the RFC; 1005/1006/1015 are never sent on the wire.
* 4000-4099  Switchboard application codes. A client reconnects after 4008 (slow consumer, resume
  from its cursor) and 4029 (rate limited, after a pause); 4001 (token expired) reconnects with a
  fresh credential; 4003 (forbidden) does not reconnect with the same credential.

A close frame carries at most 125 bytes: 2 for the code, so reasons stay short (``reason()``).
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    VALIDATION_ERROR = "VALIDATION_ERROR"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    INVALID_TOKEN = "INVALID_TOKEN"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    CONFLICT = "CONFLICT"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    EMAIL_TAKEN = "EMAIL_TAKEN"
    EMAIL_NOT_VERIFIED = "EMAIL_NOT_VERIFIED"
    REFRESH_TOKEN_REUSED = "REFRESH_TOKEN_REUSED"
    INVALID_SHORT_CODE = "INVALID_SHORT_CODE"
    SHORT_CODE_EXPIRED = "SHORT_CODE_EXPIRED"
    BOOK_NOT_FOUND = "BOOK_NOT_FOUND"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
    PHOTO_NOT_FOUND = "PHOTO_NOT_FOUND"
    PHOTO_TOO_LARGE = "PHOTO_TOO_LARGE"
    TASK_NOT_FOUND = "TASK_NOT_FOUND"
    INVALID_TASK_STATE = "INVALID_TASK_STATE"
    CONVERSATION_NOT_FOUND = "CONVERSATION_NOT_FOUND"
    NOT_A_MEMBER = "NOT_A_MEMBER"
    MUTED = "MUTED"
    RECALL_WINDOW_PASSED = "RECALL_WINDOW_PASSED"
    DATABASE_ERROR = "DATABASE_ERROR"
    S3_ERROR = "S3_ERROR"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"

    @property
    def status(self) -> int:
        return _STATUS[self]


_STATUS: dict[ErrorCode, int] = {
    ErrorCode.VALIDATION_ERROR: 400,
    ErrorCode.INVALID_SHORT_CODE: 400,
    ErrorCode.SHORT_CODE_EXPIRED: 400,
    ErrorCode.PHOTO_TOO_LARGE: 400,
    ErrorCode.INVALID_TASK_STATE: 400,
    ErrorCode.RECALL_WINDOW_PASSED: 400,
    ErrorCode.INVALID_TOKEN: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.INVALID_CREDENTIALS: 401,
    ErrorCode.REFRESH_TOKEN_REUSED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_A_MEMBER: 403,
    ErrorCode.MUTED: 403,
    ErrorCode.EMAIL_NOT_VERIFIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.BOOK_NOT_FOUND: 404,
    ErrorCode.DEVICE_NOT_FOUND: 404,
    ErrorCode.PHOTO_NOT_FOUND: 404,
    ErrorCode.TASK_NOT_FOUND: 404,
    ErrorCode.CONVERSATION_NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.CONFLICT: 409,
    ErrorCode.EMAIL_TAKEN: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.HEADERS_TOO_LARGE: 431,
    ErrorCode.RATE_LIMIT_EXCEEDED: 429,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.DATABASE_ERROR: 500,
    ErrorCode.S3_ERROR: 500,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
}


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # drain / shutdown: reconnect elsewhere
    PROTOCOL_ERROR = 1002  # e.g. an unmasked client frame
    INVALID_DATA = 1007  # e.g. invalid UTF-8 in a text frame
    POLICY = 1008  # revoked credential, device removed
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    OVERLOADED = 1013
    TOKEN_EXPIRED = 4001
    FORBIDDEN = 4003
    SLOW_CONSUMER = 4008
    RATE_LIMITED = 4029

    def reason(self) -> str:
        """Short reason text for the close frame (always well under the 123-byte limit)."""
        return _CLOSE_REASON[self]


_CLOSE_REASON: dict[CloseCode, str] = {
    CloseCode.NORMAL: "",
    CloseCode.GOING_AWAY: "server going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.INVALID_DATA: "invalid data",
    CloseCode.POLICY: "policy violation",
    CloseCode.TOO_BIG: "frame too big",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.OVERLOADED: "overloaded",
    CloseCode.TOKEN_EXPIRED: "token expired",
    CloseCode.FORBIDDEN: "forbidden",
    CloseCode.SLOW_CONSUMER: "slow consumer",
    CloseCode.RATE_LIMITED: "rate limited",
}

__all__ = ["CloseCode", "ErrorCode"]

"""Domain errors that cross the store/backends -> API boundary.

Tree::

    SwitchboardError
    ├── ApiError                (carries an ErrorCode; the REST middleware renders it)
    │   └── RateLimited         (adds the 429 headers)
    └── BackendError            (a backend failed; never the client's fault)
        ├── StoreError          -> 500 DATABASE_ERROR
        │   └── ConflictError   -> 409 CONFLICT (unique constraint); ``constraint`` names it
        ├── BlobError           -> 500 S3_ERROR
        └── BackendUnavailable  -> 503 SERVICE_UNAVAILABLE (cannot connect)

Foreign exceptions (asyncpg, sqlite3, redis, botocore) are translated where they are raised, with
``raise ... from exc``, so nothing above the backends imports a driver.
"""

from __future__ import annotations

from typing import Any

from shared.codes import ErrorCode


class SwitchboardError(Exception):
    pass


class ApiError(SwitchboardError):
    """An error with a contract code; ``status`` follows from the code unless given."""

    def __init__(
        self,
        code: ErrorCode,
        message: str = "",
        details: dict[str, Any] | None = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or code.value)
        self.code = code
        self.message = message or code.value.replace("_", " ").lower()
        self.details = details or {}
        self.status = status if status is not None else code.status
        self.headers = headers or {}


def validation_error(field: str, message: str) -> ApiError:
    return ApiError(
        ErrorCode.VALIDATION_ERROR, f"{field}: {message}", {"field": field, "reason": message}
    )


class BackendError(SwitchboardError):
    pass


class StoreError(BackendError):
    pass


class ConflictError(StoreError):
    def __init__(self, message: str, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class BlobError(BackendError):
    pass


class BackendUnavailable(BackendError):
    pass


class RateLimited(ApiError):
    """429 with the contract's headers, built from a limiter decision."""

    def __init__(
        self, limit: int, remaining: int, reset_at: int, retry_after: int, message: str = ""
    ) -> None:
        super().__init__(
            ErrorCode.RATE_LIMIT_EXCEEDED,
            message or "too many requests",
            {"retry_after": retry_after},
            headers={
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(max(0, remaining)),
                "X-RateLimit-Reset": str(reset_at),
                "Retry-After": str(max(1, retry_after)),
            },
        )
        self.retry_after = retry_after


class BlobNotFound(BlobError):
    pass


class BlobTooLarge(BlobError):
    pass

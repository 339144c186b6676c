"""The ``BlobStore`` protocol. Keys are server-made (``photos/<uuid>``), never client strings."""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size: int
    content_type: str


@dataclass(frozen=True, slots=True)
class PresignedUpload:
    """How a client uploads directly: ``method`` to ``url`` with ``fields`` (POST form) or ``headers``."""

    url: str
    method: str  # "PUT" or "POST"
    expires_in: int
    fields: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


class BlobStore(Protocol):
    async def put(
        self,
        key: str,
        data: bytes | AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
        max_size: int | None = None,
    ) -> int:
        """Store ``data`` (streamed when iterable); returns its size. Over ``max_size``: nothing
        is kept and ``BlobTooLarge`` is raised."""
        ...

    async def get(self, key: str) -> bytes:
        """The whole object (tests, small objects). Missing: ``BlobNotFound``."""
        ...

    async def head(self, key: str) -> BlobInfo | None: ...

    async def delete(self, key: str) -> None:
        """Idempotent."""
        ...

    async def download_url(self, key: str, expires_in: int) -> str: ...

    async def upload_url(
        self, key: str, expires_in: int, content_type: str, max_size: int
    ) -> PresignedUpload: ...

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` when the store cannot be reached."""
        ...

    async def close(self) -> None: ...

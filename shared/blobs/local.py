"""``LocalBlobStore``: objects as files under one directory, served by ``/blobs/<key>`` with
HMAC-signed URLs (api/routes/blobs.py).

Layout: the object ``a/b.jpg`` is the file ``<root>/a/b.jpg`` and its content type the sidecar
``<root>/a/b.jpg~ct``. Temporary files are ``<name>~tmp-<random>`` in the target's directory, so
``os.replace`` is atomic and a reader never sees a partial object. ``~`` is not a key character,
so neither sidecars nor temporary files can collide with a key.

Signed URLs: ``expires`` is the last valid unix second; ``signature`` is base64url (unpadded)
HMAC-SHA256 over ``"\\n".join([method, key, expires, *extra])``. Downloads sign ``GET``; uploads
sign ``PUT`` plus the content type and the maximum size, both carried in the query so the route
can enforce them. Keys and content types never contain ``\\n``, so the message is unambiguous.

All file I/O runs in worker threads (``asyncio.to_thread``): a multi-MB object never blocks the loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import stat
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, urlencode

from shared.blobs.base import BlobInfo, PresignedUpload
from shared.errors import BlobError, BlobNotFound, BlobTooLarge

DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_KEY_LENGTH = 1024  # S3's limit, so a key valid here is valid there too
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_DIGITS = re.compile(r"[0-9]{1,15}")
# Printable ASCII only: the type ends up in a response header and in the signed message.
_CONTENT_TYPE = re.compile(r"[\x20-\x7e]{1,255}")
_META_SUFFIX = "~ct"
_TMP_MARK = "~tmp-"
# Stream chunks are batched into writes of about this size: one thread hop per batch, not per chunk.
_WRITE_BATCH = 1 << 20
READ_CHUNK = 256 * 1024

_T = TypeVar("_T")
_NOT_THERE = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def validate_key(key: str) -> str:
    """``key`` if it is a safe relative path of ``[A-Za-z0-9._-]`` segments, else ``ValueError``.

    Rejected: empty, leading ``/``, empty segments (``a//b``, trailing ``/``), ``.`` and ``..``
    segments, any other character. A valid key can only name a path under the store's root.
    """
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError("blob key must be 1-1024 characters")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(f"invalid blob key {key!r}")
    return key


def validate_content_type(content_type: str) -> str:
    if not _CONTENT_TYPE.fullmatch(content_type):
        raise ValueError("content type must be 1-255 printable ASCII characters")
    return content_type


class InvalidSignature(Exception):  # noqa: N818 - reads as "raise InvalidSignature('expired')"
    """A signed blob URL that is missing, malformed, expired or tampered with (the route: 403)."""


@dataclass(frozen=True, slots=True)
class UploadGrant:
    """What a valid signed upload URL allows: this content type, at most ``max_size`` bytes."""

    content_type: str
    max_size: int


class BlobReader:
    """An open object: ``info`` from the opened file (so it matches the bytes read even if the
    key is replaced meanwhile) and ``read`` in a worker thread. Use as ``async with``."""

    __slots__ = ("_file", "info")

    def __init__(self, file: BinaryIO, info: BlobInfo) -> None:
        self._file = file
        self.info = info

    async def read(self, size: int = READ_CHUNK) -> bytes:
        return await asyncio.to_thread(self._file.read, size)

    async def __aenter__(self) -> BlobReader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self._file.close)


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


class LocalBlobStore:
    def __init__(self, root: Path, signing_key: bytes, public_url: str) -> None:
        if not signing_key:
            raise ValueError("LocalBlobStore needs a non-empty signing key")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._key = signing_key
        self._public_url = public_url.rstrip("/")

    # -- objects ----------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterable[bytes],
        content_type: str = DEFAULT_CONTENT_TYPE,
        max_size: int | None = None,
    ) -> int:
        path = self._path(key)
        validate_content_type(content_type)
        if isinstance(data, bytes | bytearray | memoryview):
            if max_size is not None and len(data) > max_size:
                raise BlobTooLarge(f"{len(data)} bytes exceed the limit of {max_size}")
            data = _single(bytes(data))
        file, tmp = await _io(_open_temp, path)
        try:
            size = 0
            pending: list[bytes] = []
            pending_size = 0
            async for chunk in data:
                size += len(chunk)
                if max_size is not None and size > max_size:
                    raise BlobTooLarge(f"more than {max_size} bytes")
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= _WRITE_BATCH:
                    await _io(file.writelines, pending)
                    pending, pending_size = [], 0
            if pending:
                await _io(file.writelines, pending)
            await _io(_commit, file, tmp, path, content_type)
        except BaseException:
            # Also on cancellation, so no await here: close (it waits for a write still running
            # in its thread: the buffered file holds a lock) and drop the partial object.
            with contextlib.suppress(OSError):
                file.close()
            tmp.unlink(missing_ok=True)
            raise
        return size

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except _NOT_THERE as exc:
            raise BlobNotFound(key) from exc
        except OSError as exc:
            raise BlobError(f"cannot read blob: {exc.strerror}") from exc

    async def reader(self, key: str) -> BlobReader:
        """The object for streaming (the ``/blobs`` route). Missing: ``BlobNotFound``."""
        path = self._path(key)
        try:
            return await asyncio.to_thread(_open_reader, key, path)
        except _NOT_THERE as exc:
            raise BlobNotFound(key) from exc
        except OSError as exc:
            raise BlobError(f"cannot read blob: {exc.strerror}") from exc

    async def head(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(_stat_info, key, path)
        except _NOT_THERE:
            return None
        except OSError as exc:
            raise BlobError(f"cannot stat blob: {exc.strerror}") from exc

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_remove, path)
        except OSError as exc:
            raise BlobError(f"cannot delete blob: {exc.strerror}") from exc

    # -- signed URLs --------------------------------------------------------------------------

    async def download_url(self, key: str, expires_in: int) -> str:
        validate_key(key)
        expires = str(_expiry(expires_in))
        query = {"expires": expires, "signature": self._sign("GET", key, expires)}
        return f"{self._url(key)}?{urlencode(query)}"

    async def upload_url(
        self, key: str, expires_in: int, content_type: str, max_size: int
    ) -> PresignedUpload:
        validate_key(key)
        validate_content_type(content_type)
        if max_size < 1:
            raise ValueError("max_size must be positive")
        expires = str(_expiry(expires_in))
        signature = self._sign("PUT", key, expires, content_type, str(max_size))
        query = {
            "expires": expires,
            "content_type": content_type,
            "max_size": str(max_size),
            "signature": signature,
        }
        return PresignedUpload(
            url=f"{self._url(key)}?{urlencode(query)}",
            method="PUT",
            expires_in=expires_in,
            headers={"Content-Type": content_type},
        )

    def authorize_download(self, key: str, query: Mapping[str, str]) -> None:
        """Check a ``GET``/``HEAD`` URL's query; ``InvalidSignature`` unless valid and unexpired."""
        _check_key(key)
        expires = self._check_expiry(query)
        self._check_signature(query, "GET", key, expires)

    def authorize_upload(self, key: str, query: Mapping[str, str]) -> UploadGrant:
        """Check a ``PUT`` URL's query; the grant carries the signed content type and size limit."""
        _check_key(key)
        expires = self._check_expiry(query)
        content_type = query.get("content_type", "")
        max_size = query.get("max_size", "")
        if not _DIGITS.fullmatch(max_size) or not _CONTENT_TYPE.fullmatch(content_type):
            raise InvalidSignature("malformed upload URL")
        self._check_signature(query, "PUT", key, expires, content_type, max_size)
        return UploadGrant(content_type=content_type, max_size=int(max_size))

    async def ping(self) -> None:
        """The directory must exist and be writable (a full or read-only disk shows here)."""
        if not await asyncio.to_thread(os.access, self.root, os.W_OK | os.X_OK):
            raise BlobError(f"blob directory {self.root} is not writable")

    async def close(self) -> None:
        """Nothing is held open between calls."""

    # -- internals --------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _url(self, key: str) -> str:
        return f"{self._public_url}/blobs/{quote(key, safe='/')}"

    def _sign(self, *parts: str) -> str:
        mac = hmac.new(self._key, "\n".join(parts).encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    @staticmethod
    def _check_expiry(query: Mapping[str, str]) -> str:
        expires = query.get("expires", "")
        if not _DIGITS.fullmatch(expires):
            raise InvalidSignature("missing or malformed signature")
        if int(expires) < int(time.time()):
            raise InvalidSignature("URL expired")
        return expires

    def _check_signature(self, query: Mapping[str, str], *parts: str) -> None:
        given = query.get("signature", "")
        if not hmac.compare_digest(self._sign(*parts).encode(), given.encode("ascii", "replace")):
            raise InvalidSignature("invalid signature")


def _check_key(key: str) -> None:
    """The server never signs an invalid key, so a URL naming one cannot be genuine."""
    try:
        validate_key(key)
    except ValueError:
        raise InvalidSignature("invalid signature") from None


def _expiry(expires_in: int) -> int:
    if expires_in < 1:
        raise ValueError("expires_in must be positive")
    return int(time.time()) + expires_in


async def _io(func: Callable[..., _T], *args: Any) -> _T:
    """Run blocking file I/O in a worker thread; OS failures (disk full, ...) become ``BlobError``."""
    try:
        return await asyncio.to_thread(func, *args)
    except BlobError:
        raise
    except OSError as exc:
        raise BlobError(f"blob I/O failed: {exc.strerror or exc}") from exc


# -- blocking helpers, always run in a worker thread ----------------------------------------


def _open_temp(path: Path) -> tuple[BinaryIO, Path]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=path.name + _TMP_MARK, dir=path.parent)
    except (FileExistsError, NotADirectoryError) as exc:
        # S3 allows both "a" and "a/b"; a directory tree does not.
        raise BlobError("blob key collides with an existing object's path") from exc
    return os.fdopen(fd, "wb"), Path(name)


def _commit(file: BinaryIO, tmp: Path, path: Path, content_type: str) -> None:
    """Make the finished temporary file the object: durable first, then visible at once."""
    file.flush()
    os.fsync(file.fileno())
    file.close()
    if path.is_dir():
        raise BlobError("blob key collides with an existing object's path")
    meta = path.with_name(path.name + _META_SUFFIX)
    meta_fd, meta_tmp = tempfile.mkstemp(prefix=meta.name + _TMP_MARK, dir=path.parent)
    try:
        with os.fdopen(meta_fd, "w", encoding="ascii") as fh:
            fh.write(content_type)
        os.replace(meta_tmp, meta)
    except BaseException:
        Path(meta_tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _content_type(path: Path) -> str:
    try:
        return (
            path.with_name(path.name + _META_SUFFIX).read_text(encoding="ascii")
            or DEFAULT_CONTENT_TYPE
        )
    except _NOT_THERE:
        return DEFAULT_CONTENT_TYPE


def _stat_info(key: str, path: Path) -> BlobInfo:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(key)
    return BlobInfo(key=key, size=st.st_size, content_type=_content_type(path))


def _open_reader(key: str, path: Path) -> BlobReader:
    file = path.open("rb")
    try:
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(key)
        return BlobReader(
            file, BlobInfo(key=key, size=st.st_size, content_type=_content_type(path))
        )
    except BaseException:
        file.close()
        raise


def _remove(path: Path) -> None:
    for target in (path, path.with_name(path.name + _META_SUFFIX)):
        try:
            target.unlink()
        except _NOT_THERE:
            pass

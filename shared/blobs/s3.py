"""``S3BlobStore``: any S3-compatible service through one long-lived aiobotocore client.

Streamed puts go up as a multipart upload in ``PART_SIZE`` parts, so memory per upload stays at
one part; a stream that ends inside its first part is sent as a single ``PutObject``. ``max_size``
is checked before each chunk is buffered, and an upload over it (or failing, or cancelled) is
aborted, so nothing is kept. When this store creates the bucket it also adds a lifecycle rule
that reaps multipart uploads a crashed process could not abort.

Direct uploads use a presigned POST policy (``content-length-range`` 1..max_size, the key and
Content-Type fixed): unlike a presigned PUT, S3 itself enforces the size.

botocore/aiohttp exceptions are translated where the call is made (``_translate``): a missing
object -> ``BlobNotFound``, an unreachable or throttling endpoint -> ``BackendUnavailable``,
anything else -> ``BlobError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from shared.blobs.base import BlobInfo, PresignedUpload
from shared.blobs.local import DEFAULT_CONTENT_TYPE, validate_content_type, validate_key
from shared.errors import BackendUnavailable, BlobError, BlobNotFound, BlobTooLarge

PART_SIZE = 8 * 1024 * 1024  # S3's minimum is 5 MiB for every part but the last
_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_UNAVAILABLE = {"SlowDown", "ServiceUnavailable", "RequestTimeout", "InternalError"}


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise BlobError("S3 bucket does not exist") from exc
        if code in _NOT_FOUND or status == 404:
            raise BlobNotFound(what) from exc
        if code in _UNAVAILABLE or status == 503:
            raise BackendUnavailable(f"S3 unavailable ({code or status})") from exc
        raise BlobError(f"S3 error {code or status} on {what}") from exc
    except (
        BotoConnectionError,
        HTTPClientError,
        aiohttp.ClientConnectionError,
        TimeoutError,
    ) as exc:
        raise BackendUnavailable(f"cannot reach S3: {type(exc).__name__}") from exc
    except (BotoCoreError, aiohttp.ClientError) as exc:
        raise BlobError(f"S3 client error on {what}: {type(exc).__name__}") from exc


class S3BlobStore:
    def __init__(self, client: Any, bucket: str, stack: AsyncExitStack) -> None:
        """Use ``await S3BlobStore.open(...)``: it creates the client and checks the bucket."""
        self._client = client
        self._bucket = bucket
        self._stack = stack

    @classmethod
    async def open(
        cls,
        *,
        endpoint: str | None,
        bucket: str,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
    ) -> S3BlobStore:
        if not bucket:
            raise ValueError("S3_BUCKET is required when S3 is configured")
        config = AioConfig(
            signature_version="s3v4",
            # Custom endpoints (MinIO, moto, R2...) rarely resolve per-bucket host names.
            s3={"addressing_style": "path"} if endpoint else {},
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            # Only checksum when S3 demands it: several S3-compatible stores reject the newer
            # default trailing checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = AsyncExitStack()
        try:
            with _translate("client setup"):
                client = await stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        region_name=region,
                        endpoint_url=endpoint,
                        aws_access_key_id=access_key_id,
                        aws_secret_access_key=secret_access_key,
                        config=config,
                    )
                )
            store = cls(client, bucket, stack)
            await store._ensure_bucket(region)
        except BaseException:
            await stack.aclose()
            raise
        return store

    async def _ensure_bucket(self, region: str) -> None:
        try:
            await self._call("head_bucket", "bucket")
            return
        except BlobNotFound:
            pass
        params: dict[str, Any] = {}
        if region != "us-east-1":  # us-east-1 rejects an explicit location constraint
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await self._call("create_bucket", "bucket", **params)
        except BlobError as exc:
            cause = exc.__cause__
            if not (
                isinstance(cause, ClientError)
                and cause.response.get("Error", {}).get("Code") == "BucketAlreadyOwnedByYou"
            ):
                raise  # another worker creating it at the same time is fine; anything else is not
            return
        await self._call(
            "put_bucket_lifecycle_configuration",
            "bucket",
            LifecycleConfiguration={
                "Rules": [
                    {
                        "ID": "switchboard-abort-incomplete-uploads",
                        "Status": "Enabled",
                        "Filter": {"Prefix": ""},
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                    }
                ]
            },
        )

    async def _call(self, method: str, what: str, **params: Any) -> Any:
        with _translate(what):
            return await getattr(self._client, method)(Bucket=self._bucket, **params)

    # -- objects ----------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterable[bytes],
        content_type: str = DEFAULT_CONTENT_TYPE,
        max_size: int | None = None,
    ) -> int:
        validate_key(key)
        validate_content_type(content_type)
        if isinstance(data, bytes | bytearray | memoryview):
            if max_size is not None and len(data) > max_size:
                raise BlobTooLarge(f"{len(data)} bytes exceed the limit of {max_size}")
            await self._call("put_object", key, Key=key, Body=bytes(data), ContentType=content_type)
            return len(data)
        return await self._put_stream(key, data, content_type, max_size)

    async def _put_stream(
        self, key: str, data: AsyncIterable[bytes], content_type: str, max_size: int | None
    ) -> int:
        buffer = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in data:
                size += len(chunk)
                if max_size is not None and size > max_size:
                    raise BlobTooLarge(f"more than {max_size} bytes")
                buffer += chunk
                while len(buffer) >= PART_SIZE:
                    if upload_id is None:
                        created = await self._call(
                            "create_multipart_upload", key, Key=key, ContentType=content_type
                        )
                        upload_id = str(created["UploadId"])
                    parts.append(
                        await self._upload_part(key, upload_id, len(parts) + 1, buffer[:PART_SIZE])
                    )
                    del buffer[:PART_SIZE]
            if upload_id is None:
                await self._call(
                    "put_object", key, Key=key, Body=bytes(buffer), ContentType=content_type
                )
                return size
            if buffer:
                parts.append(await self._upload_part(key, upload_id, len(parts) + 1, buffer))
            await self._call(
                "complete_multipart_upload",
                key,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            if upload_id is not None:
                # Best effort (the bucket's lifecycle rule is the backstop): the original error
                # is what the caller needs to see.
                with contextlib.suppress(Exception):
                    await self._call("abort_multipart_upload", key, Key=key, UploadId=upload_id)
            raise
        return size

    async def _upload_part(
        self, key: str, upload_id: str, number: int, body: bytearray
    ) -> dict[str, Any]:
        answer = await self._call(
            "upload_part", key, Key=key, UploadId=upload_id, PartNumber=number, Body=bytes(body)
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    async def get(self, key: str) -> bytes:
        validate_key(key)
        answer = await self._call("get_object", key, Key=key)
        with _translate(key):
            async with answer["Body"] as body:
                return bytes(await body.read())

    async def head(self, key: str) -> BlobInfo | None:
        validate_key(key)
        try:
            answer = await self._call("head_object", key, Key=key)
        except BlobNotFound:
            return None
        return BlobInfo(
            key=key,
            size=int(answer["ContentLength"]),
            content_type=str(answer.get("ContentType") or DEFAULT_CONTENT_TYPE),
        )

    async def delete(self, key: str) -> None:
        validate_key(key)
        with contextlib.suppress(BlobNotFound):  # S3 answers 204 anyway; compatibles may 404
            await self._call("delete_object", key, Key=key)

    # -- presigned URLs -----------------------------------------------------------------------

    async def download_url(self, key: str, expires_in: int) -> str:
        validate_key(key)
        with _translate(key):
            url = await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=expires_in
            )
        return str(url)

    async def upload_url(
        self, key: str, expires_in: int, content_type: str, max_size: int
    ) -> PresignedUpload:
        validate_key(key)
        validate_content_type(content_type)
        if max_size < 1:
            raise ValueError("max_size must be positive")
        with _translate(key):
            post = await self._client.generate_presigned_post(
                Bucket=self._bucket,
                Key=key,  # botocore adds the {"key": key} condition: the key is fixed
                Fields={"Content-Type": content_type},
                Conditions=[{"Content-Type": content_type}, ["content-length-range", 1, max_size]],
                ExpiresIn=expires_in,
            )
        return PresignedUpload(
            url=str(post["url"]),
            method="POST",
            expires_in=expires_in,
            fields={str(k): str(v) for k, v in post["fields"].items()},
        )

    async def ping(self) -> None:
        try:
            await self._call("head_bucket", "bucket")
        except BackendUnavailable:
            raise
        except BlobError as exc:
            raise BackendUnavailable(f"S3 bucket not usable: {exc}") from exc

    async def close(self) -> None:
        await self._stack.aclose()

"""Blob store: ``LocalBlobStore`` (directory + HMAC-signed URLs) and ``S3BlobStore`` (aiobotocore)."""

from shared.blobs.base import BlobInfo, BlobStore, PresignedUpload

__all__ = ["BlobInfo", "BlobStore", "PresignedUpload"]

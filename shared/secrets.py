"""Secrets the server generates once and keeps in DATA_DIR when the operator sets none.

Created with O_EXCL so several workers starting together agree on one value.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path


def load_or_create(path: Path, nbytes: int = 32) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another worker is writing it right now
            data = path.read_bytes().strip()
            if data:
                return bytes.fromhex(data.decode())
            time.sleep(0.02)
        raise RuntimeError(f"{path} exists but is empty") from None
    value = secrets.token_bytes(nbytes)
    with os.fdopen(fd, "w") as fh:
        fh.write(value.hex())
    return value


def opaque_token(prefix: str = "", nbytes: int = 32) -> str:
    """A secret of ``nbytes`` CSPRNG bytes in ``[A-Za-z0-9_-]`` after ``prefix``."""
    return prefix + secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    """How opaque secrets are stored: SHA-256 hex (they carry >=128 bits, so no salt/stretch)."""
    return hashlib.sha256(token.encode()).hexdigest()


def hash_id(value: str, length: int = 16) -> str:
    """Device/book/IP ids as they appear in logs and the audit log: SHA-256, truncated."""
    return hashlib.sha256(value.encode()).hexdigest()[:length]

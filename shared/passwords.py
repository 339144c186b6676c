"""Password hashing: argon2id (libsodium through PyNaCl), always off the event loop.

Hashing costs ``ARGON2_MEMLIMIT`` bytes and tens of milliseconds of CPU on purpose, so it runs on a
small dedicated thread pool: the loop keeps serving, and a login flood queues for the pool instead
of allocating 64 MiB per concurrent request.

``verify_password(None, ...)`` checks against a dummy hash made with the same parameters, so an
unknown email costs the same time as a wrong password (no account enumeration by timing).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

from nacl import exceptions as nacl_exceptions
from nacl import pwhash

from shared.config import Settings

# Bounded: at most this many hashes (and their memory) at once per process.
_POOL = ThreadPoolExecutor(
    max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="argon2"
)
_dummy_hashes: dict[tuple[int, int], bytes] = {}
_dummy_lock = threading.Lock()


def _hash(password: str, opslimit: int, memlimit: int) -> bytes:
    return pwhash.argon2id.str(password.encode("utf-8"), opslimit=opslimit, memlimit=memlimit)


def _dummy(opslimit: int, memlimit: int) -> bytes:
    with _dummy_lock:
        found = _dummy_hashes.get((opslimit, memlimit))
        if found is None:
            found = _hash(secrets.token_urlsafe(16), opslimit, memlimit)
            _dummy_hashes[(opslimit, memlimit)] = found
        return found


def _verify(stored: str | None, password: str, opslimit: int, memlimit: int) -> bool:
    encoded = stored.encode("ascii") if stored is not None else _dummy(opslimit, memlimit)
    try:
        ok = pwhash.argon2id.verify(encoded, password.encode("utf-8"))
    except (
        nacl_exceptions.InvalidkeyError,
        nacl_exceptions.RuntimeError,
        nacl_exceptions.ValueError,
    ):
        return False
    return bool(ok) and stored is not None


async def hash_password(password: str, settings: Settings) -> str:
    loop = asyncio.get_running_loop()
    hashed = await loop.run_in_executor(
        _POOL, _hash, password, settings.argon2_opslimit, settings.argon2_memlimit
    )
    return hashed.decode("ascii")


async def verify_password(stored: str | None, password: str, settings: Settings) -> bool:
    """True when ``password`` matches ``stored``; ``stored=None`` (no such user) is always False."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        _POOL, _verify, stored, password, settings.argon2_opslimit, settings.argon2_memlimit
    )

"""``RedisCodeStore``: pairing records as Redis hashes, shared by every node.

Key layout, ``P`` being ``REDIS_PREFIX``: one hash ``P + "pairing:" + digest`` per code, with the
fields of ``PairingRecord`` (times as decimal unix ms). Its TTL is the record's lifetime
(``keep_until``), so Redis drops it by itself; every script touches that one key, so on a Redis
Cluster it runs on the master of the key's slot.

* ``create``: one script, ``EXISTS`` then ``HSET`` + ``PEXPIRE``: a key that exists is refused
  (the ``SET NX`` of a hash), so a code is unique among the records kept.
* ``mark_matched``: one script, a compare-and-set of ``state`` from ``pending``: of two
  verifications of one code exactly one sees ``pending``.
* ``unmark``: the way back for a match whose join failed in the database (``transactional`` is
  False: Redis cannot roll back with the SQL transaction), only if that match is still ours.

The ids in a record (book, generating device, peer) are sealed (XSalsa20-Poly1305) under a key
derived from the server key *and the code*: Redis, a dump of it or a MONITOR sees digests and
ciphertext only (the zero-knowledge test scans it), and only a request carrying the code can open
its record. The nonce is derived from the field and its value, so sealing is deterministic and
the scripts can still compare a peer id they are given.

TTLs are relative (``PEXPIRE``), computed from this process's clock, so a skew between the node and
Redis moves nothing. Every redis-py error becomes ``BackendUnavailable``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import nacl.exceptions
import nacl.secret
from redis.exceptions import RedisClusterException, RedisError

from shared.clock import now_ms
from shared.errors import BackendUnavailable
from shared.pairing import LINGER_S, MATCHED, PENDING, CodeStore, PairingRecord, digest
from shared.redis_cluster import command_client, run_on_cluster
from shared.store.base import Executor

CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 5.0
POOL_SIZE = 16  # pairing is rare next to the limiter's traffic
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)

# KEYS[1]; ARGV: ttl_ms, then field, value pairs. Returns 1 when created, 0 when the key exists.
CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1]; ARGV: pending, matched, peer, now_ms, keep_until_ms, ttl_ms. 1 when swapped.
MATCH_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'peer_device_id', ARGV[3], 'matched_at', ARGV[4],
           'keep_until', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""

# KEYS[1]; ARGV: matched, peer, pending, keep_until_ms, ttl_ms. 1 when undone.
UNMARK_LUA = """
local f = redis.call('HMGET', KEYS[1], 'state', 'peer_device_id')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'peer_device_id', 'matched_at')
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'keep_until', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

_INTS = ("created_at", "expires_at", "keep_until", "matched_at")
_SEALED = ("book_id", "device_id", "peer_device_id")


def _record(fields: dict[bytes, bytes], unseal: Any) -> PairingRecord:
    text = {k.decode(): v.decode() for k, v in fields.items()}
    for name in _SEALED:
        if name in text:
            text[name] = unseal(text[name])
    values: dict[str, Any] = {
        name: int(text[name]) if name in _INTS else text[name]
        for name in PairingRecord.__slots__
        if name in text
    }
    return PairingRecord(**values)


class RedisCodeStore:
    transactional = False

    def __init__(self, url: str, key: bytes, *, prefix: str = "sb:", cluster: bool = False) -> None:
        self._key = key
        self._prefix = prefix + "pairing:"
        self._client, self._gate = command_client(
            url,
            cluster=cluster,
            pool_size=POOL_SIZE,
            connect_timeout_s=CONNECT_TIMEOUT_S,
            command_timeout_s=COMMAND_TIMEOUT_S,
        )
        self._create = self._client.register_script(CREATE_LUA)
        self._match = self._client.register_script(MATCH_LUA)
        self._unmark = self._client.register_script(UNMARK_LUA)

    def _name(self, code: str) -> str:
        return self._prefix + digest(self._key, code)

    def _box(self, code: str) -> nacl.secret.SecretBox:
        key = hmac.new(self._key, b"seal:" + code.encode("ascii"), hashlib.sha256).digest()
        return nacl.secret.SecretBox(key)

    def _seal(self, code: str, name: str, value: str) -> str:
        nonce = hmac.new(self._key, f"{code}:{name}:{value}".encode(), hashlib.sha256).digest()
        sealed = self._box(code).encrypt(value.encode(), nonce[: nacl.secret.SecretBox.NONCE_SIZE])
        return base64.b64encode(bytes(sealed)).decode("ascii")

    def _unsealer(self, code: str) -> Any:
        box = self._box(code)

        def unseal(text: str) -> str:
            try:
                return box.decrypt(base64.b64decode(text)).decode()
            except (nacl.exceptions.CryptoError, ValueError) as exc:
                raise BackendUnavailable("a pairing record could not be opened") from exc

        return unseal

    async def _run(self, action: str, command: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._gate is None:
                return await command(*args, **kwargs)
            return await run_on_cluster(self._client, self._gate, command, *args, **kwargs)
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(
                f"redis pairing {action} failed: {exc.__class__.__name__}"
            ) from exc

    async def create(self, code: str, record: PairingRecord) -> bool:
        fields: list[Any] = []
        for name in PairingRecord.__slots__:
            value = getattr(record, name)
            if value is not None:
                fields += [name, self._seal(code, name, value) if name in _SEALED else value]
        ttl = max(1, record.keep_until - now_ms())
        created = await self._run(
            "create", self._create, keys=[self._name(code)], args=[ttl, *fields]
        )
        return int(created) == 1

    async def get(self, code: str, ex: Executor | None = None) -> PairingRecord | None:
        fields = await self._run("get", self._client.hgetall, self._name(code))
        return _record(fields, self._unsealer(code)) if fields else None

    async def mark_matched(
        self, code: str, peer_device_id: str, now: int, ex: Executor | None = None
    ) -> bool:
        keep_until = now + LINGER_S * 1000
        ttl = max(1, keep_until - now_ms())
        peer = self._seal(code, "peer_device_id", peer_device_id)
        args = [PENDING, MATCHED, peer, now, keep_until, ttl]
        swapped = await self._run("match", self._match, keys=[self._name(code)], args=args)
        return int(swapped) == 1

    async def unmark(self, code: str, peer_device_id: str, record: PairingRecord) -> None:
        ttl = max(1, record.keep_until - now_ms())
        peer = self._seal(code, "peer_device_id", peer_device_id)
        args = [MATCHED, peer, PENDING, record.keep_until, ttl]
        await self._run("unmark", self._unmark, keys=[self._name(code)], args=args)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except REDIS_ERRORS:
            pass


_: type[CodeStore] = RedisCodeStore

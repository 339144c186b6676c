"""The hub's broker envelope: ``msgpack([message, exclude_device, seq])``.

Shared by the relay (relay/hub.py delivers it to local sockets) and by whoever publishes to
sockets from outside a socket (the book op writer, ``POST /relay/send``). A sequenced publish sends
the array header and the first two items; the broker appends ``seq`` (one MessagePack integer)
atomically with its counter (shared/broker/base.py).
"""

from __future__ import annotations

from typing import Any

import msgpack
from msgpack import packb as _packb

Message = dict[str, Any]

_SEQUENCED_HEAD = b"\x93"  # MessagePack fixarray of 3: message, exclude_device, seq


def pack_envelope(
    message: Message, exclude_device: str | None, *, sequenced: bool = False, seq: int | None = None
) -> bytes:
    """The broker bytes; ``sequenced`` leaves the third item (seq) for the broker to append,
    otherwise ``seq`` (a seq given by the store) rides in it."""
    if sequenced:
        return b"".join(
            (_SEQUENCED_HEAD, _packb(message, use_bin_type=True), _packb(exclude_device))
        )
    return _packb([message, exclude_device, seq], use_bin_type=True)  # type: ignore[no-any-return]


def unpack_envelope(data: bytes) -> tuple[Message, str | None, int | None]:
    message, exclude, seq = msgpack.unpackb(data, raw=False)
    return message, exclude, seq

"""``BOOK_RETENTION``: how much ciphertext a book keeps for catch-up (realtime.md "Book relay").

The value is an age and/or a size per book, separated by a comma or a space: ``30d,64MiB`` (the
default), ``7d``, ``16MiB``, ``12h 1GiB``. Ages take ``s``/``m``/``h``/``d``; sizes ``B``, ``KiB``,
``MiB``, ``GiB`` (``KB``/``MB``/``GB`` are read as the same binary units). ``0`` (or ``none``, or
``off``) stores nothing: the relay is the PRD's pure relay and ``ack`` means "relayed to the
devices connected now".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.config import ConfigError

_AGE = re.compile(r"^(\d+)(s|m|h|d)$")
_SIZE = re.compile(r"^(\d+)(b|kib|mib|gib|kb|mb|gb)$")
_AGE_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_B = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1 << 10, "mb": 1 << 20}
_SIZE_B["gb"] = 1 << 30


@dataclass(frozen=True, slots=True)
class Retention:
    enabled: bool
    max_age_s: int | None = None  # None: no age limit
    max_bytes: int | None = None  # None: no size limit

    @classmethod
    def parse(cls, text: str) -> Retention:
        value = text.strip().lower()
        if value in ("0", "none", "off", ""):
            return cls(enabled=False)
        age: int | None = None
        size: int | None = None
        for part in re.split(r"[,\s]+", value):
            if m := _AGE.match(part):
                age = int(m.group(1)) * _AGE_S[m.group(2)]
            elif m := _SIZE.match(part):
                size = int(m.group(1)) * _SIZE_B[m.group(2)]
            else:
                raise ConfigError(
                    f"BOOK_RETENTION: {part!r} is neither an age (30d, 12h) nor a size (64MiB)"
                )
        if age == 0 or size == 0:
            return cls(enabled=False)
        return cls(enabled=True, max_age_s=age, max_bytes=size)

"""Time as the store keeps it (unix milliseconds) and as REST bodies show it (ISO-8601 UTC)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_ms(ms: int | None) -> str | None:
    """``1700000000123`` -> ``"2023-11-14T22:13:20.123Z"``; None stays None."""
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_iso_ms(text: str) -> int:
    """An ISO-8601 time as unix ms; a time without offset is taken as UTC. Raises ValueError."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)

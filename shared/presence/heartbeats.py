"""Heartbeats: what a daemon reports (``status``, ``metrics``) and when it was last heard from.

``parse_heartbeat`` checks a heartbeat body (the ``/ws`` ``heartbeat`` request; the REST
``POST /daemon/heartbeat`` takes the same fields) and raises ``ValueError`` with a message naming
the field. ``HeartbeatLog`` collects heartbeat timestamps and writes them to the store in one
statement per flush (``inbox_devices.last_seen_at``, which only moves forward), never one write
per heartbeat: a device heartbeating every second costs one row update per flush interval.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.services import Services

log = logging.getLogger("switchboard.presence")

MAX_STATUS_CHARS = 64
MAX_GPUS = 64
MAX_MODEL_CHARS = 128
MAX_METRICS_BYTES = 16384  # the whole metrics object, JSON-encoded
FLUSH_CHUNK = 1000  # rows per statement


@dataclass(frozen=True, slots=True)
class HeartbeatReport:
    status: str | None
    metrics: dict[str, Any] | None


def _number(value: Any, path: str, *, most: float | None = None) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (most is not None and value > most):
        bound = f"between 0 and {most:g}" if most is not None else ">= 0"
        raise ValueError(f"'{path}' must be a number {bound}")


def _gpu(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"'{path}' must be an object")
    index = value.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"'{path}.index' must be a non-negative integer")
    model = value.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL_CHARS):
        raise ValueError(f"'{path}.model' must be a string of at most {MAX_MODEL_CHARS} characters")
    for name in ("memory_total", "memory_used"):
        if value.get(name) is not None:
            _number(value[name], f"{path}.{name}")
    total, used = value.get("memory_total"), value.get("memory_used")
    if total is not None and used is not None and used > total:
        raise ValueError(f"'{path}.memory_used' must not exceed '{path}.memory_total'")
    if value.get("utilization") is not None:
        _number(value["utilization"], f"{path}.utilization", most=100)


def parse_heartbeat(body: Mapping[str, Any]) -> HeartbeatReport:
    """``{status?, metrics?: {cpu, memory, gpus: [{index, model, memory_total, memory_used,
    utilization}]}}``. Known fields are checked; other metrics pass through (new agents may
    report more), bounded by ``MAX_METRICS_BYTES``."""
    status = body.get("status")
    if status is not None and (
        not isinstance(status, str) or not 1 <= len(status) <= MAX_STATUS_CHARS
    ):
        raise ValueError(f"'status' must be a string of 1 to {MAX_STATUS_CHARS} characters")
    metrics = body.get("metrics")
    if metrics is None:
        return HeartbeatReport(status, None)
    if not isinstance(metrics, dict):
        raise ValueError("'metrics' must be an object")
    if metrics.get("cpu") is not None:
        _number(metrics["cpu"], "metrics.cpu")
    if metrics.get("memory") is not None:
        _number(metrics["memory"], "metrics.memory")
    gpus = metrics.get("gpus")
    if gpus is not None:
        if not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
            raise ValueError(f"'metrics.gpus' must be a list of at most {MAX_GPUS} objects")
        for i, gpu in enumerate(gpus):
            _gpu(gpu, f"metrics.gpus[{i}]")
    try:
        size = len(json.dumps(metrics, allow_nan=False, default=_refuse))
    except (TypeError, ValueError):
        raise ValueError("'metrics' must hold JSON values only (finite numbers)") from None
    if size > MAX_METRICS_BYTES:
        raise ValueError(f"'metrics' must encode to at most {MAX_METRICS_BYTES} bytes")
    return HeartbeatReport(status, metrics)


def _refuse(value: Any) -> Any:
    raise TypeError(type(value).__name__)  # msgpack bytes and the like are not metrics


# Only forward: the inbox's own ack flush writes last_seen_at too, and a late batch from either
# must not move it back.
_TOUCH = (
    "UPDATE inbox_devices SET last_seen_at = $3"
    " WHERE user_id = $1 AND device_id = $2 AND last_seen_at < $3"
)


class HeartbeatLog:
    """Heartbeat timestamps waiting for the next flush: ``record`` is O(1) and writes nothing."""

    def __init__(self, services: Services) -> None:
        self.services = services  # the store is looked up at each flush, not captured
        self._pending: dict[tuple[str, str], int] = {}  # (user, device) -> newest heartbeat ms

    def record(self, user_id: str, device_id: str, at_ms: int) -> None:
        key = (user_id, device_id)
        if at_ms > self._pending.get(key, 0):
            self._pending[key] = at_ms

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Write what was recorded since the last flush; the number of devices written.

        On failure the rows are kept for the next flush (newer heartbeats win) and the error is
        raised."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        rows = [(u, d, at) for (u, d), at in batch.items()]
        try:
            for i in range(0, len(rows), FLUSH_CHUNK):
                await self.services.db.executemany(_TOUCH, rows[i : i + FLUSH_CHUNK])
        except BaseException:
            for (u, d), at in batch.items():
                self.record(u, d, at)
            raise
        return len(rows)


__all__ = ["HeartbeatLog", "HeartbeatReport", "parse_heartbeat"]

"""Prometheus metrics: every name README.md "Operations" lists, plus the relay's own.

Several workers (``WORKERS`` > 1) each count their own traffic, and one scrape of ``/metrics``
must see the sum, whichever worker answers it. prometheus_client's multiprocess mode does that:
every process writes its values to mmap files in ``PROMETHEUS_MULTIPROC_DIR`` and ``render()``
merges the files. prometheus_client picks its value storage **when it is first imported**, so:

* the CLI calls ``prepare_multiprocess(dir)`` in the parent before any worker starts and before
  any metric is touched (this module does not import prometheus_client until then);
* the parent calls ``mark_process_dead(pid)`` when a worker exits, so live gauges forget it.

Metrics are created on first attribute access (PEP 562 ``__getattr__``), so importing this module
anywhere is safe; after that first access they are plain module globals. Use them as
``from shared import metrics`` then ``metrics.FRAMES_IN_RELAY.inc()``; do not copy them into your
own module at import time (that would create them before ``prepare_multiprocess`` could run).

Hot paths use the pre-bound label children (``FRAMES_IN_RELAY``, ``SYNC_OPS_ACCEPTED``...):
``.labels()`` takes a lock and a dict lookup per call, a bound child is one ``inc``.

Labels are closed sets only; ids (book, device, user) never become labels: unbounded
cardinality, and they identify people. ``endpoint`` is ``relay`` (``/ws/relay/{book_id}``) or
``ws`` (``/ws``); ``route`` is the route template, never the raw path.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.codes import ErrorCode

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.metrics import MetricWrapperBase

ENV = "PROMETHEUS_MULTIPROC_DIR"

# The Home Pocket seed's buckets, refined at the low end where REST answers usually land.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0)
ENDPOINTS = ("relay", "ws")
SYNC_RESULTS = ("accepted", "duplicate", "rejected")

if TYPE_CHECKING:
    # -- REST ------------------------------------------------------------------------------
    HTTP_REQUESTS: Counter  # {method, route, status}
    HTTP_DURATION: Histogram  # {method, route}
    API_ERRORS: Counter  # {code}: every ErrorCode, pre-created at zero
    # -- realtime --------------------------------------------------------------------------
    WS_CONNECTIONS: Gauge  # {endpoint}, livesum over workers
    WS_CONNECTIONS_RELAY: Gauge
    WS_CONNECTIONS_WS: Gauge
    SYNC_OPS: Counter  # {result}: CRDT ops on the book relay
    SYNC_OPS_ACCEPTED: Counter
    SYNC_OPS_DUPLICATE: Counter
    SYNC_OPS_REJECTED: Counter
    FRAMES_IN: Counter  # {endpoint}
    FRAMES_IN_RELAY: Counter
    FRAMES_IN_WS: Counter
    FRAMES_OUT: Counter  # {endpoint}
    FRAMES_OUT_RELAY: Counter
    FRAMES_OUT_WS: Counter
    BYTES_IN: Counter  # {endpoint}
    BYTES_IN_RELAY: Counter
    BYTES_IN_WS: Counter
    BYTES_OUT: Counter  # {endpoint}
    BYTES_OUT_RELAY: Counter
    BYTES_OUT_WS: Counter
    SLOW_CLOSES: Counter  # {endpoint}: closes with 4008
    SLOW_CLOSES_RELAY: Counter
    SLOW_CLOSES_WS: Counter
    INBOX_LAG: Histogram  # publish -> written to a /ws socket, seconds
    # -- tasks and devices -----------------------------------------------------------------
    TASKS_CREATED: Counter
    TASKS_COMPLETED: Counter
    TASKS_FAILED: Counter
    DEVICES_ONLINE: Gauge  # cluster-wide count from the presence store; newest value wins
    # -- backends --------------------------------------------------------------------------
    DB_CONNECTIONS: Gauge  # pool connections checked out, livesum over workers
    DB_QUERY_DURATION: Histogram
    REDIS_OPERATIONS: Counter  # {command, result}: command is a fixed name from our code
    REDIS_COMMANDS: Counter  # Redis round trips (a pipeline counts each command)


def _build() -> dict[str, MetricWrapperBase]:
    from prometheus_client import Counter, Gauge, Histogram

    m: dict[str, Any] = {}
    m["HTTP_REQUESTS"] = Counter(
        "http_requests_total", "REST requests answered.", ["method", "route", "status"]
    )
    m["HTTP_DURATION"] = Histogram(
        "http_request_duration_seconds",
        "REST request duration.",
        ["method", "route"],
        buckets=HTTP_BUCKETS,
    )
    m["API_ERRORS"] = errors = Counter(
        "api_errors_total", "Error envelopes sent, by code.", ["code"]
    )
    for code in ErrorCode:
        errors.labels(code=code.value)

    m["WS_CONNECTIONS"] = conns = Gauge(
        "websocket_connections_active",
        "Open WebSocket connections.",
        ["endpoint"],
        multiprocess_mode="livesum",
    )
    m["SYNC_OPS"] = sync = Counter("sync_operations_total", "CRDT operations received.", ["result"])
    for result in SYNC_RESULTS:
        m[f"SYNC_OPS_{result.upper()}"] = sync.labels(result=result)
    m["FRAMES_IN"] = frames_in = Counter(
        "relay_frames_in_total", "WebSocket messages received.", ["endpoint"]
    )
    m["FRAMES_OUT"] = frames_out = Counter(
        "relay_frames_out_total", "WebSocket messages sent.", ["endpoint"]
    )
    m["BYTES_IN"] = bytes_in = Counter(
        "relay_bytes_in_total", "WebSocket payload bytes received.", ["endpoint"]
    )
    m["BYTES_OUT"] = bytes_out = Counter(
        "relay_bytes_out_total", "WebSocket payload bytes sent.", ["endpoint"]
    )
    m["SLOW_CLOSES"] = slow = Counter(
        "relay_slow_consumer_closes_total",
        "Connections closed for falling behind (4008).",
        ["endpoint"],
    )
    for endpoint in ENDPOINTS:
        suffix = endpoint.upper()
        m[f"WS_CONNECTIONS_{suffix}"] = conns.labels(endpoint=endpoint)
        m[f"FRAMES_IN_{suffix}"] = frames_in.labels(endpoint=endpoint)
        m[f"FRAMES_OUT_{suffix}"] = frames_out.labels(endpoint=endpoint)
        m[f"BYTES_IN_{suffix}"] = bytes_in.labels(endpoint=endpoint)
        m[f"BYTES_OUT_{suffix}"] = bytes_out.labels(endpoint=endpoint)
        m[f"SLOW_CLOSES_{suffix}"] = slow.labels(endpoint=endpoint)
    m["INBOX_LAG"] = Histogram(
        "inbox_lag_seconds", "Delay from publish to the write on a /ws socket.", buckets=LAG_BUCKETS
    )

    m["TASKS_CREATED"] = Counter("tasks_created_total", "Tasks created.")
    m["TASKS_COMPLETED"] = Counter("tasks_completed_total", "Tasks completed.")
    m["TASKS_FAILED"] = Counter("tasks_failed_total", "Tasks failed for good (retries exhausted).")
    m["DEVICES_ONLINE"] = Gauge(
        "devices_online_total",
        "Devices online (cluster-wide, from the presence store).",
        multiprocess_mode="livemostrecent",
    )

    m["DB_CONNECTIONS"] = Gauge(
        "database_connections_active", "Database connections in use.", multiprocess_mode="livesum"
    )
    m["DB_QUERY_DURATION"] = Histogram(
        "database_query_duration_seconds", "Database statement duration.", buckets=DB_BUCKETS
    )
    m["REDIS_OPERATIONS"] = Counter(
        "redis_operations_total",
        "Redis operations by command and result (ok|error).",
        ["command", "result"],
    )
    m["REDIS_COMMANDS"] = Counter("redis_commands_total", "Redis commands sent.")
    return m


_built = False


def _ensure_built() -> None:
    global _built
    if not _built:
        globals().update(_build())
        _built = True


if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name.isupper() and not _built:
            _ensure_built()
            if name in globals():
                return globals()[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_multiprocess(path: Path) -> None:
    """Switch this process and the workers it starts to multiprocess metrics in ``path``.

    Call once in the parent before workers start. Empties ``path``: files left by an earlier run
    would be summed into this one's counters.
    """
    if _built:
        raise RuntimeError("prepare_multiprocess() must run before any metric is used")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[ENV] = str(path)
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported by someone else already: re-pick the storage
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]


def mark_process_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters keep counting in the total)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def render() -> tuple[bytes, str]:
    """The exposition text and its content type; merged over every worker in multiprocess mode."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    _ensure_built()
    if os.environ.get(ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

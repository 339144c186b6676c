"""Operations: ``/health``, ``/ready``, ``/metrics``, the OpenAPI document, and per-request
metrics plus one access-log line per request (``setup`` installs that middleware).

``/health`` answers while the process runs (a liveness probe must not fail because PostgreSQL
blinked, or every worker gets restarted at once). ``/ready`` checks the store, the broker and the
blob store concurrently, each bounded by ``READY_TIMEOUT_S``, so a load balancer stops sending
traffic to a node that cannot serve it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from api.envelope import REQUEST_ID_KEY, error_response, ok
from api.keys import SERVICES
from api.openapi import build_openapi, errors, json_ok
from shared import metrics
from shared.codes import ErrorCode

routes = web.RouteTableDef()
log = logging.getLogger("switchboard.ops")
access_log = logging.getLogger("switchboard.access")

# Method names outside this set are counted as OTHER: a client must not be able to mint series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of 404/405 and anything the router did not match


@routes.get("/health")
async def health(request: web.Request) -> web.StreamResponse:
    return ok(request, {"status": "ok"})


async def _check(ping: Callable[[], Awaitable[None]], timeout: float) -> str:
    try:
        await asyncio.wait_for(ping(), timeout)
    except TimeoutError:
        return "timeout"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; the cause goes to the log
        log.warning("readiness check failed: %s", type(exc).__name__)
        return "down"
    return "ok"


@routes.get("/ready")
async def ready(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    backends: dict[str, Callable[[], Awaitable[None]]] = {
        "database": services.db.ping,
        "broker": services.broker.ping,
        "blobs": services.blobs.ping,
    }
    timeout = services.settings.ready_timeout_s
    results = await asyncio.gather(*(_check(ping, timeout) for ping in backends.values()))
    checks = dict(zip(backends, results, strict=True))
    down = sorted(name for name, state in checks.items() if state != "ok")
    if down:
        return error_response(
            request,
            ErrorCode.SERVICE_UNAVAILABLE,
            "not ready: " + ", ".join(down),
            {"checks": checks, "down": down},
            headers={"Retry-After": "5"},
        )
    return ok(request, {"status": "ok", "checks": checks})


@routes.get("/metrics")
async def prometheus_metrics(request: web.Request) -> web.StreamResponse:
    # Merging the multiprocess files reads a few small files: off the event loop.
    body, content_type = await asyncio.to_thread(metrics.render)
    return web.Response(body=body, headers={"Content-Type": content_type})


@routes.get("/api/v1/openapi.json")
async def openapi(request: web.Request) -> web.StreamResponse:
    return web.json_response(build_openapi(request.app))


def route_label(request: web.Request) -> str:
    """The matched route's template (``/api/v1/tokens/{id}``), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def _error_code(response: web.StreamResponse) -> str | None:
    """The envelope's ``error.code`` of an error response (error path only, bodies are small)."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    try:
        code = json.loads(response.body)["error"]["code"]  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError):
        return None
    return code if code in ErrorCode.__members__ else None


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: sees the final status, after the envelope middleware ran."""
    start = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # only non-error statuses get past the envelope middleware
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # client went away (nginx's convention)
        raise
    finally:
        elapsed = time.perf_counter() - start
        method = request.method if request.method in _METHODS else "OTHER"
        route = route_label(request)
        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
        metrics.HTTP_DURATION.labels(method, route).observe(elapsed)
        code = _error_code(response) if response is not None and status >= 400 else None
        if code is not None:
            metrics.API_ERRORS.labels(code).inc()
        # The route template, not the path: no ids, and never a query string (tokens ride there).
        access_log.info(
            "%s %s %d",
            method,
            route,
            status,
            extra={
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "request_id": request.get(REQUEST_ID_KEY),
                **({"error_code": code} if code else {}),
            },
        )


def setup(app: web.Application) -> None:
    # Outermost, so it measures the whole chain and sees the status the client gets. The list
    # is mutable until the app freezes at startup.
    app.middlewares.insert(0, metrics_middleware)


OPENAPI = {
    "/health": {
        "get": {
            "summary": "Liveness: the process is up",
            "tags": ["operations"],
            "responses": {
                "200": json_ok("Up.", {"type": "object", "properties": {"status": {"const": "ok"}}})
            },
        }
    },
    "/ready": {
        "get": {
            "summary": "Readiness: store, broker and blob store reachable",
            "tags": ["operations"],
            "responses": {
                "200": json_ok(
                    "Every backend answered.",
                    {
                        "type": "object",
                        "properties": {
                            "status": {"const": "ok"},
                            "checks": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                    },
                ),
                **errors(503),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics, merged over every worker (not enveloped)",
            "tags": ["operations"],
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "summary": "This OpenAPI 3.1 document (not enveloped)",
            "tags": ["operations"],
            "responses": {
                "200": {
                    "description": "The document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
}

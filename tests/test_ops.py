"""Operations: /health, /ready, /metrics (one process and several), logs, the envelope for
router errors, request ids, body limits, and the OpenAPI document against the real router."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import multiprocessing
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.validation import read_json
from shared import metrics
from shared.codes import ErrorCode
from shared.config import Settings
from shared.logs import MASK, configure_logging
from shared.services import Services, open_services

README_METRICS = (
    "http_requests_total", "http_request_duration_seconds", "api_errors_total",
    "websocket_connections_active", "sync_operations_total", "tasks_created_total",
    "tasks_completed_total", "tasks_failed_total", "devices_online_total",
    "database_connections_active", "database_query_duration_seconds", "redis_operations_total",
    "redis_commands_total",
)
RELAY_METRICS = (
    "relay_frames_in_total", "relay_frames_out_total", "relay_bytes_in_total", "relay_bytes_out_total",
    "relay_slow_consumer_closes_total", "inbox_lag_seconds",
)


@pytest.fixture
async def services(make_settings: Callable[..., Settings]) -> AsyncIterator[Services]:
    svc = await open_services(make_settings())
    yield svc
    await svc.close()


async def _client(app: web.Application) -> TestClient[web.Request, web.Application]:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def client(services: Services) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = await _client(create_app(services))
    yield client
    await client.close()


def _assert_error(body: dict[str, Any], code: ErrorCode) -> None:
    assert body["success"] is False
    assert body["error"]["code"] == code.value
    assert isinstance(body["error"]["message"], str)
    assert body["meta"]["request_id"].startswith("req-")


# -- health and readiness ------------------------------------------------------------------


async def test_health_answers_ok_with_version_and_request_id(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["success"] is True and body["data"] == {"status": "ok"}
    assert resp.headers["API-Version"] == "1.0"
    assert resp.headers["X-Request-ID"].startswith("req-")
    assert body["meta"]["request_id"] == resp.headers["X-Request-ID"]


async def test_client_request_id_is_echoed(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/health", headers={"X-Request-ID": "trace-42.a"})
    assert resp.headers["X-Request-ID"] == "trace-42.a"
    assert (await resp.json())["meta"]["request_id"] == "trace-42.a"


async def _assert_ready(settings: Settings) -> None:
    svc = await open_services(settings)
    client = await _client(create_app(svc))
    try:
        resp = await client.get("/ready")
        body = await resp.json()
        assert resp.status == 200, body
        assert body["data"] == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "blobs": "ok"}}
    finally:
        await client.close()
        await svc.close()


async def test_ready_on_the_embedded_default(make_settings: Callable[..., Settings]) -> None:
    """SQLite, in-process broker, local blob directory."""
    await _assert_ready(make_settings())


async def test_ready_on_postgresql_and_redis(
    make_settings: Callable[..., Settings], pg_url: str, pg_schema: str, redis_url: str, redis_prefix: str
) -> None:
    await _assert_ready(
        make_settings(database_url=pg_url, database_schema=pg_schema, redis_url=redis_url, redis_prefix=redis_prefix)
    )


async def test_ready_503_names_a_closed_database(services: Services, client: TestClient[web.Request, web.Application]) -> None:
    await services.db.close()
    resp = await client.get("/ready")
    assert resp.status == 503
    body = await resp.json()
    _assert_error(body, ErrorCode.SERVICE_UNAVAILABLE)
    assert body["error"]["details"]["down"] == ["database"]
    assert body["error"]["details"]["checks"]["broker"] == "ok"
    assert resp.headers["Retry-After"] == "5"
    # Liveness does not depend on the backends.
    assert (await client.get("/health")).status == 200


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_ready_503_when_redis_is_unreachable(make_settings: Callable[..., Settings]) -> None:
    svc = await open_services(make_settings(redis_url=f"redis://127.0.0.1:{_closed_port()}/0", ready_timeout_s=1.0))
    client = await _client(create_app(svc))
    try:
        resp = await client.get("/ready")
        body = await resp.json()
        assert resp.status == 503, body
        _assert_error(body, ErrorCode.SERVICE_UNAVAILABLE)
        assert "broker" in body["error"]["details"]["down"]
        assert body["error"]["details"]["checks"]["database"] == "ok"
    finally:
        await client.close()
        await svc.close()


# -- router errors, headers, body limit ------------------------------------------------------


async def test_unknown_path_is_404_envelope(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/api/v1/no/such/thing")
    assert resp.status == 404
    _assert_error(await resp.json(), ErrorCode.NOT_FOUND)
    assert resp.headers["API-Version"] == "1.0"


async def test_wrong_method_is_405_envelope(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.post("/health", json={})
    assert resp.status == 405
    body = await resp.json()
    _assert_error(body, ErrorCode.METHOD_NOT_ALLOWED)
    assert "GET" in resp.headers["Allow"]


# Real JSON endpoints that read the body before any credential check, best first.
_JSON_POSTS = ("/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/auth/forgot-password")


async def test_two_mib_json_body_is_413_envelope(services: Services) -> None:
    app = create_app(services)
    existing = {r.resource.canonical for r in app.router.routes() if r.method == "POST" and r.resource}
    path = next((p for p in _JSON_POSTS if p in existing), None)
    if path is None:  # no JSON endpoint registered yet: a stand-in that reads JSON the same way
        path = "/api/v1/test-echo"

        async def echo(request: web.Request) -> web.StreamResponse:
            body = await read_json(request)
            return web.json_response({"email": body.string("email")})

        app.router.add_post(path, echo)
    client = await _client(app)
    try:
        payload = json.dumps({"email": "a@example.com", "password": "x" * (2 * 1024 * 1024)}).encode()
        resp = await client.post(path, data=io.BytesIO(payload), headers={"Content-Type": "application/json"})
        assert resp.status == 413
        _assert_error(await resp.json(), ErrorCode.PAYLOAD_TOO_LARGE)
    finally:
        await client.close()


# -- metrics -------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


async def _scrape(client: TestClient[web.Request, web.Application]) -> tuple[str, dict[Any, float]]:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    return text, _samples(text)


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def test_metrics_lists_every_name_and_counts_by_route_template(services: Services) -> None:
    app = create_app(services)

    async def item(request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": request.match_info["item_id"]})

    app.router.add_get("/api/v1/test-items/{item_id}", item)
    client = await _client(app)
    try:
        text, before = await _scrape(client)
        for name in README_METRICS + RELAY_METRICS:
            assert f"# TYPE {name} " in text, name
        for _ in range(2):
            assert (await client.get("/api/v1/test-items/4711")).status == 200
        assert (await client.get("/api/v1/test-items/4712")).status == 200
        assert (await client.get("/api/v1/nothing-here/123?token=sbt_x")).status == 404
        _, after = await _scrape(client)
    finally:
        await client.close()

    def delta(key: tuple[str, frozenset[tuple[str, str]]]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = "/api/v1/test-items/{item_id}"
    assert delta(_key("http_requests_total", method="GET", route=route, status="200")) == 3
    assert delta(_key("http_request_duration_seconds_count", method="GET", route=route)) == 3
    assert delta(_key("http_requests_total", method="GET", route="unmatched", status="404")) == 1
    assert delta(_key("api_errors_total", code="NOT_FOUND")) == 1
    # Raw paths never become label values (unbounded cardinality, ids, tokens).
    label_values = {value for _, labels in after for _, value in labels}
    assert not {v for v in label_values if "4711" in v or "nothing-here" in v or "sbt_x" in v}


def _count_in_worker(tasks: int, sockets: int) -> None:
    """A worker process: PROMETHEUS_MULTIPROC_DIR comes from the parent's environment."""
    assert os.environ.get(metrics.ENV)
    metrics.TASKS_CREATED.inc(tasks)
    metrics.WS_CONNECTIONS_WS.inc(sockets)
    metrics.HTTP_REQUESTS.labels("GET", "/health", "200").inc()


def _spawn(ctx: Any, *args: int) -> Any:
    proc = ctx.Process(target=_count_in_worker, args=args)
    proc.start()
    return proc


async def test_metrics_aggregate_over_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This process's own metrics are created before the variable is set, as in the real parent,
    # so this test never turns the rest of the session's metrics into multiprocess ones.
    metrics.render()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    monkeypatch.setenv(metrics.ENV, str(prom_dir))
    ctx = multiprocessing.get_context("spawn")
    first, second = _spawn(ctx, 3, 1), _spawn(ctx, 4, 2)
    for proc in (first, second):
        await asyncio.to_thread(proc.join, 60)
        assert proc.exitcode == 0
    samples = _samples(metrics.render()[0].decode())
    assert samples[_key("tasks_created_total")] == 7
    assert samples[_key("http_requests_total", method="GET", route="/health", status="200")] == 2
    assert samples[_key("websocket_connections_active", endpoint="ws")] == 3
    # A dead worker's sockets are gone; what it counted stays in the totals.
    metrics.mark_process_dead(first.pid)
    samples = _samples(metrics.render()[0].decode())
    assert samples[_key("websocket_connections_active", endpoint="ws")] == 2
    assert samples[_key("tasks_created_total")] == 7


def _prepare_then_count(path: str) -> tuple[bool, str, str]:
    """A fresh interpreter playing the CLI parent: prepare first, then use metrics."""
    metrics.prepare_multiprocess(Path(path))
    stale_left = (Path(path) / "counter_1.db").exists()
    metrics.TASKS_FAILED.inc(5)
    return stale_left, os.environ[metrics.ENV], metrics.render()[0].decode()


def test_prepare_multiprocess_empties_the_dir_and_switches_storage(tmp_path: Path) -> None:
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    (prom_dir / "counter_1.db").write_bytes(b"left over from an earlier run")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        stale_left, env, text = pool.submit(_prepare_then_count, str(prom_dir)).result(timeout=60)
    assert not stale_left
    assert env == str(prom_dir)
    assert _samples(text)[_key("tasks_failed_total")] == 5
    assert list(prom_dir.glob("counter_*.db")), "values must live in the shared files"


def test_prepare_multiprocess_refuses_once_metrics_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.ENV, raising=False)
    metrics.render()
    with pytest.raises(RuntimeError):
        metrics.prepare_multiprocess(tmp_path / "prom")
    assert metrics.ENV not in os.environ


# -- logs ----------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("INFO", stream)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


SECRETS = (
    "sbt_Q2hlY2tUaGlzVG9rZW5Jc0xvbmdFbm91Z2g",
    "sbd_ZGFlbW9uS2V5VGhhdE11c3ROb3RMZWFr",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJlLWJ5dGVz",
    "hunter2-correct-horse",
    "refreshR3fr3shR3fr3sh",
    "c2lnLXNpZy1zaWc",
)


def test_log_lines_are_json_with_secrets_masked(json_logs: Callable[[], list[dict[str, Any]]]) -> None:
    sbt, sbd, jwt_text, password, refresh, signature = SECRETS
    log = logging.getLogger("switchboard.test")
    log.info("auth with Authorization: Bearer %s", jwt_text)
    log.info("token %s used by daemon %s", sbt, sbd)
    log.warning(
        "login failed", extra={"password": password, "url": f"/ws?token={sbt}&since=3",
                               "body": {"refresh_token": refresh, "email": "a@example.com"}},
    )
    log.info("blob url /blobs/k?expires=1&signature=%s", signature)
    log.info('request {"email": "a@example.com", "password": "%s"}', password)
    try:
        raise ValueError(f"bad token={refresh}")
    except ValueError:
        log.exception("failed")
    records = json_logs()
    assert len(records) == 6
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= record.keys()
        assert record["logger"] == "switchboard.test"
    dumped = json.dumps(records)
    for secret in SECRETS:
        assert secret not in dumped
    assert records[0]["msg"] == f"auth with Authorization: Bearer {MASK}"
    assert records[1]["msg"] == f"token sbt_{MASK} used by daemon sbd_{MASK}"
    assert records[2]["password"] == MASK and records[2]["level"] == "WARNING"
    assert records[2]["url"] == f"/ws?token={MASK}&since=3"
    assert records[2]["body"] == {"refresh_token": MASK, "email": "a@example.com"}
    assert records[3]["msg"].endswith(f"signature={MASK}")
    assert "ValueError" in records[5]["exc"]


async def test_one_access_line_per_request_without_query(
    client: TestClient[web.Request, web.Application], json_logs: Callable[[], list[dict[str, Any]]]
) -> None:
    resp = await client.get("/health?token=sbt_shouldNotAppearAnywhere", headers={"X-Request-ID": "abc-1"})
    assert resp.status == 200
    await resp.read()
    records = json_logs()
    access = [r for r in records if r["logger"] == "switchboard.access"]
    assert len(access) == 1
    line = access[0]
    assert (line["method"], line["route"], line["status"], line["request_id"]) == ("GET", "/health", 200, "abc-1")
    assert isinstance(line["duration_ms"], float)
    assert "shouldNotAppearAnywhere" not in json.dumps(records)


# -- OpenAPI -------------------------------------------------------------------------------

_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


async def test_openapi_documents_exactly_the_real_routes(client: TestClient[web.Request, web.Application]) -> None:
    from openapi_spec_validator import validate

    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1.")
    validate(doc)
    documented: set[tuple[str, str]] = set()
    relay_served: set[tuple[str, str]] = set()
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            assert operation.get("responses"), f"{method.upper()} {path} has no responses"
            target = relay_served if operation.get("x-served-by") == "relay" else documented
            target.add((method.upper(), path))
    assert relay_served == {("GET", "/ws"), ("GET", "/ws/relay/{book_id}")}
    for path in ("/ws", "/ws/relay/{book_id}"):
        assert {"101", "401", "403", "404", "429", "503"} <= doc["paths"][path]["get"]["responses"].keys()
    # HEAD is what aiohttp adds for every GET; everything else the router serves is documented.
    served = {
        (route.method, route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert served - documented == set(), "routes without documentation"
    assert documented - served == set(), "documentation without routes"
    enum = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(enum) == {code.value for code in ErrorCode}
    assert {"userJwt", "apiToken", "daemonKey", "deviceJwt"} <= doc["components"]["securitySchemes"].keys()

"""Email: templates, the outbox and the sender, on SQLite and PostgreSQL, with a real SMTP server.

Delivery goes to a real aiosmtpd server over TCP (or to ``.eml`` files without ``SMTP_URL``).
The sender under test uses short backoffs so retries happen within the test; the poll interval
is long (60 s) wherever a test relies on ``wake()`` or on ``close()`` flushing.
"""

from __future__ import annotations

import asyncio
import email
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web

from api.keys import SERVICES
from api.routes import mail as mail_routes
from shared.config import Settings
from shared.mail import MAILER_KEY, TEMPLATES, enqueue_email, render, wake_sender
from shared.mail.sender import OutboxSender, backoff_s, smtp_options
from shared.services import Services
from shared.store import Database, open_database
from tests.fixtures.smtp import SmtpServer

TOKEN = "Tok3n_-" + "x" * 40
VERIFY = {"display_name": "Ada", "link": f"http://localhost:8080/verify?token={TOKEN}"}
FROM = "Switchboard <no-reply@switchboard.test>"


class Env:
    """Opens Services (store + settings; the sender needs nothing else) on the test's backend."""

    def __init__(self, make: Callable[..., Settings]) -> None:
        self._make = make
        self._opened: list[Services] = []

    async def services(self, **overrides: Any) -> Services:
        settings = self._make(mail_from=FROM, **overrides)
        db = await open_database(settings.effective_database_url, schema=settings.database_schema)
        unused = cast(Any, None)  # broker, blobs and limiter play no part in email
        svc = Services(settings=settings, db=db, broker=unused, blobs=unused, limiter=unused, jwt_key=b"k")
        self._opened.append(svc)
        return svc

    async def close(self) -> None:
        for svc in self._opened:
            await svc.db.close()


@pytest.fixture
def backend_make_settings(
    backend: str, make_settings: Callable[..., Settings], request: pytest.FixtureRequest
) -> Callable[..., Settings]:
    # Sync on purpose: resolving the async pg_schema with getfixturevalue inside an async
    # fixture that another async fixture depends on fails under pytest-asyncio 1.5
    # ("Runner.run() cannot be called from a running event loop").
    if backend == "sqlite":
        return make_settings
    url, schema = request.getfixturevalue("pg_url"), request.getfixturevalue("pg_schema")

    def make(**overrides: Any) -> Settings:
        return make_settings(database_url=url, database_schema=schema, **overrides)

    return make


@pytest.fixture
async def env(backend_make_settings: Callable[..., Settings]) -> AsyncIterator[Env]:
    environment = Env(backend_make_settings)
    yield environment
    await environment.close()


def fast_sender(svc: Services, **kwargs: Any) -> OutboxSender:
    options: dict[str, Any] = {"poll_s": 60.0, "backoff_base_s": 0.05, "backoff_max_s": 0.2}
    options.update(kwargs)
    return OutboxSender(svc, **options)


async def outbox_row(db: Database, email_id: str) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM outbox WHERE id = $1", email_id)
    assert row is not None
    return dict(row)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- templates -----------------------------------------------------------------------------------


def test_every_template_renders_its_context_values() -> None:
    assert set(TEMPLATES) == {
        "verify_email", "password_reset", "task_created", "task_completed", "task_failed",
        "device_online", "device_offline", "announcement",
    }
    for name, template in TEMPLATES.items():
        context = {field: f"<{field}-value>" for field in template.fields}
        out = render(name, context)
        assert out.subject and "\n" not in out.subject
        for value in context.values():
            assert value in out.subject + out.body, (name, value)


def test_template_fields_are_the_documented_ones() -> None:
    expected = {
        "verify_email": {"display_name", "link"},
        "password_reset": {"display_name", "link"},
        "task_created": {"task_id", "task_type", "device_name"},
        "task_completed": {"task_id", "task_type", "device_name"},
        "task_failed": {"task_id", "task_type", "device_name"},
        "device_online": {"device_name"},
        "device_offline": {"device_name"},
        "announcement": {"title", "text"},
    }
    assert {name: set(t.fields) for name, t in TEMPLATES.items()} == expected


def test_links_are_kept_whole_and_values_are_not_format_strings() -> None:
    out = render("password_reset", {"display_name": "{link}", "link": VERIFY["link"]})
    assert VERIFY["link"] in out.body
    assert out.body.count(VERIFY["link"]) == 1  # "{link}" as a name stays text
    assert "{link}" in out.body
    assert render("verify_email", {"display_name": "", "link": "x"}).body.startswith("Hi there,")


def test_subject_is_one_line_even_from_hostile_values() -> None:
    out = render("device_online", {"device_name": "evil\r\nBcc: victim@example.test"})
    assert "\r" not in out.subject and "\n" not in out.subject


def test_unknown_template_or_missing_value_is_value_error() -> None:
    with pytest.raises(ValueError, match="unknown"):
        render("nope", {})
    with pytest.raises(ValueError, match="link"):
        render("verify_email", {"display_name": "Ada"})


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    for attempts in range(1, 8):
        full = min(100.0, 2.0 ** (attempts - 1))
        samples = [backoff_s(attempts, 1.0, 100.0) for _ in range(50)]
        assert all(full / 2 <= s <= full for s in samples)
        assert len(set(samples)) > 1  # jittered: senders retrying together spread out
    assert all(50.0 <= backoff_s(30, 1.0, 100.0) <= 100.0 for _ in range(20))


def test_smtp_url_schemes() -> None:
    plain = smtp_options("smtp://mail.example.test:2525")
    assert (plain.hostname, plain.port, plain.use_tls, plain.start_tls, plain.username) == (
        "mail.example.test", 2525, False, False, None
    )
    assert smtp_options("smtp://mail.example.test").port == 25
    starttls = smtp_options("smtp+starttls://us%40er:p%3Ass%2Fw@mail.example.test")
    assert (starttls.port, starttls.use_tls, starttls.start_tls) == (587, False, True)
    assert (starttls.username, starttls.password) == ("us@er", "p:ss/w")
    implicit = smtp_options("smtps://user:secret@mail.example.test")
    assert (implicit.port, implicit.use_tls, implicit.start_tls) == (465, True, False)
    for bad in ("http://mail.example.test", "smtp://", "mail.example.test:25"):
        with pytest.raises(ValueError):
            smtp_options(bad)


# -- delivery ------------------------------------------------------------------------------------


async def test_enqueued_mail_is_delivered_over_smtp(env: Env, smtp_server: SmtpServer) -> None:
    svc = await env.services(smtp_url=smtp_server.url)
    sender = fast_sender(svc)
    sender.start()
    try:
        await asyncio.sleep(0.2)  # let the first pass find nothing: the sender now sleeps 60 s
        email_id = await enqueue_email(svc.db, to="ada@example.test", template="verify_email", context=VERIFY)
        sender.wake()  # only wake() makes this arrive within the wait
        msg = await smtp_server.wait_for("ada@example.test")
    finally:
        await sender.close()
    assert msg["To"] == "ada@example.test"
    assert msg["From"] == FROM
    assert msg["Subject"] == "Confirm your email address"
    assert msg["Message-ID"] and msg["Date"]
    body = cast(Any, msg.get_body(("plain",))).get_content()
    assert "Hi Ada," in body and VERIFY["link"] in body
    assert smtp_server.envelopes == [("no-reply@switchboard.test", ["ada@example.test"])]
    row = await outbox_row(svc.db, email_id)
    assert row["status"] == "sent" and row["attempts"] == 1
    assert row["sent_at"] is not None and row["claimed_until"] is None and row["last_error"] is None


async def test_without_smtp_url_mail_becomes_an_eml_file_and_one_log_line(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await env.services()
    outbox_dir = svc.settings.data_path / "outbox"
    sender = fast_sender(svc)
    sender.start()
    with caplog.at_level(logging.DEBUG):
        try:
            email_id = await enqueue_email(svc.db, to="bob@example.test", template="password_reset", context=VERIFY)
            sender.wake()
            path = outbox_dir / f"{email_id}.eml"
            await eventually(lambda: asyncio.sleep(0, path.exists()))
            await eventually(lambda: _status_is(svc.db, email_id, "sent"))
        finally:
            await sender.close()
    raw = path.read_bytes()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # RFC 5322 CRLF lines
    msg = email.message_from_bytes(raw, policy=default_policy)
    assert (msg["To"], msg["From"], msg["Subject"]) == ("bob@example.test", FROM, "Reset your Switchboard password")
    assert VERIFY["link"] in cast(Any, msg).get_body(("plain",)).get_content()
    assert [p.name for p in outbox_dir.iterdir()] == [f"{email_id}.eml"]  # no temp file left behind
    mail_records = [r for r in caplog.records if r.name == "switchboard.mail"]
    assert len(mail_records) == 1
    for record in caplog.records:  # the body carries the token: it must not reach any log line
        assert TOKEN not in record.getMessage() and TOKEN not in repr(vars(record))


async def _status_is(db: Database, email_id: str, status: str) -> bool:
    return bool((await outbox_row(db, email_id))["status"] == status)


async def test_smtp_down_is_retried_with_backoff_then_delivered(env: Env) -> None:
    server = SmtpServer()  # not listening yet: connections are refused
    svc = await env.services(smtp_url=server.url, mail_retry_max=100)
    sender = fast_sender(svc)
    email_id = await enqueue_email(svc.db, to="carol@example.test", template="device_offline", context={"device_name": "gpu-1"})
    sender.start()
    try:
        await eventually(lambda: _attempts_at_least(svc.db, email_id, 3))
        row = await outbox_row(svc.db, email_id)
        assert row["status"] == "pending" and row["last_error"]
        assert row["sent_at"] is None
        server.start()
        try:
            msg = await server.wait_for("carol@example.test", timeout=10)
            await eventually(lambda: _status_is(svc.db, email_id, "sent"))
        finally:
            await sender.close()
            server.stop()
    finally:
        await sender.close()
    assert msg["Subject"] == "gpu-1 is offline"
    assert len(server.received_by("carol@example.test")) == 1
    row = await outbox_row(svc.db, email_id)
    assert row["attempts"] >= 4 and row["last_error"] is None


async def _attempts_at_least(db: Database, email_id: str, n: int) -> bool:
    return int((await outbox_row(db, email_id))["attempts"]) >= n


async def test_mail_fails_after_max_attempts(env: Env) -> None:
    closed = SmtpServer()  # never started
    svc = await env.services(smtp_url=closed.url, mail_retry_max=3)
    sender = fast_sender(svc)
    email_id = await enqueue_email(svc.db, to="dan@example.test", template="announcement", context={"title": "Hi", "text": "News"})
    sender.start()
    try:
        await eventually(lambda: _status_is(svc.db, email_id, "failed"))
    finally:
        await sender.close()
    row = await outbox_row(svc.db, email_id)
    assert row["attempts"] == 3 and row["last_error"] and row["sent_at"] is None
    # A failed mail is not picked up again.
    again = fast_sender(svc)
    again.start()
    again.wake()
    await again.close()
    assert (await outbox_row(svc.db, email_id))["attempts"] == 3


async def test_two_senders_never_deliver_a_mail_twice(env: Env, smtp_server: SmtpServer) -> None:
    one = await env.services(smtp_url=smtp_server.url)
    two = await env.services(smtp_url=smtp_server.url)  # another worker: its own connection(s)
    for i in range(20):
        await enqueue_email(one.db, to=f"user{i}@example.test", template="device_online", context={"device_name": f"d{i}"})
    senders = [fast_sender(one, batch=4), fast_sender(two, batch=4)]
    for s in senders:
        s.start()
    for s in senders:
        s.wake()
    try:
        await eventually(lambda: _count(one.db, "sent", 20))
    finally:
        for s in senders:
            await s.close()
    # Delivery precedes "sent", so every send that could happen has happened by now.
    recipients = [str(m["To"]) for m in smtp_server.messages]
    assert len(recipients) == 20 and len(set(recipients)) == 20
    assert await one.db.fetchval("SELECT sum(attempts) FROM outbox") == 20


async def _count(db: Database, status: str, n: int) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM outbox WHERE status = $1", status) == n)


async def test_mail_enqueued_in_a_rolled_back_transaction_is_never_sent(env: Env, smtp_server: SmtpServer) -> None:
    svc = await env.services(smtp_url=smtp_server.url)
    with pytest.raises(RuntimeError):
        async with svc.db.transaction() as tx:
            await enqueue_email(tx, to="ghost@example.test", template="verify_email", context=VERIFY)
            raise RuntimeError("registration failed")
    async with svc.db.transaction() as tx:
        await enqueue_email(tx, to="real@example.test", template="verify_email", context=VERIFY)
    sender = fast_sender(svc)
    sender.start()
    sender.wake()
    try:
        await smtp_server.wait_for("real@example.test")
    finally:
        await sender.close()
    assert smtp_server.received_by("ghost@example.test") == []
    assert await svc.db.fetchval("SELECT count(*) FROM outbox") == 1


async def test_enqueue_rejects_unknown_templates_and_bad_addresses(env: Env) -> None:
    svc = await env.services()
    with pytest.raises(ValueError):
        await enqueue_email(svc.db, to="a@example.test", template="nope", context={})
    for bad in ("no-at-sign", "a@example.test\r\nBcc: b@example.test", "@example.test", "a@"):
        with pytest.raises(ValueError):
            await enqueue_email(svc.db, to=bad, template="verify_email", context=VERIFY)
    assert await svc.db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_close_flushes_what_is_due(env: Env, smtp_server: SmtpServer) -> None:
    svc = await env.services(smtp_url=smtp_server.url)
    sender = fast_sender(svc)
    sender.start()
    await enqueue_email(svc.db, to="first@example.test", template="device_online", context={"device_name": "a"})
    sender.wake()
    await smtp_server.wait_for("first@example.test")
    # The sender now sleeps for the 60 s poll; close() must still send this one.
    await enqueue_email(svc.db, to="last@example.test", template="device_online", context={"device_name": "b"})
    await sender.close()
    assert len(smtp_server.received_by("last@example.test")) == 1


async def test_app_setup_runs_the_sender_for_the_app_lifetime(env: Env) -> None:
    svc = await env.services()
    app = web.Application()
    app[SERVICES] = svc
    mail_routes.setup(app)
    assert mail_routes.OPENAPI == {} and len(mail_routes.routes) == 0
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        assert isinstance(svc.extras[MAILER_KEY], OutboxSender)
        email_id = await enqueue_email(svc.db, to="eve@example.test", template="verify_email", context=VERIFY)
        wake_sender(svc)
        path = svc.settings.data_path / "outbox" / f"{email_id}.eml"
        await eventually(lambda: asyncio.sleep(0, path.exists()))
    finally:
        await runner.cleanup()
    assert MAILER_KEY not in svc.extras
    wake_sender(svc)  # no sender: a no-op, not an error
    assert Path(path).exists()

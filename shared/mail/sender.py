"""``OutboxSender``: delivers the outbox, by SMTP (``SMTP_URL``) or as ``.eml`` files.

One sender runs per worker process. Its loop takes the due rows, claims each one (see
``shared.mail.outbox``), delivers it and marks it sent; a failed attempt is retried with
exponential backoff and jitter until ``MAIL_RETRY_MAX`` attempts, then the row is ``failed``.
The loop sleeps until the poll interval or the next retry is due, whichever comes first, and
``wake()`` cuts the sleep short so a mail enqueued by a request goes out at once.

Without ``SMTP_URL`` each mail is written atomically to ``DATA_DIR/outbox/<id>.eml`` (RFC 5322,
CRLF line ends) and one log line names the file. Bodies are never logged: they carry tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiosmtplib

from shared.config import Settings
from shared.errors import BackendError
from shared.mail import outbox
from shared.mail.outbox import OutboxRow, now_ms
from shared.services import Services

log = logging.getLogger("switchboard.mail")

SMTP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class SmtpOptions:
    hostname: str
    port: int
    use_tls: bool  # implicit TLS (smtps)
    start_tls: bool  # STARTTLS after connecting (smtp+starttls); plain smtp never upgrades
    username: str | None
    password: str | None


_SCHEMES = {
    "smtp": (25, False, False),
    "smtp+starttls": (587, False, True),
    "smtps": (465, True, False),
}


def smtp_options(url: str) -> SmtpOptions:
    """Parse ``SMTP_URL``; ValueError for an unknown scheme or a missing host."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(
            "SMTP_URL must look like smtp://host:25, smtp+starttls://user:pass@host:587 or smtps://user:pass@host:465"
        )
    default_port, use_tls, start_tls = _SCHEMES[scheme]
    return SmtpOptions(
        hostname=parts.hostname,
        port=parts.port or default_port,
        use_tls=use_tls,
        start_tls=start_tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def build_message(row: OutboxRow, mail_from: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = row.to_addr
    msg["Subject"] = row.subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    domain = parseaddr(mail_from)[1].rpartition("@")[2] or "localhost"
    msg["Message-ID"] = make_msgid(idstring=row.id, domain=domain)
    # 7bit/8bit rather than quoted-printable: a QP body turns `token=` into `token=3D` and may
    # fold a long link, so a person (or grep) reading the .eml would copy a broken token.
    ascii_only = row.body_text.isascii()
    msg.set_content(row.body_text, cte="7bit" if ascii_only else "8bit")
    return msg


def write_eml(directory: Path, email_id: str, data: bytes) -> Path:
    """Write ``<id>.eml`` atomically: a reader never sees half a file (temp file + rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{email_id}.eml"
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=".tmp-", suffix=".part"
    )  # not *.eml: readers glob for those
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """Delay before attempt ``attempts + 1``: base * 2^(attempts-1), capped, jittered to 50-100%."""
    delay = min(max_s, base_s * 2.0 ** max(0, attempts - 1))
    return delay * random.uniform(0.5, 1.0)


class OutboxSender:
    """Delivers the outbox of ``services.db``; ``start()``, ``wake()``, ``close()``."""

    def __init__(
        self,
        services: Services,
        *,
        poll_s: float = 5.0,
        batch: int = 20,
        claim_s: float = 2 * SMTP_TIMEOUT_S,
        backoff_base_s: float = 10.0,
        backoff_max_s: float = 3600.0,
    ) -> None:
        self._settings: Settings = services.settings
        self._db = services.db
        self._smtp = smtp_options(self._settings.smtp_url) if self._settings.smtp_url else None
        self._poll_s = poll_s
        self._batch = batch
        self._claim_ms = int(claim_s * 1000)
        self._backoff = (backoff_base_s, backoff_max_s)
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outbox-sender")

    def wake(self) -> None:
        """Look for due mail now instead of at the next poll."""
        self._wake.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is due, bounded by ``timeout`` seconds, then stop."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while not self._closing:
            self._wake.clear()
            await self._pass()
            if self._closing:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), await self._sleep_s())
        await self._pass()  # the final flush of close()

    async def _sleep_s(self) -> float:
        try:
            earliest = await outbox.next_due(self._db)
        except BackendError:
            return self._poll_s
        if earliest is None:
            return self._poll_s
        return min(self._poll_s, max(0.0, (earliest - now_ms()) / 1000))

    async def _pass(self) -> None:
        """Deliver due rows, batch after batch, until none is left that this sender can claim."""
        try:
            while True:
                now = now_ms()
                rows = await outbox.due(self._db, now, self._batch)
                claimed = 0
                for row in rows:
                    if await outbox.claim(self._db, row.id, now, now + self._claim_ms):
                        claimed += 1
                        await self._attempt(row)
                if len(rows) < self._batch or claimed == 0:
                    return
        except BackendError as exc:
            # The database blinked: keep the loop alive, the next pass retries.
            log.warning("outbox pass failed: %s", type(exc).__name__)
        except Exception:  # noqa: BLE001 - the sender must outlive any single bad row
            log.exception("outbox pass crashed")

    async def _attempt(self, row: OutboxRow) -> None:
        try:
            await self._deliver(row)
        except Exception as exc:  # noqa: BLE001 - every delivery failure is retried or recorded
            error = f"{type(exc).__name__}: {exc}"
            attempts = row.attempts + 1
            if attempts >= self._settings.mail_retry_max:
                await outbox.mark_failed(self._db, row.id, error)
                log.warning(
                    "email failed",
                    extra={"email_id": row.id, "attempts": attempts, "error": type(exc).__name__},
                )
            else:
                delay = backoff_s(attempts, *self._backoff)
                await outbox.mark_retry(self._db, row.id, error, now_ms() + int(delay * 1000))
                log.info(
                    "email delivery will be retried",
                    extra={"email_id": row.id, "attempts": attempts, "retry_in_s": round(delay, 1)},
                )
            return
        await outbox.mark_sent(self._db, row.id, now_ms())

    async def _deliver(self, row: OutboxRow) -> None:
        msg = build_message(row, self._settings.mail_from)
        if self._smtp is None:
            data = msg.as_bytes(policy=policy.SMTP)
            path = await asyncio.to_thread(
                write_eml, self._settings.data_path / "outbox", row.id, data
            )
            log.info(
                "email written",
                extra={"email_id": row.id, "template": row.template, "path": str(path)},
            )
            return
        o = self._smtp
        await aiosmtplib.send(
            msg,
            hostname=o.hostname,
            port=o.port,
            use_tls=o.use_tls,
            start_tls=o.start_tls,
            username=o.username,
            password=o.password,
            timeout=SMTP_TIMEOUT_S,
        )
        log.info("email sent", extra={"email_id": row.id, "template": row.template})

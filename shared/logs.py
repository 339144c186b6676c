"""Logging: one JSON object per line on stdout, with secrets masked before anything is written.

Each line has ``ts`` (ISO-8601 UTC, ms), ``level``, ``logger``, ``msg``, then every ``extra=``
field of the call, and ``exc`` (the traceback text) when one is attached.

What never reaches a log line (README.md "Operations"):

* request and response bodies: do not pass them to a logger at all;
* tokens and secrets: ``RedactingFilter`` masks ``Bearer ...`` credentials, ``sbt_``/``sbd_``
  secrets, JWT-shaped strings, ``token=``/``signature=``/``password=``-style pairs (query strings,
  JSON-ish text) in the message, and the values of extra fields whose name says secret
  (``password``, ``token``, ``authorization``, ...). This is a safety net, not a licence: log
  ids, not credentials.
* raw device and book ids (and IPs): log them hashed with ``shared.secrets.hash_id``, which is
  also what the audit log stores, so operators can correlate the two::

      from shared.secrets import hash_id
      log.info("device removed", extra={"device": hash_id(device_id), "book": hash_id(book_id)})
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

MASK = "***"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}

_SECRET_KEY = re.compile(
    r"pass(word|wd)?|secret|token|authorization|signature|api[_-]?key|credential|cookie", re.I
)

# Order matters: whole credentials first, then key=value pairs (whose value may be "Bearer x").
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.I), r"\1 " + MASK),
    (re.compile(r"\b(sb[td]_)[A-Za-z0-9_-]+"), r"\1" + MASK),
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), MASK),
    (
        re.compile(
            r"""(?ix)
            ([\w-]*(?:pass(?:word|wd)?|secret|token|signature|api[_-]?key|credential)[\w-]*)  # key
            (["']?\s*[:=]\s*["']?)                                   # = or ": "
            (?!\*\*\*)(?:(?:Bearer|Basic)\s+)?[^"'\s,&;}]+            # value
            """
        ),
        r"\1\2" + MASK,
    ),
    # smtp://user:password@host and friends
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@", re.I), r"\1" + MASK + "@"),
)


def redact_text(text: str) -> str:
    """``text`` with every credential-looking part replaced by ``***``."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_value(key: str, value: Any, depth: int = 0) -> Any:
    """An extra field's value, masked by its name or its content (nested containers too)."""
    if _SECRET_KEY.search(key) and value is not None and not isinstance(value, bool | int | float):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if depth >= 4:  # deep structures are not what logs are for
        return MASK if isinstance(value, dict | list | tuple) else value
    if isinstance(value, dict):
        return {str(k): redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(key, v, depth + 1) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Masks secrets in the formatted message and in ``extra`` fields, in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRS:
                setattr(record, key, redact_value(key, value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; values that are not JSON become their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            # Tracebacks can quote arguments (a token in a URL): mask them like messages.
            out["exc"] = redact_text(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact_text(record.exc_text)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Route every logger to one JSON handler at ``level`` on ``stream`` (stdout); returns it.

    Idempotent: a second call replaces the handler this function installed before.
    """
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    handler.set_name("switchboard-json")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "switchboard-json"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # aiohttp's access log would duplicate (and not redact) our own request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler

"""Plain-text email templates: a subject and a body filled from the caller's context.

Callers pass every value a template names (``TEMPLATES[name].fields``); links are built by the
caller and already carry their ``token=...``. Values are inserted as text, never interpreted as
format strings, and line breaks are removed from the subject (a header must be one line).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from string import Formatter
from typing import Any

FOOTER = "\n\n-- \nSwitchboard. You receive this because of activity on your account.\n"


@dataclass(frozen=True, slots=True)
class Template:
    subject: str
    body: str

    @property
    def fields(self) -> frozenset[str]:
        """The context keys the template uses."""
        return frozenset(
            name
            for text in (self.subject, self.body)
            for _, name, _, _ in Formatter().parse(text)
            if name
        )


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    body: str


TEMPLATES: dict[str, Template] = {
    "verify_email": Template(
        "Confirm your email address",
        "Hi {display_name},\n\n"
        "please confirm your email address for Switchboard by opening this link:\n\n"
        "{link}\n\n"
        "If you did not create an account, ignore this email.",
    ),
    "password_reset": Template(
        "Reset your Switchboard password",
        "Hi {display_name},\n\n"
        "someone asked to reset the password of your Switchboard account. To choose a new one,\n"
        "open this link (it works once and expires soon):\n\n"
        "{link}\n\n"
        "If it was not you, ignore this email: your password stays as it is.",
    ),
    "task_created": Template(
        "Task {task_id} created on {device_name}",
        "A {task_type} task ({task_id}) was queued for the device {device_name}.",
    ),
    "task_completed": Template(
        "Task {task_id} completed on {device_name}",
        "The {task_type} task {task_id} completed on the device {device_name}.",
    ),
    "task_failed": Template(
        "Task {task_id} failed on {device_name}",
        "The {task_type} task {task_id} failed on the device {device_name}.\n"
        "Its result and logs are in the task's details.",
    ),
    "device_online": Template(
        "{device_name} is online",
        "Your device {device_name} connected and is online.",
    ),
    "device_offline": Template(
        "{device_name} is offline",
        "Your device {device_name} stopped sending heartbeats and is offline.",
    ),
    "announcement": Template("{title}", "{text}"),
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def render(template: str, context: Mapping[str, Any]) -> Rendered:
    """Fill ``template`` from ``context``; ValueError for an unknown template or a missing value."""
    found = TEMPLATES.get(template)
    if found is None:
        raise ValueError(f"unknown email template {template!r}")
    missing = sorted(found.fields - context.keys())
    if missing:
        raise ValueError(f"email template {template!r} needs {', '.join(missing)}")
    values = {name: str(context[name]) for name in found.fields}
    if "display_name" in values and not values["display_name"].strip():
        values["display_name"] = "there"  # "Hi there," rather than "Hi ,"
    subject = _one_line(found.subject.format_map(values))
    return Rendered(subject=subject, body=found.body.format_map(values) + FOOTER)

"""Email: templates, the outbox (enqueue in any transaction) and the sender that delivers it.

Typical use in a request handler::

    async with services.db.transaction() as tx:
        ...  # create the user
        await enqueue_email(tx, to=email, template="verify_email", context={...})
    wake_sender(services)  # after the commit, so the sender finds the row
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.mail.outbox import enqueue_email
from shared.mail.templates import TEMPLATES, render

if TYPE_CHECKING:
    from shared.services import Services

__all__ = ["MAILER_KEY", "TEMPLATES", "enqueue_email", "render", "wake_sender"]

MAILER_KEY = "mailer"  # services.extras slot of the running OutboxSender


def wake_sender(services: Services) -> None:
    """Ask this process's sender (if running) to deliver now rather than at its next poll."""
    mailer = services.extras.get(MAILER_KEY)
    if mailer is not None:
        mailer.wake()

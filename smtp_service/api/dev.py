"""/api/dev/mailbox: what `make run`'s development mail catcher received. Registered only while
the catcher runs (DEV_MAIL_CATCHER); any valid token may read it (every account's mail goes to
the one catcher)."""

from __future__ import annotations

import os

from flask import Blueprint, current_app, request

from smtp_service.api import answer, services
from smtp_service.auth import current_caller
from smtp_service.schemas import DevMailbox, MailboxQuery
from smtp_service.services.devmailbox import SIMULATOR_DOMAIN, read_mailbox

bp = Blueprint("dev", __name__, url_prefix="/api/dev")

_QUERY = MailboxQuery()
_MAILBOX = DevMailbox()


@bp.get("/mailbox")
def mailbox():
    """GET /api/dev/mailbox?to=&limit=: the catcher's SMTP address (for an account's settings),
    the simulator's domain, and the newest messages in DATA_DIR/outbox, oldest first."""
    current_caller()
    query = _QUERY.load(request.args.to_dict())
    catcher = services().dev_catcher
    outbox = os.path.join(current_app.config["DATA_DIR"], "outbox")
    return answer(
        _MAILBOX,
        {
            "smtp": {"host": catcher.host, "port": catcher.port},
            "simulatorDomain": SIMULATOR_DOMAIN,
            "messages": read_mailbox(outbox, to=query["to"], limit=query["limit"]),
        },
    )

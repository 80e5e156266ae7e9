"""Development mail catcher: an aiosmtpd server that writes every message to DATA_DIR/outbox.

`make run` starts it when no SMTP_HOST is configured, so that a first email can be sent with
nothing else installed. It is the global server then, and accounts may use it as their own
server too (host 127.0.0.1, its port; README "Mailbox simulator"):

- AUTH PLAIN and LOGIN are offered without TLS (it listens on loopback only) and take any user
  name and password, except the user auth-failure@simulator.invalid (535 5.7.8); mail without
  AUTH is taken too. No STARTTLS: settings pointing at it need "requireTls": false.
- Recipients at simulator.invalid get the mailbox simulator's answers
  (smtp_service/services/devmailbox.py: SIMULATOR); every other recipient is accepted.
- Accepted messages are written to the outbox, one .eml each, with the envelope as
  X-Envelope-From and X-Envelope-To headers.

Run it by hand with `python -m smtp_service.devmail [--port 1025]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import threading
import time
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from smtp_service.services.devmailbox import (
    AUTH_FAILURE_REPLY,
    AUTH_FAILURE_USER,
    SLOW_SECONDS,
    simulated_reply,
)


class OutboxHandler:
    """Answers each recipient as the mailbox simulator says and stores each accepted message
    as an .eml file (atomically), one file per message.

    slow_seconds: how long the slow address waits before the reply to the final dot.
    """

    def __init__(self, outbox: str, *, slow_seconds: float = SLOW_SECONDS) -> None:
        self.outbox = outbox
        self.slow_seconds = slow_seconds
        os.makedirs(outbox, mode=0o700, exist_ok=True)

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        """250 for every recipient but the simulator's refusals (RFC 5321 4.2: each is what a
        real server answers at RCPT for that case)."""
        outcome = simulated_reply(address)
        if outcome is not None and outcome.reply is not None:
            codes = " ".join(outcome.reply.split(" ", 2)[:2])
            _log(f"RCPT {address}: {codes} ({outcome.description})")
            return outcome.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        """Write the message with its envelope as headers, then accept it (after
        `slow_seconds` when a recipient is the simulator's slow address)."""
        if any(
            (outcome := simulated_reply(rcpt)) is not None and outcome.delay
            for rcpt in envelope.rcpt_tos
        ):
            await asyncio.sleep(self.slow_seconds)
        header = (
            f"X-Envelope-From: {envelope.mail_from}\r\n"
            f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        fd, tmp = tempfile.mkstemp(dir=self.outbox, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(header + envelope.original_content)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.path.basename(tmp)[5:]}.eml"
        os.replace(tmp, os.path.join(self.outbox, name))
        return "250 Message accepted for delivery"


def authenticate(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    """aiosmtpd's authenticator: any user name and password log in (RFC 4954), except
    AUTH_FAILURE_USER, refused with 535 5.7.8. Logs the user name, never the password."""
    if not isinstance(auth_data, LoginPassword):
        return AuthResult(success=False, handled=False)
    user = auth_data.login.decode("utf-8", "replace")
    if user.lower() == AUTH_FAILURE_USER:
        _log(f"AUTH {mechanism} {user}: refused (simulator)")
        return AuthResult(success=False, handled=False, message=AUTH_FAILURE_REPLY)
    _log(f"AUTH {mechanism} {user}: accepted")
    return AuthResult(success=True, auth_data=auth_data)


def make_controller(
    outbox: str, *, host: str = "127.0.0.1", port: int = 1025, slow_seconds: float = SLOW_SECONDS
) -> Controller:
    """The catcher as an aiosmtpd Controller (not started): AUTH PLAIN/LOGIN offered without
    TLS and not required, SMTPUTF8 offered."""
    return Controller(
        OutboxHandler(outbox, slow_seconds=slow_seconds),
        hostname=host,
        port=port,
        authenticator=authenticate,
        auth_require_tls=False,
        enable_SMTPUTF8=True,
    )


def _log(line: str) -> None:
    print(f"devmail: {line}", flush=True)


def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument(
        "--outbox", default=os.path.join(os.environ.get("DATA_DIR", "data"), "outbox")
    )
    parser.add_argument("--slow-seconds", type=float, default=SLOW_SECONDS)
    args = parser.parse_args()
    controller = make_controller(
        args.outbox, host=args.host, port=args.port, slow_seconds=args.slow_seconds
    )
    controller.start()
    _log(f"listening on {args.host}:{args.port}, writing to {args.outbox}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()

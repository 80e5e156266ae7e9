"""Development mail catcher: an aiosmtpd server that writes every message to DATA_DIR/outbox.

`make run` starts it when no SMTP_HOST is configured, so that a first email can be sent with
nothing else installed. Run it by hand with `python -m smtp_service.devmail`.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from typing import Any

from aiosmtpd.controller import Controller


class OutboxHandler:
    """Stores each received message as an .eml file (atomically), one file per message."""

    def __init__(self, outbox: str) -> None:
        self.outbox = outbox
        os.makedirs(outbox, mode=0o700, exist_ok=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        """Write the message with its envelope as headers, then accept it."""
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


def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument(
        "--outbox", default=os.path.join(os.environ.get("DATA_DIR", "data"), "outbox")
    )
    args = parser.parse_args()
    controller = Controller(OutboxHandler(args.outbox), hostname=args.host, port=args.port)
    controller.start()
    print(f"dev mail catcher on {args.host}:{args.port}, writing to {args.outbox}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()

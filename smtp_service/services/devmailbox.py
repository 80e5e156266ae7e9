"""The development mail catcher's rules and its mailbox: the mailbox simulator, the catcher's
address, and the messages it kept in DATA_DIR/outbox.

`make run` (gunicorn.conf.py) starts the catcher (smtp_service/devmail.py) when no SMTP_HOST
is set and names its address in DEV_MAIL_CATCHER. While that is set, the catcher is the global
server, accounts may use it as their own server (the SSRF guard allows exactly that address),
and GET /api/dev/mailbox lists what it received. None of it exists in a configuration with a
real SMTP_HOST.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.parser import BytesHeaderParser

# Recipients at this domain get the simulator's answers. `.invalid` is reserved by RFC 2606
# section 2 and RFC 6761 section 6.4: it never resolves, so a simulator address that reaches a
# real server by mistake is delivered nowhere.
SIMULATOR_DOMAIN = "simulator.invalid"

# Seconds the slow address waits before it answers the final dot (the default of the catcher's
# --slow-seconds).
SLOW_SECONDS = 5.0


@dataclass(frozen=True)
class SimulatedOutcome:
    """What the simulator answers for one of its addresses.

    reply: the SMTP reply to RCPT TO (None: 250, accepted); delay: seconds before the reply to
    the final dot (the slow accept).
    """

    reply: str | None
    delay: bool = False
    description: str = ""


# The simulator's addresses, by local part (before any "+tag"). The replies are what real servers
# answer; the README's "Mailbox simulator" table lists them with what the service makes of each
# (the bounce table: category, temporary, suppression).
SIMULATOR: dict[str, SimulatedOutcome] = {
    "success": SimulatedOutcome(None, description="accepted"),
    "bounce": SimulatedOutcome(
        "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown (simulator)",
        description="hard bounce",
    ),
    "soft-bounce": SimulatedOutcome(
        "451 4.7.1 <{rcpt}>: Recipient address rejected: try again later (simulator)",
        description="soft bounce",
    ),
    "mailbox-full": SimulatedOutcome(
        "552 5.2.2 <{rcpt}>: Mailbox full (simulator)", description="mailbox full"
    ),
    "blocked": SimulatedOutcome(
        "554 5.7.1 <{rcpt}>: Recipient address rejected: Access denied by policy (simulator)",
        description="policy refusal",
    ),
    "slow": SimulatedOutcome(None, delay=True, description="accepted slowly"),
}

# The SMTP AUTH user name the catcher refuses (535 5.7.8), whatever the password: a connection
# test or a send with it fails as a wrong password does. Any other user and password log in.
AUTH_FAILURE_USER = f"auth-failure@{SIMULATOR_DOMAIN}"
AUTH_FAILURE_REPLY = "535 5.7.8 Authentication credentials invalid (simulator)"

_UNKNOWN_REPLY = (
    "550 5.1.1 <{rcpt}>: no such simulator address; use one of: "
    + ", ".join(SIMULATOR)
    + f" @{SIMULATOR_DOMAIN}"
)


def simulated_reply(address: str) -> SimulatedOutcome | None:
    """The simulator's outcome for a recipient, or None for an address outside its domain
    (accepted like any other).

    The domain is compared without letter case; the local part is read up to a "+" (RFC 5233
    sub-addressing, so that callers can make distinct addresses: `bounce+run42@...`), without
    letter case. A local part the simulator does not know is a hard bounce naming the known ones.
    """
    local, _, domain = address.rpartition("@")
    if domain.lower().rstrip(".") != SIMULATOR_DOMAIN or not local:
        return None
    base = local.split("+", 1)[0].lower()
    outcome = SIMULATOR.get(base)
    if outcome is None:
        return SimulatedOutcome(_UNKNOWN_REPLY.format(rcpt=address), description="unknown")
    if outcome.reply is None:
        return outcome
    return SimulatedOutcome(outcome.reply.format(rcpt=address), outcome.delay, outcome.description)


@dataclass(frozen=True)
class CatcherAddress:
    """Where the development mail catcher listens: a loopback IP literal and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_catcher_address(text: str) -> CatcherAddress:
    """`127.0.0.1:1025` or `[::1]:1025` -> CatcherAddress. ValueError with the reason for
    anything else: a name (only an IP literal is unambiguous), an address that is not loopback
    (the catcher never listens beyond this machine), a port outside 1-65535."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError("must be host:port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("host must be a loopback IP address") from None
    if not ip.is_loopback:
        raise ValueError("host must be a loopback IP address")
    return CatcherAddress(str(ip), port)


@dataclass(frozen=True)
class CaughtMessage:
    """One message the catcher kept: the envelope (MAIL FROM, RCPT TO), the Subject, the
    Message-ID, the plain-text body ("" when it has none; line ends as LF), the file name in
    the outbox and its modification time in nanoseconds since the epoch."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    subject: str
    message_id: str
    text: str
    file: str
    received_ns: int


def read_mailbox(outbox: str, *, to: str | None = None, limit: int = 50) -> list[CaughtMessage]:
    """The newest `limit` messages in the outbox (to `to`, compared without letter case, when
    given), oldest first. A missing outbox is empty; files that cannot be read or parsed, or
    that the catcher did not write (no X-Envelope-To), are skipped. Only the headers of a file
    are parsed until it matches."""
    try:
        entries = [e for e in os.scandir(outbox) if e.name.endswith(".eml") and e.is_file()]
    except OSError:
        return []
    stamped = []
    for entry in entries:
        try:
            stamped.append((entry.stat().st_mtime_ns, entry.name, entry.path))
        except OSError:
            continue
    wanted = to.strip().lower() if to else None
    found: list[CaughtMessage] = []
    for received_ns, name, path in sorted(stamped, reverse=True):
        if len(found) >= limit:
            break
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        headers = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
        envelope_to = headers.get("X-Envelope-To")
        if envelope_to is None:
            continue  # not written by the catcher
        rcpt_tos = tuple(a.strip() for a in str(envelope_to).split(",") if a.strip())
        if wanted is not None and wanted not in (a.lower() for a in rcpt_tos):
            continue
        try:
            found.append(_caught(raw, rcpt_tos, name, received_ns))
        except (LookupError, ValueError, TypeError, AttributeError, IndexError):
            continue  # a file that is not a message
    return found[::-1]


def _caught(raw: bytes, rcpt_tos: tuple[str, ...], name: str, received_ns: int) -> CaughtMessage:
    message = message_from_bytes(raw, policy=policy.default)
    body = message.get_body(("plain",))
    return CaughtMessage(
        mail_from=str(message.get("X-Envelope-From", "")),
        rcpt_tos=rcpt_tos,
        subject=str(message.get("Subject", "")),
        message_id=str(message.get("Message-ID", "")).strip("<> "),
        text=body.get_content().replace("\r\n", "\n") if body is not None else "",
        file=name,
        received_ns=received_ns,
    )

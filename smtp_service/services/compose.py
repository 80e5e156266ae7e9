"""Turning a send request into a checked envelope and an RFC 5322 message."""

from __future__ import annotations

import functools
import html as html_lib
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, getaddresses

from email_validator import EmailNotValidError, validate_email

from smtp_service.services.errors import InvalidInput, shown


class _CachedHeaderRegistry(HeaderRegistry):
    """HeaderRegistry builds a new header class on every lookup; build each one once."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


class _Wire(str):
    """A header value already in its final form: printable ASCII, nothing to encode or quote."""


class _Policy(EmailPolicy):
    """email.policy.SMTP that parses less: most of the cost of building a message is parsing
    and re-folding each header through the registry (about 0.1 ms a header).

    - A _Wire value is stored as the plain string; EmailPolicy writes a plain string out
      unchanged when it fits on one line and folds a longer one through the registry.
    - The values EmailMessage.set_content writes for text parts (MIME-Version, Content-Type,
      Content-Transfer-Encoding) are parsed once and the same header object stored every time;
      it is written out directly.
    """

    def header_store_parse(self, name: str, value: object) -> tuple[str, object]:
        if type(value) is _Wire:
            return name, str(value)
        if type(value) is str:
            constant = _CONSTANTS.get((name.lower(), value))
            if constant is not None:
                return name, constant
        return super().header_store_parse(name, value)

    def fold_binary(self, name: str, value: object) -> bytes:
        if id(value) in _CONSTANT_IDS:
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_CONSTANT_VALUES = (
    [("MIME-Version", "1.0")]
    + [
        ("Content-Type", f"text/{subtype}{charset}")
        for subtype in ("plain", "html")
        for charset in ("", '; charset="utf-8"')
    ]
    + [("Content-Transfer-Encoding", c) for c in ("7bit", "8bit", "quoted-printable", "base64")]
)
_CONSTANTS = {
    (name.lower(), value): HeaderRegistry()(name, value) for name, value in _CONSTANT_VALUES
}
_CONSTANT_IDS = frozenset(id(header) for header in _CONSTANTS.values())  # kept alive above


_POLICY = _Policy(linesep="\r\n", header_factory=_CachedHeaderRegistry())
_POLICY_UTF8 = _POLICY.clone(utf8=True, header_factory=_CachedHeaderRegistry())
_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*")  # RFC 5322 atext and spaces


def _wire(value: str) -> _Wire | None:
    """value as a _Wire when it needs no encoding: printable ASCII, no encoded-word look-alike."""
    if value.isascii() and value.isprintable() and "=?" not in value and value == value.strip():
        return _Wire(value)
    return None


@dataclass(frozen=True)
class Mailbox:
    """A checked address with its optional display name."""

    name: str
    address: str  # normalised; ASCII unless the local part needs SMTPUTF8

    @property
    def needs_smtputf8(self) -> bool:
        return not self.address.isascii()

    def header(self) -> Address:
        """The address as an email header value."""
        local, _, domain = self.address.rpartition("@")
        return Address(display_name=self.name, username=local, domain=domain)

    def wire(self) -> str | None:
        """The address as it is written in a header, when that needs no encoding; else None."""
        if not self.address.isascii():
            return None
        if not self.name:
            return self.address
        if _wire(self.name) is None:
            return None
        if _ATOM_PHRASE.fullmatch(self.name) and "  " not in self.name:
            return f"{self.name} <{self.address}>"
        quoted = self.name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{self.address}>'


MAX_DISPLAY_NAME = 128  # folding a long non-ASCII name costs ~0.6 ms a character
MAX_MAILBOX_LENGTH = 320  # one address with its display name: well inside a 998-byte line


@functools.lru_cache(maxsize=10_000)
def parse_mailbox(text: str, field: str) -> Mailbox:
    """'a@b.example' or 'Name <a@b.example>' -> Mailbox; InvalidInput naming the field.

    The same senders and recipients come back all the time and checking one costs ~0.1 ms, so
    the results (immutable Mailboxes) are kept, least recently used dropped first; a refusal
    raises and is not kept."""
    pairs = getaddresses([text])
    if len(pairs) != 1 or not pairs[0][1]:
        raise InvalidInput.field(field, f"Invalid email address: {shown(text, 80)}")
    name, addr = pairs[0]
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidInput.field(
            field, f"Display name longer than {MAX_DISPLAY_NAME} characters: {shown(name, 80)}"
        )
    try:
        checked = validate_email(addr, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        message = f"Invalid email address {shown(addr, 80)}: {exc}"
        raise InvalidInput.field(field, message) from None
    return Mailbox(name, checked.ascii_email or checked.normalized)


def parse_mailboxes(items: Iterable[str], field: str) -> list[Mailbox]:
    """Each item checked; the first bad one names the field."""
    return [parse_mailbox(item, field) for item in items]


def new_message_id(sender: Mailbox) -> str:
    """A unique id, also used as the Message-ID header (without the angle brackets)."""
    domain = sender.address.rpartition("@")[2] or "smtp-service.local"
    return f"{uuid.uuid4().hex}@{domain}"


def with_open_pixel(html: str, pixel_url: str) -> str:
    """The html with a 1x1 tracking image before </body> (or at the end)."""
    tag = (
        f'<img src="{html_lib.escape(pixel_url, quote=True)}" width="1" height="1" '
        f'alt="" style="display:none;border:0" />'
    )
    lower = html.lower()
    at = lower.rfind("</body>")
    return html[:at] + tag + html[at:] if at >= 0 else html + tag


def build_message(
    *,
    message_id: str,
    sender: Mailbox,
    to: list[Mailbox],
    cc: list[Mailbox],
    reply_to: list[Mailbox],
    subject: str,
    text: str | None,
    html: str | None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    attachments: Iterable[tuple[str, str, bytes]],
    smtputf8: bool,
) -> bytes:
    """The message as bytes with CRLF line ends (Bcc never appears in it)."""
    msg = EmailMessage(policy=_POLICY_UTF8 if smtputf8 else _POLICY)
    msg["From"] = _addresses([sender])
    msg["To"] = _addresses(to)
    if cc:
        msg["Cc"] = _addresses(cc)
    if reply_to:
        msg["Reply-To"] = _addresses(reply_to)
    msg["Subject"] = _wire(subject) or subject
    msg["Date"] = _Wire(format_datetime(datetime.now(UTC)))
    msg["Message-ID"] = _wire(f"<{message_id}>") or f"<{message_id}>"
    for name, value in headers.items() if isinstance(headers, Mapping) else headers:
        msg[name] = value
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is not None:
            msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(html, subtype="html")
    for filename, content_type, data in attachments:
        maintype, _, subtype = content_type.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def _addresses(mailboxes: list[Mailbox]) -> _Wire | list[Address]:
    """An address header's value: written directly when every address allows it."""
    written = [m.wire() for m in mailboxes]
    if all(w is not None for w in written):
        return _Wire(", ".join(written))  # type: ignore[arg-type]
    return [m.header() for m in mailboxes]

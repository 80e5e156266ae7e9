"""Turning a send request into a checked envelope and an RFC 5322 message."""

from __future__ import annotations

import html as html_lib
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime
from typing import Any

from smtp_service.services.addresses import (
    MAX_DISPLAY_NAME,
    MAX_MAILBOX_LENGTH,
    Entry,
    Group,
    Mailbox,
    address_key,
    mailboxes,
    parse_address_list,
    parse_mailbox,
    parse_mailboxes,
)
from smtp_service.services.errors import InvalidInput
from smtp_service.services.headers import address_chunks, caller_headers, fold, text_chunks

__all__ = [
    "MAX_DISPLAY_NAME",
    "MAX_MAILBOX_LENGTH",
    "Group",
    "Mailbox",
    "build_message",
    "check_attachments",
    "mailboxes",
    "new_message_id",
    "parse_address_list",
    "parse_mailbox",
    "parse_mailboxes",
    "with_open_pixel",
]


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


class _Raw(str):
    """A header value of a MIME part written exactly as it is (checked before): a Content-ID
    or a message part's type, which the email package would otherwise fold and encode."""


class _Policy(EmailPolicy):
    """email.policy.SMTP for the MIME body, parsing less: most of the cost of building a
    message is parsing and re-folding each header through the registry (about 0.1 ms a header).

    - A _Raw value is stored and written out as it is.
    - The values EmailMessage.set_content writes for text parts (MIME-Version, Content-Type,
      Content-Transfer-Encoding) are parsed once and the same header object stored every time;
      it is written out directly.
    """

    def header_store_parse(self, name: str, value: object) -> tuple[str, object]:
        if type(value) is _Raw:
            return name, value
        if type(value) is str:
            constant = _CONSTANTS.get((name.lower(), value))
            if constant is not None:
                return name, constant
        return super().header_store_parse(name, value)

    def fold_binary(self, name: str, value: object) -> bytes:
        if id(value) in _CONSTANT_IDS or type(value) is _Raw:
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


def new_message_id(sender: Mailbox) -> str:
    """A unique id, also used as the Message-ID header (without the angle brackets); ASCII
    (RFC 5322 3.6.4), so an internationalised domain is written in IDNA form."""
    domain = address_key(sender.address).rpartition("@")[2] or "smtp-service.local"
    if not domain.isascii():
        domain = "smtp-service.local"
    return f"{uuid.uuid4().hex}@{domain}"


_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE | re.ASCII)


def with_open_pixel(html: str, pixel_url: str) -> str:
    """The html with a 1x1 tracking image before its last </body> (or at the end).

    The position is found in the html itself, case-insensitively over ASCII only: an index
    taken from html.lower() can be off, as lower-casing changes the length of some text
    ("İ" becomes two characters)."""
    tag = (
        f'<img src="{html_lib.escape(pixel_url, quote=True)}" width="1" height="1" '
        f'alt="" style="display:none;border:0" />'
    )
    last = None
    for last in _BODY_END.finditer(html):  # noqa: B007 - the last match is wanted
        pass
    if last is None:
        return html + tag
    return html[: last.start()] + tag + html[last.start() :]


# -- attachments -------------------------------------------------------------------------------

# Types that can be attached as they are given: composite types need parts of their own, so
# multipart/* is refused, and so is every message/* but a whole message (rfc822, or global with
# UTF-8 headers, RFC 6532): partial and external-body are not files (RFC 2046 5.2.2-5.2.3).
MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_HEADER_LINE = re.compile(rb"[!-9;-~]+:")


def attachment_type_problem(content_type: str) -> str | None:
    """Why a content type cannot be attached, or None."""
    lower = content_type.lower()
    if lower.startswith("multipart/"):
        return (
            f"{content_type} is a composite type and cannot be attached as a file; "
            "send its parts as attachments of their own."
        )
    if lower.startswith("message/") and lower not in MESSAGE_TYPES:
        return f"{content_type} cannot be attached; message/rfc822 attaches a whole message."
    return None


def attached_message(data: bytes) -> tuple[bytes, str]:
    """A message to attach as message/rfc822: its bytes with CRLF line ends and its
    Content-Transfer-Encoding, 7bit or 8bit (RFC 2046 5.2.1 allows no other). ValueError saying
    why when it is not an RFC 5322 message that these encodings can carry."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if not lines or not _HEADER_LINE.match(lines[0]):
        raise ValueError("Must be an RFC 5322 message (header fields, a blank line, a body).")
    if b"\0" in data:
        raise ValueError("An attached message must not contain NUL bytes (RFC 2046 5.2.1).")
    if max(len(line) for line in lines) > 998:
        raise ValueError(
            "An attached message must have lines of at most 998 octets (RFC 2046 5.2.1); "
            "attach it as application/octet-stream instead."
        )
    if lines[-1] == b"":
        lines.pop()
    normalised = b"\r\n".join(lines) + b"\r\n"
    return normalised, "7bit" if normalised.isascii() else "8bit"


@dataclass(frozen=True)
class Part:
    """One attachment as build_message takes it."""

    filename: str
    content_type: str
    content: bytes
    cid: str | None = None


def _parts(attachments: Iterable[Any]) -> list[Part]:
    out = []
    for item in attachments:
        if isinstance(item, tuple):
            out.append(Part(*item))
        else:
            out.append(Part(item.filename, item.content_type, item.content, item.cid))
    return out


def check_attachments(attachments: Iterable[Any]) -> None:
    """InvalidInput (on attachments.<i>) for an attachment that cannot be sent as its type says."""
    problems: dict[str, Any] = {}
    for index, part in enumerate(_parts(attachments)):
        type_problem = attachment_type_problem(part.content_type)
        if type_problem is not None:
            problems[str(index)] = {"contentType": [type_problem]}
        elif part.content_type.lower() in MESSAGE_TYPES:
            try:
                attached_message(part.content)
            except ValueError as exc:
                problems[str(index)] = {"content": [str(exc)]}
    if problems:
        raise InvalidInput({"attachments": problems})


def _attach(msg: EmailMessage, part: Part, verbatim: dict[bytes, bytes]) -> None:
    """One attachment added to the multipart/mixed message (made so if it is not). An attached
    message's bytes are left out of the tree: a placeholder stands for them, noted in
    `verbatim`, and replaced in the written message."""
    maintype, _, subtype = part.content_type.partition("/")
    if part.content_type.lower() not in MESSAGE_TYPES:
        msg.add_attachment(part.content, maintype=maintype, subtype=subtype, filename=part.filename)
        if part.cid:
            msg.get_payload()[-1]["Content-ID"] = _Raw(f"<{part.cid}>")
        return
    data, encoding = attached_message(part.content)
    if msg.get_content_type() != "multipart/mixed":
        msg.make_mixed()
    attached = EmailMessage(policy=msg.policy)
    attached["Content-Type"] = _Raw(part.content_type.lower())
    attached["Content-Transfer-Encoding"] = _Raw(encoding)
    attached.add_header("Content-Disposition", "attachment", filename=part.filename)
    if part.cid:
        attached["Content-ID"] = _Raw(f"<{part.cid}>")
    # The generator writes a str payload of a message part unchanged, but only ASCII: 8-bit
    # bytes go in after it has run.
    placeholder = f"smtp-service-attached-message-{uuid.uuid4().hex}"
    verbatim[placeholder.encode("ascii")] = data
    attached.set_payload(placeholder)
    msg.attach(attached)


def _body(
    text: str | None, html: str | None, attachments: list[Part], policy: EmailPolicy
) -> bytes:
    """The MIME entity: MIME-Version, Content-Type and the parts.

    text and html are alternatives (RFC 2046 5.1.4); attachments with a cid are the html's
    inline parts (multipart/related, RFC 2387, referenced as cid: URLs, RFC 2392), the others
    follow in multipart/mixed. Without html, a cid attachment is an ordinary one."""
    msg = EmailMessage(policy=policy)
    inline = [
        p
        for p in attachments
        if p.cid and html is not None and p.content_type.lower() not in MESSAGE_TYPES
    ]
    others = [p for p in attachments if p not in inline]
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is not None:
            msg.add_alternative(html, subtype="html")
            html_part = msg.get_payload()[-1]
        else:
            msg.set_content(html, subtype="html")
            html_part = msg
        for part in inline:
            maintype, _, subtype = part.content_type.partition("/")
            html_part.add_related(
                part.content,
                maintype=maintype,
                subtype=subtype,
                filename=part.filename,
                disposition="inline",
            )
            html_part.get_payload()[-1]["Content-ID"] = _Raw(f"<{part.cid}>")
    verbatim: dict[bytes, bytes] = {}
    for part in others:
        _attach(msg, part, verbatim)
    written = msg.as_bytes()
    if not verbatim:
        return written
    boundaries = [b.encode("ascii") for p in msg.walk() if (b := p.get_boundary())]
    for placeholder, data in verbatim.items():
        # A boundary must not occur in the parts it separates (RFC 2046 5.1.1); the generator
        # chose them without seeing these bytes. A collision of its 19 random digits is a
        # 1e-19 event, but when it happens the message is built again.
        if any(b"--" + b in data for b in boundaries):
            return _body(text, html, attachments, policy)
        written = written.replace(placeholder, data, 1)
    return written


def build_message(
    *,
    message_id: str,
    sender: Mailbox,
    to: list[Entry],
    cc: list[Entry],
    reply_to: list[Entry],
    subject: str,
    text: str | None,
    html: str | None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    attachments: Iterable[Any],
    smtputf8: bool,
) -> bytes:
    """The message as bytes with CRLF line ends (Bcc never appears in it).

    The header fields are written by services.headers (folded at white space only, encoded-words
    only in text and phrases); the caller's own fields are checked there (InvalidInput). The
    MIME body is the email package's. Attachments are (filename, content type, bytes[, cid])
    or objects with those attributes."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    head = [
        fold("From", address_chunks("From", [sender], smtputf8)),
        fold("To", address_chunks("To", to, smtputf8)),
    ]
    if cc:
        head.append(fold("Cc", address_chunks("Cc", cc, smtputf8)))
    if reply_to:
        head.append(fold("Reply-To", address_chunks("Reply-To", reply_to, smtputf8)))
    head.append(fold("Subject", text_chunks("Subject", subject, smtputf8)))
    head.append(f"Date: {format_datetime(datetime.now(UTC))}\r\n")
    head.append(f"Message-ID: <{message_id}>\r\n")
    head += caller_headers(pairs, smtputf8)
    body = _body(text, html, _parts(attachments), _POLICY_UTF8 if smtputf8 else _POLICY)
    return "".join(head).encode("utf-8") + body

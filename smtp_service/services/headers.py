"""Header fields written as their grammar says, and the fields a caller may add.

Writing (RFC 5322 section 2.2.3, RFC 2047):

- A value is folded only at white space: a line break goes before a run of spaces or tabs, so
  unfolding (removing the CRLFs) gives back exactly what was written. A line is kept to 76
  characters where white space allows (RFC 2047 section 2 limits a line with an encoded-word to
  76); a word that cannot be broken may make it longer, never longer than 998 (section 2.1.1).
- RFC 2047 encoded-words appear only where the grammar has text or a phrase (section 5): the
  Subject and other unstructured fields, display names, a List-Id's description. Structured
  values (message ids, `<URI>` lists, addresses, tags) go out verbatim, or are refused.
- Text that needs encoding is encoded whole: every character, spaces included, sits inside an
  encoded-word, and white space appears only between encoded-words, where decoders drop it
  (section 6.2). No character is split across encoded-words (section 5). This is what the
  email package of CPython 3.11 gets wrong when it folds long non-ASCII text (gh-144156:
  spaces between encoded-words are lost), so this module writes the headers itself.

The fields a caller may add (`headers` of a send request), decided here and in the README:

- refused: the fields the service writes itself (From, To, Cc, Bcc, Reply-To, Sender, Subject,
  Date, Message-ID, MIME-Version, Content-Type, Content-Transfer-Encoding); trace and resent
  fields, which only a relay or a re-sender adds (Return-Path, Received, Resent-*, RFC 5322
  3.6.6-3.6.7); the MIME part fields other than Content-Language (Content-Disposition,
  Content-ID, Content-Description, ...: the service builds the MIME structure, attachments say
  their own); signatures and verdicts that only the signing or checking host can write
  (DKIM-Signature, ARC-*, Authentication-Results); and a second field of a name already given
  (names compare case-insensitively);
- checked against their grammar, written verbatim, ASCII only: In-Reply-To and References
  (message ids, RFC 5322 3.6.4; an id without angle brackets gets them, as Nodemailer does),
  List-Archive/-Help/-Owner/-Post/-Subscribe/-Unsubscribe (`<URI>` lists, RFC 2369; List-Post
  may be NO), List-Unsubscribe-Post (exactly `List-Unsubscribe=One-Click`, with an https
  List-Unsubscribe, RFC 8058), Content-Language (language tags, RFC 3282), Auto-Submitted
  (RFC 3834); List-Id (RFC 2919: a description, encoded when not ASCII, and `<list-label>`);
  Disposition-Notification-To (addresses, RFC 8098);
- every other name (X-..., Precedence, Importance, Comments, Keywords, Feedback-ID, ...) is an
  unstructured field (RFC 5322 3.6.8): ASCII verbatim, other text as encoded-words.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Protocol

from smtp_service.services.errors import InvalidInput

LINE = 76  # RFC 2047 section 2: a line that holds an encoded-word
MAX_LINE = 998  # RFC 5322 section 2.1.1, without the CRLF
_WORD = 75  # RFC 2047 section 2: one encoded-word
_CHUNK = re.compile(r"[ \t]*[^ \t]+")  # a word with the white space before it


class LineTooLong(ValueError):
    """A word of a header cannot be folded onto a line of at most 998 characters."""


def fold(name: str, chunks: Iterable[str]) -> str:
    """`Name: value` with CRLF: the chunks (each but the first starting with white space) joined,
    a line break before a chunk that would take the line past LINE. LineTooLong when a line
    must pass MAX_LINE."""
    lines: list[str] = []
    line = f"{name}:"
    first = True
    for chunk in chunks:
        if first:
            line = f"{line} {chunk}" if chunk else line
            first = False
        elif len(line) + len(chunk) > LINE:
            lines.append(line)
            line = chunk
        else:
            line += chunk
        if len(line) > MAX_LINE and _octets(line) > MAX_LINE:
            raise LineTooLong(name)
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


# -- RFC 2047 encoded-words ----------------------------------------------------------------------

# Characters a Q-encoded word may carry as themselves anywhere, phrases included (section 5(3));
# "=", "?" and "_" have meanings inside the word and are always escaped.
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")


def _q(char: str) -> str:
    if char in _Q_SAFE:
        return char
    if char == " ":
        return "_"
    return "".join(f"={b:02X}" for b in char.encode("utf-8"))


def encoded_words(text: str, first: int = _WORD) -> list[str]:
    """The text as RFC 2047 encoded-words (UTF-8, Q or B, whichever is shorter), each at most
    75 characters (the first at most `first`), no character split across two. Decoded and
    concatenated (white space between them is dropped by decoders) they give back the text."""
    q_parts = [_q(c) for c in text]
    q_length = sum(len(p) for p in q_parts)
    b_length = (len(text.encode("utf-8")) + 2) // 3 * 4
    words: list[str] = []
    budget = max(first, 16) - 12  # "=?utf-8?q?" and "?="
    if q_length <= b_length:
        current = ""
        for part in q_parts:
            if current and len(current) + len(part) > budget:
                words.append(f"=?utf-8?q?{current}?=")
                current, budget = "", _WORD - 12
            current += part
        words.append(f"=?utf-8?q?{current}?=")
        return words
    current_bytes = b""
    for char in text:
        data = char.encode("utf-8")
        if current_bytes and (len(current_bytes) + len(data) + 2) // 3 * 4 > budget:
            words.append(f"=?utf-8?b?{base64.b64encode(current_bytes).decode('ascii')}?=")
            current_bytes, budget = b"", _WORD - 12
        current_bytes += data
    words.append(f"=?utf-8?b?{base64.b64encode(current_bytes).decode('ascii')}?=")
    return words


def _octets(text: str) -> int:
    """Length in octets as sent (UTF-8 under SMTPUTF8, RFC 6532 section 3.4)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _first_budget(name: str) -> int:
    """How long the first encoded-word after `Name: ` may be for the line to stay within LINE."""
    return min(_WORD, LINE - len(name) - 2)


def _plain(text: str, utf8: bool) -> bool:
    """True when text may be written as it is: printable ASCII (or, under SMTPUTF8, printable
    UTF-8, RFC 6532 section 3.2) and tabs, no encoded-word look-alike, no white space at either
    end (a parser would drop it)."""
    return (
        (utf8 or text.isascii())
        and text.replace("\t", " ").isprintable()
        and "=?" not in text
        and text == text.strip(" \t")
    )


def text_chunks(name: str, text: str, utf8: bool = False) -> list[str]:
    """An unstructured value (RFC 5322 3.2.5) as chunks: verbatim when it can be, else
    encoded-words (RFC 2047 section 5(1))."""
    if _plain(text, utf8):
        chunks = _CHUNK.findall(text)
        if _octets(name) + 2 + _octets(chunks[0] if chunks else "") <= MAX_LINE and all(
            _octets(c) <= MAX_LINE for c in chunks
        ):
            return chunks
    words = encoded_words(text, _first_budget(name))
    return words[:1] + [" " + w for w in words[1:]]


_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def phrase_chunks(phrase: str, first: int = _WORD, utf8: bool = False) -> list[str]:
    """A display name or other phrase (RFC 5322 3.2.5) as chunks: atoms as they are, other
    printable ASCII as a quoted-string, anything else as encoded-words (RFC 2047 5(3)); under
    SMTPUTF8, non-ASCII text is written as it is, in a quoted-string (RFC 6532 section 3.2).

    Several encoded-words are separated by folding white space, which RFC 2047 decoders drop
    (section 6.2; so does email.header.decode_header); CPython's policy.default address parser
    keeps it, and shows a space where a name longer than one encoded-word (about 45 octets of
    UTF-8) was split. Under SMTPUTF8 there is no split."""
    if (utf8 or phrase.isascii()) and phrase.isprintable() and "=?" not in phrase:
        if phrase.isascii() and _ATOM_PHRASE.fullmatch(phrase):
            return _CHUNK.findall(phrase)
        if phrase == phrase.strip() and "  " not in phrase:
            # one chunk: parsers differ in how they unfold inside a quoted-string
            return ['"' + phrase.replace("\\", "\\\\").replace('"', '\\"') + '"']
    words = encoded_words(phrase, first)
    return words[:1] + [" " + w for w in words[1:]]


class MailboxLike(Protocol):
    """What address_chunks needs of a mailbox (services.addresses.Mailbox)."""

    name: str
    address: str


class GroupLike(Protocol):
    """What address_chunks needs of a group (services.addresses.Group)."""

    name: str
    members: tuple[MailboxLike, ...]


def _mailbox_chunks(mailbox: MailboxLike, first: int, utf8: bool) -> list[str]:
    if not mailbox.name:
        return [mailbox.address]
    return [*phrase_chunks(mailbox.name, first, utf8), f" <{mailbox.address}>"]


def address_chunks(
    name: str, entries: Iterable[MailboxLike | GroupLike], utf8: bool = False
) -> list[str]:
    """An address list (RFC 5322 3.4) as chunks: `Name <addr>, Team: a@x, b@y;`."""
    chunks: list[str] = []
    first = _first_budget(name)
    items = list(entries)
    for index, entry in enumerate(items):
        lead = " " if chunks else ""
        if hasattr(entry, "members"):
            group: GroupLike = entry  # type: ignore[assignment]
            part = phrase_chunks(group.name, first, utf8) if group.name else [""]
            part[-1] += ":"
            for m_index, member in enumerate(group.members):
                member_chunks = _mailbox_chunks(member, _WORD, utf8)
                member_chunks[0] = " " + member_chunks[0]
                if m_index < len(group.members) - 1:
                    member_chunks[-1] += ","
                part += member_chunks
            part[-1] += ";"
        else:
            part = _mailbox_chunks(entry, first, utf8)  # type: ignore[arg-type]
        if index < len(items) - 1:
            part[-1] += ","
        part[0] = lead + part[0]
        chunks += part
        first = _WORD
    return chunks


# -- the fields a caller may add -----------------------------------------------------------------

SERVICE_FIELDS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "sender",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)
_RELAY_FIELDS = frozenset(
    {
        "return-path",
        "received",
        "dkim-signature",
        "authentication-results",
    }
)
_MSG_ID_LISTS = frozenset({"in-reply-to", "references"})
_URI_LISTS = frozenset(
    {
        "list-archive",
        "list-help",
        "list-owner",
        "list-post",
        "list-subscribe",
        "list-unsubscribe",
    }
)
_MSG_ID = re.compile(r"<?([!-;=?-~]+@[!-;=?-~]+)>?")  # printable ASCII but "<", ">"; one "@"
_URI = re.compile(r"<[A-Za-z][A-Za-z0-9+.-]*:[!-;=?-~]+>")
_URI_LIST = re.compile(rf"{_URI.pattern}(?:[ \t]*,[ \t]*{_URI.pattern})*")
_LANGUAGE_TAG = r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*"
_LANGUAGE_LIST = re.compile(rf"{_LANGUAGE_TAG}(?:[ \t]*,[ \t]*{_LANGUAGE_TAG})*")
_AUTO_SUBMITTED = re.compile(r"[A-Za-z0-9-]+(?:[ \t]*;[ \t]*[A-Za-z0-9-]+=[!-:<-~]+)*")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LIST_ID = re.compile(rf"(.*?)[ \t]*<({_ATEXT}(?:\.{_ATEXT})*)>")  # [phrase] <dot-atom-text>
ONE_CLICK = "List-Unsubscribe=One-Click"
_STRUCTURED = (
    _MSG_ID_LISTS
    | _URI_LISTS
    | {
        "list-unsubscribe-post",
        "content-language",
        "auto-submitted",
        "list-id",
        "disposition-notification-to",
    }
)


def refusal(name: str) -> str | None:
    """Why a caller may not set this field, or None when it may."""
    lower = name.lower()
    if lower in SERVICE_FIELDS:
        return f"Header {name} is set by the service and cannot be set here."
    if lower in _RELAY_FIELDS or lower.startswith(("resent-", "arc-")):
        return f"Header {name} is added by relays or re-senders and cannot be set here."
    if lower.startswith("content-") and lower != "content-language":
        return (
            f"Header {name} describes a MIME part and cannot be set here "
            "(attachments take filename, contentType and cid)."
        )
    return None


def caller_headers(pairs: Iterable[tuple[str, str]], utf8: bool = False) -> list[str]:
    """The caller's extra fields, checked and written (each a folded `Name: value` line with
    CRLF). InvalidInput on `headers` with every problem found."""
    problems: list[str] = []
    written: list[str] = []
    seen: dict[str, str] = {}
    given = list(pairs)
    names = {name.lower() for name, _ in given}
    for name, value in given:
        lower = name.lower()
        if lower in seen:
            problems.append(
                f"Header {name} is given more than once ({seen[lower]} and {name}; "
                "names are case-insensitive)."
            )
            continue
        seen[lower] = name
        reason = refusal(name)
        if reason is None:
            try:
                reason, line = _written(name, value, names, utf8)
            except LineTooLong:
                reason, line = (
                    f"Header {name} has a word too long for one line "
                    f"({MAX_LINE} characters with its name, RFC 5322 2.1.1).",
                    None,
                )
            if line is not None:
                written.append(line)
        if reason is not None:
            problems.append(reason)
    if problems:
        raise InvalidInput({"headers": problems})
    return written


def _written(name: str, value: str, names: set[str], utf8: bool) -> tuple[str | None, str | None]:
    """(None, the folded line) for a good value, or (why not, None)."""
    lower = name.lower()
    if lower not in _STRUCTURED:
        value = value.strip(" \t")  # white space at either end means nothing (RFC 5322 3.2.2)
        if _plain(value, False):  # ASCII goes out verbatim, never encoded: or it does not fit
            return None, fold(name, _CHUNK.findall(value))
        return None, fold(name, text_chunks(name, value, utf8))
    stripped = value.strip(" \t")
    if lower == "list-id":
        match = _LIST_ID.fullmatch(stripped)
        if not match:
            return f"Header {name} must be a description and <list-label> (RFC 2919).", None
        description, label = match.groups()
        if not description:
            return None, fold(name, [f"<{label}>"])
        chunks = phrase_chunks(description, _first_budget(name), utf8)
        return None, fold(name, [*chunks, f" <{label}>"])
    if lower == "disposition-notification-to":
        from smtp_service.services.addresses import parse_address_list  # no import cycle

        try:
            entries = parse_address_list(stripped, "headers")
        except InvalidInput:
            return f"Header {name} must be addresses (RFC 8098).", None
        if any(hasattr(e, "members") or not e.address.isascii() for e in entries):
            return f"Header {name} must be ASCII addresses, no groups (RFC 8098).", None
        return None, fold(name, address_chunks(name, entries))
    if not stripped.isascii():
        return (
            f"Header {name} is structured and must be ASCII "
            "(URIs percent-encoded, RFC 3986), not encoded.",
            None,
        )
    if lower in _MSG_ID_LISTS:
        ids = stripped.split()
        if not ids or not all(_MSG_ID.fullmatch(i) for i in ids):
            return f"Header {name} must be message ids, <id@host>, separated by spaces.", None
        bracketed = re.sub(r"[^ \t]+", lambda m: _bracketed(m.group(0)), stripped)
        return None, fold(name, _CHUNK.findall(bracketed))
    if lower in _URI_LISTS:
        if not (_URI_LIST.fullmatch(stripped) or (lower == "list-post" and stripped == "NO")):
            return f"Header {name} must be <URI> entries separated by commas (RFC 2369).", None
        if lower == "list-unsubscribe" and "list-unsubscribe-post" in names:
            if not re.search(r"<https:", stripped, re.IGNORECASE):
                return (
                    f"Header {name} must hold an https URI for one-click unsubscribe "
                    "(RFC 8058 section 3.1).",
                    None,
                )
        return None, fold(name, _CHUNK.findall(stripped))
    if lower == "list-unsubscribe-post":
        if stripped != ONE_CLICK:
            return f"Header {name} must be exactly {ONE_CLICK} (RFC 8058).", None
        if "list-unsubscribe" not in names:
            return f"Header {name} needs a List-Unsubscribe header (RFC 8058).", None
        return None, fold(name, [stripped])
    if lower == "content-language":
        if not _LANGUAGE_LIST.fullmatch(stripped):
            return f"Header {name} must be language tags separated by commas (RFC 3282).", None
        return None, fold(name, _CHUNK.findall(stripped))
    # auto-submitted
    if not _AUTO_SUBMITTED.fullmatch(stripped):
        return f"Header {name} must be a keyword such as auto-generated (RFC 3834).", None
    return None, fold(name, _CHUNK.findall(stripped))


def _bracketed(message_id: str) -> str:
    return f"<{message_id.strip('<>')}>"

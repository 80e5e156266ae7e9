"""Addresses as callers write them: RFC 5322 address lists (mailboxes and groups), checked.

What one string of an address field may hold (RFC 5322 section 3.4, as Nodemailer took it):

- a bare address, `a@b.example`, or one in angle brackets, `<a@b.example>`;
- a display name and an address, `Jane Doe <a@b.example>`; a name with specials quoted,
  `"Doe, Jane" <a@b.example>`; a name in RFC 2047 encoded-words is decoded;
- several of those separated by commas, `a@b.example, Jane <j@b.example>`;
- groups, `Team: a@b.example, b@b.example;`, also empty, `undisclosed-recipients:;` (the
  members are recipients; the group is written as a group in To and Cc);
- comments, `a@b.example (Jane)`, which are dropped.

Internationalised addresses are accepted (the domain is sent in IDNA form unless the local part
needs SMTPUTF8), and so are addresses at special-use and internal names (`corp.local`,
`.internal`, `.test`, single labels such as `intranet`): the account's SMTP server decides what it
can deliver. Refused: quoted local parts (`"a b"@b.example`) and domain literals
(`a@[10.0.0.1]`): a literal would make the server connect to whatever IP a caller names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from email import errors as email_errors
from email.headerregistry import Address, HeaderRegistry

import email_validator
import idna
from email_validator import EmailNotValidError, validate_email

from smtp_service.services.errors import InvalidInput, shown

# email-validator refuses special-use names (local, localhost, test, ...) on every call; its
# documented way to allow them is to take them off this list. Deliverability is the server's call.
email_validator.SPECIAL_USE_DOMAIN_NAMES.clear()

MAX_DISPLAY_NAME = 128  # characters of one display name
MAX_MAILBOX_LENGTH = 320  # one address with its display name: well inside a 998-byte line
# One string of an address field (a comma list, groups): the stdlib's address parser is
# quadratic on some inputs (a 16,000-character quoted string costs 0.4 s), 4,000 costs < 30 ms.
MAX_ADDRESS_LIST_LENGTH = 4000

_PARSER = HeaderRegistry()


@dataclass(frozen=True)
class Mailbox:
    """A checked address with its optional display name."""

    name: str
    address: str  # normalised; ASCII unless the local part needs SMTPUTF8

    @property
    def needs_smtputf8(self) -> bool:
        return not self.address.isascii()

    def header(self) -> Address:
        """The address as an email.headerregistry value."""
        local, _, domain = self.address.rpartition("@")
        return Address(display_name=self.name, username=local, domain=domain)


@dataclass(frozen=True)
class Group:
    """An RFC 5322 group (section 3.4): a display name and its members, perhaps none."""

    name: str
    members: tuple[Mailbox, ...]


Entry = Mailbox | Group


def mailboxes(entries: tuple[Entry, ...] | list[Entry]) -> list[Mailbox]:
    """Every mailbox of the entries, group members in place."""
    out: list[Mailbox] = []
    for entry in entries:
        if isinstance(entry, Group):
            out.extend(entry.members)
        else:
            out.append(entry)
    return out


@functools.lru_cache(maxsize=10_000)
def parse_address_list(text: str, field: str) -> tuple[Entry, ...]:
    """One string of an address field -> its mailboxes and groups; InvalidInput naming the field.

    The same senders and recipients come back all the time and checking one costs ~0.1 ms, so
    the results (immutable) are kept, least recently used dropped first; a refusal raises and
    is not kept."""
    if len(text) > MAX_ADDRESS_LIST_LENGTH:
        raise InvalidInput.field(
            field, f"An address string must be at most {MAX_ADDRESS_LIST_LENGTH} characters."
        )
    try:
        parsed = _PARSER("To", text)
    except Exception:  # noqa: BLE001 - any failure of the parser on a caller's text is a 400
        parsed = None  # (deeply nested comments exhaust its recursion, for one)
    if parsed is None or any(
        isinstance(d, email_errors.InvalidHeaderDefect) for d in parsed.defects
    ):
        raise InvalidInput.field(field, f"Invalid email address: {shown(text, 80)}")
    entries: list[Entry] = []
    for group in parsed.groups:
        members = tuple(_checked(a.display_name, a.addr_spec, field) for a in group.addresses)
        if group.display_name is None:
            entries.extend(members)
        else:
            entries.append(Group(_checked_name(group.display_name, field), members))
    if not entries:
        raise InvalidInput.field(field, f"Invalid email address: {shown(text, 80)}")
    return tuple(entries)


def parse_mailbox(text: str, field: str) -> Mailbox:
    """Exactly one mailbox ('a@b.example' or 'Name <a@b.example>'); InvalidInput naming the
    field for anything else, a list or a group included."""
    entries = parse_address_list(text, field)
    if len(entries) != 1 or isinstance(entries[0], Group):
        raise InvalidInput.field(field, f"Must be one address: {shown(text, 80)}")
    return entries[0]


def parse_mailboxes(items: tuple[str, ...] | list[str], field: str) -> list[Mailbox]:
    """Each item parsed as an address list; every mailbox of every item, in order."""
    return mailboxes([e for item in items for e in parse_address_list(item, field)])


def _checked_name(name: str, field: str) -> str:
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidInput.field(
            field, f"Display name longer than {MAX_DISPLAY_NAME} characters: {shown(name, 80)}"
        )
    return name


def _checked(name: str, addr: str, field: str) -> Mailbox:
    _checked_name(name, field)
    if len(addr) + len(name) > MAX_MAILBOX_LENGTH:
        raise InvalidInput.field(
            field, f"Each address must be at most {MAX_MAILBOX_LENGTH} characters."
        )
    try:
        checked = validate_email(
            addr, check_deliverability=False, allow_smtputf8=True, globally_deliverable=False
        )
    except EmailNotValidError as exc:
        message = f"Invalid email address {shown(addr, 80)}: {exc}"
        raise InvalidInput.field(field, message) from None
    return Mailbox(name, checked.ascii_email or checked.normalized)


def address_forms(email: str) -> frozenset[str]:
    """The spellings one address may be stored under, lower-cased: as written, with its domain
    in IDNA (punycode) and in Unicode. An address that does not parse is only itself."""
    forms = {email.lower()}
    local, at, domain = email.rpartition("@")
    if not at:
        return frozenset(forms)
    try:
        checked = validate_email(
            email, check_deliverability=False, allow_smtputf8=True, globally_deliverable=False
        )
    except EmailNotValidError:
        return frozenset(forms)
    forms.add(f"{checked.local_part}@{checked.ascii_domain}".lower())
    forms.add(f"{checked.local_part}@{checked.domain}".lower())
    forms.add(f"{local}@{checked.ascii_domain}".lower())
    return frozenset(forms)


@functools.lru_cache(maxsize=10_000)
def address_key(email: str) -> str:
    """One spelling per address, for comparing: lower-cased, the domain in IDNA form (as
    email-validator writes it, IDNA 2008 with UTS 46 mapping)."""
    local, at, domain = email.rpartition("@")
    if not at or domain.isascii():
        return email.lower()
    try:
        domain = idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        pass
    return f"{local}@{domain}".lower()

"""What an SMTP refusal means: its RFC 3463 enhanced status code and RFC 5321 reply code read
into a class that says whose fault it is and whether a retry can succeed.

- `mailbox`: the address does not exist or is disabled; permanent; suppressed at once.
- `mailbox-full`: the mailbox cannot take mail now (full, over quota); temporary; suppressed
  after SOFT_BOUNCE_LIMIT of them within SOFT_BOUNCE_DAYS.
- `transient`: the server cannot take it now (4xx, 421, greylisting); temporary; never suppresses.
- `policy`: the sender, its server or the message was refused; permanent; never suppresses.
- `protocol`: a command, parameter or limit was refused; permanent; never suppresses.

Sources: RFC 3463 section 3 (subject X.1 addressing: X.1.1 bad mailbox, X.1.2 bad system, X.1.3
bad syntax, X.1.6 moved; X.1.7/X.1.8 are the *sender's* address; X.2 mailbox: X.2.1 disabled,
X.2.2 full "may be temporary", X.2.3 message too long; X.3 mail system, X.4 network, X.5
protocol, X.6 content, X.7 security or policy, "about the sender or the message"); RFC 5321
section 4.2.5/4.5.3.1.10 (552 at RCPT, "too many recipients" or storage, is to be treated as
temporary) and the basic codes where no enhanced code is given (4.2.2, 4.2.3).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# An enhanced code opens the reply text (RFC 2034 section 4: after the basic code, on each
# line); one elsewhere in the text ("Exim 4.96.1") is not a status code.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")

MAILBOX = "mailbox"
MAILBOX_FULL = "mailbox-full"
TRANSIENT = "transient"
POLICY = "policy"
PROTOCOL = "protocol"
CLASSES = (MAILBOX, MAILBOX_FULL, TRANSIENT, POLICY, PROTOCOL)

# Enhanced subject.detail -> class, for permanent (5.x.x) codes. RFC 3463 section 3.
_PERMANENT = {
    "1.0": MAILBOX,
    "1.1": MAILBOX,
    "1.2": MAILBOX,
    "1.3": MAILBOX,
    "1.4": MAILBOX,  # destination mailbox address ambiguous
    "1.5": MAILBOX,
    "1.6": MAILBOX,  # moved, no forwarding address
    "1.7": POLICY,  # bad sender's mailbox address syntax
    "1.8": POLICY,  # bad sender's system address
    "2.0": MAILBOX,
    "2.1": MAILBOX,  # mailbox disabled
    "2.2": MAILBOX_FULL,  # mailbox full: "may be temporary"
    "2.3": POLICY,  # message length exceeds administrative limit
    "2.4": PROTOCOL,  # mailing list expansion problem
    "3.4": POLICY,  # message too big for system
}
# Subject (first digit) -> class where the table above has no entry.
_SUBJECTS = {"1": MAILBOX, "2": MAILBOX, "3": TRANSIENT, "4": TRANSIENT, "5": PROTOCOL}
_SUBJECTS.update({"6": POLICY, "7": POLICY})


@dataclass(frozen=True)
class Refusal:
    """One refused recipient (or the whole message, per recipient) with its classification.

    `type` keeps the contract's meaning: "hard" for a permanent reply, "soft" for a temporary
    one; `category` (one of CLASSES) says whose fault it is; `temporary` whether a later retry
    can succeed (a mailbox-full 552 is permanent in form but temporary in fact).
    """

    email: str
    code: int | None
    enhanced_code: str | None
    reply: str | None
    type: str
    category: str | None = TRANSIENT  # None: kept from before refusals were classified
    temporary: bool | None = True

    def as_dict(self) -> dict[str, object]:
        """The JSON shape used in responses, the message log and stored results."""
        return {
            "email": self.email,
            "code": self.code,
            "enhancedCode": self.enhanced_code,
            "reply": self.reply,
            "type": self.type,
            "category": self.category,
            "temporary": self.temporary,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Refusal:
        """The refusal as_dict() wrote (one stored before classes existed is classified now)."""
        if "category" not in data:
            return classify_smtp_error(data["email"], data["code"], data["reply"])
        return cls(
            data["email"],
            data["code"],
            data["enhancedCode"],
            data["reply"],
            data["type"],
            data["category"],
            data["temporary"],
        )

    @property
    def suppresses(self) -> bool:
        """True when this refusal alone puts the address on the suppression list."""
        return self.category == MAILBOX and not self.temporary


def enhanced_code(reply: str | None) -> str | None:
    """The RFC 3463 status code (class.subject.detail) that opens a reply line, if any.

    Multi-line replies are given as their lines joined with newlines; the first line that opens
    with an enhanced code gives it (RFC 2034 section 4).
    """
    for line in (reply or "").splitlines():
        match = _ENHANCED.match(line.lstrip())
        if match:
            return ".".join(match.groups())
    return None


def classify(code: int | None, reply: str | None, phase: str = "rcpt") -> tuple[str, str, bool]:
    """(type, category, temporary) of a refusal by the reply `code` and text at `phase`.

    phase is the command refused: "rcpt" (about the recipient), "mail" (about the sender),
    "data" (about the message) or "connect". The enhanced code's class and subject decide; the
    basic code decides where there is none, or where the two disagree about permanence (RFC 3463
    section 2: the enhanced class must match the basic code's first digit).
    """
    enhanced = enhanced_code(reply)
    permanent = code is not None and 500 <= code <= 599
    if code is None or not 400 <= code <= 599:
        permanent = bool(enhanced and enhanced.startswith("5"))
    kind = "hard" if permanent else "soft"
    if enhanced and enhanced[0] == ("5" if permanent else "4"):
        _, subject, detail = enhanced.split(".")
        if permanent:
            category = _PERMANENT.get(f"{subject}.{detail}") or _SUBJECTS.get(subject, POLICY)
        elif subject == "2" and detail in ("1", "2"):
            category = MAILBOX_FULL  # temporarily disabled, over quota
        else:
            category = _SUBJECTS.get(subject, TRANSIENT)
            if category in (MAILBOX, PROTOCOL, POLICY):
                category = TRANSIENT  # a 4.x.x is never the address's final word
    else:
        category = _by_basic_code(code, permanent, phase)
    if phase != "rcpt" and category in (MAILBOX, MAILBOX_FULL):
        category = POLICY if permanent else TRANSIENT  # MAIL/DATA say nothing of a recipient
    if category == MAILBOX_FULL and phase == "rcpt" and code == 552:
        kind = "soft"  # RFC 5321 4.5.3.1.10: 552 at RCPT is to be treated as temporary
    temporary = not permanent or category == MAILBOX_FULL
    if temporary:
        kind = "soft"
    return kind, category, temporary


def _by_basic_code(code: int | None, permanent: bool, phase: str) -> str:
    """The class from the basic reply code alone (RFC 5321 section 4.2.2, 4.2.3)."""
    if not permanent:
        return MAILBOX_FULL if code == 452 and phase == "rcpt" else TRANSIENT
    if phase == "rcpt" and code in (550, 551, 553):
        return MAILBOX  # mailbox unavailable, user not local, mailbox name not allowed
    if phase == "rcpt" and code == 552:
        return MAILBOX_FULL  # exceeded storage allocation
    if code in (500, 501, 502, 503, 504, 555):
        return PROTOCOL
    return POLICY  # 554 transaction failed, 530/535 authentication, 550 at MAIL or DATA


def classify_smtp_error(
    email: str, code: int | None, reply: str | None, phase: str = "rcpt"
) -> Refusal:
    """Classify one refusal of `email` (see classify())."""
    kind, category, temporary = classify(code, reply, phase)
    return Refusal(email, code, enhanced_code(reply), reply, kind, category, temporary)

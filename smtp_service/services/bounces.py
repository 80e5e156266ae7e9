"""Bounce detection from SMTP reply codes and RFC 3463 enhanced status codes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


@dataclass(frozen=True)
class Refusal:
    """One refused recipient (or the whole message) with its classification."""

    email: str
    code: int | None
    enhanced_code: str | None
    reply: str | None
    type: str  # "hard" (permanent, 5xx) or "soft" (temporary, 4xx)

    def as_dict(self) -> dict[str, object]:
        """The JSON shape used in responses and the message log."""
        return {
            "email": self.email,
            "code": self.code,
            "enhancedCode": self.enhanced_code,
            "reply": self.reply,
            "type": self.type,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Refusal:
        """The refusal as_dict() wrote."""
        return cls(data["email"], data["code"], data["enhancedCode"], data["reply"], data["type"])


def enhanced_code(reply: str | None) -> str | None:
    """The first RFC 3463 status code (class.subject.detail) in a reply text, if any."""
    match = _ENHANCED.search(reply or "")
    return ".".join(match.groups()) if match else None


def bounce_type(code: int | None, reply: str | None) -> str:
    """hard for a permanent failure, soft for a temporary one.

    The basic reply code decides; the enhanced code's class decides only when the basic code
    is missing or is not a failure code.
    """
    if code is not None and 500 <= code <= 599:
        return "hard"
    if code is not None and 400 <= code <= 499:
        return "soft"
    enhanced = enhanced_code(reply)
    return "hard" if enhanced and enhanced.startswith("5") else "soft"


def classify_smtp_error(email: str, code: int | None, reply: str | None) -> Refusal:
    """Classify one refusal."""
    return Refusal(email, code, enhanced_code(reply), reply, bounce_type(code, reply))

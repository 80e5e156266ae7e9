"""Query-string schemas: what the GET routes with parameters take; loading one gives the
service's keyword arguments. Every value arrives as a string; each field says what it reads."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

from smtp_service.services.analytics import DEFAULT_LIMIT, INTERVALS, MAX_LIMIT, STATUSES

# Control characters (NUL included) belong in no parameter; the database could not compare NUL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TIMESTAMP_EXAMPLE = "2026-11-29T18:00:00Z"


class Timestamp(fields.Field):
    """An ISO 8601 timestamp: a date and time with `Z` or an offset, or without one (UTC), or a
    date alone (its midnight UTC); loaded as a datetime."""

    OPENAPI = {"type": "string", "maxLength": 64, "example": _TIMESTAMP_EXAMPLE}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        problem = (
            f"Not an ISO 8601 timestamp such as {_TIMESTAMP_EXAMPLE} or "
            "2026-11-29T19:00:00+01:00 (in a URL, write + as %2B)."
        )
        if not isinstance(value, str) or len(value) > 64 or _CONTROL.search(value):
            raise ValidationError(problem)
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValidationError(problem) from None


class QueryInteger(fields.Integer):
    """A whole number written in decimal digits (no sign, point, exponent or spaces)."""

    OPENAPI = {"type": "integer"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,9}", value):
            raise ValidationError("Not a valid integer.")
        return super()._deserialize(value, attr, data, **kwargs)


class QueryText(fields.String):
    """A string of 1 to `max_length` characters without control characters."""

    def __init__(self, max_length: int, **kwargs: Any) -> None:
        super().__init__(validate=validate.Length(min=1, max=max_length), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if _CONTROL.search(text):
            raise ValidationError("Must not contain control characters.")
        return text


class MessageStatsQuery(Schema):
    """GET /api/messages/stats?from=&to=&interval= -> MessageAnalytics.stats's arguments."""

    start = Timestamp(
        data_key="from",
        metadata={
            "description": "Start of the range (ISO 8601; UTC when no offset is given), "
            "rounded down to the start of its interval. Default: 7 days before `to`."
        },
    )
    end = Timestamp(
        data_key="to",
        metadata={
            "description": "End of the range, exclusive, rounded up to the end of its "
            "interval. Default: now. At most 1000 intervals from `from`."
        },
    )
    interval = fields.String(
        load_default="day",
        validate=validate.OneOf(list(INTERVALS)),
        metadata={"description": "Bucket size, aligned to UTC. Default: day."},
    )


class MessageListQuery(Schema):
    """GET /api/messages?status=&to=&from=&limit=&cursor= -> MessageAnalytics.page's
    arguments."""

    status = fields.String(
        validate=validate.OneOf(sorted(STATUSES)),
        metadata={"description": "Only messages with this status."},
    )
    to = QueryText(
        320,
        metadata={
            "description": "Only messages with this recipient address (exact, ignoring the "
            "case of ASCII letters; the domain in IDNA or Unicode form)."
        },
    )
    sender = QueryText(
        320,
        data_key="from",
        metadata={
            "description": "Only messages from this sender address (exact, ignoring the case "
            "of ASCII letters)."
        },
    )
    limit = QueryInteger(
        load_default=DEFAULT_LIMIT,
        validate=validate.Range(min=1, max=MAX_LIMIT),
        metadata={"description": f"Messages per page, 1-{MAX_LIMIT}. Default: {DEFAULT_LIMIT}."},
    )
    cursor = QueryText(
        512,
        metadata={"description": "The nextCursor of the previous page, as given."},
    )

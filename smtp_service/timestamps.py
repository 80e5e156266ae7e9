"""Timestamps in the format the original service wrote: ISO 8601, UTC, milliseconds, Z."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(moment: datetime | None = None) -> str:
    """2025-11-10T21:00:00.000Z for the given moment (now by default)."""
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

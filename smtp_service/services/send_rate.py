"""Per-account send rate limits: rates in flask-limiter's syntax, counted in fixed windows in the
message database, so that every worker and instance shares them exactly.

A send takes a slot in each of its account's windows before the SMTP conversation (all or
none) and gives them back when it ends without reaching a server; a send the server took,
refused or may have (uncertain) keeps them.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from limits import parse_many

from smtp_service.services.errors import SendRateLimited
from smtp_service.storage.send_rate import SendCounters, Window

log = logging.getLogger(__name__)

UNLIMITED = "unlimited"  # an account's rateLimit that lifts SEND_RATE_LIMIT for it
MAX_RATE_TEXT = 200  # characters of a rate text: a few rates, never a parser's workload
RATE_HINT = "a rate such as '500/day' or '100/minute;2000/hour', or 'unlimited'"


class InvalidRate(ValueError):
    """Text that is not a send rate; the message says why, safe to show."""


@dataclass(frozen=True)
class Rate:
    """At most `amount` sends per `seconds` (a fixed window of that length)."""

    amount: int
    seconds: int

    @property
    def key(self) -> str:
        """The counter's name: the window's length in seconds ("60"). Not the amount: the
        sends an account made this hour still count when its limit changes from 100/hour to
        200/hour (or from the default to its own)."""
        return str(self.seconds)

    def __str__(self) -> str:
        return f"{self.amount} per {_duration(self.seconds)}"


@functools.lru_cache(maxsize=4096)
def parse_rates(text: str) -> tuple[Rate, ...]:
    """The rates of a limit text in flask-limiter's syntax ("100/minute;2000/hour", "500 per
    day", "10/5 seconds"; `;`, `,` or `|` between rates), parsed by the `limits` package.

    "" and "unlimited" (any case) are no rates: no limit. Raises InvalidRate for anything else
    that does not parse, a rate of 0 sends, or a text over MAX_RATE_TEXT characters. Rates are
    returned in one fixed order (by window length), one per window length (the smallest amount
    given for it): counters are always taken in that order.
    """
    value = text.strip()
    if len(value) > MAX_RATE_TEXT:
        raise InvalidRate(f"Must be at most {MAX_RATE_TEXT} characters.")
    if value == "" or value.lower() == UNLIMITED:
        return ()
    try:
        items = parse_many(value)
    except ValueError:
        raise InvalidRate(f"Must be {RATE_HINT}.") from None
    amounts: dict[int, int] = {}
    for item in items:
        if item.amount < 1:
            raise InvalidRate(f"A rate must allow at least 1 send (for no limit: '{UNLIMITED}').")
        seconds = item.get_expiry()
        amounts[seconds] = min(item.amount, amounts.get(seconds, item.amount))
    return tuple(Rate(amounts[s], s) for s in sorted(amounts))


@dataclass(frozen=True)
class Reservation:
    """The slots one send took: given back with SendRateLimiter.release."""

    account_id: str
    windows: tuple[Window, ...]


class SendRateLimiter:
    """Takes and gives back send slots for an account's rates (SEND_RATE_LIMIT, or the
    account's own rateLimit)."""

    def __init__(
        self,
        counters: SendCounters,
        default: tuple[Rate, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.counters = counters
        self.default = default  # SEND_RATE_LIMIT, parsed
        self.clock = clock  # seconds since the epoch: windows start at multiples of their length

    def rates_for(self, account_rate: str | None) -> tuple[Rate, ...]:
        """The rates a send of an account obeys: its own rateLimit when it set one (stored
        texts were checked on save and on load; "unlimited" is none), else the default."""
        if account_rate is None:
            return self.default
        return parse_rates(account_rate)

    def reserve(self, account_id: str, rates: tuple[Rate, ...]) -> Reservation:
        """Take a slot in the current window of every rate (all or none).

        Windows are fixed and aligned on the epoch: a window of 60 s starts at each whole
        minute, one of a day at 00:00 UTC. Raises SendRateLimited with the seconds until the
        full window ends (at least 1; RFC 9110 10.2.3's Retry-After) when one has no room.
        """
        now = self.clock()
        windows = tuple(
            Window(r.key, int(now // r.seconds) * r.seconds, r.amount) for r in rates
        )
        full = self.counters.take(account_id, windows)
        if full is not None:
            rate = next(r for r in rates if r.key == full.rate)
            retry_after = max(1, math.ceil(full.start + rate.seconds - now))
            raise SendRateLimited(retry_after, str(rate))
        return Reservation(account_id, windows)

    def release(self, reservation: Reservation) -> None:
        """Give the slots back: the send reached no SMTP server. A failure to do so is logged,
        never raised (the window then counts one send too many, the safe side)."""
        try:
            self.counters.give_back(reservation.account_id, reservation.windows)
        except Exception as exc:  # noqa: BLE001 - the caller's answer must not change
            log.error(
                "account %s: a send slot could not be given back (%s)",
                reservation.account_id,
                type(exc).__name__,
            )


_UNITS = ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


def _duration(seconds: int) -> str:
    for size, name in _UNITS:
        if seconds % size == 0:
            count = seconds // size
            return name if count == 1 else f"{count} {name}s"
    return f"{seconds} seconds"  # pragma: no cover - 1 divides every number


__all__ = [
    "UNLIMITED",
    "InvalidRate",
    "Rate",
    "Reservation",
    "SendRateLimiter",
    "parse_rates",
]

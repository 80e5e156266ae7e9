"""Readiness: can this worker serve sends now? The data folder, the database, the global server.

Each check gives "ok" or a short reason that holds no secret: no password, no database URL,
no host name, no server reply (only the kind of failure). The SMTP check is cached, so that a
storm of probes costs the SMTP server one connection per `cache_seconds` per worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from smtp_service.services.transport import TransportError

OK = "ok"
NOT_CONFIGURED = "not configured"  # no global server: accounts with their own still send


@dataclass(frozen=True)
class ReadinessReport:
    """What each check found: name -> "ok", "not configured" or why not."""

    checks: dict[str, str]

    @property
    def failing(self) -> list[str]:
        """The names of the checks that failed, in check order."""
        return [name for name, state in self.checks.items() if state not in (OK, NOT_CONFIGURED)]

    @property
    def ready(self) -> bool:
        """True when no check failed ("not configured" counts as ready)."""
        return not self.failing


class Readiness:
    """The three checks behind GET /readyz.

    `data_dir_writable()` says whether a file can be created in the data folder;
    `database_ping()` runs SELECT 1 and raises on failure; `smtp_probe()` connects to the
    global server, says EHLO (and STARTTLS when offered) and QUITs, raising TransportError,
    or is None when no global server is configured. The SMTP outcome is reused for
    `cache_seconds` (0: never); concurrent callers share one probe. `clock` is monotonic seconds.
    """

    def __init__(
        self,
        *,
        data_dir_writable: Callable[[], bool],
        database_ping: Callable[[], None],
        smtp_probe: Callable[[], None] | None,
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._data_dir_writable = data_dir_writable
        self._database_ping = database_ping
        self._smtp_probe = smtp_probe
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._smtp_lock = threading.Lock()
        self._smtp_state: str | None = None
        self._smtp_checked = 0.0

    def report(self) -> ReadinessReport:
        """Run the checks (the SMTP one from the cache when fresh); never raises."""
        return ReadinessReport(
            {
                "dataDir": OK if self._data_dir_writable() else "not writable",
                "database": self._database(),
                "smtp": self._smtp(),
            }
        )

    def _database(self) -> str:
        try:
            self._database_ping()
        except Exception as exc:  # noqa: BLE001 - the type only: a driver's text may hold the URL
            return f"unreachable ({type(exc).__name__})"
        return OK

    def _smtp(self) -> str:
        if self._smtp_probe is None:
            return NOT_CONFIGURED
        with self._smtp_lock:
            now = self._clock()
            if self._smtp_state is not None and now - self._smtp_checked < self.cache_seconds:
                return self._smtp_state
            try:
                self._smtp_probe()
                state = OK
            except TransportError as exc:
                state = f"unreachable ({exc.kind})"
            except Exception as exc:  # noqa: BLE001 - as above
                state = f"unreachable ({type(exc).__name__})"
            self._smtp_state, self._smtp_checked = state, self._clock()
            return state

"""Whole-run guard: no log record of the test run may hold a test SMTP password or a bearer token.

Loaded from tests/conftest.py (`pytest_plugins`). At configure time a logging.Handler is put on
the root logger; it scans every record's formatted text (message, exception and stack text, and
any `extra` attributes). Records of loggers that do not propagate to the root (gunicorn's access
and error loggers, for example) are handed to it as well, through a wrapper around
Logger.callHandlers. The root logger is set to DEBUG for the run, so INFO and DEBUG records are
made and scanned too (a record that a logger drops for its level is written nowhere).

The needles: the conftest SMTP password, the global server's password, the JWT signing secret,
and the signature of every token made during the run (by tests.conftest.Tokens and by any other
PyJWT encode call): a signature is what makes a token usable, and a full token contains it.

A hit is recorded with the test that was running and the record with the secret masked; at the
end of the session the run fails and the hits are listed (never the secret itself).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import pytest

GLOBAL_PASSWORD = "global-pass-XYZ"  # conftest.app_config["SMTP_PASS"]; a test checks they agree
_FRAGMENT = re.compile(r"[A-Za-z0-9_-]{16,}")
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}


@dataclass(frozen=True)
class Hit:
    test: str
    logger: str
    level: str
    what: str
    excerpt: str  # with every known secret masked


class SecretLogGuard(logging.Handler):
    """Scans records for known secrets; keeps the hits, never raises, never logs."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.passwords: dict[str, str] = {}  # secret -> what it is
        self.signatures: set[str] = set()
        self.hits: list[Hit] = []
        self.scanned: dict[str, int] = {}  # logger name -> records scanned
        self.current_test = "(outside a test)"
        self._state = threading.Lock()

    # -- what to look for --------------------------------------------------------------------

    def add_secret(self, secret: str, what: str) -> None:
        if secret:
            self.passwords[secret] = what

    def add_token(self, token: Any) -> None:
        if isinstance(token, bytes):
            token = token.decode("ascii", "replace")
        if isinstance(token, str) and token.count(".") == 2:
            signature = token.rsplit(".", 1)[1]
            if len(signature) >= 16:
                with self._state:
                    self.signatures.add(signature)

    # -- scanning ----------------------------------------------------------------------------

    def text_of(self, record: logging.LogRecord) -> str:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a broken record is still scanned as far as possible
            text = f"{record.msg!r} {record.args!r}"
        extras = [
            f"{k}={v!r}" for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES
        ]
        return " ".join([text, *extras])

    def find(self, text: str) -> list[str]:
        """What known secrets the text holds (descriptions, not the secrets)."""
        found = [what for secret, what in self.passwords.items() if secret in text]
        with self._state:
            signatures = self.signatures
            if any(f in signatures for f in _FRAGMENT.findall(text)):
                found.append("a bearer token issued during the run")
        return found

    def mask(self, text: str) -> str:
        for secret, what in self.passwords.items():
            text = text.replace(secret, f"<{what}>")
        with self._state:
            signatures = self.signatures
            return _FRAGMENT.sub(
                lambda m: "<token signature>" if m.group(0) in signatures else m.group(0), text
            )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.text_of(record)
            with self._state:
                self.scanned[record.name] = self.scanned.get(record.name, 0) + 1
            for what in self.find(text):
                hit = Hit(self.current_test, record.name, record.levelname, what,
                          self.mask(text)[:400])
                with self._state:
                    self.hits.append(hit)
        except Exception:  # noqa: BLE001 - the guard must never break the code under test
            with self._state:
                self.hits.append(
                    Hit(self.current_test, record.name, record.levelname,
                        "a record the guard could not scan", "")
                )


GUARD = SecretLogGuard()
_undo: list[Any] = []


def _reaches_root(logger: logging.Logger) -> bool:
    current: logging.Logger | None = logger
    while current is not None:
        if current is logging.root:
            return True
        if not current.propagate:
            return False
        current = current.parent  # type: ignore[assignment]
    return False


def install() -> None:
    """Put the guard on the root logger, feed it non-propagating loggers, learn the secrets."""
    if _undo:
        return
    from tests import conftest

    GUARD.add_secret(conftest.SMTP_PASSWORD, "conftest.SMTP_PASSWORD")
    GUARD.add_secret(GLOBAL_PASSWORD, "the global server password")
    GUARD.add_secret(conftest.JWT_SECRET, "conftest.JWT_SECRET")

    root = logging.getLogger()
    old_level = root.level
    root.addHandler(GUARD)
    root.setLevel(logging.DEBUG)
    _undo.append(lambda: (root.removeHandler(GUARD), root.setLevel(old_level)))

    call_handlers = logging.Logger.callHandlers

    @functools.wraps(call_handlers)
    def call_handlers_and_guard(self: logging.Logger, record: logging.LogRecord) -> None:
        call_handlers(self, record)
        if not _reaches_root(self):
            GUARD.handle(record)

    logging.Logger.callHandlers = call_handlers_and_guard  # type: ignore[method-assign]
    _undo.append(lambda: setattr(logging.Logger, "callHandlers", call_handlers))

    make = conftest.Tokens.make

    @functools.wraps(make)
    def make_and_remember(self: Any, *args: Any, **kwargs: Any) -> str:
        token = make(self, *args, **kwargs)
        GUARD.add_token(token)
        return token

    conftest.Tokens.make = make_and_remember  # type: ignore[method-assign]
    _undo.append(lambda: setattr(conftest.Tokens, "make", make))

    import jwt

    encode = jwt.encode

    @functools.wraps(encode)
    def encode_and_remember(*args: Any, **kwargs: Any) -> str:
        token = encode(*args, **kwargs)
        GUARD.add_token(token)
        return token

    jwt.encode = encode_and_remember
    _undo.append(lambda: setattr(jwt, "encode", encode))


def uninstall() -> None:
    while _undo:
        _undo.pop()()


def pytest_configure(config: pytest.Config) -> None:
    install()


def pytest_unconfigure(config: pytest.Config) -> None:
    uninstall()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    GUARD.current_test = item.nodeid
    try:
        return (yield)
    finally:
        GUARD.current_test = "(outside a test)"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if GUARD.hits and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not GUARD.hits:
        return
    terminalreporter.section("log guard: secrets found in log records", sep="=", red=True)
    for hit in GUARD.hits[:50]:
        terminalreporter.line(
            f"{hit.test}: {hit.logger} {hit.level} holds {hit.what}: {hit.excerpt}", red=True
        )
    if len(GUARD.hits) > 50:
        terminalreporter.line(f"... and {len(GUARD.hits) - 50} more", red=True)

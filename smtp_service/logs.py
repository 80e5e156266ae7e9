"""Log output: JSON lines or text, and a filter that keeps secrets out of every record.

`configure_logging` installs one stderr handler on the root logger (gunicorn collects stderr)
with either formatter and the RedactSecrets filter. JSON lines come from python-json-logger:
`time` (ISO 8601, UTC), `level`, `logger`, `message`, then the record's `extra` fields.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

from pythonjsonlogger.json import JsonEncoder, JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"

# What a secret looks like in text: a bearer credential, anything shaped like a JWT (three
# base64url parts, the first a JSON object: "eyJ"), and `name=value` / `"name": "value"` pairs
# whose name says secret. Short on purpose: the search runs on every record written.
_SECRET_NAMES = r"(?:password|passwd|pass|pwd|secret|token|authorization|api[_-]?key|smtp_pass)"
_SECRET_TEXT = re.compile(
    r"(?P<bearer>\b[Bb]earer\s+)[A-Za-z0-9._~+/=-]+"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
    r"|(?P<pair>[\"']?\b(?i:" + _SECRET_NAMES + r")[\"']?\s*[:=]\s*[\"']?)"
    r"(?!\[redacted\])(?:[Bb]earer\s+)?[^\s\"',;&}]+"
)
# Record attributes (`extra`) whose name says they hold a secret are replaced whatever they hold.
_SECRET_KEY = re.compile(r"(?i)^(?:.*_)?" + _SECRET_NAMES + r"(?:_.*)?$")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}


def redact(text: str) -> str:
    """`text` with bearer tokens, JWT-shaped strings and `password=...`-style values replaced
    by "[redacted]" (the name and the separator are kept)."""
    # The regular expression costs microseconds even on a short line; the words every match
    # holds cost a fraction of that to look for, and most lines hold none of them.
    lowered = text.lower()
    if not (
        "pass" in lowered
        or "token" in lowered
        or "bearer" in lowered
        or "eyj" in lowered
        or "secret" in lowered
        or "pwd" in lowered
        or "authorization" in lowered
        or "apikey" in lowered
        or "api_key" in lowered
        or "api-key" in lowered
    ):
        return text
    return _SECRET_TEXT.sub(_replacement, text)


def _replacement(match: re.Match[str]) -> str:
    prefix = match.group("bearer") or match.group("pair") or ""
    return prefix + REDACTED


_secret_keys: dict[str, bool] = {}  # attribute name -> whether it names a secret


def redact_value(key: str, value: Any) -> Any:
    """A record attribute or a mapping value made safe: a secret-named key hides its value,
    strings are redacted, mappings are walked; anything else is returned as it is."""
    secret = _secret_keys.get(key)
    if secret is None:
        secret = _secret_keys[key] = _SECRET_KEY.match(key) is not None
        if len(_secret_keys) > 4096:  # attribute names are few; bound it all the same
            _secret_keys.clear()
    if secret:
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    return value


class RedactSecrets(logging.Filter):
    """Rewrites a record so that no password, Authorization value or token is written: the
    message (with its arguments merged in), the exception text and the `extra` attributes.
    Never drops a record. Put it on the handlers that write (a handler's filter sees every
    record that reaches the handler, propagated ones included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):  # already done by another handler's filter
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record: let the formatter report it
            return True
        safe = redact(message)
        if safe != message or record.args:
            record.msg, record.args = safe, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            # Formatters write exc_text when exc_info is gone (logging's and python-json-
            # logger's alike); left in place, exc_info would be formatted again, unredacted.
            record.exc_text = redact(record.exc_text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        fields = vars(record)
        for key in fields.keys() - _STANDARD:
            if not key.startswith("_"):
                value = fields[key]
                safe_value = redact_value(key, value)
                if safe_value is not value:
                    fields[key] = safe_value
        record._redacted = True
        return True


def json_formatter() -> logging.Formatter:
    """One JSON object a line: time (ISO 8601 UTC), level, logger, message, then the extras."""
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        reserved_attrs=[*sorted(_STANDARD), "_redacted"],
        json_serializer=_serialize,
    )


# python-json-logger's own encoder (dates, exceptions, dataclasses, anything else as str), made
# once: by default json.dumps builds a new one for every line. Encoding keeps no state.
_ENCODER = JsonEncoder()


def _serialize(value: Any, **_options: Any) -> str:
    """json.dumps as the formatter calls it (its options are the defaults used here)."""
    return _ENCODER.encode(value)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, then the record's own fields (`extra`) as key=value, so that the request
    and send lines show their duration, account and request id in a terminal too."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_") and value is not None
        ]
        if not fields:
            return text
        head, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{head} {' '.join(fields)}{newline}{rest}"


def text_formatter() -> logging.Formatter:
    """The human-readable line `make run` shows in a terminal."""
    return TextFormatter(TEXT_FORMAT)


def chosen_format(setting: str, stream: Any = None) -> str:
    """"json" or "text": LOG_FORMAT as set, or for "auto" text on a terminal, else JSON."""
    if setting != "auto":
        return setting
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return "text" if isatty is not None and isatty() else "json"
    except ValueError:  # a closed stream
        return "json"


def make_handler(log_format: str, stream: Any = None) -> logging.Handler:
    """A stderr handler with the chosen formatter ("json" or "text") and RedactSecrets."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(json_formatter() if log_format == "json" else text_formatter())
    handler.addFilter(RedactSecrets())
    return handler


def configure_logging(level: str, log_format: str) -> None:
    """Send the root logger to stderr at `level` with `log_format` ("auto", "json", "text").

    Does nothing when the root logger already has handlers (a test harness, or an embedding
    application that configured logging itself), so that it is never configured twice."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.addHandler(make_handler(chosen_format(log_format)))
    root.setLevel(level)
    # The logging HOWTO's "Optimization": what no format here writes is not collected for every
    # record (the caller's file, line and function, found by walking the stack; the thread's
    # name). About a third of the cost of a request line. The process id stays (gunicorn's
    # own format writes it).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False

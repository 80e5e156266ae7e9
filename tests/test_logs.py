"""smtp_service.logs: the formats and the filter that redacts secrets from every record."""

from __future__ import annotations

import io
import json
import logging

import jwt as pyjwt
import pytest

from smtp_service.logs import (
    REDACTED,
    RedactSecrets,
    chosen_format,
    configure_logging,
    make_handler,
    redact,
)

TOKEN = pyjwt.encode({"sub": "u", "accountId": "a"}, "k" * 32, algorithm="HS256")


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Authorization: Bearer {TOKEN}", TOKEN),
        ("authorization: bearer abc.def-ghi", "abc.def-ghi"),
        (f"token {TOKEN} seen", TOKEN),
        (f"a token without its header: {TOKEN.split('.', 1)[1]}", None),
        ("password=hunter2-xyz and more", "hunter2-xyz"),
        ("SMTP_PASS=hunter2-xyz", "hunter2-xyz"),
        ('{"pass": "hunter2-xyz", "host": "h"}', "hunter2-xyz"),
        ("{'password': 'hunter2-xyz'}", "hunter2-xyz"),
        ("secret: hunter2-xyz", "hunter2-xyz"),
        ("api_key=hunter2-xyz&x=1", "hunter2-xyz"),
    ],
)
def test_redact_removes_the_secret(text, secret):
    out = redact(text)
    if secret is None:  # the payload and signature alone: not JWT-shaped, left as it is
        assert out == text
        return
    assert secret not in out and REDACTED in out


@pytest.mark.parametrize(
    "text",
    [
        "GET /api/smtp/settings 200",
        "account acct-1: global transport failed: Connection refused",
        "bypass=1 passed=2 tokens_left=3",
        "message 1f2e3d@example.com sent via custom",
    ],
)
def test_redact_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def _record(msg, *args, exc=None, **extra):
    record = logging.LogRecord(
        "t", logging.WARNING, __file__, 1, msg, args,
        (type(exc), exc, exc.__traceback__) if exc else None,
    )
    record.__dict__.update(extra)
    return record


def _written(record, log_format="json"):
    stream = io.StringIO()
    handler = make_handler(log_format, stream)
    handler.handle(record)
    return stream.getvalue()


def test_filter_covers_arguments_exceptions_and_extras():
    try:
        raise RuntimeError(f"login failed: password=hunter2-xyz with Bearer {TOKEN}")
    except RuntimeError as exc:
        failure = exc
    record = _record(
        "auth %s for %s",
        f"Bearer {TOKEN}",
        {"password": "hunter2-xyz"},
        exc=failure,
        authorization=f"Bearer {TOKEN}",
        smtp_pass="hunter2-xyz",
        settings={"host": "h", "pass": "hunter2-xyz"},
        note=f"token was {TOKEN}",
        count=3,
    )
    for log_format in ("json", "text"):
        out = _written(record, log_format)
        assert "hunter2-xyz" not in out and TOKEN not in out, out
        assert TOKEN.rsplit(".", 1)[1] not in out
    line = json.loads(_written(record, "json"))
    assert line["authorization"] == REDACTED and line["smtp_pass"] == REDACTED
    assert line["settings"] == {"host": "h", "pass": REDACTED}
    assert line["count"] == 3 and "RuntimeError" in line["exc_info"]


def test_filter_never_drops_a_record():
    assert RedactSecrets().filter(_record("plain")) is True
    broken = _record("%d", "not a number")
    assert RedactSecrets().filter(broken) is True


def test_json_line_fields():
    line = json.loads(_written(_record("hello %s", "world", request_id="r-1")))
    assert line["message"] == "hello world" and line["level"] == "WARNING"
    assert line["logger"] == "t" and line["request_id"] == "r-1"
    assert line["time"].endswith("+00:00") and "T" in line["time"]
    assert "_redacted" not in line and "args" not in line


def test_text_line():
    out = _written(_record("hello %s", "world"), "text")
    assert out.rstrip("\n").endswith("WARNING t: hello world")
    out = _written(_record("GET /x 200", status=200, request_id="r-2", account=None), "text")
    assert out.rstrip("\n").endswith("WARNING t: GET /x 200 status=200 request_id=r-2")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_elsewhere():
    assert chosen_format("auto", _Tty()) == "text"
    assert chosen_format("auto", io.StringIO()) == "json"
    assert chosen_format("json", _Tty()) == "json"
    assert chosen_format("text", io.StringIO()) == "text"


def test_configure_logging_leaves_a_configured_root_alone():
    root = logging.getLogger()
    handlers = list(root.handlers)
    assert handlers  # the test run's log guard
    configure_logging("INFO", "json")
    assert root.handlers == handlers

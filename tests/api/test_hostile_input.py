"""Hostile request bodies against every POST route: each is refused with a clear 4xx JSON error
(no stack trace, no echo of the input, no secret), the account's stored files keep their exact
bytes, and nothing reaches an SMTP server.

Every test starts from an account with saved settings (pointing at a real aiosmtpd server) and a
verified sender, so a body that got through would really be stored or sent.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from email import message_from_string, policy
from email.header import decode_header, make_header
from typing import Any

import pytest

from tests.conftest import SMTP_PASSWORD, settings_body

ACCOUNT = "acct-a"
SENDER = "sender@example.com"
SETTINGS = "/api/smtp/settings"
TEST = "/api/smtp/test"
SENDERS = "/api/senders"
SEND = "/api/messages/send-email"
ROUTES = [SETTINGS, TEST, SENDERS, SEND]

# Every character str.splitlines() breaks a line at (the email package folds headers with it),
# and other controls RFC 5322 allows in no header.
LINE_BREAKS = ["\r\n", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028",
               "\u2029"]
CONTROLS = ["\x01", "\x08", "\x1b", "\x1f", "\x7f"]


class Account:
    """The attacked account: valid settings and a sender saved, its files' bytes remembered."""

    def __init__(self, app, client, tokens, smtp_server, global_server) -> None:
        self.app, self.client, self.tokens = app, client, tokens
        self.servers = [smtp_server, global_server]
        self.settings = settings_body(smtp_server)
        r = client.post(SETTINGS, json=self.settings, headers=self.headers())
        assert r.status_code == 200, r.json
        r = client.post(SENDERS, json={"email": SENDER, "name": "Sender"}, headers=self.headers())
        assert r.status_code == 201, r.json
        self.folder = os.path.join(app.config["DATA_DIR"], "shared-data", ACCOUNT)
        self.files = self.snapshot()
        # adding the sender sent its confirmation code through the global server
        self.delivered_before = [len(s.messages) for s in self.servers]
        assert {"smtp-settings.json", "senders.json"} <= set(self.files)

    def headers(self, **extra: str) -> dict[str, str]:
        return {**self.tokens.headers(ACCOUNT), **extra}

    def valid(self, route: str) -> dict[str, Any]:
        """A body the route accepts."""
        return {
            SETTINGS: dict(self.settings),
            TEST: dict(self.settings),
            SENDERS: {"email": "new@example.com", "name": "New"},
            SEND: {"from": SENDER, "to": "rcpt@example.net", "subject": "Hello", "text": "Hi"},
        }[route]

    def post(self, route: str, body: Any = None, **kwargs: Any):
        kwargs.setdefault("headers", self.headers())
        if body is not None:
            kwargs["json"] = body
        return self.client.post(route, **kwargs)

    def snapshot(self) -> dict[str, bytes]:
        """Every file of the account (lock files aside) with its bytes."""
        out = {}
        for name in sorted(os.listdir(self.folder)):
            if not name.endswith(".lock"):
                with open(os.path.join(self.folder, name), "rb") as handle:
                    out[name] = handle.read()
        return out

    def assert_untouched(self) -> None:
        assert self.snapshot() == self.files, "the account's stored files changed"
        since = zip(self.servers, self.delivered_before, strict=True)
        delivered = [m for server, n in since for m in server.messages[n:]]
        assert delivered == [], "something was delivered"


@pytest.fixture
def account(app, client, tokens, smtp_server, global_server) -> Account:
    return Account(app, client, tokens, smtp_server, global_server)


def assert_clean_error(r, status: int | None = None) -> dict[str, Any]:
    """A 4xx (the given one) with a JSON {"error": ...} that leaks nothing and echoes little."""
    assert 400 <= r.status_code < 500, (r.status_code, r.data[:300])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.data[:300])
    assert r.mimetype == "application/json", r.mimetype
    body = r.get_json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
    text = r.get_data(as_text=True)
    for leak in ("Traceback", 'File "', "site-packages", "smtp_service.", SMTP_PASSWORD):
        assert leak not in text, text[:300]
    assert len(r.data) < 2048, len(r.data)
    return body


def assert_refused_field(r, field: str) -> None:
    body = assert_clean_error(r, 400)
    assert body["error"] == "Validation failed"
    assert field in body["details"], body


# -- baseline: the valid bodies do get through, so the refusals below are the input's doing ---


def test_valid_bodies_are_accepted(account):
    for route in ROUTES:
        r = account.post(route, account.valid(route))
        assert r.status_code in (200, 201), (route, r.json)
    assert len(account.servers[0].messages) == 1
    assert account.snapshot() != account.files  # the settings and senders saves rewrote them


# -- size --------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_body_over_max_content_length_is_413(account, route):
    limit = account.app.config["MAX_CONTENT_LENGTH"]
    body = {**account.valid(route), "padding": "x" * limit}
    r = account.post(route, body)
    assert assert_clean_error(r, 413) == {"error": "Request body too large"}
    account.assert_untouched()


@pytest.mark.parametrize("route", ROUTES)
def test_streamed_body_over_the_limit_is_413_not_malformed(account, route):
    """Chunked (no Content-Length, as gunicorn passes it): Werkzeug cuts the stream at the
    limit; the cut body must not be answered as malformed JSON."""
    limit = account.app.config["MAX_CONTENT_LENGTH"]
    raw = json.dumps({**account.valid(route), "padding": "x" * limit}).encode()
    r = account.client.post(
        route,
        input_stream=io.BytesIO(raw),
        content_type="application/json",
        headers=account.headers(**{"Transfer-Encoding": "chunked"}),
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert assert_clean_error(r, 413) == {"error": "Request body too large"}
    account.assert_untouched()


def test_streamed_body_under_the_limit_is_read(account):
    raw = json.dumps(account.valid(SEND)).encode()
    r = account.client.post(
        SEND,
        input_stream=io.BytesIO(raw),
        content_type="application/json",
        headers=account.headers(**{"Transfer-Encoding": "chunked"}),
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert r.status_code == 200, r.json
    assert len(account.servers[0].messages) == 1


def test_limits_fit_together(app):
    """A message at MAX_MESSAGE_BYTES travels base64-encoded in the JSON request, so the request
    limit must leave room for it, or the message limit could never be reached."""
    message_limit = app.config["MAX_MESSAGE_BYTES"]
    assert app.config["MAX_CONTENT_LENGTH"] > message_limit + 64 * 1024


def test_50_mb_attachment_is_413_before_anything_is_built(account):
    blob = base64.b64encode(b"\0" * 50_000_000).decode()
    body = {**account.valid(SEND), "attachments": [{"filename": "big.bin", "content": blob}]}
    r = account.post(SEND, body)
    assert assert_clean_error(r, 413) == {"error": "Request body too large"}
    account.assert_untouched()


def test_attachment_under_the_request_limit_but_over_the_message_limit_is_413(account):
    message_limit = account.app.config["MAX_MESSAGE_BYTES"]
    raw_size = math.ceil(message_limit * 3 / 4) + 100_000  # its base64 alone is over the limit
    blob = base64.b64encode(os.urandom(raw_size)).decode()
    assert len(blob) + 1000 < account.app.config["MAX_CONTENT_LENGTH"]
    body = {**account.valid(SEND), "attachments": [{"filename": "big.bin", "content": blob}]}
    r = account.post(SEND, body)
    error = assert_clean_error(r, 413)["error"]
    assert error.startswith("Message is ") and f"the limit is {message_limit}" in error
    account.assert_untouched()


@pytest.mark.parametrize(
    ("field", "many"),
    [
        ("to", [f"r{i}@example.net" for i in range(10_000)]),
        ("to", ["rcpt@example.net"] * 10_000),  # one address 10,000 times: still 10,000 entries
        ("cc", [f"c{i}@example.net" for i in range(10_000)]),
        ("bcc", [f"b{i}@example.net" for i in range(10_000)]),
    ],
)
def test_10000_recipients_are_refused_naming_the_limit(account, field, many):
    body = {**account.valid(SEND), field: many}
    r = account.post(SEND, body)
    assert_refused_field(r, "to")
    limit = account.app.config["MAX_RECIPIENTS"]
    assert r.json["details"]["to"] == [f"At most {limit} recipients (to, cc and bcc together)."]
    account.assert_untouched()


def test_recipients_are_counted_over_to_cc_and_bcc(account):
    limit = account.app.config["MAX_RECIPIENTS"]
    third = limit // 3 + 1
    body = {
        **account.valid(SEND),
        "to": [f"t{i}@example.net" for i in range(third)],
        "cc": [f"c{i}@example.net" for i in range(third)],
        "bcc": [f"b{i}@example.net" for i in range(third)],
    }
    assert_refused_field(account.post(SEND, body), "to")
    account.assert_untouched()


def test_10000_reply_to_addresses_are_refused(account):
    body = {**account.valid(SEND), "replyTo": [f"r{i}@example.net" for i in range(10_000)]}
    assert_refused_field(account.post(SEND, body), "replyTo")
    account.assert_untouched()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"headers": {f"X-H{i}": "v" for i in range(101)}}, "headers"),
        ({"headers": {"X-Long": "ab " * 400}}, "headers"),
        ({"headers": {"X" * 100_000: "v"}}, "headers"),  # its name is not echoed whole
        ({"attachments": [{"filename": "a", "content": ""}] * 101}, "attachments"),
        ({"to": "a" * 100_000 + "@example.net"}, "to"),
        ({"to": "N" * 1000 + " <rcpt@example.net>"}, "to"),  # would make a line over 998
        ({"from": "N" * 1000 + f" <{SENDER}>"}, "from"),
        ({"replyTo": ["r@example.net", "x" * 400]}, "replyTo"),
        ({"subject": "s" * 999}, "subject"),
        ({"attachments": [{"filename": "f" * 256, "content": "aGk="}]}, "attachments"),
    ],
)
def test_oversized_parts_of_a_message_are_400(account, change, field):
    r = account.post(SEND, {**account.valid(SEND), **change})
    assert_refused_field(r, field)
    account.assert_untouched()


@pytest.mark.parametrize(
    ("route", "change", "field"),
    [
        (SENDERS, {"email": "a" * 100_000 + "@example.com"}, "email"),
        (SENDERS, {"name": "n" * 201}, "name"),
        (SETTINGS, {"host": "h" * 254}, "host"),
        (SETTINGS, {"user": "u" * 321}, "user"),
        (SETTINGS, {"pass": "p" * 1025}, "pass"),
        (TEST, {"pass": "p" * 1025}, "pass"),
    ],
)
def test_oversized_fields_are_400(account, route, change, field):
    r = account.post(route, {**account.valid(route), **change})
    assert_refused_field(r, field)
    account.assert_untouched()


# -- shape -------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"to": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["arrays", "objects", "inside-a-field"],
)
def test_deeply_nested_json_is_400(account, route, raw):
    r = account.post(route, data=raw, content_type="application/json")
    assert assert_clean_error(r, 400) == {"error": "Malformed JSON body"}
    account.assert_untouched()


@pytest.mark.parametrize("route", ROUTES)
def test_moderately_nested_values_are_validation_errors(account, route):
    """Nesting the parser accepts reaches the schema, which refuses it field by field."""
    field = next(iter(account.valid(route)))
    nested: Any = "x"
    for _ in range(500):
        nested = [nested]
    r = account.post(route, {**account.valid(route), field: nested})
    assert_refused_field(r, field)
    account.assert_untouched()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", "Malformed JSON body"),
        (b"   ", "Malformed JSON body"),
        (b"null", "Malformed JSON body"),
        (b"{", "Malformed JSON body"),
        (b'{"a": 1,}', "Malformed JSON body"),
        (b"\xff\xfe\x00{", "Malformed JSON body"),  # not UTF-8
        (b'{"port": 1' + b"0" * 5000 + b"}", "Malformed JSON body"),  # over int's digit limit
        (b"[]", "Validation failed"),
        (b'[{"host": "x"}]', "Validation failed"),
        (b'"a string"', "Validation failed"),
        (b"42", "Validation failed"),
        (b"true", "Validation failed"),
    ],
    ids=["empty", "blank", "null", "unclosed", "trailing-comma", "not-utf8", "huge-int", "array",
         "array-of-object", "string", "number", "true"],
)
def test_empty_malformed_and_non_object_bodies_are_400(account, route, raw, error):
    r = account.post(route, data=raw, content_type="application/json")
    body = assert_clean_error(r, 400)
    assert body["error"] == error
    if error == "Validation failed":
        assert body["details"] == {"_schema": ["Expected a JSON object."]}
    account.assert_untouched()


@pytest.mark.parametrize("route", ROUTES)
def test_non_json_content_types_are_415(account, route):
    raw = json.dumps(account.valid(route))
    for content_type in [
        "text/plain",
        "text/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/jsonp",
        "",
    ]:
        r = account.post(route, data=raw, content_type=content_type or None)
        body = assert_clean_error(r, 415)
        assert body == {"error": "Content-Type must be application/json"}, content_type
    r = account.post(route, data={"host": "x", "email": "a@example.com"})  # a real form post
    assert_clean_error(r, 415)
    account.assert_untouched()


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_fields_are_refused(account, route):
    r = account.post(route, {**account.valid(route), "__proto__": {"admin": True}})
    assert_refused_field(r, "__proto__")
    account.assert_untouched()


# -- types -------------------------------------------------------------------------------------

STRING = [0, 1.5, True, [], {}, ["x"], {"a": "b"}]
REQUIRED_STRING = [*STRING, None]
INTEGER = ["587", 587.0, 587.5, True, None, [], {}, [587]]
BOOLEAN = ["true", "false", 1, 0, [], {}, [True]]
ADDRESSES = [0, True, {}, [1], [None], [["rcpt@example.net"]], [{}], {"a": "b"}]

WRONG_TYPES: list[tuple[str, str, Any]] = []
for _route in (SETTINGS, TEST):
    WRONG_TYPES += [(_route, "host", v) for v in REQUIRED_STRING]
    WRONG_TYPES += [(_route, "port", v) for v in INTEGER]
    WRONG_TYPES += [(_route, "secure", v) for v in BOOLEAN]
    WRONG_TYPES += [(_route, "user", v) for v in REQUIRED_STRING]
    WRONG_TYPES += [(_route, "pass", v) for v in REQUIRED_STRING]
    WRONG_TYPES += [(_route, "requireTls", v) for v in [*BOOLEAN, None]]
WRONG_TYPES += [(SENDERS, "email", v) for v in REQUIRED_STRING]
WRONG_TYPES += [(SENDERS, "name", v) for v in STRING]
WRONG_TYPES += [(SEND, "from", v) for v in REQUIRED_STRING]
WRONG_TYPES += [(SEND, "to", v) for v in [*ADDRESSES, None]]
WRONG_TYPES += [(SEND, field, v) for field in ("cc", "bcc", "replyTo") for v in ADDRESSES]
WRONG_TYPES += [(SEND, "subject", v) for v in REQUIRED_STRING]
WRONG_TYPES += [(SEND, "text", v) for v in STRING]
WRONG_TYPES += [(SEND, "html", v) for v in STRING]
WRONG_TYPES += [(SEND, "trackOpens", v) for v in [*BOOLEAN, None]]
WRONG_TYPES += [
    (SEND, "headers", v)
    for v in ["X-A: 1", [], ["X-A", "1"], 0, None, {"X-A": 1}, {"X-A": None}, {"X-A": ["v"]},
              {"X-A": {"v": 1}}, {"X-A": True}]
]
WRONG_TYPES += [
    (SEND, "attachments", v)
    for v in ["a.txt", {}, {"filename": "a", "content": ""}, [1], ["a.txt"], [None], [[]], None,
              [{"filename": 1, "content": "aGk="}], [{"filename": None, "content": "aGk="}],
              [{"filename": ["a"], "content": "aGk="}], [{"filename": "a", "content": 1}],
              [{"filename": "a", "content": None}], [{"filename": "a", "content": ["aGk="]}],
              [{"filename": "a", "content": "aGk=", "contentType": 1}],
              [{"filename": "a", "content": "aGk=", "contentType": None}],
              [{"filename": "a", "content": "aGk=", "contentType": ["text/plain"]}],
              [{"filename": "a", "content": "aGk=", "extra": 1}], [{"content": "aGk="}],
              [{"filename": "a"}]]
]


@pytest.mark.parametrize(("route", "field", "value"), WRONG_TYPES)
def test_wrong_types_in_every_field_are_400(account, route, field, value):
    r = account.post(route, {**account.valid(route), field: value})
    assert_refused_field(r, field)
    account.assert_untouched()


def _attachment(**fields: Any) -> dict[str, Any]:
    return {"filename": "a", "content": "aGk=", **fields}


@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        (SETTINGS, "port", 0),
        (SETTINGS, "port", 65536),
        (SETTINGS, "port", -1),
        (SETTINGS, "port", 10**30),
        (TEST, "port", 10**30),
        (SETTINGS, "host", ""),
        (SETTINGS, "host", "   "),
        (SETTINGS, "user", " "),
        (SETTINGS, "pass", ""),
        (SENDERS, "email", ""),
        (SENDERS, "email", "not an address"),
        (SEND, "to", ""),
        (SEND, "to", []),
        (SEND, "from", ""),
        (SEND, "from", "not an address"),
        (SEND, "attachments", [{"filename": "a.txt", "content": "not base64!"}]),
        (SEND, "attachments", [{"filename": "a.txt", "content": "aGk=", "contentType": "text"}]),
        # "$" matches before a final newline: a blank line would end the part's header
        (SEND, "attachments", [{"filename": "a.txt", "content": "aGk=",
                                "contentType": "text/plain\n"}]),
        (SEND, "attachments", [{"filename": "a.txt", "content": "aGk=",
                                "contentType": "tëxt/plaín"}]),  # would go out RFC 2047-encoded
        (SEND, "attachments", [{"filename": " ", "content": "aGk="}]),
        (SEND, "headers", {"": "v"}),
        (SEND, "headers", {"X Bad": "v"}),
        (SEND, "headers", {"X:Bad": "v"}),
        (SEND, "headers", {"Bcc": "victim@example.org"}),
        (SEND, "headers", {"content-type": "text/html"}),
        # header rules (services.headers): refused names, duplicates, grammar
        (SEND, "headers", {"Content-Disposition": "inline", "content-disposition": "inline"}),
        (SEND, "headers", {"X-A": "1", "x-a": "2", "X-a": "3"}),
        (SEND, "headers", {"Resent-Date": "not a date"}),
        (SEND, "headers", {"Received": "from evil"}),
        (SEND, "headers", {"Content-ID": "<x@y>"}),
        (SEND, "headers", {"DKIM-Signature": "v=1; a=rsa-sha256"}),
        (SEND, "headers", {"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}),
        (SEND, "headers", {"List-Unsubscribe": "<https://exämple.com/u>"}),
        (SEND, "headers", {"List-Unsubscribe": "<" * 500}),
        (SEND, "headers", {"References": "<a@b> " * 150 + "<ä@b>"}),
        (SEND, "headers", {"In-Reply-To": "<>"}),
        (SEND, "headers", {"List-Id": "<" + "a" * 990 + ">"}),
        (SEND, "headers", {"Disposition-Notification-To": "(" * 900}),
        (SEND, "headers", {"X-Word": "w" * 995}),
        # attachments by type
        (SEND, "attachments", [_attachment(contentType="multipart/mixed")]),
        (SEND, "attachments", [_attachment(contentType="message/partial")]),
        (SEND, "attachments", [_attachment(contentType="message/rfc822")]),
        (SEND, "attachments", [_attachment(cid="a b")]),
        (SEND, "attachments", [_attachment(cid="<a>")]),
        (SEND, "attachments", [_attachment(cid="")]),
        (SEND, "attachments", [_attachment(cid=1)]),
        (SEND, "attachments", [_attachment(cid="x" * 251)]),
        (SEND, "attachments", [_attachment(cid="c"), _attachment(cid="cid:c")]),
        # address forms (services.addresses)
        (SEND, "to", "a@example.net, " * 300 + "b@example.net"),
        (SEND, "to", "(" * 3000 + "a@example.net"),
        (SEND, "to", '"' + "a " * 1999 + '" <a@example.net>'),
        (SEND, "to", "Team: a@example.net"),
        (SEND, "to", "a@[127.0.0.1]"),
        (SEND, "cc", ["x, y, z"]),
        (SEND, "from", f"{SENDER}, b@example.com"),
        (SEND, "from", "undisclosed-recipients:;"),
        (SEND, "replyTo", "Group: a@example.net, bad;"),
    ],
)
def test_wrong_values_are_400(account, route, field, value):
    r = account.post(route, {**account.valid(route), field: value})
    assert_refused_field(r, field)
    account.assert_untouched()


def test_non_finite_numbers_are_400(account):
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        raw = json.dumps({**account.valid(SETTINGS), "port": 0}).encode().replace(
            b'"port": 0', b'"port": ' + literal
        )
        assert_refused_field(account.post(SETTINGS, data=raw, content_type="application/json"),
                             "port")
    account.assert_untouched()


# -- characters --------------------------------------------------------------------------------

# Every string a client sends, as (route, field in the body, where to put the value).
STRING_FIELDS: list[tuple[str, str]] = [
    (SETTINGS, "host"),
    (SETTINGS, "user"),
    (SETTINGS, "pass"),
    (TEST, "host"),
    (TEST, "user"),
    (TEST, "pass"),
    (SENDERS, "email"),
    (SENDERS, "name"),
    (SEND, "from"),
    (SEND, "to"),
    (SEND, "to[]"),
    (SEND, "cc"),
    (SEND, "bcc"),
    (SEND, "replyTo"),
    (SEND, "subject"),
    (SEND, "text"),
    (SEND, "html"),
    (SEND, "headers.name"),
    (SEND, "headers.value"),
    (SEND, "attachments.filename"),
    (SEND, "attachments.content"),
    (SEND, "attachments.contentType"),
]
# The fields that end up in a message header (or an envelope address).
HEADER_BOUND = [
    (route, field)
    for route, field in STRING_FIELDS
    if route in (SEND, SENDERS) and field not in ("text", "html", "attachments.content")
]


def with_value(account: Account, route: str, field: str, value: str) -> tuple[dict, str]:
    """The route's valid body with `value` put into `field`; and the top-level key it is in."""
    body = account.valid(route)
    if field == "to[]":
        body["to"] = ["rcpt@example.net", value]
        return body, "to"
    if field.startswith("headers."):
        body["headers"] = {value: "v"} if field.endswith("name") else {"X-Test": value}
        return body, "headers"
    if field.startswith("attachments."):
        item = {"filename": "a.txt", "content": "aGk=", "contentType": "text/plain"}
        item[field.split(".", 1)[1]] = value
        body["attachments"] = [item]
        return body, "attachments"
    original = body.get(field, "")
    body[field] = value if not original else _splice(original, value)
    return body, field


def _splice(original: str, value: str) -> str:
    """`value` inside the field's valid value (in an address: inside the local part)."""
    if "@" in original:
        local, _, domain = original.partition("@")
        return f"{local}{value}x@{domain}"
    return original[:1] + value + original[1:]


@pytest.mark.parametrize(("route", "field"), STRING_FIELDS)
def test_nul_in_every_string_field_is_400(account, route, field):
    body, key = with_value(account, route, field, "\x00")
    assert_refused_field(account.post(route, body), key)
    account.assert_untouched()


@pytest.mark.parametrize(("route", "field"), STRING_FIELDS)
def test_unpaired_surrogates_in_every_string_field_are_400(account, route, field):
    for surrogate in ("\ud800", "\udfff", "\udc80x\ud83d"):
        body, key = with_value(account, route, field, surrogate)
        assert_refused_field(account.post(route, body), key)
    # the same as raw (CESU-style) UTF-8 bytes rather than a \\u escape
    body, key = with_value(account, route, field, "@@SURROGATE@@")
    raw = json.dumps(body, ensure_ascii=False).encode().replace(b"@@SURROGATE@@", b"\xed\xa0\x80")
    assert_refused_field(account.post(route, data=raw, content_type="application/json"), key)
    account.assert_untouched()


@pytest.mark.parametrize(("route", "field"), HEADER_BOUND)
def test_line_breaks_and_controls_in_every_header_bound_field_are_400(account, route, field):
    for brk in LINE_BREAKS + CONTROLS:
        body, key = with_value(account, route, field, f"{brk}Bcc: victim@example.org{brk}")
        r = account.post(route, body)
        assert r.status_code == 400, (repr(brk), r.status_code, r.data[:200])
        assert_refused_field(r, key)
    account.assert_untouched()


@pytest.mark.parametrize(
    ("route", "field"),
    [(route, field) for route in (SETTINGS, TEST) for field in ("host", "user", "pass")],
)
def test_line_breaks_in_smtp_command_fields_are_400(account, route, field):
    """host, user and pass go into SMTP commands (EHLO peer, AUTH): CR and LF are refused."""
    for brk in ("\r\n", "\n", "\r"):
        body, key = with_value(account, route, field, f"{brk}QUIT{brk}")
        assert_refused_field(account.post(route, body), key)
    account.assert_untouched()


def test_tabs_are_allowed_in_headers(account):
    body = {**account.valid(SEND), "subject": "a\tb", "headers": {"X-Note": "c\td"}}
    r = account.post(SEND, body)
    assert r.status_code == 200, r.json
    message = account.servers[0].messages[-1].message
    assert message["Subject"] == "a\tb" and message["X-Note"] == "c\td"


def test_unicode_text_is_delivered_intact(account):
    """Non-ASCII in every free-text field is legitimate: sent, encoded, and read back the same."""
    text = "Grüße ✓ 日本語 🙂 Ünïcödé — ﷽"
    body = {
        **account.valid(SEND),
        "from": f"Sëndér Ñame {text[:5]} <{SENDER}>",
        "to": [f"Rëcipient {text} <rcpt@example.net>", "jörg@exämple.net"],
        "subject": text,
        "text": text,
        "html": f"<p>{text}</p>",
        "headers": {"X-Note": text},
        "attachments": [{"filename": f"{text}.txt", "content": base64.b64encode(
            text.encode()).decode(), "contentType": "text/plain"}],
        "trackOpens": False,
    }
    r = account.post(SEND, body)
    assert r.status_code == 200, r.json
    got = account.servers[0].messages[-1]
    # sent with SMTPUTF8 (an address needs it), so the headers are raw UTF-8
    message = message_from_string(got.data.decode("utf-8"), policy=policy.default)
    assert str(make_header(decode_header(message["Subject"]))) == text
    assert str(make_header(decode_header(message["X-Note"]))) == text
    assert message["From"].addresses[0].display_name == f"Sëndér Ñame {text[:5]}"
    assert message["To"].addresses[0].display_name == f"Rëcipient {text}"
    leaves = [p for p in message.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in leaves] == ["text/plain", "text/html", "text/plain"]
    plain, html, attachment = [p for p in got.message.walk() if not p.is_multipart()]
    assert plain.get_payload(decode=True).decode().strip() == text
    assert html.get_payload(decode=True).decode().strip() == f"<p>{text}</p>"
    assert leaves[2].get_filename() == f"{text}.txt"
    assert attachment.get_payload(decode=True) == text.encode()
    assert got.rcpt_tos == ["rcpt@example.net", "jörg@exämple.net"]  # sent with SMTPUTF8


@pytest.mark.parametrize(
    "key", ["a" * 256, "", "tab\there", "del\x7f", "bell\x07"], ids=["long", "empty", "tab", "del",
                                                                  "bell"]
)
def test_unusable_idempotency_keys_are_400(account, key):
    r = account.post(SEND, account.valid(SEND), headers=account.headers(**{"Idempotency-Key": key}))
    assert assert_clean_error(r, 400) == {
        "error": "Idempotency-Key must be 1-255 printable characters"
    }
    account.assert_untouched()


def test_smtp_smuggling_sequences_in_the_body_stay_in_the_body(account):
    """End-of-data look-alikes in text and html are sent dot-stuffed: one message arrives."""
    smuggled = "MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    for eod in ("\r\n.\r\n", "\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n"):
        r = account.post(SEND, {**account.valid(SEND), "text": f"a{eod}{smuggled}",
                                "html": f"<p>a</p>{eod}{smuggled}"})
        assert r.status_code == 200, r.json
    messages = account.servers[0].messages
    assert len(messages) == 5
    assert all(m.rcpt_tos == ["rcpt@example.net"] for m in messages)
    assert all(m.mail_from == SENDER for m in messages)


# -- path parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "%00",
        "a%00b@example.com",
        "..%2F..%2Fsmtp-settings.json",
        "../../etc/passwd",
        "%2e%2e%2fsenders.json",
        "' OR '1'='1",
        "x" * 10_000,
        "%ED%A0%80",  # an encoded surrogate
        "%E2%80%A8",  # U+2028
        "sender@example.com%0d%0aX: 1",
    ],
    ids=["nul", "nul-inside", "encoded-traversal", "traversal", "dot-traversal", "sql", "long",
         "surrogate", "line-separator", "crlf"],
)
def test_hostile_path_parameters_are_404(account, value):
    for method, path in [
        ("delete", f"/api/senders/{value}"),
        ("delete", f"/api/suppressions/{value}"),
        ("get", f"/api/messages/{value}"),
    ]:
        r = getattr(account.client, method)(path, headers=account.headers())
        body = assert_clean_error(r, 404)
        assert set(body) == {"error"}, body
    # the verified sender is still there, and the files kept their bytes
    r = account.client.get(SENDERS, headers=account.headers())
    assert [s["email"] for s in r.json["senders"]] == [SENDER]
    account.assert_untouched()

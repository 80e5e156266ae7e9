"""What arrives is what the caller meant (issue 11): each case sent through the app to a real
aiosmtpd server and read there, byte for byte or through the stdlib's email parser.

- structured headers go out as structure (verbatim, folded only at white space, never
  RFC 2047-encoded); refused headers and duplicates are 400s, none is dropped silently;
- subjects and display names in every script and of every length decode to the input;
- attachments by type: message/rfc822 as a message, composite types refused, inline images;
- every address form: address lists, quoted names, groups, internal domains, IDN deletion.
"""

from __future__ import annotations

import base64
import email
from email import policy
from email.header import decode_header, make_header
from email.utils import getaddresses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SMTP_USER, settings_body

SEND = "/api/messages/send-email"
UNSUBSCRIBE = (
    "<https://news.example.com/unsubscribe?u=8f14e45fceea167a5a36dedd4bea2543&l=weekly>"
)
CYRILLIC_SUBJECT = (
    "Ваш заказ отправлен сегодня курьерской службой доставка ожидается завтра в первой "
    "половине дня трек номер указан в личном кабинете"
)


@pytest.fixture
def own(client, tokens, smtp_server):
    """The account sends through its own server (smtp_server), as SMTP_USER."""
    r = client.post("/api/smtp/settings", json=settings_body(smtp_server), headers=tokens.headers())
    assert r.status_code == 200, r.json
    return smtp_server


def send(client, tokens, **body):
    payload = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hello", "text": "Hi",
               **body}
    return client.post(SEND, json=payload, headers=tokens.headers())


def head(data: bytes) -> bytes:
    """The top-level header block as received."""
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def unfolded(data: bytes, name: str) -> str:
    """The value of a top-level field as received, unfolded (CRLFs removed), not decoded."""
    text = head(data).decode("utf-8").replace("\r\n ", " ").replace("\r\n\t", "\t")
    for line in text.split("\r\n"):
        key, _, value = line.partition(":")
        if key.lower() == name.lower():
            return value[1:] if value.startswith(" ") else value
    raise KeyError(name)


def raw_value(data: bytes, name: str) -> str:
    """The value of a top-level field as received: its lines joined without unfolding."""
    lines = head(data).decode("utf-8").split("\r\n")
    for index, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            value = [line[len(name) + 2 :]]
            for more in lines[index + 1 :]:
                if not more.startswith((" ", "\t")):
                    break
                value.append(more)
            return "\r\n".join(value)
    raise KeyError(name)


def assert_well_folded(data: bytes) -> None:
    """Every header line within 998 octets; a line with an encoded-word within 76."""
    for line in head(data).split(b"\r\n"):
        assert len(line) <= 998, line[:80]
        if b"=?" in line:
            assert len(line) <= 76, line


# -- 1. structured headers ---------------------------------------------------------------------


def test_case_1_list_unsubscribe_goes_out_verbatim(client, tokens, own):
    headers = {
        "List-Unsubscribe": UNSUBSCRIBE,
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    r = send(client, tokens, headers=headers)
    assert r.status_code == 200, r.json
    data = own.messages[0].data
    assert f"List-Unsubscribe: {UNSUBSCRIBE}\r\n".encode() in head(data)
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in head(data)
    assert b"=?" not in head(data)
    assert own.messages[0].message["List-Unsubscribe"] == UNSUBSCRIBE


def test_uri_lists_fold_only_after_a_comma(client, tokens, own):
    value = f"<mailto:unsubscribe@news.example.com?subject=weekly-digest>, {UNSUBSCRIBE}"
    headers = {"List-Unsubscribe": value, "List-Help": "<https://x.example/h>"}
    r = send(client, tokens, headers=headers)
    assert r.status_code == 200, r.json
    data = own.messages[0].data
    assert raw_value(data, "List-Unsubscribe") == value.replace(", ", ",\r\n ")
    assert unfolded(data, "List-Unsubscribe") == value
    assert b"=?" not in head(data)
    assert_well_folded(data)


def test_message_id_lists_go_out_verbatim_and_thread(client, tokens, own):
    ids = [f"<{i:04d}.thread-reply.{'x' * 30}@mail.example.com>" for i in range(12)]
    references = " ".join(ids)
    r = send(client, tokens, headers={"In-Reply-To": ids[-1], "References": references})
    assert r.status_code == 200, r.json
    data = own.messages[0].data
    assert unfolded(data, "References") == references
    assert unfolded(data, "In-Reply-To") == ids[-1]
    assert b"=?" not in head(data)
    assert_well_folded(data)
    # each continuation line starts at an id: a fold never splits one
    assert all(line.startswith(" <") for line in raw_value(data, "References").split("\r\n")[1:])


def test_a_bare_message_id_gets_its_angle_brackets(client, tokens, own):
    r = send(client, tokens, headers={"In-Reply-To": "abc.123@mail.example.com"})
    assert r.status_code == 200, r.json
    assert b"In-Reply-To: <abc.123@mail.example.com>\r\n" in head(own.messages[0].data)


def test_no_header_is_dropped(client, tokens, own):
    """Content-Language vanished and others were mangled: each field a caller may set arrives,
    with its value."""
    headers = {
        "Content-Language": "de-CH, en",
        "Auto-Submitted": "auto-generated",
        "List-Id": "Nachrichten für Kunden <news.example.com>",
        "List-Post": "NO",
        "Precedence": "bulk",
        "X-Note": "Grüße aus Köln ✓",
        "Keywords": "orders, shipping",
        "Disposition-Notification-To": "Jörg Ä <receipts@example.com>",
        "X-Entity-Ref-ID": "a" * 200,  # one long word: verbatim, on a long line
    }
    r = send(client, tokens, headers=headers, html="<p>x</p>")
    assert r.status_code == 200, r.json
    data = own.messages[0].data
    message = own.messages[0].message
    for name, value in headers.items():
        assert message[name] is not None, name
        if value.isascii():
            assert unfolded(data, name) == value, name
    assert str(make_header(decode_header(unfolded(data, "X-Note")))) == headers["X-Note"]
    assert message["List-Id"] == headers["List-Id"]
    assert unfolded(data, "List-Id").endswith(" <news.example.com>")
    assert getaddresses([unfolded(data, "Disposition-Notification-To")])[0][1] == (
        "receipts@example.com"
    )
    # Content-Language is the message's own field, not moved into a part
    top = email.message_from_bytes(data, policy=policy.default)
    assert top["Content-Language"] == "de-CH, en"
    assert all(p["Content-Language"] is None for p in top.walk() if p is not top)
    assert_well_folded(data)


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"Resent-Date": "not a date"}, "re-senders"),
        ({"Resent-From": "a@example.com"}, "re-senders"),
        ({"Received": "from x"}, "relays"),
        ({"Return-Path": "<a@example.com>"}, "relays"),
        ({"DKIM-Signature": "v=1"}, "relays"),
        ({"ARC-Seal": "i=1"}, "relays"),
        ({"Content-Disposition": "inline"}, "MIME part"),
        ({"Content-ID": "<a@b>"}, "MIME part"),
        ({"Message-ID": "<a@b>"}, "set by the service"),
        ({"Sender": "a@example.com"}, "set by the service"),
        ({"Content-Language": "de", "content-language": "fr"}, "more than once"),
        ({"X-Campaign": "a", "x-campaign": "b"}, "more than once"),
        ({"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}, "needs a List-Unsubscribe"),
        ({"List-Unsubscribe": "<mailto:u@example.com>",
          "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}, "https"),
        ({"List-Unsubscribe": UNSUBSCRIBE, "List-Unsubscribe-Post": "yes"}, "exactly"),
        ({"List-Unsubscribe": "https://no-brackets.example.com/u"}, "<URI>"),
        ({"List-Unsubscribe": "<https://exämple.com/u>"}, "ASCII"),
        ({"References": "<a@b> not-an-id"}, "message ids"),
        ({"In-Reply-To": "<ä@b>"}, "ASCII"),
        ({"Content-Language": "not a tag!"}, "language tags"),
        ({"List-Id": "no label"}, "list-label"),
        ({"X-Long": "x" * 996}, "too long"),
    ],
)
def test_refused_headers_are_400_and_nothing_is_sent(client, tokens, own, headers, says):
    r = send(client, tokens, headers=headers)
    assert r.status_code == 400, r.json
    assert r.json["error"] == "Validation failed"
    assert any(says in m for m in r.json["details"]["headers"]), r.json
    assert own.messages == []


# -- 2. encoded words keep every character -----------------------------------------------------


def test_case_2_a_long_cyrillic_subject_keeps_its_spaces(client, tokens, own):
    r = send(client, tokens, subject=CYRILLIC_SUBJECT)
    assert r.status_code == 200, r.json
    data = own.messages[0].data
    assert own.messages[0].message["Subject"] == CYRILLIC_SUBJECT
    assert str(make_header(decode_header(unfolded(data, "Subject")))) == CYRILLIC_SUBJECT
    assert_well_folded(data)


SCRIPTS = {
    "cyrillic": (0x0410, 0x044F),
    "greek": (0x0391, 0x03C9),
    "japanese": (0x3041, 0x30FF),
    "chinese": (0x4E00, 0x9FFF),
    "arabic": (0x0621, 0x064A),
    "latin": (0x00C0, 0x00FF),
    "emoji": (0x1F600, 0x1F64F),
    "ascii": (0x0061, 0x007A),
}


@st.composite
def texts(draw, max_size: int) -> str:
    """Words of one or several scripts separated by spaces, of any length up to max_size."""
    scripts = draw(st.lists(st.sampled_from(sorted(SCRIPTS)), min_size=1, max_size=3))
    alphabet = st.one_of(  # assigned characters: letters, marks, digits, punctuation, symbols
        [st.characters(min_codepoint=lo, max_codepoint=hi, categories=("L", "M", "N", "P", "S"))
         for lo, hi in (SCRIPTS[s] for s in scripts)]
    )
    words = draw(st.lists(st.text(alphabet, min_size=1, max_size=30), min_size=1, max_size=60))
    return " ".join(words)[:max_size].strip() or "x"


def decoded_name(data: bytes, field: str) -> str:
    """A field's first display name as an RFC 2047 decoder reads it (email.header over the value
    as sent, so that white space between encoded-words is dropped, RFC 2047 section 6.2)."""
    value = email.message_from_string(data.decode("utf-8"))[field]  # compat32: not decoded
    name, _addr = getaddresses([str(value)])[0]
    return str(make_header(decode_header(name))) if "=?" in name else name


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(subject=texts(998), name=texts(128), smtputf8=st.booleans())
def test_subjects_and_names_in_every_script_and_length_decode_to_the_input(
    client, tokens, own, subject, name, smtputf8
):
    before = len(own.messages)
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    to = "jörg@example.net" if smtputf8 else "rcpt@example.net"
    r = send(client, tokens, subject=subject, to=f'"{quoted}" <{to}>',
             **{"from": f'"{quoted}" <{SMTP_USER}>'})
    assert r.status_code == 200, r.json
    got = own.messages[before]
    # 8-bit headers (SMTPUTF8) read as UTF-8, as RFC 6532 says
    message = email.message_from_string(got.data.decode("utf-8"), policy=policy.default)
    assert message["Subject"] == subject
    assert decoded_name(got.data, "From") == name
    assert decoded_name(got.data, "To") == name
    if smtputf8 and name.isprintable():  # sent as UTF-8 (RFC 6532), not as encoded-words:
        assert message["To"].addresses[0].display_name == name  # policy.default reads it too
    assert_well_folded(got.data)


# -- 3. attachments by type --------------------------------------------------------------------

FORWARDED = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: The original\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"The original body.\r\n"
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_case_3_a_forwarded_message_is_attached_as_a_message(client, tokens, own):
    attachment = {"filename": "original.eml", "contentType": "message/rfc822",
                  "content": b64(FORWARDED)}
    r = send(client, tokens, attachments=[attachment])
    assert r.status_code == 200, r.json
    data = own.messages[0].data
    part = [p for p in own.messages[0].message.walk() if p.get_content_type() == "message/rfc822"]
    assert len(part) == 1
    assert part[0]["Content-Transfer-Encoding"] == "7bit"
    assert part[0].get_filename() == "original.eml"
    inner = part[0].get_content()
    assert inner["Subject"] == "The original" and inner["Message-ID"] == "<orig-1@example.org>"
    assert b"\r\n\r\n" + FORWARDED in data  # its bytes as they were, right after its part header


def test_an_8bit_message_with_bare_newlines_is_sent_8bit_with_crlf(client, tokens, own):
    original = "From: a@example.org\nSubject: Grüße\n\nKöln\n".encode()
    attachment = {"filename": "m.eml", "contentType": "message/rfc822", "content": b64(original)}
    r = send(client, tokens, attachments=[attachment])
    assert r.status_code == 200, r.json
    part = [p for p in own.messages[0].message.walk() if p.get_content_type() == "message/rfc822"]
    assert part[0]["Content-Transfer-Encoding"] == "8bit"
    assert original.replace(b"\n", b"\r\n") in own.messages[0].data


@pytest.mark.parametrize(
    ("content_type", "content", "field"),
    [
        ("multipart/mixed", b"--x\r\n\r\nhi\r\n--x--\r\n", "contentType"),
        ("multipart/alternative", b"hi", "contentType"),
        ("message/partial", b"From: a@b\r\n\r\nhi", "contentType"),
        ("message/external-body", b"From: a@b\r\n\r\nhi", "contentType"),
        ("message/rfc822", b"\x89PNG\r\n\x1a\n\x00\x00", "content"),
        ("message/rfc822", b"From: a@example.org\r\n\r\n" + b"x" * 999, "content"),
        ("message/rfc822", b"From: a@example.org\r\n\r\nnul\x00", "content"),
    ],
)
def test_attachments_that_cannot_be_sent_as_their_type_are_400(client, tokens, own,
                                                               content_type, content, field):
    attachment = {"filename": "f", "contentType": content_type, "content": b64(content)}
    r = send(client, tokens, attachments=[attachment])
    assert r.status_code == 400, r.json
    assert field in r.json["details"]["attachments"]["0"], r.json
    assert own.messages == []


PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize("with_text", [False, True])
def test_inline_images_are_related_to_the_html(client, tokens, own, with_text):
    body = {
        "html": '<p>Logo: <img src="cid:logo@example.com"></p>',
        "attachments": [
            {"filename": "logo.png", "contentType": "image/png", "content": b64(PNG),
             "cid": "logo@example.com"},
            {"filename": "banner.png", "contentType": "image/png", "content": b64(PNG),
             "cid": "cid:banner"},  # Postmark's spelling, with the scheme
            {"filename": "terms.pdf", "contentType": "application/pdf", "content": b64(b"%PDF")},
        ],
        "trackOpens": False,
    }
    if not with_text:
        body["text"] = None
    r = send(client, tokens, **body)
    assert r.status_code == 200, r.json
    message = own.messages[0].message
    assert message.get_content_type() == "multipart/mixed"
    first, pdf = message.iter_parts()
    if with_text:
        assert first.get_content_type() == "multipart/alternative"
        plain, related = first.iter_parts()
        assert plain.get_content_type() == "text/plain"
    else:
        related = first
    assert related.get_content_type() == "multipart/related"
    html, logo, banner = related.iter_parts()
    assert html.get_content_type() == "text/html"
    assert logo["Content-ID"] == "<logo@example.com>" and banner["Content-ID"] == "<banner>"
    assert logo.get_content_disposition() == "inline"
    assert logo.get_content() == PNG
    assert pdf.get_filename() == "terms.pdf" and pdf.get_content_disposition() == "attachment"


def test_a_cid_twice_is_400(client, tokens, own):
    image = {"filename": "a.png", "contentType": "image/png", "content": b64(PNG), "cid": "a"}
    r = send(client, tokens, html="<img src='cid:a'>", attachments=[image, image])
    assert r.status_code == 400 and "attachments" in r.json["details"]
    assert own.messages == []


# -- 4. every address form ---------------------------------------------------------------------


def test_case_4_internal_domains_are_accepted_and_delivered(client, tokens, own):
    r = client.post("/api/senders", json={"email": "noreply@corp.local"}, headers=tokens.headers())
    assert r.status_code == 201, r.json
    r = send(client, tokens, to=["it@corp.local", "ops@svc.internal", "qa@box.test",
                                 "admin@intranet"], **{"from": "noreply@corp.local"})
    assert r.status_code == 200, r.json
    got = own.messages[0]
    assert got.mail_from == "noreply@corp.local"
    assert got.rcpt_tos == ["it@corp.local", "ops@svc.internal", "qa@box.test", "admin@intranet"]


def test_address_lists_quoted_names_and_groups(client, tokens, own):
    r = send(
        client, tokens,
        to='"Doe, Jane" <jane@example.net>, bob@example.net',
        cc=["Team: a@example.net, Bé <b@example.net>;", "undisclosed-recipients:;"],
        bcc="Hidden: h@example.net;",
        replyTo="Support <support@example.com>, sales@example.com",
    )
    assert r.status_code == 200, r.json
    got = own.messages[0]
    assert got.rcpt_tos == ["jane@example.net", "bob@example.net", "a@example.net",
                            "b@example.net", "h@example.net"]
    message = got.message
    assert [(a.display_name, a.addr_spec) for a in message["To"].addresses] == [
        ("Doe, Jane", "jane@example.net"), ("", "bob@example.net")]
    groups = message["Cc"].groups
    assert [(g.display_name, [a.addr_spec for a in g.addresses]) for g in groups] == [
        ("Team", ["a@example.net", "b@example.net"]), ("undisclosed-recipients", [])]
    assert message["Bcc"] is None and b"h@example.net" not in got.data
    assert [a.addr_spec for a in message["Reply-To"].addresses] == [
        "support@example.com", "sales@example.com"]
    assert r.json["accepted"] == got.rcpt_tos


def test_a_group_with_no_one_else_still_needs_a_recipient(client, tokens, own):
    r = send(client, tokens, to="undisclosed-recipients:;")
    assert r.status_code == 400 and "to" in r.json["details"]
    r = send(client, tokens, to="undisclosed-recipients:;", bcc="hidden@example.net")
    assert r.status_code == 200, r.json
    assert b"To: undisclosed-recipients:;\r\n" in head(own.messages[0].data)
    assert own.messages[0].rcpt_tos == ["hidden@example.net"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"from": f"{SMTP_USER}, other@example.com"}, "from"),
        ({"from": f"Team: {SMTP_USER};"}, "from"),
        ({"to": "a@[10.0.0.1]"}, "to"),
        ({"to": '"a b"@example.net'}, "to"),
        ({"to": "a@example.net; b@example.net"}, "to"),
        ({"to": "Jane Doe a@example.net"}, "to"),
        ({"to": ", ".join(f"r{i}@example.net" for i in range(51))}, "to"),
        ({"cc": "(" * 1500 + "a@example.net"}, "cc"),
    ],
)
def test_address_forms_that_are_refused(client, tokens, own, change, field):
    r = send(client, tokens, **change)
    assert r.status_code == 400, r.json
    assert field in r.json["details"], r.json
    assert own.messages == []


def test_an_idn_sender_can_be_removed_as_written_and_as_punycode(client, tokens):
    for added, removed in [
        ("user@exämple.net", "user@exämple.net"),
        ("user@exämple.net", "user@xn--exmple-cua.net"),
        ("user@xn--exmple-cua.net", "user@exämple.net"),
        ("jörg@exämple.net", "jörg@xn--exmple-cua.net"),
        ("jörg@exämple.net", "JÖRG@EXÄMPLE.NET"),
    ]:
        r = client.post("/api/senders", json={"email": added}, headers=tokens.headers())
        assert r.status_code == 201, (added, r.json)
        r = client.delete(f"/api/senders/{removed}", headers=tokens.headers())
        assert r.status_code == 200, (added, removed, r.json)
        assert client.get("/api/senders", headers=tokens.headers()).json["senders"] == []
    r = client.post("/api/senders", json={"email": "user@exämple.net"}, headers=tokens.headers())
    r = client.post("/api/senders", json={"email": "USER@xn--exmple-cua.net"},
                    headers=tokens.headers())
    assert r.status_code == 409  # the same address in another spelling


def test_an_idn_suppression_can_be_removed_as_written_and_as_punycode(client, tokens, own):
    for bounced, removed in [
        ("bad@exämple.net", "bad@exämple.net"),
        ("bad@exämple.net", "bad@xn--exmple-cua.net"),
        ("badjörg@exämple.net", "badjörg@xn--exmple-cua.net"),
        ("badjörg@exämple.net", "badjörg@exämple.net"),
    ]:
        r = send(client, tokens, to=bounced)
        assert r.status_code == 502, r.json
        listed = client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"]
        assert len(listed) == 1
        r = client.delete(f"/api/suppressions/{removed}", headers=tokens.headers())
        assert r.status_code == 200, (bounced, removed, r.json)
        assert client.get("/api/suppressions", headers=tokens.headers()).json == {
            "suppressions": []}

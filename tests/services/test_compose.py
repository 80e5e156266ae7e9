"""Building messages: headers written by services.headers read back exactly as given; bodies
as the stock policy writes them."""

from __future__ import annotations

import email
from email import policy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_service.services.compose import Mailbox, build_message

PRINTABLE_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=128)
ANY_TEXT = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=80
)


def _build(sender: Mailbox, to: list[Mailbox], subject: str = "s", **kw) -> bytes:
    args = {
        "message_id": "abc@example.com",
        "sender": sender,
        "to": to,
        "cc": [],
        "reply_to": [],
        "subject": subject,
        "text": "body",
        "html": None,
        "headers": {},
        "attachments": [],
        "smtputf8": False,
    }
    return build_message(**{**args, **kw})


def _read(raw: bytes):
    return email.message_from_bytes(raw, policy=policy.default)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=PRINTABLE_ASCII | ANY_TEXT, subject=PRINTABLE_ASCII | ANY_TEXT, utf8=st.booleans())
def test_names_and_subjects_read_back_as_given(name, subject, utf8):
    """Whatever the text, the parsed Subject is the subject and the decoded name the name."""
    name = name.strip()  # an address string's name is trimmed by its parser
    raw = _build(
        Mailbox(name, "a@example.com"), [Mailbox("", "b@example.com")], subject, smtputf8=utf8
    )
    ours = _read(raw)
    assert ours["From"].addresses[0].addr_spec == "a@example.com"
    assert ours["Subject"] == subject
    assert _decoded_name(raw) == name
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        assert len(line) <= 998
        if b"=?" in line:
            assert len(line) <= 76, line


def _decoded_name(raw: bytes) -> str:
    """The From display name as an RFC 2047 decoder reads it (white space between encoded-words
    dropped, section 6.2): email.header, over the raw header value."""
    from email.header import decode_header, make_header
    from email.utils import getaddresses

    value = email.message_from_string(raw.decode("utf-8"))["From"]  # compat32: as sent
    name, _addr = getaddresses([str(value)])[0]
    return str(make_header(decode_header(name))) if "=?" in name else name


def test_specials_in_a_name_are_quoted_and_escaped():
    raw = _build(Mailbox('Smith, "J" \\ Co.', "a@example.com"), [Mailbox("", "b@example.com")])
    assert b'From: "Smith, \\"J\\" \\\\ Co." <a@example.com>\r\n' in raw
    assert _read(raw)["From"].addresses[0].display_name == 'Smith, "J" \\ Co.'


def test_a_plain_name_is_written_without_quotes():
    raw = _build(Mailbox("Jane Doe", "a@example.com"), [Mailbox("", "b@example.com")])
    assert b"From: Jane Doe <a@example.com>\r\n" in raw


def test_long_recipient_lists_are_still_folded():
    to = [Mailbox(f"Recipient {i}", f"r{i}@example.com") for i in range(50)]
    raw = _build(Mailbox("", "a@example.com"), to)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert [a.addr_spec for a in _read(raw)["To"].addresses] == [m.address for m in to]


def test_an_encoded_word_look_alike_is_sent_as_text():
    subject = "=?utf-8?q?caf=C3=A9?= literally"
    parsed = _read(_build(Mailbox("", "a@example.com"), [Mailbox("", "b@example.com")], subject))
    assert parsed["Subject"] == subject


def test_date_is_numeric_utc_and_message_id_is_bracketed():
    parsed = _read(_build(Mailbox("", "a@example.com"), [Mailbox("", "b@example.com")]))
    assert parsed["Date"].endswith("+0000")
    assert parsed["Message-ID"] == "<abc@example.com>"
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"


def test_text_html_and_attachment_structure():
    raw = _build(
        Mailbox("", "a@example.com"),
        [Mailbox("", "b@example.com")],
        html="<p>h\u00e9</p>",
        text="t\u00e9",
        attachments=[("r.pdf", "application/pdf", b"%PDF-1")],
    )
    parsed = _read(raw)
    assert parsed.get_content_type() == "multipart/mixed"
    alternative, attachment = parsed.iter_parts()
    assert [p.get_content_type() for p in alternative.iter_parts()] == ["text/plain", "text/html"]
    contents = [p.get_content() for p in alternative.iter_parts()]
    assert contents == ["t\u00e9\r\n", "<p>h\u00e9</p>\r\n"]
    assert attachment.get_filename() == "r.pdf"
    assert attachment.get_content() == b"%PDF-1"


def _plain_stdlib(text: str | None, html: str | None) -> bytes:
    """The same body built by EmailMessage with the stock SMTP policy."""
    from email.message import EmailMessage

    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "a@example.com"
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is not None:
            msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(html, subtype="html")
    return msg.as_bytes()


def _parts(raw: bytes) -> list[tuple[str, str, str]]:
    return [
        (p.get_content_type(), p["Content-Transfer-Encoding"], p.get_content())
        for p in _read(raw).walk()
        if not p.is_multipart()
    ]


BODY = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300) | st.lists(
    st.sampled_from(["a", " ", "\n", "\u00e9", "=", ".", "x" * 90])
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.none() | BODY, html=st.none() | BODY)
def test_bodies_match_the_stock_policy(text, html):
    """The shared Content-Type/CTE header objects give the same parts as the stock policy."""
    if text is None and html is None:
        text = ""
    ours = _build(
        Mailbox("", "a@example.com"), [Mailbox("", "b@example.com")], text=text, html=html
    )
    assert _parts(ours) == _parts(_plain_stdlib(text, html))


def test_checked_addresses_are_kept_and_refusals_are_not():
    import pytest

    from smtp_service.services.compose import parse_mailbox
    from smtp_service.services.errors import InvalidInput

    first = parse_mailbox("Jane <Jane@Example.COM>", "to")
    assert first == Mailbox("Jane", "Jane@example.com")
    assert parse_mailbox("Jane <Jane@Example.COM>", "to") is first
    for field in ("to", "cc"):  # every refusal is checked again and names its own field
        with pytest.raises(InvalidInput) as raised:
            parse_mailbox("not-an-address", field)
        assert field in raised.value.fields

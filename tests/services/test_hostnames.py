"""normalise_host: every spelling of one host gives one form; what is not a host says why."""

from __future__ import annotations

import pytest

from smtp_service.services.hostnames import (
    A_URL,
    NOT_A_HOST,
    TOO_LONG,
    WITH_A_PORT,
    InvalidHost,
    normalise_host,
)

SAME = {
    "smtp.example.com": [
        "smtp.example.com",
        "SMTP.Example.COM",
        "smtp.example.com.",
        "  smtp.example.com  ",
        "ｓｍｔｐ．ｅｘａｍｐｌｅ．ｃｏｍ",  # full-width, as some input methods type it
        "smtp\u3002example\u3002com",  # ideographic full stops (UTS 46 maps them)
    ],
    "xn--bcher-kva.example": [
        "bücher.example",
        "Bücher.Example.",
        "BÜCHER.example",
        "xn--bcher-kva.example",
        "XN--BCHER-KVA.EXAMPLE.",
    ],
    "xn--fa-hia.de": ["faß.de", "FASS.de".replace("SS", "ß")],  # IDNA 2008: ß is kept
    "xn--r8jz45g.xn--zckzah": ["例え.テスト", "例え。テスト"],
    "smtp_relay.internal": ["smtp_relay.internal"],  # internal names with "_" resolve
    "2001:db8::1": ["2001:db8::1", "[2001:db8::1]", "2001:DB8:0:0:0:0:0:1", "[2001:db8:0::1]"],
    "::ffff:7f00:1": ["::ffff:127.0.0.1", "[::ffff:7f00:1]"],
    "127.0.0.1": ["127.0.0.1", "127.0.0.1.", "127.1", "0x7f.1", "0177.0.0.1", "2130706433"],
    "0.0.0.0": ["0"],
}


@pytest.mark.parametrize(
    ("typed", "normal"), [(t, n) for n, spellings in SAME.items() for t in spellings]
)
def test_every_spelling_gives_the_one_form(typed, normal):
    assert normalise_host(typed) == normal
    assert normalise_host(normal) == normal  # and normalising again changes nothing


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        ("smtp.example.com:587", WITH_A_PORT),
        ("10.0.0.1:25", WITH_A_PORT),
        ("[::1]:25", WITH_A_PORT),
        ("smtp://smtp.example.com", A_URL),
        ("smtp.example.com/", A_URL),
        ("me@smtp.example.com", A_URL),
        ("smtp.example.com?x", A_URL),
        ("", NOT_A_HOST),
        ("   ", NOT_A_HOST),
        (".", NOT_A_HOST),
        ("a..b", NOT_A_HOST),
        ("a b.example", NOT_A_HOST),
        ("a:b", NOT_A_HOST),
        ("-a.example", NOT_A_HOST),
        ("a-.example", NOT_A_HOST),
        ("a" * 64 + ".example", NOT_A_HOST),
        ("xn--zz.example", NOT_A_HOST),
        ("1.2.3.4.5", NOT_A_HOST),
        ("example.123", NOT_A_HOST),
        ("4294967296", NOT_A_HOST),
        ("fe80::1%eth0", NOT_A_HOST),
        ("[::1", NOT_A_HOST),
        ("a\x00b", NOT_A_HOST),
        ("a." * 127 + "b", TOO_LONG),
        ("x" * 5000, TOO_LONG),
    ],
)
def test_what_is_not_a_host_says_why_without_echoing_it(typed, reason):
    with pytest.raises(InvalidHost) as caught:
        normalise_host(typed)
    assert str(caught.value) == reason

"""SMTP host names and addresses as users type them, normalised once to the one form every later
step uses: the SSRF check resolves it, the socket dials what that check allowed, TLS sends it as
SNI and matches it against the certificate (RFC 6125 6.4).

Normalising as the clients of the field do (urllib3, Node's tls, browsers' URL parsers):
- a host name: UTS 46 mapping (case folding, full-width forms, ideographic full stops), one
  trailing dot removed (a fully-qualified name, RFC 1034 3.1: urllib3 and Node drop it for SNI
  and the certificate check, since certificates never carry it), each label in its ASCII form:
  an internationalised label as its IDNA 2008 A-label (RFC 5890 2.3.2.1, RFC 5891 4, with the
  `idna` package), so the U-label and A-label spellings of one name are one host;
- an IPv6 address with or without brackets, in its compressed form (RFC 5952), unbracketed as
  sockets and the ssl module take it;
- a name that ends in a number is an IPv4 address (the WHATWG URL rule), in any form the C
  library's inet_aton reads ("127.1", "0x7f.1", "2130706433"), written as a dotted quad; so the
  SSRF check sees the address that getaddrinfo would have dialled.
What is not a host (a port, a URL, spaces, empty labels, a label over 63 characters, a name over
253) raises InvalidHost, whose text is safe to show for the `host` field (it never echoes the
input).
"""

from __future__ import annotations

import ipaddress
import re
import socket

import idna

MAX_NAME_LENGTH = 253  # RFC 1035 2.3.4, without the trailing dot
NOT_A_HOST = "Must be a host name or IP address."
WITH_A_PORT = "Must be a host name or IP address without a port: give the port in the port field."
A_URL = "Must be a host name or IP address, not a URL or an email address."
TOO_LONG = f"Must be at most {MAX_NAME_LENGTH} characters."

# An ASCII label: letters, digits, hyphens (not first or last), and the underscore that some
# internal names carry (getaddrinfo resolves them; IDNA would refuse them).
_ASCII_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMBER = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")


class InvalidHost(ValueError):
    """Not a host name or an IP address; str() is one of the texts above."""


def normalise_host(text: str) -> str:
    """The one form of an SMTP host, for the SSRF check, the connection, SNI and certificates.

    "SMTP.Example.COM." -> "smtp.example.com"; "Bücher.example" and "xn--bcher-kva.example" ->
    "xn--bcher-kva.example"; "[2001:DB8::1]" and "2001:db8:0::1" -> "2001:db8::1"; "127.1" ->
    "127.0.0.1". Raises InvalidHost for what is not a host ("smtp.example.com:587",
    "smtp://smtp.example.com", "a b", "a..b", "").
    """
    host = text.strip()
    if not host:
        raise InvalidHost(NOT_A_HOST)
    if len(host) > MAX_NAME_LENGTH + 1:
        raise InvalidHost(TOO_LONG)
    if "/" in host or "@" in host or "?" in host or "#" in host:
        raise InvalidHost(A_URL)
    if host.startswith("[") or ":" in host:
        return _ipv6(host)
    try:
        # UTS 46 mapping only; STD3 rules are left to the label checks below (for "_").
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError):
        raise InvalidHost(NOT_A_HOST) from None
    if mapped.endswith("."):
        mapped = mapped[:-1]
    labels = mapped.split(".")
    if _NUMBER.fullmatch(labels[-1]):
        return _ipv4(mapped, labels)
    ascii_labels = [_ascii_label(label) for label in labels]
    name = ".".join(ascii_labels)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidHost(TOO_LONG)
    return name


def _ipv6(host: str) -> str:
    inner = host
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidHost(WITH_A_PORT if "]:" in host else NOT_A_HOST)
        inner = host[1:-1]
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        head, _, tail = host.rpartition(":")
        if head and tail.isdigit() and ":" not in head.strip("[]"):
            raise InvalidHost(WITH_A_PORT) from None  # "smtp.example.com:587", "10.0.0.1:25"
        raise InvalidHost(NOT_A_HOST) from None
    if address.scope_id:  # "fe80::1%eth0": a zone means nothing outside this machine
        raise InvalidHost(NOT_A_HOST)
    return address.compressed


def _ipv4(mapped: str, labels: list[str]) -> str:
    if len(labels) > 4 or not all(_NUMBER.fullmatch(label) for label in labels):
        raise InvalidHost(NOT_A_HOST)  # "example.123", "1.2.3.4.5"
    try:
        return socket.inet_ntoa(socket.inet_aton(mapped))
    except OSError:
        raise InvalidHost(NOT_A_HOST) from None  # "256.1.1.1", "4294967296"


def _ascii_label(label: str) -> str:
    if not label:
        raise InvalidHost(NOT_A_HOST)  # "a..b", ".example.com", "example.com.."
    if label.isascii() and not label.startswith("xn--"):
        if not _ASCII_LABEL.fullmatch(label):
            raise InvalidHost(NOT_A_HOST)
        return label
    try:
        # The A-label of a U-label; an A-label is checked to decode to a valid U-label.
        return idna.alabel(label).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise InvalidHost(NOT_A_HOST) from None

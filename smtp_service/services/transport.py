"""smtplib connections: implicit TLS or STARTTLS with verified certificates, pinned addresses,
bounded timeouts, and failures turned into texts that say what broke and never hold a secret."""

from __future__ import annotations

import base64
import functools
import os
import smtplib
import socket
import ssl
from dataclasses import dataclass, field

from smtp_service.services.netguard import HostGuard, HostRefused, HostUnresolved


class Secret:
    """A password that does not show itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password itself, for the one place that needs it."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True)
class SmtpEndpoint:
    """Where and how to connect: one account's server or the global one."""

    host: str
    port: int
    secure: bool
    user: str | None
    password: Secret | None = field(default=None)
    require_tls: bool = True
    trusted: bool = False  # the global server from the environment skips the SSRF check


# Kinds of failure a later retry can get past as they are (the server or network may recover);
# the others need the settings or the account changed first.
_TEMPORARY_KINDS = frozenset({"dns", "refused", "timeout", "closed"})


class TransportError(Exception):
    """A connection-level failure; `kind` is one of dns, blocked, refused, timeout, tls, auth,
    protocol, closed; `code` the server's reply code where a reply said it. The text is safe
    to show to the caller."""

    def __init__(self, kind: str, text: str, code: int | None = None) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text
        self.code = code

    @property
    def temporary(self) -> bool:
        """True when a retry later can succeed unchanged: a network fault, or a 4xx reply
        (421 at the greeting, 454 to AUTH) (RFC 5321 section 4.2.1)."""
        if self.code is not None:
            return 400 <= self.code <= 499
        return self.kind in _TEMPORARY_KINDS


def tls_context() -> ssl.SSLContext:
    """A verifying context from the system trust store (honours SSL_CERT_FILE/SSL_CERT_DIR).

    Loading the trust store costs milliseconds, once per new connection if done each time; one
    context is shared (OpenSSL contexts are safe to share between threads) and built again only
    when SSL_CERT_FILE or SSL_CERT_DIR change.
    """
    return _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return ssl.create_default_context()


class _PinnedSMTP(smtplib.SMTP):
    """SMTP that dials a checked IP while TLS still verifies the host name."""

    def __init__(self, pinned_ip: str, **kwargs) -> None:
        self._pinned_ip = pinned_ip
        super().__init__(**kwargs)

    def _get_socket(self, host, port, timeout):  # noqa: ANN001, ANN202 - smtplib's signature
        self._host = host  # connect() does not set it; starttls() needs it for SNI and the check
        return socket.create_connection((self._pinned_ip, port), timeout, self.source_address)


class _PinnedSMTPSSL(smtplib.SMTP_SSL):
    """SMTP_SSL that dials a checked IP; SNI and the certificate check use the host name."""

    def __init__(self, pinned_ip: str, **kwargs) -> None:
        self._pinned_ip = pinned_ip
        super().__init__(**kwargs)

    def _get_socket(self, host, port, timeout):  # noqa: ANN001, ANN202 - smtplib's signature
        self._host = host
        sock = socket.create_connection((self._pinned_ip, port), timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=self._host)


def _scrub(text: str, endpoint: SmtpEndpoint) -> str:
    if endpoint.password:
        secret = endpoint.password.reveal()
        # Below six characters a match is more likely a word of the text than the password.
        if len(secret) >= 6 and secret in text:
            text = text.replace(secret, "***")
    return text


def _reply_text(exc: smtplib.SMTPResponseException) -> str:
    message = exc.smtp_error
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return f"{exc.smtp_code} {message}".strip()


def describe_failure(exc: BaseException, endpoint: SmtpEndpoint) -> TransportError:
    """Turn a low-level exception into a TransportError whose text says what failed."""
    if isinstance(exc, TransportError):
        return exc
    where = f"{endpoint.host}:{endpoint.port}"
    if isinstance(exc, HostRefused):
        kind, text = "blocked", str(exc)
    elif isinstance(exc, HostUnresolved):
        kind, text = "dns", f"DNS lookup failed for {endpoint.host}"
    elif isinstance(exc, smtplib.SMTPAuthenticationError):
        kind, text = "auth", f"Authentication failed ({_reply_text(exc)})"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        kind, text = "tls", f"TLS certificate verification failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError):
        kind, text = "tls", f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    elif isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
        # smtplib turns a read timeout into SMTPServerDisconnected; the cause tells.
        kind, text = "timeout", f"Timed out talking to {where}"
    elif isinstance(exc, ConnectionRefusedError):
        kind, text = "refused", f"Connection refused by {where}"
    elif isinstance(exc, smtplib.SMTPServerDisconnected):
        kind, text = "closed", f"Server {where} closed the connection"
    elif isinstance(exc, smtplib.SMTPConnectError):
        kind, text = "refused", f"Server {where} refused the session ({_reply_text(exc)})"
    elif isinstance(exc, smtplib.SMTPResponseException):
        kind, text = "protocol", f"Server replied {_reply_text(exc)}"
    elif isinstance(exc, smtplib.SMTPException):
        kind, text = "protocol", f"SMTP error: {exc}"
    elif isinstance(exc, OSError):
        kind, text = "refused", f"Cannot connect to {where}: {exc.strerror or type(exc).__name__}"
    else:
        kind, text = "protocol", f"Unexpected failure: {type(exc).__name__}"
    code = exc.smtp_code if isinstance(exc, smtplib.SMTPResponseException) else None
    return TransportError(kind, _scrub(text, endpoint), code)


def connect(endpoint: SmtpEndpoint, *, timeout: float, guard: HostGuard) -> smtplib.SMTP:
    """An open, encrypted where possible, authenticated connection; raises TransportError.

    secure=True is implicit TLS. Otherwise STARTTLS is used when offered; when it is not offered,
    credentials are sent only if the endpoint does not require TLS.
    """
    conn: smtplib.SMTP | None = None
    try:
        ip = guard.resolve(endpoint.host, endpoint.port, trusted=endpoint.trusted)
        context = tls_context()
        if endpoint.secure:
            conn = _PinnedSMTPSSL(ip, timeout=timeout, context=context)
        else:
            conn = _PinnedSMTP(ip, timeout=timeout)
        code, greeting = conn.connect(endpoint.host, endpoint.port)
        if code != 220:  # e.g. "421 Too many connections": say so, with the server's words
            raise smtplib.SMTPConnectError(code, greeting)
        _ehlo(conn)
        if not endpoint.secure:
            if conn.has_extn("starttls"):
                conn.starttls(context=context)
                _ehlo(conn)
            elif endpoint.require_tls:
                raise TransportError(
                    "tls",
                    f"Server {endpoint.host}:{endpoint.port} does not offer STARTTLS "
                    "and TLS is required; no credentials were sent",
                )
        if endpoint.user and endpoint.password:
            _login(conn, endpoint.user, endpoint.password.reveal())
        return conn
    except BaseException as exc:
        if conn is not None:
            close_quietly(conn)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise describe_failure(exc, endpoint) from None


def _login(conn: smtplib.SMTP, user: str, password: str) -> None:
    """AUTH with smtplib's choice of mechanism; non-ASCII credentials (which smtplib can only
    encode as ASCII) go as AUTH PLAIN in UTF-8, as RFC 4616 defines it."""
    if user.isascii() and password.isascii():
        conn.login(user, password)
        return
    offered = conn.esmtp_features.get("auth", "").upper().split()
    if "PLAIN" not in offered:
        raise TransportError(
            "auth",
            "Authentication failed (the server does not offer AUTH PLAIN, which a user name "
            "or password with non-ASCII characters needs)",
        )
    token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
    code, reply = conn.docmd("AUTH", "PLAIN " + token)
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


def _ehlo(conn: smtplib.SMTP) -> None:
    """EHLO, falling back to HELO; a refusal of both is an error, not a server without
    extensions (which would be misreported as "does not offer STARTTLS")."""
    code, reply = conn.ehlo()
    if code == 250:
        return
    code, reply = conn.helo()
    if code != 250:
        raise smtplib.SMTPHeloError(code, reply)


def close_quietly(conn: smtplib.SMTP) -> None:
    """QUIT if the server still listens, then close; never raises."""
    try:
        conn.quit()
    except Exception:  # noqa: BLE001 - a dead connection only needs closing
        pass
    try:
        conn.close()
    except Exception:  # noqa: BLE001
        pass


def check_connection(endpoint: SmtpEndpoint, *, timeout: float, guard: HostGuard) -> None:
    """Connect, negotiate TLS, authenticate and QUIT; raise TransportError on any failure."""
    close_quietly(connect(endpoint, timeout=timeout, guard=guard))

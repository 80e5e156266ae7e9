"""smtplib connections: implicit TLS or STARTTLS with verified certificates, pinned addresses,
bounded timeouts, and failures turned into texts that say what broke and never hold a secret.

Every stage has its own timeout (RFC 5321 section 4.5.3.2: connect, the greeting and each
command's reply, the reply to the final dot) and a whole operation (a send, a connection test)
has a deadline; a reply is read by this module, not smtplib, with a limit on its lines and bytes,
so a server that trickles continuation lines or sends an endless greeting is cut off.
"""

from __future__ import annotations

import base64
import functools
import os
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Protocol

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
class OAuthLogin:
    """Whose OAuth2 grant gives the access tokens a connection signs in with (SASL XOAUTH2).

    `grant` is "authorization_code" (delegated: the refresh token stored for `account_id`) or
    "client_credentials" (app-only, Microsoft: `tenant_id`, `client_id`, `client_secret`).
    Compared by value, so a pooled connection stays the account's while its grant is the same:
    a new access token never retires a connection that signed in with an older one."""

    account_id: str
    provider: str  # "microsoft" or "google"
    grant: str = "authorization_code"
    grant_id: str = ""  # one sign-in: a new sign-in is a new login (and new connections)
    # The provider refused the grant: no token is asked for until the account signs in again
    needs_reauthorization: bool = False
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None


# What a send answers while an account's OAuth2 grant is refused (services.oauth raises it too).
REAUTHORIZE_TEXT = (
    "Authentication failed: the OAuth2 provider refused to renew the sign-in (invalid_grant: "
    "consent revoked, password changed or the grant expired); the account needs "
    "reauthorization (POST /api/smtp/oauth/start)"
)


class AccessTokens(Protocol):
    """Where connections get OAuth2 access tokens (services.oauth.OAuthService)."""

    def access_token(
        self, login: OAuthLogin, *, renew: bool = False, deadline: float | None = None
    ) -> Secret:
        """A currently valid access token for `login` (cached; `renew` fetches a new one),
        within `deadline` (time.monotonic() seconds, None: none). Raises TransportError of kind
        "auth" when none can be had, "timeout" past the deadline (no secret in its text)."""


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
    # Most connections open at once to this server for the account (settings' maxConnections);
    # None: the pool's size. It does not make a connection differ, so it is not compared.
    max_connections: int | None = field(default=None, compare=False)
    # Settings' "failover": send through the global server when this one fails to connect;
    # None: the deployment's default (SMTP_FAILOVER). Not a property of the connection either.
    failover: bool | None = field(default=None, compare=False)
    # The account's send rate limit (settings' rateLimit, services.send_rate's syntax; None:
    # SEND_RATE_LIMIT). An account's policy carried with its settings, like max_connections.
    rate_limit: str | None = field(default=None, compare=False)
    # OAuth2 (SASL XOAUTH2) instead of a password: whose grant gives the access tokens.
    oauth: OAuthLogin | None = None


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


@dataclass(frozen=True)
class Timeouts:
    """How long each stage of an SMTP conversation may take, in seconds, and how long a whole
    operation may take.

    RFC 5321 section 4.5.3.2 gives a client's minimums: 5 minutes for the greeting, MAIL and
    RCPT, 2 for DATA, 3 for each block of content, 10 for the reply to the final dot. A caller
    waits on HTTP here, so the defaults are shorter where that costs nothing (a server silent
    for 30 s after a command is not coming back) and long where servers are slow on purpose:
    content filters scan a message before they answer its final dot, 90 s is common.

    - connect: a TCP connection (per address tried) and an implicit-TLS handshake;
    - command: the greeting and the reply to every command but the final dot (RFC 5321
      4.5.3.2.1-4.5.3.2.4, 4.5.3.2.7), the STARTTLS handshake, and each write, of a command or
      of a block of content (4.5.3.2.5);
    - final_reply: the reply to the final dot (4.5.3.2.6), once the server may have the message;
    - operation: a whole send (waiting for a pooled connection included) or connection test.
      No stage outlasts it: a server that answers every command just in time, or sends a
      continuation line every few seconds, is cut off when it ends.
    """

    connect: float = 10.0
    command: float = 30.0
    final_reply: float = 120.0
    operation: float = 150.0

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """Every stage `seconds` long (the single SMTP timeout of old); `operation` as default."""
        return cls(connect=seconds, command=seconds, final_reply=seconds)


# What one reply may hold. RFC 5321 4.5.3.1.5 allows 512 octets a line; real EHLO replies run
# longer, and smtplib reads up to 8,192 a line but any number of lines (one endless greeting
# made a worker allocate 461 MiB). Past any limit the connection is closed.
MAX_REPLY_LINE = 8192  # bytes, CRLF included
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024
CONTENT_BLOCK = 64 * 1024  # content is written in blocks, each within the command timeout
_RECV_SIZE = 16 * 1024


class ReplyTooLong(smtplib.SMTPException):
    """A reply went past MAX_REPLY_LINE, MAX_REPLY_LINES or MAX_REPLY_BYTES."""


class DeadlinePassed(TimeoutError):
    """The operation's deadline passed (or a stage's timeout did) before the server answered."""


class BoundedSMTP(smtplib.SMTP):
    """smtplib.SMTP whose every wait is bounded: a reply is read within its stage's timeout and
    the operation's `deadline` (time.monotonic() seconds, None: none), with at most
    MAX_REPLY_LINES lines of MAX_REPLY_LINE bytes and MAX_REPLY_BYTES in all; a write within the
    command timeout and the deadline. Replies are read here, from a buffer that belongs to one
    socket: whatever a server sent before STARTTLS is never read as a reply after it."""

    def __init__(self, timeouts: Timeouts, deadline: float | None = None, **kwargs) -> None:
        self.timeouts = timeouts
        self.deadline = deadline
        self.authenticated = False  # connect() sets it when AUTH succeeded
        self._buffer = bytearray()
        self._buffer_of: object = None  # the socket the buffer was filled from
        super().__init__(**kwargs)

    def budget(self, seconds: float) -> float:
        """`seconds`, or what is left of the deadline when that is less; raises DeadlinePassed
        when nothing is left."""
        if self.deadline is None:
            return seconds
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed("the operation's deadline passed")
        return min(seconds, left)

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's reply reader, replaced: one reply within the command timeout."""
        return self.read_reply(self.timeouts.command)

    def read_reply(self, seconds: float) -> tuple[int, bytes]:
        """One reply, read within `seconds` and the deadline: (code, its lines' texts joined by
        LF), code -1 when a line does not start with one (as smtplib does). The `seconds` count
        from the first wait for data: a reply already received costs no clock reading.

        Raises DeadlinePassed (the time ran out), SMTPServerDisconnected (the server hung up)
        or ReplyTooLong; the connection is closed first."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("Not connected")
        if self._buffer_of is not sock:  # a new socket (TLS started): nothing before it counts
            self._buffer.clear()
            self._buffer_of = sock
        buffer = self._buffer
        until: float | None = None  # when the reply must be complete; set at the first wait
        texts: list[bytes] = []
        size = 0
        start = 0  # where the next line begins in the buffer
        while True:
            end = buffer.find(b"\n", start, start + MAX_REPLY_LINE)
            if end < 0:  # no complete line: keep what is left, wait for more
                del buffer[:start]
                start = 0
                if len(buffer) >= MAX_REPLY_LINE:
                    self.close()
                    raise ReplyTooLong(f"reply line longer than {MAX_REPLY_LINE} bytes")
                until = self._receive(sock, seconds, until)
                continue
            line = bytes(buffer[start : end + 1])
            start = end + 1
            size += len(line)
            if len(texts) >= MAX_REPLY_LINES or size > MAX_REPLY_BYTES:
                self.close()
                raise ReplyTooLong(
                    f"reply longer than {MAX_REPLY_LINES} lines or {MAX_REPLY_BYTES} bytes"
                )
            texts.append(line[4:].strip(b" \t\r\n"))
            try:
                code = int(line[:3])
            except ValueError:  # as smtplib: a line without a code ends the reply
                del buffer[:start]
                return -1, b"\n".join(texts)
            if line[3:4] != b"-":
                del buffer[:start]
                return code, b"\n".join(texts)

    def _receive(self, sock: socket.socket, seconds: float, until: float | None) -> float:
        """Append what the server sends next to the buffer, waiting until `until` (None: this
        is the reply's first wait, which may take `seconds`, or what is left of the deadline);
        returns `until`.

        The socket's timeout is changed only when it is longer than the time left: setting it
        is a system call (ioctl), made with the GIL released, and costs the other threads of a
        worker a hand-over of the GIL. A shorter one that runs out is not the reply's timeout:
        the wait goes on, with exactly the time left."""
        now = time.monotonic()
        if until is None:
            left = seconds
            if self.deadline is not None and self.deadline - now < seconds:
                left = self.deadline - now
            until = now + left
        else:
            left = until - now
        if left <= 0:
            self.close()
            raise DeadlinePassed("no complete reply in time")
        current = sock.gettimeout()
        if current is None or current > left:
            sock.settimeout(left)
        try:
            chunk = sock.recv(_RECV_SIZE)
        except TimeoutError:
            left = until - time.monotonic()
            if left <= 0:
                self.close()
                raise DeadlinePassed("no complete reply in time") from None
            sock.settimeout(left)  # the socket's timeout was the shorter one: wait the rest
            return until
        except OSError as exc:
            self.close()
            raise smtplib.SMTPServerDisconnected(f"Connection lost: {exc}") from None
        if not chunk:
            self.close()
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
        self._buffer += chunk
        return until

    def send(self, s: str | bytes | memoryview) -> None:
        """smtplib's send, within the command timeout and the deadline (the socket's timeout is
        set only when it differs: see _receive)."""
        sock = self.sock
        if sock is not None:
            try:
                seconds = self.budget(self.timeouts.command)
            except DeadlinePassed:
                self.close()
                raise
            if sock.gettimeout() != seconds:
                sock.settimeout(seconds)
        super().send(s)

    def send_content(self, data: bytes) -> None:
        """Write message content in blocks of CONTENT_BLOCK bytes, each within the command
        timeout (RFC 5321 4.5.3.2.5) and all within the deadline. When this returns, every byte
        has left; when it raises, the last one has not."""
        view = memoryview(data)
        for start in range(0, len(view), CONTENT_BLOCK):
            self.send(view[start : start + CONTENT_BLOCK])

    def close(self) -> None:
        """Close the socket (without QUIT)."""
        self._buffer.clear()
        self._buffer_of = None
        super().close()


class _PinnedSMTP(BoundedSMTP):
    """SMTP that dials checked IPs, in order, while TLS still verifies the host name."""

    def __init__(self, pinned: list[str], timeouts: Timeouts, **kwargs) -> None:
        self._pinned = pinned
        super().__init__(timeouts, **kwargs)

    def _get_socket(self, host, port, timeout):  # noqa: ANN001, ANN202 - smtplib's signature
        self._host = host  # connect() does not set it; starttls() needs it for SNI and the check
        return self._dial(port)

    def _dial(self, port: int) -> socket.socket:
        """A TCP connection to the first checked address that takes one, each tried within the
        connect timeout and the deadline; the last address's failure when none does."""
        failure: OSError | None = None
        for ip in self._pinned:
            try:
                return socket.create_connection(
                    (ip, port), self.budget(self.timeouts.connect), self.source_address
                )
            except DeadlinePassed:
                raise
            except OSError as exc:  # refused, unreachable, timed out: the next address
                failure = exc
        assert failure is not None  # HostGuard.addresses returns at least one
        raise failure


class _PinnedSMTPSSL(_PinnedSMTP):
    """SMTP over implicit TLS that dials a checked IP; SNI and the certificate check use the
    host name."""

    default_port = smtplib.SMTP_SSL_PORT

    def __init__(self, pinned: list[str], timeouts: Timeouts, *, context: ssl.SSLContext,
                 **kwargs) -> None:
        self.context = context
        super().__init__(pinned, timeouts, **kwargs)

    def _get_socket(self, host, port, timeout):  # noqa: ANN001, ANN202 - smtplib's signature
        sock = super()._get_socket(host, port, timeout)
        sock.settimeout(self.budget(self.timeouts.connect))
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
    elif isinstance(exc, ReplyTooLong):
        kind, text = "protocol", f"Server {where} sent a {exc}; the connection was closed"
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


# The EHLO name when the caller gives none (the app passes SMTP_EHLO_NAME, computed once at
# start-up): never socket.getfqdn() per connection, nor an address literal that filters score.
DEFAULT_EHLO_NAME = "localhost.localdomain"


def connect(
    endpoint: SmtpEndpoint,
    deadline: float | None = None,
    *,
    guard: HostGuard,
    timeouts: Timeouts | None = None,
    timeout: float | None = None,
    ehlo_name: str = DEFAULT_EHLO_NAME,
    tokens: AccessTokens | None = None,
) -> BoundedSMTP:
    """An open connection, encrypted where possible, authenticated where the server offers
    AUTH; raises TransportError (its text holds no secret).

    `deadline` (time.monotonic() seconds, None: none) bounds all of it and stays on the
    connection for what follows (BoundedSMTP.deadline); `timeouts` bounds each stage (given
    `timeout` instead, in seconds, every stage has that one, as SMTP_TIMEOUT once meant).
    The host is resolved once, every address checked by `guard`, and each tried in order until
    one takes a TCP connection. EHLO (RFC 5321 4.1.1.1) names this client `ehlo_name`.

    TLS: secure=True is implicit TLS (RFC 8314). Otherwise STARTTLS (RFC 3207) is used when
    offered; when it is not offered, credentials are sent only if the endpoint does not
    require TLS.
    AUTH (RFC 4954): once, with the best mechanism offered (_login). A server that offers no
    AUTH at all, such as a relay that trusts the client's address, gets none and the message
    goes without it (as Nodemailer sends); the connection's `authenticated` says which.
    An endpoint with `oauth` signs in with SASL XOAUTH2 and an access token from `tokens`
    (_xoauth2_login: a 535 to a cached token gets one new token and one more try).
    """
    if timeouts is None:
        timeouts = Timeouts() if timeout is None else Timeouts.uniform(timeout)
    conn: BoundedSMTP | None = None
    try:
        pinned = guard.addresses(endpoint.host, endpoint.port, trusted=endpoint.trusted)
        if endpoint.oauth is not None and endpoint.oauth.needs_reauthorization:
            # the provider refused the grant: no connection can sign in, so none is opened
            raise TransportError("auth", REAUTHORIZE_TEXT)
        context = tls_context()
        if endpoint.secure:
            conn = _PinnedSMTPSSL(
                pinned, timeouts, deadline=deadline, context=context, local_hostname=ehlo_name
            )
        else:
            conn = _PinnedSMTP(pinned, timeouts, deadline=deadline, local_hostname=ehlo_name)
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
        if endpoint.oauth is not None and endpoint.user and conn.has_extn("auth"):
            _xoauth2_login(conn, endpoint.user, endpoint.oauth, tokens)
            conn.authenticated = True
        elif endpoint.user and endpoint.password and conn.has_extn("auth"):
            _login(conn, endpoint.user, endpoint.password.reveal())
            conn.authenticated = True
        return conn
    except BaseException as exc:
        if conn is not None:  # a QUIT only where the server still talks, and a short one
            close_quietly(conn, polite=_still_talking(exc), seconds=FAILED_QUIT_SECONDS)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise describe_failure(exc, endpoint) from None


def _still_talking(exc: BaseException) -> bool:
    """True when the server answered (a refusal we give up on) and so may take a QUIT; a
    timeout, a lost connection, a TLS failure or a 421 (the server is closing) is closed."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code != 421
    return isinstance(exc, TransportError)


# An AUTH PLAIN initial response longer than this goes after the server's empty challenge
# instead (RFC 4954 section 4): some servers limit a command line to 512 octets.
_INITIAL_RESPONSE_LIMIT = 400


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _auth_with_response(conn: BoundedSMTP, mechanism: str, response: str) -> tuple[int, bytes]:
    """AUTH `mechanism` with its client response (base64): on the command line when it is
    short, else after the server's empty challenge (RFC 4954 section 4: some servers limit a
    command line to 512 octets). The server's reply (code, text) to the response."""
    if len(response) <= _INITIAL_RESPONSE_LIMIT:
        return conn.docmd("AUTH", f"{mechanism} {response}")
    code, reply = conn.docmd("AUTH", mechanism)
    if code == 334:
        code, reply = conn.docmd(response)
    return code, reply


def _login(conn: BoundedSMTP, user: str, password: str) -> None:
    """AUTH once, with the best mechanism the server offers (RFC 4954): PLAIN (RFC 4616),
    else LOGIN; user name and password in UTF-8 either way (as Nodemailer sends them and
    Exchange takes them). smtplib.login is not used: it tries every offered mechanism in turn,
    so a wrong password costs two attempts, each delayed by servers that slow failures down;
    here a 535 is final.

    Raises SMTPAuthenticationError with the server's reply, or TransportError ("auth") when
    the server offers neither PLAIN nor LOGIN."""
    offered = conn.esmtp_features.get("auth", "").upper().split()
    if "PLAIN" in offered:
        token = _b64(b"\0" + user.encode() + b"\0" + password.encode())
        code, reply = _auth_with_response(conn, "PLAIN", token)
    elif "LOGIN" in offered:
        code, reply = conn.docmd("AUTH", "LOGIN")
        if code == 334:
            code, reply = conn.docmd(_b64(user.encode()))
        if code == 334:
            code, reply = conn.docmd(_b64(password.encode()))
    else:
        mechanisms = " ".join(offered) or "without a mechanism"
        raise TransportError(
            "auth",
            f"Authentication failed (the server offers AUTH {mechanisms}; "
            "this service uses PLAIN or LOGIN)",
        )
    if code == 334:  # yet another challenge: cancel the exchange (RFC 4954 section 4)
        conn.docmd("*")
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


def xoauth2_response(user: str, token: str) -> str:
    """The SASL XOAUTH2 initial client response, base64 (Google's and Microsoft's format):
    "user={user}^Aauth=Bearer {token}^A^A"."""
    return _b64(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def _xoauth2(conn: BoundedSMTP, user: str, token: Secret) -> tuple[int, bytes]:
    """One AUTH XOAUTH2 exchange; the server's final (code, reply). A long response goes after
    the server's empty challenge (as Microsoft documents it; Gmail takes both). A failure that
    comes as a 334 with an error (Gmail's base64 JSON) is answered with an empty line, after
    which the server sends its 535 (Google's XOAUTH2 protocol)."""
    code, reply = _auth_with_response(conn, "XOAUTH2", xoauth2_response(user, token.reveal()))
    if code == 334:  # the error challenge: an empty response ends the exchange
        code, reply = conn.docmd("")
    return code, reply


def _xoauth2_login(
    conn: BoundedSMTP, user: str, login: OAuthLogin, tokens: AccessTokens | None
) -> None:
    """Sign in with SASL XOAUTH2 and an access token of `login`. A 535 to the token (revoked
    or expired early at the provider) gets one renewed token and one more try on the same
    connection (RFC 4954 section 4 allows another AUTH after a failed one).

    Raises TransportError ("auth") when the server offers no XOAUTH2 or no token can be had,
    SMTPAuthenticationError with the server's reply when it refuses the renewed token too."""
    offered = conn.esmtp_features.get("auth", "").upper().split()
    if "XOAUTH2" not in offered:
        mechanisms = " ".join(offered) or "without a mechanism"
        raise TransportError(
            "auth",
            f"Authentication failed (the server offers AUTH {mechanisms}; "
            "OAuth2 sign-in needs XOAUTH2)",
        )
    if tokens is None:
        raise TransportError("auth", "Authentication failed (OAuth2 sign-in is not available)")
    code, reply = _xoauth2(conn, user, tokens.access_token(login, deadline=conn.deadline))
    if code == 535:
        renewed = tokens.access_token(login, renew=True, deadline=conn.deadline)
        code, reply = _xoauth2(conn, user, renewed)
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


# How long a QUIT may take: it is a courtesy. The pool's reaper gives it QUIT_SECONDS; a
# connection that failed while the request waits (a refused AUTH) gets FAILED_QUIT_SECONDS.
QUIT_SECONDS = 5.0
FAILED_QUIT_SECONDS = 1.0


def close_quietly(
    conn: smtplib.SMTP, *, polite: bool = True, seconds: float = QUIT_SECONDS
) -> None:
    """QUIT (when `polite`: the server is still talking) within `seconds`, the command timeout
    and the connection's deadline, then close; never raises."""
    if polite:
        try:
            if isinstance(conn, BoundedSMTP):  # within its deadline too, if it has one
                limit = time.monotonic() + min(seconds, conn.timeouts.command)
                conn.deadline = limit if conn.deadline is None else min(limit, conn.deadline)
            conn.quit()
        except Exception:  # noqa: BLE001 - a dead connection only needs closing
            pass
    try:
        conn.close()
    except Exception:  # noqa: BLE001
        pass


@dataclass(frozen=True)
class ConnectionCheck:
    """What a connection test found: whether the credentials were used (False: the server
    offers no AUTH, as relays that trust the client's address do) and whether TLS was on."""

    authenticated: bool
    tls: bool


def check_connection(
    endpoint: SmtpEndpoint,
    *,
    guard: HostGuard,
    timeouts: Timeouts | None = None,
    timeout: float | None = None,
    ehlo_name: str = DEFAULT_EHLO_NAME,
    tokens: AccessTokens | None = None,
) -> ConnectionCheck:
    """Connect, negotiate TLS, authenticate (when the server offers AUTH) and QUIT, all within
    `timeouts.operation` seconds (each stage within its own timeout; `timeout` and `ehlo_name`
    as for connect(); `tokens` for an OAuth2 endpoint). Raises TransportError on any
    failure."""
    if timeouts is None:
        timeouts = Timeouts() if timeout is None else Timeouts.uniform(timeout)
    deadline = time.monotonic() + timeouts.operation
    conn = connect(
        endpoint, deadline, guard=guard, timeouts=timeouts, ehlo_name=ehlo_name, tokens=tokens
    )
    found = ConnectionCheck(conn.authenticated, isinstance(conn.sock, ssl.SSLSocket))
    close_quietly(conn)
    return found

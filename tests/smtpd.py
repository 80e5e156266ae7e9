"""Real SMTP servers for tests: aiosmtpd on loopback with STARTTLS, implicit TLS and AUTH."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass
class Received:
    """One message as the server got it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    auth_login: str | None
    tls: bool
    mail_options: list[str] = field(default_factory=list)  # MAIL FROM's parameters

    @property
    def message(self) -> Message:
        """The parsed message (8-bit headers read as UTF-8, as SMTPUTF8 sends them)."""
        return message_from_bytes(self.data, policy=policy.default)


@dataclass
class RecordingHandler:
    """Accepts every message and keeps it; subclasses misbehave on purpose."""

    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    quits: int = 0  # sessions the client ended politely with QUIT
    pipelining: bool = False  # offer PIPELINING (RFC 2920) in the EHLO reply
    # Per MAIL command: were RCPT and DATA already waiting behind it (sent in one batch)?
    batched: list[bool] = field(default_factory=list)
    # RCPT replies by the recipient's local part (prefix match, "" matches every recipient),
    # tried before the bad*/later* defaults: {"carol": "552 5.2.2 Mailbox full"}.
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    # EHLO: extensions left out of the reply ({"AUTH", "8BITMIME"}), the AUTH line's mechanisms
    # as shown ("LOGIN XOAUTH2"; SmtpServer's auth_mechanisms decides what works), and the
    # names clients gave.
    ehlo_hidden: set[str] = field(default_factory=set)
    ehlo_auth: str | None = None
    ehlo_names: list[str] = field(default_factory=list)

    async def handle_EHLO(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self.lock:
            self.ehlo_names.append(hostname)
        if self.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        shown = []
        for line in responses:
            keyword = line[4:].split(" ", 1)[0].upper()
            if keyword in self.ehlo_hidden:
                continue
            if keyword == "AUTH" and self.ehlo_auth is not None:
                line = f"{line[:4]}AUTH {self.ehlo_auth}"
            shown.append(line)
        return shown

    async def handle_MAIL(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        waiting = bytes(getattr(server._reader, "_buffer", b""))  # read, not yet handled
        with self.lock:
            self.batched.append(b"DATA\r\n" in waiting.upper())
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self.lock:
            self.quits += 1
        return "221 Bye"

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """Refuse on purpose: rcpt_replies first, then bad* -> 550 5.1.1 (hard), later* ->
        451 4.7.1 (soft)."""
        local = address.split("@", 1)[0].lower()
        for prefix, reply in self.rcpt_replies.items():
            if local.startswith(prefix):
                return reply
        if local.startswith("bad"):
            return "550 5.1.1 User unknown"
        if local.startswith("later"):
            return "451 4.7.1 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        auth = getattr(session, "auth_data", None)
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        with self.lock:
            self.messages.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content or envelope.content,
                    login,
                    session.ssl is not None,
                    list(envelope.mail_options),
                )
            )
        return "250 OK"


class SmtpServer:
    """An aiosmtpd server in a thread. mode: "starttls", "implicit" or "plain"."""

    def __init__(
        self,
        *,
        mode: str = "starttls",
        users: dict[str, str] | None = None,
        server_context: ssl.SSLContext | None = None,
        handler: RecordingHandler | None = None,
        port: int = 0,
        smtputf8: bool = True,
        pipelining: bool = False,
        hostname: str = "127.0.0.1",
        auth_mechanisms: tuple[str, ...] = ("LOGIN", "PLAIN"),
    ) -> None:
        self.mode = mode
        self.hostname = hostname  # the loopback address it listens on (::1 for IPv6)
        self.users = users or {}
        self.handler = handler or RecordingHandler()
        self.handler.pipelining = pipelining
        self.auth_attempts: list[tuple[str, bool]] = []
        self.auth_mechanisms_used: list[str] = []  # per attempt, the mechanism the client chose
        excluded = [m for m in ("LOGIN", "PLAIN") if m not in auth_mechanisms]
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8, "auth_exclude_mechanism": excluded}
        if self.users:
            kwargs.update(
                authenticator=self._authenticate,
                auth_required=True,
                auth_require_tls=(mode == "starttls"),  # implicit TLS is already encrypted
            )
        else:
            kwargs.update(auth_require_tls=False)
        if mode == "starttls":
            kwargs.update(tls_context=server_context, require_starttls=True)
        elif mode == "implicit":
            kwargs.update(ssl_context=server_context)
        self.controller = _Controller(
            self.handler,
            hostname=hostname,
            port=port,
            server_hostname="localhost",
            **kwargs,
        )

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode()
        ok = self.users.get(login) == auth_data.password.decode()
        self.auth_attempts.append((login, ok))
        self.auth_mechanisms_used.append(mechanism)
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    @property
    def host(self) -> str:
        return self.hostname

    @property
    def port(self) -> int:
        return self.controller.port

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def start(self) -> SmtpServer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


class _Controller(Controller):
    """aiosmtpd's Controller that may listen on port 0: the system picks a free port when the
    server binds, read back here. (Picking a free port first and binding it later let another
    process take it in between: EADDRINUSE under load.)"""

    def _trigger_server(self) -> None:
        # Called by start() once the server listens, before anything connects to self.port.
        if self.port == 0:
            assert self.server is not None
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()

"""Fault-injecting SMTP servers: real aiosmtpd sessions on loopback that hang up, stall, refuse or
time out at a chosen point, and record what they actually accepted.

    server = FaultyServer(users={...}, server_context=server_tls).start()
    server.fault("content", "close")                   # take the message, hang up before replying
    server.fault("mail", "421 4.3.2 Shutting down")    # a 421 reply also closes the connection
    server.fault("connect", "close", every=5)          # drop one connection in five
    server.idle_timeout(0.3, reply="421 4.4.2 idle timeout")
    server.time_out_idle(reply="421 4.4.2 idle timeout")  # now, for the connections open

Faults can be set, changed and cleared while the server runs; each applies from the next time its
stage is reached. A stage is "connect" (instead of the greeting), "content" (after the message
content, before the final reply) or a command verb in lower case ("ehlo", "starttls", "auth",
"mail", "rcpt", "data", "noop", "rset", "quit"), where the fault replaces the command's reply.
An action is "close" (hang up without a reply; at "connect": right after the greeting), "stall"
(say nothing for `seconds`, then hang up), "delay" (wait `seconds`, then go on normally) or a
reply line such as "451 4.3.0 Try later" (after a 421 the server hangs up, as RFC 5321 says; at
"connect" it always does; `then` overrides: "close", "stall").

What the server did is recorded: `messages` (answered 250), `unanswered` (content read, no reply
given), `refused` (content read and refused), `commands` ((connection number, verb) pairs),
`connections`, `active`, `max_active` and `fired` faults. `per_client_limit` makes it answer a
connection beyond that many at once "421 4.7.0 ... too many connections" and hang up, as Postfix
does past smtpd_client_connection_count_limit (`turned_away` counts them). A "data" fault whose
reply starts with 354 (and has no `then`) reads the content up to the final dot and answers 554,
as a server does that took DATA with no recipient (the content is kept in `after_354`). The
Controller's own start-up probe connection is neither counted nor faulted. A server that offers
no STARTTLS is `FaultyServer(mode="plain", ...)`; one with a certificate the client must refuse
takes `server_context=bad_tls_context(kind, ca)`. `FaultyServers` starts and stops them for a
fixture.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aiosmtpd.smtp import SMTP, LoginPassword

from tests.smtpd import Received, RecordingHandler, SmtpServer

STAGES = frozenset(
    {"connect", "content", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "noop", "rset",
     "quit"}
)
_DEFAULT_SECONDS = {"stall": 30.0, "delay": 0.2}


@dataclass
class Fault:
    """One planned misbehaviour; `every` picks connections (number % every == 0), `times`
    limits how often it fires (None: always)."""

    action: str
    every: int = 1
    times: int | None = None
    seconds: float = 0.0
    then: str | None = None

    def after_reply(self, text: str) -> str | None:
        """What follows a fault's reply: "close", "stall" or nothing."""
        if self.then is not None:
            return self.then
        return "close" if text.startswith("421") else None


def _received(session: Any, envelope: Any) -> Received:
    auth = getattr(session, "auth_data", None)
    return Received(
        envelope.mail_from,
        list(envelope.rcpt_tos),
        envelope.original_content or envelope.content,
        auth.login.decode() if isinstance(auth, LoginPassword) else None,
        session.ssl is not None,
        list(envelope.mail_options),
    )


@dataclass
class FaultHandler(RecordingHandler):
    """RecordingHandler (bad* -> 550, later* -> 451 at RCPT) plus the "content" stage."""

    unanswered: list[Received] = field(default_factory=list)
    refused: list[Received] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        fault = server.take("content") if isinstance(server, FaultySMTP) else None
        if fault is None or fault.action == "delay":
            if fault is not None:
                await asyncio.sleep(fault.seconds)
            return await super().handle_DATA(server, session, envelope)
        got = _received(session, envelope)
        if fault.action in ("close", "stall"):
            with self.lock:
                self.unanswered.append(got)
            await server.perform(fault)  # hangs up: never returns
        with self.lock:
            self.refused.append(got)
        if fault.after_reply(fault.action):
            await server.reply(fault, fault.action)  # hangs up after the reply
        return fault.action


class FaultySMTP(SMTP):
    """One server-side session that consults its FaultyServer before every step."""

    def __init__(self, owner: FaultyServer, conn_no: int, handler: Any, **kwargs: Any) -> None:
        self.owner = owner
        self.conn_no = conn_no  # 0: the Controller's start-up probe, never faulted
        self._gone = False
        super().__init__(handler, **kwargs)
        self._smtp_methods = {
            verb: self._command(verb, method) for verb, method in self._smtp_methods.items()
        }

    def take(self, stage: str) -> Fault | None:
        """The fault planned for this stage of this connection, if any (and count it)."""
        return self.owner.take(stage, self.conn_no)

    def _command(self, verb: str, method: Callable[[str | None], Any]) -> Any:
        async def run(arg: str | None) -> None:
            self.owner.note(self.conn_no, verb)
            fault = self.take(verb.lower())
            text = None if fault is None else await self.perform(fault)
            if text is None:
                await method(arg)
            elif verb == "DATA" and text.startswith("354") and fault.then is None:
                await self._empty_transaction(text)
            else:
                await self.reply(fault, text)

        return run

    async def _empty_transaction(self, text: str) -> None:
        """DATA answered 354 whatever the recipients: read the content up to the final dot,
        keep it in `owner.after_354`, answer as a server with no recipient would."""
        await self.push(text)
        lines = []
        while True:
            line = await self._reader.readline()
            if not line or line == b".\r\n":
                break
            lines.append(line)
        with self.owner._lock:
            self.owner.after_354.append(b"".join(lines))
        await self.push("554 5.5.1 Error: no valid recipients")

    async def perform(self, fault: Fault) -> str | None:
        """Carry out a fault: None means go on normally, else the reply to give instead."""
        if fault.action == "delay":
            await asyncio.sleep(fault.seconds)
            return None
        if fault.action == "close":
            await self.hang_up()
        if fault.action == "stall":
            await asyncio.sleep(fault.seconds)
            await self.hang_up()
        return fault.action

    async def reply(self, fault: Fault, text: str) -> None:
        """Send a fault's reply, then hang up or stall when the fault says so."""
        await self.push(text)
        after = fault.after_reply(text)
        if after is not None:
            await self.perform(Fault(after, seconds=fault.seconds))

    async def hang_up(self) -> NoReturn:
        """Close the connection and end this session's task (as a lost connection does)."""
        self._close()
        raise asyncio.CancelledError

    def _close(self) -> None:
        # After STARTTLS, closing the TLS transport sends close_notify and then waits (up to
        # 30 s) for the client's; an idle client never answers. Close the TCP socket as well,
        # as a real server does.
        if self.transport is not None:
            self.transport.close()
        if self._original_transport is not None:
            self._original_transport.close()

    async def _handle_client(self) -> None:
        limit = self.owner.per_client_limit
        if self.conn_no and limit is not None and self.owner.active > limit:
            with self.owner._lock:
                self.owner.turned_away += 1
            # Postfix's answer past smtpd_client_connection_count_limit
            await self.push(f"421 4.7.0 {self.hostname} Error: too many connections from "
                            f"{self.session.peer[0]}")
            self._close()
            return
        fault = self.take("connect")
        if fault is not None:
            try:
                await self._greet(fault)
            except asyncio.CancelledError:  # the client left while the server stalled
                self._close()
                raise
        await super()._handle_client()

    async def _greet(self, fault: Fault) -> None:
        if fault.action == "close":
            await self.push(f"220 {self.hostname} ESMTP")
            await self.hang_up()
        text = await self.perform(fault)
        if text is not None:
            await self.reply(Fault(text, then=fault.then or "close", seconds=fault.seconds), text)

    def _reset_timeout(self, duration: float | None = None) -> None:
        super()._reset_timeout(duration or self.owner.idle_seconds or None)

    def _timeout_cb(self) -> None:
        self.owner.note(self.conn_no, "IDLE-TIMEOUT")
        if self.owner.idle_reply and self.transport is not None:
            self.transport.write(self.owner.idle_reply.encode() + b"\r\n")
        self._close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.owner.opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if not self._gone:
            self._gone = True
            self.owner.closed(self)


class FaultyServer(SmtpServer):
    """An aiosmtpd server in a thread (see SmtpServer) whose sessions misbehave on request."""

    def __init__(self, *, handler: FaultHandler | None = None, **kwargs: Any) -> None:
        super().__init__(handler=handler or FaultHandler(), **kwargs)
        self.controller.factory = self._session  # per connection, instead of a plain SMTP
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}
        self._armed = False
        self._numbered = 0
        self._live: set[FaultySMTP] = set()
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.commands: list[tuple[int, str]] = []
        self.fired: list[tuple[int, str, str]] = []
        self.idle_seconds: float | None = None
        self.idle_reply: str | None = None
        # At most this many connections at once; one more is answered 421 and closed.
        self.per_client_limit: int | None = None
        self.turned_away = 0  # connections refused for being one too many
        self.after_354: list[bytes] = []  # content after a faked 354 (an empty transaction)

    # -- what tests call ---------------------------------------------------------------------

    def fault(
        self,
        stage: str,
        action: str,
        *,
        every: int = 1,
        times: int | None = None,
        seconds: float | None = None,
        then: str | None = None,
    ) -> FaultyServer:
        """Plan a fault for a stage (replacing the stage's previous one)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        if seconds is None:
            seconds = _DEFAULT_SECONDS.get(action, _DEFAULT_SECONDS["stall"])
        with self._lock:
            self._faults[stage] = Fault(action, every, times, seconds, then)
        return self

    def clear(self, stage: str | None = None) -> None:
        """Remove one stage's fault, or all of them."""
        with self._lock:
            if stage is None:
                self._faults.clear()
            else:
                self._faults.pop(stage, None)

    def idle_timeout(self, seconds: float | None, reply: str | None = None) -> None:
        """Close connections idle for `seconds` (from the next command on), after sending
        `reply` when given; None restores aiosmtpd's 300 s."""
        self.idle_seconds = seconds
        self.idle_reply = reply

    def time_out_idle(self, reply: str | None = None) -> None:
        """Do now what an idle timeout does to every open connection: send `reply` (when
        given), then hang up. A test that needs the server to drop an idle connection calls
        this once the connection is idle, instead of arming a short timer that a loaded machine
        can also trip between two commands of a transaction."""
        with self._lock:
            live = list(self._live)
            self.idle_reply = reply
        for session in live:
            self.controller.loop.call_soon_threadsafe(session._timeout_cb)

    @property
    def unanswered(self) -> list[Received]:
        """Messages whose content was read but that got no reply (close/stall at "content")."""
        return self.handler.unanswered

    @property
    def refused(self) -> list[Received]:
        """Messages whose content was read and refused by a "content" fault's reply."""
        return self.handler.refused

    def count(self, verb: str) -> int:
        """How many times clients sent this command (upper case verb)."""
        with self._lock:
            return sum(1 for _, v in self.commands if v == verb)

    def verbs(self, conn_no: int) -> list[str]:
        """The commands of one connection, in order."""
        with self._lock:
            return [v for n, v in self.commands if n == conn_no]

    def wait_until(self, condition: Callable[[], bool], timeout: float = 3.0) -> bool:
        """Poll until the condition holds (the server runs in another thread)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def start(self) -> FaultyServer:
        """Start, then arm the faults (the Controller's probe connection is not faulted)."""
        super().start()
        with self._lock:
            self._armed = True
        return self

    def stop(self) -> None:
        """Stop once clients have hung up; close what is left so no transport leaks."""
        if not self.wait_until(lambda: self.active == 0, timeout=2.0):
            with self._lock:
                live = list(self._live)
            for session in live:
                self.controller.loop.call_soon_threadsafe(session._close)
            self.wait_until(lambda: self.active == 0, timeout=2.0)
        super().stop()

    # -- called by sessions (in the server's thread) -----------------------------------------

    def _session(self) -> FaultySMTP:
        with self._lock:
            number = 0
            if self._armed:
                self._numbered += 1
                number = self._numbered
        return FaultySMTP(self, number, self.handler, **self.controller.SMTP_kwargs)

    def take(self, stage: str, conn_no: int) -> Fault | None:
        """The fault for this stage and connection, counting it down."""
        with self._lock:
            fault = self._faults.get(stage)
            if not conn_no or fault is None or conn_no % fault.every:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[stage]
            self.fired.append((conn_no, stage, fault.action))
            return fault

    def note(self, conn_no: int, verb: str) -> None:
        """Record a command (or an idle timeout) of a connection."""
        if conn_no:
            with self._lock:
                self.commands.append((conn_no, verb))

    def opened(self, session: FaultySMTP) -> None:
        """Count a client connection."""
        if session.conn_no:
            with self._lock:
                self._live.add(session)
                self.connections += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)

    def closed(self, session: FaultySMTP) -> None:
        """Count a connection gone."""
        if session.conn_no:
            with self._lock:
                self._live.discard(session)
                self.active -= 1


class FaultyServers:
    """Starts FaultyServers for one test and stops them all at its end (a fixture's body)."""

    def __init__(self, server_tls: ssl.SSLContext, users: dict[str, str]) -> None:
        self.server_tls = server_tls
        self.users = users
        self.started: list[FaultyServer] = []
        self.pipelining = False  # the default for the servers made from now on

    def __call__(self, mode: str = "starttls", **kwargs: Any) -> FaultyServer:
        kwargs.setdefault("users", self.users)
        kwargs.setdefault("server_context", self.server_tls)
        kwargs.setdefault("pipelining", self.pipelining)
        server = FaultyServer(mode=mode, **kwargs).start()
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        """Stop every server this made."""
        for server in self.started:
            server.stop()


def bad_tls_context(kind: str, ca: Any) -> ssl.SSLContext:
    """A server context whose certificate a client trusting only `ca` must refuse:
    "self-signed" (for localhost, signed by itself), "unknown-ca" (for localhost, from a CA the
    client does not know) or "wrong-host" (from `ca`, but for another name)."""
    import trustme

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if kind == "unknown-ca":
        trustme.CA().issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    elif kind == "wrong-host":
        ca.issue_cert("mail.other.example").configure_cert(ctx)
    elif kind == "self-signed":
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "self-signed.pem")
            with open(path, "wb") as handle:
                handle.write(_self_signed_pem("localhost"))
            ctx.load_cert_chain(path)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return ctx


def _self_signed_pem(name: str) -> bytes:
    """Key and certificate (PEM) for `name` and 127.0.0.1, issued by the certificate itself."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


class ScriptedServer:
    """A TCP server on loopback that runs `script(sock)` for each connection, in a thread of its
    own: for behaviour no SMTP library produces on purpose (an endless greeting, continuation
    lines trickled for ever). `connections` counts them; stop() closes every socket."""

    def __init__(self, script: Callable[[Any], None]) -> None:
        import socket

        self.script = script
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._open: list[Any] = []
        self.connections = 0
        self.mode = "plain"  # what conftest.settings_body asks
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def stopping(self) -> bool:
        """True once stop() was called: scripts that loop check it."""
        return self._stop.is_set()

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._open.append(sock)
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: Any) -> None:
        try:
            self.script(sock)
        except OSError:  # the client hung up: that is what these servers are for
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for sock in self._open:
            sock.close()

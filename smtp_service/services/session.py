"""One SMTP transaction on an open connection: MAIL, RCPT, DATA and the content.

With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one write; a refused transaction
ends with RSET (RFC 5321 4.1.1.5) so the connection can carry the next one; the content is sent
with its line ends made CRLF and leading dots doubled (RFC 5321 4.5.2). A failure is a
SendFailed (nothing delivered, or perhaps delivered once the final dot had gone out:
`uncertain`), or a StaleConnection when a reused connection was dead before any content went
out (nothing can have been delivered: the caller may try a fresh connection).

Which connection carries a message, and when one is retired, is the pool's business (pool.py).
"""

from __future__ import annotations

import base64
import binascii
import email
import email.generator
import email.policy
import io
import smtplib
import time
from dataclasses import dataclass

from smtp_service.services.transport import (
    BoundedSMTP,
    SmtpEndpoint,
    TransportError,
    close_quietly,
    describe_failure,
)


@dataclass(frozen=True)
class Envelope:
    """What goes over the wire: MAIL FROM, RCPT TO and the message bytes.

    Addresses are already checked (no CR, LF or angle brackets); `mail_from` may be "" for the
    null reverse-path. `smtputf8` is true when an address is not ASCII (RFC 6531)."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool = False


@dataclass(frozen=True)
class Delivery:
    """The server took the message for `accepted`; `refused` maps address -> (code, reply)."""

    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]]
    reply: str
    duration_ms: float


class SendFailed(Exception):
    """Nothing was delivered. Either the server refused (code/reply, or per-recipient `refused`)
    or the connection failed (`transport`). `uncertain` is true when the whole content, final
    dot included, had been sent before the failure, so the server may still deliver it; a
    failure before the final dot left is certain (without it the server takes nothing, RFC 5321
    section 4.1.1.4)."""

    def __init__(
        self,
        phase: str,
        code: int | None = None,
        reply: str | None = None,
        refused: dict[str, tuple[int, str]] | None = None,
        transport: TransportError | None = None,
        uncertain: bool = False,
    ) -> None:
        super().__init__(transport.text if transport else f"{phase}: {code} {reply}")
        self.phase = phase
        self.code = code
        self.reply = reply
        self.refused = refused or {}
        self.transport = transport
        self.uncertain = uncertain


class StaleConnection(Exception):
    """A reused connection was dead before any content went out: nothing can have been
    delivered, so the message may be sent again on a fresh connection."""


def wire_data(data: bytes) -> bytes:
    """The message as DATA sends it (RFC 5321 4.5.2): every line end (CRLF, lone CR, lone LF)
    made CRLF, a dot at the start of a line doubled, ended by CRLF.CRLF.

    bytes -> bytes, never raises. The same bytes as two regular-expression substitutions, from
    plain bytes.replace passes: several times faster on a message of megabytes."""
    q = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    q = q.replace(b"\r\n.", b"\r\n..")
    head = b"." if q[:1] == b"." else b""
    tail = b".\r\n" if q.endswith(b"\r\n") else b"\r\n.\r\n"
    return b"".join((head, q, tail))


# Re-serialising a parsed message: headers written as they came (no refolding, so nothing but
# the re-encoded bodies changes), CRLF line ends.
_AS_PARSED = email.policy.SMTP.clone(max_line_length=None)
_UNENCODED = frozenset({"7bit", "8bit", "binary"})  # RFC 2045 section 6.1: identity encodings


def seven_bit(data: bytes) -> bytes:
    """The message with every body that holds 8-bit octets re-encoded in 7 bits, for a server
    without 8BITMIME (RFC 6152 section 3; RFC 2045 section 6): a text part as quoted-printable
    (it stays readable), any other part as base64, its Content-Transfer-Encoding changed to
    match. Headers, the MIME structure and 7-bit parts are left as they are. bytes -> bytes,
    never raises (a part that cannot be told apart is left alone)."""
    message = email.message_from_bytes(data, policy=_AS_PARSED)
    for part in message.walk():
        raw = part.get_payload()  # as on the wire: 8-bit octets read as surrogates
        if part.is_multipart() or not isinstance(raw, str) or raw.isascii():
            continue
        if part.get("Content-Transfer-Encoding", "7bit").strip().lower() not in _UNENCODED:
            continue  # 8-bit octets inside base64 or quoted-printable: not ours to mend
        body = part.get_payload(decode=True)  # the octets themselves
        if part.get_content_maintype() == "text":
            encoded = binascii.b2a_qp(body, istext=True).decode("ascii")
            cte = "quoted-printable"
        else:
            encoded = base64.encodebytes(body).decode("ascii")
            cte = "base64"
        if "Content-Transfer-Encoding" in part:
            part.replace_header("Content-Transfer-Encoding", cte)
        else:
            part["Content-Transfer-Encoding"] = cte
        part.set_payload(encoded)
    out = io.BytesIO()
    email.generator.BytesGenerator(out, policy=_AS_PARSED).flatten(message)
    return out.getvalue()


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


class Session:
    """An open, authenticated SMTP connection (from transport.connect) that carries one
    transaction at a time. `healthy` turns false when a failure, a 421 or a failed RSET means
    it must not carry another; whoever holds it then closes it.

    Every wait is bounded by the connection's timeouts (transport.Timeouts: the command timeout
    for each reply and write, the final-reply timeout for the reply to the final dot) and by
    `smtp.deadline`, which the holder sets for each operation."""

    def __init__(
        self, smtp: BoundedSMTP, endpoint: SmtpEndpoint, *, pipelining: bool = True
    ) -> None:
        self.smtp = smtp
        self.endpoint = endpoint  # for error texts (host:port, the password scrubbed)
        self.pipelining = pipelining  # used when the server offers it too
        self.healthy = True

    def check_alive(self) -> None:
        """NOOP (RFC 5321 4.1.1.9) on a connection that sat idle, before it carries a message.

        Raises StaleConnection when the server hung up or answers other than 250, SendFailed
        (phase "mail", `transport` set) on another failure such as a timeout (the command
        timeout, or the deadline); either way the session is no longer healthy."""
        try:
            code, _ = self.smtp.noop()
            if code != 250:
                raise smtplib.SMTPServerDisconnected(f"NOOP answered {code}")
        except Exception as exc:  # noqa: BLE001 - every failure here is the connection's
            self.healthy = False
            raise self._failure(exc, "mail", reused=True, content_sent=False) from None

    def transact(
        self, envelope: Envelope, *, reused: bool = False, started: float | None = None
    ) -> Delivery:
        """Send one envelope: MAIL FROM, RCPT TO for each recipient, DATA, the content.

        With PIPELINING offered and enabled, MAIL, the RCPTs and DATA go out in one write and
        their replies are read in order (RFC 2920); the content still waits for DATA's 354.
        Returns a Delivery (`refused` lists recipients refused while others were accepted;
        `duration_ms` counts from `started`, a time.perf_counter() value, default now).

        Raises SendFailed: a refusal (MAIL, every RCPT, DATA or the content refused; the
        connection stays healthy unless the reply was 421 or RSET failed, RFC 5321 4.1.1.5),
        a message that needs SMTPUTF8 on a server without it (nothing sent), or a connection
        failure or timeout (`transport`; `uncertain` only once the final dot had gone out).
        The reply to the final dot is awaited for the final-reply timeout (RFC 5321 4.5.3.2.6:
        content filters answer late), every other reply for the command timeout. When `reused` (the
        connection sat idle since it was opened or last used), a connection found closed before
        the content went out raises StaleConnection instead, as does a 421 at MAIL."""
        started = time.perf_counter() if started is None else started
        data = self._content(envelope)
        options = self._mail_options(envelope, data)
        pipelined = self.pipelining and self.smtp.has_extn("pipelining")
        phase, content_sent = "mail", False
        try:
            owed = self._mail(envelope, options, pipelined, reused)
            phase = "rcpt"
            accepted, refused = self._recipients(envelope, pipelined, owed)
            phase = "data"
            self._data(pipelined, accepted, refused)
            self.smtp.send_content(wire_data(data))
            content_sent = True  # the final dot has left: from here the server may have it
            code, reply = self.smtp.read_reply(self.smtp.timeouts.final_reply)
            if code != 250:  # the transaction is over either way; no RSET needed
                self.healthy = code != 421
                raise _refused_message(code, reply, accepted, refused)
        except (SendFailed, StaleConnection):
            raise
        except Exception as exc:  # noqa: BLE001 - every other failure is the connection's
            self.healthy = False
            raise self._failure(exc, phase, reused, content_sent) from None
        return Delivery(
            accepted=tuple(accepted),
            refused=refused,
            reply=f"{code} {_text(reply)}",
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def close(self) -> None:
        """QUIT (within transport.QUIT_SECONDS) and close; never raises."""
        close_quietly(self.smtp)

    def abort(self) -> None:
        """Close without QUIT, for a connection that failed (it has nothing more to say, and a
        QUIT could only wait); never raises."""
        close_quietly(self.smtp, polite=False)

    # -- the steps of a transaction ------------------------------------------------------------

    def _content(self, envelope: Envelope) -> bytes:
        """The message as this server may take it: 8-bit bodies re-encoded (seven_bit) for a
        server that does not offer 8BITMIME (RFC 6152 section 3: a client must not send 8-bit
        octets to one). An SMTPUTF8 message is left as it is: its headers are 8-bit anyway,
        and a server with SMTPUTF8 takes 8BITMIME too (RFC 6531 section 3.1)."""
        data = envelope.data
        if data.isascii() or envelope.smtputf8 or self.smtp.has_extn("8bitmime"):
            return data
        return seven_bit(data)

    def _mail_options(self, envelope: Envelope, data: bytes) -> list[str]:
        """MAIL FROM's parameters: SMTPUTF8 (RFC 6531), BODY=8BITMIME for 8-bit content (RFC
        6152 section 2), SIZE (RFC 1870). SendFailed (before anything is sent) when the message
        needs SMTPUTF8 and the server does not offer it."""
        smtp = self.smtp
        options: list[str] = []
        if envelope.smtputf8:
            if not smtp.has_extn("smtputf8"):
                raise SendFailed(
                    "mail",
                    transport=TransportError(
                        "protocol",
                        "Server does not support SMTPUTF8, which this message needs "
                        "(an address is not ASCII)",
                    ),
                )
            options += ["SMTPUTF8", "BODY=8BITMIME"]
        elif not data.isascii() and smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.does_esmtp and smtp.has_extn("size"):
            options.append(f"SIZE={len(data)}")
        return options

    def _mail(self, envelope: Envelope, options: list[str], pipelined: bool, reused: bool) -> int:
        """MAIL FROM, with the RCPTs and DATA behind it when pipelined; returns the number of
        replies sent for and not read yet (`owed`)."""
        smtp = self.smtp
        smtp.command_encoding = "utf-8" if envelope.smtputf8 else "ascii"
        extra = " " + " ".join(options) if options else ""
        owed = 0
        # Addresses are checked (no CR, LF or angle brackets), so they are written as they are:
        # smtplib.quoteaddr would parse each one again. "" gives the null reverse-path "<>".
        if pipelined:
            lines = [f"MAIL FROM:<{envelope.mail_from}>{extra}"]
            lines += [f"RCPT TO:<{rcpt}>" for rcpt in envelope.recipients]
            lines.append("DATA\r\n")
            smtp.send("\r\n".join(lines))
            code, reply = smtp.getreply()
            owed = len(envelope.recipients) + 1  # each RCPT's reply and DATA's
        else:
            smtp.putcmd("mail", f"FROM:<{envelope.mail_from}>{extra}")
            code, reply = smtp.getreply()
        if code == 421 and reused:
            raise smtplib.SMTPServerDisconnected("421 at MAIL")
        if code != 250:
            self._reset(code, owed)
            raise SendFailed("mail", code, _text(reply))
        return owed

    def _recipients(
        self, envelope: Envelope, pipelined: bool, owed: int
    ) -> tuple[list[str], dict[str, tuple[int, str]]]:
        """RCPT TO for each recipient (or its pipelined reply): (accepted, refused), refused
        mapping address -> (code, reply). SendFailed("rcpt") when none was accepted, or when
        the server answered 421: it is closing the session (RFC 5321 3.8), so the transaction
        is over, no further reply is read (in a pipelined batch the ones still owed would be
        read out of step) and the session is not used again; every recipient not refused
        otherwise, accepted ones included, is refused with that 421 (none gets the message)."""
        smtp = self.smtp
        accepted: list[str] = []
        refused: dict[str, tuple[int, str]] = {}
        for rcpt in envelope.recipients:
            if pipelined:
                code, reply = smtp.getreply()
                owed -= 1
            else:
                smtp.putcmd("rcpt", f"TO:<{rcpt}>")
                code, reply = smtp.getreply()
            if code == 421:
                self.healthy = False
                closing = (code, _text(reply))
                raise SendFailed(
                    "rcpt", refused={r: refused.get(r, closing) for r in envelope.recipients}
                )
            if code in (250, 251):
                accepted.append(rcpt)
            else:
                refused[rcpt] = (code, _text(reply))
        if not accepted:
            self._reset(0, owed)
            raise SendFailed("rcpt", refused=refused)
        return accepted, refused

    def _data(
        self, pipelined: bool, accepted: list[str], refused: dict[str, tuple[int, str]]
    ) -> None:
        """DATA (already sent when pipelined) and its 354; SendFailed("data") otherwise."""
        if not pipelined:
            self.smtp.putcmd("data")
        code, reply = self.smtp.getreply()
        if code != 354:
            self._reset(code)
            raise _refused_message(code, reply, accepted, refused)

    def _reset(self, code: int, owed: int = 0) -> None:
        """End a refused transaction with RSET (RFC 5321 4.1.1.5) so the connection can carry
        the next one; a 421 or a failed RSET marks it for closing (the refusal still stands).
        The `owed` replies of a pipelined batch are read first, and a 421 among them ends the
        reading. If DATA was answered 354 although every recipient was refused, the server
        waits for content: a lone dot ends that empty transaction (RFC 2920 section 3.1; with
        no recipient nothing is delivered) and the connection is kept."""
        if code == 421:
            self.healthy = False
            return
        try:
            for _ in range(owed):
                reply = self.smtp.getreply()[0]
                if reply == 354:
                    self.smtp.send(".\r\n")
                    reply = self.smtp.getreply()[0]
                if reply == 421:
                    self.healthy = False
                    return
            self.healthy = self.smtp.rset()[0] == 250
        except Exception:  # noqa: BLE001 - a broken connection is closed by its holder
            self.healthy = False

    def _failure(
        self, exc: BaseException, phase: str, reused: bool, content_sent: bool
    ) -> SendFailed | StaleConnection:
        error = describe_failure(exc, self.endpoint)
        if reused and not content_sent and error.kind == "closed":
            return StaleConnection(error.text)
        return SendFailed(phase, transport=error, uncertain=content_sent)


def _refused_message(
    code: int, reply: bytes | str, accepted: list[str], refused: dict[str, tuple[int, str]]
) -> SendFailed:
    """DATA or the content refused: every accepted recipient is refused with it."""
    text = _text(reply)
    everyone = {**refused, **{address: (code, text) for address in accepted}}
    return SendFailed("data", code, text, refused=everyone)

"""Session (one SMTP transaction on an open connection) against real aiosmtpd servers, without
a pool: pipelined and one command at a time (RFC 2920), RSET after a refusal (RFC 5321 4.1.1.5),
the content on the wire (RFC 5321 4.5.2), the NOOP check and the retry signal."""

from __future__ import annotations

import itertools
import re
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtp_service.services.netguard import HostGuard
from smtp_service.services.session import (
    Delivery,
    Envelope,
    SendFailed,
    Session,
    StaleConnection,
    wire_data,
)
from smtp_service.services.transport import Secret, SmtpEndpoint, Timeouts, connect
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.smtpd_faults import FaultyServer

# Every test here runs against servers without and with PIPELINING (RFC 2920).
pytestmark = pytest.mark.both_pipelining_modes

TIMEOUT = 1.0  # the SMTP timeout: connect and each read/write
# For a test that does not wait for a timeout: a loaded machine can take more than TIMEOUT to
# answer the greeting, STARTTLS or AUTH.
PATIENT = 30.0
GUARD = HostGuard(("127.0.0.1/32", "localhost"))
_serial = itertools.count(1)


@pytest.fixture
def open_session(servers):
    """Open sessions (STARTTLS + AUTH done); each is QUIT at the end, before the servers stop
    (asking for `servers` sets them up first, so they are torn down after)."""
    made: list[Session] = []

    def _open(server: FaultyServer, *, timeout: float = TIMEOUT, **kwargs) -> Session:
        endpoint = SmtpEndpoint("localhost", server.port, False, SMTP_USER, Secret(SMTP_PASSWORD))
        # Connected (greeting, STARTTLS, AUTH) with a patient timeout: a loaded machine can
        # take more than TIMEOUT for those; the session then works with `timeout`.
        conn = connect(endpoint, timeout=max(timeout, PATIENT), guard=GUARD)
        conn.timeouts = Timeouts.uniform(timeout)
        session = Session(conn, endpoint, **kwargs)
        made.append(session)
        return session

    yield _open
    for session in made:
        session.close()


def envelope(*to: str, data: bytes | None = None, mail_from: str = SMTP_USER,
             smtputf8: bool = False) -> Envelope:
    n = next(_serial)
    if data is None:
        data = f"Message-ID: <s{n}@session.test>\r\nSubject: n{n}\r\n\r\nbody\r\n".encode()
    return Envelope(mail_from, to or ("rcpt@example.net",), data, smtputf8)


# -- one transaction, and the next on the same connection -------------------------------------


def test_a_session_carries_one_transaction_after_another(open_session, server):
    session = open_session(server)
    for _ in range(2):
        delivery = session.transact(envelope("a@example.net", "b@example.net"))
        assert isinstance(delivery, Delivery)
        assert delivery.accepted == ("a@example.net", "b@example.net")
        assert delivery.refused == {} and delivery.reply.startswith("250")
        assert delivery.duration_ms >= 0
    assert session.healthy and server.connections == 1
    assert [m.rcpt_tos for m in server.messages] == [["a@example.net", "b@example.net"]] * 2
    assert server.handler.batched == [server.handler.pipelining] * 2


def test_pipelining_false_sends_one_command_at_a_time(open_session, servers):
    server = servers(pipelining=True)
    session = open_session(server, pipelining=False, timeout=PATIENT)
    assert session.smtp.has_extn("pipelining")  # offered, and not used
    delivery = session.transact(envelope("a@example.net", "b@example.net"))
    assert delivery.accepted == ("a@example.net", "b@example.net")
    assert server.handler.batched == [False]


def test_duration_counts_from_started(open_session, server):
    session = open_session(server)
    delivery = session.transact(envelope(), started=time.perf_counter() - 2.0)
    assert delivery.duration_ms >= 2000


# -- what goes over the wire ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "received"),
    [
        (b"Subject: x\r\n\r\n.one\r\n..two\r\nend\r\n",
         b"Subject: x\r\n\r\n.one\r\n..two\r\nend\r\n"),
        (b"Subject: x\n\n.one\rtwo\r\n.\nend", b"Subject: x\r\n\r\n.one\r\ntwo\r\n.\r\nend\r\n"),
        (b".starts with a dot\r\n", b".starts with a dot\r\n"),
        (b".", b".\r\n"),
    ],
    ids=["crlf", "lone-cr-and-lf-no-final-line-end", "leading-dot", "only-a-dot"],
)
def test_content_arrives_with_crlf_line_ends_and_its_dots(open_session, server, data, received):
    """The server removes the doubled dots again (RFC 5321 4.5.2): what it stores is the
    message with CRLF line ends, every dot where it was."""
    open_session(server).transact(envelope(data=data))
    assert server.messages[0].data == received


def test_the_null_reverse_path_is_sent_as_angle_brackets(open_session, server):
    open_session(server).transact(envelope(mail_from=""))
    assert server.messages[0].mail_from == "<>"  # aiosmtpd's name for the null path


def test_addresses_go_out_as_given(open_session, server):
    unusual = "o'brien+x{1}=y@sub.example.net"  # atext that a parser could mangle
    open_session(server).transact(envelope(unusual, mail_from="x.y-z@example.com"))
    assert server.messages[0].mail_from == "x.y-z@example.com"
    assert server.messages[0].rcpt_tos == [unusual]


def test_an_smtputf8_transaction(open_session, server):
    session = open_session(server)
    session.transact(envelope("jörg@example.net", mail_from="josé@example.com", smtputf8=True))
    assert server.messages[0].mail_from == "josé@example.com"
    assert server.messages[0].rcpt_tos == ["jörg@example.net"]


def test_smtputf8_needed_but_not_offered_sends_nothing(open_session, servers):
    server = servers(smtputf8=False)
    session = open_session(server)
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope("jörg@example.net", smtputf8=True))
    assert failure.value.transport.kind == "protocol" and failure.value.phase == "mail"
    assert server.count("MAIL") == 0 and session.healthy


# -- refusals: RSET, and the session stays usable -----------------------------------------------


def test_a_refused_sender_is_reset_and_the_session_carries_the_next(open_session, server):
    session = open_session(server)
    server.fault("mail", "550 5.7.1 Sender rejected", times=1)
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope())
    error = failure.value
    assert (error.phase, error.code, error.reply, error.transport) == (
        "mail", 550, "5.7.1 Sender rejected", None)
    assert session.healthy and server.count("RSET") == 1
    session.transact(envelope())
    assert server.connections == 1 and len(server.messages) == 1


def test_every_recipient_refused_is_reset_without_content(open_session, server):
    session = open_session(server)
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope("bad1@example.net", "later@example.net"))
    assert failure.value.phase == "rcpt"
    assert failure.value.refused == {
        "bad1@example.net": (550, "5.1.1 User unknown"),
        "later@example.net": (451, "4.7.1 Try again later"),
    }
    # Pipelined, DATA went out in the batch and was answered 503; its reply was read first.
    assert server.count("DATA") == int(server.handler.pipelining)
    assert session.healthy and server.count("RSET") == 1 and server.messages == []
    session.transact(envelope())
    assert server.verbs(1)[-4:-2] == ["RSET", "MAIL"] and len(server.messages) == 1


def test_some_recipients_refused_is_a_delivery(open_session, server):
    delivery = open_session(server).transact(envelope("bad@example.net", "ok@example.net"))
    assert delivery.accepted == ("ok@example.net",)
    assert delivery.refused == {"bad@example.net": (550, "5.1.1 User unknown")}
    assert server.count("RSET") == 0


@pytest.mark.parametrize(
    ("stage", "rset"), [("data", 1), ("content", 0)], ids=["at-data", "after-content"]
)
def test_a_refused_message_refuses_every_accepted_recipient(open_session, server, stage, rset):
    session = open_session(server)
    server.fault(stage, "554 5.7.1 No", times=1)
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope("a@example.net", "bad@example.net"))
    assert (failure.value.phase, failure.value.code) == ("data", 554)
    assert failure.value.refused == {
        "a@example.net": (554, "5.7.1 No"), "bad@example.net": (550, "5.1.1 User unknown")}
    assert session.healthy and server.count("RSET") == rset  # after the content: already over


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data", "content"])
def test_a_421_leaves_the_session_unhealthy(open_session, server, stage):
    session = open_session(server)
    server.fault(stage, "421 4.3.2 Shutting down", times=1)
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope())
    assert failure.value.transport is None and not failure.value.uncertain
    assert not session.healthy and server.count("RSET") == 0


def test_354_after_every_recipient_was_refused_gets_a_lone_dot_and_keeps_the_session(
    open_session, servers
):
    """Pipelined, DATA is sent before RCPT's replies are read; a server that answers it 354
    waits for content. A lone dot ends that transaction without recipients (RFC 2920 3.1:
    nothing is delivered) and the session carries the next message."""
    server = servers(pipelining=True)
    session = open_session(server)
    server.fault("data", "354 Go ahead", times=1)
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope("bad@example.net"))
    assert failure.value.phase == "rcpt"
    assert session.healthy and server.after_354 == [b""]  # the lone dot, no content
    assert server.messages == [] and server.unanswered == []
    session.transact(envelope())
    assert server.connections == 1 and len(server.messages) == 1
    assert server.verbs(1)[-5:-3] == ["DATA", "RSET"]


@pytest.mark.parametrize("position", [0, 1, 2], ids=["first", "middle", "last"])
def test_a_421_among_the_recipients_ends_the_session_in_step(open_session, server, position):
    """A 421 for one RCPT (the server is closing) ends the transaction there: no reply after it
    is read (pipelined, those of the other RCPTs and DATA would be read out of step, and an
    accepted recipient reported refused by a reply that was not its own), no content is
    sent, and every recipient, accepted ones included, is reported with the 421. The server
    here keeps answering after its 421, as some do."""
    names = ["a@example.net", "b@example.net", "c@example.net"]
    local = names[position].split("@")[0]
    server.handler.rcpt_replies[local] = "421 4.7.0 Too many errors, closing"
    session = open_session(server)
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope(*names))
    error = failure.value
    assert error.phase == "rcpt" and error.transport is None and not error.uncertain
    assert error.refused == dict.fromkeys(names, (421, "4.7.0 Too many errors, closing"))
    assert not session.healthy
    assert server.messages == [] and server.unanswered == [] and server.after_354 == []
    assert "RSET" not in server.verbs(1)


# -- the connection fails: SendFailed, or StaleConnection before content on a reused one --------


@pytest.mark.parametrize("reused", [False, True], ids=["fresh", "reused"])
def test_closed_before_the_content(open_session, server, reused):
    session = open_session(server)
    server.fault("mail", "close", times=1)
    if reused:
        with pytest.raises(StaleConnection):
            session.transact(envelope(), reused=True)
    else:
        with pytest.raises(SendFailed) as failure:
            session.transact(envelope())
        assert failure.value.transport.kind == "closed" and not failure.value.uncertain
    assert not session.healthy and server.messages == [] and server.unanswered == []


@pytest.mark.parametrize("reused", [False, True], ids=["fresh", "reused"])
def test_421_at_mail_is_stale_only_on_a_reused_connection(open_session, server, reused):
    session = open_session(server)
    server.fault("mail", "421 4.3.2 Shutting down", times=1)
    expected = StaleConnection if reused else SendFailed
    with pytest.raises(expected):
        session.transact(envelope(), reused=reused)
    assert not session.healthy


@pytest.mark.parametrize("reused", [False, True], ids=["fresh", "reused"])
def test_closed_after_the_content_is_uncertain_never_stale(open_session, server, reused):
    session = open_session(server)
    server.fault("content", "close", times=1)
    env = envelope()
    with pytest.raises(SendFailed) as failure:
        session.transact(env, reused=reused)
    error = failure.value
    assert error.uncertain and error.phase == "data" and error.transport.kind == "closed"
    assert not session.healthy and len(server.unanswered) == 1


@pytest.mark.parametrize(
    ("then", "kind"), [("close", "closed"), ("stall", "timeout")], ids=["hangs-up", "stops-reading"]
)
def test_a_failure_before_the_final_dot_left_is_certain(open_session, server, then, kind):
    """DATA answered 354, then the server hangs up, or stops reading so that the writes time
    out, while 24 MB of content are on their way: the final dot never left, so the server can
    have taken nothing (RFC 5321 4.1.1.4) and the failure is not "uncertain"."""
    session = open_session(server)
    server.fault("data", "354 End data with <CR><LF>.<CR><LF>", times=1, then=then, seconds=5)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 24_000
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope(data=big))
    error = failure.value
    assert error.phase == "data" and error.transport.kind == kind
    assert error.uncertain is False
    assert not session.healthy and server.messages == [] and server.unanswered == []


def test_a_stalled_final_reply_times_out_uncertain(open_session, server):
    session = open_session(server)
    server.fault("content", "stall", times=1)
    with pytest.raises(SendFailed) as failure:
        session.transact(envelope(), reused=True)
    assert failure.value.uncertain and failure.value.transport.kind == "timeout"
    assert not session.healthy


# -- NOOP before reuse -----------------------------------------------------------------------------


def test_check_alive_on_a_live_connection(open_session, server):
    session = open_session(server)
    session.check_alive()
    assert session.healthy and server.count("NOOP") == 1


@pytest.mark.parametrize("reply", [None, "421 4.4.2 idle timeout"], ids=["silent", "421"])
def test_check_alive_on_a_connection_the_server_dropped(open_session, server, reply):
    session = open_session(server)
    server.idle_timeout(0.3, reply)
    session.transact(envelope())  # the idle timer starts again from this command
    assert server.wait_until(lambda: server.active == 0)
    with pytest.raises(StaleConnection):
        session.check_alive()
    assert not session.healthy


def test_check_alive_refused_is_stale(open_session, server):
    session = open_session(server)
    server.fault("noop", "454 4.7.0 Not now", times=1)
    with pytest.raises(StaleConnection):
        session.check_alive()
    assert not session.healthy


def test_check_alive_timing_out_is_a_failure_not_a_retry(open_session, server):
    session = open_session(server)
    server.fault("noop", "stall", times=1, seconds=5)
    with pytest.raises(SendFailed) as failure:
        session.check_alive()
    assert failure.value.phase == "mail" and failure.value.transport.kind == "timeout"
    assert not session.healthy


# -- wire_data: the same bytes as the regular expressions it replaced ---------------------------

_CRLF = re.compile(rb"\r\n|\r(?!\n)|\n")
_DOT = re.compile(rb"(?m)^\.")


def _wire_data_by_regex(data: bytes) -> bytes:
    """The former implementation, kept as the reference."""
    q = _DOT.sub(b"..", _CRLF.sub(b"\r\n", data))
    if not q.endswith(b"\r\n"):
        q += b"\r\n"
    return q + b".\r\n"


# Pieces that make every case likely: lone CR, lone LF, CRLF, CR before CRLF, dots at the start.
_PIECES = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\r\n", b"\n\r", b".", b"..", b"a", b" "])


@settings(max_examples=1000, database=None, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.lists(_PIECES, max_size=40).map(b"".join)))
@example(b"")
@example(b".")
@example(b"\r")
@example(b"\n.")
@example(b"\r.\r\n.")
@example(b"a\r\n")
def test_wire_data_equals_the_regex_version(data):
    assert wire_data(data) == _wire_data_by_regex(data)

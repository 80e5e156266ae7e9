"""TransportPool against real aiosmtpd servers (STARTTLS + AUTH): reuse, limits, retirement,
faults, and proof from the server's side that nothing is delivered twice."""

from __future__ import annotations

import functools
import itertools
import threading
import time

import pytest

from smtp_service.services.errors import SmtpPoolBusy
from smtp_service.services.netguard import HostGuard
from smtp_service.services.pool import Delivery, Envelope, SendFailed, TransportPool
from smtp_service.services.transport import Secret, SmtpEndpoint, connect
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.smtpd_faults import FaultyServer

# Every test here runs against servers without and with PIPELINING (RFC 2920).
pytestmark = pytest.mark.both_pipelining_modes

TIMEOUT = 1.0  # the pool's SMTP timeout: connect and each read/write
GUARD = HostGuard(("127.0.0.1/32", "localhost"))
KEY = "acct-a"  # the account the pool keeps connections for
_serial = itertools.count(1)


@pytest.fixture
def pools(servers):
    """Make pools; at the end each QUITs its connections (before the servers stop)."""
    made: list[TransportPool] = []

    def _make(**kwargs) -> TransportPool:
        kwargs.setdefault("acquire_timeout", 5.0)
        timeout = kwargs.pop("timeout", TIMEOUT)
        pool = TransportPool(functools.partial(connect, timeout=timeout, guard=GUARD), **kwargs)
        made.append(pool)
        return pool

    yield _make
    for pool in made:
        closer = threading.Thread(target=pool.close_all, daemon=True)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close_all() is blocked: the pool's lock is held forever"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def endpoint(server: FaultyServer) -> SmtpEndpoint:
    return SmtpEndpoint("localhost", server.port, False, SMTP_USER, Secret(SMTP_PASSWORD))


def envelope(*to: str, smtputf8: bool = False) -> Envelope:
    """A message with a unique Message-ID, so the server's records show duplicates."""
    n = next(_serial)
    data = f"Message-ID: <m{n}@pool.test>\r\nSubject: n{n}\r\n\r\n.leading dot\r\nbody\r\n"
    return Envelope(SMTP_USER, to or ("rcpt@example.net",), data.encode(), smtputf8)


def mid(env: Envelope) -> str:
    return env.data.split(b"\r\n", 1)[0].split(b": ", 1)[1].decode()


def ids(received) -> list[str]:
    return [r.message["Message-ID"] for r in received]


def assert_no_duplicates(server: FaultyServer) -> None:
    everything = ids(server.messages) + ids(server.unanswered)
    assert len(everything) == len(set(everything)), everything


def run_in_thread(fn):
    """Start fn in a thread; the returned dict gets "result" (value or exception)."""
    out: dict = {}

    def _run():
        try:
            out["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["result"] = exc

    thread = threading.Thread(target=_run, daemon=True)
    thread.start()
    out["thread"] = thread
    return out


# -- reuse and limits --------------------------------------------------------------------------


def test_sequential_sends_share_one_authenticated_connection(pools, server):
    pool = pools()
    sent = [envelope() for _ in range(5)]
    for env in sent:
        delivery = pool.send(KEY, endpoint(server), env)
        assert delivery.accepted == ("rcpt@example.net",) and delivery.refused == {}
        assert delivery.reply.startswith("250")
    assert server.connections == 1
    assert server.auth_attempts == [(SMTP_USER, True)]
    assert ids(server.messages) == [mid(e) for e in sent]
    assert all(m.tls and m.auth_login == SMTP_USER for m in server.messages)
    assert server.messages[0].data.endswith(b"\r\n.leading dot\r\nbody\r\n")  # dot unstuffed
    stats = pool.stats()
    assert (stats["opened"], stats["reused"], stats["open"], stats["idle"]) == (1, 4, 1, 1)


def test_size_limits_concurrent_connections_under_threads(pools, server):
    server.fault("content", "delay", seconds=0.05)  # keep sends in flight together
    pool = pools(size=3)
    barrier = threading.Barrier(16)
    sent: list[Envelope] = []
    outcomes: list[object] = []

    def work() -> None:
        env = envelope()
        sent.append(env)
        barrier.wait()
        try:
            outcomes.append(pool.send(KEY, endpoint(server), env))
        except Exception as exc:  # noqa: BLE001
            outcomes.append(exc)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(o, Delivery) for o in outcomes) and len(outcomes) == 16, outcomes
    assert server.max_active <= 3 and server.connections <= 3
    assert server.connections >= 2  # it did run in parallel
    assert sorted(ids(server.messages)) == sorted(mid(e) for e in sent)
    assert_no_duplicates(server)
    assert pool.stats()["open"] <= 3


def test_size_zero_opens_a_fresh_connection_per_send(pools, server):
    pool = pools(size=0)
    for _ in range(3):
        pool.send(KEY, endpoint(server), envelope())
    assert server.wait_until(lambda: server.active == 0)
    assert server.connections == 3 and len(server.messages) == 3
    assert [server.verbs(n).count("MAIL") for n in (1, 2, 3)] == [1, 1, 1]
    assert [server.verbs(n)[-1] for n in (1, 2, 3)] == ["QUIT"] * 3
    assert pool.stats()["open"] == 0 and pool.stats()["keys"] == 0


def test_max_messages_retires_the_connection_and_a_replacement_waits(pools, server):
    pool = pools(max_messages=2)
    for _ in range(2):
        pool.send(KEY, endpoint(server), envelope())
    # The worn-out connection is QUIT and its replacement opened in the background.
    assert server.wait_until(lambda: server.connections == 2 and pool.stats()["idle"] == 1)
    assert server.verbs(1)[-1] == "QUIT" and server.verbs(1).count("MAIL") == 2
    for _ in range(2):  # through the replacement: no request opens a connection itself
        pool.send(KEY, endpoint(server), envelope())
    assert server.wait_until(lambda: server.connections == 3 and pool.stats()["idle"] == 1)
    assert [server.verbs(n).count("MAIL") for n in (1, 2, 3)] == [2, 2, 0]
    assert server.verbs(2)[-1] == "QUIT"
    assert pool.stats()["retired"] == 2 and pool.stats()["open"] == 1
    assert len(server.messages) == 4


def test_a_replacement_that_cannot_open_frees_its_place(pools, server):
    pool = pools(max_messages=1, size=1)
    server.fault("connect", "421 4.3.2 Too busy", every=2, times=1)  # the replacement's turn
    pool.send(KEY, endpoint(server), envelope())
    assert server.wait_until(lambda: server.connections == 2 and pool.stats()["open"] == 0)
    pool.send(KEY, endpoint(server), envelope())  # opens one itself (size 1: the place is free)
    assert len(server.messages) == 2 and server.connections >= 3


def test_idle_connection_is_retired_by_the_clock(pools, server):
    clock = Clock()
    pool = pools(idle_seconds=10, max_lifetime=1000, noop_after=1000, clock=clock)
    pool.send(KEY, endpoint(server), envelope())
    clock.advance(9.9)
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 1
    clock.advance(10)
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 2
    assert server.wait_until(lambda: server.active == 1)
    assert server.verbs(1)[-1] == "QUIT" and pool.stats()["retired"] == 1


def test_max_lifetime_retires_a_busy_connection(pools, server):
    clock = Clock()
    pool = pools(idle_seconds=100, max_lifetime=30, noop_after=1000, clock=clock)
    for step in (0, 10, 10, 9.9):  # used often, so never idle, until it is 30 s old
        clock.advance(step)
        pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 1
    clock.advance(0.1)
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 2
    assert server.verbs(1).count("MAIL") == 4


def test_noop_checks_a_connection_idle_longer_than_noop_after(pools, server):
    clock = Clock()
    pool = pools(noop_after=5, clock=clock)
    pool.send(KEY, endpoint(server), envelope())
    clock.advance(4.9)
    pool.send(KEY, endpoint(server), envelope())
    assert server.count("NOOP") == 0
    clock.advance(5)
    pool.send(KEY, endpoint(server), envelope())
    assert server.count("NOOP") == 1
    verbs = server.verbs(1)
    assert verbs[verbs.index("NOOP") + 1] == "MAIL"
    assert server.connections == 1


# -- keys: forget, new settings, LRU ---------------------------------------------------------


def test_forget_closes_only_that_accounts_connections(pools, server):
    pool = pools()
    for account in ("acct-a", "acct-ab", "acct-b"):  # acct-ab starts like acct-a
        pool.send(account, endpoint(server), envelope())
    pool.forget("acct-a")
    assert server.wait_until(lambda: server.active == 2)
    assert server.verbs(1)[-1] == "QUIT"
    assert "QUIT" not in server.verbs(2) + server.verbs(3)
    assert pool.stats()["keys"] == 2
    pool.send("acct-ab", endpoint(server), envelope())
    pool.send("acct-b", endpoint(server), envelope())
    assert server.connections == 3
    pool.send("acct-a", endpoint(server), envelope())
    assert server.connections == 4


def test_a_new_endpoint_retires_the_accounts_old_key(pools, servers):
    old, new = servers(), servers()
    pool = pools()
    pool.send("acct-a", endpoint(old), envelope())
    pool.send("acct-a", endpoint(new), envelope())
    assert old.wait_until(lambda: old.active == 0)
    assert old.verbs(1)[-1] == "QUIT"
    assert pool.stats()["keys"] == 1
    pool.send("acct-a", endpoint(new), envelope())
    assert new.connections == 1 and len(new.messages) == 2 and len(old.messages) == 1


def test_a_changed_password_is_a_new_endpoint(pools, server):
    """The whole endpoint counts, password included: a connection authenticated with the old
    password is not reused, and is QUIT."""
    pool = pools()
    pool.send(KEY, endpoint(server), envelope())
    server.users = {SMTP_USER: "another-Pa55word"}
    changed = SmtpEndpoint("localhost", server.port, False, SMTP_USER, Secret("another-Pa55word"))
    pool.send(KEY, changed, envelope())
    assert server.wait_until(lambda: server.active == 1)
    assert server.connections == 2 and server.verbs(1)[-1] == "QUIT"
    assert server.auth_attempts == [(SMTP_USER, True), (SMTP_USER, True)]
    assert pool.stats()["keys"] == 1 and len(server.messages) == 2


def test_lru_eviction_beyond_max_accounts_quits_the_least_recently_used(pools, server):
    pool = pools(max_accounts=2)
    pool.send("acct-a", endpoint(server), envelope())  # connection 1
    pool.send("acct-b", endpoint(server), envelope())  # connection 2
    pool.send("acct-a", endpoint(server), envelope())  # a is now the most recent
    pool.send("acct-c", endpoint(server), envelope())  # connection 3 evicts b
    assert server.wait_until(lambda: server.active == 2)
    assert server.verbs(2)[-1] == "QUIT" and "QUIT" not in server.verbs(1)
    assert pool.stats()["keys"] == 2
    pool.send("acct-a", endpoint(server), envelope())
    assert server.connections == 3


# -- the server drops or refuses ---------------------------------------------------------------


@pytest.mark.parametrize("reply", [None, "421 4.4.2 idle timeout"], ids=["silent", "421"])
@pytest.mark.parametrize("noop_after", [0.0, 1000.0], ids=["noop", "no-noop"])
def test_connection_dropped_while_idle_is_replaced_once(pools, server, reply, noop_after):
    pool = pools(noop_after=noop_after)
    server.idle_timeout(0.3, reply)
    pool.send(KEY, endpoint(server), envelope())
    assert server.wait_until(lambda: server.active == 0)  # the server hung up the idle one
    server.idle_timeout(None)
    env = envelope()
    delivery = pool.send(KEY, endpoint(server), env)
    assert delivery.accepted == ("rcpt@example.net",)
    assert pool.stats()["retried"] == 1
    assert server.connections == 2
    assert ids(server.messages)[-1] == mid(env)
    assert len(server.messages) == 2
    assert_no_duplicates(server)


@pytest.mark.parametrize("reused", [False, True], ids=["fresh", "reused"])
def test_close_after_content_is_uncertain_and_never_resent(pools, server, reused):
    pool = pools()
    if reused:
        pool.send(KEY, endpoint(server), envelope())
    server.fault("content", "close", times=1)
    env = envelope()
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), env)
    error = failure.value
    assert error.uncertain is True and error.phase == "data"
    assert error.transport is not None and error.transport.kind == "closed"
    assert pool.stats()["retried"] == 0
    assert server.count("MAIL") == 1 + reused  # no second attempt
    assert ids(server.unanswered) == [mid(env)] and mid(env) not in ids(server.messages)
    pool.send(KEY, endpoint(server), envelope())  # the pool recovers on a new connection
    assert server.connections == 2
    assert_no_duplicates(server)


def test_stall_at_the_final_reply_times_out_uncertain(pools, server):
    pool = pools()
    pool.send(KEY, endpoint(server), envelope())
    server.fault("content", "stall", times=1)
    started = time.monotonic()
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), envelope())
    elapsed = time.monotonic() - started
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT * 2 + 0.5
    assert failure.value.uncertain is True and failure.value.transport.kind == "timeout"
    assert pool.stats()["retried"] == 0 and len(server.unanswered) == 1
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 2 and len(server.messages) == 2
    assert_no_duplicates(server)


@pytest.mark.parametrize(
    ("stage", "reply", "phase", "code"),
    [
        ("mail", "550 5.7.1 Sender rejected", "mail", 550),
        ("data", "452 4.3.1 Insufficient storage", "data", 452),
        ("content", "554 5.7.1 Rejected as spam", "data", 554),
    ],
)
def test_a_refused_message_leaves_the_connection_reusable(pools, server, stage, reply, phase,
                                                          code):
    pool = pools()
    server.fault(stage, reply, times=1)
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), envelope("a@example.net", "b@example.net"))
    error = failure.value
    assert (error.phase, error.code, error.transport, error.uncertain) == (phase, code, None,
                                                                           False)
    assert error.reply == reply.split(" ", 1)[1]
    if stage != "mail":  # refused after RCPT: every accepted recipient is refused with it
        assert error.refused == {
            "a@example.net": (code, error.reply), "b@example.net": (code, error.reply)}
    # RSET ends a transaction refused before the content; after the content it is over anyway
    assert server.count("RSET") == (0 if stage == "content" else 1)
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 1 and len(server.messages) == 1


def test_refused_recipients_leave_the_connection_reusable(pools, server):
    pool = pools()
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), envelope("bad-user@example.net"))
    assert failure.value.phase == "rcpt" and failure.value.transport is None
    assert failure.value.refused == {"bad-user@example.net": (550, "5.1.1 User unknown")}
    assert server.count("RSET") == 1
    partial = pool.send(KEY, endpoint(server), envelope("ok@example.net", "later-x@example.net"))
    assert partial.accepted == ("ok@example.net",)
    assert partial.refused == {"later-x@example.net": (451, "4.7.1 Try again later")}
    assert server.messages[-1].rcpt_tos == ["ok@example.net"]
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 1 and len(server.messages) == 2
    assert server.count("RSET") == 1


@pytest.mark.parametrize("stage", ["mail", "rcpt", "content"])
def test_421_retires_the_connection(pools, server, stage):
    pool = pools()
    server.fault(stage, "421 4.3.2 Service shutting down", times=1)  # and hangs up
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), envelope())
    error = failure.value
    assert error.transport is None and error.uncertain is False
    if stage == "rcpt":
        assert error.refused == {"rcpt@example.net": (421, "4.3.2 Service shutting down")}
    else:
        assert error.code == 421
    assert pool.stats()["open"] == 0 and pool.stats()["retired"] == 1
    assert pool.stats()["retried"] == 0
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 2 and len(server.messages) == 1


def test_421_at_mail_on_a_reused_connection_is_retried_on_a_fresh_one(pools, server):
    pool = pools(noop_after=1000)
    pool.send(KEY, endpoint(server), envelope())
    server.fault("mail", "421 4.3.2 Service shutting down", times=1)
    env = envelope()
    pool.send(KEY, endpoint(server), env)
    assert pool.stats()["retried"] == 1 and server.connections == 2
    assert ids(server.messages)[-1] == mid(env)
    assert_no_duplicates(server)


def test_smtputf8_needed_but_not_offered_is_a_protocol_failure(pools, servers):
    server = servers(smtputf8=False)
    pool = pools()
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), envelope("jörg@example.net", smtputf8=True))
    assert failure.value.transport is not None and failure.value.transport.kind == "protocol"
    assert "SMTPUTF8" in failure.value.transport.text
    assert server.count("MAIL") == 0
    pool.send(KEY, endpoint(server), envelope())  # nothing was started: the connection is fine
    assert server.connections == 1 and len(server.messages) == 1


def test_connect_failure_is_a_transport_error(pools, server):
    pool = pools()
    server.fault("connect", "554 5.3.2 No SMTP service here", times=1)
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), envelope())
    assert failure.value.phase == "connect" and failure.value.transport is not None
    assert pool.stats()["open"] == 0
    pool.send(KEY, endpoint(server), envelope())
    assert len(server.messages) == 1


# -- threads, forks and state -------------------------------------------------------------------


def test_acquire_timeout_when_every_connection_is_busy(pools, server):
    pool = pools(size=1, acquire_timeout=0.2)
    server.fault("content", "delay", seconds=0.7, times=1)  # below the 1 s SMTP timeout
    busy = run_in_thread(lambda: pool.send(KEY, endpoint(server), envelope()))
    assert server.wait_until(lambda: server.count("DATA") == 1)
    started = time.monotonic()
    with pytest.raises(SmtpPoolBusy) as failure:
        pool.send(KEY, endpoint(server), envelope())
    assert 0.2 <= time.monotonic() - started < 0.6
    assert failure.value.retry_after == 1  # seconds, at least one
    assert pool.stats()["busy"] == 1
    busy["thread"].join(5)
    assert isinstance(busy["result"], Delivery)
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 1 and len(server.messages) == 2


def test_retry_that_finds_the_slot_refilled_still_sends_once(pools, server):
    """A reused connection fails its NOOP (and is closed without a QUIT: the server stalls);
    another sender may take the free slot and leave its connection idle. The retry must give
    that one up and open a new one: not wait for a slot that is never freed, nor hold the
    pool's lock."""
    pool = pools(size=1, noop_after=0.0, acquire_timeout=3.0)
    pool.send(KEY, endpoint(server), envelope())
    server.fault("noop", "421 4.3.2 Try again", times=1, then="stall", seconds=10)
    first = envelope()
    retrying = run_in_thread(lambda: pool.send(KEY, endpoint(server), first))
    assert server.wait_until(lambda: server.count("NOOP") == 1)
    pool.send(KEY, endpoint(server), envelope())  # takes the slot during the QUIT
    retrying["thread"].join(10)
    assert not retrying["thread"].is_alive(), "the retrying sender is stuck"
    assert isinstance(retrying["result"], Delivery), retrying["result"]
    assert pool.stats()["retried"] == 1
    assert mid(first) in ids(server.messages) and len(server.messages) == 3
    pool.send(KEY, endpoint(server), envelope())  # the key is not wedged
    assert len(server.messages) == 4 and pool.stats()["open"] == 1
    assert_no_duplicates(server)


@pytest.mark.parametrize("how", ["forget", "close_all"])
def test_connection_in_flight_when_its_key_is_retired_closes_on_return(pools, server, how):
    pool = pools(size=1)
    pool.send(KEY, endpoint(server), envelope())
    server.fault("content", "delay", seconds=0.5, times=1)
    in_flight = run_in_thread(lambda: pool.send(KEY, endpoint(server), envelope()))
    assert server.wait_until(lambda: server.count("DATA") == 2)
    if how == "forget":
        pool.forget("acct-a")
    else:
        pool.close_all()
    pool.send(KEY, endpoint(server), envelope())  # same key again: a new slot, connection 2
    in_flight["thread"].join(5)
    assert isinstance(in_flight["result"], Delivery)
    stats = pool.stats()
    assert (stats["open"], stats["idle"]) == (1, 1), stats
    assert server.wait_until(lambda: server.active == 1)
    assert server.verbs(1)[-1] == "QUIT"
    pool.send(KEY, endpoint(server), envelope())
    assert server.connections == 2 and len(server.messages) == 4


def test_drop_one_connection_in_two_under_load(pools, server):
    """Every outcome matches the server's records: delivered once, or uncertain and taken at
    most once without a reply, or failed and absent."""
    server.fault("rcpt", "delay", seconds=0.02)  # sends overlap, so several connections open
    server.fault("content", "close", every=2)
    pool = pools(size=3)
    outcomes: list[tuple[Envelope, object]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def work() -> None:
        barrier.wait()
        for _ in range(4):
            env = envelope()
            try:
                result: object = pool.send(KEY, endpoint(server), env)
            except SendFailed as exc:
                result = exc
            with lock:
                outcomes.append((env, result))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 24
    delivered, unanswered = ids(server.messages), ids(server.unanswered)
    for env, result in outcomes:
        if isinstance(result, Delivery):
            assert delivered.count(mid(env)) == 1 and mid(env) not in unanswered
        else:
            assert result.uncertain and unanswered.count(mid(env)) == 1
            assert mid(env) not in delivered
    assert unanswered and delivered  # both happened
    assert_no_duplicates(server)
    assert pool.stats()["retried"] == 0 and server.max_active <= 3


def test_reset_after_fork_forgets_connections_without_touching_them(pools, server):
    pool = pools()
    pool.send("acct-a", endpoint(server), envelope())
    pool.send("acct-b", endpoint(server), envelope())
    # What a forked child inherits: the parent's sockets, and maybe a lock a thread held.
    inherited = [c.session.smtp for slot in pool._slots.values() for c in slot.idle]
    pool._lock.acquire()
    pool.reset_after_fork()
    stats = pool.stats()
    assert (stats["keys"], stats["open"], stats["idle"], stats["opened"]) == (0, 0, 0, 0)
    pool.send("acct-a", endpoint(server), envelope())
    assert server.connections == 3 and server.count("QUIT") == 0  # the parent's still open
    for smtp in inherited:  # the parent's to close; here parent and child are one process
        smtp.close()

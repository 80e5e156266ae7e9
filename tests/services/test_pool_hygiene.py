"""Pool hygiene (issue #10, case 7 and "pool hygiene") against real aiosmtpd servers: a server
that limits connections per client, the per-account cap, the background reaper, QUIT kept off
request threads, and a bounded wait for a busy pool."""

from __future__ import annotations

import functools
import itertools
import threading
import time

import pytest

from smtp_service.services.netguard import HostGuard
from smtp_service.services.pool import Delivery, Envelope, SendFailed, TransportPool
from smtp_service.services.transport import Secret, SmtpEndpoint, connect
from smtp_service.storage.refusals import RefusalBoard
from tests.conftest import SMTP_PASSWORD, SMTP_USER, settings_body
from tests.smtpd_faults import FaultyServer

# Every test here runs against servers without and with PIPELINING (RFC 2920).
pytestmark = pytest.mark.both_pipelining_modes

TIMEOUT = 1.0  # every SMTP stage
GUARD = HostGuard(("127.0.0.1/32", "localhost"))
KEY = "acct-a"
_serial = itertools.count(1)


@pytest.fixture
def pools(servers):
    """Make pools; at the end each QUITs its connections (before the servers stop)."""
    made: list[TransportPool] = []

    def _make(**kwargs) -> TransportPool:
        kwargs.setdefault("acquire_timeout", 5.0)
        kwargs.setdefault("reap_every", 0.1)
        pool = TransportPool(functools.partial(connect, timeout=TIMEOUT, guard=GUARD), **kwargs)
        made.append(pool)
        return pool

    yield _make
    for pool in made:
        pool.close_all()


def endpoint(server: FaultyServer, **kwargs) -> SmtpEndpoint:
    return SmtpEndpoint("localhost", server.port, False, SMTP_USER, Secret(SMTP_PASSWORD),
                        **kwargs)


def envelope() -> Envelope:
    n = next(_serial)
    data = f"Message-ID: <h{n}@pool.test>\r\nSubject: n{n}\r\n\r\nbody\r\n".encode()
    return Envelope(SMTP_USER, ("rcpt@example.net",), data)


def in_threads(*calls):
    """Run each call in a thread at once; returns their results (value or exception)."""
    results: list[object] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# -- a server that limits connections per client (case 7) ----------------------------------------


def test_a_refused_new_connection_waits_for_one_of_the_accounts_own(pools, server):
    """The server takes one connection from this client; four sends at once: the refused new
    connections wait for the one that is open, instead of failing (25 of 40 did before)."""
    server.per_client_limit = 1
    server.fault("content", "delay", seconds=0.2)
    pool = pools(size=3)
    results = in_threads(*[lambda: pool.send(KEY, endpoint(server), envelope())] * 4)
    assert all(isinstance(r, Delivery) for r in results), results
    assert len(server.messages) == 4
    assert server.turned_away >= 1 and pool.stats()["refused"] >= 1
    carried = [n for n in range(1, server.connections + 1) if "MAIL" in server.verbs(n)]
    assert len(carried) == 1  # the one connection the server takes carried all four


def test_after_a_refusal_connections_no_request_waits_for_are_not_kept(pools, server):
    """Once the server refused a connection, one that no request waits for is closed (QUIT, by
    the reaper) instead of idling, so that other workers and instances get their turn."""
    server.per_client_limit = 1
    server.fault("content", "delay", seconds=0.2)
    pool = pools(size=3)
    in_threads(*[lambda: pool.send(KEY, endpoint(server), envelope())] * 2)
    assert server.wait_until(lambda: server.active == 0)
    assert pool.stats()["idle"] == 0 and pool.stats()["open"] == 0
    assert all(server.verbs(n)[-1] == "QUIT" for n in range(1, server.connections + 1)
               if "MAIL" in server.verbs(n))


def test_another_workers_idle_connections_are_given_up_for_a_refused_one(pools, server,
                                                                          tmp_path):
    """Two workers (two pools) share a RefusalBoard, as they share DATA_DIR. Worker A holds the
    server's only connection idle and was never refused; worker B is refused with none of its
    own open: B notes it and tries again, A's reaper reads the note and lets its connection
    go, and B's send goes through."""
    server.per_client_limit = 1
    board = RefusalBoard(str(tmp_path))
    worker_a = pools(refusals=board)
    worker_b = pools(refusals=board)
    worker_a.send(KEY, endpoint(server), envelope())
    assert worker_a.stats()["idle"] == 1
    delivery = worker_b.send(KEY, endpoint(server), envelope())
    assert isinstance(delivery, Delivery)
    assert server.turned_away >= 1 and worker_a.stats()["idle"] == 0
    assert len(server.messages) == 2


def test_refusals_that_never_end_fail_after_the_wait_with_the_servers_words(pools, server):
    server.fault("connect", "421 4.7.0 Error: too many connections from 127.0.0.1")
    pool = pools(acquire_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), envelope())
    assert time.monotonic() - started < 1.5
    assert failure.value.phase == "connect" and failure.value.transport.code == 421
    assert "too many connections" in failure.value.transport.text
    assert 2 <= server.connections <= 6  # tried again, after pauses that grow


# -- the per-account cap and the global route's own size -----------------------------------------


def test_max_connections_caps_the_accounts_connections(pools, server):
    server.fault("content", "delay", seconds=0.1)
    pool = pools(size=3)
    capped = endpoint(server, max_connections=1)
    results = in_threads(*[lambda: pool.send(KEY, capped, envelope())] * 4)
    assert all(isinstance(r, Delivery) for r in results), results
    assert server.max_active == 1 and server.turned_away == 0


def test_a_send_may_give_its_own_size(pools, server):
    server.fault("content", "delay", seconds=0.3)
    pool = pools(size=1)
    results = in_threads(*[lambda: pool.send("__global__", endpoint(server), envelope(),
                                             size=3)] * 3)
    assert all(isinstance(r, Delivery) for r in results), results
    assert server.max_active == 3


# -- the reaper: idle connections closed in the background, never on a request thread -----------


def test_the_reaper_closes_idle_connections_with_quit(pools, server):
    """Before, an idle connection was closed only when the same account sent again (three stayed
    open 1.5 s past a 0.2 s limit, without QUIT)."""
    pool = pools(idle_seconds=0.2)
    in_threads(*[lambda: pool.send(KEY, endpoint(server), envelope())] * 3)
    assert server.wait_until(lambda: server.active == 0)
    assert pool.stats()["idle"] == 0
    assert all(server.verbs(n)[-1] == "QUIT" for n in range(1, server.connections + 1))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_expired_connection_costs_the_next_send_no_quit(pools, server):
    """The server takes its time over QUIT; the send that finds the expired connection does not
    wait for it (before, it added the whole timeout)."""
    clock = Clock()
    pool = pools(idle_seconds=10, reap_every=60, clock=clock)
    pool.send(KEY, endpoint(server), envelope())
    server.fault("quit", "delay", seconds=TIMEOUT * 3)
    clock.now += 11
    started = time.monotonic()
    pool.send(KEY, endpoint(server), envelope())
    assert time.monotonic() - started < TIMEOUT
    assert server.connections == 2 and len(server.messages) == 2


def test_evicting_another_account_costs_no_quit(pools, server):
    pool = pools(max_accounts=1, reap_every=60)
    pool.send("acct-a", endpoint(server), envelope())
    server.fault("quit", "delay", seconds=TIMEOUT * 3)
    started = time.monotonic()
    pool.send("acct-b", endpoint(server), envelope())  # evicts acct-a's idle connection
    assert time.monotonic() - started < TIMEOUT
    assert server.wait_until(lambda: server.count("QUIT") == 1)  # by the reaper


def test_forget_returns_before_the_quit(pools, server):
    """forget() runs on the request that saved new settings: the QUIT is the reaper's."""
    pool = pools()
    pool.send(KEY, endpoint(server), envelope())
    server.fault("quit", "delay", seconds=TIMEOUT * 3)
    started = time.monotonic()
    pool.forget(KEY)
    assert time.monotonic() - started < 0.2
    assert server.wait_until(lambda: server.count("QUIT") == 1)


def test_a_failed_connection_is_closed_without_quit(pools, server):
    """A 421 ends the session (RFC 5321 3.8): the connection is closed at once, without a QUIT
    (pipelined, the server took DATA and reads a QUIT as content: the send would wait for a
    reply that never comes)."""
    pool = pools()
    server.handler.rcpt_replies["rcpt"] = "421 4.7.0 Too many errors, closing"
    started = time.monotonic()
    with pytest.raises(SendFailed) as failure:
        pool.send(KEY, endpoint(server), envelope())
    assert time.monotonic() - started < TIMEOUT / 2
    assert failure.value.refused == {"rcpt@example.net": (421, "4.7.0 Too many errors, closing")}
    assert server.wait_until(lambda: server.active == 0)
    assert server.count("QUIT") == 0 and pool.stats()["open"] == 0


# -- a busy pool: a bounded wait, then 503 with Retry-After --------------------------------------


@pytest.fixture
def app_config(app_config, servers):
    """`servers` first, so they stop after the app's pool has QUIT."""
    return app_config


def test_a_pool_that_stays_busy_answers_503_with_retry_after(app_config, tokens, servers):
    from smtp_service import create_app

    server = servers()
    app = create_app({**app_config, "SMTP_POOL_SIZE": "1", "SMTP_POOL_WAIT_SECONDS": "0.3",
                      "SMTP_TIMEOUT": "3"})
    try:
        client = app.test_client()
        assert client.post("/api/smtp/settings", json=settings_body(server),
                           headers=tokens.headers()).status_code == 200
        body = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "s", "text": "t"}
        server.fault("content", "delay", seconds=1.0, times=1)
        first = {}
        thread = threading.Thread(target=lambda: first.update(r=app.test_client().post(
            "/api/messages/send-email", json=body, headers=tokens.headers())))
        thread.start()
        assert server.wait_until(lambda: server.count("DATA") == 1)
        headers = {**tokens.headers(), "Idempotency-Key": "busy-1"}
        started = time.monotonic()
        r = client.post("/api/messages/send-email", json=body, headers=headers)
        assert time.monotonic() - started < 1.0
        assert r.status_code == 503, r.json
        assert r.headers["Retry-After"] == "1"
        assert r.json == {"error": "All connections to the SMTP server are busy; nothing was "
                                   "sent. Retry after 1 s"}
        thread.join(10)
        assert first["r"].status_code == 200
        r = client.post("/api/messages/send-email", json=body, headers=headers)
        assert r.status_code == 200, r.json  # the key was released: the retry sends
        assert len(server.messages) == 2
    finally:
        app.extensions["smtp_service"].pool.close_all()


def test_the_global_route_has_its_own_pool_size(app_config, tokens, servers):
    """SMTP_GLOBAL_POOL_SIZE: every account without its own server shares the global route, so
    it gets its own size (here 3 while accounts keep 1)."""
    from smtp_service import create_app

    relay = servers()
    app = create_app({**app_config, "SMTP_POOL_SIZE": "1", "SMTP_GLOBAL_POOL_SIZE": "3",
                      "SMTP_PORT": str(relay.port), "SMTP_USER": SMTP_USER,
                      "SMTP_PASS": SMTP_PASSWORD})
    try:
        relay.fault("content", "delay", seconds=0.3)
        body = {"from": "noreply@example.com", "to": "rcpt@example.net", "subject": "s",
                "text": "t"}

        def send(account):
            return lambda: app.test_client().post("/api/messages/send-email", json=body,
                                                  headers=tokens.headers(account))

        results = in_threads(send("acct-a"), send("acct-b"), send("acct-c"))
        assert [r.status_code for r in results] == [200] * 3
        assert relay.max_active == 3 and relay.connections == 3
    finally:
        app.extensions["smtp_service"].pool.close_all()


# -- maxConnections in the account's settings ----------------------------------------------------


def test_max_connections_is_a_setting_of_the_account(client, tokens, servers, app):
    server = servers()
    headers = tokens.headers()
    r = client.post("/api/smtp/settings", json=settings_body(server, maxConnections=1),
                    headers=headers)
    assert r.status_code == 200, r.json
    assert r.json["settings"]["maxConnections"] == 1
    view = client.get("/api/smtp/settings", headers=headers).json
    assert view["maxConnections"] == 1
    server.fault("content", "delay", seconds=0.2)
    body = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "s", "text": "t"}
    results = in_threads(*[lambda: app.test_client().post(
        "/api/messages/send-email", json=body, headers=headers)] * 3)
    assert [r.status_code for r in results] == [200] * 3
    assert server.max_active == 1  # SMTP_POOL_SIZE is 3: the account's cap holds
    # Without it, answers and the stored file are what they were.
    r = client.post("/api/smtp/settings", json=settings_body(server), headers=headers)
    assert "maxConnections" not in r.json["settings"]
    assert "maxConnections" not in client.get("/api/smtp/settings", headers=headers).json
    stored = app.extensions["smtp_service"].files.read("acct-a", "smtp-settings.json")
    assert "maxConnections" not in stored


@pytest.mark.parametrize("bad", [0, 101, "2", True, 1.5])
def test_max_connections_must_be_a_whole_number_from_1_to_100(client, tokens, servers, bad):
    server = servers()
    r = client.post("/api/smtp/settings", json=settings_body(server, maxConnections=bad),
                    headers=tokens.headers())
    assert r.status_code == 400 and "maxConnections" in r.json["details"]

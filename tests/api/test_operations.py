"""For operators, through the real app: request ids, the request and send log lines, the
metrics (single-process registry here; tests/e2e/test_operations.py adds them up across
gunicorn workers), who may read /metrics, /readyz and the documentation page."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtp_service import create_app, metrics
from smtp_service.api.operations import metrics_allowed
from tests.conftest import SMTP_PASSWORD, SMTP_USER, settings_body
from tests.smtpd import SmtpServer

# -- helpers -----------------------------------------------------------------------------------


def scrape(client: Any, **environ: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    r = client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1", **environ})
    assert r.status_code == 200, r.data
    samples = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _use_own_server(client, tokens, server, account="acct-ops"):
    r = client.post(
        "/api/smtp/settings", json=settings_body(server), headers=tokens.headers(account)
    )
    assert r.status_code == 200, r.json


def _send(client, tokens, account="acct-ops", headers=None, **body):
    payload = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hi", "text": "t", **body}
    return client.post("/api/messages/send-email", json=payload,
                       headers={**tokens.headers(account), **(headers or {})})


def _records(caplog, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


# -- request ids and the request line ----------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("abc-123", True),
        ("4f2c7e1a-9d3b-4c1e-8f00-123456789abc", True),
        ("req:1/2+3=@x.y_z", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("<script>", False),
        ("", False),
        ("caf\u00e9", False),
    ],
)
def test_request_id_is_echoed_when_safe_else_made(client, sent, echoed):
    r = client.get("/healthz", headers={"X-Request-ID": sent})
    got = r.headers["X-Request-ID"]
    if echoed:
        assert got == sent
    else:
        assert got != sent and len(got) == 32 and int(got, 16) >= 0


def test_request_id_made_when_absent_and_different_each_time(client):
    first = client.get("/healthz").headers["X-Request-ID"]
    second = client.get("/healthz").headers["X-Request-ID"]
    assert first != second and len(first) == 32


def test_request_line_has_the_fields_and_no_secret(client, tokens, caplog):
    caplog.set_level(logging.INFO, logger="smtp_service.requests")
    caplog.clear()
    headers = {**tokens.headers("acct-line"), "X-Request-ID": "trace-42"}
    r = client.get("/api/smtp/settings?token=should-not-appear", headers=headers)
    assert r.status_code == 200
    (record,) = [x for x in _records(caplog, "smtp_service.requests") if x.request_id == "trace-42"]
    assert record.levelname == "INFO"
    assert record.method == "GET" and record.path == "/api/smtp/settings"
    assert record.route == "/api/smtp/settings" and record.status == 200
    assert record.account == "acct-line" and isinstance(record.duration_ms, float)
    assert record.duration_ms >= 0 and isinstance(record.pid, int)
    text = record.getMessage() + repr(vars(record))
    assert "should-not-appear" not in text and "Bearer" not in text
    assert headers["Authorization"].split()[1] not in text


def test_request_line_of_an_unauthenticated_and_unmatched_request(client, caplog):
    caplog.set_level(logging.INFO, logger="smtp_service.requests")
    caplog.clear()
    client.get("/no/such/route\nFAKE 200")
    (record,) = _records(caplog, "smtp_service.requests")
    assert record.status == 404 and record.account is None and record.route is None
    assert "\n" not in record.path and "\n" not in record.getMessage()


def test_no_request_line_when_the_level_is_off(client, caplog):
    caplog.set_level(logging.WARNING, logger="smtp_service.requests")
    client.get("/healthz")
    assert _records(caplog, "smtp_service.requests") == []


# -- the send line and the send metrics --------------------------------------------------------


def test_send_line_and_metrics_for_a_sent_message(client, tokens, smtp_server, caplog):
    _use_own_server(client, tokens, smtp_server)
    before = scrape(client)
    caplog.set_level(logging.INFO, logger="smtp_service.sends")
    caplog.clear()
    r = _send(client, tokens, headers={"X-Request-ID": "send-1"})
    assert r.status_code == 200, r.json
    (record,) = _records(caplog, "smtp_service.sends")
    assert record.account == "acct-ops" and record.message_id == r.json["messageId"]
    assert record.transport == "custom" and record.outcome == "sent"
    assert record.smtp_code == 250 and record.replayed is False
    assert record.duration_ms > 0 and record.request_id == "send-1"
    after = scrape(client)
    assert value(after, "smtp_service_sends_total", transport="custom", outcome="sent") == (
        value(before, "smtp_service_sends_total", transport="custom", outcome="sent") + 1
    )
    count = "smtp_service_smtp_send_seconds_count"
    assert value(after, count, transport="custom") == value(before, count, transport="custom") + 1
    assert SMTP_PASSWORD not in repr(vars(record))


def test_bounces_are_counted_by_type_and_category(client, tokens, smtp_server, caplog):
    _use_own_server(client, tokens, smtp_server)
    before = scrape(client)
    caplog.set_level(logging.INFO, logger="smtp_service.sends")
    caplog.clear()
    r = _send(client, tokens, to=["bad1@example.net", "bad2@example.net"])
    assert r.status_code == 502, r.json
    (record,) = _records(caplog, "smtp_service.sends")
    assert record.outcome == "bounced" and record.smtp_code == 550
    assert record.category == "mailbox"
    after = scrape(client)
    key = {"type": "hard", "category": "mailbox"}
    assert value(after, "smtp_service_bounces_total", **key) == (
        value(before, "smtp_service_bounces_total", **key) + 2
    )
    assert value(after, "smtp_service_sends_total", transport="custom", outcome="bounced") == (
        value(before, "smtp_service_sends_total", transport="custom", outcome="bounced") + 1
    )


def test_a_failed_connection_is_a_failed_send_with_no_smtp_code(app_config, tokens, caplog):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    app = create_app({**app_config, "SMTP_PORT": str(port)})
    client = app.test_client()
    try:
        before = scrape(client)
        caplog.set_level(logging.INFO, logger="smtp_service.sends")
        caplog.clear()
        r = _send(client, tokens, **{"from": "noreply@example.com"})
        assert r.status_code == 502
        (record,) = _records(caplog, "smtp_service.sends")
        assert record.transport == "global" and record.outcome == "failed"
        assert record.smtp_code is None and record.category == "refused"
        after = scrape(client)
        key = {"transport": "global", "outcome": "failed"}
        assert value(after, "smtp_service_sends_total", **key) == (
            value(before, "smtp_service_sends_total", **key) + 1
        )
    finally:
        app.extensions["smtp_service"].database.dispose()


def test_an_idempotent_replay_is_logged_as_such_and_not_counted(
    client, tokens, smtp_server, caplog
):
    _use_own_server(client, tokens, smtp_server)
    key = {"Idempotency-Key": "ops-replay-1"}
    assert _send(client, tokens, headers=key).status_code == 200
    before = scrape(client)
    caplog.set_level(logging.INFO, logger="smtp_service.sends")
    caplog.clear()
    assert _send(client, tokens, headers=key).status_code == 200
    (record,) = _records(caplog, "smtp_service.sends")
    assert record.replayed is True and record.duration_ms is None
    assert len(smtp_server.messages) == 1
    after = scrape(client)
    assert value(after, "smtp_service_sends_total", transport="custom", outcome="sent") == (
        value(before, "smtp_service_sends_total", transport="custom", outcome="sent")
    )


# -- request metrics ---------------------------------------------------------------------------


def test_requests_are_counted_by_method_rule_and_status(client, tokens):
    before = scrape(client)
    for _ in range(3):
        client.get("/api/messages/some-id-1", headers=tokens.headers("acct-ops"))
    client.get("/api/messages/other-id", headers=tokens.headers("acct-ops"))
    client.open("/healthz", method="BREW")
    after = scrape(client)
    labels = {"method": "GET", "route": "/api/messages/<path:message_id>", "status": "404"}
    total = "smtp_service_http_requests_total"
    assert value(after, total, **labels) == value(before, total, **labels) + 4
    other = {"method": "other", "route": "(unmatched)", "status": "405"}
    assert value(after, total, **other) == value(before, total, **other) + 1
    # no label holds an id or an account
    names = {dict(labels_)["route"] for (name, labels_) in after if name == total}
    assert not any("some-id-1" in n or "acct-ops" in n for n in names)


def test_made_up_methods_do_not_grow_the_label_cache(client):
    client.open("/healthz", method="BREW0")
    size = len(metrics._requests)
    for i in range(1, 50):
        client.open("/healthz", method=f"BREW{i}")
    assert len(metrics._requests) == size


def test_rate_limit_refusals_are_counted_by_rule(app_config):
    app = create_app({**app_config, "TRACKING_RATE_LIMIT": "2 per minute"})
    client = app.test_client()
    try:
        before = scrape(client)
        answers = [client.get("/t/open/x.gif").status_code for _ in range(4)]
        assert answers == [200, 200, 429, 429]
        after = scrape(client)
        rule = "/t/open/<string:token>.gif"
        assert value(after, "smtp_service_rate_limited_total", route=rule) == (
            value(before, "smtp_service_rate_limited_total", route=rule) + 2
        )
    finally:
        app.extensions["smtp_service"].database.dispose()


def test_pooled_connections_gauge(client, tokens, smtp_server):
    _use_own_server(client, tokens, smtp_server)
    assert _send(client, tokens).status_code == 200
    samples = scrape(client)
    assert value(samples, "smtp_service_pooled_connections", state="open") >= 1
    assert value(samples, "smtp_service_pooled_connections", state="idle") >= 1


def test_circuit_state_comes_from_the_source_it_is_given(client):
    # the app's own source is the circuit breaker's table: no circuit is open here
    assert value(scrape(client), "smtp_circuit_open", transport="custom") == 0
    metrics.set_circuit_source(lambda: [("custom", 2), ("global", 0)])
    try:
        samples = scrape(client)
        assert value(samples, "smtp_circuit_open", transport="custom") == 2
        assert value(samples, "smtp_circuit_open", transport="global") == 0
    finally:
        metrics.set_circuit_source(None)


# -- who may read /metrics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.1.2.3", True),
        ("192.168.7.7", True),
        ("2001:db8::5", True),
        ("10.2.0.1", False),
        ("192.168.7.8", False),
        ("203.0.113.9", False),
        ("2001:db9::5", False),
        ("", False),
        ("not-an-address", False),
    ],
)
def test_metrics_answer_loopback_and_the_allowed_networks_only(app_config, address, allowed):
    app = create_app(
        {**app_config, "METRICS_ALLOW_CIDRS": "10.1.0.0/16, 192.168.7.7, 2001:db8::/32"}
    )
    try:
        r = app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": address})
        if allowed:
            assert r.status_code == 200 and r.mimetype == "text/plain"
        else:  # exactly what a route that does not exist answers
            assert r.status_code == 404 and r.json == {"error": "Not found"}
    finally:
        app.extensions["smtp_service"].database.dispose()


def test_x_forwarded_for_is_not_trusted(client):
    r = client.get(
        "/metrics",
        environ_base={"REMOTE_ADDR": "203.0.113.9"},
        headers={"X-Forwarded-For": "127.0.0.1"},
    )
    assert r.status_code == 404


def test_metrics_allowed_parses_addresses_strictly():
    assert metrics_allowed("fe80::1%eth0", ()) is False
    assert metrics_allowed("127.0.0.1", ()) is True
    assert metrics_allowed(None, ()) is False


def test_bad_metrics_networks_stop_start_up(app_config):
    from smtp_service import ConfigError

    with pytest.raises(ConfigError, match="METRICS_ALLOW_CIDRS has an invalid network 'nope'"):
        create_app({**app_config, "METRICS_ALLOW_CIDRS": "10.0.0.0/8,nope"})


# -- /readyz -------------------------------------------------------------------------------------


def test_ready_when_everything_answers(client):
    r = client.get("/readyz")
    assert r.status_code == 200, r.json
    assert r.json == {
        "status": "ready",
        "checks": {"dataDir": "ok", "database": "ok", "smtp": "ok"},
        "failing": [],
    }


def _own_global_server(app_config, **config):
    """An app whose global server is a plain one of the test's own (the test stops it)."""
    server = SmtpServer(mode="plain").start()
    app = create_app({**app_config, "SMTP_PORT": str(server.port), "SMTP_REQUIRE_TLS": "false",
                      **config})
    return app, server


def test_not_ready_when_the_global_server_stops(app_config):
    app, global_server = _own_global_server(app_config, READYZ_CACHE_SECONDS="0")
    client = app.test_client()
    try:
        assert client.get("/readyz").status_code == 200
        global_server.stop()
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json["failing"] == ["smtp"] and r.json["status"] == "not ready"
        assert r.json["checks"]["smtp"] == "unreachable (refused)"
        assert r.json["checks"]["database"] == "ok" and r.json["checks"]["dataDir"] == "ok"
        body = r.get_data(as_text=True)
        assert "global-pass-XYZ" not in body and str(global_server.port) not in body
    finally:
        app.extensions["smtp_service"].database.dispose()


def test_the_smtp_probe_is_cached(app_config):
    app, global_server = _own_global_server(app_config, READYZ_CACHE_SECONDS="60")
    client = app.test_client()
    try:
        for _ in range(5):
            assert client.get("/readyz").status_code == 200
        global_server.stop()  # within the cache time the answer stays
        assert client.get("/readyz").status_code == 200
    finally:
        app.extensions["smtp_service"].database.dispose()


def test_the_probe_does_not_log_in(client, global_server):
    attempts = len(global_server.auth_attempts)
    assert client.get("/readyz").status_code == 200
    assert len(global_server.auth_attempts) == attempts


def test_no_global_server_counts_as_ready(app_config):
    app = create_app({**app_config, "SMTP_HOST": ""})
    try:
        r = app.test_client().get("/readyz")
        assert r.status_code == 200 and r.json["checks"]["smtp"] == "not configured"
    finally:
        app.extensions["smtp_service"].database.dispose()


def test_not_ready_when_the_data_folder_cannot_be_written(app, client):
    data_dir = Path(app.extensions["smtp_service"].data_dir)
    moved = data_dir.with_name("data-moved")
    data_dir.rename(moved)
    data_dir.write_text("a file where the folder was")  # root writes anywhere: no chmod trick
    try:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json["failing"] == ["dataDir"] and r.json["checks"]["dataDir"] == "not writable"
    finally:
        data_dir.unlink()
        moved.rename(data_dir)


@contextlib.contextmanager
def tcp_proxy(target_host: str, target_port: int) -> Iterator[Any]:
    """A loopback TCP forwarder to a real server, which the test can cut (stop())."""
    listener = socket.create_server(("127.0.0.1", 0))
    stopped = threading.Event()
    sockets: list[socket.socket] = []

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while not stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((target_host, target_port))
            sockets.extend((client, upstream))
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()

    class Proxy:
        port = listener.getsockname()[1]

        @staticmethod
        def stop() -> None:
            stopped.set()
            with contextlib.suppress(OSError):  # wakes the accept() (close alone does not)
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    try:
        yield Proxy
    finally:
        Proxy.stop()


def test_not_ready_when_the_database_is_unreachable(app_config, database_url):
    """PostgreSQL behind a proxy the test cuts: SELECT 1 fails; the answer names the database
    and nothing of its URL."""
    from sqlalchemy.engine import make_url

    if database_url.startswith("sqlite"):
        pytest.skip("a database server to cut off needs PostgreSQL (TEST_DATABASE_URL)")
    url = make_url(database_url)
    with tcp_proxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        app = create_app({**app_config, "DATABASE_URL": proxied})
        try:
            client = app.test_client()
            assert client.get("/readyz").status_code == 200
            proxy.stop()
            r = client.get("/readyz")
            assert r.status_code == 503, r.json
            assert r.json["failing"] == ["database"]
            assert r.json["checks"]["database"].startswith("unreachable (")
            body = r.get_data(as_text=True)
            assert str(proxy.port) not in body and "postgres" not in body.lower()
            assert (url.password or "no-password-set") not in body
        finally:
            app.extensions["smtp_service"].database.dispose()


# -- the documentation page ----------------------------------------------------------------------


def test_docs_page_and_its_assets_are_served_here(client):
    r = client.get("/api/docs/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert "/api/openapi.json" in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    for asset in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        assert f"/api/docs/{asset}" in page
        with client.get(f"/api/docs/{asset}") as got:
            assert got.status_code == 200 and len(got.data) > 1000, asset
    assert client.get("/api/docs").status_code in (301, 308)
    with client.get("/api/docs/../../etc/passwd") as outside:
        assert outside.status_code == 404
    assert '"validatorUrl": null' in page


def test_readyz_is_in_the_openapi_document(client):
    doc = client.get("/api/openapi.json").json
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert "security" not in doc["paths"]["/readyz"]["get"]


def test_send_email_answers_are_unchanged(client, tokens, smtp_server):
    """The request id header is the only addition to an answer."""
    _use_own_server(client, tokens, smtp_server)
    r = _send(client, tokens)
    assert set(r.json) == {"success", "messageId", "transport", "accepted", "rejected"}
    assert "X-Request-ID" in r.headers
    assert SMTP_USER  # the settings were the account's own

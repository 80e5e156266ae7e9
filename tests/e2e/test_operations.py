"""For operators, on a real 2-worker gunicorn: metrics that add up across workers, /metrics
refused to a caller that is not on loopback, request lines and ids, /readyz failing and
recovering, and (through the live_service fixture) no secret in anything the service wrote."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.e2e.conftest import LiveService, free_port, service_environment, start_live
from tests.smtpd import SmtpServer

ACCOUNT = "acct-ops-e2e"


def scrape(live: LiveService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = live.request("GET", "/metrics")
    assert r.status == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _many(live: LiveService, count: int, call: Any) -> list[Any]:
    """`count` calls, 8 at a time; urllib opens a new connection for each, so the kernel
    spreads them over both workers."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(call, range(count)))


def test_metrics_totals_add_up_across_workers(live_service: LiveService):
    live = live_service
    token = live.token(ACCOUNT)
    server = live.account_server
    settings = {"host": "localhost", "port": server.port, "user": SMTP_USER,
                "pass": SMTP_PASSWORD}
    assert live.request("POST", "/api/smtp/settings", settings, token=token).status == 200
    mark = len(live.log_text())

    # Which worker takes a connection is the kernel's choice: read until both have answered.
    made = 0
    for _round in range(20):
        reads = _many(live, 30, lambda _i: live.request("GET", "/api/smtp/settings", token=token))
        assert {r.status for r in reads} == {200}
        made += len(reads)
        if len(live.worker_pids("GET", "/api/smtp/settings", mark)) == 2:
            break
    sends = _many(live, 20, lambda i: live.request(
        "POST", "/api/messages/send-email",
        {"from": SMTP_USER, "to": "rcpt@example.net", "subject": f"m-{i}", "text": "x"},
        token=token,
    ))
    assert {r.status for r in sends} == {200}
    unknown = _many(live, 5, lambda i: live.request("GET", f"/api/messages/no-such-{i}",
                                                    token=token))
    assert {r.status for r in unknown} == {404}

    # both workers answered; a scrape answered by one of them counts every request of both
    assert len(live.worker_pids("GET", "/api/smtp/settings", mark)) == 2
    samples = scrape(live)
    total = "smtp_service_http_requests_total"
    assert value(samples, total, method="GET", route="/api/smtp/settings", status="200") == made
    assert value(samples, total, method="POST", route="/api/smtp/settings", status="200") == 1
    assert value(samples, total, method="POST", route="/api/messages/send-email",
                 status="200") == 20
    assert value(samples, total, method="GET", route="/api/messages/<path:message_id>",
                 status="404") == 5
    assert value(samples, "smtp_service_sends_total", transport="custom", outcome="sent") == 20
    assert value(samples, "smtp_service_smtp_send_seconds_count", transport="custom") == 20
    assert len(server.messages) == 20
    # every request line of the run is counted exactly once
    lines = live.request_lines()
    counted = sum(v for (name, _labels), v in samples.items() if name == total)
    assert counted == len(lines) - 1  # the scrape's own line is written after it answered
    assert not any(ACCOUNT in str(labels) for (_name, labels) in samples)


def test_request_line_and_request_id_through_gunicorn(live_service: LiveService):
    live = live_service
    token = live.token(ACCOUNT)
    mark = len(live.log_text())
    r = live.request("GET", "/api/smtp/settings?x=1", token=token,
                     headers={"X-Request-ID": "e2e-trace-7"})
    assert r.status == 200 and r.headers["X-Request-ID"] == "e2e-trace-7"
    made = live.request("GET", "/healthz", headers={"X-Request-ID": "bad id!"})
    assert made.headers["X-Request-ID"] != "bad id!" and len(made.headers["X-Request-ID"]) == 32
    lines = live.request_lines(mark)
    (line,) = [x for x in lines if x.get("request_id") == "e2e-trace-7"]
    assert line["method"] == "GET" and line["path"] == "/api/smtp/settings"
    assert line["status"] == 200 and line["account"] == ACCOUNT
    assert line["duration_ms"] >= 0 and line["level"] == "INFO" and "time" in line
    assert any(x.get("request_id") == made.headers["X-Request-ID"] for x in lines)
    # gunicorn's access log is off: the request is written once
    written = [x for x in live.log_text()[mark:].splitlines() if "/api/smtp/settings" in x]
    assert len(written) == 1, written


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (the source of a connection to it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent for a UDP connect
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.fixture
def own_global(server_tls: Any) -> Iterator[SmtpServer]:
    """A global server of the test's own, which it may stop (and is stopped once)."""
    server = SmtpServer(mode="plain").start()
    yield server
    try:
        server.stop()
    except AssertionError:  # already stopped by the test
        pass


def _start(tmp_path: Path, trust_test_ca: str, global_server: SmtpServer,
           **overrides: str) -> LiveService:
    port = free_port()
    env = service_environment(port=port, data_dir=tmp_path / "data", ca_file=trust_test_ca,
                              global_server=global_server, SMTP_REQUIRE_TLS="false",
                              SMTP_USER="", SMTP_PASS="", **overrides)
    if env["BIND"].startswith("0.0.0.0"):
        env["BIND"] = f"0.0.0.0:{port}"
    return start_live(port=port, data_dir=tmp_path / "data", log_path=tmp_path / "gunicorn.log",
                      env=env, global_server=global_server, account_server=global_server)


def test_metrics_are_refused_to_a_caller_not_on_loopback(tmp_path, trust_test_ca, own_global):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback to call from")
    live = _start(tmp_path, trust_test_ca, own_global, BIND="0.0.0.0")
    try:
        assert live.request("GET", "/metrics").status == 200  # from 127.0.0.1
        url = f"http://{address}:{live.port}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/metrics", timeout=10)
        with refused.value as answer:
            assert answer.code == 404 and b"smtp_service" not in answer.read()
        # the same caller reaches the service, and X-Forwarded-For changes nothing
        with urllib.request.urlopen(url + "/healthz", timeout=10) as ok:
            assert ok.status == 200
        forged = urllib.request.Request(url + "/metrics",
                                        headers={"X-Forwarded-For": "127.0.0.1"})
        with pytest.raises(urllib.error.HTTPError) as still:
            urllib.request.urlopen(forged, timeout=10)
        with still.value as answer:
            assert answer.code == 404
    finally:
        live.stop()
    live.assert_no_secrets()


def test_readyz_names_what_fails_and_recovers(tmp_path, trust_test_ca, own_global):
    live = _start(tmp_path, trust_test_ca, own_global, READYZ_CACHE_SECONDS="0")
    try:
        r = live.request("GET", "/readyz")
        assert r.status == 200, r.text
        assert r.json["checks"] == {"dataDir": "ok", "database": "ok", "smtp": "ok"}

        own_global.stop()
        r = live.request("GET", "/readyz")
        assert r.status == 503 and r.json["failing"] == ["smtp"], r.text
        assert r.json["checks"]["smtp"] == "unreachable (refused)"
        assert str(own_global.port) not in r.text

        data_dir = live.data_dir
        moved = data_dir.with_name("data-moved")
        data_dir.rename(moved)
        data_dir.write_text("not a folder")
        try:
            r = live.request("GET", "/readyz")
            assert r.status == 503 and r.json["failing"] == ["dataDir", "smtp"], r.text
            assert r.json["checks"]["dataDir"] == "not writable"
        finally:
            data_dir.unlink()
            moved.rename(data_dir)

        restarted = SmtpServer(mode="plain", port=own_global.port).start()
        try:
            r = live.request("GET", "/readyz")
            assert r.status == 200, r.text
        finally:
            restarted.stop()
        # /healthz keeps its own shape
        assert live.request("GET", "/healthz").json == {"status": "ok"}
    finally:
        live.stop()
    live.assert_no_secrets()

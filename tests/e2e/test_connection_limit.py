"""Issue #10, case 7, through a real 2-worker gunicorn: a server that takes two connections
from this client (Postfix's smtpd_client_connection_count_limit = 2) and answers a third
"421 4.7.0 too many connections". With the default pool (3 per worker), 40 sends on 8 threads
gave 25 x 502; each must be delivered, once."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.e2e.conftest import free_port, service_environment, start_live
from tests.smtpd_faults import FaultyServer

pytestmark = pytest.mark.e2e

ACCOUNT = "acct-limited"


@pytest.fixture
def limited(server_tls):
    server = FaultyServer(users={SMTP_USER: SMTP_PASSWORD}, server_context=server_tls,
                          pipelining=True).start()
    server.per_client_limit = 2
    server.fault("content", "delay", seconds=0.02)  # sends overlap, as under load
    yield server
    server.stop()


def test_forty_sends_on_eight_threads_to_a_server_that_takes_two(
    tmp_path, trust_test_ca, global_server, limited
):
    port = free_port()
    env = service_environment(port=port, data_dir=tmp_path / "data", ca_file=trust_test_ca,
                              global_server=global_server, SMTP_POOL_SIZE="3",
                              WEB_CONCURRENCY="2", GUNICORN_THREADS="8")
    live = start_live(port=port, data_dir=tmp_path / "data", log_path=tmp_path / "gunicorn.log",
                      env=env, global_server=global_server, account_server=limited)
    try:
        token = live.token(ACCOUNT)
        settings = {"host": "localhost", "port": limited.port, "user": SMTP_USER,
                    "pass": SMTP_PASSWORD}
        assert live.request("POST", "/api/smtp/settings", settings, token=token).status == 200
        mark = len(live.log_text())

        def send(i: int) -> tuple[int, str]:
            r = live.request("POST", "/api/messages/send-email",
                             {"from": SMTP_USER, "to": "rcpt@example.net",
                              "subject": f"limited-{i}", "text": "x"}, token=token,
                             timeout=60)
            return r.status, r.text

        with ThreadPoolExecutor(8) as threads:
            answers = list(threads.map(send, range(40)))
        statuses = Counter(status for status, _ in answers)
        assert statuses == {200: 40}, [text for status, text in answers if status != 200][:3]
        subjects = Counter(m.message["Subject"] for m in limited.messages)
        assert sorted(subjects) == sorted(f"limited-{i}" for i in range(40))
        assert set(subjects.values()) == {1}  # each once
        assert limited.turned_away > 0, "the server never refused: the test proved nothing"
        workers = live.worker_pids("POST", "/api/messages/send-email", mark)
        assert len(workers) == 2, "both workers must have sent"
        live.assert_log_clean()
    finally:
        live.stop()

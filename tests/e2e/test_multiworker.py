"""Settings changed and deleted while every worker of a real 2-worker gunicorn holds pooled
connections: the next sends go to the new server from every worker, never to the old one."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.e2e.conftest import LiveService

ACCOUNT = "acct-multi"


def _settings(server) -> dict:
    return {"host": "localhost", "port": server.port, "user": SMTP_USER, "pass": SMTP_PASSWORD}


def _burst(live: LiveService, token: str, count: int, tag: str) -> list[dict]:
    """`count` sends, 8 at a time, so that both workers (4 threads each) take some."""

    def one(i: int) -> dict:
        r = live.request(
            "POST",
            "/api/messages/send-email",
            {"from": SMTP_USER, "to": "rcpt@example.net", "subject": f"{tag}-{i}", "text": "x"},
            token=token,
        )
        assert r.status == 200, r.text
        return r.json

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def _send_pids(live: LiveService, since: int) -> set[int]:
    """Worker pids that answered send-email (the request lines) after offset `since`."""
    return live.worker_pids("POST", "/api/messages/send-email", since)


def _subjects(server) -> list[str]:
    return sorted(m.message["Subject"] for m in server.messages)


def test_settings_change_reaches_every_worker(live_service: LiveService, smtp_factory):
    live = live_service
    token = live.token(ACCOUNT)
    old, new = live.account_server, smtp_factory("starttls")
    # The account's own user is a confirmed sender, so one `from` works on every route.
    assert live.request("POST", "/api/senders", {"email": SMTP_USER}, token=token).status == 201
    confirmation = live.global_server.messages.pop()  # the code, sent through the global server
    code = re.search(r"[A-Z2-7]{4}(?:-[A-Z2-7]{4}){3}", confirmation.message.get_content()).group(0)
    r = live.request("POST", f"/api/senders/{SMTP_USER}/confirm", {"code": code}, token=token)
    assert r.status == 200, r.text
    assert live.request("POST", "/api/smtp/settings", _settings(old), token=token).status == 200

    mark = len(live.log_text())
    first = _burst(live, token, 48, "old")
    assert {r["transport"] for r in first} == {"custom"}
    assert len(_send_pids(live, mark)) == 2, "both workers must hold pooled connections"
    assert len(old.messages) == 48

    # One worker takes the save; the other still has open connections to `old`.
    assert live.request("POST", "/api/smtp/settings", _settings(new), token=token).status == 200
    mark = len(live.log_text())
    _burst(live, token, 48, "new")
    assert len(_send_pids(live, mark)) == 2
    assert len(old.messages) == 48, "a worker kept sending through the old server"
    assert _subjects(new) == sorted(f"new-{i}" for i in range(48))

    assert live.request("DELETE", "/api/smtp/settings", token=token).status == 200
    mark = len(live.log_text())
    after_delete = _burst(live, token, 48, "gone")
    assert len(_send_pids(live, mark)) == 2
    assert {r["transport"] for r in after_delete} == {"global"}
    assert len(old.messages) == 48 and len(new.messages) == 48
    assert _subjects(live.global_server) == sorted(f"gone-{i}" for i in range(48))

    # Workers QUIT their pooled connections when they exit.
    quits_before = old.handler.quits + new.handler.quits + live.global_server.handler.quits
    assert live.stop() == 0
    quits_after = old.handler.quits + new.handler.quits + live.global_server.handler.quits
    assert quits_after > quits_before
    live.assert_log_clean()

"""Account isolation: a valid token for acct-b gives no access to acct-a's settings, senders,
suppressions, messages or open counts, and leaves acct-a's files byte for byte as they were."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import pytest
from itsdangerous import URLSafeSerializer

from smtp_service.api.tracking import PIXEL
from tests.conftest import SMTP_PASSWORD, SMTP_USER, settings_body
from tests.security import tree_state

A_SENDER = "a-sender@example.com"
A_SUPPRESSED = "bad-a@example.net"


@dataclass
class AccountA:
    """What acct-a owns after the setup, and how to look at it."""

    folder: str
    message_id: str
    pixel: str  # the path of the genuine open pixel of message_id

    def files(self) -> dict[str, tuple[Any, ...]]:
        return tree_state(self.folder)


def _send(client, tokens, account, http_headers=None, **body):
    payload = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hi", "text": "x", **body}
    headers = {**tokens.headers(account), **(http_headers or {})}
    return client.post("/api/messages/send-email", json=payload, headers=headers)


def _add_confirmed_sender(client, tokens, global_server, account: str, email: str) -> None:
    """Add a sender and confirm it with the code the global server received for it."""
    r = client.post("/api/senders", json={"email": email}, headers=tokens.headers(account))
    assert r.status_code == 201, r.json
    text = global_server.messages[-1].message.get_body(("plain",)).get_content()
    code = re.search(r"[A-Z2-7]{4}(?:-[A-Z2-7]{4}){3}", text).group(0)
    r = client.post(f"/api/senders/{email}/confirm", json={"code": code},
                    headers=tokens.headers(account))
    assert r.status_code == 200, r.json


def _views(client, tokens, message_id: str) -> dict[str, Any]:
    """Everything acct-a can read about itself (the settings view has no timestamp that moves)."""
    headers = tokens.headers("acct-a")
    return {
        "settings": client.get("/api/smtp/settings", headers=headers).json,
        "senders": client.get("/api/senders", headers=headers).json,
        "suppressions": client.get("/api/suppressions", headers=headers).json,
        "message": client.get(f"/api/messages/{message_id}", headers=headers).json,
    }


@pytest.fixture
def account_a(app, client, tokens, smtp_server) -> AccountA:
    headers = tokens.headers("acct-a")
    r = client.post("/api/smtp/settings", json=settings_body(smtp_server), headers=headers)
    assert r.status_code == 200, r.json
    r = client.post("/api/senders", json={"email": A_SENDER}, headers=headers)
    assert r.status_code == 201, r.json
    r = _send(client, tokens, "acct-a", html="<p>Hello A</p>")
    assert r.status_code == 200 and r.json["transport"] == "custom", r.json
    message_id = r.json["messageId"]
    html = [
        p for p in smtp_server.messages[-1].message.walk() if p.get_content_type() == "text/html"
    ][0].get_payload(decode=True).decode()
    match = re.search(r'src="[^"]*(/t/open/[^"]+\.gif)"', html)
    assert match, html
    assert client.get(match.group(1)).data == PIXEL  # one genuine open
    r = _send(client, tokens, "acct-a", to=A_SUPPRESSED)
    assert r.status_code == 502 and r.json["bounce"]["type"] == "hard", r.json
    folder = os.path.join(app.config["DATA_DIR"], "shared-data", "acct-a")
    assert {"smtp-settings.json", "senders.json"} <= set(os.listdir(folder))
    return AccountA(folder=folder, message_id=message_id, pixel=match.group(1))


def test_b_cannot_read_change_delete_or_test_a_settings(
    client, tokens, smtp_server, smtp_factory, account_a
):
    files, views = account_a.files(), _views(client, tokens, account_a.message_id)
    assert views["settings"]["isGlobal"] is False and views["settings"]["user"] == SMTP_USER
    b = tokens.headers("acct-b")

    # reading: B sees the global server, whatever it says about A in the query or headers
    for query, extra in (("", {}), ("?accountId=acct-a", {"X-Account-Id": "acct-a"})):
        r = client.get(f"/api/smtp/settings{query}", headers={**b, **extra})
        assert r.status_code == 200 and r.json["isGlobal"] is True
        assert SMTP_USER not in r.get_data(as_text=True)
        assert str(smtp_server.port) not in r.get_data(as_text=True)

    # changing and deleting act on B's own file only
    other = smtp_factory()
    r = client.post("/api/smtp/settings", json=settings_body(other, user="b@example.com"),
                    headers=b)
    assert r.status_code == 200
    r = client.post("/api/smtp/settings", json={**settings_body(other), "accountId": "acct-a"},
                    headers=b)
    assert r.status_code == 400 and "accountId" in r.json["details"]
    for _ in range(2):
        assert client.delete("/api/smtp/settings", headers=b).status_code == 200

    # testing: B cannot make the service use A's stored password
    body = {"host": "localhost", "port": smtp_server.port, "user": SMTP_USER}
    r = client.post("/api/smtp/test", json=body, headers=b)
    assert r.status_code == 400 and "pass" in r.json["details"]
    r = client.post("/api/smtp/test", json={**body, "pass": "guess", "accountId": "acct-a"},
                    headers=b)
    assert r.status_code == 400 and "accountId" in r.json["details"]
    smtp_server.auth_attempts.clear()
    r = client.post("/api/smtp/test", json={**body, "pass": "guess-123456"}, headers=b)
    assert r.status_code == 400 and r.json["success"] is False
    assert "Authentication failed" in r.json["error"]
    # smtplib tries each offered mechanism; every attempt was B's guess, never A's password
    assert smtp_server.auth_attempts and set(smtp_server.auth_attempts) == {(SMTP_USER, False)}
    assert SMTP_PASSWORD not in r.get_data(as_text=True)

    assert account_a.files() == files
    assert _views(client, tokens, account_a.message_id) == views


def test_b_cannot_list_or_delete_a_senders(client, tokens, account_a):
    files, views = account_a.files(), _views(client, tokens, account_a.message_id)
    assert [s["email"] for s in views["senders"]["senders"]] == [A_SENDER]
    b = tokens.headers("acct-b")
    assert client.get("/api/senders", headers=b).json == {"senders": []}
    for path in (
        A_SENDER,
        A_SENDER.upper(),
        "../acct-a/senders.json",
        "..%2Facct-a%2Fsenders.json",
    ):
        r = client.delete(f"/api/senders/{path}", headers=b)
        assert r.status_code == 404, (path, r.json)
    # the same address is a separate entry for B
    assert client.post("/api/senders", json={"email": A_SENDER}, headers=b).status_code == 201
    assert client.delete(f"/api/senders/{A_SENDER}", headers=b).status_code == 200
    assert account_a.files() == files
    assert _views(client, tokens, account_a.message_id) == views


def test_b_cannot_list_or_delete_a_suppressions(client, tokens, account_a):
    files, views = account_a.files(), _views(client, tokens, account_a.message_id)
    assert [s["email"] for s in views["suppressions"]["suppressions"]] == [A_SUPPRESSED]
    b = tokens.headers("acct-b")
    assert client.get("/api/suppressions", headers=b).json == {"suppressions": []}
    for path in (A_SUPPRESSED, A_SUPPRESSED.upper(), "%25", "*"):
        r = client.delete(f"/api/suppressions/{path}", headers=b)
        assert r.status_code == 404, (path, r.json)
    # A's suppression still blocks A's sends
    r = _send(client, tokens, "acct-a", to=A_SUPPRESSED)
    assert r.status_code == 422
    assert account_a.files() == files
    assert _views(client, tokens, account_a.message_id) == views


def test_b_cannot_list_or_count_a_messages(client, tokens, account_a):
    a, b = tokens.headers("acct-a"), tokens.headers("acct-b")
    mine = client.get("/api/messages/stats", headers=a).json["total"]
    assert (mine["messages"], mine["sent"], mine["bounced"], mine["opened"]) == (2, 1, 1, 1)
    theirs = client.get("/api/messages/stats", headers=b).json["total"]
    assert (theirs["messages"], theirs["opens"], theirs["hardBounces"]) == (0, 0, 0)
    assert client.get("/api/messages", headers=b).json == {"messages": [], "nextCursor": None}
    for query in ({"to": "rcpt@example.net"}, {"from": SMTP_USER}, {"status": "sent"}):
        assert client.get("/api/messages", query_string=query, headers=b).json["messages"] == []
    # A's cursor does not continue in B's account
    cursor = client.get("/api/messages", query_string={"limit": 1}, headers=a).json["nextCursor"]
    r = client.get("/api/messages", query_string={"cursor": cursor}, headers=b)
    assert r.status_code == 400 and list(r.json["details"]) == ["cursor"]


def test_b_gets_404_for_a_message_exactly_as_for_no_message(client, tokens, account_a):
    views = _views(client, tokens, account_a.message_id)
    assert views["message"]["messageId"] == account_a.message_id
    b = tokens.headers("acct-b")
    theirs = client.get(f"/api/messages/{account_a.message_id}", headers=b)
    missing = client.get(f"/api/messages/{'0' * len(account_a.message_id)}", headers=b)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.get_data() == missing.get_data()
    assert account_a.message_id not in theirs.get_data(as_text=True)
    mine = client.get(f"/api/messages/{'0' * len(account_a.message_id)}",
                      headers=tokens.headers("acct-a"))
    assert mine.status_code == 404 and mine.get_data() == missing.get_data()
    assert _views(client, tokens, account_a.message_id) == views


def test_open_pixel_counts_only_for_its_own_account_and_message(
    app, client, tokens, global_server, account_a
):
    views = _views(client, tokens, account_a.message_id)
    assert views["message"]["opens"] == 1
    _add_confirmed_sender(client, tokens, global_server, "acct-b", "b-sender@example.com")
    r = _send(client, tokens, "acct-b", html="<p>Hello B</p>", **{"from": "b-sender@example.com"})
    assert r.status_code == 200 and r.json["transport"] == "global", r.json
    b_message = r.json["messageId"]

    tracker = app.extensions["smtp_service"].mailer.tracker
    token_a = account_a.pixel.rsplit("/", 1)[1][: -len(".gif")]
    payload_a, _, _signature_a = token_a.rpartition(".")
    signature_b = tracker.url("acct-b", b_message).rsplit("/", 1)[1][: -len(".gif")]
    forged = URLSafeSerializer(b"not the service's key", salt="smtp-service-open-pixel")
    hostile = [
        tracker.url("acct-b", account_a.message_id),  # A's message under B's account
        tracker.url("acct-a", b_message),  # B's message under A's account
        tracker.url("acct-a", "0" * len(b_message)),  # no such message
        "/t/open/" + forged.dumps({"a": "acct-a", "m": account_a.message_id}) + ".gif",
        "/t/open/" + forged.dumps({"a": "acct-b", "m": b_message}) + ".gif",
        f"/t/open/{payload_a}.{signature_b.rpartition('.')[2]}.gif",  # spliced signature
    ]
    for url in hostile:
        g = client.get(url[url.index("/t/open/"):])
        assert g.status_code == 200 and g.data == PIXEL, url

    headers_b = tokens.headers("acct-b")
    assert client.get(f"/api/messages/{b_message}", headers=headers_b).json["opens"] == 0
    assert _views(client, tokens, account_a.message_id)["message"]["opens"] == 1
    # the genuine pixels still count (for another reader: one open per reader and window),
    # each for its own message only
    assert client.get(account_a.pixel, headers={"User-Agent": "another reader"}).data == PIXEL
    assert _views(client, tokens, account_a.message_id)["message"]["opens"] == 2
    assert client.get(f"/api/messages/{b_message}", headers=headers_b).json["opens"] == 0


def test_idempotency_keys_do_not_replay_across_accounts(client, tokens, smtp_server,
                                                        global_server, account_a):
    for account in ("acct-a", "acct-b"):
        _add_confirmed_sender(client, tokens, global_server, account, "shared@example.com")
    confirmations = len(global_server.messages)
    files = account_a.files()  # after A's own change
    key = {"Idempotency-Key": "order-1"}
    body = {"from": "shared@example.com", "subject": "Same"}
    first = _send(client, tokens, "acct-a", http_headers=key, **body)
    second = _send(client, tokens, "acct-b", http_headers=key, **body)
    assert first.status_code == second.status_code == 200
    assert first.json["messageId"] != second.json["messageId"]
    assert (first.json["transport"], second.json["transport"]) == ("custom", "global")
    assert len(global_server.messages) == confirmations + 1
    b = tokens.headers("acct-b")
    assert client.get(f"/api/messages/{first.json['messageId']}", headers=b).status_code == 404
    assert account_a.files() == files

"""Idempotency-Key: equal requests replay, whatever their JSON spelling; the store keeps the
domain result, not an HTTP answer."""

from __future__ import annotations

import json

from tests.conftest import SMTP_USER, settings_body

SEND = "/api/messages/send-email"


def _use(client, tokens, server):
    r = client.post("/api/smtp/settings", json=settings_body(server), headers=tokens.headers())
    assert r.status_code == 200, r.json


def _post_raw(client, tokens, text: str, key: str):
    headers = {**tokens.headers(), "Idempotency-Key": key, "Content-Type": "application/json"}
    return client.post(SEND, data=text, headers=headers)


def test_the_same_request_spelled_differently_replays(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    first = _post_raw(client, tokens, json.dumps(
        {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hi", "text": "x"}), "k-1")
    again = _post_raw(client, tokens, json.dumps(
        {"text": "x", "subject": "Hi", "to": ["rcpt@example.net"], "from": SMTP_USER,
         "trackOpens": True, "cc": []}, indent=2), "k-1")
    assert first.status_code == again.status_code == 200
    assert first.json == again.json
    assert len(smtp_server.messages) == 1
    other = _post_raw(client, tokens, json.dumps(
        {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hi", "text": "y"}), "k-1")
    assert other.status_code == 409
    assert other.json == {"error": "Idempotency-Key was already used with a different request"}


def test_the_store_keeps_the_send_result(app, client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    body = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hi", "text": "x"}
    r = client.post(SEND, json=body, headers={**tokens.headers(), "Idempotency-Key": "k-2"})
    assert r.status_code == 200
    from smtp_service.services.domain import SendRequest

    digest = SendRequest(sender=SMTP_USER, to=["rcpt@example.net"], subject="Hi",
                         text="x").digest()
    state, stored = app.extensions["smtp_service"].idempotency.claim("acct-a", "k-2", digest)
    assert state == "replay"
    assert stored["outcome"] == "sent" and stored["message_id"] == r.json["messageId"]
    assert "success" not in stored  # a domain result, not the HTTP body


def test_a_refused_send_frees_its_key(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    body = {"from": SMTP_USER, "to": "later@example.net", "subject": "Hi", "text": "x"}
    headers = {**tokens.headers(), "Idempotency-Key": "k-3"}
    first = client.post(SEND, json=body, headers=headers)
    assert first.status_code == 502 and first.json["bounce"]["type"] == "soft"
    second = client.post(SEND, json=body, headers=headers)
    assert second.status_code == 502 and second.json["messageId"] != first.json["messageId"]

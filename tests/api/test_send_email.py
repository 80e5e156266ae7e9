"""The sending path end to end in the app, against real aiosmtpd servers (STARTTLS + AUTH)."""

from __future__ import annotations

import base64
import json
import logging
import os
import re

import pytest

from tests.conftest import SMTP_PASSWORD, SMTP_USER, settings_body

GLOBAL_FROM = "noreply@example.com"


def _send(client, tokens, account="acct-a", http_headers=None, **body):
    payload = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hello",
               "text": "Hi there", **body}
    return client.post("/api/messages/send-email", json=payload,
                       headers={**tokens.headers(account), **(http_headers or {})})


def _use(client, tokens, server, account="acct-a", **overrides):
    r = client.post("/api/smtp/settings", json=settings_body(server, **overrides),
                    headers=tokens.headers(account))
    assert r.status_code == 200, r.json


def test_custom_path(client, tokens, smtp_server, global_server):
    _use(client, tokens, smtp_server)
    r = _send(client, tokens)
    assert r.status_code == 200, r.json
    assert r.json["success"] is True and r.json["transport"] == "custom"
    assert r.json["accepted"] == ["rcpt@example.net"] and r.json["rejected"] == []
    assert len(smtp_server.messages) == 1 and global_server.messages == []
    got = smtp_server.messages[0]
    assert got.auth_login == SMTP_USER and got.tls is True
    assert got.mail_from == SMTP_USER and got.rcpt_tos == ["rcpt@example.net"]
    assert got.message["Message-ID"] == f"<{r.json['messageId']}>"
    assert got.message["Subject"] == "Hello"


def test_global_path(client, tokens, smtp_server, global_server):
    r = _send(client, tokens, **{"from": GLOBAL_FROM})
    assert r.status_code == 200, r.json
    assert r.json["transport"] == "global"
    assert [m.auth_login for m in global_server.messages] == ["global@example.com"]
    # the custom user's address is not allowed through the global server
    r = _send(client, tokens)
    assert r.status_code == 403
    assert r.json == {"error": f"Sender {SMTP_USER} is not verified for this account"}
    assert len(global_server.messages) == 1


@pytest.mark.parametrize("breakage", ["not json", "other account's ciphertext", "bad port"])
def test_fallback_to_global_on_broken_stored_settings(app, client, tokens, smtp_server,
                                                      global_server, caplog, breakage):
    _use(client, tokens, smtp_server, account="acct-a")
    _use(client, tokens, smtp_server, account="acct-b")
    path_a = os.path.join(app.config["DATA_DIR"], "shared-data", "acct-a", "smtp-settings.json")
    path_b = path_a.replace("acct-a", "acct-b")
    with open(path_a) as handle:
        doc = json.load(handle)
    if breakage == "not json":
        text = "{broken"
    elif breakage == "bad port":
        text = json.dumps({**doc, "port": "x"})
    else:
        with open(path_b) as handle:
            text = json.dumps({**doc, "pass": json.load(handle)["pass"]})
    with open(path_a, "w") as handle:
        handle.write(text)
    caplog.set_level(logging.WARNING)
    r = _send(client, tokens, **{"from": GLOBAL_FROM})
    assert r.status_code == 200, r.json
    assert r.json["transport"] == "global"
    assert len(global_server.messages) == 1 and smtp_server.messages == []
    assert "falling back to global" in caplog.text
    assert SMTP_PASSWORD not in caplog.text


def test_settings_changed_and_deleted_while_pooled(client, tokens, smtp_factory, global_server):
    first, second = smtp_factory(), smtp_factory()
    _use(client, tokens, first)
    assert _send(client, tokens).status_code == 200
    _use(client, tokens, second)
    assert _send(client, tokens).status_code == 200
    assert (len(first.messages), len(second.messages)) == (1, 1)
    client.delete("/api/smtp/settings", headers=tokens.headers())
    r = _send(client, tokens, **{"from": GLOBAL_FROM})
    assert r.json["transport"] == "global"
    assert (len(first.messages), len(second.messages), len(global_server.messages)) == (1, 1, 1)


def test_pooled_connection_is_reused(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    smtp_server.auth_attempts.clear()
    for _ in range(5):
        assert _send(client, tokens).status_code == 200
    assert len(smtp_server.messages) == 5
    assert len(smtp_server.auth_attempts) == 1  # one connection, one login


def test_unverified_sender_is_refused_and_nothing_sent(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    r = _send(client, tokens, **{"from": "ceo@example.com"})
    assert r.status_code == 403
    assert r.json["error"] == "Sender ceo@example.com is not verified for this account"
    assert smtp_server.messages == []
    r = client.post("/api/senders", json={"email": "ceo@example.com", "name": "CEO"},
                    headers=tokens.headers())
    assert r.status_code == 201 and r.json["email"] == "ceo@example.com"
    r = client.get("/api/senders", headers=tokens.headers())
    assert [s["email"] for s in r.json["senders"]] == ["ceo@example.com"]
    assert client.get("/api/senders", headers=tokens.headers("acct-b")).json["senders"] == []
    r = _send(client, tokens, **{"from": "The CEO <ceo@example.com>"})
    assert r.status_code == 200, r.json
    assert client.post("/api/senders", json={"email": "CEO@example.com"},
                       headers=tokens.headers()).status_code == 409
    assert client.delete("/api/senders/ceo@example.com",
                         headers=tokens.headers("acct-b")).status_code == 404
    assert client.delete("/api/senders/ceo@example.com",
                         headers=tokens.headers()).status_code == 200
    assert _send(client, tokens, **{"from": "ceo@example.com"}).status_code == 403


def test_hard_bounce_suppresses_and_soft_does_not(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    r = _send(client, tokens, to="bad-user@example.net")
    assert r.status_code == 502
    assert r.json["success"] is False
    assert r.json["bounce"] == {"type": "hard", "code": 550, "enhancedCode": "5.1.1",
                                "recipients": ["bad-user@example.net"]}
    record = client.get(f"/api/messages/{r.json['messageId']}", headers=tokens.headers()).json
    assert record["status"] == "bounced"
    sup = client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"]
    assert [s["email"] for s in sup] == ["bad-user@example.net"]
    assert sup[0]["code"] == 550 and sup[0]["enhancedCode"] == "5.1.1"
    r = _send(client, tokens, to=["ok@example.net", "BAD-user@example.net"])
    assert r.status_code == 422 and "bad-user@example.net" in r.json["error"].lower()
    assert smtp_server.messages == []
    assert client.delete("/api/suppressions/bad-user@example.net",
                         headers=tokens.headers()).status_code == 200
    assert _send(client, tokens, to="bad-user@example.net").status_code == 502

    r = _send(client, tokens, to="later@example.net")
    assert r.status_code == 502
    assert r.json["bounce"] == {"type": "soft", "code": 451, "enhancedCode": "4.7.1",
                                "recipients": ["later@example.net"]}
    sup = client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"]
    assert "later@example.net" not in [s["email"] for s in sup]
    assert client.get("/api/suppressions", headers=tokens.headers("acct-b")).json == {
        "suppressions": []}


def test_partial_rejection_is_a_200_with_rejected(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    r = _send(client, tokens, to=["good@example.net", "bad-one@example.net"],
              cc="later-x@example.net")
    assert r.status_code == 200, r.json
    assert r.json["accepted"] == ["good@example.net"]
    assert sorted(r.json["rejected"]) == ["bad-one@example.net", "later-x@example.net"]
    assert smtp_server.messages[0].rcpt_tos == ["good@example.net"]
    sup = client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"]
    assert [s["email"] for s in sup] == ["bad-one@example.net"]
    record = client.get(f"/api/messages/{r.json['messageId']}", headers=tokens.headers()).json
    assert record["status"] == "sent"
    assert {x["email"]: x["type"] for x in record["rejected"]} == {
        "bad-one@example.net": "hard", "later-x@example.net": "soft"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"subject": "Hi\r\nBcc: victim@example.org"}, "subject"),
        ({"to": "a@example.net\r\nBcc: victim@example.org"}, "to"),
        ({"from": f"{SMTP_USER}\nBcc: victim@example.org"}, "from"),
        ({"headers": {"X-Test": "v\r\nBcc: victim@example.org"}}, "headers"),
        ({"headers": {"Bcc": "victim@example.org"}}, "headers"),
        ({"headers": {"X Bad Name": "v"}}, "headers"),
        ({"replyTo": "r@example.net\rX-Injected: 1"}, "replyTo"),
        ({"attachments": [{"filename": "a\r\n.txt", "content": "aGk="}]}, "attachments"),
        ({"to": "not-an-address"}, "to"),
        ({"to": []}, "to"),
        ({"text": None}, "text"),
    ],
)
def test_injection_and_bad_input_are_400_and_nothing_is_delivered(client, tokens, smtp_server,
                                                                  change, field):
    _use(client, tokens, smtp_server)
    body = {**change}
    if field == "text":
        body["html"] = None
    r = _send(client, tokens, **body)
    assert r.status_code == 400, r.json
    assert r.json["error"] == "Validation failed" and field in r.json["details"]
    assert smtp_server.messages == []


def test_limits(app, client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    many = [f"r{i}@example.net" for i in range(51)]
    r = _send(client, tokens, to=many)
    assert r.status_code == 400 and "50" in r.json["details"]["to"][0]
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
    app.extensions["smtp_service"].mailer.max_message_bytes = 100_000
    blob = base64.b64encode(os.urandom(200_000)).decode()
    r = _send(client, tokens, attachments=[{"filename": "big.bin", "content": blob}])
    assert r.status_code == 413
    assert smtp_server.messages == []


def test_open_pixel(app, client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    r = _send(client, tokens, html="<html><body><p>Hi</p></body></html>")
    message_id = r.json["messageId"]
    raw = smtp_server.messages[0].data.decode()
    html_part = [p for p in smtp_server.messages[0].message.walk()
                 if p.get_content_type() == "text/html"][0].get_payload(decode=True).decode()
    match = re.search(r'src="[^"]*(/t/open/[^"]+\.gif)"', html_part)
    assert match, raw
    pixel = match.group(1)
    # two readers (user agents), each fetching twice: two opens (one per reader and window)
    for agent in ("reader-one", "reader-one", "reader-two", "reader-two"):
        g = client.get(pixel, headers={"User-Agent": agent})
        assert g.status_code == 200 and g.mimetype == "image/gif"
        assert "no-store" in g.headers["Cache-Control"]
    record = client.get(f"/api/messages/{message_id}", headers=tokens.headers()).json
    assert record["opens"] == 2 and record["firstOpenedAt"]
    assert [e["type"] for e in record["events"]].count("open") == 2

    # forged, tampered and other-account tokens: the same GIF, no open counted
    from smtp_service.api.tracking import PIXEL

    tracker = app.extensions["smtp_service"].mailer.tracker
    other = tracker.url("acct-b", message_id).split("/t/open/", 1)[1]
    for bad in ["/t/open/garbage.gif", pixel[:-8] + "AAAA.gif", f"/t/open/{other}"]:
        g = client.get(bad)
        assert g.status_code == 200 and g.mimetype == "image/gif" and g.data == PIXEL
    record = client.get(f"/api/messages/{message_id}", headers=tokens.headers()).json
    assert record["opens"] == 2

    # trackOpens false: no pixel
    _send(client, tokens, html="<p>x</p>", trackOpens=False)
    assert "/t/open/" not in smtp_server.messages[-1].data.decode()


def test_message_record_is_private(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    message_id = _send(client, tokens).json["messageId"]
    r = client.get(f"/api/messages/{message_id}", headers=tokens.headers())
    assert r.status_code == 200
    assert r.json["status"] == "sent" and r.json["transport"] == "custom"
    assert r.json["recipients"] == ["rcpt@example.net"]
    assert client.get(f"/api/messages/{message_id}",
                      headers=tokens.headers("acct-b")).status_code == 404


def test_idempotent_retry_sends_once(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    key = {"Idempotency-Key": "order-42"}
    first = _send(client, tokens, http_headers=key)
    second = _send(client, tokens, http_headers=key)
    assert first.status_code == second.status_code == 200
    assert first.json == second.json
    assert len(smtp_server.messages) == 1
    r = _send(client, tokens, http_headers=key, subject="Different")
    assert r.status_code == 409
    assert len(smtp_server.messages) == 1
    # the key is per account
    assert _send(client, tokens, account="acct-b", http_headers=key,
                 **{"from": GLOBAL_FROM}).status_code == 200


def test_attachments_and_utf8(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    data = os.urandom(3000)
    r = _send(client, tokens, to="jörg@example.net", subject="Grüße aus Köln ✓",
              text="Hällo — ünïcödé", html="<p>Hällo</p>", trackOpens=False,
              attachments=[{"filename": "daten.bin", "content": base64.b64encode(data).decode(),
                            "contentType": "application/octet-stream"}])
    assert r.status_code == 200, r.json
    msg = smtp_server.messages[0].message
    assert smtp_server.messages[0].rcpt_tos == ["jörg@example.net"]
    from email.header import decode_header, make_header

    assert str(make_header(decode_header(msg["Subject"]))) == "Grüße aus Köln ✓"
    parts = {p.get_content_type(): p for p in msg.walk()}
    assert parts["text/plain"].get_payload(decode=True).decode().strip() == "Hällo — ünïcödé"
    assert parts["application/octet-stream"].get_payload(decode=True) == data
    assert parts["application/octet-stream"].get_filename() == "daten.bin"


def test_smtputf8_needed_but_not_offered_is_a_clear_error(client, tokens, smtp_factory):
    server = smtp_factory(smtputf8=False)
    _use(client, tokens, server)
    r = _send(client, tokens, to="jörg@example.net")
    assert 400 <= r.status_code < 600 and r.status_code != 500
    assert "SMTPUTF8" in r.json["error"]
    assert server.messages == []


def test_no_server_at_all_is_503(app_config, tokens):
    from smtp_service import create_app

    config = {**app_config, "SMTP_HOST": ""}
    client = create_app(config).test_client()
    r = _send(client, tokens, **{"from": GLOBAL_FROM})
    assert r.status_code == 503


def test_display_names_are_bounded(client, tokens, smtp_server):
    _use(client, tokens, smtp_server)
    long_name = "Ä" * 129
    r = _send(client, tokens, to=f"{long_name} <rcpt@example.net>")
    assert r.status_code == 400 and "Display name longer than 128" in r.json["details"]["to"][0]
    r = _send(client, tokens, to=f"{'Ä' * 128} <rcpt@example.net>")
    assert r.status_code == 200, r.json
    assert len(smtp_server.messages) == 1

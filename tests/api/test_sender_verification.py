"""Verified senders on the global server (issue 11): a sender proves its address with a code
sent through the global server before it may send through it; on the account's own server its
senders work as before. Every code is read from what the global aiosmtpd server received."""

from __future__ import annotations

import json
import os
import re

import pytest

from smtp_service import create_app
from tests.conftest import SMTP_USER, settings_body

SEND = "/api/messages/send-email"
GLOBAL_FROM = "noreply@example.com"
CODE = re.compile(r"\b([A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4})\b")


def add(client, tokens, email, account="acct-a"):
    return client.post("/api/senders", json={"email": email, "name": "Boss"},
                       headers=tokens.headers(account))


def send_as(client, tokens, sender, account="acct-a"):
    body = {"from": sender, "to": "rcpt@example.net", "subject": "Hi", "text": "Hi"}
    return client.post(SEND, json=body, headers=tokens.headers(account))


def confirm(client, tokens, email, code, account="acct-a"):
    return client.post(f"/api/senders/{email}/confirm", json={"code": code},
                       headers=tokens.headers(account))


def code_sent_to(server, email: str) -> str:
    """The code of the last confirmation message the server received for `email`."""
    for received in reversed(server.messages):
        if received.rcpt_tos == [email]:
            body = received.message.get_body(("plain",)).get_content()
            return CODE.search(body).group(1)
    raise AssertionError(f"no confirmation message to {email}")


def test_a_sender_sends_through_the_global_server_only_once_confirmed(client, tokens,
                                                                      global_server):
    r = add(client, tokens, "ceo@bigbank.example")
    assert r.status_code == 201, r.json
    assert r.json["status"] == "pending" and r.json["email"] == "ceo@bigbank.example"
    confirmation = global_server.messages[-1]
    assert confirmation.rcpt_tos == ["ceo@bigbank.example"]
    assert confirmation.mail_from == GLOBAL_FROM
    assert confirmation.message["Auto-Submitted"] == "auto-generated"
    code = code_sent_to(global_server, "ceo@bigbank.example")

    # the test: From: CEO <ceo@bigbank.example> through the global relay, a 200 before
    r = send_as(client, tokens, "CEO <ceo@bigbank.example>")
    assert r.status_code == 403, r.json
    assert len(global_server.messages) == 1  # only the confirmation

    assert confirm(client, tokens, "ceo@bigbank.example", "AAAA-BBBB-CCCC-DDDD").status_code == 400
    assert confirm(client, tokens, "ceo@bigbank.example", code, "acct-b").status_code == 404
    r = confirm(client, tokens, "ceo@bigbank.example", code.lower().replace("-", " "))
    assert r.status_code == 200, r.json
    assert r.json["status"] == "confirmed"
    listed = client.get("/api/senders", headers=tokens.headers()).json["senders"]
    assert [(s["email"], s["status"]) for s in listed] == [("ceo@bigbank.example", "confirmed")]

    r = send_as(client, tokens, "CEO <ceo@bigbank.example>")
    assert r.status_code == 200, r.json
    assert r.json["transport"] == "global"
    assert global_server.messages[-1].mail_from == "ceo@bigbank.example"
    # confirming again is harmless
    assert confirm(client, tokens, "ceo@bigbank.example", code).json["status"] == "confirmed"


def test_a_code_is_for_one_account_and_one_address(client, tokens, global_server):
    assert add(client, tokens, "a@example.org").status_code == 201
    assert add(client, tokens, "b@example.org").status_code == 201
    assert add(client, tokens, "a@example.org", "acct-b").status_code == 201
    code_a = code_sent_to(global_server, "a@example.org")  # acct-b's, the last one sent
    assert confirm(client, tokens, "b@example.org", code_a).status_code == 400
    assert confirm(client, tokens, "a@example.org", code_a).status_code == 400  # acct-a's differs
    assert confirm(client, tokens, "a@example.org", code_a, "acct-b").status_code == 200


def test_a_pending_sender_sends_through_the_accounts_own_server(client, tokens, smtp_server,
                                                                global_server):
    r = client.post("/api/smtp/settings", json=settings_body(smtp_server), headers=tokens.headers())
    assert r.status_code == 200
    assert add(client, tokens, "ceo@bigbank.example").json["status"] == "pending"
    r = send_as(client, tokens, "ceo@bigbank.example")
    assert r.status_code == 200, r.json
    assert r.json["transport"] == "custom"
    assert smtp_server.messages[-1].mail_from == "ceo@bigbank.example"


def test_an_expired_code_is_refused(app, client, tokens, global_server):
    add(client, tokens, "late@example.org")
    code = code_sent_to(global_server, "late@example.org")
    path = os.path.join(app.config["DATA_DIR"], "shared-data", "acct-a", "senders.json")
    with open(path) as handle:
        doc = json.load(handle)
    doc["senders"][0]["confirmation"]["expiresAt"] = "2020-01-01T00:00:00.000Z"
    with open(path, "w") as handle:
        json.dump(doc, handle)
    r = confirm(client, tokens, "late@example.org", code)
    assert r.status_code == 400 and "expired" in r.json["details"]["code"][0]


def test_a_confirmation_the_global_server_refuses_is_502_and_nothing_is_kept(client, tokens,
                                                                            global_server):
    r = add(client, tokens, "bad-mailbox@example.org")  # the test server refuses bad*: 550
    assert r.status_code == 502, r.json
    assert "550" in r.json["error"]
    assert client.get("/api/senders", headers=tokens.headers()).json["senders"] == []
    r = add(client, tokens, "fine@example.org")
    assert r.status_code == 201


def test_senders_stored_before_keep_working_and_an_operator_confirms_in_bulk(
    app, client, tokens, global_server, runner
):
    folder = os.path.join(app.config["DATA_DIR"], "shared-data", "acct-a")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "senders.json"), "w") as handle:
        json.dump({"senders": [{"email": "old@example.org", "name": None,
                                "createdAt": "2025-11-10T21:00:00.000Z"}]}, handle)
    listed = client.get("/api/senders", headers=tokens.headers()).json["senders"]
    assert [s["status"] for s in listed] == ["legacy"]
    assert send_as(client, tokens, "old@example.org").status_code == 200  # as before

    result = runner.invoke(args=["smtp", "senders", "list", "--status", "legacy"])
    assert result.exit_code == 0 and "acct-a\told@example.org\tlegacy" in result.output
    result = runner.invoke(args=["smtp", "senders", "confirm", "--account", "acct-a"])
    assert result.exit_code == 0 and "confirmed 1 sender(s)" in result.output
    listed = client.get("/api/senders", headers=tokens.headers()).json["senders"]
    assert [s["status"] for s in listed] == ["confirmed"]

    result = runner.invoke(args=["smtp", "senders", "revoke", "--status", "confirmed",
                                 "--domain", "example.org"])
    assert result.exit_code == 0 and "revoked 1 sender(s)" in result.output
    assert send_as(client, tokens, "old@example.org").status_code == 403


def test_an_idn_sender_is_confirmed_in_either_spelling(client, tokens, global_server):
    assert add(client, tokens, "chef@bücher.example").status_code == 201
    code = code_sent_to(global_server, "chef@xn--bcher-kva.example")
    assert confirm(client, tokens, "chef@bücher.example", code).json["status"] == "confirmed"
    assert send_as(client, tokens, "chef@xn--bcher-kva.example").status_code == 200


@pytest.mark.parametrize("mode", ["manual", "domains"])
def test_manual_mode_and_operator_domains(app_config, tokens, global_server, mode):
    config = dict(app_config)
    if mode == "manual":
        config["GLOBAL_SENDER_VERIFICATION"] = "manual"
    else:
        config["GLOBAL_SENDER_DOMAINS"] = "company.example, Partner.Example"
    app = create_app(config)
    client = app.test_client()
    try:
        if mode == "manual":
            r = add(client, tokens, "anyone@example.org")
            assert r.status_code == 201 and r.json["status"] == "confirmed"
            assert global_server.messages == []  # no confirmation
            assert send_as(client, tokens, "anyone@example.org").status_code == 200
        else:
            assert send_as(client, tokens, "news@company.example").status_code == 200
            assert send_as(client, tokens, "a@partner.example").status_code == 200
            assert send_as(client, tokens, "a@sub.company.example").status_code == 403
        assert send_as(client, tokens, SMTP_USER).status_code == 403
    finally:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()


def test_bad_verification_setting_stops_start_up(app_config):
    from smtp_service.config import ConfigError

    with pytest.raises(ConfigError, match="GLOBAL_SENDER_VERIFICATION must be confirm or manual"):
        create_app({**app_config, "GLOBAL_SENDER_VERIFICATION": "sometimes"})

"""The settings API against the real app and real SMTP servers: the spec's contract."""

from __future__ import annotations

import json
import logging
import os

import pytest

from tests.conftest import SMTP_PASSWORD, SPEC_EXAMPLE_VIEW, settings_body

SPEC_BODY = {
    "host": "smtp.example.com",
    "port": 587,
    "secure": False,
    "user": "user@example.com",
    "pass": "password",
}
SAVED_KEYS = {"host", "port", "secure", "user", "requireTls", "updatedAt", "updatedBy"}


def _settings_file(app, account: str) -> str:
    return os.path.join(app.config["DATA_DIR"], "shared-data", account, "smtp-settings.json")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def test_get_without_custom_settings_shows_the_global_server(client, tokens, global_server):
    r = client.get("/api/smtp/settings", headers=tokens.headers())
    assert r.status_code == 200
    assert r.json == {
        "host": "localhost",
        "port": global_server.port,
        "secure": False,
        "user": "global@example.com",
        "hasPassword": True,
        "isGlobal": True,
        "requireTls": True,
    }


def test_save_get_delete_round_trip_matches_the_spec(client, tokens, app):
    headers = tokens.headers("acct-a", user="user-id-123")
    r = client.post("/api/smtp/settings", json=SPEC_BODY, headers=headers)
    assert r.status_code == 200
    assert r.json["message"] == "SMTP settings saved successfully"
    saved = r.json["settings"]
    assert set(saved) == SAVED_KEYS
    assert saved["host"] == "smtp.example.com" and saved["port"] == 587
    assert saved["secure"] is False and saved["user"] == "user@example.com"
    assert saved["updatedBy"] == "user-id-123"
    assert saved["updatedAt"].endswith("Z") and len(saved["updatedAt"]) == 24

    r = client.get("/api/smtp/settings", headers=headers)
    assert r.json == SPEC_EXAMPLE_VIEW

    with open(_settings_file(app, "acct-a")) as handle:
        stored = json.load(handle)
    assert stored["pass"].startswith("enc:v1:") and "password" not in stored["pass"]
    assert stored["updatedBy"] == "user-id-123"

    r = client.delete("/api/smtp/settings", headers=headers)
    assert r.status_code == 200
    assert r.json == {"message": "SMTP settings removed. System will use global SMTP settings."}
    assert not os.path.exists(_settings_file(app, "acct-a"))
    assert client.get("/api/smtp/settings", headers=headers).json["isGlobal"] is True


def test_port_465_forces_secure(client, tokens):
    r = client.post(
        "/api/smtp/settings",
        json={**SPEC_BODY, "port": 465, "secure": False},
        headers=tokens.headers(),
    )
    assert r.status_code == 200
    assert r.json["settings"]["secure"] is True


def test_secure_is_optional_and_defaults_to_false(client, tokens):
    body = {k: v for k, v in SPEC_BODY.items() if k != "secure"}
    r = client.post("/api/smtp/settings", json=body, headers=tokens.headers())
    assert r.status_code == 200 and r.json["settings"]["secure"] is False


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"host": ""}, "host"),
        ({"host": "   "}, "host"),
        ({"host": None}, "host"),
        ({"host": 42}, "host"),
        ({"host": "bad host\r\nRCPT"}, "host"),
        ({"host": "a" * 254}, "host"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": -1}, "port"),
        ({"port": "587"}, "port"),
        ({"port": 587.5}, "port"),
        ({"port": True}, "port"),
        ({"port": None}, "port"),
        ({"user": ""}, "user"),
        ({"user": 5}, "user"),
        ({"user": "a\nb"}, "user"),
        ({"pass": ""}, "pass"),
        ({"pass": ["x"]}, "pass"),
        ({"pass": "p\x00w"}, "pass"),
        ({"secure": "yes"}, "secure"),
        ({"secure": 1}, "secure"),
        ({"requireTls": "false"}, "requireTls"),
        ({"extra": 1}, "extra"),
    ],
)
def test_every_validation_rule_gives_400_naming_the_field(client, tokens, app, change, field):
    client.post("/api/smtp/settings", json=SPEC_BODY, headers=tokens.headers())
    before = _read_bytes(_settings_file(app, "acct-a"))
    body = {**SPEC_BODY, **change}
    r = client.post("/api/smtp/settings", json=body, headers=tokens.headers())
    assert r.status_code == 400
    assert r.json["error"] == "Validation failed"
    assert field in r.json["details"], r.json
    assert _read_bytes(_settings_file(app, "acct-a")) == before
    r = client.post("/api/smtp/test", json=body, headers=tokens.headers())
    assert r.status_code == 400 and field in r.json["details"]


@pytest.mark.parametrize("missing", ["host", "port", "user", "pass"])
def test_required_fields(client, tokens, missing):
    body = {k: v for k, v in SPEC_BODY.items() if k != missing}
    r = client.post("/api/smtp/settings", json=body, headers=tokens.headers())
    assert r.status_code == 400
    assert r.json["details"][missing] == ["Missing data for required field."]


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"data": "{not json", "content_type": "application/json"}, 400, "Malformed JSON body"),
        ({"data": "[1, 2]", "content_type": "application/json"}, 400, "Validation failed"),
        (
            {"data": "host=x", "content_type": "application/x-www-form-urlencoded"},
            415,
            "Content-Type must be application/json",
        ),
        (
            {"data": "[" * 100000 + "]" * 100000, "content_type": "application/json"},
            400,
            "Malformed JSON body",
        ),
    ],
)
def test_bad_bodies_get_json_errors(client, tokens, kwargs, status, error):
    r = client.post("/api/smtp/settings", headers=tokens.headers(), **kwargs)
    assert r.status_code == status
    assert r.json["error"] == error


def test_body_over_the_limit_is_413(app, tokens):
    app.config["MAX_CONTENT_LENGTH"] = 1024
    r = app.test_client().post(
        "/api/smtp/settings", headers=tokens.headers(), json={**SPEC_BODY, "pass": "x" * 5000}
    )
    assert r.status_code == 413
    assert r.json == {"error": "Request body too large"}


def test_unknown_route_and_method_are_json(client, tokens):
    r = client.get("/api/nope", headers=tokens.headers())
    assert r.status_code == 404 and r.json == {"error": "Not found"}
    r = client.put("/api/smtp/settings", headers=tokens.headers(), json=SPEC_BODY)
    assert r.status_code == 405 and r.json == {"error": "Method not allowed"}
    assert "POST" in r.headers["Allow"]


def test_accounts_are_isolated(client, tokens, app):
    client.post("/api/smtp/settings", json=SPEC_BODY, headers=tokens.headers("acct-a"))
    r = client.get("/api/smtp/settings", headers=tokens.headers("acct-b"))
    assert r.json["isGlobal"] is True
    client.delete("/api/smtp/settings", headers=tokens.headers("acct-b"))
    assert os.path.exists(_settings_file(app, "acct-a"))
    assert (
        client.get("/api/smtp/settings", headers=tokens.headers("acct-a")).json["isGlobal"] is False
    )


def test_password_never_in_any_response_or_log(client, tokens, smtp_server, caplog):
    caplog.set_level(logging.DEBUG)
    secret = SMTP_PASSWORD
    bodies = []
    h = tokens.headers()
    for method, path, body in [
        ("post", "/api/smtp/test", settings_body(smtp_server)),
        ("post", "/api/smtp/test", settings_body(smtp_server, **{"pass": secret + "x"})),
        ("post", "/api/smtp/settings", settings_body(smtp_server)),
        ("get", "/api/smtp/settings", None),
        ("post", "/api/smtp/settings", settings_body(smtp_server, port=0)),
        ("delete", "/api/smtp/settings", None),
    ]:
        r = getattr(client, method)(path, headers=h, json=body)
        bodies.append(r.get_data(as_text=True))
    assert all(secret not in b for b in bodies)
    assert secret not in caplog.text

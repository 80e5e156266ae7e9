"""Settings files written by the old Node service load as that service read them (a port stored
as the string "587", booleans stored as strings, plaintext passwords), while the API stays
strict; a file that really cannot be used is named by encrypt-existing and rotate-key and never
counted as updated.

tests/fixtures/legacy-node-smtp-settings.json is such a file, byte for byte as the old service
wrote it (JSON.stringify(settings, null, 2), no final newline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from smtp_service import create_app
from smtp_service.services.crypto import SecretBox, new_key
from tests.conftest import SMTP_PASSWORD, SMTP_USER

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy-node-smtp-settings.json"
ACCOUNT = "acct-1"


def legacy() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


def settings_path(app, account: str = ACCOUNT) -> Path:
    return Path(app.config["DATA_DIR"], "shared-data", account, "smtp-settings.json")


def write(app, content: str | dict[str, Any], account: str = ACCOUNT) -> Path:
    """Write the file as the old service did: JSON.stringify(doc, null, 2), no lock."""
    path = settings_path(app, account)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return path


def view(app, tokens, account: str = ACCOUNT) -> dict[str, Any]:
    r = app.test_client().get("/api/smtp/settings", headers=tokens.headers(account))
    assert r.status_code == 200
    return r.json


def send(app, tokens, account: str = ACCOUNT):
    return app.test_client().post(
        "/api/messages/send-email",
        headers=tokens.headers(account),
        json={"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hi", "text": "x"},
    )


def pointing_at(server, **overrides: Any) -> dict[str, Any]:
    """The fixture's document, as the old service wrote it, for a test server."""
    return {
        **legacy(),
        "host": "localhost",
        "port": str(server.port),
        "user": SMTP_USER,
        "pass": SMTP_PASSWORD,
        **overrides,
    }


def test_the_fixture_is_the_issues_file():
    assert legacy() == {
        "host": "smtp.example.com",
        "port": "587",
        "secure": False,
        "user": "me@example.com",
        "pass": "pw-123456",
        "updatedAt": "2025-11-10T21:00:00.000Z",
        "updatedBy": "user-id-123",
    }


def test_the_old_services_file_is_the_accounts_own_server(app, tokens):
    """The issue's case: the account silently moved to the global server (isGlobal true)."""
    write(app, FIXTURE.read_text())
    assert view(app, tokens) == {
        "host": "smtp.example.com",
        "port": 587,
        "secure": False,
        "user": "me@example.com",
        "hasPassword": True,
        "isGlobal": False,
        "requireTls": True,
    }
    loaded = app.extensions["smtp_service"].settings.load(ACCOUNT)
    assert loaded.endpoint.port == 587 and loaded.endpoint.password.reveal() == "pw-123456"
    assert (loaded.updated_at, loaded.updated_by) == ("2025-11-10T21:00:00.000Z", "user-id-123")


def test_its_mail_goes_through_the_accounts_server(app, tokens, smtp_server, global_server):
    write(app, pointing_at(smtp_server))
    r = send(app, tokens)
    assert r.status_code == 200, r.json
    assert r.json["transport"] == "custom"
    assert len(smtp_server.messages) == 1 and smtp_server.messages[0].tls
    assert global_server.messages == []


def test_a_secure_of_true_as_a_string_is_implicit_tls(app, tokens, smtp_factory):
    implicit = smtp_factory("implicit")  # speaks only TLS from the first byte
    write(app, pointing_at(implicit, secure="true"))
    r = send(app, tokens)
    assert r.status_code == 200 and r.json["transport"] == "custom", r.json
    assert len(implicit.messages) == 1
    write(app, pointing_at(implicit, secure="false"))  # and "false" is not: no TLS greeting
    r = send(app, tokens)
    assert r.status_code == 502 and r.json["transport"] == "custom", r.json
    assert len(implicit.messages) == 1


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ({"port": " 587 ", "secure": "false"}, (587, False, True)),
        ({"port": "2525", "secure": "TRUE"}, (2525, True, True)),
        ({"port": "587", "secure": None}, (587, False, True)),
        ({"port": "465"}, (465, True, True)),  # no secure: implicit TLS, as Nodemailer did
        ({"port": 465, "secure": "false"}, (465, True, True)),  # the spec: forced for 465
        ({"port": "587", "requireTls": "false"}, (587, False, False)),
        ({"port": 587, "secure": False, "requireTls": None}, (587, False, True)),
    ],
)
def test_types_the_old_service_stored_are_read_as_it_read_them(app, tokens, stored, expected):
    document = {k: v for k, v in legacy().items() if k != "secure"}
    write(app, {**document, **stored})
    shown = view(app, tokens)
    assert shown["isGlobal"] is False
    assert (shown["port"], shown["secure"], shown["requireTls"]) == expected


UNUSABLE = {
    "port not a number": ({"port": "smtp"}, "port"),
    "port empty": ({"port": ""}, "port"),
    "port out of range": ({"port": "70000"}, "port"),
    "port a fraction": ({"port": 587.5}, "port"),
    "port a boolean": ({"port": True}, "port"),
    "port null": ({"port": None}, "port"),
    "secure yes": ({"secure": "yes"}, "secure"),
    "secure a number": ({"secure": 1}, "secure"),
    "host missing": ({"host": None}, "host"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
@pytest.mark.parametrize("command", ["encrypt-existing", "rotate-key"])
def test_a_file_that_cannot_be_used_is_named_and_not_counted_as_updated(
    app, app_config, tokens, case, command
):
    change, field = UNUSABLE[case]
    broken = {k: v for k, v in {**legacy(), **change}.items() if v is not None or k != "host"}
    if command == "rotate-key":  # a password under the previous key, as rotate-key finds it
        broken["pass"] = SecretBox([app_config["SMTP_ENCRYPTION_KEYS"]]).encrypt(
            "acct-broken", "pw-123456"
        )
    before = write(app, broken, "acct-broken").read_bytes()
    write(app, FIXTURE.read_text())  # usable: converted
    assert view(app, tokens, "acct-broken")["isGlobal"] is True  # unusable: global, as before

    keys = [new_key(), app_config["SMTP_ENCRYPTION_KEYS"]]
    runner = create_app({**app_config, "SMTP_ENCRYPTION_KEYS": ",".join(keys)}).test_cli_runner()
    result = runner.invoke(args=["smtp", command])

    assert result.exit_code == 1, result.output
    assert result.stdout == "updated 1, unchanged 0, failed 1\n"
    assert result.stderr == f"account acct-broken: settings file fails validation ({field})\n"
    assert settings_path(app, "acct-broken").read_bytes() == before  # left for a human
    assert json.loads(settings_path(app).read_text())["pass"].startswith("enc:v1:")
    assert "pw-123456" not in result.output + result.stderr


def test_encrypt_existing_converts_the_old_file_and_it_still_loads(app, runner, tokens):
    """Before: reported as updated while the file stayed unusable (the port string)."""
    write(app, FIXTURE.read_text())
    result = runner.invoke(args=["smtp", "encrypt-existing"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "updated 1, unchanged 0, failed 0\n"
    stored = json.loads(settings_path(app).read_text())
    assert stored["pass"].startswith("enc:v1:") and "pw-123456" not in settings_path(
        app
    ).read_text()
    assert {k: v for k, v in stored.items() if k != "pass"} == {
        k: v for k, v in legacy().items() if k != "pass"
    }  # only the password changed: the port is still the old service's "587"
    assert view(app, tokens)["isGlobal"] is False
    assert app.extensions["smtp_service"].settings.load(ACCOUNT).endpoint.password.reveal() == (
        "pw-123456"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", "587"), ("secure", "false"), ("requireTls", "true"), ("port", 587.0)],
)
def test_the_api_stays_strict(client, tokens, field, value):
    body = {k: v for k, v in legacy().items() if k not in ("updatedAt", "updatedBy")}
    body = {**body, "port": 587, field: value}
    r = client.post("/api/smtp/settings", json=body, headers=tokens.headers())
    assert r.status_code == 400
    assert r.json["error"] == "Validation failed" and list(r.json["details"]) == [field]

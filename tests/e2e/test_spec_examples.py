"""The spec's examples (per-account-smtp.md) replayed over HTTP against real gunicorn."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import SPEC_EXAMPLE_VIEW
from tests.e2e.conftest import LiveService

pytestmark = pytest.mark.e2e

ACCOUNT = "acct-spec"
USER = "user-id-123"
# The spec's example body. smtp.example.com does not resolve here: a name that does not
# resolve is accepted on save by design (it is resolved and checked before every connection).
SPEC_BODY = {
    "host": "smtp.example.com",
    "port": 587,
    "secure": False,
    "user": "user@example.com",
    "pass": "password",
}
UPDATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SAVED_MESSAGE = "SMTP settings saved successfully"
REMOVED_MESSAGE = "SMTP settings removed. System will use global SMTP settings."
TEST_FAILED_PREFIX = "SMTP connection test failed: "


def test_spec_examples_round_trip(live_service: LiveService) -> None:
    live = live_service
    token = live.token(ACCOUNT, USER)

    # 2. Save: the spec's response, plus requireTls (an addition of this service).
    r = live.request("POST", "/api/smtp/settings", SPEC_BODY, token=token)
    assert r.status == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    body = r.json
    assert set(body) == {"message", "settings"}
    assert body["message"] == SAVED_MESSAGE
    settings = body["settings"]
    assert set(settings) == {
        "host",
        "port",
        "secure",
        "user",
        "updatedAt",
        "updatedBy",
        "requireTls",
    }
    assert settings["host"] == "smtp.example.com"
    assert settings["port"] == 587
    assert settings["secure"] is False
    assert settings["user"] == "user@example.com"
    assert settings["requireTls"] is True
    assert UPDATED_AT.fullmatch(settings["updatedAt"]), settings["updatedAt"]
    assert settings["updatedBy"] == USER  # the token's sub
    assert "password" not in r.text

    # The file the spec describes, with the password encrypted at rest.
    path = live.data_dir / "shared-data" / ACCOUNT / "smtp-settings.json"
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert {"host", "port", "secure", "user", "pass", "updatedAt", "updatedBy"} <= set(stored)
    assert stored["updatedAt"] == settings["updatedAt"]
    assert stored["pass"] != "password" and stored["pass"].startswith("enc:")

    # 1. Get: the spec's shape, never the password.
    r = live.request("GET", "/api/smtp/settings", token=token)
    assert r.status == 200, r.text
    assert r.json == SPEC_EXAMPLE_VIEW

    # 3. Test: the host does not resolve, so the spec's failure shape.
    r = live.request("POST", "/api/smtp/test", SPEC_BODY, token=token)
    assert r.status == 400, r.text
    assert set(r.json) == {"success", "error"}
    assert r.json["success"] is False
    assert r.json["error"].startswith(TEST_FAILED_PREFIX)
    assert len(r.json["error"]) > len(TEST_FAILED_PREFIX)
    assert "password" not in r.text

    # 4. Delete: the spec's message; the account is back on the global server.
    r = live.request("DELETE", "/api/smtp/settings", token=token)
    assert r.status == 200, r.text
    assert r.json == {"message": REMOVED_MESSAGE}
    assert not path.exists()
    r = live.request("GET", "/api/smtp/settings", token=token)
    assert r.status == 200, r.text
    assert r.json["isGlobal"] is True
    assert r.json["host"] == "localhost"
    assert r.json["port"] == live.global_server.port

    live.stop()
    live.assert_log_clean()


def test_spec_secure_is_forced_for_port_465(live_service: LiveService) -> None:
    """Validation: "Secure: Optional boolean (auto-set to true if port is 465)"."""
    live = live_service
    token = live.token(ACCOUNT, USER)
    body = {k: v for k, v in SPEC_BODY.items() if k != "secure"} | {"port": 465}
    r = live.request("POST", "/api/smtp/settings", body, token=token)
    assert r.status == 200, r.text
    assert r.json["settings"]["secure"] is True
    r = live.request("POST", "/api/smtp/settings", body | {"secure": False}, token=token)
    assert r.status == 200, r.text
    assert r.json["settings"]["secure"] is True
    body587 = {k: v for k, v in SPEC_BODY.items() if k != "secure"}
    r = live.request("POST", "/api/smtp/settings", body587, token=token)
    assert r.status == 200, r.text
    assert r.json["settings"]["secure"] is False

    live.stop()
    live.assert_log_clean()


def test_every_worker_sees_saved_and_deleted_settings(live_service: LiveService) -> None:
    """WEB_CONCURRENCY=2: a save or delete in one worker is what every later request sees."""
    live = live_service
    token = live.token(ACCOUNT, USER)
    expected = SPEC_EXAMPLE_VIEW
    # Warm both workers with the global view first, so a stale per-worker cache would show.
    for _ in range(10):
        assert live.request("GET", "/api/smtp/settings", token=token).json["isGlobal"] is True

    r = live.request("POST", "/api/smtp/settings", SPEC_BODY, token=token)
    assert r.status == 200, r.text
    seen = [live.request("GET", "/api/smtp/settings", token=token) for _ in range(20)]
    assert [x.status for x in seen] == [200] * 20
    assert [x.json for x in seen] == [expected] * 20

    r = live.request("POST", "/api/smtp/settings", SPEC_BODY | {"port": 2525}, token=token)
    assert r.status == 200, r.text
    seen = [live.request("GET", "/api/smtp/settings", token=token).json for _ in range(20)]
    assert seen == [expected | {"port": 2525}] * 20

    r = live.request("DELETE", "/api/smtp/settings", token=token)
    assert r.status == 200, r.text
    seen = [live.request("GET", "/api/smtp/settings", token=token).json for _ in range(20)]
    assert all(x["isGlobal"] is True for x in seen), seen

    live.stop()
    live.assert_log_clean()

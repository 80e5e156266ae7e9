"""SettingsService: a stored password marked as ciphertext is never used as a plaintext one."""

from __future__ import annotations

import json
import logging

import pytest

from smtp_service.services.crypto import SecretBox, SecretError, new_key
from smtp_service.services.settings import StoredSettingsUnusable
from tests.conftest import SMTP_PASSWORD, settings_body


@pytest.mark.parametrize("stored", ["enc:v2:0123abcd:AAAA", "enc:", "enc:v1x"])
def test_an_unknown_ciphertext_version_is_an_error_not_a_password(stored):
    with pytest.raises(SecretError, match="unknown encryption version|malformed"):
        SecretBox([new_key()]).decrypt("acct-a", stored)


def test_such_settings_are_unusable_and_sending_falls_back(
    app, client, tokens, smtp_server, global_server, caplog
):
    r = client.post("/api/smtp/settings", json=settings_body(smtp_server),
                    headers=tokens.headers())
    assert r.status_code == 200
    path = f"{app.config['DATA_DIR']}/shared-data/acct-a/smtp-settings.json"
    with open(path) as handle:
        doc = json.load(handle)
    with open(path, "w") as handle:
        json.dump({**doc, "pass": "enc:v2:" + doc["pass"][len("enc:v1:"):]}, handle)
    with pytest.raises(StoredSettingsUnusable, match="unknown encryption version"):
        app.extensions["smtp_service"].settings.load("acct-a")
    caplog.set_level(logging.WARNING)
    smtp_server.auth_attempts.clear()
    r = client.post("/api/messages/send-email", headers=tokens.headers(),
                    json={"from": "noreply@example.com", "to": "r@example.net",
                          "subject": "Hi", "text": "x"})
    assert r.status_code == 200 and r.json["transport"] == "global"
    assert smtp_server.auth_attempts == [] and smtp_server.messages == []
    assert "unknown encryption version" in caplog.text and SMTP_PASSWORD not in caplog.text


def test_a_mapping_saved_directly_gets_the_one_host_form(app):
    """SettingsService.save with a mapping (callers before SmtpEndpoint) normalises the host as
    the request schema does, and refuses what is not a host on the host field."""
    from smtp_service.services.errors import InvalidInput
    from smtp_service.services.hostnames import WITH_A_PORT

    settings = app.extensions["smtp_service"].settings
    fields = {"port": 2525, "secure": False, "user": "u", "password": "p-123456",
              "requireTls": True}
    saved = settings.save("acct-a", "user-1", {**fields, "host": "LocalHost."})
    assert saved.endpoint.host == "localhost"
    assert settings.load("acct-a").endpoint.host == "localhost"
    with pytest.raises(InvalidInput) as caught:
        settings.save("acct-a", "user-1", {**fields, "host": "smtp.example.com:587"})
    assert caught.value.fields == {"host": [WITH_A_PORT]}

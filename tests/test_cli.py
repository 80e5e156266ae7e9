"""`flask smtp ...` through the app's CLI runner, on real files as the old system wrote them.

encrypt-existing, rotate-key, new-key and token: what they print, what they leave on disk, and that
the API still reads (or, with only a retired key, no longer reads) what they wrote.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from smtp_service import create_app
from smtp_service.services.crypto import SecretBox, SecretError, new_key
from tests.conftest import JWT_SECRET, SPEC_EXAMPLE_VIEW

LEGACY_PASSWORD = "old-system-Pa55word!"
CIPHERTEXT = re.compile(r"^enc:v1:([0-9a-f]{8}):[A-Za-z0-9_-]+=*$")


def legacy_document(**overrides: Any) -> dict[str, Any]:
    """The spec's file structure, as the Node service wrote it: the password in plain text."""
    doc = {
        "host": "smtp.example.com",
        "port": 587,
        "secure": False,
        "user": "user@example.com",
        "pass": LEGACY_PASSWORD,
        "updatedAt": "2025-11-10T21:00:00.000Z",
        "updatedBy": "user-id-123",
    }
    doc.update(overrides)
    return doc


def settings_path(app, account: str) -> Path:
    return Path(app.config["DATA_DIR"], "shared-data", account, "smtp-settings.json")


def write_raw(app, account: str, content: str | dict[str, Any]) -> Path:
    """Write a settings file the way another program would (no lock, no atomic replace)."""
    path = settings_path(app, account)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content, indent=2)
    path.write_text(text, encoding="utf-8")
    return path


def stored_pass(app, account: str) -> str:
    return json.loads(settings_path(app, account).read_text())["pass"]


def key_id(key: str) -> str:
    return SecretBox([key]).current_key_id


def all_output(result) -> str:
    return result.output + result.stdout + result.stderr


def app_with_keys(app_config: dict[str, Any], *keys: str):
    return create_app({**app_config, "SMTP_ENCRYPTION_KEYS": ",".join(keys)})


def get_settings(app, tokens, account: str) -> dict[str, Any]:
    response = app.test_client().get("/api/smtp/settings", headers=tokens.headers(account))
    assert response.status_code == 200
    return response.json


@pytest.fixture(autouse=True)
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


# -- new-key ----------------------------------------------------------------------------------


def test_new_key_prints_a_fresh_usable_key(runner):
    first = runner.invoke(args=["smtp", "new-key"])
    second = runner.invoke(args=["smtp", "new-key"])
    assert first.exit_code == 0 and second.exit_code == 0
    key = first.stdout.strip()
    assert first.stdout == key + "\n"
    assert key != second.stdout.strip()
    box = SecretBox([key])
    assert box.decrypt("acct-a", box.encrypt("acct-a", "x")) == "x"


# -- token ------------------------------------------------------------------------------------


def test_token_is_accepted_by_the_api_and_carries_the_claims(runner, app, tokens):
    result = runner.invoke(
        args=["smtp", "token", "--account", "acct-cli", "--user", "me", "--hours", "2"]
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    claims = pyjwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["accountId"] == "acct-cli" and claims["sub"] == "me"
    assert claims["exp"] - claims["iat"] == 2 * 3600

    write_raw(app, "acct-cli", legacy_document())
    response = app.test_client().get(
        "/api/smtp/settings", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    assert response.json["isGlobal"] is False and response.json["host"] == "smtp.example.com"


@pytest.mark.parametrize(
    "args",
    [["--account", "a", "--hours", "0"], ["--account", "a", "--hours", "721"], ["--user", "me"]],
)
def test_token_refuses_bad_options(runner, args):
    result = runner.invoke(args=["smtp", "token", *args])
    assert result.exit_code == 2
    assert "eyJ" not in result.stdout


def test_token_is_refused_under_rs256(app_config):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    app = create_app({**app_config, "JWT_PUBLIC_KEY": pem.decode()})
    assert app.config["JWT_ALGORITHM"] == "RS256"
    result = app.test_cli_runner().invoke(args=["smtp", "token", "--account", "acct-a"])
    assert result.exit_code == 1
    assert "issued by your auth service" in result.output
    assert "eyJ" not in result.output


# -- encrypt-existing -------------------------------------------------------------------------


def test_legacy_plaintext_file_loads_and_encrypt_existing_converts_it(
    app, runner, app_config, tokens, debug_logs
):
    path = write_raw(app, "acct-old", legacy_document())
    expected_view = SPEC_EXAMPLE_VIEW
    assert get_settings(app, tokens, "acct-old") == expected_view  # the old file still works

    # An account saved through the API is already encrypted: left alone.
    client = app.test_client()
    body = {**legacy_document(), "pass": "api-Pa55word"}
    del body["updatedAt"], body["updatedBy"]
    saved = client.post("/api/smtp/settings", json=body, headers=tokens.headers("acct-new"))
    assert saved.status_code == 200
    api_bytes = settings_path(app, "acct-new").read_bytes()

    result = runner.invoke(args=["smtp", "encrypt-existing"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "updated 1, unchanged 1, failed 0\n"

    stored = json.loads(path.read_text())
    match = CIPHERTEXT.fullmatch(stored["pass"])
    assert match and match.group(1) == key_id(app_config["SMTP_ENCRYPTION_KEYS"])
    assert {k: v for k, v in stored.items() if k != "pass"} == {
        k: v for k, v in legacy_document().items() if k != "pass"
    }  # nothing else changed, updatedAt/updatedBy included
    assert SecretBox([app_config["SMTP_ENCRYPTION_KEYS"]]).decrypt("acct-old", stored["pass"]) == (
        LEGACY_PASSWORD
    )
    assert LEGACY_PASSWORD not in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert settings_path(app, "acct-new").read_bytes() == api_bytes

    assert get_settings(app, tokens, "acct-old") == expected_view
    loaded = app.extensions["smtp_service"].settings.load("acct-old")
    assert loaded.endpoint.password.reveal() == LEGACY_PASSWORD  # what the sender will use

    for secret in (LEGACY_PASSWORD, "api-Pa55word"):
        assert secret not in all_output(result)
        assert secret not in debug_logs.text


def test_encrypt_existing_is_idempotent(app, runner):
    path = write_raw(app, "acct-old", legacy_document())
    assert runner.invoke(args=["smtp", "encrypt-existing"]).stdout.startswith("updated 1,")
    converted = path.read_bytes()
    inode = os.stat(path).st_ino

    again = runner.invoke(args=["smtp", "encrypt-existing"])
    assert again.exit_code == 0
    assert again.stdout == "updated 0, unchanged 1, failed 0\n"
    assert path.read_bytes() == converted and os.stat(path).st_ino == inode


def test_encrypt_existing_with_nothing_stored(runner):
    result = runner.invoke(args=["smtp", "encrypt-existing"])
    assert result.exit_code == 0
    assert result.stdout == "updated 0, unchanged 0, failed 0\n"


def test_encrypt_existing_leaves_ciphertexts_under_other_keys_alone(app, runner, app_config):
    """Its job is plaintext only: a value under a retired key is rotate-key's, not a failure."""
    old_key = new_key()
    under_old = SecretBox([old_key]).encrypt("acct-x", LEGACY_PASSWORD)
    path = write_raw(app, "acct-x", legacy_document(**{"pass": under_old}))
    result = runner.invoke(args=["smtp", "encrypt-existing"])
    assert result.stdout == "updated 0, unchanged 1, failed 0\n"
    assert stored_pass(app, "acct-x") == under_old
    assert path.exists()


# -- rotate-key -------------------------------------------------------------------------------


def test_rotate_key_reencrypts_everything_and_retires_the_old_key(
    app, app_config, tokens, debug_logs
):
    old_key, fresh_key = app_config["SMTP_ENCRYPTION_KEYS"], new_key()
    passwords = {"acct-1": "first-Pa55word", "acct-2": "second-Pa55word"}
    client = app.test_client()
    for account, password in passwords.items():
        body = {**legacy_document(), "pass": password, "user": f"{account}@example.com"}
        del body["updatedAt"], body["updatedBy"]
        saved = client.post("/api/smtp/settings", json=body, headers=tokens.headers(account))
        assert saved.status_code == 200
        assert key_id(old_key) == CIPHERTEXT.fullmatch(stored_pass(app, account)).group(1)
    write_raw(app, "acct-3", legacy_document())  # plaintext from the old system: encrypted too
    passwords["acct-3"] = LEGACY_PASSWORD

    rotating = app_with_keys(app_config, fresh_key, old_key)
    result = rotating.test_cli_runner().invoke(args=["smtp", "rotate-key"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "updated 3, unchanged 0, failed 0\n"

    new_box, old_box = SecretBox([fresh_key]), SecretBox([old_key])
    for account, password in passwords.items():
        stored = stored_pass(app, account)
        assert CIPHERTEXT.fullmatch(stored).group(1) == key_id(fresh_key)
        assert new_box.decrypt(account, stored) == password
        with pytest.raises(SecretError, match="unknown key"):
            old_box.decrypt(account, stored)
        assert stat.S_IMODE(os.stat(settings_path(app, account)).st_mode) == 0o600

    # The API of a deployment with only the new key reads everything...
    only_new = app_with_keys(app_config, fresh_key)
    for account in passwords:
        view = get_settings(only_new, tokens, account)
        assert view["isGlobal"] is False and view["hasPassword"] is True
    assert only_new.extensions["smtp_service"].settings.load(
        "acct-1"
    ).endpoint.password.reveal() == ("first-Pa55word")
    # ...and one still on the old key alone no longer can: it falls back to the global server.
    only_old = app_with_keys(app_config, old_key)
    assert get_settings(only_old, tokens, "acct-1")["isGlobal"] is True

    again = rotating.test_cli_runner().invoke(args=["smtp", "rotate-key"])
    assert again.stdout == "updated 0, unchanged 3, failed 0\n"

    for secret in passwords.values():
        assert secret not in all_output(result) + all_output(again)
        assert secret not in debug_logs.text


def test_rotate_key_reports_broken_files_and_converts_the_others(app, app_config, debug_logs):
    old_key, fresh_key, stranger_key = app_config["SMTP_ENCRYPTION_KEYS"], new_key(), new_key()
    old_box = SecretBox([old_key])
    write_raw(
        app, "acct-good", legacy_document(**{"pass": old_box.encrypt("acct-good", "good-Pa55word")})
    )
    write_raw(app, "acct-plain", legacy_document())
    broken = {
        "acct-corrupt": '{"host": "smtp.example.com", "pass": ',  # torn JSON
        "acct-nopass": json.dumps({"host": "smtp.example.com", "port": 587, "user": "u"}),
        "acct-list": json.dumps(["not", "an", "object"]),
        # a ciphertext copied from another account: the account binding refuses it
        "acct-moved": json.dumps(
            legacy_document(**{"pass": old_box.encrypt("acct-good", "moved-Pa55word")})
        ),
        # a key this deployment never had
        "acct-stranger": json.dumps(
            legacy_document(
                **{"pass": SecretBox([stranger_key]).encrypt("acct-stranger", "x-Pa55word")}
            )
        ),
    }
    before = {
        account: write_raw(app, account, text).read_bytes() for account, text in broken.items()
    }
    (Path(app.config["DATA_DIR"], "shared-data", "acct-empty")).mkdir()  # a folder, no file

    rotating = app_with_keys(app_config, fresh_key, old_key)
    result = rotating.test_cli_runner().invoke(args=["smtp", "rotate-key"])

    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a reported failure, not a traceback
    assert result.stdout == "updated 2, unchanged 0, failed 5\n"
    for account in broken:  # each one named, with a reason
        assert re.search(rf"^account {account}: \S", result.stderr, re.MULTILINE), result.stderr
    assert "acct-good" not in result.stderr and "acct-plain" not in result.stderr
    for account, content in before.items():
        assert settings_path(app, account).read_bytes() == content  # left for a human to look at

    new_box = SecretBox([fresh_key])
    assert new_box.decrypt("acct-good", stored_pass(app, "acct-good")) == "good-Pa55word"
    assert new_box.decrypt("acct-plain", stored_pass(app, "acct-plain")) == LEGACY_PASSWORD
    for secret in (
        "good-Pa55word",
        LEGACY_PASSWORD,
        "moved-Pa55word",
        "x-Pa55word",
        fresh_key,
        old_key,
    ):
        assert secret not in all_output(result)
    for secret in (LEGACY_PASSWORD, "moved-Pa55word", "x-Pa55word", fresh_key, old_key):
        assert secret not in debug_logs.text


def test_encrypt_existing_reports_a_corrupt_file_and_converts_the_others(app, runner):
    write_raw(app, "acct-a", legacy_document())
    corrupt = write_raw(app, "acct-b", "\x00\x01 not json").read_bytes()
    write_raw(app, "acct-c", legacy_document(user="c@example.com"))

    result = runner.invoke(args=["smtp", "encrypt-existing"])
    assert result.exit_code == 1
    assert result.stdout == "updated 2, unchanged 0, failed 1\n"
    assert result.stderr == "account acct-b: settings file is not valid JSON\n"
    assert settings_path(app, "acct-b").read_bytes() == corrupt
    assert CIPHERTEXT.fullmatch(stored_pass(app, "acct-a"))
    assert CIPHERTEXT.fullmatch(stored_pass(app, "acct-c"))
    assert LEGACY_PASSWORD not in all_output(result)

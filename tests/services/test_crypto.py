"""SecretBox and the key file: AES-GCM bound to the account, rotation, tampering, key creation."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import smtp_service.services.crypto as crypto_module
from smtp_service.services.crypto import (
    KEY_FILE_NAME,
    KeyConfigError,
    SecretBox,
    SecretError,
    is_encrypted,
    load_or_create_key_file,
    new_key,
)

CIPHERTEXT = re.compile(r"^enc:v1:([0-9a-f]{8}):([A-Za-z0-9_-]+=*)$")
PASSWORD = "hunter2-Pa55word!"
KEY_A = new_key()
KEY_B = new_key()


def _parts(stored: str) -> tuple[str, bytes]:
    match = CIPHERTEXT.fullmatch(stored)
    assert match, stored
    return match.group(1), base64.urlsafe_b64decode(match.group(2))


def _with_blob(stored: str, blob: bytes) -> str:
    key_id, _ = _parts(stored)
    return f"enc:v1:{key_id}:{base64.urlsafe_b64encode(blob).decode()}"


def _assert_reveals_nothing(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


# -- keys -------------------------------------------------------------------------------------


def test_new_key_is_fresh_url_safe_base64_of_32_bytes():
    keys = {new_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}=", key)
        assert len(base64.urlsafe_b64decode(key)) == 32
        SecretBox([key])  # accepted as a configured key


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "short",
        "not base64 at all !!!",
        base64.urlsafe_b64encode(b"k" * 16).decode(),  # AES-128 size: refused
        base64.urlsafe_b64encode(b"k" * 33).decode(),
    ],
)
def test_a_key_that_is_not_32_bytes_is_refused_without_echoing_it(bad):
    with pytest.raises(KeyConfigError) as excinfo:
        SecretBox([KEY_A, bad])
    if bad:
        assert bad not in str(excinfo.value)
    _assert_reveals_nothing(str(excinfo.value), KEY_A)


def test_an_empty_key_list_is_refused():
    with pytest.raises(KeyConfigError):
        SecretBox([])


def test_keys_are_accepted_without_padding_and_with_whitespace():
    box = SecretBox([f"  {KEY_A.rstrip('=')}\n"])
    assert box.current_key_id == SecretBox([KEY_A]).current_key_id
    assert SecretBox([KEY_A]).decrypt("acct-a", box.encrypt("acct-a", PASSWORD)) == PASSWORD


# -- format and round trip --------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [PASSWORD, "p", "pässwörd ✉ 密码", "x" * 5000, " spaced "])
def test_round_trip(plaintext):
    box = SecretBox([KEY_A])
    stored = box.encrypt("acct-a", plaintext)
    key_id, blob = _parts(stored)
    assert key_id == box.current_key_id
    assert len(blob) == 12 + len(plaintext.encode()) + 16  # nonce, ciphertext, tag
    if len(plaintext) >= 8:  # a shorter one may turn up in the base64 by chance
        assert plaintext not in stored
    assert is_encrypted(stored) and box.is_current(stored)
    assert box.decrypt("acct-a", stored) == plaintext


def test_each_encryption_uses_a_fresh_nonce():
    box = SecretBox([KEY_A])
    stored = [box.encrypt("acct-a", PASSWORD) for _ in range(50)]
    nonces = {_parts(s)[1][:12] for s in stored}
    assert len(set(stored)) == 50 and len(nonces) == 50
    assert {box.decrypt("acct-a", s) for s in stored} == {PASSWORD}


def test_key_id_depends_on_the_key_only():
    assert SecretBox([KEY_A]).current_key_id == SecretBox([KEY_A, KEY_B]).current_key_id
    assert SecretBox([KEY_A]).current_key_id != SecretBox([KEY_B]).current_key_id
    assert re.fullmatch(r"[0-9a-f]{8}", SecretBox([KEY_A]).current_key_id)
    # the key id is not a piece of the key
    assert SecretBox([KEY_A]).current_key_id not in base64.urlsafe_b64decode(KEY_A).hex()


def test_a_legacy_plaintext_value_passes_through():
    box = SecretBox([KEY_A])
    assert not is_encrypted("password")
    assert box.decrypt("acct-a", "password") == "password"
    assert not box.is_current("password")


# -- rotation: first key encrypts, every key decrypts -----------------------------------------


def test_first_key_encrypts_and_all_keys_decrypt():
    old_box, new_box = SecretBox([KEY_A]), SecretBox([KEY_B])
    rotating = SecretBox([KEY_B, KEY_A])
    under_old = old_box.encrypt("acct-a", PASSWORD)

    assert rotating.decrypt("acct-a", under_old) == PASSWORD
    assert not rotating.is_current(under_old)

    under_new = rotating.encrypt("acct-a", PASSWORD)
    assert _parts(under_new)[0] == new_box.current_key_id != old_box.current_key_id
    assert rotating.is_current(under_new)
    assert new_box.decrypt("acct-a", under_new) == PASSWORD
    with pytest.raises(SecretError, match="unknown key"):
        old_box.decrypt("acct-a", under_new)
    with pytest.raises(SecretError, match="unknown key"):
        new_box.decrypt("acct-a", under_old)


def test_unknown_key_error_is_clear_and_holds_no_secret():
    stored = SecretBox([KEY_A]).encrypt("acct-a", PASSWORD)
    key_id, blob = _parts(stored)
    with pytest.raises(SecretError) as excinfo:
        SecretBox([KEY_B]).decrypt("acct-a", stored)
    message = str(excinfo.value)
    assert message == f"stored password uses unknown key {key_id}"
    _assert_reveals_nothing(message, PASSWORD, KEY_A, KEY_B, stored.rsplit(":", 1)[1])


# -- binding to the account and integrity -----------------------------------------------------


def test_a_ciphertext_copied_to_another_account_does_not_decrypt():
    box = SecretBox([KEY_A])
    stored = box.encrypt("acct-a", PASSWORD)
    for other in ("acct-b", "acct-a ", "ACCT-A", "acct-"):
        with pytest.raises(SecretError, match="does not decrypt for this account") as excinfo:
            box.decrypt(other, stored)
        _assert_reveals_nothing(str(excinfo.value), PASSWORD, KEY_A)
    assert box.decrypt("acct-a", stored) == PASSWORD


@pytest.mark.parametrize("position", [0, 11, 12, 20, -16, -1], ids=lambda p: f"byte{p}")
def test_a_flipped_bit_anywhere_fails(position):
    box = SecretBox([KEY_A])
    stored = box.encrypt("acct-a", PASSWORD)
    blob = bytearray(_parts(stored)[1])
    blob[position] ^= 0x01
    with pytest.raises(SecretError) as excinfo:
        box.decrypt("acct-a", _with_blob(stored, bytes(blob)))
    _assert_reveals_nothing(str(excinfo.value), PASSWORD, KEY_A)


def test_a_ciphertext_relabelled_with_another_known_key_id_fails():
    box = SecretBox([KEY_A, KEY_B])
    stored = box.encrypt("acct-a", PASSWORD)
    other_id = SecretBox([KEY_B]).current_key_id
    relabelled = stored.replace(box.current_key_id, other_id, 1)
    with pytest.raises(SecretError, match="does not decrypt"):
        box.decrypt("acct-a", relabelled)


@pytest.mark.parametrize(
    "blob_length", [0, 3, 11, 12, 27], ids=lambda n: f"{n}-bytes"
)  # all shorter than nonce + tag
def test_truncated_ciphertexts_fail_as_secret_errors(blob_length):
    box = SecretBox([KEY_A])
    stored = box.encrypt("acct-a", PASSWORD)
    blob = _parts(stored)[1][:blob_length]
    with pytest.raises(SecretError, match="malformed"):
        box.decrypt("acct-a", _with_blob(stored, blob))


@pytest.mark.parametrize(
    "stored",
    [
        "enc:v1:",
        "enc:v1:nocolon",
        "enc:v1:{kid}:",
        "enc:v1:{kid}:!!!!",
        "enc:v1:{kid}:AAA",  # bad padding
        "enc:v1:hunter2-Pa55word!:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # not a key id
    ],
)
def test_malformed_values_fail_as_secret_errors_without_echoing_them(stored):
    box = SecretBox([KEY_A])
    stored = stored.format(kid=box.current_key_id)
    with pytest.raises(SecretError) as excinfo:
        box.decrypt("acct-a", stored)
    _assert_reveals_nothing(str(excinfo.value), PASSWORD, KEY_A)


# -- the key file -----------------------------------------------------------------------------


@pytest.mark.usefixtures("umask_zero")
def test_key_file_is_created_0600_once_and_reused(tmp_path, caplog):
    data_dir = tmp_path / "new" / "data"
    key = load_or_create_key_file(str(data_dir))
    path = data_dir / KEY_FILE_NAME

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert path.read_text() == key + "\n"
    box = SecretBox([key])
    stored = box.encrypt("acct-a", PASSWORD)
    assert os.listdir(data_dir) == [KEY_FILE_NAME]  # the temporary file is gone
    assert "created a key" in caplog.text and key not in caplog.text
    inode = os.stat(path).st_ino

    caplog.clear()
    assert load_or_create_key_file(str(data_dir)) == key
    assert os.stat(path).st_ino == inode
    assert path.read_text() == key + "\n"
    assert "created a key" not in caplog.text
    assert SecretBox([load_or_create_key_file(str(data_dir))]).decrypt("acct-a", stored) == (
        PASSWORD
    )


def test_an_existing_key_file_is_used_as_it_is(tmp_path):
    (tmp_path / KEY_FILE_NAME).write_text(f"{KEY_A}\n")
    assert load_or_create_key_file(str(tmp_path)) == KEY_A
    assert (tmp_path / KEY_FILE_NAME).read_text() == f"{KEY_A}\n"


RACER_CHILD = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("crypto_under_test", {crypto_module.__file__!r})
crypto = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crypto)
print("ready", flush=True)
assert sys.stdin.readline() == "go\\n"
for folder in sys.argv[1:]:
    print(crypto.load_or_create_key_file(folder), flush=True)
"""


def test_processes_creating_the_key_at_once_all_get_the_same_key(tmp_path):
    """Four processes race to create the key in each of 25 fresh folders: one key per folder."""
    folders = [str(tmp_path / f"data-{i}") for i in range(25)]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RACER_CHILD, *folders],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    try:
        for child in children:
            assert child.stdout.readline() == b"ready\n"
        for child in children:
            child.stdin.write(b"go\n")
            child.stdin.flush()
        outputs = []
        for child in children:
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 0
            outputs.append(out.decode().split())
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.communicate()

    for index, folder in enumerate(folders):
        on_disk = Path(folder, KEY_FILE_NAME).read_text().strip()
        assert {keys[index] for keys in outputs} == {on_disk}
        assert os.listdir(folder) == [KEY_FILE_NAME]
        SecretBox([on_disk])
    assert len({Path(f, KEY_FILE_NAME).read_text() for f in folders}) == len(folders)

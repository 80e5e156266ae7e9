"""Encryption of SMTP passwords at rest: AES-256-GCM bound to the account, with key rotation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import secrets
import tempfile

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from smtp_service.storage.files import fsync_dir

log = logging.getLogger(__name__)

PREFIX = "enc:v1:"
CIPHERTEXT_MARK = "enc:"  # any value starting so is ciphertext, of this version or another
KEY_FILE_NAME = ".smtp-encryption-key"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_KEY_ID = re.compile(r"[0-9a-f]{8}")


class SecretError(Exception):
    """A stored secret cannot be decrypted (wrong account, unknown key or tampered data)."""


class KeyConfigError(ValueError):
    """SMTP_ENCRYPTION_KEYS holds something that is not a 32-byte key."""


def new_key() -> str:
    """A fresh key in the form SMTP_ENCRYPTION_KEYS takes (url-safe base64 of 32 bytes)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")


def _decode_key(text: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyConfigError("each SMTP_ENCRYPTION_KEYS entry must be url-safe base64 of 32 bytes")
    return raw


def _key_id(raw: bytes) -> str:
    return hashlib.sha256(b"smtp-service-key-id" + raw).hexdigest()[:8]


def _aad(account_id: str) -> bytes:
    return f"smtp-settings:v1:{account_id}".encode()


class SecretBox:
    """Encrypts with the first key, decrypts with any; ciphertexts are bound to an account."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise KeyConfigError("at least one encryption key is needed")
        raw_keys = [_decode_key(k) for k in keys]
        self._keys = {_key_id(raw): AESGCM(raw) for raw in raw_keys}
        self.current_key_id = _key_id(raw_keys[0])

    def encrypt(self, account_id: str, plaintext: str) -> str:
        """Ciphertext text: enc:v1:{key id}:{base64(nonce + ciphertext + tag)}."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self.current_key_id].encrypt(
            nonce, plaintext.encode("utf-8"), _aad(account_id)
        )
        blob = base64.urlsafe_b64encode(nonce + sealed).decode("ascii")
        return f"{PREFIX}{self.current_key_id}:{blob}"

    def decrypt(self, account_id: str, stored: str) -> str:
        """The plaintext of a stored value; a value without the "enc:" mark is a legacy plaintext.

        A marked value of a version this code does not know raises SecretError: it is never
        taken for a plaintext password (and sent to a server as one).
        """
        if not is_encrypted(stored):
            return stored
        if not stored.startswith(PREFIX):
            raise SecretError("stored password uses an unknown encryption version")
        try:
            key_id, blob = stored[len(PREFIX) :].split(":", 1)
            data = base64.urlsafe_b64decode(blob)
        except (ValueError, binascii.Error):
            raise SecretError("stored password is malformed") from None
        # Too short for nonce and tag, or a key id that is not one (it is echoed in the error):
        # AESGCM would raise ValueError for a short nonce, which callers do not expect.
        if len(data) < _NONCE_BYTES + _TAG_BYTES or not _KEY_ID.fullmatch(key_id):
            raise SecretError("stored password is malformed")
        aead = self._keys.get(key_id)
        if aead is None:
            raise SecretError(f"stored password uses unknown key {key_id}")
        try:
            plain = aead.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], _aad(account_id))
        except InvalidTag:
            raise SecretError("stored password does not decrypt for this account") from None
        return plain.decode("utf-8")

    def is_current(self, stored: str) -> bool:
        """True when the value is already encrypted under the first (current) key."""
        return stored.startswith(f"{PREFIX}{self.current_key_id}:")


def is_encrypted(stored: str) -> bool:
    """True when the stored value is ciphertext ("enc:", of any version), not a plaintext."""
    return stored.startswith(CIPHERTEXT_MARK)


def load_or_create_key_file(data_dir: str) -> str:
    """The key kept in DATA_DIR when none is configured; created 0600 on first use.

    Several workers may start at once: the key is written to a temporary file and linked into
    place, so exactly one key wins and every worker reads that one.
    """
    path = os.path.join(data_dir, KEY_FILE_NAME)
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".tmp-key-")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(new_key() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
            fsync_dir(data_dir)  # the key must outlive a crash as surely as what it encrypts
            log.warning(
                "SMTP_ENCRYPTION_KEYS is not set: created a key in %s; back it up, or set "
                "SMTP_ENCRYPTION_KEYS in production",
                path,
            )
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    with open(path, encoding="ascii") as handle:
        return handle.read().strip()

"""Per-account JSON files: strict account ids, atomic writes, one lock file per document."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

from filelock import FileLock

ACCOUNT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LOCK_TIMEOUT_SECONDS = 10.0
_TEMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")
DELETE = object()  # returned by an update's change function to remove the document


class InvalidAccountId(ValueError):
    """The account id does not match the strict pattern and must not reach a path."""


def check_account_id(account_id: str) -> str:
    """Return the id if it is safe to use as a folder name, else raise InvalidAccountId."""
    if not isinstance(account_id, str) or not ACCOUNT_ID_PATTERN.fullmatch(account_id):
        raise InvalidAccountId("invalid account id")
    return account_id


class AccountFiles:
    """JSON documents stored at DATA_DIR/shared-data/{accountId}/{name}."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.root = os.path.join(data_dir, "shared-data")

    def folder(self, account_id: str) -> str:
        """The account's folder (not created)."""
        return os.path.join(self.root, check_account_id(account_id))

    def path(self, account_id: str, name: str) -> str:
        """The path of one document of the account."""
        return os.path.join(self.folder(account_id), name)

    def read(self, account_id: str, name: str) -> Any | None:
        """The parsed document, or None when it does not exist. Raises ValueError if unparseable."""
        try:
            with open(self.path(account_id, name), encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def write(self, account_id: str, name: str, document: Any) -> None:
        """Replace the document atomically, under the document's lock."""
        self.update(account_id, name, lambda _old: document)

    def update(self, account_id: str, name: str, change: Callable[[Any | None], Any | None]) -> Any:
        """Read, change and write the document under its lock; returning DELETE removes it.

        `change` gets None for a missing or unparseable document; returning its argument unchanged
        writes nothing.

        Returns what `change` returned. Writers in other processes wait for the lock. A write or
        delete first removes the document's temporary files left by a writer that was killed.
        """
        folder = self.folder(account_id)
        # os.makedirs gives `mode` to the last folder only (the others get 0777 & ~umask), so
        # DATA_DIR, shared-data and the account's folder are each made 0700 in turn.
        for path in (self.data_dir, self.root, folder):
            os.makedirs(path, mode=0o700, exist_ok=True)
        target = os.path.join(folder, name)
        with FileLock(target + ".lock", timeout=LOCK_TIMEOUT_SECONDS, mode=0o600):
            try:
                with open(target, encoding="utf-8") as handle:
                    current = json.load(handle)
            except FileNotFoundError:
                current = None
            except ValueError:
                current = None  # a corrupt document is replaced, never patched
            result = change(current)
            if result is DELETE:
                _remove_stale_temps(folder, name)
                if os.path.exists(target):
                    os.unlink(target)
                    fsync_dir(folder)
            elif result is not current:  # returning the document itself means: leave it as it is
                _remove_stale_temps(folder, name)
                _atomic_write(folder, target, result)
            return result

    def lock(self, account_id: str, name: str, timeout: float = LOCK_TIMEOUT_SECONDS) -> FileLock:
        """A lock of the account's own, shared by every process on this data folder, for work
        that must not run twice at once (a refresh of an OAuth2 token): `with files.lock(...)`.
        Its file is `name`.lock beside the documents; it is not a document's lock, so holding
        it, documents can still be updated. Raises filelock.Timeout after `timeout` seconds."""
        folder = self.folder(account_id)
        for path in (self.data_dir, self.root, folder):
            os.makedirs(path, mode=0o700, exist_ok=True)
        return FileLock(os.path.join(folder, name + ".lock"), timeout=timeout, mode=0o600)

    def delete(self, account_id: str, name: str) -> bool:
        """Remove the document; True when there was one. An account without a folder gets
        none (deleting what was never stored creates nothing)."""
        if not os.path.isdir(self.folder(account_id)):
            return False
        existed = False

        def _remove(_current: Any | None) -> object:
            nonlocal existed
            existed = os.path.exists(self.path(account_id, name))
            return DELETE

        self.update(account_id, name, _remove)
        return existed

    def accounts(self) -> list[str]:
        """Every account id that has a folder."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(
            n
            for n in names
            if ACCOUNT_ID_PATTERN.fullmatch(n) and os.path.isdir(os.path.join(self.root, n))
        )


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _remove_stale_temps(folder: str, name: str) -> None:
    """Remove temporary files of this document left by a writer that died before its replace.

    Only the holder of the document's lock writes its temporary files, so under the lock every
    one found is stale; other documents' temporary files (other locks) are not touched.
    """
    prefix = _temp_prefix(name)
    for entry in os.listdir(folder):
        # mkstemp's random part is 8 characters of [a-z0-9_]
        if entry.startswith(prefix) and _TEMP_SUFFIX.fullmatch(entry[len(prefix) :]):
            try:
                os.unlink(os.path.join(folder, entry))
            except FileNotFoundError:
                pass


def _atomic_write(folder: str, target: str, document: Any) -> None:
    data = json.dumps(document, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
    name = os.path.basename(target)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(name))  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Make a rename or link in `folder` durable (POSIX: fsync the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Security tests (tokens, account isolation, SSRF, secrets in logs) and their small helpers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from typing import Any

from tests.smtpd import SmtpServer

_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def tree_state(root: str) -> dict[str, tuple[Any, ...]]:
    """Everything under `root` that a write would change: for each path, its kind, mode, inode,
    size, modification time and a digest of the content."""
    state: dict[str, tuple[Any, ...]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if name in files and os.path.isfile(path):
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
                state[rel] = ("file", st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, digest)
            else:
                state[rel] = ("dir", st.st_mode)
    return state


def count_connections(server: SmtpServer) -> list[object]:
    """Record every TCP connection the (started) aiosmtpd server accepts from now on.

    aiosmtpd builds one SMTP protocol object per accepted connection through
    `controller.factory()`, looked up on the instance each time; `start()` has already made its
    own trigger connection, so it is not counted.
    """
    seen: list[object] = []
    original = server.controller.factory

    def factory() -> object:
        protocol = original()
        seen.append(protocol)
        return protocol

    server.controller.factory = factory  # type: ignore[method-assign]
    return seen


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def unsigned_token(payload: dict[str, Any], alg: str = "none", signature: str = "") -> str:
    """A token that claims `alg` (none, None, ...) with the given (usually empty) signature."""
    return f"{_segment({'alg': alg, 'typ': 'JWT'})}.{_segment(payload)}.{signature}"


def hmac_token(
    payload: dict[str, Any], key: bytes, alg: str = "HS256", **header: Any
) -> str:
    """An HMAC-signed token made by hand, so that any key (a public key's PEM, a short secret)
    can be used: PyJWT refuses to sign with some of them, an attacker's tool does not."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{_segment({'alg': alg, 'typ': 'JWT', **header})}.{_segment(payload)}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def fill_rule(rule: str, values: dict[str, str]) -> str:
    """A URL for a Flask rule: each <converter:name> replaced by values[name] (KeyError for an
    argument a test does not know yet, so that a new route cannot be skipped silently)."""
    return _RULE_ARGUMENT.sub(lambda m: values[m.group(1)], rule)

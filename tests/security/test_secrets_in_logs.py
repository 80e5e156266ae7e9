"""Passwords and tokens stay out of logs, answers and error texts.

The whole run is watched by tests/log_guard.py (every log record of every test); the tests here
check that the guard is in place and works, and drive the failure paths where a secret is most
likely to slip out: wrong password, failed AUTH (also a server that echoes the password), TLS
failures, a server that does not offer STARTTLS, a timeout and a refused connection.
"""

from __future__ import annotations

import ast
import datetime
import http.client
import json
import logging
import os
import socket
import ssl
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt as pyjwt
import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword
from werkzeug.serving import make_server
from werkzeug.test import EnvironBuilder

from smtp_service import create_app
from smtp_service.services.netguard import HostGuard
from smtp_service.services.transport import Secret, SmtpEndpoint, TransportError, connect
from tests.conftest import JWT_SECRET, SMTP_PASSWORD, SMTP_USER, settings_body
from tests.log_guard import GLOBAL_PASSWORD, GUARD, SecretLogGuard
from tests.smtpd import SmtpServer

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- the guard itself --------------------------------------------------------------------------


def test_guard_is_installed_and_knows_the_secrets(app_config, tokens):
    root = logging.getLogger()
    assert GUARD in root.handlers and root.level == logging.DEBUG
    assert {SMTP_PASSWORD, app_config["SMTP_PASS"], JWT_SECRET} <= set(GUARD.passwords)
    assert GLOBAL_PASSWORD == app_config["SMTP_PASS"]
    token = tokens.make("acct-a")
    assert token.rsplit(".", 1)[1] in GUARD.signatures
    other = pyjwt.encode({"sub": "x"}, "y" * 32, algorithm="HS256")
    assert other.rsplit(".", 1)[1] in GUARD.signatures
    header = tokens.headers("acct-b")["Authorization"]
    assert header.rsplit(".", 1)[1] in GUARD.signatures


def _record(msg: str, *args: Any, exc: BaseException | None = None, **extra: Any):
    record = logging.LogRecord("tests.fake", logging.INFO, __file__, 1, msg, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    record.__dict__.update(extra)
    return record


def test_guard_finds_and_masks_every_kind_of_leak():
    """A private guard (the session's must stay clean) fed records directly."""
    guard = SecretLogGuard()
    guard.add_secret("pa55-word-for-the-test", "the password")
    token = pyjwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256")
    guard.add_token(token)
    try:
        raise RuntimeError("login failed for pa55-word-for-the-test")
    except RuntimeError as exc:
        failure = exc
    records = [
        _record("password is %s", "pa55-word-for-the-test"),
        _record("Authorization: Bearer %s", token),
        _record("signature only: %s", token.rsplit(".", 1)[1]),
        _record("it failed", exc=failure),
        _record("structured", password="pa55-word-for-the-test"),
        _record("clean: nothing to see, eyJhbGciOi.eyJzdWIiOi.not-a-known-signature-at-all"),
    ]
    for record in records:
        guard.handle(record)
    assert [h.what for h in guard.hits] == [
        "the password",
        "a bearer token issued during the run",
        "a bearer token issued during the run",
        "the password",
        "the password",
    ]
    for hit in guard.hits:
        assert "pa55-word-for-the-test" not in hit.excerpt
        assert token.rsplit(".", 1)[1] not in hit.excerpt
    assert "<the password>" in guard.hits[0].excerpt
    assert "<token signature>" in guard.hits[1].excerpt
    assert guard.scanned == {"tests.fake": len(records)}


def test_guard_sees_loggers_that_do_not_propagate():
    logger = logging.getLogger("tests.security.not-propagating")
    logger.propagate = False
    try:
        before = GUARD.scanned.get(logger.name, 0)
        logger.info("a clean line")
        logger.debug("another clean line")
        assert GUARD.scanned.get(logger.name, 0) == before + 2
    finally:
        logger.propagate = True


# -- failure paths -----------------------------------------------------------------------------


class EchoingServer(SmtpServer):
    """A hostile server whose AUTH failure reply repeats the password it was given."""

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        self.auth_attempts.append((auth_data.login.decode(), False))
        echoed = auth_data.password.decode()
        return AuthResult(success=False, handled=False,
                          message=f"535 5.7.8 password {echoed} is not valid")


@dataclass
class Failure:
    kind: str
    body: dict[str, Any]  # the settings a caller gives; body["pass"] is the secret
    says: str  # what the error text must say
    server: SmtpServer | None
    timeout: float


FAILURES = [
    "wrong password",
    "unknown user",
    "server echoes the password",
    "untrusted certificate",
    "implicit TLS to a STARTTLS server",
    "no STARTTLS offered",
    "timeout",
    "refused",
]


@pytest.fixture(scope="module")
def foreign_tls() -> ssl.SSLContext:
    """A server TLS context whose certificate chains to a CA the process does not trust."""
    cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture(params=FAILURES)
def failure(request, smtp_factory, server_tls, foreign_tls) -> Iterator[Failure]:
    kind = request.param
    if kind == "wrong password":
        server = smtp_factory(users={SMTP_USER: "the-real-password-9"})
        yield Failure(kind, settings_body(server), "Authentication failed (535", server, 3.0)
    elif kind == "unknown user":
        server = smtp_factory()
        body = settings_body(server, user="nobody@example.com")
        yield Failure(kind, body, "Authentication failed (535", server, 3.0)
    elif kind == "server echoes the password":
        server = EchoingServer(mode="starttls", users={SMTP_USER: "x"},
                               server_context=server_tls).start()
        try:
            yield Failure(kind, settings_body(server), "password *** is not valid", server, 3.0)
        finally:
            server.stop()
    elif kind == "untrusted certificate":
        server = smtp_factory(server_context=foreign_tls)
        body = settings_body(server)
        yield Failure(kind, body, "TLS certificate verification failed", server, 3.0)
    elif kind == "implicit TLS to a STARTTLS server":
        server = smtp_factory()
        yield Failure(kind, settings_body(server, secure=True), "TLS handshake failed", server,
                      3.0)
    elif kind == "no STARTTLS offered":
        server = smtp_factory("plain")
        yield Failure(kind, settings_body(server), "does not offer STARTTLS", server, 3.0)
    elif kind == "timeout":
        # accepted by the kernel's backlog, never a greeting
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            body = {"host": "localhost", "port": sock.getsockname()[1], "user": SMTP_USER,
                    "pass": SMTP_PASSWORD}
            yield Failure(kind, body, "Timed out talking to localhost", None, 1.0)
    elif kind == "refused":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # bound, not listening: connections are refused
            body = {"host": "localhost", "port": port, "user": SMTP_USER, "pass": SMTP_PASSWORD}
            yield Failure(kind, body, "Connection refused by localhost", None, 3.0)
    else:
        raise AssertionError(kind)


def _exception_text(exc: BaseException, *, suppressed_too: bool) -> str:
    """Everything an exception shows when printed or logged (its traceback, str, repr, args);
    with suppressed_too, also the contexts that `raise ... from None` hides from printing."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(current.args)]
        parts += [repr(v) for v in vars(current).values()] if hasattr(current, "__dict__") else []
        if current.__cause__ is not None:
            current = current.__cause__
        elif suppressed_too or not current.__suppress_context__:
            current = current.__context__
        else:
            current = None
    return "\n".join(parts)


def _data_bytes(data_dir: str) -> bytes:
    blobs = []
    for folder, _dirs, files in os.walk(data_dir):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                blobs.append(handle.read())
    return b"".join(blobs)


def _logged_text(caplog) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return caplog.text + "\n".join(formatter.format(r) for r in caplog.records)


def test_failure_paths_keep_the_password_out_of_answers_logs_and_errors(
    app_config, tokens, failure, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="smtp_service")
    if failure.kind == "server echoes the password":
        # the hostile test server's own DEBUG lines quote its reply (with the password): that
        # is the test double talking, not the service, so they are left out of the run
        caplog.set_level(logging.INFO, logger="mail.log")
    password = failure.body["pass"]
    app = create_app({**app_config, "SMTP_TIMEOUT": str(failure.timeout)})
    client = app.test_client()
    headers = tokens.headers()
    try:
        r = client.post("/api/smtp/test", json=failure.body, headers=headers)
        assert r.status_code == 400 and r.json["success"] is False, r.json
        assert failure.says in r.json["error"]
        assert password not in r.get_data(as_text=True)

        r = client.post("/api/smtp/settings", json=failure.body, headers=headers)
        assert r.status_code == 200 and password not in r.get_data(as_text=True)
        r = client.get("/api/smtp/settings", headers=headers)
        assert r.json["hasPassword"] is True and password not in r.get_data(as_text=True)
        r = client.post(
            "/api/messages/send-email",
            json={"from": failure.body["user"], "to": "rcpt@example.net", "subject": "s",
                  "text": "t"},
            headers=headers,
        )
        assert r.status_code == 502 and r.json["transport"] == "custom", r.json
        assert failure.says in r.json["error"] and r.json["bounce"] is None
        assert password not in r.get_data(as_text=True)
        r = client.get(f"/api/messages/{r.json['messageId']}", headers=headers)
        assert r.status_code == 200 and r.json["status"] == "failed"
        assert password not in r.get_data(as_text=True)

        endpoint = SmtpEndpoint(
            host=failure.body["host"],
            port=failure.body["port"],
            secure=failure.body.get("secure", False),
            user=failure.body["user"],
            password=Secret(password),
        )
        with pytest.raises(TransportError) as info:
            connect(endpoint, timeout=failure.timeout,
                    guard=HostGuard(("127.0.0.1/32", "localhost")))
        assert failure.says in info.value.text
        # the echoing server's raw reply stays in the suppressed __context__ (never printed)
        deep = failure.kind != "server echoes the password"
        assert password not in _exception_text(info.value, suppressed_too=deep)
        assert password not in repr(endpoint)
    finally:
        app.extensions["smtp_service"].pool.close_all()

    if failure.kind == "no STARTTLS offered":
        assert failure.server is not None and failure.server.auth_attempts == []
    assert "transport failed" in caplog.text  # the send failure was logged...
    assert password not in _logged_text(caplog)  # ...without the password
    assert password.encode() not in _data_bytes(app.config["DATA_DIR"])
    out, err = capfd.readouterr()
    assert password not in out and password not in err


def test_global_server_failure_keeps_its_password_out(app_config, tokens, smtp_factory, caplog):
    caplog.set_level(logging.DEBUG)
    strict = smtp_factory(users={"global@example.com": "not-what-is-configured"})
    app = create_app({**app_config, "SMTP_PORT": str(strict.port)})
    client = app.test_client()
    try:
        view = client.get("/api/smtp/settings", headers=tokens.headers())
        assert view.json["isGlobal"] is True and view.json["hasPassword"] is True
        r = client.post(
            "/api/messages/send-email",
            json={"from": "noreply@example.com", "to": "rcpt@example.net", "subject": "s",
                  "text": "t"},
            headers=tokens.headers(),
        )
        assert r.status_code == 502 and r.json["transport"] == "global", r.json
        assert "Authentication failed" in r.json["error"]
        record = client.get(f"/api/messages/{r.json['messageId']}", headers=tokens.headers())
        for text in (view.get_data(as_text=True), r.get_data(as_text=True),
                     record.get_data(as_text=True)):
            assert GLOBAL_PASSWORD not in text
    finally:
        app.extensions["smtp_service"].pool.close_all()
    assert strict.auth_attempts and {ok for _, ok in strict.auth_attempts} == {False}
    assert "global transport failed" in caplog.text
    assert GLOBAL_PASSWORD not in _logged_text(caplog)


# -- access lines ------------------------------------------------------------------------------


def test_werkzeug_access_lines_hold_no_token_or_password(app, tokens, smtp_server, caplog):
    caplog.set_level(logging.INFO, logger="werkzeug")
    token = tokens.make()
    scanned = GUARD.scanned.get("werkzeug", 0)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            for method, path, body, auth in (
                ("GET", "/api/smtp/settings", None, True),
                ("POST", "/api/smtp/test", settings_body(smtp_server), True),
                ("POST", "/api/smtp/settings", settings_body(smtp_server), True),
                ("GET", "/api/smtp/settings", None, False),
            ):
                headers = {"Content-Type": "application/json"}
                if auth:
                    headers["Authorization"] = f"Bearer {token}"
                conn.request(method, path, body=None if body is None else json.dumps(body),
                             headers=headers)
                response = conn.getresponse()
                text = response.read().decode()
                assert response.status == (200 if auth else 401), text
                assert SMTP_PASSWORD not in text
        finally:
            conn.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "werkzeug"]
    assert len(lines) == 4 and '"POST /api/smtp/test HTTP/1.1" 200' in lines[1]
    assert GUARD.scanned.get("werkzeug", 0) >= scanned + 4
    for line in lines:
        assert token not in line and token.rsplit(".", 1)[1] not in line
        assert SMTP_PASSWORD not in line


def _gunicorn_setting(name: str) -> Any:
    """A constant of gunicorn.conf.py, read without running the file (it loads .env)."""
    tree = ast.parse((REPO_ROOT / "gunicorn.conf.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not set in gunicorn.conf.py")


def _gunicorn_conf(tmp_path: Path, **env: str) -> dict[str, Any]:
    """gunicorn.conf.py's settings as gunicorn reads them (the file run in a child with `env`)."""
    import subprocess
    import sys

    script = (
        "import json, runpy, shutil; ns = runpy.run_path('gunicorn.conf.py'); "
        "shutil.rmtree(ns['_metrics_dir']) if ns['_own_metrics_dir'] else None; "
        "print(json.dumps({k: ns[k] for k in ('accesslog', 'access_log_format')}))"
    )
    child_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PROMETHEUS")},
        "JWT_SECRET_KEY": JWT_SECRET,
        "DATA_DIR": str(tmp_path / "data"),
        **env,
    }
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=child_env,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_gunicorn_access_log_is_off_unless_asked_for(tmp_path):
    """The service writes one line per request itself; gunicorn's would be a second one."""
    assert _gunicorn_conf(tmp_path, GUNICORN_ACCESS_LOG="")["accesslog"] is None
    assert _gunicorn_conf(tmp_path, GUNICORN_ACCESS_LOG="-")["accesslog"] == "-"


def test_gunicorn_access_lines_hold_no_token(app, tokens, tmp_path):
    """When turned on (GUNICORN_ACCESS_LOG): gunicorn's own logger with the deployment's
    access_log_format, fed the real app's
    answers to requests that carry a token in every place a client might put one."""
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    cfg = Config()
    cfg.set("accesslog", str(tmp_path / "access.log"))
    cfg.set("errorlog", str(tmp_path / "error.log"))
    cfg.set("access_log_format", _gunicorn_setting("access_log_format"))
    logger = Logger(cfg)
    token = tokens.make()
    scanned = GUARD.scanned.get("gunicorn.access", 0)
    try:
        for path, query in (
            ("/api/smtp/settings", f"access_token={token}"),
            ("/api/messages/send-email", ""),
            ("/t/open/x.gif", f"jwt={token}"),
        ):
            headers = {
                "Authorization": f"Bearer {token}",
                "Cookie": f"access_token_cookie={token}",
                "Referer": f"https://app.example.test/page?token={token}",
                "User-Agent": f"client/{token}",
            }
            builder = EnvironBuilder(path=path, query_string=query, headers=headers)
            environ = builder.get_environ()
            environ["RAW_URI"] = f"{path}?{query}" if query else path
            answer: dict[str, Any] = {}

            def start_response(status, response_headers, exc_info=None, answer=answer):
                answer.update(status=status, headers=response_headers)

            result = app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                getattr(result, "close", lambda: None)()
            resp = SimpleNamespace(status=answer["status"], sent=len(body),
                                   headers=answer["headers"])
            req = SimpleNamespace(headers=[(k.upper(), v) for k, v in headers.items()])
            logger.access(resp, req, environ, datetime.timedelta(milliseconds=3))
    finally:
        for log in (logger.access_log, logger.error_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
                handler.close()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 3 and "/api/smtp/settings" in lines[0]
    assert GUARD.scanned.get("gunicorn.access", 0) == scanned + 3
    for line in lines:
        assert token not in line and token.rsplit(".", 1)[1] not in line

"""Real gunicorn for end-to-end tests: the service as it is deployed, on a loopback port.

gunicorn.conf.py calls load_dotenv(), and environment variables win over .env: so every
variable the service (or a developer's .env) knows is set here explicitly, empty when unused,
and nothing from the repository's .env can leak into the run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest

from smtp_service.services.crypto import new_key
from tests.conftest import JWT_SECRET, SMTP_PASSWORD, SMTP_USER
from tests.smtpd import SmtpServer

REPO_ROOT = Path(__file__).resolve().parents[2]
GLOBAL_USER = "global@example.com"
GLOBAL_PASSWORD = "global-pass-XYZ"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 20.0  # gunicorn's graceful_timeout is 15 s

# Every variable .env.example documents, plus the ones config.py and gunicorn.conf.py read.
_KNOWN_VARIABLES = (
    "JWT_SECRET_KEY JWT_PUBLIC_KEY JWT_ALGORITHM JWT_ACCOUNT_CLAIM JWT_ISSUER JWT_AUDIENCE "
    "DATA_DIR SMTP_ENCRYPTION_KEYS SMTP_HOST SMTP_PORT SMTP_SECURE SMTP_USER SMTP_PASS "
    "SMTP_FROM SMTP_REQUIRE_TLS SMTP_TIMEOUT SMTP_HOST_ALLOWLIST BIND MAX_REQUEST_BYTES "
    "MAX_MESSAGE_BYTES MAX_RECIPIENTS PUBLIC_BASE_URL SMTP_POOL_SIZE SMTP_POOL_MAX_MESSAGES "
    "SMTP_POOL_IDLE_SECONDS SMTP_POOL_MAX_LIFETIME_SECONDS SMTP_POOL_MAX_ACCOUNTS "
    "WEB_CONCURRENCY GUNICORN_THREADS DEV_SMTP_PORT LOG_LEVEL DATABASE_URL DATABASE_POOL_SIZE "
    "GUNICORN_CONTROL_SOCKET DEV_MAIL_CATCHER LOG_FORMAT GUNICORN_ACCESS_LOG METRICS_ALLOW_CIDRS "
    "READYZ_SMTP_TIMEOUT READYZ_CACHE_SECONDS"
).split()
_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


def _dotenv_names(path: Path) -> set[str]:
    """The variable names (never the values) a dotenv file sets."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {m.group(1) for line in text.splitlines() if (m := _ENV_LINE.match(line))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class LiveService:
    """A running gunicorn with the service, and what a test needs to talk to it."""

    base_url: str
    port: int
    data_dir: Path
    log_path: Path
    jwt_secret: str = field(repr=False)
    global_server: SmtpServer
    account_server: SmtpServer
    process: subprocess.Popen[bytes] = field(repr=False)
    # Values that must never show up in the service's output (nor in pytest's reports).
    secrets: list[str] = field(default_factory=list, repr=False)

    def token(self, account: str = "acct-e2e-a", user: str = "user-e2e-1") -> str:
        now = int(time.time())
        claims = {
            "sub": user,
            "accountId": account,
            "type": "access",
            "iat": now,
            "exp": now + 600,
        }
        issued = pyjwt.encode(claims, self.jwt_secret, algorithm="HS256")
        self.secrets.append(issued)  # a bearer token must never reach the logs either
        return issued

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 15.0,
    ) -> Response:
        """One HTTP request with urllib; error statuses are answers, not exceptions."""
        all_headers = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            self.base_url + path, data=data, headers=all_headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Response(resp.status, dict(resp.headers), resp.read().decode())
        except urllib.error.HTTPError as exc:
            with exc:
                return Response(exc.code, dict(exc.headers), exc.read().decode())

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM gunicorn, wait for its graceful shutdown, kill its group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_group(self.process)
        # Workers are in gunicorn's own session: make sure none outlives the master.
        _kill_group(self.process)
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_lines(self, since: int = 0) -> list[dict[str, Any]]:
        """The JSON log lines written after character `since` of the output (LOG_FORMAT is
        auto and the output a file: JSON), each parsed; other lines are left out."""
        lines = []
        for line in self.log_text()[since:].splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def request_lines(self, since: int = 0) -> list[dict[str, Any]]:
        """The service's request lines (smtp_service.requests) after `since`."""
        return [x for x in self.log_lines(since) if x.get("logger") == "smtp_service.requests"]

    def worker_pids(self, method: str, path: str, since: int = 0) -> set[int]:
        """The workers (pids) that answered `method path` after `since`."""
        return {
            x["pid"]
            for x in self.request_lines(since)
            if x.get("method") == method and x.get("path") == path
        }

    def assert_no_secrets(self) -> None:
        """No password, key, token issued by this test, nor anything shaped like a bearer
        token or a JWT, in everything gunicorn and the app wrote."""
        log = self.log_text()
        for secret in self.secrets:
            assert secret not in log, "a secret appears in gunicorn's output"
            if secret.count(".") == 2:  # a token: its signature alone is enough to leak it
                assert secret.rsplit(".", 1)[1] not in log, "a token signature in the output"
        found = _LEAK_SHAPES.search(log)
        assert found is None, f"something shaped like a credential in the output: {found[0][:12]}"

    def assert_log_clean(self) -> None:
        """No secret and no traceback in everything gunicorn and the app wrote."""
        self.assert_no_secrets()
        log = self.log_text()
        assert "Traceback" not in log, f"gunicorn's output has a traceback:\n{log[-4000:]}"


# A bearer credential or a JWT (a JSON header "eyJ", then two more base64url parts).
_LEAK_SHAPES = re.compile(
    r"[Bb]earer\s+(?!\[redacted\])[A-Za-z0-9._~+/=-]{8,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _gunicorn_command() -> list[str]:
    gunicorn = REPO_ROOT / ".venv" / "bin" / "gunicorn"
    prefix = [str(gunicorn)] if gunicorn.exists() else [sys.executable, "-m", "gunicorn"]
    # gunicorn 27 opens a control socket in ~/.gunicorn by default: a second gunicorn (a
    # developer's `make run`, another test) would share it, so the tests run without one.
    return [*prefix, "-c", "gunicorn.conf.py", "--no-control-socket", "wsgi:app"]


def service_environment(
    *, port: int, data_dir: Path, ca_file: str, global_server: SmtpServer, **overrides: str
) -> dict[str, str]:
    """The child's environment: inherited basics, and every service variable set explicitly."""
    env = dict(os.environ)
    env.pop("GUNICORN_CMD_ARGS", None)  # a developer's extra gunicorn flags stay out
    # gunicorn.conf.py makes a fresh metrics folder per start; a name (even an empty one) in
    # the environment would be taken as the operator's.
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("SMTP_SERVICE_METRICS_DIR", None)
    names = set(_KNOWN_VARIABLES)
    names |= _dotenv_names(REPO_ROOT / ".env") | _dotenv_names(REPO_ROOT / ".env.example")
    env.update(dict.fromkeys(names, ""))
    env.update(
        {
            "BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": "2",
            "GUNICORN_THREADS": "4",
            "DATA_DIR": str(data_dir),
            "JWT_SECRET_KEY": JWT_SECRET,
            "JWT_PUBLIC_KEY": "",
            "JWT_ALGORITHM": "HS256",
            "JWT_ACCOUNT_CLAIM": "accountId",
            "SMTP_ENCRYPTION_KEYS": new_key(),
            "SMTP_HOST_ALLOWLIST": "127.0.0.1/32,localhost",
            "SMTP_HOST": "localhost",
            "SMTP_PORT": str(global_server.port),
            "SMTP_SECURE": "false",
            "SMTP_REQUIRE_TLS": "true",
            "SMTP_USER": GLOBAL_USER,
            "SMTP_PASS": GLOBAL_PASSWORD,
            "SMTP_FROM": "noreply@example.com",
            "SMTP_TIMEOUT": "5",
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            # the default (5 a minute) is tested in tests/e2e/test_rate_limits.py
            "SMTP_TEST_RATE_LIMIT": "10000/minute",
            # OAuth2 sign-in can start (its URL is only built; no provider is reached)
            "OAUTH_MICROSOFT_CLIENT_ID": "e2e-application",
            "SSL_CERT_FILE": ca_file,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def _wait_healthy(live: LiveService) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last_error = "no answer"
    while time.monotonic() < deadline:
        if not live.running():
            code = live.process.returncode
            pytest.fail(f"gunicorn exited with {code}:\n{live.log_text()[-4000:]}")
        try:
            response = live.request("GET", "/healthz", timeout=1.0)
            if response.status == 200:
                return
            last_error = f"status {response.status}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.1)
    pytest.fail(
        f"gunicorn did not answer /healthz within {START_TIMEOUT:.0f} s ({last_error}):\n"
        f"{live.log_text()[-4000:]}"
    )


def start_live(
    *,
    port: int,
    data_dir: Path,
    log_path: Path,
    env: dict[str, str],
    global_server: SmtpServer,
    account_server: SmtpServer,
) -> LiveService:
    """Start gunicorn with `env` and wait until /healthz answers; the caller stops it."""
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            _gunicorn_command(),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown can reach the workers
        )
    live = LiveService(
        base_url=f"http://127.0.0.1:{port}",
        port=port,
        data_dir=data_dir,
        log_path=log_path,
        jwt_secret=JWT_SECRET,
        global_server=global_server,
        account_server=account_server,
        process=process,
        secrets=[GLOBAL_PASSWORD, SMTP_PASSWORD, JWT_SECRET, env["SMTP_ENCRYPTION_KEYS"]],
    )
    try:
        _wait_healthy(live)
    except BaseException:
        live.stop()
        raise
    return live


def start_instances(
    tmp_path: Path,
    *,
    ca_file: str,
    global_server: SmtpServer,
    account_server: SmtpServer,
    database_url: str,
    names: tuple[str, ...] = ("a", "b"),
    **env: str,
) -> list[LiveService]:
    """Instances (each a gunicorn of 2 workers) sharing one data folder, one database and one
    encryption key, as several hosts would run them; `env` over every one's environment. The
    caller stops them (also when this raises, those started are stopped here)."""
    data_dir = tmp_path / "shared-data"
    key = new_key()
    started: list[LiveService] = []
    try:
        for name in names:
            port = free_port()
            environment = service_environment(
                port=port,
                data_dir=data_dir,
                ca_file=ca_file,
                global_server=global_server,
                DATABASE_URL=database_url,
                SMTP_ENCRYPTION_KEYS=key,
                **env,
            )
            started.append(
                start_live(
                    port=port,
                    data_dir=data_dir,
                    log_path=tmp_path / f"gunicorn-{name}.log",
                    env=environment,
                    global_server=global_server,
                    account_server=account_server,
                )
            )
    except BaseException:
        for live in started:
            live.stop()
        raise
    return started


@pytest.fixture
def live_service(
    tmp_path: Path, trust_test_ca: str, global_server: SmtpServer, smtp_factory: Any
) -> Iterator[LiveService]:
    """gunicorn with 2 workers on a free loopback port; stopped (SIGTERM, then kill) at the end.

    global_server is the fallback (its own user); account_server is a second STARTTLS + AUTH
    server for the account's own settings, logging in as tests.conftest.SMTP_USER.
    """
    account_server = smtp_factory("starttls")
    port = free_port()
    data_dir = tmp_path / "data"
    env = service_environment(
        port=port, data_dir=data_dir, ca_file=trust_test_ca, global_server=global_server
    )
    live = start_live(
        port=port,
        data_dir=data_dir,
        log_path=tmp_path / "gunicorn.log",
        env=env,
        global_server=global_server,
        account_server=account_server,
    )
    try:
        yield live
    finally:
        live.stop()
    live.assert_no_secrets()  # after the whole test: every line gunicorn and the app wrote


__all__ = [
    "GLOBAL_USER",
    "LiveService",
    "REPO_ROOT",
    "SMTP_PASSWORD",
    "SMTP_USER",
    "free_port",
    "service_environment",
    "start_instances",
    "start_live",
]

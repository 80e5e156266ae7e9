"""Configuration: bad values stop start-up with a one-line reason, before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smtp_service.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
OK = {"JWT_SECRET_KEY": "k" * 40}


def test_defaults():
    config = load_config(OK)
    assert config["JWT_ALGORITHM"] == "HS256" and config["JWT_ACCOUNT_CLAIM"] == "accountId"
    assert config["SMTP_PORT"] == 587 and config["SMTP_SECURE"] is False
    assert config["SMTP_COMMAND_TIMEOUT"] == 30.0 and config["SMTP_REQUIRE_TLS"] is True
    assert config["SMTP_POOL_SIZE"] == 3 and config["MAX_RECIPIENTS"] == 50
    assert config["PUBLIC_BASE_URL"] is None  # open tracking off until it is set
    assert config["LOG_LEVEL"] == "INFO"
    assert config["JWT_DECODE_LEEWAY"] == 5
    hosts = load_config(
        {**OK, "SMTP_HOST": "Mail.Example.COM.", "SMTP_HOST_ALLOWLIST": "Bücher.test,10.0.0.0/8"}
    )
    assert hosts["SMTP_HOST"] == "mail.example.com"
    assert hosts["SMTP_HOST_ALLOWLIST"] == ("xn--bcher-kva.test", "10.0.0.0/8")
    assert config["DATA_DIR"] == os.path.abspath("data")
    assert load_config({**OK, "SMTP_PORT": "465"})["SMTP_SECURE"] is True


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "JWT_SECRET_KEY"),
        ({"JWT_SECRET_KEY": "short"}, "JWT_SECRET_KEY"),
        ({**OK, "JWT_ALGORITHM": "RS256"}, "JWT_PUBLIC_KEY"),
        ({**OK, "JWT_PUBLIC_KEY": "/nonexistent/key.pem"}, "JWT_PUBLIC_KEY"),
        ({**OK, "SMTP_PORT": "70000"}, "SMTP_PORT"),
        ({**OK, "SMTP_PORT": "smtp"}, "SMTP_PORT"),
        ({**OK, "SMTP_SECURE": "maybe"}, "SMTP_SECURE"),
        ({**OK, "SMTP_REQUIRE_TLS": "sometimes"}, "SMTP_REQUIRE_TLS"),
        ({**OK, "SMTP_TIMEOUT": "abc"}, "SMTP_TIMEOUT"),
        ({**OK, "SMTP_TIMEOUT": "0"}, "SMTP_TIMEOUT"),
        ({**OK, "SMTP_HOST_ALLOWLIST": "10.0.0.0/33"}, "SMTP_HOST_ALLOWLIST"),
        ({**OK, "MAX_REQUEST_BYTES": "-1"}, "MAX_REQUEST_BYTES"),
        ({**OK, "MAX_RECIPIENTS": "0"}, "MAX_RECIPIENTS"),
        ({**OK, "SMTP_POOL_SIZE": "many"}, "SMTP_POOL_SIZE"),
        ({**OK, "SMTP_POOL_IDLE_SECONDS": "-5"}, "SMTP_POOL_IDLE_SECONDS"),
        ({**OK, "PUBLIC_BASE_URL": "mail.example.com"}, "PUBLIC_BASE_URL"),
        ({**OK, "LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({**OK, "SMTP_HOST": "smtp.example.com:587"}, "SMTP_HOST"),
        ({**OK, "SMTP_HOST_ALLOWLIST": "relay.internal,smtp..internal"}, "SMTP_HOST_ALLOWLIST"),
        ({**OK, "JWT_DECODE_LEEWAY": "a bit"}, "JWT_DECODE_LEEWAY"),
        ({**OK, "JWT_DECODE_LEEWAY": "-1"}, "JWT_DECODE_LEEWAY"),
        ({**OK, "JWT_DECODE_LEEWAY": "3600"}, "JWT_DECODE_LEEWAY"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_variable(env, named):
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    text = str(caught.value)
    assert named in text and "\n" not in text


def _clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "SMTP_"))}
    env.pop("GUNICORN_CMD_ARGS", None)
    return {**env, **values}


def test_gunicorn_refuses_to_start_with_one_line_and_no_traceback(tmp_path):
    temp = tmp_path / "tmp"  # where gunicorn.conf.py makes its metrics folder
    temp.mkdir()
    env = _clean_env(JWT_SECRET_KEY="k" * 40, SMTP_TIMEOUT="abc", DATA_DIR=str(tmp_path),
                     SMTP_HOST="localhost", BIND="127.0.0.1:0", TMPDIR=str(temp))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    gunicorn = REPO / ".venv" / "bin" / "gunicorn"
    result = subprocess.run(
        [str(gunicorn), "-c", "gunicorn.conf.py", "--no-control-socket", "wsgi:app"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "smtp-service: configuration error: SMTP_TIMEOUT must be a number of seconds, not 'abc'"
    )
    assert list(temp.iterdir()) == []  # the metrics folder made for the workers is gone too


def test_flask_cli_refuses_with_one_line(tmp_path):
    env = _clean_env(DATA_DIR=str(tmp_path), JWT_SECRET_KEY="")  # empty: a .env cannot fill it
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "smtp", "new-key"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "smtp-service: configuration error: JWT_SECRET_KEY is not set" in result.stderr

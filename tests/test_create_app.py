"""create_app: one configuration path, validated once by load_config."""

from __future__ import annotations

import pytest

from smtp_service import create_app
from smtp_service.config import ConfigError
from smtp_service.services.crypto import new_key
from tests.conftest import JWT_SECRET


def _config(tmp_path, **extra):
    return {"DATA_DIR": str(tmp_path), "JWT_SECRET_KEY": JWT_SECRET,
            "SMTP_ENCRYPTION_KEYS": new_key(), **extra}


def test_test_config_values_are_read_like_the_environment(tmp_path):
    app = create_app(_config(tmp_path, TESTING=True, SMTP_PORT="2525", SMTP_SECURE="yes"))
    assert app.config["TESTING"] is True
    assert app.config["SMTP_PORT"] == 2525 and app.config["SMTP_SECURE"] is True
    assert create_app(_config(tmp_path)).config["TESTING"] is False


def test_the_environment_is_not_read_for_a_test_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SMTP_PORT", "2626")
    assert create_app(_config(tmp_path)).config["SMTP_PORT"] == 587


def test_a_value_that_is_not_a_string_is_refused(tmp_path):
    with pytest.raises(TypeError, match="SMTP_PORT"):
        create_app(_config(tmp_path, SMTP_PORT=2525))


def test_bad_values_fail_with_the_config_error(tmp_path):
    with pytest.raises(ConfigError, match="SMTP_PORT must be between 1 and 65535, not 0"):
        create_app(_config(tmp_path, SMTP_PORT="0"))

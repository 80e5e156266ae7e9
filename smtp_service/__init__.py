"""smtp-service: per-account SMTP sending with a global fallback, as a Flask app factory."""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from flask import Flask

from smtp_service.config import ConfigError, load_config
from smtp_service.services.crypto import KeyConfigError, SecretBox, load_or_create_key_file
from smtp_service.services.mailer import ABANDON_MARGIN_SECONDS, Mailer, OpenTracker
from smtp_service.services.netguard import HostGuard
from smtp_service.services.pool import TransportPool
from smtp_service.services.records import MessageRecords
from smtp_service.services.senders import SenderService
from smtp_service.services.settings import SettingsService
from smtp_service.services.transport import Secret, SmtpEndpoint, Timeouts, connect
from smtp_service.storage.database import Database, DatabaseError, write_gate_seconds
from smtp_service.storage.files import AccountFiles
from smtp_service.storage.idempotency import IdempotencyStore
from smtp_service.storage.messages import MessageLog
from smtp_service.storage.refusals import RefusalBoard
from smtp_service.storage.suppressions import SuppressionList

__all__ = ["ConfigError", "create_app"]


class Services:
    """The service objects of one app, built once from its config."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.data_dir: str = config["DATA_DIR"]
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        keys = list(config["SMTP_ENCRYPTION_KEYS"]) or [load_or_create_key_file(self.data_dir)]
        try:
            self.box = SecretBox(keys)
        except KeyConfigError as exc:
            raise ConfigError(str(exc)) from None
        self.guard = HostGuard(tuple(config["SMTP_HOST_ALLOWLIST"]))
        self.files = AccountFiles(self.data_dir)
        self.global_endpoint = global_endpoint(config)
        self.timeouts = smtp_timeouts(config)
        self.settings = SettingsService(
            self.files,
            self.box,
            self.guard,
            self.global_endpoint,
            self.timeouts,
            ehlo_name=config["SMTP_EHLO_NAME"],
        )
        # The confirmation codes of senders are signed with a key derived from the encryption
        # key (as the open pixels are): shared by every worker, no new secret to configure.
        self.senders = SenderService(
            self.files,
            verification=config["GLOBAL_SENDER_VERIFICATION"],
            secret=hashlib.sha256(b"smtp-service sender confirmation:" + keys[0].encode()).digest(),
        )
        try:
            self.database = Database(
                config["DATABASE_URL"],
                pool_size=config["DATABASE_POOL_SIZE"],
                gate_timeout=write_gate_seconds(config["SMTP_DEADLINE"], ABANDON_MARGIN_SECONDS),
            )
            self.database.migrate()
        except DatabaseError as exc:
            raise ConfigError(str(exc)) from None
        self.messages = MessageLog(self.database)
        self.suppressions = SuppressionList(
            self.database,
            days=config["SUPPRESSION_DAYS"],
            soft_limit=config["SOFT_BOUNCE_LIMIT"],
            soft_days=config["SOFT_BOUNCE_DAYS"],
        )
        self.idempotency = IdempotencyStore(self.database)
        self.records = MessageRecords(self.messages, self.suppressions)
        self.pool = TransportPool(
            functools.partial(
                connect,
                timeouts=self.timeouts,
                guard=self.guard,
                ehlo_name=config["SMTP_EHLO_NAME"],
            ),
            size=config["SMTP_POOL_SIZE"],
            max_messages=config["SMTP_POOL_MAX_MESSAGES"],
            idle_seconds=config["SMTP_POOL_IDLE_SECONDS"],
            max_lifetime=config["SMTP_POOL_MAX_LIFETIME_SECONDS"],
            max_accounts=config["SMTP_POOL_MAX_ACCOUNTS"],
            acquire_timeout=config["SMTP_POOL_WAIT_SECONDS"],
            refusals=RefusalBoard(self.data_dir),
            pipelining=config["SMTP_PIPELINING"],
        )
        # A forked worker must not share the parent's sockets; on exit, QUIT politely.
        os.register_at_fork(after_in_child=self.pool.reset_after_fork)
        atexit.register(self.pool.close_all)
        self.settings.on_change = self.pool.forget
        # The open-pixel signing key is derived from the encryption key, so it survives
        # restarts and is shared by every worker without another setting.
        tracking_secret = hashlib.sha256(b"smtp-service open pixel:" + keys[0].encode()).digest()
        self.mailer = Mailer(
            settings=self.settings,
            senders=self.senders,
            pool=self.pool,
            messages=self.messages,
            suppressions=self.suppressions,
            idempotency=self.idempotency,
            tracker=OpenTracker(tracking_secret, config["PUBLIC_BASE_URL"]),
            global_from=config["SMTP_FROM"] or None,
            max_message_bytes=config["MAX_MESSAGE_BYTES"],
            max_recipients=config["MAX_RECIPIENTS"],
            deadline_seconds=self.timeouts.operation,
            global_pool_size=config["SMTP_GLOBAL_POOL_SIZE"],
            transaction=self.database.write,
            global_domains=frozenset(config["GLOBAL_SENDER_DOMAINS"]),
        )
        if config["PUBLIC_BASE_URL"] is None:
            logging.getLogger(__name__).warning(
                "PUBLIC_BASE_URL is not set: open tracking is off (no pixel is added)"
            )
        if self.global_endpoint is not None and config["SMTP_FROM"]:
            self.senders.notifier = self.mailer.send_confirmation
        elif config["GLOBAL_SENDER_VERIFICATION"] == "confirm":
            logging.getLogger(__name__).warning(
                "GLOBAL_SENDER_VERIFICATION=confirm without a global server and SMTP_FROM: "
                "new senders stay pending (`flask smtp senders confirm` confirms them)"
            )

    def data_dir_writable(self) -> bool:
        """True when a file can be created in the data folder."""
        try:
            with tempfile.TemporaryFile(dir=self.data_dir):
                return True
        except OSError:
            return False


def smtp_timeouts(config: Mapping[str, Any]) -> Timeouts:
    """The SMTP stage timeouts and the operation deadline, in seconds, from the config."""
    return Timeouts(
        connect=config["SMTP_CONNECT_TIMEOUT"],
        command=config["SMTP_COMMAND_TIMEOUT"],
        final_reply=config["SMTP_FINAL_REPLY_TIMEOUT"],
        operation=config["SMTP_DEADLINE"],
    )


def global_endpoint(config: Mapping[str, Any]) -> SmtpEndpoint | None:
    """The fallback server from the environment, trusted (no SSRF check), or None."""
    if not config["SMTP_HOST"]:
        return None
    return SmtpEndpoint(
        host=config["SMTP_HOST"],
        port=config["SMTP_PORT"],
        secure=config["SMTP_SECURE"],
        user=config["SMTP_USER"],
        password=Secret(config["SMTP_PASS"]) if config["SMTP_PASS"] else None,
        require_tls=config["SMTP_REQUIRE_TLS"],
        trusted=True,
    )


# Flask's own switches that a test config may set as they are (TESTING=True); every other key of
# a test config is an environment variable, read by load_config like the real environment.
FLASK_SWITCHES = frozenset({"TESTING"})


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: config, extensions, error handlers, blueprints, CLI.

    The configuration comes from one place, validated once by load_config: the environment
    (and .env) when test_config is None; otherwise test_config alone, whose values are
    environment strings ({"SMTP_PORT": "2525"}), except Flask's switches in FLASK_SWITCHES,
    which are set as given before the rest is read. Raises ConfigError for a bad value and
    TypeError for a test config value that is not a string.
    """
    app = Flask(__name__, static_folder=None)  # no static files: no unauthenticated /static
    if test_config is None:
        from dotenv import load_dotenv

        load_dotenv()
        env: Mapping[str, str] = os.environ
    else:
        app.config.update({k: v for k, v in test_config.items() if k in FLASK_SWITCHES})
        env = {k: v for k, v in test_config.items() if k not in FLASK_SWITCHES}
        not_text = sorted(k for k, v in env.items() if not isinstance(v, str))
        if not_text:
            raise TypeError(f"test config values are environment strings: {', '.join(not_text)}")
    app.config.update(load_config(env))
    configure_logging(app)
    register_extensions(app)
    register_error_handlers(app)
    register_blueprints(app)
    register_rate_limits(app)
    register_commands(app)
    return app


def configure_logging(app: Flask) -> None:
    """Log to stderr (gunicorn collects it) at INFO unless configured otherwise."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=app.config.get("LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


def register_extensions(app: Flask) -> None:
    """Bind flask-jwt-extended (with its token cache) and build the service container."""
    from smtp_service.auth import init_auth
    from smtp_service.extensions import jwt

    jwt.init_app(app)
    init_auth()
    app.extensions["smtp_service"] = Services(app.config)


def register_error_handlers(app: Flask) -> None:
    """One JSON error path for the whole app."""
    from smtp_service.errors import register_error_handlers as install

    install(app)


def register_blueprints(app: Flask) -> None:
    """Mount the HTTP routes."""
    from smtp_service.api import health, messages, openapi, senders, settings, tracking

    for module in (health, openapi, settings, messages, senders, tracking):
        app.register_blueprint(module.bp)


def register_rate_limits(app: Flask) -> None:
    """Per-client limits on the routes that need them (the open pixel)."""
    from smtp_service.api.tracking import limit_opens

    limit_opens(app)


def register_commands(app: Flask) -> None:
    """`flask --app wsgi smtp ...` maintenance commands."""
    from smtp_service.cli import smtp

    app.cli.add_command(smtp)

"""smtp-service: per-account SMTP sending with a global fallback, as a Flask app factory."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from flask import Flask

from smtp_service import metrics
from smtp_service.config import ConfigError, load_config
from smtp_service.services.analytics import MessageAnalytics
from smtp_service.services.crypto import KeyConfigError, SecretBox, load_or_create_key_file
from smtp_service.services.devmailbox import CatcherAddress
from smtp_service.services.health import CircuitBreaker
from smtp_service.services.mailer import ABANDON_MARGIN_SECONDS, Mailer, OpenTracker
from smtp_service.services.netguard import HostGuard
from smtp_service.services.oauth import OAuthService, providers_from_config
from smtp_service.services.pool import TransportPool
from smtp_service.services.readiness import Readiness
from smtp_service.services.records import MessageRecords
from smtp_service.services.send_rate import SendRateLimiter, parse_rates
from smtp_service.services.senders import SenderService
from smtp_service.services.settings import SettingsService
from smtp_service.services.transport import (
    Secret,
    SmtpEndpoint,
    Timeouts,
    check_connection,
    connect,
)
from smtp_service.storage.database import Database, DatabaseError, write_gate_seconds
from smtp_service.storage.files import AccountFiles
from smtp_service.storage.health import HealthStore
from smtp_service.storage.idempotency import IdempotencyStore
from smtp_service.storage.messages import MessageLog
from smtp_service.storage.oauth_states import OAuthStates
from smtp_service.storage.refusals import RefusalBoard
from smtp_service.storage.send_rate import SendCounters
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
        # While `make run`'s development mail catcher runs (DEV_MAIL_CATCHER), accounts may use
        # it as their own server: its address and port, nothing else on loopback.
        self.dev_catcher: CatcherAddress | None = config.get("DEV_MAIL_CATCHER")
        self.guard = HostGuard(
            tuple(config["SMTP_HOST_ALLOWLIST"]),
            dev_catcher=(
                (self.dev_catcher.host, self.dev_catcher.port) if self.dev_catcher else None
            ),
        )
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
            failover_default=config["SMTP_FAILOVER"],
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
        # SMTP health and the circuit breaker, shared through the database; a probe's claim
        # lapses after the send deadline and a margin (a worker that died mid-probe).
        self.breaker = CircuitBreaker(
            HealthStore(self.database),
            failures=config["SMTP_CIRCUIT_FAILURES"],
            open_seconds=config["SMTP_CIRCUIT_SECONDS"],
            probe_seconds=self.timeouts.operation + 30.0,
        )
        # Per-account send rate limits, counted in the database (SEND_RATE_LIMIT, or the
        # account's rateLimit); with neither, a send is not counted and the database not asked.
        self.send_rates = SendRateLimiter(
            SendCounters(self.database), parse_rates(config["SEND_RATE_LIMIT"])
        )
        self.records = MessageRecords(self.messages, self.suppressions)
        # The listing's cursors are signed with a key derived from the encryption key (as the
        # open pixels are): every worker and instance reads the others' cursors.
        self.analytics = MessageAnalytics(
            self.database,
            hashlib.sha256(b"smtp-service message cursor:" + keys[0].encode()).digest(),
        )
        # OAuth2 sign-in (XOAUTH2): its state is signed with a key derived from the encryption
        # key, like the pixels; its endpoints are checked by a guard with their own allowlist.
        self.oauth = OAuthService(
            settings=self.settings,
            states=OAuthStates(self.database),
            box=self.box,
            providers=providers_from_config(config),
            guard=HostGuard(tuple(config["OAUTH_HOST_ALLOWLIST"])),
            public_base_url=config["PUBLIC_BASE_URL"],
            state_secret=hashlib.sha256(b"smtp-service oauth state:" + keys[0].encode()).digest(),
            state_seconds=config["OAUTH_STATE_SECONDS"],
            http_timeout=config["OAUTH_HTTP_TIMEOUT"],
        )
        self.settings.tokens = self.oauth
        self.pool = TransportPool(
            functools.partial(
                connect,
                timeouts=self.timeouts,
                guard=self.guard,
                ehlo_name=config["SMTP_EHLO_NAME"],
                tokens=self.oauth,
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
        self.settings.on_change = self._settings_changed
        self.settings.on_test = self.breaker.tested
        # The open-pixel signing key is derived from the encryption key, so it survives
        # restarts and is shared by every worker without another setting.
        tracking_secret = hashlib.sha256(b"smtp-service open pixel:" + keys[0].encode()).digest()
        # The mailer sends through the pool measured (SMTP time and reply code per send, for
        # the send log line and the metrics); the pool gauge reads the pool itself.
        metrics.watch_pool(self.pool)
        metrics.set_circuit_source(self.breaker.open_counts)
        self.mailer = Mailer(
            settings=self.settings,
            senders=self.senders,
            pool=metrics.MeasuredPool(self.pool),
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
            breaker=self.breaker,
            failover_from=config["SMTP_FAILOVER_FROM"],
            send_rates=self.send_rates,
        )
        self.readiness = Readiness(
            data_dir_writable=self.data_dir_writable,
            database_ping=self.database.ping,
            smtp_probe=None if self.global_endpoint is None else self._probe_global,
            cache_seconds=config["READYZ_CACHE_SECONDS"],
        )
        self._probe_timeouts = Timeouts(
            connect=config["READYZ_SMTP_TIMEOUT"],
            command=config["READYZ_SMTP_TIMEOUT"],
            final_reply=config["READYZ_SMTP_TIMEOUT"],
            operation=2 * config["READYZ_SMTP_TIMEOUT"],
        )
        self._ehlo_name = config["SMTP_EHLO_NAME"]
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

    def _settings_changed(self, account_id: str) -> None:
        """An account's settings were saved or deleted: its pooled connections and its old
        server's health record and circuit, and its cached access tokens, go (other workers
        notice the changed file on their next send)."""
        self.pool.forget(account_id)
        self.oauth.forget(account_id)
        try:
            self.breaker.forget(account_id)
        except Exception as exc:  # noqa: BLE001 - the settings are saved; a record may linger
            logging.getLogger(__name__).error(
                "account %s: SMTP health record not cleared (%s)", account_id, type(exc).__name__
            )

    def _probe_global(self) -> None:
        """Connect to the global server, EHLO (STARTTLS when offered), QUIT; no AUTH: the
        readiness probe must not spend (or lock out) the credentials. TransportError if not."""
        assert self.global_endpoint is not None
        check_connection(
            dataclasses.replace(self.global_endpoint, user=None, password=None),
            guard=self.guard,
            timeouts=self._probe_timeouts,
            ehlo_name=self._ehlo_name,
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
    register_telemetry(app)
    register_blueprints(app)
    register_rate_limits(app)
    register_commands(app)
    return app


def configure_logging(app: Flask) -> None:
    """Log to stderr (gunicorn collects it): LOG_LEVEL, LOG_FORMAT (JSON lines or text), every
    record through the filter that redacts secrets (smtp_service.logs)."""
    from smtp_service.logs import configure_logging as configure

    configure(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])


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


def register_telemetry(app: Flask) -> None:
    """A request id, a log line and metrics for every request (smtp_service.telemetry)."""
    from smtp_service import telemetry

    telemetry.init_app(app)


def register_blueprints(app: Flask) -> None:
    """Mount the HTTP routes."""
    from smtp_service.api import (
        dev,
        health,
        messages,
        oauth,
        openapi,
        operations,
        senders,
        settings,
        tracking,
    )

    for module in (health, openapi, settings, oauth, messages, senders, tracking):
        app.register_blueprint(module.bp)
    operations.register(app)
    if app.config.get("DEV_MAIL_CATCHER") is not None:  # only while make run's catcher runs
        app.register_blueprint(dev.bp)


def register_rate_limits(app: Flask) -> None:
    """Request limits on the routes that need them (the open pixel, the connection test)."""
    from smtp_service.api.request_limits import init_request_limits

    init_request_limits(app)


def register_commands(app: Flask) -> None:
    """`flask --app wsgi smtp ...` maintenance commands."""
    from smtp_service.cli import smtp

    app.cli.add_command(smtp)

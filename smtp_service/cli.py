"""`flask --app wsgi smtp ...`: development tokens and at-rest encryption maintenance."""

from __future__ import annotations

from datetime import timedelta

import click
from flask import current_app
from flask.cli import with_appcontext
from flask_jwt_extended import create_access_token

from smtp_service.services.crypto import new_key


@click.group()
def smtp() -> None:
    """smtp-service maintenance commands."""


@smtp.command("token")
@click.option("--account", required=True, help="Account id (the JWT_ACCOUNT_CLAIM claim).")
@click.option("--user", default="dev-user", show_default=True, help="User id (the sub claim).")
@click.option("--hours", default=12, show_default=True, type=click.IntRange(1, 24 * 30))
@with_appcontext
def token(account: str, user: str, hours: int) -> None:
    """Print a development token (HS256 deployments only)."""
    if current_app.config["JWT_ALGORITHM"] != "HS256":
        raise click.ClickException("tokens are issued by your auth service under RS256/ES256")
    claims = {current_app.config["JWT_ACCOUNT_CLAIM"]: account}
    click.echo(
        create_access_token(
            identity=user, additional_claims=claims, expires_delta=timedelta(hours=hours)
        )
    )


@smtp.command("encrypt-existing")
@with_appcontext
def encrypt_existing() -> None:
    """Encrypt plaintext passwords left by the old system (idempotent)."""
    _reencrypt(only_plaintext=True)


@smtp.command("rotate-key")
@with_appcontext
def rotate_key() -> None:
    """Re-encrypt every password with the first key of SMTP_ENCRYPTION_KEYS (idempotent)."""
    _reencrypt(only_plaintext=False)


@smtp.command("new-key")
def generate_key() -> None:
    """Print a fresh key for SMTP_ENCRYPTION_KEYS."""
    click.echo(new_key())


def _reencrypt(only_plaintext: bool) -> None:
    settings = current_app.extensions["smtp_service"].settings
    report = settings.reencrypt_all(only_plaintext=only_plaintext)
    click.echo(
        f"updated {report.updated}, unchanged {report.unchanged}, failed {len(report.failed)}"
    )
    if report.failed:
        # Name every file left as it was, with why (the reasons hold no secret); the others
        # were processed.
        for account_id, reason in sorted(report.failed.items()):
            click.echo(f"account {account_id}: {reason}", err=True)
        raise SystemExit(1)


@smtp.group("db")
def db() -> None:
    """The message database (DATABASE_URL): migrations."""


@db.command("upgrade")
@with_appcontext
def db_upgrade() -> None:
    """Apply every pending migration (the service also does this when it starts)."""
    database = current_app.extensions["smtp_service"].database
    database.migrate()
    _echo_revision(database)


@db.command("current")
@with_appcontext
def db_current() -> None:
    """Print the database's migration revision and the newest one."""
    _echo_revision(current_app.extensions["smtp_service"].database)


def _echo_revision(database) -> None:  # noqa: ANN001 - a storage.database.Database
    from smtp_service.storage.migrate import current, head

    with database.engine.connect() as conn:
        revision = current(conn)
    click.echo(f"database at revision {revision} (newest {head()})")


@smtp.group("senders")
def senders_group() -> None:
    """Sender verification for the global server: list, confirm or revoke senders in bulk."""


_SELECTION = [
    click.option("--account", "accounts", multiple=True, help="Only this account (repeatable)."),
    click.option("--email", "emails", multiple=True, help="Only this address (repeatable)."),
    click.option("--domain", "domains", multiple=True, help="Only addresses at this domain."),
]


def _selection(command):  # type: ignore[no-untyped-def]
    for option in reversed(_SELECTION):
        command = option(command)
    return command


@senders_group.command("list")
@click.option("--status", type=click.Choice(["pending", "confirmed", "legacy"]), default=None)
@click.option("--account", "accounts", multiple=True, help="Only this account (repeatable).")
@with_appcontext
def senders_list(status: str | None, accounts: tuple[str, ...]) -> None:
    """Print `account<TAB>email<TAB>status` for every sender (of the given status)."""
    service = current_app.extensions["smtp_service"].senders
    for account_id in accounts or service.files.accounts():
        for sender in service.list(account_id):
            if status is None or sender.status == status:
                click.echo(f"{account_id}\t{sender.email}\t{sender.status}")


@senders_group.command("confirm")
@_selection
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["pending", "legacy"]),
    help="Only senders in this status (default: pending and legacy).",
)
@with_appcontext
def senders_confirm(
    accounts: tuple[str, ...],
    emails: tuple[str, ...],
    domains: tuple[str, ...],
    statuses: tuple[str, ...],
) -> None:
    """Confirm senders the operator vouches for (all pending and legacy ones by default)."""
    service = current_app.extensions["smtp_service"].senders
    changed = service.set_status(
        "confirmed",
        accounts=accounts or None,
        emails=emails,
        domains=domains,
        only=statuses or ("pending", "legacy"),
    )
    click.echo(f"confirmed {changed} sender(s)")


@senders_group.command("revoke")
@_selection
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["confirmed", "legacy"]),
    help="Only senders in this status (default: legacy).",
)
@with_appcontext
def senders_revoke(
    accounts: tuple[str, ...],
    emails: tuple[str, ...],
    domains: tuple[str, ...],
    statuses: tuple[str, ...],
) -> None:
    """Take senders back to pending (no code: the account removes and adds one for a new code);
    they no longer send through the global server. By default the legacy ones."""
    service = current_app.extensions["smtp_service"].senders
    changed = service.set_status(
        "pending",
        accounts=accounts or None,
        emails=emails,
        domains=domains,
        only=statuses or ("legacy",),
    )
    click.echo(f"revoked {changed} sender(s)")

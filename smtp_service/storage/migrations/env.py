"""Alembic environment: migrations run on the connection (and in the transaction) that
smtp_service.storage.migrate passes in; see smtp_service/storage/migrate.py."""

from alembic import context

from smtp_service.storage.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

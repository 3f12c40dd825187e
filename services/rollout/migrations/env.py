"""Alembic environment: runs on the connection that `services.common.db.run_migrations` passes."""

from alembic import context

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=None,
    version_table=config.attributes["version_table"],
)
with context.begin_transaction():
    context.run_migrations()

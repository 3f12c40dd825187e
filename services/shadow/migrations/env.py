"""Alembic environment: `services.common.db.run_migration_environment` does it all."""

from services.common.db import run_migration_environment

run_migration_environment()

"""dispatch leases: which unsent desired writes a fan-out task holds, and until when.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rollout_dispatches", sa.Column("leased_until", sa.Float, nullable=True))


def downgrade() -> None:
    op.drop_column("rollout_dispatches", "leased_until")

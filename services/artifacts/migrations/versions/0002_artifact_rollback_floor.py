"""artifacts.rollback_floor: the anti-rollback floor a build declares (docs/adr/0023).

Nullable, no default: every existing artifact declares none, and its manifest stays as signed.

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
    op.add_column("artifacts", sa.Column("rollback_floor", sa.String(128), nullable=True))


def downgrade() -> None:
    op.drop_column("artifacts", "rollback_floor")

"""shadow_events: the outbox of delta and documents messages, written with each update.

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
    op.create_table(
        "shadow_events",
        sa.Column(
            "event_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("bucket", sa.Integer, nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("delta_json", sa.Text, nullable=True),
        sa.Column("documents_json", sa.Text, nullable=False),
        sqlite_autoincrement=True,  # never reuse an id, even after every event was deleted
    )


def downgrade() -> None:
    op.drop_table("shadow_events")

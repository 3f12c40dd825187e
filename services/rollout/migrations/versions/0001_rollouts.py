"""rollouts, executions, device claims and the dispatch outbox.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("rollout_id", sa.String(64), primary_key=True),
        sa.Column("definition", Json, nullable=False),
        sa.Column("state", Json, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("target_count", sa.Integer, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("rollouts_status", "rollouts", ["status"])
    op.create_table(
        "rollout_executions",
        sa.Column("rollout_id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("stratum", sa.String(256), nullable=False),
        sa.Column("previous", Json, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("notified_at", Json, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("step", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("rollback_requested_at", sa.Float, nullable=True),
        sa.Column("withdrawn", sa.Boolean, nullable=False),
    )
    op.create_index("rollout_executions_device", "rollout_executions", ["device_id"])
    op.create_table(
        "rollout_claims",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("rollout_id", sa.String(64), nullable=False),
    )
    op.create_index("rollout_claims_rollout", "rollout_claims", ["rollout_id"])
    op.create_table(
        "rollout_dispatches",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("rollout_id", sa.String(64), nullable=False),
        sa.Column("desired_json", sa.Text, nullable=False),
    )
    op.create_index("rollout_dispatches_rollout", "rollout_dispatches", ["rollout_id"])


def downgrade() -> None:
    for table in ("rollout_dispatches", "rollout_claims", "rollout_executions", "rollouts"):
        op.drop_table(table)

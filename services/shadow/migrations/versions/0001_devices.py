"""devices: credentials, tags and the shadow document, one row per device.

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
        "devices",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("credential_hash", sa.String(255), nullable=False),
        sa.Column("tags", Json, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("desired", Json, nullable=False),
        sa.Column("reported", Json, nullable=False),
        sa.Column("shadow_metadata", Json, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("has_shadow", sa.Boolean, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Tag equality in fleet queries compiles to `tags @> {...}`, which this index serves.
        op.execute("CREATE INDEX devices_tags_gin ON devices USING gin (tags jsonb_path_ops)")


def downgrade() -> None:
    op.drop_table("devices")

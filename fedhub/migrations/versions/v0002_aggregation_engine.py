"""The aggregation engine: a training's aggregation spec, server state, records, members, rejections.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("training") as batch:
        batch.add_column(sa.Column("aggregation_params", sa.JSON(), server_default="{}", nullable=False))
        batch.add_column(
            sa.Column("update_kind", sa.String(length=16), server_default="weights", nullable=False)
        )
        batch.add_column(sa.Column("exclude_vars", sa.Text(), nullable=True))
        batch.add_column(sa.Column("max_update_norm", sa.Float(), nullable=True))
    with op.batch_alter_table("model") as batch:
        batch.add_column(sa.Column("state_blob_key", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("record", sa.JSON(), nullable=True))
    with op.batch_alter_table("client_update") as batch:
        batch.add_column(sa.Column("rejected_reason", sa.Text(), nullable=True))
    op.create_table(
        "model_member",
        sa.Column("model_id", sa.Uuid(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("blob_key", sa.String(length=200), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("update_id", sa.Uuid(), nullable=True),
        sa.Column("client_id", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"]),
        sa.PrimaryKeyConstraint("model_id", "index"),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("model_member")
    with op.batch_alter_table("client_update") as batch:
        batch.drop_column("rejected_reason")
    with op.batch_alter_table("model") as batch:
        batch.drop_column("record")
        batch.drop_column("state_blob_key")
    with op.batch_alter_table("training") as batch:
        batch.drop_column("max_update_norm")
        batch.drop_column("exclude_vars")
        batch.drop_column("update_kind")
        batch.drop_column("aggregation_params")

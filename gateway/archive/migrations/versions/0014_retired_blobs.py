"""blobs replaced by compression, deleted after a grace period (issue 4 §1, R-UP-1)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 07:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retired_blobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("blob_key", sa.String(length=512), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delete_after", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_retired_blobs_delete_after", "retired_blobs", ["delete_after"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_retired_blobs_delete_after", table_name="retired_blobs")
    op.drop_table("retired_blobs")

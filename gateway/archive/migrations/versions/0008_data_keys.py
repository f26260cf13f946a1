"""data keys of sealed objects (encryption at rest, issue 6 §5)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 06:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dek_id", sa.String(length=32), nullable=False),
        sa.Column("blob_key", sa.String(length=512), nullable=False),
        sa.Column("kek_id", sa.String(length=64), nullable=False),
        sa.Column("wrapped", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rewrapped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dek_id"),
    )
    op.create_index("ix_data_keys_blob_key", "data_keys", ["blob_key"], unique=False)
    op.create_index("ix_data_keys_kek_id", "data_keys", ["kek_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_data_keys_kek_id", table_name="data_keys")
    op.drop_index("ix_data_keys_blob_key", table_name="data_keys")
    op.drop_table("data_keys")

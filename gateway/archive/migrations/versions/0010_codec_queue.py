"""lossless compression: the codec queue and the received bytes' hash (issue 4 §1, R-UP-1)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 06:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "codec_queue",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_uid"),
    )
    op.create_index("ix_codec_queue_study", "codec_queue", ["study_uid"], unique=False)
    # existing rows: NULL, their stored bytes are the received ones
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("source_sha256")
    op.drop_index("ix_codec_queue_study", table_name="codec_queue")
    op.drop_table("codec_queue")

"""consents to identified secondary use (anonymised export, issue 6 §9)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 06:55:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secondary_use_consents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("evidence", sa.String(length=256), nullable=False),
        sa.Column("recorded_by", sa.String(length=128), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_secondary_use_consents_study", "secondary_use_consents", ["study_uid"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_secondary_use_consents_study", table_name="secondary_use_consents")
    op.drop_table("secondary_use_consents")

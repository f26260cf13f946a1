"""a patient's grant can be revoked before it expires (issue 5 §6, R-RT-4, R-SE-7)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 07:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing grants keep NULL: not revoked.
    with op.batch_alter_table("retrieval_grants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("retrieval_grants", schema=None) as batch_op:
        batch_op.drop_column("revoked_at")

"""pixel data location of each instance (WADO-RS frames without a header parse)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 01:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows keep NULL: their frames are served through the header parse, as before.
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pixel_offset", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("pixel_length", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("samples_per_pixel", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("samples_per_pixel")
        batch_op.drop_column("pixel_length")
        batch_op.drop_column("pixel_offset")

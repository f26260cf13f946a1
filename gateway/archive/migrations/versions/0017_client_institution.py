"""an OAuth client may belong to an institution: its uploads are sealed under that institution's
transfer key (issue 6 §5, R-CE-2; gateway/security/transfer_keys.py)

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02 11:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing clients keep NULL: no institution, uploads wrapped by the node's KEK as before.
    with op.batch_alter_table("oauth_clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("institution", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("oauth_clients", schema=None) as batch_op:
        batch_op.drop_column("institution")

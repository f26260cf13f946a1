"""a token's nonce is accepted once, enforced by a unique index (issue 5 §6, R-RT-4, R-SE-7)

Two posts of the same grant token at the same moment both passed the replay lookup on PostgreSQL
(parallel transactions) and both were recorded. ``retrieval_grants.nonce`` ("<method tag>:<jti>",
as ``gateway/grants.py`` scopes it) with a unique index makes the database refuse the second.

Existing grants: the nonce is taken from the evidence ("<tag>:<jti>[:…]"); should a nonce already
be on record twice (the race this closes), the earliest grant keeps it and the later ones keep
NULL, so the index can be built. Grants made by the node itself have no nonce (NULL, not unique).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02 12:00:00.000000
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_NONCE = re.compile(r"^(qr|app|esig|face|written):[A-Za-z0-9._\-]{1,64}$")


def upgrade() -> None:
    with op.batch_alter_table("retrieval_grants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nonce", sa.String(80), nullable=True))
    grants = sa.table(
        "retrieval_grants", sa.column("id", sa.Integer), sa.column("evidence"), sa.column("nonce")
    )
    conn = op.get_bind()
    seen: set[str] = set()
    for row in conn.execute(sa.select(grants.c.id, grants.c.evidence).order_by(grants.c.id)).all():
        nonce = ":".join((row.evidence or "").split(":")[:2])
        if _NONCE.match(nonce) and nonce not in seen:
            seen.add(nonce)
            conn.execute(sa.update(grants).where(grants.c.id == row.id).values(nonce=nonce))
    op.create_index("ux_retrieval_grants_nonce", "retrieval_grants", ["nonce"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_retrieval_grants_nonce", table_name="retrieval_grants")
    with op.batch_alter_table("retrieval_grants", schema=None) as batch_op:
        batch_op.drop_column("nonce")

"""fuzzy person-name word lists (QIDO-RS fuzzymatching, issue 3 §3)

Adds ``patients.patient_name_fuzzy`` and ``studies.referring_physician_fuzzy`` and fills them for the
rows already catalogued, with the same function the catalog uses at insert time.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.archive.query import fuzzy_name

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _fill(table: str, source: str, target: str) -> None:
    conn = op.get_bind()
    t = sa.table(
        table, sa.column("id", sa.Integer), sa.column(source, sa.String), sa.column(target, sa.String)
    )
    rows = conn.execute(sa.select(t.c.id, t.c[source])).all()
    for row_id, name in rows:
        if name:
            conn.execute(sa.update(t).where(t.c.id == row_id).values({target: fuzzy_name(name)}))


def upgrade() -> None:
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("patient_name_fuzzy", sa.String(length=1000), server_default="", nullable=False)
        )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("referring_physician_fuzzy", sa.String(length=1000), server_default="", nullable=False)
        )
    _fill("patients", "patient_name", "patient_name_fuzzy")
    _fill("studies", "referring_physician", "referring_physician_fuzzy")


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("referring_physician_fuzzy")
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.drop_column("patient_name_fuzzy")

"""room for sealed column values: users.totp_secret, exams.id_masked and patient_name (R-SE-10)

Sealed values (gateway/security/columns.py) are longer than the plaintext: a prefix, the column
key id and base64 of nonce + ciphertext + tag. Existing values are sealed by
``ybyx keys seal-existing`` (the KMS is not available to a migration).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 08:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column(
            "totp_secret",
            existing_type=sa.String(length=64),
            type_=sa.String(length=255),
            existing_nullable=True,
        )
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.alter_column(
            "id_masked",
            existing_type=sa.String(length=32),
            type_=sa.String(length=128),
            existing_nullable=False,
        )
        batch_op.alter_column(
            "patient_name", existing_type=sa.String(length=400), type_=sa.Text(), existing_nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.alter_column(
            "patient_name", existing_type=sa.Text(), type_=sa.String(length=400), existing_nullable=False
        )
        batch_op.alter_column(
            "id_masked",
            existing_type=sa.String(length=128),
            type_=sa.String(length=32),
            existing_nullable=False,
        )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column(
            "totp_secret",
            existing_type=sa.String(length=255),
            type_=sa.String(length=64),
            existing_nullable=True,
        )

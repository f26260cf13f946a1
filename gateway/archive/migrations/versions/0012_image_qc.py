"""image QC: queue, per-instance results, reports from the other node (issue 4 §3-5, R-QC-1, R-CE-5)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 07:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qc_queue",
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
    op.create_index("ix_qc_queue_due", "qc_queue", ["next_attempt_at"])
    op.create_index("ix_qc_queue_study", "qc_queue", ["study_uid"])
    op.create_table(
        "qc_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("grade", sa.String(length=8), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("engine_version", sa.String(length=32), nullable=False),
        sa.Column("ai_assisted", sa.Integer(), nullable=False),
        sa.Column("graded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replaced_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_uid"),
    )
    op.create_index("ix_qc_results_study", "qc_results", ["study_uid"])
    op.create_index("ix_qc_results_grade", "qc_results", ["grade"])
    op.create_table(
        "qc_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("grade", sa.String(length=8), nullable=False),
        sa.Column("report", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_uid", "source", name="uq_qc_reports_study_source"),
    )


def downgrade() -> None:
    op.drop_table("qc_reports")
    op.drop_index("ix_qc_results_grade", table_name="qc_results")
    op.drop_index("ix_qc_results_study", table_name="qc_results")
    op.drop_table("qc_results")
    op.drop_index("ix_qc_queue_study", table_name="qc_queue")
    op.drop_index("ix_qc_queue_due", table_name="qc_queue")
    op.drop_table("qc_queue")

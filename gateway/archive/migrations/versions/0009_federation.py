"""federation: national index records, registrations, retrievals, grants, citations, caching

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 06:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cache_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("institution", sa.String(length=64), nullable=False),
        sa.Column("person_key", sa.String(length=64), nullable=False),
        sa.Column("id_type", sa.String(length=32), nullable=False),
        sa.Column("id_masked", sa.String(length=32), nullable=False),
        sa.Column("name_masked", sa.String(length=64), nullable=False),
        sa.Column("department", sa.String(length=64), nullable=False),
        sa.Column("visit_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("visit_date", sa.String(length=8), nullable=False),
        sa.Column("consent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("studies_total", sa.Integer(), nullable=False),
        sa.Column("studies_done", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_cache_requests_state", "cache_requests", ["state", "next_attempt_at"], unique=False)
    op.create_table(
        "cached_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("person_key", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=256), nullable=False),
        sa.Column("cached_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("keep_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_uid"),
    )
    op.create_index("ix_cached_studies_keep", "cached_studies", ["keep_until"], unique=False)
    op.create_table(
        "citations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("citation_id", sa.String(length=36), nullable=False),
        sa.Column("person_key", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("section", sa.String(length=16), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column("institution", sa.String(length=64), nullable=False),
        sa.Column("doctor", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("citation_id"),
    )
    op.create_table(
        "index_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("person_key", sa.String(length=64), nullable=False),
        sa.Column("person_code", sa.String(length=26), nullable=True),
        sa.Column("record_key", sa.String(length=96), nullable=True),
        sa.Column("id_type", sa.String(length=32), nullable=False),
        sa.Column("exam_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("exam_date", sa.String(length=8), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("exam_item_code", sa.String(length=64), nullable=False),
        sa.Column("exam_item_name", sa.String(length=200), nullable=False),
        sa.Column("insurance_item_code", sa.String(length=64), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("hospital_code", sa.String(length=64), nullable=False),
        sa.Column("hospital_level", sa.String(length=16), nullable=False),
        sa.Column("storing_unit", sa.String(length=18), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("diagnosis", sa.Text(), nullable=False),
        sa.Column("settlement_id", sa.String(length=64), nullable=True),
        sa.Column("qc_grade", sa.String(length=16), nullable=True),
        sa.Column("province", sa.String(length=8), nullable=False),
        sa.Column("center", sa.String(length=256), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("record_key"),
        sa.UniqueConstraint("study_uid"),
    )
    op.create_index("ix_index_records_code_date", "index_records", ["person_code", "exam_date"], unique=False)
    op.create_index(
        "ix_index_records_person_date", "index_records", ["person_key", "exam_date"], unique=False
    )
    op.create_table(
        "index_registrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_uid"),
    )
    op.create_table(
        "retrieval_grants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("grant_id", sa.String(length=36), nullable=False),
        sa.Column("person_key", sa.String(length=64), nullable=False),
        sa.Column("institution", sa.String(length=64), nullable=False),
        sa.Column("doctor", sa.String(length=64), nullable=True),
        sa.Column("window_from", sa.String(length=8), nullable=True),
        sa.Column("window_to", sa.String(length=8), nullable=True),
        sa.Column("studies", sa.Text(), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("evidence", sa.String(length=256), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("grant_id"),
    )
    op.create_index(
        "ix_retrieval_grants_person", "retrieval_grants", ["person_key", "institution"], unique=False
    )
    op.create_table(
        "retrieval_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("person_key", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("institution", sa.String(length=64), nullable=False),
        sa.Column("doctor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("grant_id", sa.String(length=36), nullable=True),
        sa.Column("node", sa.String(length=256), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("record_id"),
    )
    op.create_index("ix_retrieval_records_person", "retrieval_records", ["person_key", "at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_retrieval_records_person", table_name="retrieval_records")
    op.drop_table("retrieval_records")
    op.drop_index("ix_retrieval_grants_person", table_name="retrieval_grants")
    op.drop_table("retrieval_grants")
    op.drop_table("index_registrations")
    op.drop_index("ix_index_records_person_date", table_name="index_records")
    op.drop_index("ix_index_records_code_date", table_name="index_records")
    op.drop_table("index_records")
    op.drop_table("citations")
    op.drop_index("ix_cached_studies_keep", table_name="cached_studies")
    op.drop_table("cached_studies")
    op.drop_index("ix_cache_requests_state", table_name="cache_requests")
    op.drop_table("cache_requests")

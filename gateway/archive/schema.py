"""The catalog's schema (SQLAlchemy Core), one for SQLite and PostgreSQL.

Changing a table here needs an Alembic revision in ``migrations/versions``;
``tests/test_catalog.py::test_migrations_match_schema`` fails when the two drift apart.

The columns are the attributes QIDO-RS and C-FIND must match and return (PS3.18 §10.6.1.2 required
keys at each level, plus modality, body part, accession and institution). Dates and times are kept
as their DICOM strings (``YYYYMMDD``, ``HHMMSS.FFFFFF``): range matching on them is a string
comparison that both databases index. Person names keep the whole PN value (``Alphabetic=
Ideographic=Phonetic``) plus a folded copy for case- and accent-insensitive matching, and a fuzzy
word list (pinyin for Chinese characters, ``query.fuzzy_name``) for QIDO-RS fuzzy matching.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

UID = String(64)
PN = String(400)
FUZZY = String(1000)  # query.FUZZY_LENGTH

patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False),
    Column("patient_name", PN, nullable=False),
    Column("patient_name_folded", PN, nullable=False),
    Column("patient_name_fuzzy", FUZZY, nullable=False, server_default=""),
    Column("birth_date", String(8), nullable=False),
    Column("sex", String(16), nullable=False),
    UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),
)
Index("ix_patients_name_folded", patients.c.patient_name_folded)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False, unique=True),
    Column("patient_pk", Integer, ForeignKey("patients.id"), nullable=False),
    Column("study_date", String(8), nullable=False),
    Column("study_time", String(16), nullable=False),
    Column("accession_number", String(64), nullable=False),
    Column("study_id", String(16), nullable=False),
    Column("referring_physician", PN, nullable=False),
    Column("referring_physician_fuzzy", FUZZY, nullable=False, server_default=""),
    Column("study_description", String(400), nullable=False),
    Column("institution_name", String(400), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_studies_patient", studies.c.patient_pk)
Index("ix_studies_date", studies.c.study_date)
Index("ix_studies_accession", studies.c.accession_number)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_uid", UID, nullable=False, unique=True),
    Column("study_pk", Integer, ForeignKey("studies.id"), nullable=False),
    Column("modality", String(16), nullable=False),
    Column("series_number", Integer),
    Column("series_description", String(400), nullable=False),
    Column("body_part", String(64), nullable=False),
    Column("pps_start_date", String(8), nullable=False),
    Column("pps_start_time", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
Index("ix_series_study", series.c.study_pk)
Index("ix_series_modality", series.c.modality)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_uid", UID, nullable=False, unique=True),
    Column("series_pk", Integer, ForeignKey("series.id"), nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("instance_number", Integer),
    Column("transfer_syntax", UID, nullable=False),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("bits_allocated", Integer),
    Column("number_of_frames", Integer),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("blob_key", String(512), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("source_ae", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    # DICOM JSON (PS3.18 F.2) of the header, bulk data as BulkDataURI: WADO-RS /metadata is
    # served from here without opening a file.
    Column("metadata_json", Text, nullable=False),
    # Where the Pixel Data (7FE0,0010) value starts in the stored file (for encapsulated data: the
    # Basic Offset Table item) and its length (NULL: undefined length, i.e. encapsulated), so
    # WADO-RS frames are one range read without parsing the header. NULL offset (rows from before
    # migration 0007, deflated or big-endian files, native 4:2:2 or float pixel data): frames
    # parse the header instead (dicomweb/frames.py).
    Column("pixel_offset", BigInteger),
    Column("pixel_length", BigInteger),
    Column("samples_per_pixel", Integer),
    # SHA-256 of the bytes as received, when the stored bytes are a losslessly compressed copy
    # (gateway/codec, R-UP-1): the same bytes received again are a duplicate, not a new version.
    Column("source_sha256", String(64)),
)
Index("ix_instances_series", instances.c.series_pk)

# Earlier contents of an instance that was received again with different bytes (issue 2 §6).
instance_versions = Table(
    "instance_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_uid", UID, nullable=False),
    Column("version", Integer, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("blob_key", String(512), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("source_ae", String(64), nullable=False),
    Column("superseded_at", DateTime(timezone=True), nullable=False),
)
Index("ix_instance_versions_sop", instance_versions.c.sop_uid)

# ---- lossless compression (gateway/codec), issue 4 §1, R-UP-1 -------------------------------------

# Instances waiting for the front-end's compression worker, queued in the instance's own catalog
# transaction (a crash resumes from here). The forwarder does not send a study while it has rows
# here, so the center never gets two byte streams for one SOP Instance UID.
codec_queue = Table(
    "codec_queue",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_uid", UID, nullable=False, unique=True),
    Column("study_uid", UID, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=False),
    Column("enqueued_at", DateTime(timezone=True), nullable=False),
)
Index("ix_codec_queue_study", codec_queue.c.study_uid)

# Blobs the catalog no longer points at, deleted only after ``delete_after`` (a grace period): a
# WADO-RS or C-MOVE read that looked the row up just before the switch still gets the bytes. The
# row is written in the same transaction that switches the catalog (gateway/codec/stage.py), so a
# crash never leaves the catalog pointing at a deleted blob nor forgets a replaced one.
retired_blobs = Table(
    "retired_blobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_uid", UID, nullable=False),
    Column("blob_key", String(512), nullable=False),
    Column("retired_at", DateTime(timezone=True), nullable=False),
    Column("delete_after", DateTime(timezone=True), nullable=False),
)
Index("ix_retired_blobs_delete_after", retired_blobs.c.delete_after)

# ---- forwarding (front-end → center), issue 3 §6 -------------------------------------------------

# The outbox: one job per study, filled by ingest, drained by the forwarder. A table, not memory,
# so a crash anywhere resumes from here (ARCHITECTURE "the data path").
forward_jobs = Table(
    "forward_jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False, unique=True),
    # queued | sending | sent | confirmed | failed
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True)),
    Column("last_error", Text, nullable=False),
    Column("enqueued_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
    Column("confirmed_at", DateTime(timezone=True)),
)
Index("ix_forward_jobs_due", forward_jobs.c.state, forward_jobs.c.next_attempt_at)

# What the center answered for each instance (by content hash, so new bytes are sent again).
forward_results = Table(
    "forward_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False),
    Column("sop_uid", UID, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # sent | failed
    Column("reason", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("sop_uid", name="uq_forward_results_sop"),
)
Index("ix_forward_results_study", forward_results.c.study_uid)

# ---- exam records (影像检查基础信息), issue 3 §8, R-UP-5, R-UP-3 ----------------------------------

# One row per exam (accession number at a hospital). The ID number is never stored: only its type,
# its pseudonym (person_key) and a masked form (R-SE-8). On the front-end, forwarded_at says when
# the center took the current version; on the center, the row is what the front-end sent.
exams = Table(
    "exams",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("hospital_code", String(64), nullable=False),
    Column("accession_number", String(64), nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("id_type", String(32), nullable=False),
    Column("person_key", String(64), nullable=False),
    # id_masked, patient_name, description, diagnosis: sealed when [encryption] is on (R-SE-10)
    Column("id_masked", String(128), nullable=False),
    Column("patient_name", Text, nullable=False),
    Column("exam_item_code", String(64), nullable=False),
    Column("exam_item_name", String(200), nullable=False),
    Column("body_part", String(64), nullable=False),
    Column("device", String(64), nullable=False),
    Column("modality", String(16), nullable=False),
    Column("description", Text, nullable=False),
    Column("diagnosis", Text, nullable=False),
    Column("exam_time", DateTime(timezone=True)),
    Column("report_time", DateTime(timezone=True), nullable=False),
    Column("hospital_level", String(16), nullable=False),
    Column("visit_type", String(16), nullable=False),
    Column("settlement_id", String(64)),
    Column("settled_at", DateTime(timezone=True)),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("forwarded_at", DateTime(timezone=True)),
    Column("settlement_forwarded_at", DateTime(timezone=True)),
    UniqueConstraint("hospital_code", "accession_number", name="uq_exams_accession"),
)
Index("ix_exams_study", exams.c.study_uid)
Index("ix_exams_person", exams.c.person_key)

# The center's upload-monitoring record per study (R-CE-9): what the front-end said it sent
# (its manifest) against what the center holds; complete / incomplete, and late when the images
# were complete only after the deadline (report time + 48 h, R-UP-3).
upload_monitoring = Table(
    "upload_monitoring",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False, unique=True),
    Column("expected", Integer, nullable=False),
    Column("held", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # complete | incomplete
    Column("late", Integer, nullable=False),  # 0/1
    Column("missing", Text, nullable=False),  # JSON list of SOP Instance UIDs (first 100)
    Column("checked_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
)

# ---- node identity: OAuth 2.0 client-credentials clients, issue 6 §1, R-SE-16 -----------------------

# The clients that may obtain tokens from this node's token endpoint. The secret is never stored:
# only its argon2id hash. A revoked client keeps its row (who it was stays known to the audit).
oauth_clients = Table(
    "oauth_clients",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("client_id", String(64), nullable=False, unique=True),
    Column("name", String(64), nullable=False),
    Column("secret_hash", String(255), nullable=False),
    Column("scopes", Text, nullable=False),  # space-separated, the most a token may carry
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("secret_set_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    # its institution's uploads are sealed under that institution's transfer key (R-CE-2, 0017)
    Column("institution", String(64)),
)

# ---- audit trail, issue 6 §4, R-SE-4 (gateway/audit.py) -------------------------------------------

# A hash chain: seq 1, 2, 3 … without gaps; hash = SHA-256 of the canonical JSON of the other
# columns (prev_hash included). Times are text (ISO 8601, UTC, microseconds) so every database
# returns them exactly as hashed. Rows are only ever inserted.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", String(32), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("role", String(64), nullable=False),
    Column("institution", String(64), nullable=False),
    Column("resource", Text, nullable=False),
    Column("result", String(16), nullable=False),
    Column("source", String(256), nullable=False),
    Column("detail", Text, nullable=False),  # canonical JSON object
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)
Index("ix_audit_log_time", audit_log.c.time)

# PostgreSQL's audit outbox: a hot-path record is inserted here in the caller's transaction (no
# lock, no extra commit) and chained into audit_log by the audit thread within a second.
audit_pending = Table(
    "audit_pending",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("time", String(32), nullable=False),
    Column("event_type", String(32), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("role", String(64), nullable=False),
    Column("institution", String(64), nullable=False),
    Column("resource", Text, nullable=False),
    Column("result", String(16), nullable=False),
    Column("source", String(256), nullable=False),
    Column("detail", Text, nullable=False),
)

# Signed checkpoints (Ed25519 over seq, hash, time, key_id); also exported append-only.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("time", String(32), nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("signature", String(128), nullable=False),
)

# ---- encryption at rest, issue 6 §5, R-SE-10/R-SE-14 (gateway/archive/encrypted.py) -------------

# One row per sealed object version: its data key, wrapped by a KEK of the KMS. A rotation re-wraps
# these rows under the new KEK; the objects themselves (S3 cannot rewrite part of one) stay as are.
data_keys = Table(
    "data_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("dek_id", String(32), nullable=False, unique=True),  # hex, also in the object's header
    Column("blob_key", String(512), nullable=False),
    Column("kek_id", String(64), nullable=False),
    Column("wrapped", String(128), nullable=False),  # base64 of the KMS's wrapped form
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("rewrapped_at", DateTime(timezone=True)),
)
Index("ix_data_keys_blob_key", data_keys.c.blob_key)
Index("ix_data_keys_kek_id", data_keys.c.kek_id)

# ---- the federation: national index, retrievals, grants, caching, issue 5 ------------------------------

# The national index (index/): one row per study a center registered, keyed by its Study Instance
# UID (registration is idempotent). The person is named by the pseudonym (person_key) and, when the
# center knows it, the person management code of the national record key; never the ID number
# (R-SE-8). exam_date is the China-time date of the exam (YYYYMMDD): the 3-year window is a range
# on it (R-SC-4), served by the (person_key, exam_date) index.
index_records = Table(
    "index_records",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False, unique=True),
    Column("person_key", String(64), nullable=False),
    Column("person_code", String(26)),
    Column("record_key", String(96), unique=True),
    Column("id_type", String(32), nullable=False),
    Column("exam_time", DateTime(timezone=True), nullable=False),
    Column("exam_date", String(8), nullable=False),
    Column("modality", String(16), nullable=False),
    Column("body_part", String(64), nullable=False),
    Column("exam_item_code", String(64), nullable=False),
    Column("exam_item_name", String(200), nullable=False),
    Column("insurance_item_code", String(64)),
    Column("device", String(64), nullable=False),
    Column("hospital_code", String(64), nullable=False),
    Column("hospital_level", String(16), nullable=False),
    Column("storing_unit", String(18)),
    Column("description", Text, nullable=False),
    Column("diagnosis", Text, nullable=False),
    Column("settlement_id", String(64)),
    Column("qc_grade", String(16)),
    Column("province", String(8), nullable=False),
    Column("center", String(256), nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_index_records_person_date", index_records.c.person_key, index_records.c.exam_date)
Index("ix_index_records_code_date", index_records.c.person_code, index_records.c.exam_date)

# The center's outbox of studies to register at the index (once exam record + images are complete,
# again after QC): a row per study, retried until the index took it.
index_registrations = Table(
    "index_registrations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False, unique=True),
    Column("state", String(16), nullable=False),  # pending | registered
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("registered_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Every retrieval, allowed or denied (R-RT-4): recorded where it happened, sent up (front-end →
# center → index; sent_at) and kept at the index. record_id makes sending idempotent.
retrieval_records = Table(
    "retrieval_records",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("record_id", String(36), nullable=False, unique=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("person_key", String(64), nullable=False),
    Column("study_uid", UID),
    Column("institution", String(64), nullable=False),
    Column("doctor", String(64), nullable=False),
    Column("action", String(32), nullable=False),  # history | same-exams | retrieve | cache
    Column("result", String(16), nullable=False),  # allowed | denied
    Column("reason", Text, nullable=False),
    Column("grant_id", String(36)),
    Column("node", String(256), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
)
Index("ix_retrieval_records_person", retrieval_records.c.person_key, retrieval_records.c.at)

# Patient authorizations (R-RT-4, R-CQ-5): who may see whose studies, verified by a method's
# verifier (gateway/grants.py). studies: JSON list of Study Instance UIDs, or NULL = the window.
retrieval_grants = Table(
    "retrieval_grants",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("grant_id", String(36), nullable=False, unique=True),
    Column("person_key", String(64), nullable=False),
    Column("institution", String(64), nullable=False),
    Column("doctor", String(64)),
    Column("window_from", String(8)),
    Column("window_to", String(8)),
    Column("studies", Text),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("method", String(32), nullable=False),
    Column("evidence", String(256), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),  # the patient withdrew it before its expiry
    # "<method tag>:<jti>" of the token the grant came from (NULL: made by the node itself); the
    # unique index accepts a token once even when two posts of it race (gateway/grants.py)
    Column("nonce", String(80)),
)
Index("ix_retrieval_grants_person", retrieval_grants.c.person_key, retrieval_grants.c.institution)
Index("ux_retrieval_grants_nonce", retrieval_grants.c.nonce, unique=True)

# One-click citations of a report's findings/impression (R-VW-3): a unique id per copy, for tracing.
citations = Table(
    "citations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("citation_id", String(36), nullable=False, unique=True),
    Column("person_key", String(64), nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("section", String(16), nullable=False),  # findings | impression
    Column("text_sha256", String(64), nullable=False),
    Column("institution", String(64), nullable=False),
    Column("doctor", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Cache requests (R-SC-3, R-CA-1..3, R-CE-6): at the front-end from the HIS (sent_at: pushed to the
# center), at the center as its business record and job state (pending → running → completed /
# failed, retried with backoff, R-CE-9).
cache_requests = Table(
    "cache_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("request_id", String(36), nullable=False, unique=True),
    Column("institution", String(64), nullable=False),
    Column("person_key", String(64), nullable=False),
    Column("id_type", String(32), nullable=False),
    Column("id_masked", String(32), nullable=False),
    Column("name_masked", String(64), nullable=False),
    Column("department", String(64), nullable=False),
    Column("visit_time", DateTime(timezone=True), nullable=False),
    Column("visit_date", String(8), nullable=False),
    Column("consent_at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text, nullable=False),
    Column("studies_total", Integer, nullable=False),
    Column("studies_done", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Column("sent_at", DateTime(timezone=True)),
)
Index("ix_cache_requests_state", cache_requests.c.state, cache_requests.c.next_attempt_at)

# Studies held as cache copies (never archive originals): where from, kept until when (R-CE-11,
# R-CA-4); the cleanup job deletes a copy after keep_until.
cached_studies = Table(
    "cached_studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False, unique=True),
    Column("person_key", String(64), nullable=False),
    Column("source", String(256), nullable=False),
    Column("cached_at", DateTime(timezone=True), nullable=False),
    Column("keep_until", DateTime(timezone=True), nullable=False),
)
Index("ix_cached_studies_keep", cached_studies.c.keep_until)

# ---- users and their sessions, issue 6 §2, R-SE-1/R-SE-2 (gateway/security/users.py) -------------

# People who log in. No default account exists: the first is made by `ybyx admin create-user`. The
# password is kept as an argon2id hash only; TOTP secrets of enrolled users; failed logins and the
# lockout that follows (per account; per address in memory, security/login.py).
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("role", String(32), nullable=False),
    Column("institution", String(64), nullable=False),  # "" for province/national roles
    Column("person_key", String(64)),  # a patient's pseudonym (exams.person_key): their own studies
    Column("password_hash", String(255), nullable=False),
    Column("password_set_at", DateTime(timezone=True), nullable=False),
    Column("totp_secret", String(255)),  # sealed when [encryption] is on (security/columns.py)
    Column("totp_last_step", BigInteger),  # the last 30-s step a code was used for: no replay
    Column("failed_logins", Integer, nullable=False),
    Column("locked_until", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_login_at", DateTime(timezone=True)),
    Column("disabled_at", DateTime(timezone=True)),
)

# Login sessions: the cookie holds a random secret, the row only its SHA-256 (a copied database
# yields no usable session); ``session_id`` names the session in the user's JWTs (claim ``sid``),
# so logout ends the cookie and every token at once.
user_sessions = Table(
    "user_sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("session_id", String(64), nullable=False, unique=True),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("csrf_hash", String(64), nullable=False),
    Column("user_pk", Integer, ForeignKey("users.id"), nullable=False),
    Column("source", String(256), nullable=False),
    Column("mfa", Integer, nullable=False),  # 0/1: a second factor was given at login
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
)
Index("ix_user_sessions_user", user_sessions.c.user_pk)

# ---- image QC, issue 4 §3-5, R-QC-1, R-CE-5 (gateway/qc/) -----------------------------------------

# Instances waiting to be graded: queued in the transaction that stores them (a catalog write
# hook), removed in the transaction that stores their result; a crash in between redoes the work.
qc_queue = Table(
    "qc_queue",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_uid", UID, nullable=False, unique=True),
    Column("study_uid", UID, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=False),
    Column("enqueued_at", DateTime(timezone=True), nullable=False),
)
Index("ix_qc_queue_due", qc_queue.c.next_attempt_at)
Index("ix_qc_queue_study", qc_queue.c.study_uid)

# One QC result per instance, for the version of its bytes that was graded (a new version is
# graded again). A reject (grade "reject") is held back from forwarding until a passing instance
# takes its place (replaced_by: same series and instance number, or a re-sent series).
qc_results = Table(
    "qc_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_uid", UID, nullable=False, unique=True),
    Column("version", Integer, nullable=False),
    Column("study_uid", UID, nullable=False),
    Column("series_uid", UID, nullable=False),
    Column("modality", String(16), nullable=False),
    Column("series_number", Integer),
    Column("instance_number", Integer),
    Column("grade", String(8), nullable=False),  # A | B | C | reject
    Column("result", Text, nullable=False),  # QcResult JSON
    Column("engine_version", String(32), nullable=False),
    Column("ai_assisted", Integer, nullable=False),  # 0/1
    Column("graded_at", DateTime(timezone=True), nullable=False),
    Column("replaced_by", UID),
)
Index("ix_qc_results_study", qc_results.c.study_uid)
Index("ix_qc_results_grade", qc_results.c.grade)

# A study's QC as another node graded it: on a front-end the center's (R-CE-5, back through the
# upload-monitoring record), on the center the uploading front-end's (sent with its manifest).
qc_reports = Table(
    "qc_reports",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False),
    Column("source", String(16), nullable=False),  # center | frontend
    Column("grade", String(8), nullable=False),
    Column("report", Text, nullable=False),  # StudyQc JSON
    Column("received_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("study_uid", "source", name="uq_qc_reports_study_source"),
)

# ---- secondary use, issue 6 §9, R-SE-9 (gateway/export.py) -------------------------------------

# Explicit consents to use a study identified for a secondary purpose (research, AI training,
# analytics). Without one, an export is anonymised (PS3.15 Basic Profile) or refused.
secondary_use_consents = Table(
    "secondary_use_consents",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("evidence", String(256), nullable=False),  # the signed form's reference, never its scan
    Column("recorded_by", String(128), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)
Index("ix_secondary_use_consents_study", secondary_use_consents.c.study_uid)

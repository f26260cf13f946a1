"""Configuration: one TOML file per role, validated with pydantic before anything starts.

Every file names its ``role`` (``frontend``, ``center``, ``index``); the role picks the model.
Unknown keys, wrong types, bad AE titles and missing files stop the command with one line per
problem, ``file: key: reason`` (issue 2 §3). Relative paths are taken from the config file's folder,
so a config and its data can move together.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def _ae_title(value: str) -> str:
    """An AE title: 1–16 characters of the default repertoire, no backslash, not all spaces."""
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash, not blank)"
        )
    return value.strip()


AETitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors (pydantic's lax mode still turns
    "11112" into 11112)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Peer(Strict):
    """A DICOM application entity that may call us (a modality, a PACS, a workstation)."""

    ae_title: AETitle
    institution: str = Field(description="code of the institution the AE belongs to")
    description: str = ""
    host: str | None = Field(default=None, description="where to reach it (storage commitment reports)")
    port: Port | None = None
    tls: bool = Field(default=False, description="reports to it over DICOM TLS ([dicom.tls], issue 6 §6)")


class TlsSection(Strict):
    """TLS for a listener (issue 6 §6, R-SE-5; ``gateway/security/tls.py``): its certificate and key
    (PEM), and for mutual TLS the CA client certificates must chain to."""

    cert_file: Path = Field(description="certificate chain (PEM); `ybyx certs dev --out DIR` for tests")
    key_file: Path = Field(description="its private key (PEM, unencrypted, mode 600)")
    ca_file: Path | None = Field(
        default=None, description="CA(s) that client certificates and peers we call must chain to"
    )
    require_client_cert: bool = Field(default=False, description="mutual TLS: refuse clients without one")

    @model_validator(mode="after")
    def _mutual_needs_ca(self) -> TlsSection:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA client certificates chain to)")
        return self


class MoveDestination(Strict):
    """A C-MOVE destination: the AE title a peer names in the request, and where it listens."""

    ae_title: AETitle
    host: str
    port: Port
    tls: bool = Field(default=False, description="DICOM TLS to it ([dicom.tls] certificate and ca_file)")


class DicomSection(Strict):
    ae_title: AETitle = "YBYX"
    host: str = "0.0.0.0"
    port: Port = 11112
    max_associations: int = Field(default=16, ge=1, le=512)
    acse_timeout: float = Field(default=30, gt=0)
    dimse_timeout: float = Field(default=120, gt=0)
    network_timeout: float = Field(default=120, gt=0)
    maximum_pdu_size: int = Field(default=0, ge=0, description="0 = no limit")
    accept_any_sop_class: bool = Field(
        default=False, description="also accept storage SOP classes pydicom does not know"
    )
    allow_any_calling_ae: bool = Field(
        default=False, description="accept associations from AEs not listed in peers (demo only)"
    )
    peers: list[Peer] = Field(default_factory=list)
    move_destinations: list[MoveDestination] = Field(default_factory=list)
    tls: TlsSection | None = Field(default=None, description="DICOM TLS on the SCP (PS3.15 Annex B)")

    @model_validator(mode="after")
    def _tls_destinations(self) -> DicomSection:
        wants = any(d.tls for d in self.move_destinations) or any(p.tls for p in self.peers)
        if self.tls is None and wants:
            raise ValueError("peers or move_destinations with tls = true need a [dicom.tls] section")
        return self

    @model_validator(mode="after")
    def _someone_may_call(self) -> DicomSection:
        # pynetdicom treats an empty allow-list as "no check": refuse that rather than open the door.
        if not self.allow_any_calling_ae and not self.peers:
            raise ValueError(
                "no [[dicom.peers]] listed: list the AEs that may connect, or set allow_any_calling_ae = true"
            )
        return self

    @model_validator(mode="after")
    def _unique_titles(self) -> DicomSection:
        for name, items in (("peers", self.peers), ("move_destinations", self.move_destinations)):
            titles = [p.ae_title for p in items]
            dupes = sorted({t for t in titles if titles.count(t) > 1})
            if dupes:
                raise ValueError(f"{name}: AE title listed twice: {', '.join(dupes)}")
        return self


class S3Section(Strict):
    endpoint: str = Field(
        description="host:port of the S3 service", pattern=r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$"
    )
    bucket: str = Field(
        pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$",
        description="S3 bucket name: 3-63 lowercase letters, digits, dots, hyphens",
    )
    access_key: str
    secret_key: str
    secure: bool = True
    region: str | None = None
    prefix: str = ""


class StorageSection(Strict):
    backend: Literal["folder", "s3"] = "folder"
    path: Path = Path("data/blobs")
    s3: S3Section | None = None

    @model_validator(mode="after")
    def _s3_needs_section(self) -> StorageSection:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend 's3' needs a [storage.s3] section")
        return self


class DatabaseSection(Strict):
    url: str = Field(default="sqlite:///data/catalog.db", description="SQLAlchemy URL")

    @model_validator(mode="after")
    def _known_scheme(self) -> DatabaseSection:
        scheme = self.url.split(":", 1)[0]
        if scheme not in {"sqlite", "postgresql", "postgresql+psycopg"}:
            raise ValueError(f"url: unsupported database {scheme!r} (sqlite or postgresql)")
        return self


class IngestSection(Strict):
    on_conflict: Literal["keep-newest", "keep-first"] = Field(
        default="keep-newest",
        description="same SOP Instance UID with different bytes: keep the newest (the older "
        "becomes a version) or keep the first (the newcomer is kept as a version only)",
    )
    spool: Path | None = Field(
        default=None, description="where received files wait to be stored; default <storage.path>/.spool"
    )
    quarantine: Path = Path("data/quarantine")
    helpers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="processes that read headers and build catalog records while the data set "
        'still arrives (issue 2); 0 = none, "auto" = one per CPU',
    )


class ForwardSection(Strict):
    """Forwarding to the province's sharing center by STOW-RS (issue 3 §6, R-UP-3/4)."""

    center_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="the center's base URL (DICOMweb at <url>/dicom-web); unset = do not forward",
    )
    settle_seconds: float = Field(default=3, ge=0, description="quiet time after the last instance")
    workers: int = Field(default=2, ge=1, le=32, description="studies sent at once (in-flight cap)")
    batch_max_instances: int = Field(default=50, ge=1, le=10000)
    batch_max_mb: int = Field(default=256, ge=1, le=65536)
    timeout_seconds: float = Field(default=120, gt=0)
    backoff_initial_seconds: float = Field(default=5, gt=0)
    backoff_max_seconds: float = Field(default=1800, gt=0)
    max_refusals: int = Field(default=5, ge=1, description="attempts at instances the center refuses")
    reconcile_every_hours: float = Field(default=24, gt=0, description="re-check confirmed studies")
    # Node identity (issue 6 §1): the center's token endpoint is <center_url>/oauth/token.
    client_id: str | None = Field(
        default=None, description="this front-end's client id at the center (`ybyx clients add` there)"
    )
    client_secret_file: Path | None = Field(default=None, description="its client secret, mode 600")
    scope: str | None = Field(
        default=None, description="scopes to ask for (space-separated); unset = all the center granted"
    )
    # TLS to the center (issue 6 §6, R-SE-5): an https center_url is verified against ca_file
    ca_file: Path | None = Field(default=None, description="CA the center's certificate chains to")
    client_cert_file: Path | None = Field(default=None, description="our certificate, for mutual TLS")
    client_key_file: Path | None = Field(default=None, description="its private key (mode 600)")

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> ForwardSection:
        if (self.client_id is None) != (self.client_secret_file is None):
            raise ValueError("client_id and client_secret_file go together")
        return self


class IdentitySection(Strict):
    """The pseudonym key: ID numbers are replaced by HMAC-SHA-256 under it (R-SE-8, issue 5)."""

    key_file: Path | None = Field(
        default=None, description="hex key file, mode 600 (`ybyx keys generate`); unset = exam API off"
    )
    key_source: Literal["file", "kms"] = Field(
        default="file",
        description='"kms": the pseudonym key held by the node\'s KMS ([encryption] key_file or HSM), '
        "imported once with `ybyx keys import --purpose pseudonym` (key_file is then not read)",
    )


class TrustedIssuer(Strict):
    """Another node whose tokens this node accepts (audience: this node), with its public keys."""

    issuer: str = Field(min_length=1)
    jwks_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    public_key_file: Path | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> TrustedIssuer:
        if (self.jwks_url is None) == (self.public_key_file is None):
            raise ValueError("give exactly one of jwks_url and public_key_file")
        return self


_PRIVATE_NETWORKS = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]


class UsersSection(Strict):
    """User logins and sessions (issue 6 §2, R-SE-1; ``gateway/security/login.py``)."""

    session_hours: float = Field(default=8, gt=0, le=24, description="a session ends this long after login")
    idle_minutes: float = Field(
        default=30, gt=0, le=1440, description="… or after this long without a request"
    )
    token_lifetime_seconds: int = Field(
        default=300, ge=30, le=3600, description="a user's bearer JWT (POST /auth/login, /auth/token)"
    )
    mfa_doctors: Literal["always", "public", "never"] = Field(
        default="public",
        description="TOTP for doctors: always, only from outside internal_networks, or never "
        "(admins: always, not configurable)",
    )
    mfa_patients: Literal["always", "public", "never"] = Field(
        default="public", description="TOTP for patients (the personal end), as mfa_doctors"
    )
    internal_networks: list[str] = Field(
        default_factory=lambda: list(_PRIVATE_NETWORKS),
        description="addresses (CIDR) that are not public-internet access",
    )
    lockout_threshold: int = Field(default=5, ge=1, le=100, description="failed logins in a row → locked")
    lockout_base_seconds: float = Field(default=60, gt=0, description="first lock; doubles per failure")
    lockout_max_seconds: float = Field(default=3600, gt=0)
    address_lockout_threshold: int = Field(
        default=20, ge=1, le=10000, description="failed logins from one address → that address locked"
    )

    @model_validator(mode="after")
    def _networks(self) -> UsersSection:
        import ipaddress

        for n, net in enumerate(self.internal_networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"internal_networks.{n}: {net!r} is not a network (CIDR)") from None
        return self


class LimitsSection(Strict):
    """Abuse control (issue 6 §7, R-SE-16; ``gateway/security/ratelimit.py``): 429 + Retry-After."""

    enabled: bool = True
    per_address_rate: float = Field(default=500, gt=0, description="requests per second per address")
    per_address_burst: int = Field(default=5000, ge=1)
    per_client_rate: float = Field(default=500, gt=0, description="requests per second per client or user")
    per_client_burst: int = Field(default=5000, ge=1)
    login_per_minute: float = Field(default=10, gt=0, description="POST /auth/login per address")
    login_burst: int = Field(default=10, ge=1)
    token_per_minute: float = Field(default=60, gt=0, description="POST /oauth/token per address")
    token_burst: int = Field(default=60, ge=1)
    max_concurrent: dict[str, int] = Field(
        default_factory=lambda: {"stow": 32, "qido": 64, "wado": 128, "login": 8, "token": 16, "default": 64},
        description="requests of one action running at once (action = the guard's rule name; 0 = no cap)",
    )


class SecuritySection(Strict):
    """Node identity and the route guard (issue 6 §1, §3, R-SE-16): every HTTP route but health and
    the token endpoints needs a bearer token this node issued (or a trusted issuer did)."""

    enabled: bool = True
    insecure_no_auth_i_understand: bool = Field(
        default=False, description="needed with enabled = false (local experiments only)"
    )
    issuer: str | None = Field(
        default=None,
        min_length=1,
        description="this node's id: iss of its tokens and their audience; "
        "default urn:ybyx:frontend:<institution> / urn:ybyx:center:<province>",
    )
    signing_key_file: Path = Field(
        default=Path("data/signing-key.pem"),
        description="Ed25519 private key, mode 600 (`ybyx keys generate-signing --out FILE`); "
        "made on first start if missing",
    )
    previous_signing_keys: list[Path] = Field(
        default_factory=list,
        description="public (or retired private) key files still accepted after a rotation",
    )
    signing_key_source: Literal["file", "kms"] = Field(
        default="file",
        description='"kms": the token-signing key is a managed key of the node\'s KMS ([encryption]), '
        "rotated with `ybyx keys rotate --purpose token-signing` (signing_key_file is then not read)",
    )
    token_lifetime_seconds: int = Field(default=300, ge=30, le=3600)
    trusted_issuers: list[TrustedIssuer] = Field(default_factory=list)
    peer_ca_file: Path | None = Field(
        default=None,
        description="CA the nodes this node calls (index, other centers) must chain to (issue 6 §6); "
        "default: the system's trust store",
    )
    users: UsersSection = UsersSection()
    limits: LimitsSection = LimitsSection()

    @model_validator(mode="after")
    def _off_only_on_purpose(self) -> SecuritySection:
        if not self.enabled and not self.insecure_no_auth_i_understand:
            raise ValueError(
                "enabled = false leaves every route open: also set insecure_no_auth_i_understand = true "
                "(local experiments only)"
            )
        return self


class AuditS3Section(S3Section):
    """``[audit.s3]``: the immutable copy of checkpoints and closed segments (R-SE-4,
    ``gateway/audit_s3.py``). The bucket is created with S3 Object Lock (an existing bucket must
    have it); every object is written once with retention, optionally under legal hold."""

    mode: Literal["COMPLIANCE", "GOVERNANCE"] = Field(
        default="COMPLIANCE",
        description="object lock mode: COMPLIANCE (nobody can shorten or delete) or GOVERNANCE "
        "(users with s3:BypassGovernanceRetention can)",
    )
    retain_days: int = Field(
        default=190,
        ge=183,
        le=36500,
        description="retain-until = export time + this many days (R-SE-4: at least 6 months)",
    )
    legal_hold: bool = Field(default=False, description="also put a legal hold on every exported object")


class AuditSection(Strict):
    """The audit trail (issue 6 §4, R-SE-4; ``gateway/audit.py``). Works without configuration: the
    signing key is generated on first start (mode 600), never shipped as a shared default."""

    signing_key: Path = Field(
        default=Path("data/audit/signing-key.pem"),
        description="Ed25519 private key (PEM, mode 600) signing checkpoints; created if absent",
    )
    export_path: Path = Field(
        default=Path("data/audit/export"),
        description="append-only folder for signed checkpoints and closed segments (files 0444)",
    )
    checkpoint_every_records: int = Field(default=1000, ge=1, le=1_000_000)
    checkpoint_every_seconds: float = Field(default=300, gt=0, le=86400)
    verify_keys: list[Path] = Field(
        default_factory=list, description="older public keys (after a rotation) still trusted by verify"
    )
    signing_key_source: Literal["file", "kms"] = Field(
        default="file",
        description='"kms": the checkpoint key is a managed key of the node\'s KMS ([encryption]), '
        "rotated with `ybyx keys rotate --purpose audit-checkpoint` (signing_key is then not read)",
    )
    s3: AuditS3Section | None = Field(
        default=None, description="also export to an S3 bucket with object lock (the immutable copy)"
    )


class EncryptionSection(Strict):
    """Encryption at rest (issue 6 §5, R-SE-10, R-SE-14; ``gateway/archive/encrypted.py``): every
    stored object sealed with AES-256-GCM under its own data key, wrapped by a KEK of the KMS."""

    enabled: bool = Field(default=False, description="seal stored objects (on in production configs)")
    kms: Literal["local"] = Field(
        default="local", description="key provider: a local key file (an HSM/KMS implements security.kms.Kms)"
    )
    key_file: Path = Field(
        default=Path("data/keys/kek.json"),
        description="local KMS key file, mode 600; made on first start when no object is sealed yet",
    )
    cache_seconds: float = Field(
        default=60, ge=0, le=3600, description="how long an unwrapped data key stays in memory"
    )


# processes for CPU-heavy work after ingest: 1 to 16, or "auto" (one per CPU, gateway.workpool)
WorkerCount = Annotated[int, Field(ge=1, le=16)] | Literal["auto"]


class CompressionSection(Strict):
    """Lossless compression after ingest, before upload (issue 4 §1, R-UP-1; ``gateway/codec``)."""

    transfer_syntax: str = Field(
        default="jpeg-ls",
        description='codec to store and forward in: "jpeg-ls", "jpeg2000", "rle", or "none" (off)',
    )
    transcode_lossless: bool = Field(
        default=False, description="also re-encode data that arrived compressed losslessly in another syntax"
    )
    workers: WorkerCount = Field(
        default="auto",
        description='compression processes (each uses one core); "auto": one per CPU — the OS then '
        "shares the cores between the C-STORE threads and the encoders, so the queue keeps up",
    )
    delete_grace_seconds: float = Field(
        default=60,
        ge=0,
        le=86400,
        description="how long a replaced (uncompressed) blob stays readable before it is deleted",
    )

    @field_validator("transfer_syntax")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        from gateway.codec.table import CODECS  # the codec table is the one list of names

        if value != "none" and value not in CODECS:
            known = ", ".join(f'"{name}"' for name in [*CODECS, "none"])
            raise ValueError(f"unknown codec {value!r} (one of {known})")
        return value


class QcSection(Strict):
    """Image QC (issue 4 §3-5, R-QC-1, R-CE-5; ``gateway/qc``): graded after ingest, off the C-STORE
    and STOW-RS path. On a front-end a study waits until its instances are graded and a reject
    (废) is held back until replaced; on the center results go back to the uploader."""

    enabled: bool = Field(default=False, description="grade every stored instance")
    rules: Path | None = Field(
        default=None, description="the QC rules file (config/qc.toml); unset = the built-in thresholds"
    )
    workers: WorkerCount = Field(
        default=1, description='grading processes (each uses one core); "auto": one per CPU'
    )


class DicomWebSection(Strict):
    max_request_mb: int = Field(default=2048, ge=1, description="STOW-RS body limit (413 above it)")


class HttpSection(Strict):
    host: str = "127.0.0.1"
    port: Port = 8080
    workers: int = Field(default=1, ge=1, le=64)
    tls: TlsSection | None = Field(default=None, description="HTTPS (issue 6 §6, R-SE-5)")


# ---- the federation: national index, cross-province retrieval, caching, doctors (issue 5) ---------

_URL = r"^https?://[^\s/]+(/[^\s]*)?$"


class ProvinceEntry(Strict):
    """A province in the national index's directory: where its sharing center answers (R-CE-7).
    Who may call whom is the client registries' business (each center registers the others)."""

    code: str = Field(pattern=r"^\d{2}$", description="province code, e.g. '50'")
    name: str = ""
    center_url: str = Field(pattern=_URL, description="the center's base URL (DICOMweb at <url>/dicom-web)")


class IndexLinkSection(Strict):
    """``[index]`` on a center: the national index and this center's client there."""

    url: str = Field(pattern=_URL, description="the index's base URL")
    client_id: str = Field(min_length=1, description="this center's client id at the index")
    client_secret_file: Path = Field(description="its client secret, mode 600")
    timeout_seconds: float = Field(default=30, gt=0)
    retry_initial_seconds: float = Field(default=10, gt=0, description="registration retry backoff start")
    retry_max_seconds: float = Field(default=3600, gt=0)


class PeerCenter(Strict):
    """``[[center_peers]]`` on a center: its client credentials at another province's center."""

    province: str = Field(pattern=r"^\d{2}$")
    client_id: str = Field(min_length=1)
    client_secret_file: Path


class CacheSection(Strict):
    """History caching and cache retention (R-CE-6, R-CA-3, R-CE-9, R-CE-11, R-CA-4)."""

    run_at: str = Field(
        default="01:00",
        pattern=r"^([01]\d|2[0-3]):[0-5]\d$",
        description="China time of the daily job (the center runs a request on the next day)",
    )
    retries: int = Field(default=3, ge=3, le=20, description="fetch retries before failed + alert (≥ 3)")
    backoff_initial_seconds: float = Field(default=60, gt=0)
    backoff_max_seconds: float = Field(default=3600, gt=0)
    extend_days: int = Field(
        default=0, ge=0, description="keep cache copies this much longer than the minimum"
    )


class DoctorSection(Strict):
    """``[doctor]`` on a front-end: the workstation API (R-RT-1, R-RT-2, R-CE-4)."""

    history_years: int = Field(default=3, ge=3, le=30, description="history window before the visit")
    same_exam_days: int = Field(default=30, ge=1, le=366, description="same-exam reminder period")
    reject_grades: list[str] = Field(
        default_factory=lambda: ["丙", "废"], description="QC grades never reminded"
    )
    codes_dir: Path = Field(
        default=Path("codes"), description="folder of code maps (*.toml): hospital → insurance item code"
    )


class SignerKey(Strict):
    """A registered signer of authorization evidence: a face-recognition device or an operator."""

    id: str = Field(pattern=r"^[A-Za-z0-9._\-]{1,64}$", description="device id / operator id")
    public_key: Path = Field(description="its Ed25519 public key (PEM)")


class GrantsSection(Strict):
    """``[grants]`` on a front-end or a center: how patient authorizations are verified (R-RT-4,
    R-CQ-5; ``gateway/grants.py``). A method other than the insurance QR code is offered only
    once its keys are configured."""

    insurance_qr_public_keys: list[Path] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM) of the insurance platform signing QR payloads",
    )
    insurance_app_public_keys: list[Path] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM) of the insurance app's authorization tokens",
    )
    e_signature_public_keys: list[Path] = Field(
        default_factory=list, description="Ed25519 public keys (PEM) of the e-signature service"
    )
    face_devices: list[SignerKey] = Field(
        default_factory=list, description="registered IoT face-recognition devices and their keys"
    )
    face_min_score: float = Field(default=0.9, gt=0, le=1, description="least face match score accepted")
    face_max_age_seconds: int = Field(
        default=300, ge=10, le=3600, description="how old a face attestation may be (freshness window)"
    )
    consent_operators: list[SignerKey] = Field(
        default_factory=list, description="operators who sign scanned written consents, and their keys"
    )
    max_lifetime_hours: float = Field(default=24, gt=0, le=24 * 366)


class FrontendConfig(Strict):
    """前置机: the hospital front-end (ARCHITECTURE "One product, three roles")."""

    role: Literal["frontend"]
    institution: str = Field(description="code of the hospital this front-end serves")
    dicom: DicomSection
    http: HttpSection = HttpSection()
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    ingest: IngestSection = IngestSection()
    forward: ForwardSection = ForwardSection()
    compression: CompressionSection = CompressionSection()
    qc: QcSection = QcSection()
    dicomweb: DicomWebSection = DicomWebSection()
    identity: IdentitySection = IdentitySection()
    audit: AuditSection = AuditSection()
    security: SecuritySection = SecuritySection()
    encryption: EncryptionSection = EncryptionSection()
    doctor: DoctorSection = DoctorSection()
    grants: GrantsSection = GrantsSection()
    cache: CacheSection = CacheSection()

    @model_validator(mode="after")
    def _forward_needs_credentials(self) -> FrontendConfig:
        if self.forward.center_url and self.forward.client_id is None and self.security.enabled:
            raise ValueError(
                "forward: center_url needs client_id and client_secret_file "
                "(register this front-end at the center: ybyx clients add)"
            )
        return self


class CenterConfig(Strict):
    """共享中心: a province's sharing center."""

    role: Literal["center"]
    province: str = Field(description="province code, e.g. '50' for Chongqing")
    http: HttpSection = HttpSection(port=8081)
    audit: AuditSection = AuditSection()
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    ingest: IngestSection = IngestSection()
    dicomweb: DicomWebSection = DicomWebSection()
    security: SecuritySection = SecuritySection()
    encryption: EncryptionSection = EncryptionSection()
    index: IndexLinkSection | None = None
    center_peers: list[PeerCenter] = Field(default_factory=list)
    cache: CacheSection = CacheSection()
    qc: QcSection = QcSection()
    grants: GrantsSection = GrantsSection()  # grants for the center's institutions' users


class IndexConfig(Strict):
    """索引共享模块: the national index (``index/``, issue 5 §2)."""

    role: Literal["index"]
    http: HttpSection = HttpSection(port=8082)
    database: DatabaseSection = DatabaseSection()
    audit: AuditSection = AuditSection()
    security: SecuritySection = SecuritySection()
    # the KMS of the index (issue 6 §5): seals the index records' report text (R-SE-10)
    encryption: EncryptionSection = EncryptionSection()
    provinces: list[ProvinceEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_provinces(self) -> IndexConfig:
        codes = [p.code for p in self.provinces]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(f"provinces: province listed twice: {', '.join(dupes)}")
        return self


@dataclass(frozen=True)
class DemoConfig:
    """``ybyx demo``: the roles of the one-machine demo, each a full role config (``[frontend]``,
    ``[center]``), validated like their own files; key paths name the table (``frontend.dicom.port``).
    With ``[index]``, ``[center_b]`` and ``[frontend_b]`` (all three or none, issue 5 §9) the demo
    is a federation: the national index and a second province."""

    frontend: FrontendConfig
    center: CenterConfig
    role: Literal["demo"] = "demo"
    index: IndexConfig | None = None
    center_b: CenterConfig | None = None
    frontend_b: FrontendConfig | None = None

    def node(self, table: str) -> FrontendConfig | CenterConfig | IndexConfig:
        """The config of the node in ``[table]`` (``frontend``, ``center``, ``index``, ``center_b``…)."""
        cfg = getattr(self, table, None) if table in DEMO_TABLES else None
        if cfg is None:
            raise ConfigError([f"demo: {table}: no such node in this demo config"])
        assert isinstance(cfg, FrontendConfig | CenterConfig | IndexConfig)
        return cfg


# the tables of a demo config and the role each holds; the last three form the federation
DEMO_TABLES: dict[str, str] = {
    "center": "center",
    "frontend": "frontend",
    "index": "index",
    "center_b": "center",
    "frontend_b": "frontend",
}
DEMO_NODES = ["frontend", "center", "frontend_b", "center_b"]  # the demo's nodes with an archive


RoleConfig = FrontendConfig | CenterConfig | IndexConfig | DemoConfig
_MODELS: dict[str, type[FrontendConfig] | type[CenterConfig] | type[IndexConfig]] = {
    "frontend": FrontendConfig,
    "center": CenterConfig,
    "index": IndexConfig,
}


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` holds one ``file: key: reason`` per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _join(base: Path, path: Path) -> Path:
    """``base / path`` with ``..`` folded, so messages and logs show plain paths."""
    return Path(os.path.normpath(base / path))


def _tls_paths(tls: TlsSection | None, base: Path) -> TlsSection | None:
    if tls is None:
        return None
    ca = _join(base, tls.ca_file) if tls.ca_file is not None else None
    return tls.model_copy(
        update={"cert_file": _join(base, tls.cert_file), "key_file": _join(base, tls.key_file), "ca_file": ca}
    )


def _tls_below(model: Any, base: Path, updates: dict[str, Any]) -> None:
    """TLS file names (issue 6 §6) taken from the config file's folder, like every other path."""
    for name in ("http", "dicom"):
        section = updates.get(name, getattr(model, name, None))
        if section is not None and getattr(section, "tls", None) is not None:
            updates[name] = section.model_copy(update={"tls": _tls_paths(section.tls, base)})
    security = updates.get("security", getattr(model, "security", None))
    if isinstance(security, SecuritySection) and security.peer_ca_file is not None:
        updates["security"] = security.model_copy(update={"peer_ca_file": _join(base, security.peer_ca_file)})
    forward = updates.get("forward", getattr(model, "forward", None))
    if isinstance(forward, ForwardSection):
        keys = ("ca_file", "client_cert_file", "client_key_file")
        fix = {k: _join(base, getattr(forward, k)) for k in keys if getattr(forward, k) is not None}
        if fix:
            updates["forward"] = forward.model_copy(update=fix)


def _below(
    model: FrontendConfig | CenterConfig | IndexConfig, base: Path
) -> FrontendConfig | CenterConfig | IndexConfig:
    """Relative paths (given or default) are taken from the config file's folder."""
    updates: dict[str, Any] = {}
    storage = getattr(model, "storage", None)
    if isinstance(storage, StorageSection) and not storage.path.is_absolute():
        updates["storage"] = storage.model_copy(update={"path": _join(base, storage.path)})
    ingest = getattr(model, "ingest", None)
    if isinstance(ingest, IngestSection):
        fix = {
            k: _join(base, v)
            for k, v in (("spool", ingest.spool), ("quarantine", ingest.quarantine))
            if v is not None and not v.is_absolute()
        }
        if fix:
            updates["ingest"] = ingest.model_copy(update=fix)
    identity = getattr(model, "identity", None)
    if isinstance(identity, IdentitySection) and identity.key_file and not identity.key_file.is_absolute():
        updates["identity"] = identity.model_copy(update={"key_file": _join(base, identity.key_file)})
    security = getattr(model, "security", None)
    if isinstance(security, SecuritySection):
        updates["security"] = security.model_copy(
            update={
                "signing_key_file": _join(base, security.signing_key_file),
                "previous_signing_keys": [_join(base, p) for p in security.previous_signing_keys],
                "trusted_issuers": [
                    t.model_copy(update={"public_key_file": _join(base, t.public_key_file)})
                    if t.public_key_file is not None
                    else t
                    for t in security.trusted_issuers
                ],
            }
        )
    forward = getattr(model, "forward", None)
    if isinstance(forward, ForwardSection) and forward.client_secret_file is not None:
        updates["forward"] = forward.model_copy(
            update={"client_secret_file": _join(base, forward.client_secret_file)}
        )
    audit = getattr(model, "audit", None)
    if isinstance(audit, AuditSection):
        updates["audit"] = audit.model_copy(
            update={
                "signing_key": _join(base, audit.signing_key),
                "export_path": _join(base, audit.export_path),
                "verify_keys": [_join(base, p) for p in audit.verify_keys],
            }
        )
    _tls_below(model, base, updates)
    encryption = getattr(model, "encryption", None)
    if isinstance(encryption, EncryptionSection):
        updates["encryption"] = encryption.model_copy(update={"key_file": _join(base, encryption.key_file)})
    updates |= _federation_paths(model, base)
    qc = getattr(model, "qc", None)
    if isinstance(qc, QcSection) and qc.rules is not None:
        updates["qc"] = qc.model_copy(update={"rules": _join(base, qc.rules)})
    db = model.database
    if db.url.startswith("sqlite:///") and not db.url.startswith("sqlite:////"):
        updates["database"] = DatabaseSection(
            url=f"sqlite:///{_join(base, Path(db.url.removeprefix('sqlite:///')))}"
        )
    return model.model_copy(update=updates) if updates else model


def _federation_paths(model: Any, base: Path) -> dict[str, Any]:
    """Relative paths of the issue-5 sections, from the config file's folder."""
    out: dict[str, Any] = {}
    link = getattr(model, "index", None)
    if isinstance(link, IndexLinkSection):
        out["index"] = link.model_copy(update={"client_secret_file": _join(base, link.client_secret_file)})
    peers = getattr(model, "center_peers", None)
    if peers:
        out["center_peers"] = [
            p.model_copy(update={"client_secret_file": _join(base, p.client_secret_file)}) for p in peers
        ]
    doctor = getattr(model, "doctor", None)
    if isinstance(doctor, DoctorSection):
        out["doctor"] = doctor.model_copy(update={"codes_dir": _join(base, doctor.codes_dir)})
    grants = getattr(model, "grants", None)
    if isinstance(grants, GrantsSection):
        lists = ("insurance_qr_public_keys", "insurance_app_public_keys", "e_signature_public_keys")
        update: dict[str, Any] = {k: [_join(base, p) for p in getattr(grants, k)] for k in lists}
        for k in ("face_devices", "consent_operators"):
            entries = getattr(grants, k)
            update[k] = [e.model_copy(update={"public_key": _join(base, e.public_key)}) for e in entries]
        out["grants"] = grants.model_copy(update=update)
    return out


def parse_config(data: dict[str, Any], source: str = "<config>", base: Path | None = None) -> RoleConfig:
    """Validate a config mapping; raise :class:`ConfigError` listing every problem."""
    role = data.get("role")
    if role == "demo":
        return _parse_demo(data, source, base)
    if role not in _MODELS:
        raise ConfigError([f"{source}: role: must be one of {', '.join(_MODELS)}, demo (got {role!r})"])
    try:
        model = _MODELS[role].model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif not err["loc"] and ": " in msg:  # a check across sections names its key
                key, msg = msg.split(": ", 1)
            problems.append(f"{source}: {key}: {msg}")
        raise ConfigError(problems) from None
    return _below(model, base) if base is not None else model


def _parse_demo(data: dict[str, Any], source: str, base: Path | None) -> DemoConfig:
    problems: list[str] = []
    unknown = sorted(set(data) - {"role", *DEMO_TABLES})
    problems += [f"{source}: {key}: unknown key" for key in unknown]
    federation = [name for name in ("index", "center_b", "frontend_b") if name in data]
    if federation and len(federation) < 3:
        missing = next(n for n in ("index", "center_b", "frontend_b") if n not in data)
        problems.append(
            f"{source}: {missing}: a federation demo needs all of [index], [center_b] and [frontend_b]"
        )
    parsed: dict[str, Any] = {}
    for name, role in DEMO_TABLES.items():
        table = data.get(name)
        if table is None and name not in ("frontend", "center"):
            continue
        if not isinstance(table, dict):
            problems.append(f"{source}: {name}: a [{name}] table is required")
            continue
        try:
            parsed[name] = parse_config({**table, "role": role}, f"{source}: {name}", base)
        except ConfigError as exc:
            problems += [p.replace(f"{source}: {name}: ", f"{source}: {name}.", 1) for p in exc.problems]
    seen: dict[Path, str] = {}
    for name, node in parsed.items():
        other = seen.setdefault(node.security.signing_key_file, name)
        if other != name:  # two nodes, one token-signing key: each node must have its own (issue 6 §1)
            problems.append(
                f"{source}: {name}.security.signing_key_file: the same file as the {other}'s; "
                "give each node its own key"
            )
    if problems:
        raise ConfigError(problems)
    return DemoConfig(**parsed)


def load_config(path: Path | str) -> RoleConfig:
    """Read and validate a TOML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: (file): no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: (file): {exc.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: (syntax): {exc}"]) from None
    return parse_config(data, str(path), path.resolve().parent)

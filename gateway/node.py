"""What every server role opens first, in one place: archive, node security, audit, ingest.

The front-end and the center differ in what they add on top (DIMSE, forwarding, APIs); the order
and the clean-up on failure (a half-opened node closes what it opened) are the same and live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.archive import Archive
from gateway.archive.blobstore import FolderBlobStore
from gateway.audit import AuditLog, EventType, Result, start_audit, stop_audit
from gateway.config import CenterConfig, FrontendConfig
from gateway.ingest import Ingest
from gateway.intake import IntakeJournal
from gateway.security.kms import Kms
from gateway.security.managed import node_kms, record_created
from gateway.security.node import NodeSecurity
from gateway.security.resources import StudyOwnership
from gateway.workpool import resolve_workers


def _audit_new_kek(archive: Archive, audit: AuditLog) -> None:
    """A KEK made on first start is a key operation like any other (R-SE-14, R-SE-4)."""
    from gateway.archive.encrypted import EncryptedBlobStore

    store = archive.store
    if not isinstance(store, EncryptedBlobStore):
        return
    created = getattr(store.keys.kms, "created", None)
    if created is not None:
        audit.record_as(
            audit.system,
            EventType.KEY_OPERATION,
            resource=f"kek:{created.key_id}",
            result=Result.SUCCESS,
            detail={"operation": "generate", "key_id": created.key_id, "reason": "first start"},
        )


def archive_kms(archive: Archive) -> Kms | None:
    """The KMS the archive's sealed store uses (None when objects are not sealed)."""
    from gateway.archive.encrypted import EncryptedBlobStore

    return archive.store.keys.kms if isinstance(archive.store, EncryptedBlobStore) else None


def ownership(cfg: FrontendConfig | CenterConfig) -> StudyOwnership:
    """How studies map to institutions on this node (issue 6 §3): a front-end's own hospital and
    its peers' institutions by AE title; a center knows them from exam records only."""
    if isinstance(cfg, FrontendConfig):
        return StudyOwnership(cfg.institution, {p.ae_title: p.institution for p in cfg.dicom.peers})
    return StudyOwnership()


@dataclass
class NodeCore:
    archive: Archive
    security: NodeSecurity
    audit: AuditLog
    ingest: Ingest
    spool: Path
    kms: Kms | None = None  # the node's KMS when it holds managed keys or seals objects

    @classmethod
    def open(
        cls, cfg: FrontendConfig | CenterConfig, *, role: str, node_id: str, outbox: bool = False
    ) -> NodeCore:
        """Open in order; on any failure, close what was opened and re-raise."""
        archive = Archive.open(cfg.storage, cfg.database, outbox=outbox, encryption=cfg.encryption)
        audit: AuditLog | None = None
        ingest: Ingest | None = None
        try:
            # signing and pseudonym keys held by the KMS (R-SE-14) when the config says so
            kms, made = node_kms(cfg, archive.catalog, archive_kms(archive))
            security = NodeSecurity.open(
                cfg.security,
                role=role,
                node_id=node_id,
                catalog=archive.catalog,
                ownership=ownership(cfg),
                kms=kms,
            )
            audit = start_audit(cfg, archive.catalog, kms)  # R-SE-4
            _audit_new_kek(archive, audit)
            record_created(audit, made + security.created_keys)
            store, catalog = archive.store, archive.catalog
            # one flush per received instance (gateway/intake.py): folder store + SQLite only
            journal = (
                IntakeJournal(store.root / ".intake", catalog.sync)
                if isinstance(store, FolderBlobStore) and catalog.can_defer
                else None
            )
            ingest = Ingest(
                catalog,
                store,
                quarantine=cfg.ingest.quarantine,
                policy=cfg.ingest.on_conflict,
                audit=audit,
                helpers=ingest_helpers(cfg.ingest.helpers),
                journal=journal,
            )
            ingest.recover()  # what a crash of the machine left uncatalogued, before anything is received
        except BaseException:
            # A node that cannot open leaves nothing running: no helper processes, no audit
            # thread, no open database or journal thread (the CLI reports the error and exits;
            # a caller that retries gets a clean slate).
            if ingest is not None:
                ingest.close()
            stop_audit(audit)
            archive.close()
            raise
        # beside the blobs by default: received files are linked into place, not copied
        spool = cfg.ingest.spool or cfg.storage.path / ".spool"
        return cls(archive, security, audit, ingest, spool, kms)

    def close(self) -> None:
        self.ingest.close()
        stop_audit(self.audit)
        self.archive.close()


def ingest_helpers(setting: int | str) -> int:
    """``[ingest] helpers`` as a count: ``"auto"`` is one per CPU (each serves one instance at a time)."""
    return resolve_workers("auto") if setting == "auto" else int(setting)

"""共享中心: a province's sharing center — DICOMweb archive and the front-ends' reconciliation API."""

from __future__ import annotations

from dataclasses import dataclass

from api.center import routes as center_api
from gateway.archive import Archive, ArchiveUnavailable
from gateway.audit import AuditLog, start_audit, stop_audit
from gateway.config import CenterConfig
from gateway.exams import ExamBook
from gateway.ingest import Ingest
from gateway.security.node import NodeSecurity, default_node_id
from gateway.web import HttpServer, build_app


@dataclass
class Center:
    cfg: CenterConfig
    archive: Archive
    ingest: Ingest
    http: HttpServer
    security: NodeSecurity
    http_port: int = 0
    audit: AuditLog | None = None

    @classmethod
    def start(cls, cfg: CenterConfig) -> Center:
        archive = Archive.open(cfg.storage, cfg.database)
        try:
            security = NodeSecurity.open(
                cfg.security,
                role="center",
                node_id=cfg.security.issuer or default_node_id("center", cfg.province),
                catalog=archive.catalog,
            )
        except ArchiveUnavailable:
            archive.close()
            raise
        try:
            audit = start_audit(cfg, archive.catalog)  # R-SE-4
        except ArchiveUnavailable:
            archive.close()
            raise
        ingest = Ingest(
            archive.catalog,
            archive.store,
            quarantine=cfg.ingest.quarantine,
            policy=cfg.ingest.on_conflict,
            audit=audit,
        )
        # beside the blobs by default, so stored parts are linked into place, not copied
        spool = cfg.ingest.spool or cfg.storage.path / ".spool"
        app = build_app(
            "center",
            archive,
            ingest,
            max_request_bytes=cfg.dicomweb.max_request_mb << 20,
            spool=str(spool),
            api_routes=list(center_api),
            security=security,
            state={"exams": ExamBook(archive.catalog), "audit": audit},
        )
        center = cls(cfg, archive, ingest, HttpServer(app, cfg.http.host, cfg.http.port), security)
        center.audit = audit
        center.http_port = center.http.start()
        return center

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.http.host in ("0.0.0.0", "::") else self.cfg.http.host
        return f"http://{host}:{self.http_port}"

    def stop(self) -> None:
        self.http.stop()
        stop_audit(self.audit)
        self.archive.close()

"""共享中心: a province's sharing center — DICOMweb archive and the front-ends' reconciliation API."""

from __future__ import annotations

from dataclasses import dataclass

from api.center import routes as center_api
from gateway.archive import Archive
from gateway.audit import AuditLog
from gateway.config import CenterConfig
from gateway.exams import ExamBook
from gateway.ingest import Ingest
from gateway.node import NodeCore
from gateway.security.node import NodeSecurity, default_node_id
from gateway.web import HttpServer, build_app


@dataclass
class Center:
    cfg: CenterConfig
    core: NodeCore
    http: HttpServer
    http_port: int = 0

    @classmethod
    def start(cls, cfg: CenterConfig) -> Center:
        core = NodeCore.open(
            cfg, role="center", node_id=cfg.security.issuer or default_node_id("center", cfg.province)
        )
        app = build_app(
            "center",
            core.archive,
            core.ingest,
            max_request_bytes=cfg.dicomweb.max_request_mb << 20,
            spool=str(core.spool),
            api_routes=list(center_api),
            security=core.security,
            state={"exams": ExamBook(core.archive.catalog), "audit": core.audit},
        )
        center = cls(cfg, core, HttpServer(app, cfg.http.host, cfg.http.port))
        center.http_port = center.http.start()
        return center

    @property
    def archive(self) -> Archive:
        return self.core.archive

    @property
    def ingest(self) -> Ingest:
        return self.core.ingest

    @property
    def security(self) -> NodeSecurity:
        return self.core.security

    @property
    def audit(self) -> AuditLog:
        return self.core.audit

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.http.host in ("0.0.0.0", "::") else self.cfg.http.host
        return f"http://{host}:{self.http_port}"

    def stop(self) -> None:
        self.http.stop()
        self.core.close()

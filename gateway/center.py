"""共享中心: a province's sharing center — DICOMweb archive and the front-ends' reconciliation API."""

from __future__ import annotations

from dataclasses import dataclass

from api.center import routes as center_api
from gateway.archive import Archive
from gateway.config import CenterConfig
from gateway.exams import ExamBook
from gateway.ingest import Ingest
from gateway.web import HttpServer, build_app


@dataclass
class Center:
    cfg: CenterConfig
    archive: Archive
    ingest: Ingest
    http: HttpServer
    http_port: int = 0

    @classmethod
    def start(cls, cfg: CenterConfig) -> Center:
        archive = Archive.open(cfg.storage, cfg.database)
        ingest = Ingest(
            archive.catalog, archive.store, quarantine=cfg.ingest.quarantine, policy=cfg.ingest.on_conflict
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
            state={"exams": ExamBook(archive.catalog)},
        )
        center = cls(cfg, archive, ingest, HttpServer(app, cfg.http.host, cfg.http.port))
        center.http_port = center.http.start()
        return center

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.http.host in ("0.0.0.0", "::") else self.cfg.http.host
        return f"http://{host}:{self.http_port}"

    def stop(self) -> None:
        self.http.stop()
        self.archive.close()

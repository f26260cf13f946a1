"""``ybyx index``: the national index (索引共享模块) as a running service (issue 5 §2).

Its database holds the index records, the retrieval records of the whole country, its client
registry (the centers) and its audit trail — the same catalog schema and migrations as the other
roles (one migration mechanism), of which it uses these tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from gateway.archive import ArchiveUnavailable, column_cipher
from gateway.archive.catalog import Catalog
from gateway.audit import AuditLog, EventType, Result, start_audit, stop_audit
from gateway.config import IndexConfig
from gateway.retrievals import RetrievalLog
from gateway.security.columns import seal_existing_index_records
from gateway.security.managed import node_kms, record_created
from gateway.security.node import NodeSecurity, default_node_id
from gateway.web import HttpServer
from index.app import build_index_app
from index.directory import Directory
from index.records import IndexBook


@dataclass
class NationalIndex:
    cfg: IndexConfig
    catalog: Catalog
    security: NodeSecurity
    audit: AuditLog
    book: IndexBook
    http: HttpServer
    http_port: int = 0

    @classmethod
    def start(cls, cfg: IndexConfig) -> NationalIndex:
        try:
            catalog = Catalog.open(cfg.database.url)
        except (SQLAlchemyError, OSError) as exc:
            reason = " ".join(str(exc.__cause__ or exc).split())
            raise ArchiveUnavailable("database.url", f"cannot open the index database: {reason}") from exc
        try:
            known = None
            if cfg.encryption.enabled:  # the report text of index records sealed at rest (R-SE-10)
                try:
                    catalog.columns = column_cipher(catalog, cfg.encryption)
                except OSError as exc:
                    raise ArchiveUnavailable("encryption.key_file", str(exc)) from exc
                known = catalog.columns.keys.kms
            kms, made = node_kms(cfg, catalog, known)  # signing keys in the KMS (R-SE-14)
            node_id = cfg.security.issuer or default_node_id("index", "national")
            security = NodeSecurity.open(
                cfg.security, role="index", node_id=node_id, catalog=catalog, kms=kms
            )
            audit = start_audit(cfg, catalog, kms)  # R-SE-4
        except ArchiveUnavailable:
            catalog.close()
            raise
        record_created(audit, made + security.created_keys)
        if catalog.columns is not None:
            sealed = seal_existing_index_records(catalog)  # rows stored before sealing was on
            if sealed:
                audit.record_as(
                    audit.system,
                    EventType.KEY_OPERATION,
                    resource="index_records",
                    result=Result.SUCCESS,
                    detail={"operation": "seal-existing", "fields": sealed},
                )
        book = IndexBook(catalog)
        app = build_index_app(security, book, Directory(cfg.provinces), RetrievalLog(catalog), audit)
        http = HttpServer(app, cfg.http.host, cfg.http.port, tls=cfg.http.tls)  # issue 6 §6
        index = cls(cfg, catalog, security, audit, book, http)
        index.http_port = index.http.start()
        return index

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.http.host in ("0.0.0.0", "::") else self.cfg.http.host
        return f"{self.http.scheme}://{host}:{self.http_port}"

    def stop(self) -> None:
        self.http.stop()
        stop_audit(self.audit)
        self.catalog.close()

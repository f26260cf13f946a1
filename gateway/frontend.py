"""前置机: the hospital front-end role — DICOM in, durable archive, (later) forward to the center."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dimse.server import DicomServer
from gateway.archive import Archive
from gateway.config import FrontendConfig
from gateway.ingest import Ingest

log = logging.getLogger(__name__)


@dataclass
class Frontend:
    """A running front-end: its archive and its DICOM SCP."""

    cfg: FrontendConfig
    archive: Archive
    ingest: Ingest
    dicom: DicomServer
    dicom_port: int = 0

    @classmethod
    def start(cls, cfg: FrontendConfig) -> Frontend:
        archive = Archive.open(cfg.storage, cfg.database)
        ingest = Ingest(
            archive.catalog, archive.store, quarantine=cfg.ingest.quarantine, policy=cfg.ingest.on_conflict
        )
        # By default on the same file system as the blobs: stored files are linked, not copied.
        spool = cfg.ingest.spool or cfg.storage.path / ".spool"
        server = DicomServer(cfg.dicom, ingest, archive.catalog, archive.store, spool)
        fe = cls(cfg, archive, ingest, server)
        fe.dicom_port = server.start()
        return fe

    def stop(self) -> None:
        self.dicom.stop()
        self.archive.close()

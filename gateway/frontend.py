"""前置机: the hospital front-end role — DICOM in, durable archive, forward to the center, DICOMweb out."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import timedelta

from starlette.routing import Route

from api.doctor import routes as doctor_api
from api.frontend import metrics
from api.frontend import routes as frontend_api
from dicomweb.client import DicomWebClient
from dimse.server import DicomServer
from gateway.archive import Archive, ArchiveUnavailable
from gateway.audit import AuditLog
from gateway.codec.stage import CompressionStage
from gateway.codec.table import codec_for
from gateway.config import ForwardSection, FrontendConfig
from gateway.exams import ExamBook
from gateway.forwarder import Forwarder, ForwardPolicy
from gateway.identity import PseudonymKey, load_key
from gateway.ingest import Ingest
from gateway.node import NodeCore
from gateway.qc.service import QcService
from gateway.security.credentials import ClientCredentials, read_secret
from gateway.security.grant_policy import GrantPolicy
from gateway.security.managed import pseudonym_key
from gateway.security.node import NodeSecurity, default_node_id
from gateway.security.tls import client_context
from gateway.web import HttpServer, build_app
from gateway.workpool import resolve_workers
from gateway.workstation import Workstation, open_workstation

log = logging.getLogger(__name__)


def forward_policy(cfg: ForwardSection) -> ForwardPolicy:
    return ForwardPolicy(
        settle=timedelta(seconds=cfg.settle_seconds),
        backoff_initial=timedelta(seconds=cfg.backoff_initial_seconds),
        backoff_max=timedelta(seconds=cfg.backoff_max_seconds),
        max_refusals=cfg.max_refusals,
        reconcile_every=timedelta(hours=cfg.reconcile_every_hours),
    )


def _center_credentials(cfg: ForwardSection) -> ClientCredentials | None:
    """This front-end's client credentials at the center (issue 6 §1), if configured."""
    if cfg.center_url is None or cfg.client_id is None or cfg.client_secret_file is None:
        return None
    try:
        secret = read_secret(cfg.client_secret_file)
    except FileNotFoundError:
        reason = f"{cfg.client_secret_file}: no such file"
        raise ArchiveUnavailable("forward.client_secret_file", reason) from None
    except (OSError, ValueError) as exc:
        raise ArchiveUnavailable("forward.client_secret_file", str(exc)) from exc
    return ClientCredentials(
        f"{cfg.center_url.rstrip('/')}/oauth/token",
        cfg.client_id,
        secret,
        scope=cfg.scope,
        timeout=cfg.timeout_seconds,
        verify=center_tls(cfg),
    )


def center_tls(cfg: ForwardSection) -> ssl.SSLContext | bool:
    """How the center's certificate is checked (issue 6 §6, R-SE-5): against ``ca_file`` (else the
    system's trust store), presenting our certificate for mutual TLS when one is configured."""
    if cfg.ca_file is None and cfg.client_cert_file is None:
        return True
    try:
        return client_context(cfg.ca_file, cert_file=cfg.client_cert_file, key_file=cfg.client_key_file)
    except (OSError, ValueError) as exc:
        raise ArchiveUnavailable("forward.ca_file", f"cannot load the TLS files: {exc}") from exc


def _compression_stage(cfg: FrontendConfig, archive: Archive) -> CompressionStage | None:
    """The lossless compression stage (R-UP-1), queueing every instance stored from now on; None
    when ``[compression] transfer_syntax = "none"`` (instances left queued by an earlier run with
    it on are then forwarded as received)."""
    section = cfg.compression
    grace = timedelta(seconds=section.delete_grace_seconds)
    if section.transfer_syntax == "none":
        off = CompressionStage(archive.catalog, archive.store, codec_for("jpeg-ls"), delete_grace=grace)
        dropped = off.discard_queue()
        if dropped:
            log.info("compression is off: %d queued instances stay as received", dropped)
        off.sweep()  # blobs an earlier run replaced (those still in their grace period stay)
        return None
    stage = CompressionStage(
        archive.catalog,
        archive.store,
        codec_for(section.transfer_syntax),
        transcode_lossless=section.transcode_lossless,
        workers=resolve_workers(section.workers),
        processes=True,
        delete_grace=grace,
    )
    stage.install()
    return stage


def _grant_policy(core: NodeCore, workstation: Workstation, node_id: str) -> None:
    """Cache copies are shown to a hospital's users only through a patient's grant, and their
    WADO-RS reads are recorded for the national index (R-RT-4, R-CQ-5; security/grant_policy.py)."""
    policy = GrantPolicy(
        core.archive.catalog,
        clock=lambda: workstation.clock(),  # the workstation's one clock, even when a test moves it
        retrievals=workstation.retrievals,
        node=node_id,
        on_record=lambda: workstation.on_record(),
    )
    policy.install(core.security.study_access)


@dataclass
class Frontend:
    """A running front-end: its archive, DICOM SCP, HTTP service and (if configured) forwarder."""

    cfg: FrontendConfig
    core: NodeCore
    dicom: DicomServer
    http: HttpServer
    forwarder: Forwarder | None = None
    compression: CompressionStage | None = None
    qc: QcService | None = None
    dicom_port: int = 0
    http_port: int = 0
    workstation: Workstation | None = None  # the doctor API (issue 5)

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

    @classmethod
    def start(cls, cfg: FrontendConfig) -> Frontend:
        key: PseudonymKey | None = None
        if cfg.identity.key_file is not None and cfg.identity.key_source == "file":
            try:
                key = load_key(cfg.identity.key_file)
            except (OSError, ValueError) as exc:
                raise ArchiveUnavailable("identity.key_file", str(exc)) from exc
        core = NodeCore.open(
            cfg,
            role="frontend",
            node_id=cfg.security.issuer or default_node_id("frontend", cfg.institution),
            outbox=cfg.forward.center_url is not None,
        )
        try:
            if cfg.identity.key_source == "kms":  # the national key used through the KMS (R-SE-14)
                key = pseudonym_key(cfg, core.kms)
            center_auth = _center_credentials(cfg.forward)
        except ArchiveUnavailable:
            core.close()
            raise
        archive, audit, ingest, spool = core.archive, core.audit, core.ingest, core.spool
        exams = ExamBook(archive.catalog)
        compression = _compression_stage(cfg, archive)
        try:
            qc = QcService.open(cfg.qc, archive) if cfg.qc.enabled else None  # R-QC-1
        except ArchiveUnavailable:
            core.close()
            raise
        forwarder = None
        if cfg.forward.center_url is not None:
            client = DicomWebClient(
                cfg.forward.center_url,
                timeout=cfg.forward.timeout_seconds,
                max_batch_instances=cfg.forward.batch_max_instances,
                max_batch_bytes=cfg.forward.batch_max_mb << 20,
                auth=center_auth,
                verify=center_tls(cfg.forward),
            )
            forwarder = Forwarder(
                archive.catalog,
                archive.store,
                client,
                policy=forward_policy(cfg.forward),
                workers=cfg.forward.workers,
                exams=exams,
                audit=audit,
            )
            if compression is not None:
                forwarder.not_final = compression.waiting
            if qc is not None:
                forwarder.qc = qc.gate
                qc.worker.on_graded = lambda _result, f=forwarder: f.wake()
        node_id = cfg.security.issuer or default_node_id("frontend", cfg.institution)
        try:
            center_peer = client if cfg.forward.center_url is not None else None  # the one HTTP client
            workstation = open_workstation(cfg, core, center_peer, node_id)
        except ArchiveUnavailable:
            core.close()
            raise
        _grant_policy(core, workstation, node_id)
        server = DicomServer(cfg.dicom, ingest, archive.catalog, archive.store, spool, audit=audit)
        app = build_app(
            "frontend",
            archive,
            ingest,
            max_request_bytes=cfg.dicomweb.max_request_mb << 20,
            spool=str(spool),
            api_routes=[*frontend_api, *doctor_api],
            security=core.security,
            extra_routes=[Route("/metrics", metrics)],
            state={
                "forwarder": forwarder,
                "exams": exams,
                "pseudonym_key": key,
                "workstation": workstation,
                "audit": audit,
                "compression": compression,
                "qc": qc,
            },
        )
        http = HttpServer(app, cfg.http.host, cfg.http.port, tls=cfg.http.tls)
        fe = cls(cfg, core, server, http, forwarder, compression)
        fe.qc = qc
        if compression is not None:
            compression.start()
        if qc is not None:
            qc.start()
        fe.dicom_port = server.start()
        fe.http_port = fe.http.start()
        if forwarder is not None:
            forwarder.start()
        fe.workstation = workstation
        workstation.start()
        return fe

    def stop(self) -> None:
        self.dicom.stop()
        if self.compression is not None:
            self.compression.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.qc is not None:
            self.qc.stop()
        if self.workstation is not None:
            self.workstation.stop()
        self.http.stop()
        self.core.close()

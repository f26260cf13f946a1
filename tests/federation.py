"""Helpers for the federation tests (issue 5): a national index, centers with an ``[index]``
link and peers, tiny studies. In-process nodes on free loopback ports, like conftest's."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from gateway.center import Center
from gateway.config import CenterConfig, FrontendConfig, IndexConfig, parse_config
from gateway.frontend import Frontend
from gateway.identity import IdType, person_key
from gateway.security.credentials import write_secret
from index.service import NationalIndex
from tests.conftest import TEST_SECURITY
from tests.peers.ports import free_port

KEY = bytes(range(32))
CST = timezone(timedelta(hours=8))
PERSON = person_key(IdType.RESIDENT_ID, "11010519491231002X", KEY)


def index_record(study: str, at: datetime, **kw: Any) -> dict[str, Any]:
    """A study's national index record (``POST /api/v1/index-records``) for :data:`PERSON`."""
    return {
        "study_uid": study,
        "person_key": PERSON,
        "id_type": "resident-id",
        "exam_time": at.isoformat(),
        "modality": "CT",
        "body_part": "CHEST",
        "exam_item_code": "CT001",
        "exam_item_name": "胸部CT平扫",
        "hospital_code": "H1",
        "hospital_level": "三级甲等",
        "province": "52",
        "center": "urn:ybyx:center:52",
        **kw,
    }


# what a center needs at the index, and what a center needs at another center
CENTER_AT_INDEX = "index:register index:lookup index:retrievals"
CENTER_AT_CENTER = "wado qido api:fetch"


def tiny_study(
    folder: Path, study_uid: str | None = None, *, count: int = 2, modality: str = "CT"
) -> list[Path]:
    """A small study (16x16 slices) written as Part-10 files; returns their paths."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(count):
        ds = Dataset()
        sop = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName = "P1", "TEST^FED"
        ds.StudyDate, ds.StudyTime, ds.Modality = "20251101", "101010", modality
        ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = "A1", 1, n + 1
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (np.arange(256, dtype=np.uint16) * (n + 1)).tobytes()
        path = folder / f"{sop}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def store_study(node: Any, files: list[Path]) -> dict[str, str]:
    """Store files in a node's archive; SOP Instance UID → SHA-256 (a manifest)."""
    manifest = {}
    for f in files:
        result = node.ingest.accept_file(f, source="test")
        manifest[result.sop_uid] = result.sha256
    return manifest


def index_config(
    root: Path, *, db_url: str | None = None, provinces: list[dict[str, str]] | None = None
) -> IndexConfig:
    data: dict[str, Any] = {
        "role": "index",
        "http": {"host": "127.0.0.1", "port": free_port()},
        "database": {"url": db_url or "sqlite:///index.db"},
        "security": dict(TEST_SECURITY),
        "provinces": provinces or [],
    }
    cfg = parse_config(data, "index.toml", root)
    assert isinstance(cfg, IndexConfig)
    return cfg


def index_starter(tmp_path: Path) -> Iterator[Callable[..., NationalIndex]]:
    """For a ``start_index`` fixture: start national indexes, stopped afterwards."""
    started: list[NationalIndex] = []

    def start(**kw: Any) -> NationalIndex:
        idx = NationalIndex.start(index_config(tmp_path / f"index{len(started)}", **kw))
        started.append(idx)
        return idx

    yield start
    for idx in started:
        idx.stop()


def client_at(node: Any, name: str, scopes: str, folder: Path) -> tuple[str, Path]:
    """Register a client at ``node`` and write its secret file: (client id, secret file)."""
    client, secret = node.security.clients.add(name, scopes)
    path = folder / f"{client.client_id}-{uuid.uuid4().hex[:6]}.secret"
    write_secret(path, secret)
    return client.client_id, path


def federated_center_config(
    root: Path,
    *,
    province: str,
    index: NationalIndex | None = None,
    port: int | None = None,
    db_url: str | None = None,
    **sections: Any,
) -> CenterConfig:
    """A center of ``province`` linked to ``index`` (as a client registered there)."""
    root.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "role": "center",
        "province": province,
        "http": {"host": "127.0.0.1", "port": port or free_port()},
        "storage": {"backend": "folder", "path": "blobs"},
        "database": {"url": db_url or "sqlite:///catalog.db"},
        "ingest": {"quarantine": "quarantine"},
        "security": dict(TEST_SECURITY),
        **sections,
    }
    if index is not None:
        cid, secret = client_at(index, f"center-{province}", CENTER_AT_INDEX, root)
        data["index"] = {
            "url": index.url,
            "client_id": cid,
            "client_secret_file": str(secret),
            "retry_initial_seconds": 0.2,
            "retry_max_seconds": 1,
        }
    cfg = parse_config(data, "center.toml", root)
    assert isinstance(cfg, CenterConfig)
    return cfg


def center_starter(tmp_path: Path) -> Iterator[Callable[..., Center]]:
    """For a ``start_fed_center`` fixture: ``start(province, index=…, port=…, **sections)``."""
    started: list[Center] = []

    def start(province: str, **kw: Any) -> Center:
        c = Center.start(
            federated_center_config(tmp_path / f"c{province}-{len(started)}", province=province, **kw)
        )
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def exam_body(
    study_uid: str, person_key: str, *, at: datetime, item: str = "CT001", body_part: str = "CHEST"
) -> dict[str, Any]:
    """An exam record as a front-end forwards it to its center (pseudonym only)."""
    return {
        "hospital_code": "91350100M000100Y43",
        "hospital_level": "三级甲等",
        "accession_number": f"A{uuid.uuid4().hex[:8]}",
        "study_uid": study_uid,
        "id_type": "resident-id",
        "patient_name": "张三",
        "exam_item_code": item,
        "exam_item_name": "胸部CT平扫",
        "body_part": body_part,
        "device": "CT0000000001A",
        "modality": "CT",
        "description": "双肺纹理清晰。",
        "diagnosis": "未见明显异常。",
        "exam_time": at.isoformat(),
        "report_time": at.isoformat(),
        "visit_type": "outpatient",
        "person_key": person_key,
        "id_masked": "1101**********002X",
    }


# What a front-end needs at its center: forwarding plus the federation routes.
FRONTEND_AT_CENTER = " ".join(
    [
        "stow api:inventory api:manifest api:exams",
        "index:lookup index:retrievals api:cache-requests api:fetch wado qido",
    ]
)


def federated_frontend_config(
    root: Path, *, institution: str, center: Center | None = None, **sections: Any
) -> FrontendConfig:
    """A front-end of ``institution`` on free ports, a client of ``center`` (if given)."""
    root.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "role": "frontend",
        "institution": institution,
        "dicom": {"ae_title": "YBYX", "host": "127.0.0.1", "port": free_port(), "allow_any_calling_ae": True},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"backend": "folder", "path": "blobs"},
        "database": {"url": "sqlite:///catalog.db"},
        "ingest": {"quarantine": "quarantine"},
        "security": dict(TEST_SECURITY),
        **sections,
    }
    if center is not None:
        cid, secret = client_at(center, f"frontend-{institution}", FRONTEND_AT_CENTER, root)
        data["forward"] = {
            "center_url": center.url,
            "client_id": cid,
            "client_secret_file": str(secret),
            "settle_seconds": 0.2,
        }
    cfg = parse_config(data, "frontend.toml", root)
    assert isinstance(cfg, FrontendConfig)
    return cfg


def frontend_starter(tmp_path: Path) -> Iterator[Callable[..., Frontend]]:
    """For a ``start_fed_frontend`` fixture: ``start(institution, center=…, **sections)``."""
    started: list[Frontend] = []

    def start(institution: str, **kw: Any) -> Frontend:
        fe = Frontend.start(
            federated_frontend_config(
                tmp_path / f"fe-{institution}-{len(started)}", institution=institution, **kw
            )
        )
        started.append(fe)
        return fe

    yield start
    for fe in started:
        fe.stop()

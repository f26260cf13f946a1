"""The archive end to end over SQLite/PostgreSQL × folder/S3 (SeaweedFS): same behaviour everywhere.

Samples go in by C-STORE, come back by C-GET, are catalogued with hashes that match the stored
bytes, and a second delivery of the same instances changes nothing (issue 2 §4, §6).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dimse.scu import send
from gateway.archive.query import Level
from gateway.frontend import Frontend
from tests.conftest import dcmtk

COMBOS = [
    ("sqlite", "folder"),
    ("sqlite", "s3"),
    ("postgresql", "folder"),
    ("postgresql", "s3"),
    ("sqlite", "folder-sealed"),  # encryption at rest (issue 6 §5, R-SE-10)
    ("postgresql", "s3-sealed"),
]


@pytest.fixture(params=COMBOS, ids=["-".join(c) for c in COMBOS])
def archive_frontend(request: pytest.FixtureRequest, start_frontend: Callable[..., Frontend]) -> Frontend:
    db, blobs = request.param
    db_url = request.getfixturevalue("fresh_pg_url") if db == "postgresql" else None
    s3 = request.getfixturevalue("seaweedfs") if blobs.startswith("s3") else None
    encryption = {"enabled": True} if blobs.endswith("-sealed") else None
    return start_frontend(db_url=db_url, s3=s3, encryption=encryption)


def test_store_query_retrieve_on_every_backend(
    archive_frontend: Frontend, samples: Path, tmp_path: Path
) -> None:
    fe = archive_frontend
    files = sorted(p for p in samples.rglob("*") if p.is_file())
    report = send(files, "127.0.0.1", fe.dicom_port, "YBYX")
    assert report.ok, report.failed
    cat = fe.archive.catalog
    assert cat.counts()["instances"] == len(files)

    for inst in cat.locate({}):
        data = b"".join(fe.archive.store.get(inst.blob_key))
        assert hashlib.sha256(data).hexdigest() == inst.sha256 and len(data) == inst.size

    # metadata JSON ready to serve, with pixel data as a bulk data URI and Chinese text intact
    ct = [r for r in cat.find(Level.STUDY, {"PatientName": "张^三"})]
    assert len(ct) == 1 and ct[0]["NumberOfStudyRelatedInstances"] == 12

    # again: nothing new
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    assert cat.counts()["instances"] == len(files)

    # C-GET the DX study back and compare the pixel bytes
    dx = sorted((samples / "03_DX_chest").iterdir())[0]
    study = str(dcmread(dx, stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "get"
    out.mkdir()
    got = subprocess.run(
        [
            dcmtk("getscu"),
            "-S",
            "-aec",
            "YBYX",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study}",
            "127.0.0.1",
            str(fe.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert got.returncode == 0, got.stderr
    [back] = list(out.iterdir())
    assert dcmread(back).PixelData == dcmread(dx).PixelData


def test_metadata_json_has_no_bulk_data_inline(frontend: Frontend, samples: Path) -> None:
    import json

    from sqlalchemy import select

    from gateway.archive.schema import instances

    dx = sorted((samples / "03_DX_chest").iterdir())[0]
    assert send([dx], "127.0.0.1", frontend.dicom_port, "YBYX").ok
    with frontend.archive.catalog.engine.connect() as conn:
        doc = json.loads(conn.execute(select(instances.c.metadata_json)).scalar_one())
    ds = dcmread(dx, stop_before_pixels=True)
    assert doc["7FE00010"]["BulkDataURI"].endswith(f"instances/{ds.SOPInstanceUID}/bulk/7FE00010")
    assert "InlineBinary" not in io.StringIO(json.dumps(doc)).getvalue()
    assert doc["00100010"]["Value"][0]["Ideographic"] == "王^五"

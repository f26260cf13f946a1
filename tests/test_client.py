"""The one DICOMweb client (dicomweb/client.py) against a live ybyx: QIDO, WADO retrieve, frames."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from pydicom import dcmread

from dicomweb.client import DicomWebClient
from dimse.scu import send
from gateway.frontend import Frontend
from tests.conftest import auth


def test_client_searches_and_retrieves_streamed(frontend: Frontend, samples: Path, tmp_path: Path) -> None:
    files = sorted((samples / "04_XA_coronary").iterdir()) + sorted((samples / "02_MR_brain").iterdir())
    assert send(files, "127.0.0.1", frontend.dicom_port, "YBYX").ok
    client = DicomWebClient(f"http://127.0.0.1:{frontend.http_port}", headers=auth(frontend, "qido wado"))
    try:
        studies = client.search("studies", {"ModalitiesInStudy": "XA"})
        assert len(studies) == 1
        study = studies[0]["0020000D"]["Value"][0]
        [series] = client.search("series", study=study)
        series_uid = series["0020000E"]["Value"][0]
        [inst] = client.search("instances", study=study)
        sop = inst["00080018"]["Value"][0]

        got = client.retrieve(tmp_path / "study", study)
        [stored] = frontend.archive.catalog.locate({"StudyInstanceUID": study})
        assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in got] == [stored.sha256]

        frames = client.frames(tmp_path / "frames", study, series_uid, sop, [5, 1])
        pixels = dcmread(files[0]).pixel_array
        assert [p.read_bytes() for p in frames] == [pixels[4].tobytes(), pixels[0].tobytes()]
        assert np.frombuffer(frames[0].read_bytes(), np.uint8).size == 256 * 256
    finally:
        client.close()

"""Interoperability with a real Orthanc 1.10 (Debian package): C-STORE into ybyx, C-FIND + C-MOVE out of it.

Orthanc runs once per session (``orthanc`` fixture); each test empties it, starts its own ybyx
front-end and registers that front-end as Orthanc's modality ``ybyx`` (its port changes per test).
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from dimse.scu import send
from gateway.archive.query import Level
from gateway.frontend import Frontend
from tests.peers.orthanc import Modality, OrthancPeer, dcmtk_binary, orthanc  # noqa: F401  (session fixture)

CT_FOLDER = "01_CT_chest"  # the GB18030 study of 张三 (Zhang^San=张^三)
LOADER_AE = "LOADER"


def _originals(folder: Path) -> dict[str, tuple[Path, bytes]]:
    """SOP Instance UID -> (file, PixelData bytes) of the sample files in ``folder``."""
    found: dict[str, tuple[Path, bytes]] = {}
    for path in sorted(folder.glob("*.dcm")):
        ds = dcmread(path)
        found[str(ds.SOPInstanceUID)] = (path, bytes(ds.PixelData))
    assert found, f"no sample files in {folder}"
    return found


def _study_uid(folder: Path) -> str:
    return str(dcmread(next(iter(sorted(folder.glob("*.dcm")))), stop_before_pixels=True).StudyInstanceUID)


def _register(peer: OrthancPeer, fe: Frontend) -> None:
    """Make the front-end Orthanc's modality ``ybyx`` (this test's port) and check it answers C-ECHO."""
    peer.set_modality("ybyx", Modality(fe.cfg.dicom.ae_title, "127.0.0.1", fe.dicom_port))
    peer.echo("ybyx")


def test_orthanc_stores_study_into_ybyx(
    orthanc: OrthancPeer,  # noqa: F811  (the session fixture imported above)
    start_frontend: Callable[..., Frontend],
    samples: Path,
) -> None:
    orthanc.clear()
    # Only Orthanc may call this front-end (no "any calling AE"), as in a hospital set-up.
    fe = start_frontend(
        allow_any_calling_ae=False,
        peers=[{"ae_title": orthanc.aet, "institution": "TEST_HOSPITAL", "host": "127.0.0.1"}],
    )
    _register(orthanc, fe)
    folder = samples / CT_FOLDER
    originals = _originals(folder)
    study_uid = _study_uid(folder)
    orthanc.upload_all(path for path, _ in originals.values())
    held = orthanc.sop_instance_uids(study_uid)
    assert set(held) == set(originals)

    result = orthanc.store_to("ybyx", held.values())  # C-STORE SCU, one association
    assert result["InstancesCount"] == len(originals)

    catalogued = fe.archive.catalog.locate({"StudyInstanceUID": study_uid})
    assert {inst.sop_uid for inst in catalogued} == set(originals)
    assert fe.archive.catalog.counts()["instances"] == len(originals)
    for inst in catalogued:
        data = b"".join(fe.archive.store.get(inst.blob_key))
        assert len(data) == inst.size
        assert hashlib.sha256(data).hexdigest() == inst.sha256
        ds = dcmread(BytesIO(data))
        assert ds.SOPInstanceUID == inst.sop_uid
        assert bytes(ds.PixelData) == originals[inst.sop_uid][1]  # pixels passed through untouched
        assert str(ds.PatientName) == "Zhang^San=张^三"

    rows = fe.archive.catalog.find(Level.STUDY, {"StudyInstanceUID": study_uid})
    assert len(rows) == 1
    assert "张^三" in rows[0]["PatientName"]
    assert rows[0]["StudyDescription"] == "胸部CT平扫"
    by_name = fe.archive.catalog.find(Level.STUDY, {"PatientName": "张^三"})
    assert [r["StudyInstanceUID"] for r in by_name] == [study_uid]


def test_orthanc_retrieves_study_from_ybyx_by_cmove(
    orthanc: OrthancPeer,  # noqa: F811  (the session fixture imported above)
    start_frontend: Callable[..., Frontend],
    samples: Path,
) -> None:
    orthanc.clear()
    assert orthanc.count_instances() == 0
    peers = [{"ae_title": ae, "institution": "TEST_HOSPITAL"} for ae in (orthanc.aet, LOADER_AE)]
    fe = start_frontend(
        allow_any_calling_ae=False,
        peers=peers,
        move_destinations=[{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
    )
    # Load every sample study into ybyx with an independent SCU (dcmtk); only the CT study is moved.
    every_file = sorted(samples.rglob("*.dcm"))
    load = subprocess.run(
        [
            dcmtk_binary("storescu"),
            "-aet",
            LOADER_AE,
            "-aec",
            fe.cfg.dicom.ae_title,
            "127.0.0.1",
            str(fe.dicom_port),
            *map(str, every_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert load.returncode == 0, load.stderr
    assert fe.archive.catalog.counts()["instances"] == len(every_file)
    _register(orthanc, fe)  # also what lets ybyx (calling AE YBYX) store into Orthanc

    folder = samples / CT_FOLDER
    originals = _originals(folder)
    study_uid = _study_uid(folder)
    query_id = orthanc.query(
        "ybyx", "Study", {"StudyInstanceUID": study_uid, "PatientName": "", "StudyDescription": ""}
    )
    answers = orthanc.query_answers(query_id)
    assert len(answers) == 1
    assert answers[0]["StudyInstanceUID"] == study_uid
    assert "张^三" in answers[0]["PatientName"]
    assert answers[0]["StudyDescription"] == "胸部CT平扫"

    orthanc.retrieve(query_id)  # C-MOVE to Orthanc itself, synchronous

    held = orthanc.sop_instance_uids(study_uid)
    assert set(held) == set(originals)
    assert orthanc.count_instances() == len(originals)  # the other studies stayed in ybyx
    sop, (_path, pixels) = sorted(originals.items())[len(originals) // 2]
    received = dcmread(BytesIO(orthanc.instance_file(held[sop])))
    assert received.SOPInstanceUID == sop
    assert bytes(received.PixelData) == pixels


def test_orthanc_retrieves_a_jpeg_ls_compressed_study_by_cmove(
    orthanc: OrthancPeer,  # noqa: F811  (the session fixture imported above)
    start_frontend: Callable[..., Frontend],
    samples: Path,
) -> None:
    """R-UP-1: the front-end stores JPEG-LS; Orthanc still gets every instance, pixel-identical."""
    orthanc.clear()
    fe = start_frontend(
        compression={"transfer_syntax": "jpeg-ls"},
        move_destinations=[{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
    )
    folder = samples / CT_FOLDER
    files = sorted(folder.glob("*.dcm"))[:4]
    assert send(files, "127.0.0.1", fe.dicom_port, "LOADER").ok
    stage = fe.compression
    assert stage is not None
    deadline = time.monotonic() + 60
    while stage.backlog():
        assert time.monotonic() < deadline, "compression did not finish"
        time.sleep(0.1)
    study_uid = _study_uid(folder)
    stored = fe.archive.catalog.locate({"StudyInstanceUID": study_uid})
    assert {i.transfer_syntax for i in stored} == {JPEGLSLossless}
    _register(orthanc, fe)

    query_id = orthanc.query("ybyx", "Study", {"StudyInstanceUID": study_uid})
    orthanc.retrieve(query_id)  # C-MOVE to Orthanc itself, synchronous

    held = orthanc.sop_instance_uids(study_uid)
    sent = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, files)}
    assert set(held) == set(sent)
    for sop, instance_id in held.items():
        received = dcmread(BytesIO(orthanc.instance_file(instance_id)))
        syntax = received.file_meta.TransferSyntaxUID
        assert syntax in (JPEGLSLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian), syntax
        assert np.array_equal(pixel_array(received), pixel_array(sent[sop]))

"""Interoperability with Orthanc 1.10's DICOMweb plugin (Debian ``orthanc-dicomweb``) as a client of ybyx.

Orthanc runs once per session (``orthanc`` fixture); each test empties it, starts its own ybyx
sharing center (folder + SQLite, DICOMweb at ``{url}/dicom-web``) and registers that center as the
plugin's DICOMweb server ``ybyx`` (``PUT /dicom-web/servers/ybyx``; the port changes per test).
Then Orthanc, not our own client, does the talking (issue 3, "Tests that must exist"):

* pull: ``/dicom-web/servers/ybyx/retrieve`` — WADO-RS study retrieve into Orthanc;
* push: ``/dicom-web/servers/ybyx/stow`` — STOW-RS of an Orthanc study into ybyx;
* query: ``/dicom-web/servers/ybyx/qido`` — QIDO-RS study search by PatientID.

Instances are put into the center with its ingest (the domain entry point behind C-STORE and
STOW-RS), so the pull and query tests depend on no ybyx HTTP route but the ones Orthanc calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from gateway.center import Center
from gateway.ingest import Accepted
from gateway.sample import LI_SI, ZHANG_SAN
from tests.conftest import auth
from tests.peers.orthanc import OrthancError, OrthancPeer, orthanc  # noqa: F401  (session fixture)

SERVER = "ybyx"  # the name of ybyx in Orthanc's list of DICOMweb servers


@pytest.fixture
def center(start_center: Callable[..., Center]) -> Center:
    """A ybyx sharing center on SQLite + folder, on a free loopback port (stopped after the test)."""
    return start_center()


def _originals(folder: Path) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID -> (PatientName, PixelData bytes) of the sample files in ``folder``."""
    found: dict[str, tuple[str, bytes]] = {}
    for path in sorted(folder.glob("*.dcm")):
        ds = dcmread(path)
        found[str(ds.SOPInstanceUID)] = (str(ds.PatientName), bytes(ds.PixelData))
    assert found, f"no sample files in {folder}"
    return found


def _study_uid(folder: Path) -> str:
    return str(dcmread(next(iter(sorted(folder.glob("*.dcm")))), stop_before_pixels=True).StudyInstanceUID)


def _load(center: Center, files: list[Path]) -> None:
    """Put files into the center's archive through its ingest; every one must be accepted."""
    for path in files:
        outcome = center.ingest.accept_file(path, source="LOADER")
        assert isinstance(outcome, Accepted), f"{path}: {outcome}"
    assert center.archive.catalog.counts()["instances"] == len(files)


def _register(peer: OrthancPeer, center: Center) -> None:
    # Orthanc cannot do OAuth itself: it is given a token from the center's endpoint (issue 6 §1)
    peer.set_dicomweb_server(SERVER, f"{center.url}/dicom-web", auth(center, "stow qido wado"))


def _value(answer: dict[str, Any], tag: str) -> Any:
    """A value of a QIDO answer as the plugin reformats it (a string, or a list for several)."""
    value = answer.get(tag, {}).get("Value")
    return value[0] if isinstance(value, list) and len(value) == 1 else value


@pytest.mark.parametrize("folder_name", ["01_CT_chest", "04_XA_coronary"])
def test_orthanc_pulls_a_study_from_ybyx_by_wado_rs(
    orthanc: OrthancPeer,  # noqa: F811  (the session fixture imported above)
    center: Center,
    samples: Path,
    folder_name: str,
) -> None:
    """12 single-frame GB18030 CT slices, and one 10-frame XA cine: every instance, same pixels."""
    orthanc.clear()
    _load(center, sorted(samples.rglob("*.dcm")))  # all five studies; one is pulled
    folder = samples / folder_name
    originals = _originals(folder)
    study_uid = _study_uid(folder)
    _register(orthanc, center)

    result = orthanc.dicomweb_retrieve(SERVER, study_uid)

    assert int(result["ReceivedInstancesCount"]) == len(originals)
    held = orthanc.sop_instance_uids(study_uid)
    assert set(held) == set(originals)
    assert orthanc.count_instances() == len(originals)  # nothing else came along
    for sop, orthanc_id in held.items():
        received = dcmread(BytesIO(orthanc.instance_file(orthanc_id)))
        name, pixels = originals[sop]
        assert received.SOPInstanceUID == sop
        assert bytes(received.PixelData) == pixels
        assert str(received.PatientName) == name  # e.g. Zhang^San=张^三 from GB18030


def test_orthanc_pushes_a_study_to_ybyx_by_stow_rs(
    orthanc: OrthancPeer,  # noqa: F811  (the session fixture imported above)
    center: Center,
    samples: Path,
) -> None:
    orthanc.clear()
    folder = samples / "01_CT_chest"
    originals = _originals(folder)
    study_uid = _study_uid(folder)
    orthanc.upload_all(sorted(folder.glob("*.dcm")))
    held = orthanc.sop_instance_uids(study_uid)
    assert set(held) == set(originals)
    _register(orthanc, center)

    result = orthanc.dicomweb_stow(SERVER, [orthanc.study_id(study_uid)])

    assert int(result["InstancesCount"]) == len(originals)
    catalogued = center.archive.catalog.locate({"StudyInstanceUID": study_uid})
    assert sorted(inst.sop_uid for inst in catalogued) == sorted(originals)
    assert center.archive.catalog.counts()["instances"] == len(originals)
    for inst in catalogued:
        stored = b"".join(center.archive.store.get(inst.blob_key))
        assert len(stored) == inst.size
        assert hashlib.sha256(stored).hexdigest() == inst.sha256
        # the bytes ybyx holds are the very bytes Orthanc holds (and sent)
        assert hashlib.sha256(orthanc.instance_file(held[inst.sop_uid])).hexdigest() == inst.sha256
        ds = dcmread(BytesIO(stored))
        assert bytes(ds.PixelData) == originals[inst.sop_uid][1]
        assert str(ds.PatientName) == ZHANG_SAN.name


def test_orthanc_finds_a_study_in_ybyx_by_qido_rs(
    orthanc: OrthancPeer,  # noqa: F811  (the session fixture imported above)
    center: Center,
    samples: Path,
) -> None:
    orthanc.clear()
    files = sorted(samples.rglob("*.dcm"))
    _load(center, files)
    _register(orthanc, center)
    ct_uid = _study_uid(samples / "01_CT_chest")
    ct_first = sorted((samples / "01_CT_chest").glob("*.dcm"))[0]
    ct_date = str(dcmread(ct_first, stop_before_pixels=True).StudyDate)

    answers = orthanc.dicomweb_qido(SERVER, "/studies", {"PatientID": ZHANG_SAN.patient_id})

    assert [_value(a, "0020000D") for a in answers] == [ct_uid]
    [study] = answers
    assert _value(study, "00100020") == ZHANG_SAN.patient_id
    assert _value(study, "00080061") == "CT"  # ModalitiesInStudy
    assert _value(study, "00100010") == "Zhang^San"  # the plugin shows a PN's Alphabetic group only
    assert _value(study, "00080020") == ct_date
    # (NumberOfStudyRelatedInstances is there too, but plugin 1.7 turns the JSON number of an IS
    # value into null in this reformatted answer; ybyx's QIDO tests check the counts.)
    assert str(_value(study, "00081190")).endswith(f"/dicom-web/studies/{ct_uid}")  # RetrieveURL
    # another patient's study, and nobody's
    [mr] = orthanc.dicomweb_qido(SERVER, "/studies", {"PatientID": LI_SI.patient_id})
    assert _value(mr, "0020000D") == _study_uid(samples / "02_MR_brain")
    assert orthanc.dicomweb_qido(SERVER, "/studies", {"PatientID": "NOBODY"}) == []
    assert orthanc.count_instances() == 0  # a query moves nothing

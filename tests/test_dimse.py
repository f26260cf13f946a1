"""The DIMSE front door against dcmtk peers: echo, store in every transfer syntax, find, move, get.

Issue 2 §5 and "Tests that must exist". Files are converted to each transfer syntax with dcmtk's
own tools (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle) and pydicom + openjpeg for JPEG 2000; each must be
stored bit for bit (SHA-256 of the stored blob equals the sent file's).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]
from sqlalchemy import delete

from dimse.scu import send
from gateway.archive.query import Level
from gateway.archive.schema import data_keys
from gateway.frontend import Frontend
from gateway.sample import write_samples
from tests.conftest import dcmtk
from tests.federation import tiny_study
from tests.peers.ports import free_port


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_sha(fe: Frontend, sop_uid: str) -> tuple[str, str]:
    [inst] = fe.archive.catalog.locate({"SOPInstanceUID": sop_uid})
    digest = hashlib.sha256(b"".join(fe.archive.store.get(inst.blob_key))).hexdigest()
    assert digest == inst.sha256, "blob does not match the catalogued hash"
    return inst.sha256, inst.transfer_syntax


def first(samples: Path, folder: str) -> Path:
    return sorted((samples / folder).iterdir())[0]


def run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def _pydicom_j2k(src: Path, dst: Path, ts: str, **kw: object) -> None:
    ds = dcmread(src)
    ds.compress(JPEG2000Lossless if ts == HTJ2KLossless else ts, **kw)  # type: ignore[arg-type]
    if ts == HTJ2KLossless:
        # No HTJ2K encoder exists on PyPI; a Part 1 (J2K) codestream is a valid HTJ2K-labelled
        # payload for the SCP, which stores compressed data as is without decoding it.
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.save_as(dst, enforce_file_format=True)


# transfer syntax name -> (sample folder, how to make it)
CONVERSIONS: dict[str, tuple[str, list[str] | str]] = {
    "1.2.840.10008.1.2": ("01_CT_chest", ["dcmconv", "+ti"]),
    "1.2.840.10008.1.2.1": ("01_CT_chest", ["dcmconv", "+te"]),
    "1.2.840.10008.1.2.1.99": ("02_MR_brain", ["dcmconv", "+td"]),
    "1.2.840.10008.1.2.2": ("01_CT_chest", ["dcmconv", "+tb"]),
    "1.2.840.10008.1.2.4.50": ("04_XA_coronary", ["dcmcjpeg", "+eb"]),
    "1.2.840.10008.1.2.4.51": ("03_DX_chest", ["dcmcjpeg", "+ee"]),
    "1.2.840.10008.1.2.4.57": ("02_MR_brain", ["dcmcjpeg", "+el"]),
    "1.2.840.10008.1.2.4.70": ("01_CT_chest", ["dcmcjpeg", "+e1"]),
    "1.2.840.10008.1.2.4.80": ("01_CT_chest", ["dcmcjpls", "+el"]),
    "1.2.840.10008.1.2.4.81": ("02_MR_brain", ["dcmcjpls", "+en"]),
    "1.2.840.10008.1.2.5": ("05_US_carotid", ["dcmcrle"]),
    "1.2.840.10008.1.2.4.90": ("01_CT_chest", "pydicom"),
    "1.2.840.10008.1.2.4.91": ("02_MR_brain", "pydicom"),
    "1.2.840.10008.1.2.4.201": ("01_CT_chest", "pydicom"),
}


# storescu proposes the uncompressed syntaxes plus the one named by an -x option (and converts the
# file to whatever was accepted); the SCP takes the requestor's first choice.
STORESCU_OPTIONS = {
    ImplicitVRLittleEndian: ["-xi"],
    ExplicitVRLittleEndian: ["-xe"],
    DeflatedExplicitVRLittleEndian: ["-xd"],
    ExplicitVRBigEndian: ["-xb"],
    JPEGBaseline8Bit: ["-xy"],
    JPEGExtended12Bit: ["-xx"],
    JPEGLosslessSV1: ["-xs"],
    JPEGLSLossless: ["-xt"],
    JPEGLSNearLossless: ["-xu"],
    JPEG2000Lossless: ["-xv"],
    JPEG2000: ["-xw"],
}
# dcmtk 3.6.7 (Debian 12) has no option for these (and does not know the HTJ2K UIDs): pynetdicom.
PYNETDICOM_SENT = {JPEGLossless, RLELossless, HTJ2KLossless}


@pytest.fixture(scope="module")
def encoded(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("encoded")
    files: dict[str, Path] = {}
    for ts, (folder, how) in CONVERSIONS.items():
        src, dst = first(samples, folder), out / f"{ts}.dcm"
        if how == "pydicom":
            kw: dict[str, object] = {"j2k_psnr": [80]} if ts == JPEG2000 else {}
            _pydicom_j2k(src, dst, ts, **kw)
        else:
            done = run(dcmtk(how[0]), *how[1:], str(src), str(dst))
            assert done.returncode == 0, done.stderr
        assert str(dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
        files[ts] = dst
    return files


def test_echo(frontend: Frontend) -> None:
    done = run(dcmtk("echoscu"), "-aec", "YBYX", "127.0.0.1", str(frontend.dicom_port))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("ts", list(CONVERSIONS))
def test_storescu_each_transfer_syntax_is_stored_bit_exact(
    frontend: Frontend, encoded: dict[str, Path], ts: str
) -> None:
    path = encoded[ts]
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    if ts in PYNETDICOM_SENT:
        report = send([path], "127.0.0.1", frontend.dicom_port, "YBYX", calling_ae="PYNETDICOM")
        assert report.ok, report.failed
    else:
        opts = STORESCU_OPTIONS[UID(ts)]
        done = run(dcmtk("storescu"), *opts, "-aec", "YBYX", "127.0.0.1", str(frontend.dicom_port), str(path))
        assert done.returncode == 0, done.stderr + done.stdout
    digest, stored_ts = stored_sha(frontend, sop)
    assert stored_ts == ts, f"stored as {UID(stored_ts).name}"
    # The catalogue hash is the hash of what is on disk; the file carries the sender's
    # file meta (pynetdicom writes the meta group), so compare the data set bytes after it.
    assert digest == stored_sha(frontend, sop)[0]
    sent = dcmread(path)
    [inst] = frontend.archive.catalog.locate({"SOPInstanceUID": sop})
    import io

    got = dcmread(io.BytesIO(b"".join(frontend.archive.store.get(inst.blob_key))))
    assert got.PixelData == sent.PixelData, "pixel data changed on the way"
    assert got.PatientName == sent.PatientName


def test_whole_sample_set_by_storescu_keeps_chinese_names(frontend: Frontend, samples: Path) -> None:
    done = run(
        dcmtk("storescu"),
        "-R",
        "+sd",
        "+r",
        "-aec",
        "YBYX",
        "127.0.0.1",
        str(frontend.dicom_port),
        str(samples),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    n_files = sum(1 for p in samples.rglob("*") if p.is_file())
    assert frontend.archive.catalog.counts()["instances"] == n_files
    names = {r["PatientName"] for r in frontend.archive.catalog.find(Level.STUDY, {})}
    assert "Zhang^San=张^三" in names  # GB18030 source
    assert any("李^四" in n for n in names)  # ISO_IR 192 source


def findscu(fe: Frontend, out: Path, level: str, *keys: str) -> list[dict[str, str]]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [
        dcmtk("findscu"),
        "-S",
        "-X",
        "-od",
        str(out),
        "-aec",
        "YBYX",
        "-k",
        f"QueryRetrieveLevel={level}",
    ]
    for k in keys:
        args += ["-k", k]
    done = run(*args, "127.0.0.1", str(fe.dicom_port))
    assert done.returncode == 0, done.stderr
    rows = []
    for rsp in sorted(out.glob("rsp*.dcm")):
        ds = dcmread(rsp)
        rows.append({e.keyword: str(e.value) for e in ds if e.keyword})
    return rows


@pytest.fixture
def loaded(frontend: Frontend, samples: Path) -> Frontend:
    report = send(
        sorted(p for p in samples.rglob("*") if p.is_file()), "127.0.0.1", frontend.dicom_port, "YBYX"
    )
    assert report.ok, report.failed
    return frontend


def test_findscu_at_three_levels_with_wildcards_and_dates(loaded: Frontend, tmp_path: Path) -> None:
    studies = findscu(
        loaded,
        tmp_path,
        "STUDY",
        "PatientName=Zhang*",
        "StudyInstanceUID=",
        "StudyDate=",
        "ModalitiesInStudy=",
        "NumberOfStudyRelatedInstances=",
    )
    assert len(studies) == 1
    ct = studies[0]
    assert ct["ModalitiesInStudy"] == "CT" and ct["NumberOfStudyRelatedInstances"] == "12"
    assert "张^三" in ct["PatientName"]

    all_studies = findscu(loaded, tmp_path, "STUDY", "StudyInstanceUID=", "StudyDate=")
    assert len(all_studies) == 5
    dates = sorted(r["StudyDate"] for r in all_studies)
    window = f"{dates[1]}-{dates[3]}"
    in_window = findscu(loaded, tmp_path, "STUDY", f"StudyDate={window}", "StudyInstanceUID=")
    assert len(in_window) == sum(1 for d in dates if dates[1] <= d <= dates[3])

    series = findscu(
        loaded,
        tmp_path,
        "SERIES",
        f"StudyInstanceUID={ct['StudyInstanceUID']}",
        "SeriesInstanceUID=",
        "Modality=C?",
        "NumberOfSeriesRelatedInstances=",
    )
    assert [s["NumberOfSeriesRelatedInstances"] for s in series] == ["12"]

    images = findscu(
        loaded,
        tmp_path,
        "IMAGE",
        f"SeriesInstanceUID={series[0]['SeriesInstanceUID']}",
        "SOPInstanceUID=",
        "InstanceNumber=",
    )
    assert sorted(int(i["InstanceNumber"]) for i in images) == list(range(1, 13))

    assert findscu(loaded, tmp_path, "STUDY", "PatientName=Nobody*", "StudyInstanceUID=") == []


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(out), "+B", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while run(dcmtk("echoscu"), "-aec", "STORESCP", "127.0.0.1", str(port)).returncode != 0:
        assert time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.1)
    yield port, out
    proc.terminate()
    proc.wait(10)


def _sop_pixels(folder: Path) -> dict[str, bytes]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            ds = dcmread(p)
            out[str(ds.SOPInstanceUID)] = ds.PixelData
    return out


def test_movescu_to_storescp(start_frontend, samples: Path, storescp: tuple[int, Path]) -> None:  # type: ignore[no-untyped-def]
    port, out = storescp
    fe = start_frontend(move_destinations=[{"ae_title": "STORESCP", "host": "127.0.0.1", "port": port}])
    ct = samples / "01_CT_chest"
    assert send(sorted(ct.iterdir()), "127.0.0.1", fe.dicom_port, "YBYX").ok
    study = str(dcmread(next(ct.iterdir()), stop_before_pixels=True).StudyInstanceUID)
    done = run(
        dcmtk("movescu"),
        "-S",
        "-aec",
        "YBYX",
        "-aem",
        "STORESCP",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "127.0.0.1",
        str(fe.dicom_port),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert _sop_pixels(out) == _sop_pixels(ct)

    unknown = run(
        dcmtk("movescu"),
        "-v",
        "-S",
        "-aec",
        "YBYX",
        "-aem",
        "NOWHERE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "127.0.0.1",
        str(fe.dicom_port),
    )
    assert "Refused: MoveDestinationUnknown" in unknown.stderr


def test_getscu_retrieves_a_series(loaded: Frontend, samples: Path, tmp_path: Path) -> None:
    mr = samples / "02_MR_brain"
    series = str(dcmread(next(mr.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    out = tmp_path / "get"
    out.mkdir()
    done = run(
        dcmtk("getscu"),
        "-S",
        "-aec",
        "YBYX",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"SeriesInstanceUID={series}",
        "127.0.0.1",
        str(loaded.dicom_port),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert _sop_pixels(out) == _sop_pixels(mr)


def test_spool_is_left_empty(loaded: Frontend) -> None:
    spool = loaded.cfg.storage.path / ".spool"
    assert [p for p in spool.iterdir()] == []
    shutil.rmtree(spool)  # the next start recreates it


def test_retrieve_without_the_unique_key_is_refused_not_everything(loaded: Frontend, tmp_path: Path) -> None:
    out = tmp_path / "get"
    out.mkdir()
    done = run(
        dcmtk("getscu"),
        "-v",
        "-S",
        "-aec",
        "YBYX",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID=",
        "127.0.0.1",
        str(loaded.dicom_port),
        timeout=60,
    )
    assert list(out.iterdir()) == []
    assert "0xa900" in (done.stdout + done.stderr).lower() or "Failed" in done.stdout + done.stderr


# ---- retrieving compressed instances (R-UP-1): as stored if accepted, else decoded -------------


@contextmanager
def _storescp(out: Path, aet: str, *options: str) -> Iterator[int]:
    """A dcmtk storescp writing what it receives (in the received transfer syntax) to ``out``."""
    port = free_port()
    out.mkdir()
    proc = subprocess.Popen(
        [dcmtk("storescp"), *options, "-aet", aet, "-od", str(out), "+B", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while run(dcmtk("echoscu"), "-aec", aet, "127.0.0.1", str(port)).returncode != 0:
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _compressed_frontend(start, root: Path, **dicom: object) -> tuple[Frontend, dict[str, list[Path]]]:  # type: ignore[no-untyped-def]
    """A JPEG-LS front-end holding a small CT (16-bit signed) and an RGB US study, compressed."""
    write_samples(root, ct_slices=2)
    studies = {name: sorted((root / name).glob("*.dcm")) for name in ("01_CT_chest", "05_US_carotid")}
    fe = start(compression={"transfer_syntax": "jpeg-ls"}, **dicom)
    assert send([p for files in studies.values() for p in files], "127.0.0.1", fe.dicom_port, "YBYX").ok
    stage = fe.compression
    assert stage is not None
    deadline = time.monotonic() + 60
    while stage.backlog():
        assert time.monotonic() < deadline, "compression did not finish"
        time.sleep(0.1)
    stored = {i.sop_uid: i.transfer_syntax for i in fe.archive.catalog.locate({})}
    assert set(stored.values()) == {JPEGLSLossless}, stored  # every instance is now stored as JPEG-LS
    return fe, studies


def _study(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _assert_same_pixels(received_in: Path, originals: list[Path], syntax: str) -> None:
    """Every original arrived once, in ``syntax``, and decodes to the very same pixels."""
    received = {
        str(ds.SOPInstanceUID): ds for ds in map(dcmread, (p for p in received_in.rglob("*") if p.is_file()))
    }
    sent = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, originals)}
    assert set(received) == set(sent)
    for sop, ds in received.items():
        assert ds.file_meta.TransferSyntaxUID == syntax, (sop, ds.file_meta.TransferSyntaxUID)
        got, want = pixel_array(ds), pixel_array(sent[sop])
        assert got.dtype == want.dtype and np.array_equal(got, want), sop
        assert ds.PatientName == sent[sop].PatientName


# storescp/getscu option -> the transfer syntax the instances must arrive in
PEER_SYNTAXES = {
    "": ExplicitVRLittleEndian,  # dcmtk's default: uncompressed only, explicit VR preferred
    "+xi": ImplicitVRLittleEndian,  # implicit VR little endian only
    "+xt": JPEGLSLossless,  # JPEG-LS lossless preferred: sent as stored
}


def test_movescu_of_jpeg_ls_data_to_peers_with_and_without_jpeg_ls(start_frontend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with contextlib.ExitStack() as peers:
        ports = [
            peers.enter_context(_storescp(tmp_path / f"scp{n}", f"SCP{n}", *filter(None, [opt])))
            for n, opt in enumerate(PEER_SYNTAXES)
        ]
        destinations = [{"ae_title": f"SCP{n}", "host": "127.0.0.1", "port": p} for n, p in enumerate(ports)]
        fe, studies = _compressed_frontend(start_frontend, tmp_path / "sent", move_destinations=destinations)
        for n, opt in enumerate(PEER_SYNTAXES):
            for files in studies.values():
                done = run(
                    dcmtk("movescu"),
                    "-S",
                    "-aec",
                    "YBYX",
                    "-aem",
                    f"SCP{n}",
                    "-k",
                    "QueryRetrieveLevel=STUDY",
                    "-k",
                    f"StudyInstanceUID={_study(files)}",
                    "127.0.0.1",
                    str(fe.dicom_port),
                    timeout=60,
                )
                assert done.returncode == 0 and "Failed" not in done.stderr, done.stderr
            everything = [p for files in studies.values() for p in files]
            _assert_same_pixels(tmp_path / f"scp{n}", everything, PEER_SYNTAXES[opt])


def test_getscu_of_jpeg_ls_data_with_and_without_jpeg_ls(start_frontend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fe, studies = _compressed_frontend(start_frontend, tmp_path / "sent")
    # getscu proposes Explicit VR Little Endian alone for storage by default, and JPEG-LS lossless
    # first with +xt (its +xi is about the query context: the implicit case is storescp's above)
    for opt in ("", "+xt"):
        syntax = PEER_SYNTAXES[opt]
        out = tmp_path / f"get{opt or '-default'}"
        out.mkdir()
        for files in studies.values():
            done = run(
                dcmtk("getscu"),
                *filter(None, [opt]),
                "+B",  # bit-preserving: the files are written in the transfer syntax received
                "-S",
                "-aec",
                "YBYX",
                "-od",
                str(out),
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={_study(files)}",
                "127.0.0.1",
                str(fe.dicom_port),
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
        _assert_same_pixels(out, [p for files in studies.values() for p in files], syntax)


# ---- an instance that can never be read: the others are still retrieved ------------------------


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.parametrize("damage", ["blob deleted", "data key destroyed"])
@pytest.mark.parametrize("service", ["C-GET", "C-MOVE"])
def test_an_unreadable_instance_fails_its_sub_operation_and_the_rest_are_sent(  # type: ignore[no-untyped-def]
    start_frontend, storescp: tuple[int, Path], tmp_path: Path, service: str, damage: str
) -> None:
    """One instance of a series has lost its blob, or (sealed store) its data key (crypto-shredding,
    R-SE-10): every other instance is delivered, that one is one failed sub-operation, and the
    final response says so (B000, its UID in the Failed SOP Instance UID List) — before, the first
    such instance ended the whole retrieve with A702 and nothing after it was sent."""
    port, out = storescp
    fe = start_frontend(
        move_destinations=[{"ae_title": "STORESCP", "host": "127.0.0.1", "port": port}],
        encryption={"enabled": True} if damage == "data key destroyed" else None,
    )
    files = tiny_study(tmp_path / "study", count=5)
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    series = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    lost = _sop_uid(files[2])
    [located] = fe.archive.catalog.locate({"SOPInstanceUID": lost})
    if damage == "blob deleted":
        fe.archive.store.local_path(located.blob_key).unlink()
    else:
        with fe.archive.catalog.write() as conn:
            gone = conn.execute(delete(data_keys).where(data_keys.c.blob_key == located.blob_key))
        assert gone.rowcount == 1
        fe.archive.store.forget_cached_keys()

    query = ["-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={series}"]
    if service == "C-GET":
        received = tmp_path / "get"
        received.mkdir()
        done = run(dcmtk("getscu"), "-d", "-S", "-aec", "YBYX", "-od", str(received), *query,
                   "127.0.0.1", str(fe.dicom_port), timeout=60)  # fmt: skip
    else:
        received = out
        done = run(dcmtk("movescu"), "-d", "-S", "-aec", "YBYX", "-aem", "STORESCP", *query,
                   "127.0.0.1", str(fe.dicom_port), timeout=60)  # fmt: skip
    log = done.stdout + done.stderr
    got = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.rglob("*") if p.is_file()
    }
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert got == sent - {lost}, log
    assert "Warning: SubOperationsCompleteOneOrMoreFailures" in log, log  # status B000
    if service == "C-GET":
        assert "Number of Completed Suboperations : 4" in log, log
        assert "Number of Failed Suboperations    : 1" in log, log
    else:  # dcmtk does not print the list: ask again, as a pynetdicom SCU
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", fe.dicom_port, ae_title="YBYX")
        assert assoc.is_established
        try:
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "SERIES"
            identifier.SeriesInstanceUID = series
            answers = list(
                assoc.send_c_move(identifier, "STORESCP", StudyRootQueryRetrieveInformationModelMove)
            )
        finally:
            assoc.release()
        status, final = answers[-1]
        assert status.Status == 0xB000
        assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (4, 1)
        assert final is not None
        assert final["FailedSOPInstanceUIDList"].value == lost  # one value: VM 1


def test_many_short_associations_leave_nothing_behind(  # type: ignore[no-untyped-def]
    start_frontend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One image per association, as many modalities send. pynetdicom's server forces a full
    ``gc.collect()`` every 60 turns of its loop — in a node, a ~100 ms stall of every association
    and HTTP request (``dimse/server.py`` ``_NoDelayServer.service_actions``). After 70 of them none
    was forced, and every finished association is freed by Python's own collector: nothing keeps
    them."""
    fe = start_frontend()
    forced: list[str] = []
    collect = gc.collect

    def counting(*args: Any, **kwargs: Any) -> int:
        if threading.current_thread().name == "dimse-scp":
            forced.append("gc.collect")
        return collect(*args, **kwargs)

    monkeypatch.setattr(gc, "collect", counting)
    files = tiny_study(tmp_path / "study", count=70)
    for path in files:
        assert send([path], "127.0.0.1", fe.dicom_port, "YBYX").ok
    assert fe.archive.catalog.counts()["instances"] == 70
    assert forced == []

    deadline = time.monotonic() + 10
    while fe.dicom._server and fe.dicom._server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    collect()
    served = [o for o in gc.get_objects() if isinstance(o, Association) and o.is_acceptor]
    assert served == []

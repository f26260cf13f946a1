"""WADO-RS against a live front-end over real HTTP (issue 3 §4, PS3.18 §10.4).

One front-end per module holds the demo sample set (stored over DIMSE, uncompressed) plus copies
under new UIDs stored compressed: a 3-slice CT and the 10-frame XA in JPEG-LS lossless (dcmtk's
``dcmcjpls``), a CT slice in JPEG 2000 lossless (pydicom + openjpeg), an MR slice in Implicit VR
and a MONOCHROME1 copy of the DX. dicomweb-client drives every resource; raw httpx checks the
finer points (exact bytes, media types, status codes and their messages).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless
from sqlalchemy import event, select

from dicomweb.multipart import MultipartParser, PartData, PartEnd, PartStart, parse_content_type
from dicomweb.render import Window, apply_window, grayscale
from dimse.scu import send
from gateway.archive.schema import instances
from gateway.frontend import Frontend
from gateway.ingest import Accepted
from tests.conftest import auth, dcmtk, frontend_config

ROOT = "1.2.826.0.1.3680043.8.498.77"
JLS_PART = f'multipart/related; type="application/dicom"; transfer-syntax={JPEGLSLossless}'
STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
OCTET = 'multipart/related; type="application/octet-stream"'
BIG_OB = bytes(range(256)) * 8  # 2 KiB: above the 1 KiB bulk data threshold of the metadata


@dataclass(frozen=True)
class Study:
    """One stored study: its UIDs and the source files (the uncompressed originals)."""

    uid: str
    series: str
    sops: list[str]
    originals: dict[str, Path]  # SOP UID -> uncompressed file with the same pixels


@dataclass(frozen=True)
class Loaded:
    fe: Frontend
    url: str
    studies: dict[str, Study]
    auth: dict[str, str]  # a bearer token with the wado and qido scopes

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.url, headers=self.auth)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        headers = {**self.auth, **kw.pop("headers", {})}
        return httpx.get(f"{self.url}/{path}", timeout=60, headers=headers, **kw)

    def instance_path(self, name: str, index: int = 0) -> str:
        s = self.studies[name]
        return f"studies/{s.uid}/series/{s.series}/instances/{s.sops[index]}"


def parts(rsp: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The (headers, body) parts of a multipart/related response, with our own parser."""
    media_type, params = parse_content_type(rsp.headers["content-type"])
    assert media_type == "multipart/related", rsp.headers["content-type"]
    parser = MultipartParser(params["boundary"])
    out: list[tuple[dict[str, str], bytes]] = []
    body = bytearray()
    headers: dict[str, str] = {}
    for ev in parser.feed(rsp.content):
        if isinstance(ev, PartStart):
            headers, body = ev.headers, bytearray()
        elif isinstance(ev, PartData):
            body += ev.data
        elif isinstance(ev, PartEnd):
            out.append((headers, bytes(body)))
    parser.finish()
    return out


def _copy(src: Path, dst: Path, study: str, series: str, sop: str, **attrs: Any) -> Path:
    ds = dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _run(*cmd: str) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _variant(
    out: Path, n: int, sources: list[Path], encode: str | None, **attrs: Any
) -> tuple[Study, list[Path]]:
    """Copies of ``sources`` under a new study/series, encoded by ``encode`` (None: as is)."""
    study, series = f"{ROOT}.{n}", f"{ROOT}.{n}.1"
    sops, originals, files = [], {}, []
    for i, src in enumerate(sources, start=1):
        sop = f"{ROOT}.{n}.1.{i}"
        plain = _copy(src, out / f"v{n}_{i}_plain.dcm", study, series, sop, **attrs)
        dst = out / f"v{n}_{i}.dcm"
        if encode in ("jls", "jls-no-bot"):
            # -ot: an empty Basic Offset Table, so frames are found by scanning fragments
            _run(dcmtk("dcmcjpls"), "+el", *(["-ot"] if encode == "jls-no-bot" else []), str(plain), str(dst))
        elif encode == "j2k":
            ds = dcmread(plain)
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
            ds.save_as(dst, enforce_file_format=True)
        elif encode == "implicit":
            _run(dcmtk("dcmconv"), "+ti", str(plain), str(dst))
        else:
            dst = plain
        sops.append(sop)
        originals[sop] = plain
        files.append(dst)
    return Study(study, series, sops, originals), files


def _sample_study(files: list[Path]) -> Study:
    headers = [(dcmread(f, stop_before_pixels=True), f) for f in files]
    first = headers[0][0]
    return Study(
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        [str(h.SOPInstanceUID) for h, _ in headers],
        {str(h.SOPInstanceUID): f for h, f in headers},
    )


@pytest.fixture(scope="module")
def loaded(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    out = tmp_path_factory.mktemp("wado")
    fe = Frontend.start(frontend_config(out / "fe"))
    try:
        studies: dict[str, Study] = {}
        files: list[Path] = []
        for name, folder in (("ct", "01_CT_chest"), ("mr", "02_MR_brain"), ("dx", "03_DX_chest")):
            found = sorted((samples / folder).iterdir())
            studies[name] = _sample_study(found)
            files += found
        for name, folder in (("xa", "04_XA_coronary"), ("us", "05_US_carotid")):
            found = sorted((samples / folder).iterdir())
            studies[name] = _sample_study(found)
            files += found
        ct = sorted((samples / "01_CT_chest").iterdir())
        variants: dict[str, tuple[int, list[Path], str | None, dict[str, Any]]] = {
            "ct_jls": (1, ct[:3], "jls", {}),
            "xa_jls": (2, sorted((samples / "04_XA_coronary").iterdir()), "jls", {}),
            "xa_jls_no_bot": (7, sorted((samples / "04_XA_coronary").iterdir()), "jls-no-bot", {}),
            "ct_j2k": (3, ct[5:6], "j2k", {}),
            "ct_bulk": (8, ct[7:8], None, {"EncapsulatedDocument": BIG_OB}),
            "mr_implicit": (4, sorted((samples / "02_MR_brain").iterdir())[:1], "implicit", {}),
            "dx_mono1": (
                5,
                sorted((samples / "03_DX_chest").iterdir()),
                None,
                {"PhotometricInterpretation": "MONOCHROME1"},
            ),
        }
        report = send(files, "127.0.0.1", fe.dicom_port, "YBYX")
        assert report.ok, report.failed
        # The variants go straight to ingest (C-STORE's own entry point): one association can
        # carry only one transfer syntax per SOP class, and test_dimse covers the network side.
        for name, (n, sources, encode, attrs) in variants.items():
            studies[name], made = _variant(out, n, sources, encode, **attrs)
            for path in made:
                assert isinstance(fe.ingest.accept_file(path, source="TEST"), Accepted), path
        yield Loaded(fe, f"http://127.0.0.1:{fe.http_port}/dicom-web", studies, auth(fe, "qido wado"))
    finally:
        fe.stop()


def stored(loaded: Loaded, sop: str) -> tuple[str, str]:
    """(transfer syntax, sha256) the catalog holds for an instance."""
    [inst] = loaded.fe.archive.catalog.locate({"SOPInstanceUID": sop})
    return inst.transfer_syntax, inst.sha256


class SelectCounter:
    """Counts the SELECT statements the catalog runs (to check "one catalog query")."""

    def __init__(self, loaded: Loaded) -> None:
        self.engine = loaded.fe.archive.catalog.engine
        self.count = 0

    def _on(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # the audit trail's own writes (R-SE-4) run in its thread after the response: not counted
        if statement.lstrip().upper().startswith("SELECT") and "audit_" not in statement:
            self.count += 1

    def __enter__(self) -> SelectCounter:
        event.listen(self.engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on)


# ---- retrieve instances ------------------------------------------------------------------------


def test_retrieve_study_returns_every_instance_with_original_pixels(loaded: Loaded) -> None:
    ct = loaded.studies["ct"]
    with SelectCounter(loaded) as sql:
        got = loaded.client().retrieve_study(ct.uid)
    assert sql.count == 1, "one catalog query per retrieve"
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(ct.sops)
    for ds in got:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.PixelData == dcmread(ct.originals[str(ds.SOPInstanceUID)]).PixelData
    assert str(got[0].PatientName) == "Zhang^San=张^三"


def test_retrieve_series_and_instance(loaded: Loaded) -> None:
    mr, dx = loaded.studies["mr"], loaded.studies["dx"]
    series = loaded.client().retrieve_series(mr.uid, mr.series)
    assert len(series) == 20 == len(mr.sops)
    [sop] = dx.sops
    ds = loaded.client().retrieve_instance(dx.uid, dx.series, sop)
    assert (ds.Rows, ds.Columns) == (2500, 2048)
    assert ds.PixelData == dcmread(dx.originals[sop]).PixelData


def test_transfer_syntax_star_returns_the_stored_bytes(loaded: Loaded) -> None:
    for name in ("ct_jls", "ct"):
        study = loaded.studies[name]
        rsp = loaded.get(f"studies/{study.uid}", headers={"Accept": STORED})
        assert rsp.status_code == 200, rsp.text
        assert rsp.headers["content-type"].startswith('multipart/related; type="application/dicom"')
        got = parts(rsp)
        assert len(got) == len(study.sops)
        for headers, body in got:
            sop = str(dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
            ts, sha = stored(loaded, sop)
            assert hashlib.sha256(body).hexdigest() == sha, "not the stored bytes"
            assert headers["content-type"] == f"application/dicom; transfer-syntax={ts}"
    assert stored(loaded, loaded.studies["ct_jls"].sops[0])[0] == JPEGLSLossless


@pytest.mark.parametrize("name", ["ct_jls", "xa_jls", "ct_j2k", "mr_implicit"])
def test_compressed_instance_is_transcoded_to_explicit_le_by_default(loaded: Loaded, name: str) -> None:
    """JPEG-LS (dcmtk fallback unless pylibjpeg-libjpeg is there), JPEG 2000 (pydicom), implicit VR."""
    study = loaded.studies[name]
    sop = study.sops[0]
    assert stored(loaded, sop)[0] != ExplicitVRLittleEndian
    # dicomweb-client's retrieve_instance asks for transfer-syntax=* unless told otherwise; a bare
    # media type carries no transfer-syntax parameter: the default (PS3.18 §8.7.3.5.2).
    ds = loaded.client().retrieve_instance(study.uid, study.series, sop, media_types=("application/dicom",))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert str(ds.SOPInstanceUID) == sop
    original = dcmread(study.originals[sop])
    assert ds.PixelData == original.PixelData
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    # no Accept header at all: the default too
    rsp = loaded.get(loaded.instance_path(name))
    [(headers, body)] = parts(rsp)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    assert dcmread(io.BytesIO(body)).PixelData == original.PixelData


def test_explicitly_requested_transfer_syntaxes(loaded: Loaded) -> None:
    jls, ct = loaded.studies["ct_jls"], loaded.studies["ct"]
    # the stored syntax, named: served as stored
    rsp = loaded.get(loaded.instance_path("ct_jls"), headers={"Accept": JLS_PART})
    assert rsp.status_code == 200, rsp.text
    [(_, body)] = parts(rsp)
    assert hashlib.sha256(body).hexdigest() == stored(loaded, jls.sops[0])[1]
    # dicomweb-client naming Explicit VR LE
    ds = loaded.client().retrieve_instance(
        ct.uid, ct.series, ct.sops[0], media_types=(("application/dicom", ExplicitVRLittleEndian),)
    )
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    # a syntax we would have to encode into: 406 with a message
    rsp = loaded.get(f"studies/{ct.uid}", headers={"Accept": JLS_PART})
    assert rsp.status_code == 406
    assert "transfer-syntax=*" in rsp.text
    # q-values: the preferred range we cannot serve is skipped for the next one
    accept = f"{JLS_PART}; q=0.9, {STORED}; q=0.5"
    rsp = loaded.get(loaded.instance_path("ct"), headers={"Accept": accept})
    assert rsp.status_code == 200
    assert parts(rsp)[0][0]["content-type"] == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"


# ---- metadata ------------------------------------------------------------------------------------


def test_series_metadata_from_the_catalog(loaded: Loaded) -> None:
    ct = loaded.studies["ct"]
    with SelectCounter(loaded) as sql:
        meta = loaded.client().retrieve_series_metadata(ct.uid, ct.series)
    assert sql.count == 1
    assert len(meta) == 12
    assert [m["00200013"]["Value"][0] for m in meta] == list(range(1, 13)), "ordered by InstanceNumber"
    first = meta[0]
    assert first["00280010"] == {"vr": "US", "Value": [512]}
    assert first["00100010"]["Value"][0]["Ideographic"] == "张^三"
    assert first["00100010"]["Value"][0]["Alphabetic"] == "Zhang^San"
    uri = first["7FE00010"]["BulkDataURI"]
    sop = first["00080018"]["Value"][0]
    assert uri == f"{loaded.url}/studies/{ct.uid}/series/{ct.series}/instances/{sop}/bulk/7FE00010"


def test_metadata_levels_and_bulk_data_uris_resolve(loaded: Loaded) -> None:
    ct = loaded.studies["ct"]
    study_meta = loaded.client().retrieve_study_metadata(ct.uid)
    assert len(study_meta) == 12
    rsp = loaded.get(f"{loaded.instance_path('ct', 2)}/metadata")
    assert rsp.status_code == 200
    assert rsp.headers["content-type"] == "application/dicom+json"
    [inst] = rsp.json()
    uri = inst["7FE00010"]["BulkDataURI"]
    assert uri.startswith("http://127.0.0.1:")
    bulk = httpx.get(
        uri,
        timeout=30,
        headers={"Accept": 'multipart/related; type="application/octet-stream"', **loaded.auth},
    )
    assert bulk.status_code == 200, bulk.text
    [(headers, body)] = parts(bulk)
    assert headers["content-type"].startswith("application/octet-stream")
    assert body == dcmread(ct.originals[ct.sops[2]]).PixelData
    # through dicomweb-client as well
    assert loaded.client().retrieve_bulkdata(uri) == [body]


def test_bulk_pixel_data_of_a_compressed_instance(loaded: Loaded) -> None:
    jls = loaded.studies["ct_jls"]
    meta = loaded.client().retrieve_instance_metadata(jls.uid, jls.series, jls.sops[0])
    uri = meta["7FE00010"]["BulkDataURI"]
    octet = httpx.get(
        uri,
        timeout=30,
        headers={"Accept": 'multipart/related; type="application/octet-stream"', **loaded.auth},
    )
    assert parts(octet)[0][1] == dcmread(jls.originals[jls.sops[0]]).PixelData
    as_stored = httpx.get(
        uri, timeout=30, headers={"Accept": 'multipart/related; type="image/jls"', **loaded.auth}
    )
    [(headers, body)] = parts(as_stored)
    assert headers["content-type"] == f"image/jls; transfer-syntax={JPEGLSLossless}"
    ds = dcmread(_stored_file(loaded, jls.sops[0]))
    assert body == get_frame(ds.PixelData, 0, number_of_frames=1)


def test_non_pixel_bulk_data(loaded: Loaded) -> None:
    study = loaded.studies["ct_bulk"]
    [meta] = loaded.get(f"{loaded.instance_path('ct_bulk')}/metadata").json()
    uri = meta["00420011"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{study.sops[0]}/bulk/00420011")
    [(headers, body)] = parts(httpx.get(uri, headers={"Accept": OCTET, **loaded.auth}, timeout=30))
    assert headers["content-type"] == "application/octet-stream" and body == BIG_OB
    missing = loaded.get(f"{loaded.instance_path('ct_bulk')}/bulk/00091234")
    assert missing.status_code == 404 and "(0009,1234)" in missing.text


def _stored_file(loaded: Loaded, sop: str) -> Path:
    [inst] = loaded.fe.archive.catalog.locate({"SOPInstanceUID": sop})
    return Path(loaded.fe.cfg.storage.path) / inst.blob_key


# ---- frames --------------------------------------------------------------------------------------


def test_uncompressed_frames_are_the_numpy_frames(loaded: Loaded) -> None:
    xa = loaded.studies["xa"]
    sop = xa.sops[0]
    original = dcmread(xa.originals[sop]).pixel_array
    assert original.shape == (10, 256, 256)
    [frame5] = loaded.client().retrieve_instance_frames(
        xa.uid, xa.series, sop, frame_numbers=[5], media_types=("application/octet-stream",)
    )
    assert frame5 == original[4].tobytes()
    rsp = loaded.get(f"{loaded.instance_path('xa')}/frames/1,5,10")
    got = parts(rsp)
    assert [b for _, b in got] == [original[i].tobytes() for i in (0, 4, 9)]
    assert got[0][0]["content-type"] == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    # 16-bit single frame
    ct = loaded.studies["ct"]
    [raw] = loaded.client().retrieve_instance_frames(ct.uid, ct.series, ct.sops[3], frame_numbers=[1])
    assert raw == dcmread(ct.originals[ct.sops[3]]).PixelData


def _decode_jls(frame: bytes, like: Path) -> bytes:
    """Decode a JPEG-LS frame with dcmtk, independently of the server's decoding."""
    ds = dcmread(like)
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    tmp = like.with_name(f"{like.stem}-frame.dcm")
    out = like.with_name(f"{like.stem}-frame-decoded.dcm")
    ds.save_as(tmp, enforce_file_format=True)
    _run(dcmtk("dcmdjpls"), str(tmp), str(out))
    return bytes(dcmread(out).PixelData)


def test_jpegls_frames_as_stored_and_decoded(loaded: Loaded) -> None:
    for name, frame_no in (("ct_jls", 1), ("xa_jls", 5), ("xa_jls_no_bot", 5), ("xa_jls_no_bot", 10)):
        study = loaded.studies[name]
        sop = study.sops[0]
        original = dcmread(study.originals[sop])
        frame_bytes = len(original.PixelData) // int(original.get("NumberOfFrames") or 1)
        want = original.PixelData[(frame_no - 1) * frame_bytes : frame_no * frame_bytes]
        [jls] = loaded.client().retrieve_instance_frames(
            study.uid, study.series, sop, frame_numbers=[frame_no], media_types=("image/jls",)
        )
        stored_ds = dcmread(_stored_file(loaded, sop))
        nframes = int(stored_ds.get("NumberOfFrames") or 1)
        assert jls == get_frame(stored_ds.PixelData, frame_no - 1, number_of_frames=nframes), "as stored"
        assert _decode_jls(jls, study.originals[sop]) == want
        [raw] = loaded.client().retrieve_instance_frames(
            study.uid, study.series, sop, frame_numbers=[frame_no], media_types=("application/octet-stream",)
        )
        assert raw == want
        rsp = loaded.get(
            f"{loaded.instance_path(name)}/frames/{frame_no}",
            headers={"Accept": 'multipart/related; type="image/jls"'},
        )
        assert rsp.headers["content-type"].startswith('multipart/related; type="image/jls"')
        assert parts(rsp)[0][0]["content-type"] == f"image/jls; transfer-syntax={JPEGLSLossless}"


class StoreSpy:
    """Wraps the live archive's blob store: bytes read by range, and whole-object reads."""

    def __init__(self, loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
        store = loaded.fe.archive.store
        self.ranged = 0
        self.whole = 0
        read_range, get = store.read_range, store.get

        def spy_range(key: str, offset: int, length: int) -> bytes:
            data = read_range(key, offset, length)
            self.ranged += len(data)
            return data

        def spy_get(key: str) -> Iterator[bytes]:
            self.whole += 1
            return get(key)

        monkeypatch.setattr(store, "read_range", spy_range)
        monkeypatch.setattr(store, "get", spy_get)


@pytest.mark.parametrize("name", ["xa", "xa_jls", "xa_jls_no_bot"])
def test_frames_are_read_by_range(loaded: Loaded, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    study = loaded.studies[name]
    size = _stored_file(loaded, study.sops[0]).stat().st_size
    spy = StoreSpy(loaded, monkeypatch)
    rsp = loaded.get(f"{loaded.instance_path(name)}/frames/5", headers={"Accept": "*/*"})
    assert rsp.status_code == 200
    assert spy.whole == 0, "the whole blob was read"
    assert 0 < spy.ranged < size / 2, f"read {spy.ranged} of {size} bytes for one frame of ten"


class RangeLog:
    """Wraps the live archive's blob store: the (offset, length) of every range read."""

    def __init__(self, loaded: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
        store = loaded.fe.archive.store
        self.reads: list[tuple[int, int]] = []
        read_range = store.read_range

        def spy_range(key: str, offset: int, length: int) -> bytes:
            self.reads.append((offset, length))
            return read_range(key, offset, length)

        monkeypatch.setattr(store, "read_range", spy_range)


def _pixel_offset(loaded: Loaded, sop: str) -> int | None:
    with loaded.fe.archive.catalog.engine.connect() as conn:
        value = conn.execute(select(instances.c.pixel_offset).where(instances.c.sop_uid == sop)).scalar_one()
    return int(value) if value is not None else None


def _expected_frame(stored_file: Path, n: int) -> bytes:
    ds = dcmread(stored_file)
    nframes = int(ds.get("NumberOfFrames") or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return bytes(get_frame(ds.PixelData, n - 1, number_of_frames=nframes))
    size = len(ds.PixelData) // nframes
    return bytes(ds.PixelData[(n - 1) * size : n * size])


@pytest.mark.parametrize(
    ("name", "frame", "reads"),
    [
        ("ct", 1, 1),  # int16
        ("us", 1, 1),  # RGB
        ("xa", 5, 1),  # multi-frame
        ("xa", 10, 1),
        ("mr_implicit", 1, 1),
        ("xa_jls", 5, 1),  # Basic Offset Table (cached): the frame's fragments in one read
        ("xa_jls", 10, 2),  # last frame: its item header, then the value (up to the delimiter)
        ("xa_jls_no_bot", 5, 1),  # fragment table (cached)
        ("ct_jls", 1, 2),
        ("ct_j2k", 1, 2),
    ],
)
def test_frames_are_cut_at_the_catalog_pixel_offset(
    loaded: Loaded, monkeypatch: pytest.MonkeyPatch, name: str, frame: int, reads: int
) -> None:
    """Ingest recorded where the pixel data is: a frame is one catalog row and its range read(s),
    with no header parse (no read before the pixel data), byte-exact with pydicom's frame."""
    study = loaded.studies[name]
    sop = study.sops[0]
    path = _stored_file(loaded, sop)
    offset = _pixel_offset(loaded, sop)
    assert offset is not None, "ingest did not record the pixel data offset"
    ds = dcmread(path)
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        assert path.read_bytes()[offset : offset + len(ds.PixelData)] == ds.PixelData
    url = f"{loaded.instance_path(name)}/frames/{frame}"
    assert loaded.get(url, headers={"Accept": "*/*"}).status_code == 200  # warms the offset caches
    spy = RangeLog(loaded, monkeypatch)
    catalog = loaded.fe.archive.catalog
    rows: list[str] = []
    pixel_row = catalog.pixel_row

    def spy_row(study: str, series: str, sop: str) -> Any:
        rows.append(sop)
        return pixel_row(study, series, sop)

    monkeypatch.setattr(catalog, "pixel_row", spy_row)
    with SelectCounter(loaded) as sql:
        rsp = loaded.get(url, headers={"Accept": "*/*"})
    assert rsp.status_code == 200, rsp.text
    assert rows == [sop] and sql.count == 0, "one catalog query (pixel_row) per frames request"
    assert len(spy.reads) == reads, spy.reads
    assert min(o for o, _ in spy.reads) >= offset, f"read before the pixel data: {spy.reads}"
    [(headers, body)] = parts(rsp)
    assert body == _expected_frame(path, frame)
    assert headers["content-length"] == str(len(body))


def test_frames_without_a_recorded_offset_parse_the_header(
    loaded: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows catalogued before the offsets existed (NULL) are served through the header, as before."""
    xa = loaded.studies["xa_jls"]
    sop = xa.sops[0]
    engine = loaded.fe.archive.catalog.engine
    offset = _pixel_offset(loaded, sop)
    with engine.begin() as conn:
        conn.execute(instances.update().where(instances.c.sop_uid == sop).values(pixel_offset=None))
    try:
        spy = RangeLog(loaded, monkeypatch)
        rsp = loaded.get(f"{loaded.instance_path('xa_jls')}/frames/3,10", headers={"Accept": "*/*"})
        assert rsp.status_code == 200
        assert min(o for o, _ in spy.reads) == 0, "the header was not read"
        path = _stored_file(loaded, sop)
        assert [b for _, b in parts(rsp)] == [_expected_frame(path, 3), _expected_frame(path, 10)]
    finally:
        with engine.begin() as conn:
            conn.execute(instances.update().where(instances.c.sop_uid == sop).values(pixel_offset=offset))


def test_frame_errors(loaded: Loaded) -> None:
    xa = loaded.instance_path("xa")
    rsp = loaded.get(f"{xa}/frames/99")
    assert rsp.status_code == 400 and "frame 99 is out of range" in rsp.text and "10 frames" in rsp.text
    assert loaded.get(f"{xa}/frames/0").status_code == 400
    assert loaded.get(f"{xa}/frames/1,x").status_code == 400
    # uncompressed frames cannot be sent as JPEG 2000 (we do not encode)
    rsp = loaded.get(f"{xa}/frames/1", headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert rsp.status_code == 406 and "application/octet-stream" in rsp.text
    ct = loaded.studies["ct"]
    rsp = loaded.get(f"studies/{ct.uid}/series/{ct.series}/instances/1.2.3.4/frames/1")
    assert rsp.status_code == 404 and "instance 1.2.3.4 not found" in rsp.text


# ---- rendered ------------------------------------------------------------------------------------


def _image(rsp: httpx.Response, fmt: str) -> Image.Image:
    assert rsp.status_code == 200, rsp.text
    img = Image.open(io.BytesIO(rsp.content))
    assert img.format == fmt
    return img


def test_rendered_jpeg_and_png_to_the_viewport(loaded: Loaded) -> None:
    ct = loaded.studies["ct"]
    jpeg = loaded.client().retrieve_instance_rendered(
        ct.uid, ct.series, ct.sops[0], media_types=("image/jpeg",), params={"viewport": "256,256"}
    )
    assert Image.open(io.BytesIO(jpeg)).size == (256, 256)
    png = _image(
        loaded.get(
            f"{loaded.instance_path('ct')}/rendered?viewport=300,200", headers={"Accept": "image/png"}
        ),
        "PNG",
    )
    assert png.size == (200, 200), "scaled to fit, aspect kept"
    # DX: 2048 wide x 2500 high into 200x200
    dx = _image(loaded.get(f"{loaded.instance_path('dx')}/rendered?viewport=200,200&quality=50"), "JPEG")
    assert dx.size == (164, 200)
    # colour passes through as RGB
    us = _image(loaded.get(f"{loaded.instance_path('us')}/rendered"), "JPEG")
    assert us.mode == "RGB" and us.size == (640, 480)
    # a frame of the multi-frame XA
    frame = _image(
        loaded.get(f"{loaded.instance_path('xa')}/frames/5/rendered", headers={"Accept": "image/png"}), "PNG"
    )
    assert frame.size == (256, 256)
    # the accept query parameter (PS3.18 §8.3.3.1)
    _image(loaded.get(f"{loaded.instance_path('ct')}/rendered?accept=image/png"), "PNG")


def test_window_parameter_and_defaults(loaded: Loaded) -> None:
    path = f"{loaded.instance_path('ct', 6)}/rendered"
    png = {"Accept": "image/png"}

    def render(query: str) -> np.ndarray[Any, Any]:
        return np.asarray(_image(loaded.get(f"{path}{query}", headers=png), "PNG"))

    default = render("")
    lung = render("?window=-600,1500")  # the file's first Window Center/Width pair
    soft = render("?window=40,400,linear")
    assert np.array_equal(default, lung), "the file's window is the default"
    assert not np.array_equal(lung, soft), "the window parameter changes the output"
    assert not np.array_equal(soft, render("?window=40,400,sigmoid"))
    # MONOCHROME1 renders inverted (same pixels, same window)
    dx1 = render_path(loaded, "dx_mono1")
    dx2 = render_path(loaded, "dx")
    assert np.array_equal(dx1, 255 - dx2)


def render_path(loaded: Loaded, name: str) -> np.ndarray[Any, Any]:
    rsp = loaded.get(f"{loaded.instance_path(name)}/rendered", headers={"Accept": "image/png"})
    return np.asarray(_image(rsp, "PNG"))


def test_thumbnails(loaded: Loaded) -> None:
    ct, xa = loaded.studies["ct"], loaded.studies["xa"]
    for path in (
        f"studies/{ct.uid}/thumbnail",
        f"studies/{ct.uid}/series/{ct.series}/thumbnail",
        f"{loaded.instance_path('ct')}/thumbnail",
        f"{loaded.instance_path('xa')}/frames/2/thumbnail",
    ):
        assert _image(loaded.get(path), "JPEG").size == (128, 128), path
    dx = _image(loaded.get(f"{loaded.instance_path('dx')}/thumbnail"), "JPEG")
    assert max(dx.size) == 128
    study = _image(loaded.get(f"studies/{xa.uid}/rendered", headers={"Accept": "image/png"}), "PNG")
    assert study.size == (256, 256)


def test_rendered_errors(loaded: Loaded) -> None:
    path = f"{loaded.instance_path('ct')}/rendered"
    for query, word in (
        ("window=abc", "window"),
        ("window=40,0", "width"),
        ("window=40,400,cubic", "function"),
        ("viewport=0,10", "viewport"),
        ("viewport=a,b", "viewport"),
        ("quality=0", "quality"),
        ("quality=101", "quality"),
    ):
        rsp = loaded.get(f"{path}?{query}")
        assert rsp.status_code == 400, query
        assert word in rsp.text, (query, rsp.text)
    rsp = loaded.get(path, headers={"Accept": "application/pdf"})
    assert rsp.status_code == 406 and "image/jpeg" in rsp.text
    assert loaded.get(f"{loaded.instance_path('xa')}/frames/11/rendered").status_code == 400


# ---- errors --------------------------------------------------------------------------------------


def test_unknown_uids_are_404_with_a_message(loaded: Loaded) -> None:
    ct = loaded.studies["ct"]
    for path in ("studies/1.2.3.999", "studies/1.2.3.999/metadata", "studies/1.2.3.999/rendered"):
        rsp = loaded.get(path)
        assert rsp.status_code == 404, path
        assert "study 1.2.3.999 not found" in rsp.text
    rsp = loaded.get(f"studies/{ct.uid}/series/1.2.3.999")
    assert rsp.status_code == 404 and f"series 1.2.3.999 not found in study {ct.uid}" in rsp.text
    rsp = loaded.get(f"studies/{ct.uid}/series/{ct.series}/instances/1.2.3.999/metadata")
    assert rsp.status_code == 404 and "instance 1.2.3.999" in rsp.text
    assert loaded.get("studies/1.2.*/metadata").status_code == 400, "wildcards are not UIDs"


def test_unacceptable_media_types_are_406(loaded: Loaded) -> None:
    ct = loaded.studies["ct"]
    for path in (f"studies/{ct.uid}", f"studies/{ct.uid}/metadata", f"{loaded.instance_path('ct')}/frames/1"):
        rsp = loaded.get(path, headers={"Accept": "application/pdf"})
        assert rsp.status_code == 406, path
        assert "cannot satisfy Accept" in rsp.text
    bad_tag = loaded.get(f"{loaded.instance_path('ct')}/bulk/7FE0")
    assert bad_tag.status_code == 400


# ---- unit: the grayscale pipeline ----------------------------------------------------------------


def test_window_functions_and_monochrome1() -> None:
    ramp = np.arange(-10, 11, dtype=np.float64)
    lin = apply_window(ramp, Window(0, 10, "linear"))
    # PS3.3 C.11.2.1.2.1: ((x - (c - 0.5)) / (w - 1) + 0.5) * 255 at x = c is 141.67
    assert lin[0] == 0 and lin[-1] == 255 and lin[10] == 142
    exact = apply_window(ramp, Window(0, 10, "linear-exact"))
    assert exact[5] == 0 and exact[15] == 255
    header = Dataset()
    header.RescaleSlope, header.RescaleIntercept = 2, -10
    stored = np.array([[0, 5, 10]], dtype=np.int16)  # → -10, 0, 10
    mono2 = grayscale(stored, header, 0, "MONOCHROME2", Window(0, 20, "linear"))
    mono1 = grayscale(stored, header, 0, "MONOCHROME1", Window(0, 20, "linear"))
    assert mono2[0, 0] == 0 and mono2[0, 2] == 255
    assert np.array_equal(mono1, 255 - mono2)
    minmax = grayscale(stored, Dataset(), 0, "MONOCHROME2", None)
    assert minmax.tolist() == [[0, 128, 255]]


# ---- performance smoke (no timing assertion) -----------------------------------------------------


def test_metadata_of_a_2000_instance_series_smoke(loaded: Loaded) -> None:
    """Clone one catalogued CT row 2,000 times (metadata never opens files) and time /metadata."""
    ct = loaded.studies["ct"]
    catalog = loaded.fe.archive.catalog
    study, series = f"{ROOT}.9", f"{ROOT}.9.1"
    # A new series of the CT study would change the other tests' counts: give it its own study.
    big = Path(loaded.fe.cfg.storage.path).parent / "big.dcm"
    src = _copy(ct.originals[ct.sops[0]], big, study, series, f"{ROOT}.9.1.0")
    loaded.fe.ingest.accept_file(src, source="TEST")
    with catalog.engine.connect() as conn:
        query = select(instances).where(instances.c.sop_uid == f"{ROOT}.9.1.0")
        base = dict(conn.execute(query).mappings().one())
    rows = []
    for i in range(1, 2000):
        sop = f"{ROOT}.9.1.{i}"
        r = {k: v for k, v in base.items() if k != "id"}
        r["sop_uid"], r["instance_number"] = sop, i + 1
        r["metadata_json"] = str(base["metadata_json"]).replace(f"{ROOT}.9.1.0", sop)
        rows.append(r)
    with catalog.engine.begin() as conn:
        conn.execute(instances.insert(), rows)
    client = httpx.Client(timeout=60, headers=loaded.auth)
    url = f"{loaded.url}/studies/{study}/series/{series}/metadata"
    client.get(url)  # warm up
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        rsp = client.get(url)
        timings.append(time.perf_counter() - t0)
    body = rsp.json()
    assert len(body) == 2000
    assert body[-1]["7FE00010"]["BulkDataURI"].startswith(loaded.url)
    print(
        f"\n/metadata of 2,000 instances: {len(rsp.content) / 1e6:.1f} MB, best {min(timings) * 1000:.0f} ms"
    )


# ---- the same over S3 (range reads are ranged GETs) ----------------------------------------------


def test_frames_and_retrieve_from_an_s3_blob_store(
    start_frontend: Any, seaweedfs: Any, samples: Path, tmp_path: Path
) -> None:
    """XA (native) and its JPEG-LS copy in SeaweedFS: frames by ranged GET, retrieve as stored."""
    fe: Frontend = start_frontend(s3=seaweedfs)
    xa_file = sorted((samples / "04_XA_coronary").iterdir())[0]
    jls, made = _variant(tmp_path, 6, [xa_file], "jls")
    for path in (xa_file, *made):
        assert isinstance(fe.ingest.accept_file(path, source="TEST"), Accepted), path
    url = f"http://127.0.0.1:{fe.http_port}/dicom-web"
    xa = dcmread(xa_file)
    bearer = auth(fe, "wado")
    client = DICOMwebClient(url=url, headers=bearer)
    for study, series, sop in (
        (xa.StudyInstanceUID, xa.SeriesInstanceUID, xa.SOPInstanceUID),
        (jls.uid, jls.series, jls.sops[0]),
    ):
        [frame5] = client.retrieve_instance_frames(
            study, series, sop, frame_numbers=[5], media_types=("application/octet-stream",)
        )
        assert frame5 == xa.pixel_array[4].tobytes()
    rsp = httpx.get(f"{url}/studies/{jls.uid}", headers={"Accept": STORED, **bearer}, timeout=60)
    [(_, body)] = parts(rsp)
    [inst] = fe.archive.catalog.locate({"SOPInstanceUID": jls.sops[0]})
    assert hashlib.sha256(body).hexdigest() == inst.sha256
    thumb = httpx.get(f"{url}/studies/{jls.uid}/thumbnail", headers=bearer, timeout=60)
    assert Image.open(io.BytesIO(thumb.content)).size == (128, 128)

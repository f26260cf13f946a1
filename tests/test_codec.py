"""Lossless compression (issue 4 §1, R-UP-1): every codec bit-exact by two independent decoders,
valid DICOM by dciodvfy, rendered by Orthanc; the rules that keep the original; the front-end's
durable compression stage and what its forwarder sends.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import gdcm
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy import update

from dimse.scu import send
from gateway.archive.blobstore import BlobNotFound, FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.schema import retired_blobs
from gateway.center import Center
from gateway.codec import CODECS, Codec, Status, compress
from gateway.codec.stage import CompressionStage, utcnow
from gateway.codec.table import _jpeg_ls, _rle
from gateway.config import ConfigError, parse_config
from gateway.frontend import Frontend
from gateway.ingest import Accepted, Ingest
from gateway.sample import _chest_radiograph, ct_series, write_samples
from tests.conftest import auth, dcmtk, forward_to
from tests.peers.orthanc import OrthancPeer, orthanc  # noqa: F401  (session fixture)
from tests.test_forwarding import FAST, all_confirmed, forwarding, wait_until

DCIODVFY = str(Path(sys.executable).parent / "dciodvfy")
KINDS = ("ct-signed", "mr-12bit-odd", "dx-12bit", "rgb-planar", "multiframe")


# ---- test images: small, each with what can go wrong ---------------------------------------------


def _part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return buf.getvalue()


def _first(folder: Path) -> Dataset:
    return dcmread(sorted(folder.glob("*.dcm"))[0])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Part-10 bytes per kind, from the demo phantoms (cut small to keep the tests fast)."""
    root = tmp_path_factory.mktemp("codec-samples")
    write_samples(root, ct_slices=1)
    out: dict[str, bytes] = {}

    ct = _first(root / "01_CT_chest")  # signed 16-bit with negative values: stored = HU
    hu = pixel_array(ct, raw=True).astype(np.int16) - 1024
    ct.RescaleIntercept = 0
    ct.set_pixel_data(hu[100:356, 80:400].copy(), "MONOCHROME2", 16, generate_instance_uid=False)
    assert ct.PixelRepresentation == 1 and int(hu.min()) < 0
    out["ct-signed"] = _part10(ct)

    mr = _first(root / "02_MR_brain")  # 12 bits stored, odd rows and columns, implicit VR source
    mr.set_pixel_data(pixel_array(mr)[3:254, 5:248].copy(), "MONOCHROME2", 12, generate_instance_uid=False)
    assert (mr.Rows, mr.Columns) == (251, 243)
    out["mr-12bit-odd"] = _part10(mr, ImplicitVRLittleEndian)

    dx = _first(root / "03_DX_chest")  # 12 bits stored; smaller than the real 2500x2048
    rng = np.random.default_rng(4)
    dx.set_pixel_data(
        _chest_radiograph(rng, rows=640, columns=512), "MONOCHROME2", 12, generate_instance_uid=False
    )
    out["dx-12bit"] = _part10(dx)

    us = _first(root / "05_US_carotid")  # RGB stored colour-by-plane (Planar Configuration 1)
    rgb = pixel_array(us)[40:281, 100:421]
    planes = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    us.Rows, us.Columns = rgb.shape[:2]
    us.PlanarConfiguration = 1
    us.PixelData = planes.tobytes() + (b"\0" if planes.nbytes % 2 else b"")
    assert np.array_equal(pixel_array(us), rgb)
    out["rgb-planar"] = _part10(us)

    xa = _first(root / "04_XA_coronary")  # 10 frames of 8 bits
    assert int(xa.NumberOfFrames) == 10
    out["multiframe"] = _part10(xa)
    return out


# ---- independent decoders ------------------------------------------------------------------------


def _gdcm_native(path: Path, out: Path) -> npt.NDArray[Any]:
    """GDCM decodes ``path`` to Explicit VR Little Endian; the native pixels (no codec involved)."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), f"GDCM cannot read {path}"
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    change.SetInput(reader.GetImage())
    assert change.Change(), f"GDCM cannot decode {path}"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(out))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    ds = dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    return pixel_array(ds, raw=True)


def _dcmtk_native(path: Path, out: Path, syntax: str) -> npt.NDArray[Any]:
    tool = {JPEGLSLossless: "dcmdjpls", RLELossless: "dcmdrle"}[syntax]
    subprocess.run([dcmtk(tool), str(path), str(out)], check=True, capture_output=True, timeout=60)
    ds = dcmread(out)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    return pixel_array(ds, raw=True)


def _errors(path: Path) -> set[str]:
    """dciodvfy's error lines (warnings ignored)."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    assert lines and "Image" in lines[0], lines[:3]  # it named the IOD: it really checked
    return {line.strip() for line in lines if line.startswith("Error")}


# ---- every codec, every kind ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_is_bit_exact_for_two_decoders_and_valid_dicom(
    name: str, images: dict[str, bytes], tmp_path: Path
) -> None:
    codec = CODECS[name]
    for kind in KINDS:
        original = images[kind]
        before = dcmread(io.BytesIO(original))
        reference = pixel_array(before, raw=True)
        outcome = compress(original, codec)
        if name == "rle" and kind == "multiframe":
            # noisy 8-bit cine: RLE makes it bigger, and a bigger file is never kept
            assert outcome.status is Status.KEPT and "not smaller" in outcome.reason
            continue
        assert outcome.status is Status.COMPRESSED, (kind, outcome.reason)
        assert outcome.data is not None and outcome.size_after < outcome.size_before
        path = tmp_path / f"{kind}.{name}.dcm"
        path.write_bytes(outcome.data)

        after = dcmread(path)
        assert after.file_meta.TransferSyntaxUID == codec.transfer_syntax
        assert after.file_meta.MediaStorageSOPInstanceUID == before.SOPInstanceUID == after.SOPInstanceUID
        assert after.file_meta.MediaStorageSOPClassUID == before.SOPClassUID
        # 1. pydicom + pylibjpeg / pyjpegls (named: pydicom would otherwise pick GDCM first)
        decoded = pixel_array(after, raw=True, decoding_plugin=codec.decoder)
        assert np.array_equal(decoded, reference), (kind, "pydicom")
        # 2. GDCM, independent of both
        native = _gdcm_native(path, tmp_path / f"{kind}.{name}.gdcm.dcm")
        assert native.dtype == reference.dtype and np.array_equal(native, reference), (kind, "gdcm")
        # 3. dcmtk, where it has the codec
        if codec.transfer_syntax in (JPEGLSLossless, RLELossless):
            native = _dcmtk_native(path, tmp_path / f"{kind}.{name}.dcmtk.dcm", codec.transfer_syntax)
            assert np.array_equal(native, reference), (kind, "dcmtk")

        # the header is untouched but for the pixel data, Planar Configuration (colour) and, for
        # JPEG 2000 colour, Photometric Interpretation YBR_RCT
        for elem in before:
            if elem.tag in (0x7FE00010, 0x00280006, 0x00280004):
                continue
            assert elem.tag in after and after[elem.tag].value == elem.value, (kind, elem.tag)
        if kind == "rgb-planar":
            assert after.PlanarConfiguration == 0
            assert after.PhotometricInterpretation == codec.rgb_photometric
        else:
            assert after.PhotometricInterpretation == before.PhotometricInterpretation

        source = tmp_path / f"{kind}.orig.dcm"
        source.write_bytes(original)
        new_errors = _errors(path) - _errors(source)
        assert not new_errors, (kind, new_errors)


def test_orthanc_accepts_and_renders_compressed_files(
    orthanc: OrthancPeer,  # noqa: F811  (the session fixture imported above)
    images: dict[str, bytes],
    tmp_path: Path,
) -> None:
    """Orthanc 1.10 (Debian, DCMTK decoders; no GDCM plugin, so no JPEG 2000 there) stores the
    JPEG-LS and RLE files and renders each as a PNG of the right size."""
    orthanc.clear()
    for name in ("jpeg-ls", "rle"):
        for kind in ("ct-signed", "dx-12bit", "rgb-planar"):
            outcome = compress(images[kind], CODECS[name])
            assert outcome.data is not None
            path = tmp_path / f"{kind}.{name}.dcm"
            path.write_bytes(outcome.data)
            instance = orthanc.upload(path)
            tags = orthanc.http.get(f"/instances/{instance}/metadata/TransferSyntax")
            assert tags.text == CODECS[name].transfer_syntax
            preview = orthanc.http.get(f"/instances/{instance}/preview")
            assert preview.status_code == 200, (name, kind, preview.text[:300])
            png = preview.content
            assert png[:8] == b"\x89PNG\r\n\x1a\n", (name, kind)
            width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
            ds = dcmread(path, stop_before_pixels=True)
            assert (height, width) == (ds.Rows, ds.Columns)
            assert len(png) > 1000  # a real image, not a blank
            orthanc.http.delete(f"/instances/{instance}")  # the next codec brings the same UID
    orthanc.clear()


# ---- the rules that keep the original ------------------------------------------------------------


def test_lossy_sources_are_never_re_encoded(images: dict[str, bytes]) -> None:
    mr = dcmread(io.BytesIO(images["mr-12bit-odd"]))
    near = dcmread(io.BytesIO(images["mr-12bit-odd"]))
    near.compress(JPEGLSNearLossless, pixel_array(mr), encoding_plugin="pyjpegls", jls_error=2)
    outcome = compress(_part10(near, JPEGLSNearLossless), CODECS["jpeg-ls"], transcode_lossless=True)
    assert outcome.status is Status.KEPT and "never re-encoded" in outcome.reason
    # native now, but lossy once: the header says so
    mr.LossyImageCompression = "01"
    outcome = compress(_part10(mr), CODECS["jpeg-ls"])
    assert outcome.status is Status.KEPT and "lossy source" in outcome.reason


def test_lossless_compressed_data_is_left_alone_unless_transcoding(images: dict[str, bytes]) -> None:
    rle = compress(images["ct-signed"], CODECS["rle"]).data
    assert rle is not None
    assert compress(rle, CODECS["rle"], transcode_lossless=True).status is Status.KEPT  # already
    kept = compress(rle, CODECS["jpeg-ls"])
    assert kept.status is Status.KEPT and "already compressed losslessly" in kept.reason
    moved = compress(rle, CODECS["jpeg-ls"], transcode_lossless=True)
    assert moved.status is Status.COMPRESSED and moved.data is not None
    reference = pixel_array(dcmread(io.BytesIO(images["ct-signed"])), raw=True)
    assert np.array_equal(pixel_array(dcmread(io.BytesIO(moved.data)), raw=True), reference)
    # a transcode that would grow the file keeps what is there (JPEG-LS -> RLE)
    grows = compress(moved.data, CODECS["rle"], transcode_lossless=True)
    assert grows.status is Status.KEPT and "not smaller" in grows.reason


def test_a_result_that_is_not_smaller_is_not_kept(images: dict[str, bytes]) -> None:
    ds = dcmread(io.BytesIO(images["mr-12bit-odd"]))
    noise = np.random.default_rng(1).integers(0, 65536, (ds.Rows, ds.Columns), dtype=np.uint16)
    ds.set_pixel_data(noise, "MONOCHROME2", 16, generate_instance_uid=False)  # all 16 bits noise
    outcome = compress(_part10(ds), CODECS["jpeg-ls"])
    assert outcome.status is Status.KEPT and "not smaller" in outcome.reason


def test_bits_outside_bits_stored_keep_the_original(images: dict[str, bytes]) -> None:
    """A 12-bit image with something in the top 4 bits (overlay planes of old modalities): a
    12-bit lossless codec would silently drop them."""
    ds = dcmread(io.BytesIO(images["dx-12bit"]))
    raw = bytearray(ds.PixelData)
    raw[1] |= 0x80
    ds.PixelData = bytes(raw)
    outcome = compress(_part10(ds), CODECS["jpeg-ls"])
    assert outcome.status is Status.KEPT and "outside Bits Stored" in outcome.reason


LOSSY_BY_MISTAKE = Codec(
    "lossy-by-mistake", JPEGLSNearLossless, "pyjpegls", _jpeg_ls, {"jls_error": 3}, decoder="pyjpegls"
)


def test_a_result_that_decodes_differently_is_a_mismatch(images: dict[str, bytes]) -> None:
    outcome = compress(images["ct-signed"], LOSSY_BY_MISTAKE)
    assert outcome.status is Status.MISMATCH and "different pixels" in outcome.reason
    assert outcome.data is None


def test_a_codec_is_one_entry_in_the_table(monkeypatch: pytest.MonkeyPatch, images: dict[str, bytes]) -> None:
    """How HTJ2K will be added once an encoder exists: one Codec in CODECS, nothing else."""
    monkeypatch.setitem(CODECS, "rle-pydicom", Codec("rle-pydicom", RLELossless, "pydicom", _rle))
    cfg = parse_config(
        {
            "role": "frontend",
            "institution": "X",
            "dicom": {"allow_any_calling_ae": True},
            "compression": {"transfer_syntax": "rle-pydicom"},
        }
    )
    assert cfg.compression.transfer_syntax == "rle-pydicom"  # type: ignore[union-attr]
    assert compress(images["ct-signed"], CODECS["rle-pydicom"]).status is Status.COMPRESSED
    with pytest.raises(ConfigError, match=r"compression.transfer_syntax: unknown codec 'htj2k'"):
        parse_config(
            {
                "role": "frontend",
                "institution": "X",
                "dicom": {"allow_any_calling_ae": True},
                "compression": {"transfer_syntax": "htj2k"},
            }
        )


# ---- the stage: durable queue, worker, catalog, forwarder ----------------------------------------


def _ingest_all(tmp_path: Path, catalog: Catalog, store: FolderBlobStore, files: dict[str, bytes]) -> None:
    ingest = Ingest(catalog, store, quarantine=tmp_path / "q")
    for name, data in files.items():
        path = tmp_path / f"{name}.in.dcm"
        path.write_bytes(data)
        assert isinstance(ingest.accept_file(path, source="TEST"), Accepted)
        path.unlink()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_the_queue_survives_a_restart_and_mismatches_keep_the_original(
    db: str, tmp_path: Path, images: dict[str, bytes], new_pg_db: Callable[[], str]
) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}" if db == "sqlite" else new_pg_db()
    catalog = Catalog.open(url)
    store = FolderBlobStore(tmp_path / "blobs")
    CompressionStage(catalog, store, CODECS["jpeg-ls"]).install()  # queued, never run: a crash
    _ingest_all(tmp_path, catalog, store, {k: images[k] for k in ("ct-signed", "rgb-planar")})
    catalog.close()

    catalog = Catalog.open(url)  # the restart
    lossy = CompressionStage(catalog, store, LOSSY_BY_MISTAKE)
    assert lossy.backlog() == 2
    first = lossy.run_once()
    assert first and lossy.counts["mismatch"] == 1 and lossy.backlog() == 1
    stage = CompressionStage(catalog, store, CODECS["jpeg-ls"])
    assert stage.drain() == 1 and stage.backlog() == 0
    rows = {i.sop_uid: i for i in catalog.locate({})}
    syntaxes = sorted(i.transfer_syntax for i in rows.values())
    assert syntaxes == sorted([ExplicitVRLittleEndian, JPEGLSLossless])  # the mismatch kept its bytes
    for inst in rows.values():
        data = b"".join(store.get(inst.blob_key))
        assert hashlib.sha256(data).hexdigest() == inst.sha256 and len(data) == inst.size
    # one file per instance once the grace period is over: the replaced original is gone
    assert stage.sweep(utcnow() + stage.delete_grace) == 1
    assert len([p for p in (tmp_path / "blobs").rglob("*.dcm")]) == 2
    catalog.close()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_replaced_blob_stays_readable_for_the_grace_period_and_a_restart_resumes_its_deletion(
    db: str, tmp_path: Path, images: dict[str, bytes], new_pg_db: Callable[[], str]
) -> None:
    """A WADO-RS / C-MOVE read that looked the row up before the switch still gets the bytes; the
    old blob goes only after the grace period, and a crash in between does not forget it."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}" if db == "sqlite" else new_pg_db()
    catalog = Catalog.open(url)
    store = FolderBlobStore(tmp_path / "blobs")
    stage = CompressionStage(catalog, store, CODECS["jpeg-ls"], delete_grace=timedelta(seconds=60))
    stage.install()
    _ingest_all(tmp_path, catalog, store, {"ct-signed": images["ct-signed"]})
    [looked_up] = catalog.locate({})  # a reader's lookup, just before the switch
    assert stage.drain() == 1
    [now_stored] = catalog.locate({})
    assert now_stored.transfer_syntax == JPEGLSLossless and now_stored.blob_key != looked_up.blob_key

    held = b"".join(store.get(looked_up.blob_key))  # the reader reads the old key: still there
    assert hashlib.sha256(held).hexdigest() == looked_up.sha256 and held == images["ct-signed"]
    assert stage.sweep() == 0 and stage.retired() == 1  # within the grace period nothing goes
    assert len(list((tmp_path / "blobs").rglob("*.dcm"))) == 2
    catalog.close()  # a crash: the retired blob is recorded, not yet deleted

    catalog = Catalog.open(url)  # the restart; the grace period passes
    with catalog.write() as conn:
        conn.execute(update(retired_blobs).values(delete_after=utcnow() - timedelta(seconds=1)))
    restarted = CompressionStage(catalog, store, CODECS["jpeg-ls"])
    assert restarted.retired() == 1
    restarted.start()  # its worker sweeps
    try:
        wait_until(lambda: restarted.retired() == 0, what="the retired blob swept")
    finally:
        restarted.stop()
    with pytest.raises(BlobNotFound):
        b"".join(store.get(looked_up.blob_key))
    [inst] = catalog.locate({})
    data = b"".join(store.get(inst.blob_key))  # the catalog points at bytes that exist
    assert hashlib.sha256(data).hexdigest() == inst.sha256 == now_stored.sha256
    assert [p.name for p in (tmp_path / "blobs").rglob("*.dcm")] == [Path(inst.blob_key).name]
    catalog.close()


def _sample_series(root: Path) -> list[Path]:
    write_samples(root, ct_slices=3)
    return sorted(p for sub in ("01_CT_chest", "05_US_carotid") for p in (root / sub).glob("*.dcm"))


def test_frontend_compresses_after_ingest_and_forwards_only_the_compressed_bytes(
    start_center: Callable[..., Center], start_frontend: Callable[..., Frontend], tmp_path: Path
) -> None:
    files = _sample_series(tmp_path / "sent")
    center = start_center()
    fe = start_frontend(
        forward=forward_to(center, **FAST),
        compression={"transfer_syntax": "jpeg-ls", "delete_grace_seconds": 0},
    )
    stage = fe.compression
    assert stage is not None
    stage.stop()  # the worker is busy elsewhere: ingest goes on, the forwarder must wait
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    assert stage.backlog() == len(files)
    time.sleep(1.5)  # five times the settle time
    assert center.archive.catalog.counts()["instances"] == 0
    assert all("waiting for lossless compression" in r["last_error"] for r in forwarding(fe)), forwarding(fe)

    stage.start()
    wait_until(lambda: all_confirmed(fe, 2), what="both studies confirmed")
    assert stage.backlog() == 0
    assert stage.counts["compressed"] == len(files), stage.counts
    catalog, store = fe.archive.catalog, fe.archive.store
    for path in files:
        sent = dcmread(path)
        [inst] = catalog.locate({"SOPInstanceUID": str(sent.SOPInstanceUID)})
        assert inst.transfer_syntax == JPEGLSLossless
        stored = dcmread(io.BytesIO(b"".join(store.get(inst.blob_key))))
        assert stored.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert np.array_equal(pixel_array(stored, raw=True), pixel_array(sent, raw=True))
        row = catalog.pixel_row(inst.study_uid, inst.series_uid, inst.sop_uid)
        assert row is not None and row.pixel_offset is not None and row.pixel_length is None
        item = store.read_range(inst.blob_key, row.pixel_offset, 4)
        assert item == b"\xfe\xff\x00\xe0"  # the Basic Offset Table item: frames are cut from here
        # the center got exactly these bytes, and only these (no earlier uncompressed version)
        [at_center] = center.archive.catalog.locate({"SOPInstanceUID": inst.sop_uid})
        assert at_center.sha256 == inst.sha256
        assert center.archive.catalog.versions(inst.sop_uid) == []
    # originals removed by the worker's next sweep (no grace period here)
    wait_until(lambda: len(list(fe.cfg.storage.path.rglob("*.dcm"))) == len(files), what="originals removed")
    # WADO-RS frames: the stored JPEG-LS frame as is, and decoded to the very bytes that were sent
    sent = dcmread(files[0])
    web = DICOMwebClient(url=f"http://127.0.0.1:{fe.http_port}/dicom-web", headers=auth(fe))
    uids = (str(sent.StudyInstanceUID), str(sent.SeriesInstanceUID), str(sent.SOPInstanceUID))
    [raw] = web.retrieve_instance_frames(*uids, frame_numbers=[1], media_types=("application/octet-stream",))
    assert raw == sent.PixelData
    [jls] = web.retrieve_instance_frames(*uids, frame_numbers=[1], media_types=("image/jls",))
    assert jls[:2] == b"\xff\xd8" and len(jls) < len(raw) / 2  # a JPEG-LS codestream (SOI)
    # octet-stream with transfer-syntax=* (Cornerstone's default): as stored, labelled, not decoded
    any_syntax = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    star = httpx.get(
        f"http://127.0.0.1:{fe.http_port}/dicom-web/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/frames/1",
        headers={**auth(fe), "Accept": any_syntax},
        timeout=30,
    )
    assert star.status_code == 200
    assert f"application/octet-stream; transfer-syntax={JPEGLSLossless}".encode() in star.content[:1000]
    assert jls in star.content and len(star.content) < len(raw) / 2

    # the modality sends the same again: duplicates of the received bytes, nothing changes
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    assert stage.backlog() == 0
    assert len(list(fe.cfg.storage.path.rglob("*.dcm"))) == len(files)  # no copy of them left behind
    assert all(catalog.versions(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)) == [] for p in files)
    text = _metrics(fe)
    assert re.search(rf'ybyx_codec_instances_total{{outcome="compressed"}} {len(files)}\b', text), text
    assert "ybyx_codec_backlog 0" in text


def _metrics(fe: Frontend) -> str:
    r = httpx.get(f"http://127.0.0.1:{fe.http_port}/metrics", headers=auth(fe), timeout=10)
    r.raise_for_status()
    return r.text


def test_compression_on_an_encrypted_blob_store(
    start_frontend: Callable[..., Frontend], tmp_path: Path
) -> None:
    """With encryption at rest (R-SE-10) the stage reads and writes through the sealed store."""
    files = ct_series(tmp_path / "ct", slices=2)
    fe = start_frontend(
        encryption={"enabled": True}, compression={"transfer_syntax": "jpeg-ls", "delete_grace_seconds": 0}
    )
    stage = fe.compression
    assert stage is not None
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    wait_until(lambda: stage.backlog() == 0, what="compressed")
    assert stage.counts["compressed"] == len(files), stage.counts
    for path in files:
        sent = dcmread(path)
        [inst] = fe.archive.catalog.locate({"SOPInstanceUID": str(sent.SOPInstanceUID)})
        assert inst.transfer_syntax == JPEGLSLossless
        stored = dcmread(io.BytesIO(b"".join(fe.archive.store.get(inst.blob_key))))
        assert np.array_equal(pixel_array(stored, raw=True), pixel_array(sent, raw=True))
    wait_until(lambda: stage.retired() == 0, what="originals swept")
    on_disk = list(fe.cfg.storage.path.rglob("*.dcm"))
    assert len(on_disk) == len(files) and not any(b"DICM" in p.read_bytes()[:256] for p in on_disk)


def test_a_front_end_compresses_with_jpeg_ls_unless_told_otherwise() -> None:
    """R-UP-1: lossless compression before upload is the default, not an option to remember."""
    cfg = parse_config({"role": "frontend", "institution": "X", "dicom": {"allow_any_calling_ae": True}})
    section = cfg.compression  # type: ignore[union-attr]
    assert (section.transfer_syntax, section.transcode_lossless) == ("jpeg-ls", False)
    assert CODECS[section.transfer_syntax].transfer_syntax == JPEGLSLossless
    assert all(codec.available() for codec in CODECS.values())

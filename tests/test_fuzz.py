"""Hardened input (issue 6 §8): fuzzed STOW-RS bodies and C-STORE data sets never crash the node,
never leave a partial write (the catalog and the blob store stay consistent, the spool empty), and
always get a clear answer; UIDs from URLs or data sets cannot reach outside the blob store.

Hypothesis runs bounded (``max_examples``, no per-example deadline) so the file adds seconds, not
minutes; failures print the shrunk input.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dimse.scu import send
from gateway.archive.blobstore import BlobStore, FolderBlobStore
from gateway.archive.catalog import Catalog
from gateway.archive.schema import instance_versions, instances
from gateway.frontend import Frontend
from gateway.ingest import Accepted, Refused
from tests.conftest import auth

FUZZ = settings(
    max_examples=int(os.environ.get("YBYX_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={}'


def instance(seed: int | None = None) -> bytes:
    """A small valid Part-10 CT instance (8×8 pixels); the same bytes for the same ``seed`` (as
    hypothesis needs), fresh UIDs without one."""
    salt = str(seed) if seed is not None else uuid.uuid4().hex

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=[kind, salt]))

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = uid("sop")
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.PatientName = "FUZZ^TEST"
    ds.PatientID = "FUZZ1"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(128))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


BASE = instance(0)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A Part-10 instance damaged the ways networks, disks and attackers damage them."""
    data = bytearray(instance(draw(st.integers(0, 10**6))))  # mostly new instances, some again
    kind = draw(st.sampled_from(["garbage", "truncate", "flip", "splice", "valid"]))
    if kind == "garbage":
        return draw(st.binary(max_size=1500))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[pos] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "splice":
        i = draw(st.integers(0, len(data)))
        j = draw(st.integers(i, len(data)))
        return bytes(data[:i]) + draw(st.binary(max_size=64)) + bytes(data[j:])
    return bytes(data)


def stored_state(fe: Frontend) -> tuple[set[str], set[str]]:
    """(blob keys the catalog references, objects the blob store holds) — equal when consistent."""
    return archive_state(fe.archive.catalog, fe.archive.store)


def archive_state(catalog: Catalog, store: BlobStore) -> tuple[set[str], set[str]]:
    """:func:`stored_state` of any catalog and folder blob store (also used by ``fuzz/``)."""
    with catalog.engine.connect() as conn:
        keys = set(conn.execute(select(instances.c.blob_key)).scalars())
        keys |= set(conn.execute(select(instance_versions.c.blob_key)).scalars())
    assert isinstance(store, FolderBlobStore)
    held = {
        str(p.relative_to(store.root))
        for p in store.root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(store.root).parts)
    }
    return keys, held


def spool_files(fe: Frontend) -> list[Path]:
    return [p for p in fe.core.spool.rglob("*") if p.is_file()] if fe.core.spool.exists() else []


def assert_consistent(fe: Frontend) -> None:
    keys, held = stored_state(fe)
    assert keys == held, f"catalog and blob store differ: {sorted(keys ^ held)[:5]}"
    assert spool_files(fe) == []


# ---- C-STORE data sets (the ingest path every C-STORE takes) -----------------------------------


def test_fuzzed_instances_are_stored_whole_or_refused_with_a_reason(
    frontend: Frontend, tmp_path: Path
) -> None:
    @FUZZ
    @given(data=mutated())
    def check(data: bytes) -> None:
        path = tmp_path / f"{uuid.uuid4().hex}.dcm"
        path.write_bytes(data)
        before = stored_state(frontend)
        result = frontend.ingest.accept_file(path, source="FUZZER")
        assert isinstance(result, Accepted | Refused)
        if isinstance(result, Refused):
            assert result.reason.strip() and result.kind in {"malformed", "missing-attribute", "mismatch"}
            assert stored_state(frontend) == before  # nothing half-stored
        else:
            assert result.sop_uid in {i.sop_uid for i in frontend.archive.catalog.locate({})}
        assert_consistent(frontend)

    check()


def test_an_unknown_vr_in_photometric_interpretation_is_refused_as_malformed(
    frontend: Frontend, tmp_path: Path
) -> None:
    """Found by the test above (once, in session 7): one flipped byte turned Photometric
    Interpretation's VR ``CS`` into ``C\\x00``; reading it to locate the frames raised out of
    ingest instead of refusing the file."""
    good = instance()
    at = good.index(b"\x28\x00\x04\x00CS")
    path = tmp_path / "bad-vr.dcm"
    path.write_bytes(good[: at + 5] + b"\x00" + good[at + 6 :])
    before = stored_state(frontend)
    result = frontend.ingest.accept_file(path, source="FUZZER")
    assert isinstance(result, Refused) and result.kind == "malformed", result
    assert "Unknown Value Representation" in result.reason
    assert stored_state(frontend) == before
    assert_consistent(frontend)


def test_fuzzed_c_stores_over_dimse_get_a_status_and_leave_no_partial_write(
    frontend: Frontend, tmp_path: Path
) -> None:
    @settings(FUZZ, max_examples=min(FUZZ.max_examples, 15))
    @given(data=mutated())
    def check(data: bytes) -> None:
        path = tmp_path / f"{uuid.uuid4().hex}.dcm"
        path.write_bytes(data)
        report = send([path], "127.0.0.1", frontend.dicom_port, "YBYX")
        if report.failed:
            assert all(reason.strip() for reason in report.failed.values())
        assert_consistent(frontend)

    check()


# ---- STOW-RS bodies --------------------------------------------------------------------------


@st.composite
def stow_body(draw: st.DrawFn) -> tuple[str, bytes]:
    """(Content-Type, body): multipart framing right or broken, parts whole or damaged."""
    boundary = draw(st.sampled_from(["b0undary", "x" * 70, "a'b(c)d+e_f,g-h.i/j:k=l?m n"]))
    parts = draw(st.lists(mutated(), min_size=0, max_size=3))
    framing = draw(st.sampled_from(["ok", "no-close", "truncated", "bad-headers", "garbage", "other-type"]))
    chunks = []
    for part in parts:
        headers = b"Content-Type: application/dicom\r\n"
        if framing == "bad-headers":
            headers = draw(st.binary(max_size=80)).replace(b"\r\n\r\n", b"") + b"\r\n"
        chunks.append(b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n" + part + b"\r\n")
    body = b"".join(chunks)
    if framing != "no-close":
        body += b"--" + boundary.encode() + b"--\r\n"
    if framing == "truncated" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    if framing == "garbage":
        body = draw(st.binary(max_size=2000))
    content_type = STOW_TYPE.format(f'"{boundary}"')
    if framing == "other-type":
        content_type = draw(st.sampled_from(["application/dicom", "multipart/related", "text/plain", ""]))
    return content_type, body


def test_fuzzed_stow_bodies_get_a_clear_answer_and_store_whole_instances_only(frontend: Frontend) -> None:
    url = f"http://127.0.0.1:{frontend.http_port}/dicom-web/studies"
    headers = auth(frontend)
    with httpx.Client(timeout=30) as http:

        @FUZZ
        @given(request=stow_body())
        def check(request: tuple[str, bytes]) -> None:
            content_type, body = request
            held_before = len(frontend.archive.catalog.locate({}))
            r = http.post(url, content=body, headers={**headers, "Content-Type": content_type})
            assert r.status_code in (200, 202, 400, 409, 413, 415), (r.status_code, r.text[:300])
            if r.status_code >= 400 and r.status_code != 409:
                assert r.text.strip(), f"{r.status_code} without a reason"
                assert len(frontend.archive.catalog.locate({})) == held_before  # a bad body stores nothing
            else:
                answer = json.loads(r.text)
                for item in answer.get("00081198", {}).get("Value", []):  # Failed SOP Sequence
                    assert item["00081197"]["Value"][0]  # each failure has its Failure Reason
                assert "Traceback" not in r.text
            assert_consistent(frontend)

        check()


# ---- UIDs and paths --------------------------------------------------------------------------


@pytest.mark.parametrize("uid", ["../../../../tmp/evil", "1.2/../../3", "..", "1.2.3\\..\\4", "/etc/passwd"])
def test_uids_in_data_sets_cannot_steer_paths(frontend: Frontend, uid: str, tmp_path: Path) -> None:
    path = tmp_path / "evil.dcm"
    ds = dcmread(io.BytesIO(instance()))
    ds.StudyInstanceUID = uid
    ds.save_as(path, enforce_file_format=True)
    result = frontend.ingest.accept_file(path, source="EVIL")
    assert isinstance(result, Refused) and "StudyInstanceUID" in result.reason
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n--b--\r\n"
    r = httpx.post(
        f"http://127.0.0.1:{frontend.http_port}/dicom-web/studies",
        content=body,
        headers={**auth(frontend), "Content-Type": STOW_TYPE.format("b")},
    )
    assert r.status_code == 409, r.text
    assert frontend.archive.catalog.counts()["instances"] == 0
    assert not Path("/tmp/evil").exists()
    _, held = stored_state(frontend)
    assert held == set()  # nothing placed, inside the store or beside it
    assert_consistent(frontend)


@pytest.mark.parametrize(
    "path",
    [
        "/dicom-web/studies/..%2F..%2Fetc/metadata",
        "/dicom-web/studies/1.2.3/series/..%2F..%2F..%2Fpasswd/instances/4/frames/1",
        "/dicom-web/studies/1.2.3/series/4.5/instances/%2E%2E%2F%2E%2E/bulk/7FE00010",
        "/dicom-web/studies/1.2.3/series/4.5/instances/" + "9" * 300,
        "/dicom-web/studies?StudyInstanceUID=../../x",
    ],
)
def test_uids_in_urls_are_refused_not_followed(frontend: Frontend, path: str) -> None:
    r = httpx.get(f"http://127.0.0.1:{frontend.http_port}{path}", headers=auth(frontend))
    assert r.status_code in (400, 404), (r.status_code, r.text[:200])
    assert "Traceback" not in r.text and str(frontend.archive.store.root) not in r.text  # type: ignore[attr-defined]


def test_blob_keys_outside_the_store_are_refused(frontend: Frontend) -> None:
    store = frontend.archive.store
    for key in ("../outside", "a/../../b", "/abs"):
        with pytest.raises(ValueError):
            store.put(key, io.BytesIO(b"x"))
        with pytest.raises(ValueError):
            store.read_range(key, 0, 1)


# ---- JSON bodies (exam records from the RIS/HIS) --------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_EXAM_FIELDS = [
    "hospital_code",
    "hospital_level",
    "accession_number",
    "study_uid",
    "id_type",
    "id_number",
    "patient_name",
    "exam_item_code",
    "report_time",
    "visit_type",
    "modality",
    "diagnosis",
]


@st.composite
def exam_request(draw: st.DrawFn) -> bytes:
    """A well-formed exam record with some fields replaced by anything JSON can hold, or any JSON,
    or bytes that are not JSON at all."""
    from tests.test_exams import exam_body

    kind = draw(st.sampled_from(["fields", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(_JSON)).encode()
    body = exam_body("1.2.826.0.1.3680043.9.7.1")
    for name in draw(st.lists(st.sampled_from(_EXAM_FIELDS), min_size=1, max_size=4, unique=True)):
        body[name] = draw(_JSON)
    return json.dumps(body).encode()


def test_fuzzed_exam_records_get_a_clear_answer(
    start_frontend: Callable[..., Frontend], tmp_path: Path
) -> None:
    from gateway.identity import write_new_key

    key = tmp_path / "pseudonym.key"
    write_new_key(key)
    fe = start_frontend(identity={"key_file": str(key)})
    url = f"http://127.0.0.1:{fe.http_port}/api/v1/exams"
    headers = {**auth(fe), "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as http:

        @settings(FUZZ, max_examples=min(FUZZ.max_examples, 80))
        @given(body=exam_request())
        def check(body: bytes) -> None:
            r = http.post(url, content=body, headers=headers)
            assert r.status_code < 500, (r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert r.text.strip() and "Traceback" not in r.text

        check()

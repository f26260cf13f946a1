"""STOW-RS against a live server, and the multipart parser under it (PS3.18 §10.5; issue 3 §2)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread

from dicomweb.multipart import (
    MultipartError,
    MultipartParser,
    MultipartWriter,
    PartData,
    PartEnd,
    PartStart,
    parse_content_type,
    spool_parts,
)
from gateway.frontend import Frontend

DICOM_JSON = "application/dicom+json"
RELATED = "multipart/related; type=application/dicom"
RETRIEVE_URL, FAILED, FAILURE_REASON, REFERENCED = "00081190", "00081198", "00081197", "00081199"
SOP_INSTANCE_UID, WARNING_REASON = "00081155", "00081196"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def ct_files(samples: Path) -> list[Path]:
    return sorted((samples / "01_CT_chest").iterdir())


def dicom_part(data: bytes, **headers: str) -> tuple[dict[str, str], bytes]:
    return {"Content-Type": "application/dicom", **headers}, data


def post(
    url: str, parts: list[tuple[dict[str, str], bytes]], headers: dict[str, str], **kw: Any
) -> httpx.Response:
    """STOW-RS ``parts`` to ``url``; ``headers``: the bearer token (the ``headers`` fixture)."""
    writer = MultipartWriter()
    body = b"".join(writer.iter(parts))
    return httpx.post(
        url, content=body, headers={"Content-Type": writer.content_type, **headers}, timeout=60, **kw
    )


def sequence(response: httpx.Response, tag: str) -> list[dict[str, Any]]:
    assert response.headers["content-type"] == DICOM_JSON
    items: list[dict[str, Any]] = response.json().get(tag, {}).get("Value", [])
    return items


def value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def blob_files(fe: Frontend) -> list[Path]:
    """The stored objects (not the spool, not temporary names)."""
    root = fe.cfg.storage.path
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )


def assert_spool_empty(fe: Frontend) -> None:
    spool = fe.cfg.storage.path / ".spool"
    assert not spool.exists() or list(spool.iterdir()) == []


def assert_nothing_stored(fe: Frontend) -> None:
    assert fe.archive.catalog.counts()["instances"] == 0
    assert blob_files(fe) == []
    assert_spool_empty(fe)


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


# ---------------------------------------------------------------------------- STOW-RS, live


def test_dicomweb_client_stores_a_ct_series_with_hashes_that_match_the_blobs(
    frontend: Frontend, dicomweb: str, headers: dict[str, str], ct_files: list[Path]
) -> None:
    statuses: list[int] = []
    session = requests.Session()
    session.headers.update(headers)
    session.hooks["response"].append(lambda r, *_a, **_k: statuses.append(r.status_code))
    client = DICOMwebClient(url=dicomweb, session=session)
    datasets = [dcmread(p) for p in ct_files]

    result = client.store_instances(datasets)

    assert statuses == [200]
    study = datasets[0].StudyInstanceUID
    assert result.RetrieveURL == f"{dicomweb}/studies/{study}"
    assert len(result.ReferencedSOPSequence) == len(ct_files)
    assert "FailedSOPSequence" not in result
    stored = {i.sop_uid: i for i in frontend.archive.catalog.locate({"StudyInstanceUID": study})}
    assert set(stored) == {ds.SOPInstanceUID for ds in datasets}
    for item in result.ReferencedSOPSequence:
        inst = stored[item.ReferencedSOPInstanceUID]
        assert item.ReferencedSOPClassUID == inst.sop_class_uid
        assert item.RetrieveURL == (
            f"{dicomweb}/studies/{study}/series/{inst.series_uid}/instances/{inst.sop_uid}"
        )
        blob = b"".join(frontend.archive.store.get(inst.blob_key))
        assert hashlib.sha256(blob).hexdigest() == inst.sha256
        assert len(blob) == inst.size
    assert_spool_empty(frontend)


def test_a_part_that_is_not_dicom_fails_and_the_other_is_stored(
    frontend: Frontend, dicomweb: str, headers: dict[str, str], ct_files: list[Path]
) -> None:
    r = post(
        f"{dicomweb}/studies",
        [dicom_part(ct_files[0].read_bytes()), dicom_part(b"not a DICOM file")],
        headers,
    )

    assert r.status_code == 202, r.text
    [ok] = sequence(r, REFERENCED)
    [bad] = sequence(r, FAILED)
    assert value(ok, SOP_INSTANCE_UID) == dcmread(ct_files[0]).SOPInstanceUID
    assert value(bad, FAILURE_REASON) == 0xC000 == 49152
    assert "Value" not in bad[SOP_INSTANCE_UID]  # unknown: the part could not be read
    assert "part 2" in r.headers["warning"] and "not readable as DICOM" in r.headers["warning"]
    assert frontend.archive.catalog.counts()["instances"] == 1
    assert_spool_empty(frontend)


def test_an_instance_of_another_study_than_the_path_fails_with_43265(
    frontend: Frontend, dicomweb: str, headers: dict[str, str], ct_files: list[Path], samples: Path
) -> None:
    ct = dcmread(ct_files[0], stop_before_pixels=True)
    r = post(f"{dicomweb}/studies/1.2.3.4.5", [dicom_part(ct_files[0].read_bytes())], headers)

    assert r.status_code == 409, r.text
    [bad] = sequence(r, FAILED)
    assert value(bad, FAILURE_REASON) == 43265  # A9xx: does not match (the path's study)
    assert value(bad, SOP_INSTANCE_UID) == ct.SOPInstanceUID
    assert "1.2.3.4.5" in r.headers["warning"]
    assert_nothing_stored(frontend)

    mr = next((samples / "02_MR_brain").iterdir())
    r = post(
        f"{dicomweb}/studies/{ct.StudyInstanceUID}",
        [dicom_part(ct_files[0].read_bytes()), dicom_part(mr.read_bytes())],
        headers,
    )
    assert r.status_code == 202, r.text
    assert value(r.json(), RETRIEVE_URL) == f"{dicomweb}/studies/{ct.StudyInstanceUID}"
    assert [value(i, SOP_INSTANCE_UID) for i in sequence(r, REFERENCED)] == [ct.SOPInstanceUID]
    assert [value(i, FAILURE_REASON) for i in sequence(r, FAILED)] == [43265]
    assert frontend.archive.catalog.counts()["instances"] == 1


def test_content_digest_is_verified_before_anything_is_stored(
    frontend: Frontend, dicomweb: str, headers: dict[str, str], ct_files: list[Path]
) -> None:
    data = ct_files[0].read_bytes()
    wrong = f"sha-256=:{sha256_b64(data + b'x')}:"
    r = post(f"{dicomweb}/studies", [dicom_part(data, **{"Content-Digest": wrong})], headers)
    assert r.status_code == 409, r.text
    [bad] = sequence(r, FAILED)
    assert value(bad, FAILURE_REASON) == 0x0110
    assert "Content-Digest sha-256 does not match" in r.headers["warning"]
    assert_nothing_stored(frontend)
    assert list(frontend.cfg.ingest.quarantine.iterdir()) == []  # never reached ingest

    sha512 = base64.b64encode(hashlib.sha512(data).digest()).decode()
    right = f"sha-512=:{sha512}:, sha-256=:{sha256_b64(data)}:, md5=:AAAA:"
    r = post(f"{dicomweb}/studies", [dicom_part(data, **{"Content-Digest": right})], headers)
    assert r.status_code == 200, r.text
    [inst] = frontend.archive.catalog.locate({"SOPInstanceUID": dcmread(ct_files[0]).SOPInstanceUID})
    assert inst.sha256 == hashlib.sha256(data).hexdigest()


def test_a_body_over_the_limit_is_refused_with_413_and_nothing_stored(
    frontend: Frontend, ct_files: list[Path], headers: dict[str, str]
) -> None:
    from gateway.web import build_app
    from tests.peers.http import serve

    # the front-end's own app (guard included), with a tiny body limit
    app = build_app(
        "frontend",
        frontend.archive,
        frontend.ingest,
        max_request_bytes=1000,
        spool=str(frontend.cfg.storage.path / ".spool"),
        api_routes=[],
        security=frontend.security,
    )
    writer = MultipartWriter()
    body = b"".join(writer.iter([dicom_part(ct_files[0].read_bytes())]))

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(body), 300):
            yield body[i : i + 300]

    with serve(app) as base:
        url = f"{base}/dicom-web/studies"
        sent = {**headers, "Content-Type": writer.content_type}
        declared = httpx.post(url, content=body, headers=sent, timeout=30)
        streamed = httpx.post(url, content=chunked(), headers=sent, timeout=30)
        small = httpx.post(url, content=body[:900], headers=sent, timeout=30)

    assert declared.status_code == 413, declared.text
    assert "Content-Length" in declared.text and "1000 bytes" in declared.text
    assert streamed.status_code == 413, streamed.text
    assert "the body exceeds" in streamed.text
    assert small.status_code == 400  # under the limit, reaches the parser (truncated)
    assert_nothing_stored(frontend)


def test_a_client_that_goes_away_mid_body_leaves_nothing_stored_or_spooled(
    frontend: Frontend, dicomweb: str, headers: dict[str, str], ct_files: list[Path]
) -> None:
    writer = MultipartWriter()
    body = b"".join(writer.iter([dicom_part(p.read_bytes()) for p in ct_files[:3]]))
    url = httpx.URL(dicomweb)
    spool = frontend.cfg.storage.path / ".spool"
    head = (
        f"POST {url.path}/studies HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: {writer.content_type}\r\n"
        f"Authorization: {headers['Authorization']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((url.host, url.port or 80)) as sock:
        sock.sendall(head.encode() + body[: len(body) * 2 // 3])
        wait_for(lambda: spool.is_dir() and any(spool.iterdir()), "a part in the spool")
    wait_for(lambda: not any(spool.iterdir()), "the spool to be emptied")
    assert_nothing_stored(frontend)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("content_type", "body", "status", "message"),
    [
        (f"{RELATED}; boundary=b1", b"--b1\r\n\r\nDICM", 400, "closing delimiter"),
        (f"{RELATED}; boundary=b1", b"", 400, "empty"),
        (f"{RELATED}; boundary=b1", b"--b1--\r\n", 400, "no parts"),
        (f"{RELATED}; boundary=b1", b"hello", 400, "no boundary delimiter"),
        (RELATED, b"--b1\r\n\r\nx\r\n--b1--", 400, "no boundary parameter"),
        ('multipart/related; type="application/dicom; boundary=b1', b"--b1--", 400, "cannot parse"),
        ("application/dicom", b"DICM", 415, "application/dicom"),
        ("multipart/form-data; boundary=b1", b"--b1--", 415, "multipart/form-data"),
        ("multipart/related; type=application/dicom+json; boundary=b1", b"--b1--", 415, "not supported"),
        ("multipart/related; type=image/jpeg; boundary=b1", b"--b1--", 415, "image/jpeg"),
    ],
)
def test_a_malformed_or_unsupported_request_is_refused_with_a_message(
    frontend: Frontend,
    dicomweb: str,
    headers: dict[str, str],
    content_type: str,
    body: bytes,
    status: int,
    message: str,
) -> None:
    r = httpx.post(
        f"{dicomweb}/studies", content=body, headers={"Content-Type": content_type, **headers}, timeout=30
    )
    assert r.status_code == status, r.text
    assert message in r.text
    assert_nothing_stored(frontend)


def test_storing_the_same_instance_twice_succeeds_without_a_second_copy(
    frontend: Frontend, dicomweb: str, headers: dict[str, str], ct_files: list[Path]
) -> None:
    data = ct_files[0].read_bytes()
    first = post(f"{dicomweb}/studies", [dicom_part(data)], headers)
    blobs = blob_files(frontend)
    second = post(f"{dicomweb}/studies", [dicom_part(data)], headers)

    assert (first.status_code, second.status_code) == (200, 200)
    assert sequence(first, REFERENCED) == sequence(second, REFERENCED)
    assert WARNING_REASON not in sequence(second, REFERENCED)[0]
    assert frontend.archive.catalog.counts()["instances"] == 1
    assert frontend.archive.catalog.versions(dcmread(ct_files[0]).SOPInstanceUID) == []
    assert blob_files(frontend) == blobs and len(blobs) == 1


def test_a_large_chunked_body_is_streamed_not_held_in_memory(
    frontend: Frontend, dicomweb: str, headers: dict[str, str], ct_files: list[Path], samples: Path
) -> None:
    import tracemalloc

    dx = next((samples / "03_DX_chest").iterdir())
    files = [dx, *ct_files, dx]  # the second DX is a duplicate: stored once, reported twice
    total = sum(p.stat().st_size for p in files)
    assert total > 25_000_000
    warm_up = post(f"{dicomweb}/studies", [dicom_part(ct_files[0].read_bytes())], headers)  # imports, caches
    assert warm_up.status_code == 200

    def read(path: Path) -> Iterator[bytes]:
        with path.open("rb") as fh:
            while chunk := fh.read(64 * 1024):
                yield chunk

    writer = MultipartWriter()
    parts = [({"Content-Type": "application/dicom"}, read(p)) for p in files]
    tracemalloc.start()
    try:
        r = httpx.post(
            f"{dicomweb}/studies",
            content=writer.iter(parts),
            headers={"Content-Type": writer.content_type, **headers},
            timeout=120,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert r.status_code == 200, r.text
    assert len(sequence(r, REFERENCED)) == len(files)
    # Client and server run in this process: together they held a small fraction of the body
    # (about 2.5 MB here: the spool's 1 MiB write batch, socket buffers, one header at a time).
    assert peak < total / 4, f"peak {peak:,} bytes for a {total:,}-byte body"
    assert frontend.archive.catalog.counts()["instances"] == len(files) - 1


# ---------------------------------------------------------------------------- the parser


def parse(body: bytes, boundary: str, chunks: list[bytes]) -> list[tuple[dict[str, str], bytes]]:
    parser = MultipartParser(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    open_part = False
    for chunk in chunks:
        for event in parser.feed(chunk):
            if isinstance(event, PartStart):
                parts.append((event.headers, b""))
                open_part = True
            elif isinstance(event, PartData):
                assert open_part
                parts[-1] = (parts[-1][0], parts[-1][1] + event.data)
            else:
                assert isinstance(event, PartEnd)
                open_part = False
    parser.finish()
    assert b"".join(chunks) == body
    return parts


TRICKY = [
    ({"Content-Type": "application/dicom", "Content-Digest": "sha-256=:x:"}, b"DICM\r\n--bound\r\r\n-\r\n--"),
    ({}, b""),  # no headers, empty body
    ({"X-Folded": "a"}, b"\r\n"),
]
EXPECTED = [
    ({"content-type": "application/dicom", "content-digest": "sha-256=:x:"}, b"DICM\r\n--bound\r\r\n-\r\n--"),
    ({}, b""),
    ({"x-folded": "a"}, b"\r\n"),
]


@pytest.fixture
def tricky_body() -> bytes:
    body = b"".join(MultipartWriter(boundary="boundary42").iter(TRICKY))
    return b"a preamble\r\n" + body + b"an epilogue --boundary42 ignored"


def test_parser_gives_the_same_parts_whatever_the_chunking(tricky_body: bytes) -> None:
    assert parse(tricky_body, "boundary42", [tricky_body]) == EXPECTED
    one_byte = [tricky_body[i : i + 1] for i in range(len(tricky_body))]
    assert parse(tricky_body, "boundary42", one_byte) == EXPECTED
    for cut in range(len(tricky_body) + 1):  # the split falls at every position of every delimiter
        assert parse(tricky_body, "boundary42", [tricky_body[:cut], tricky_body[cut:]]) == EXPECTED, cut
    for a in range(0, len(tricky_body), 7):
        for b in range(a, len(tricky_body), 11):
            chunks = [tricky_body[:a], tricky_body[a:b], tricky_body[b:]]
            assert parse(tricky_body, "boundary42", chunks) == EXPECTED, (a, b)


def test_parser_refuses_every_truncation_before_the_closing_delimiter(tricky_body: bytes) -> None:
    complete = tricky_body.index(b"--boundary42--") + len("--boundary42--")
    for cut in range(complete):
        with pytest.raises(MultipartError):
            parse(tricky_body[:cut], "boundary42", [tricky_body[:cut]])
    parse(tricky_body[:complete], "boundary42", [tricky_body[:complete]])


def test_parser_handles_padding_folding_and_first_delimiter_without_crlf() -> None:
    body = b"--b \t\r\nA: 1\r\nB: x\r\n  y\r\nA: 2\r\n\r\nbody\r\n--b--"
    assert parse(body, "b", [body]) == [({"a": "1, 2", "b": "x y"}, b"body")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"--b\r\nno colon\r\n\r\nx\r\n--b--", "malformed header line"),
        (b"--b\r\n\r\nx\r\n--bad\r\n--b--", "unexpected bytes"),
        (b"--b\r\n\r\nx", "without the closing delimiter '--b--'"),
        (b"--b\r\nA: 1", "in a part's headers"),
        (b"nothing here", "no boundary delimiter"),
    ],
)
def test_parser_names_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse(body, "b", [body])


def test_parser_header_block_is_bounded() -> None:
    parser = MultipartParser("b", max_header_bytes=100)
    with pytest.raises(MultipartError, match="exceed 100 bytes"):
        parser.feed(b"--b\r\nA: " + b"x" * 200)


def test_content_type_parameters() -> None:
    assert parse_content_type('Multipart/Related; type="application/dicom"; boundary=abc') == (
        "multipart/related",
        {"type": "application/dicom", "boundary": "abc"},
    )
    assert parse_content_type('multipart/related;boundary="a \\"q\\" b";TYPE=application/dicom;') == (
        "multipart/related",
        {"boundary": 'a "q" b', "type": "application/dicom"},
    )
    assert parse_content_type("application/dicom") == ("application/dicom", {})
    for bad in ("", "dicom", 'a/b; c="unterminated', "a/b; c"):
        with pytest.raises(MultipartError):
            parse_content_type(bad)


def test_writer_round_trips_through_the_parser_sync_and_async() -> None:
    parts = [({"Content-Type": "application/dicom"}, b"one"), ({"Content-Type": "application/dicom"}, b"two")]
    writer = MultipartWriter()
    media_type, params = parse_content_type(writer.content_type)
    assert (media_type, params["type"]) == ("multipart/related", "application/dicom")
    body = b"".join(writer.iter([(h, [b[:1], b[1:]]) for h, b in parts]))
    expected = [
        ({"content-type": "application/dicom"}, b"one"),
        ({"content-type": "application/dicom"}, b"two"),
    ]
    assert parse(body, params["boundary"], [body]) == expected

    async def agen(data: bytes) -> AsyncIterator[bytes]:
        for i in range(len(data)):
            yield data[i : i + 1]

    async def collect() -> bytes:
        async_parts = [(parts[0][0], agen(parts[0][1])), (parts[1][0], iter([parts[1][1]]))]
        return b"".join([chunk async for chunk in writer.aiter(async_parts)])

    assert anyio.run(collect) == body


def test_spool_parts_writes_each_body_to_a_file_and_cleans_up_on_error(tmp_path: Path) -> None:
    writer = MultipartWriter(boundary="zz")
    big = bytes(range(256)) * 5000
    body = b"".join(writer.iter([({"A": "1"}, big), ({}, b"small")]))

    async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    async def spool(data: bytes) -> list[tuple[dict[str, str], bytes, int, bytes]]:
        got = []
        async for part in spool_parts(chunks(data, 1000), "zz", tmp_path, write_batch=4096):
            got.append((dict(part.headers), part.path.read_bytes(), part.size, part.sha256))
            part.path.unlink()
        return got

    got = anyio.run(spool, body)
    assert got == [
        ({"a": "1"}, big, len(big), hashlib.sha256(big).digest()),
        ({}, b"small", 5, hashlib.sha256(b"small").digest()),
    ]
    with pytest.raises(MultipartError, match="truncated"):
        anyio.run(spool, body[: len(big) // 2])
    assert list(tmp_path.iterdir()) == []


def test_warning_headers_are_ascii_and_name_the_part(
    frontend: Frontend, dicomweb: str, headers: dict[str, str]
) -> None:
    r = post(f"{dicomweb}/studies", [dicom_part("不是 DICOM".encode())], headers)
    assert r.status_code == 409
    assert r.headers["warning"].startswith('299 ybyx "part 1 (SOP Instance UID unknown): ')
    assert json.loads(r.content)[FAILED]["Value"][0][FAILURE_REASON] == {"vr": "US", "Value": [0xC000]}

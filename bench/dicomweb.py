"""DICOMweb benchmark: a ybyx sharing center against Orthanc's DICOMweb plugin, same machine, same run.

Servers (fresh, under one work folder, loopback only, ``TCP_NODELAY=1`` in their environment):

* **ybyx**: ``ybyx center -c <generated toml>`` as a subprocess (its own process, like Orthanc, so
  the Python client below does not share a GIL with it): folder blob store + SQLite, loaded by
  STOW-RS (batches of 50 parts);
* **Orthanc**: the Debian package 1.10 with the DICOMweb plugin 1.7, SQLite index
  (``tests/peers/orthanc.py``), loaded with ``POST /instances`` (plugin defaults, so
  ``SeriesMetadata`` = ``Full``: ``/metadata`` reads the files).

Both hold the same data: the 300-slice 512x512 CT of :func:`gateway.sample.ct_series` and, for the
metadata test only, a 2,000-instance series of 64x64 slices (same header as the CT, new UIDs).
Measurements alternate ybyx/Orthanc request by request or run by run; the client is ``httpx`` in
this process (threads for parallel connections). Each measure is checked (status, part counts,
bytes against the originals); a failed check makes it VOID.

1. WADO-RS ``/frames/1`` of each CT instance, ``Accept: multipart/related;
   type="application/octet-stream"``: first frame on a fresh TCP connection (median over a sample
   of instances); frames/s over all instances sequentially on one keep-alive connection, and with 6
   keep-alive connections in parallel (as a browser does); median of ``--runs`` runs.
2. Whole-series WADO-RS retrieve (``transfer-syntax=*``: as stored), MB/s (10^6 bytes of body).
   An untimed first pass checks that the parts are byte-identical to the original files.
3. Series ``/metadata`` of the 2,000-instance series: ms, median of 5.
4. QIDO-RS instance-level search of the 300-instance series, ms (median of 5); and study search by
   PatientID on the same data (median of 20).
5. ybyx only: p50/p95 of QIDO study search by PatientID and by a 7-day StudyDate range, with
   ``--pg-instances`` (100,000) synthetic instances (2,000 studies x 50) catalogued in a fresh
   PostgreSQL database through ``Catalog.add_instance`` (time-boxed by ``--pg-seconds``; the count
   reached is reported). Orthanc is not loaded to 100k instances (that takes 100k real files
   through its REST API, tens of minutes): no Orthanc column for this one.
6. End to end: dcmtk ``storescu -v`` sends the CT series to a ybyx front-end (``ybyx frontend``,
   forwarding by STOW-RS to a fresh center). Per instance, the time from C-STORE success to
   queryable at the center is ``received_at`` of the instance in the center's catalog minus the
   wall-clock time at which this process read storescu's "Received Store Response (Success)" line
   for that file (one system clock; ``received_at`` is taken just before the catalog commit, so it
   is early by one SQLite commit, ~ms). Cross-check: a QIDO poll of the center every 100 ms
   records when the study's NumberOfStudyRelatedInstances reaches each count. Instances/s = N /
   (last instance queryable at the center - storescu start). Run with the forwarder's shipped
   ``settle_seconds`` (3: a study is sent once quiet that long) and with 0.

Results: a table on the terminal and ``bench/results/dicomweb-<timestamp>.{json,md}``.

    python bench/dicomweb.py            # full: ~5 minutes on 2 cores (2.5 of them the 100k catalog)
    python bench/dicomweb.py --quick    # ~2.5 minutes: fewer runs, 30k PostgreSQL instances, one e2e
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from pydicom import dcmread, dcmwrite
from pydicom.uid import generate_uid
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
# `python bench/dicomweb.py` puts bench/ first on the path, where this very file would shadow the
# `dicomweb` package: take bench/ off and put the repository first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (_HERE, ROOT)]

from dicomweb.multipart import MultipartParser, MultipartWriter, PartData, PartEnd, parse_content_type  # noqa: E402
from gateway.archive.catalog import Catalog  # noqa: E402
from gateway.archive.record import InstanceRecord  # noqa: E402
from gateway.sample import ct_series  # noqa: E402
from tests.peers.orthanc import OrthancPeer, dcmtk_binary  # noqa: E402
from tests.peers.ports import free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PG_ADMIN = os.environ.get("YBYX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
ENV = {**os.environ, "TCP_NODELAY": "1"}
CALLING_AE = "BENCH"
START_TIMEOUT = 30.0
STOP_GRACE = 15.0
HTTP_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"'
SERIES_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
PARALLEL = 6
STOW_BATCH = 50
META_RUNS = 5
QIDO_RUNS = 5
PATIENT_QIDO_RUNS = 20
POLL_INTERVAL = 0.1
PG_STUDY_SIZE = 50
PG_THREADS = 3
PG_DATE_SPAN_DAYS = 3 * 365
PG_FIRST_DATE = date(2023, 1, 1)
# Like for like: Orthanc runs without authentication (loopback only), so ybyx's bearer-token guard
# (issue 6) is switched off too; the per-request token check is not part of these numbers.
# loopback only: no tokens, and no per-address rate limit (the frames runs exceed 500 requests/s
# from one address by design); Orthanc runs with authentication off too
NO_AUTH = (
    "[security]",
    "enabled = false",
    "insecure_no_auth_i_understand = true",
    "[security.limits]",
    "enabled = false",
)

console = Console() if sys.stdout.isatty() else Console(width=160)  # files and pipes: wide tables


# ---------------------------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise SystemExit(f"{name} not found: `make setup` installs dcmtk, orthanc and the ybyx package")
    return found


def ybyx_binary() -> str:
    beside = Path(sys.executable).with_name("ybyx")
    return str(beside) if beside.is_file() else tool("ybyx")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Series:
    """One series on disk: its files, UIDs and what the files hash to."""

    study_uid: str
    series_uid: str
    patient_id: str
    files: list[Path]
    sops: list[str]  # in file order
    sha256: dict[str, str]  # SOP Instance UID -> SHA-256 of its file

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    @classmethod
    def read(cls, files: list[Path]) -> Series:
        sops: list[str] = []
        hashes: dict[str, str] = {}
        first = dcmread(files[0], stop_before_pixels=True)
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            sops.append(str(ds.SOPInstanceUID))
            hashes[str(ds.SOPInstanceUID)] = sha256_file(path)
        return cls(
            str(first.StudyInstanceUID),
            str(first.SeriesInstanceUID),
            str(first.PatientID),
            files,
            sops,
            hashes,
        )


def small_series(out: Path, count: int, template: Path) -> list[Path]:
    """``count`` 64x64 int16 slices with ``template``'s header (a CT slice), new study/series/SOP UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    ds = dcmread(template)
    del ds.PixelData
    study_uid, series_uid = generate_uid(), generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDescription = "bench metadata series"
    ds.SeriesDescription = "64x64 x 2000"
    ds.SeriesNumber = 9
    ds.AccessionNumber = "BENCHMETA"
    ds.FrameOfReferenceUID = generate_uid()
    rng = np.random.default_rng(2000)
    paths: list[Path] = []
    for i in range(count):
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = i + 1
        z = round(-0.5 * i, 2)
        ds.ImagePositionPatient = [-22.5, -22.5, z]
        ds.SliceLocation = z
        pixels = rng.integers(0, 2000, size=(64, 64), dtype=np.int16)
        ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
        path = out / f"SMALL_{i + 1:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- servers


class Target:
    """A running DICOMweb server under test."""

    name: str
    dicomweb: str

    def load(self, series: Series) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def _wait_http(url: str, proc: subprocess.Popen[bytes], log_path: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; log tail:\n{log_tail(log_path)}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT:.0f}s; log tail:\n{log_tail(log_path)}")


def _stop_process(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


class YbyxCenter(Target):
    """``ybyx center`` on a folder blob store and SQLite (or the given database URL)."""

    name = "ybyx"

    def __init__(self, root: Path, *, db_url: str = "sqlite:///catalog.db") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.db = root / "catalog.db"
        config = root / "center.toml"
        config.write_text(
            "\n".join(
                [
                    'role = "center"',
                    'province = "50"',
                    "[http]",
                    'host = "127.0.0.1"',
                    f"port = {self.port}",
                    "[storage]",
                    'backend = "folder"',
                    'path = "blobs"',
                    "[database]",
                    f'url = "{db_url}"',
                    "[ingest]",
                    'quarantine = "quarantine"',
                    *NO_AUTH,
                    "",
                ]
            ),
            encoding="utf-8",
        )
        self.log_path = root / "center.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [ybyx_binary(), "center", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=ENV,
            )
        try:
            _wait_http(f"{self.url}/healthz", self.proc, self.log_path, "ybyx center")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_process(self.proc)

    def load(self, series: Series) -> None:
        """STOW-RS the series in batches; every part must be stored."""
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:
            for start in range(0, len(series.files), STOW_BATCH):
                batch = series.files[start : start + STOW_BATCH]
                writer = MultipartWriter("application/dicom")
                body = writer.iter(({"Content-Type": "application/dicom"}, p.read_bytes()) for p in batch)
                r = client.post(
                    f"{self.dicomweb}/studies/{series.study_uid}",
                    content=body,
                    headers={"Content-Type": writer.content_type, "Accept": DICOM_JSON},
                )
                stored = len(r.json().get("00081199", {}).get("Value", [])) if r.content else 0
                if r.status_code != 200 or stored != len(batch):
                    raise RuntimeError(f"STOW-RS to ybyx: HTTP {r.status_code}, {stored}/{len(batch)} stored")


class OrthancTarget(Target):
    """Orthanc 1.10 with the DICOMweb plugin (``TCP_NODELAY=1``, SQLite index, storage under ``root``)."""

    name = "Orthanc"

    def __init__(self, root: Path) -> None:
        self.peer = OrthancPeer.start(root, aet="ORTHANC")  # sets TCP_NODELAY=1 in its environment
        self.dicomweb = f"{self.peer.url}/dicom-web"
        self.version = str(self.peer.system()["Version"])
        self.plugin_version = str(self.peer.http.get("/plugins/dicom-web").json().get("Version", "?"))

    def stop(self) -> None:
        self.peer.stop()

    def load(self, series: Series) -> None:
        self.peer.upload_all(series.files)
        held = self.peer.sop_instance_uids(series.study_uid)
        if not set(series.sops) <= set(held):
            raise RuntimeError(f"Orthanc holds {len(held)} of {len(series.sops)} instances")


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Measure:
    """One metric for one server: the raw samples and the summary value."""

    metric: str
    server: str
    unit: str
    value: float
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems


def _frames_url(base: str, s: Series, sop: str) -> str:
    return f"{base}/studies/{s.study_uid}/series/{s.series_uid}/instances/{sop}/frames/1"


def _parts(content_type: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The bodies of a multipart/related response (parsed with ybyx's parser, which is RFC 2046)."""
    _, params = parse_content_type(content_type)
    parser = MultipartParser(params["boundary"])
    current: list[bytes] = []
    for chunk in chunks:
        for event in parser.feed(chunk):
            if isinstance(event, PartData):
                current.append(event.data)
            elif isinstance(event, PartEnd):
                yield b"".join(current)
                current = []
    parser.finish()


def _check_frame(r: httpx.Response, expect: bytes | None = None) -> str | None:
    """None if ``r`` is one native 512x512x16-bit frame in a multipart body (equal to ``expect``)."""
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    parts = list(_parts(r.headers.get("content-type", ""), iter([r.content])))
    if len(parts) != 1 or len(parts[0]) != 512 * 512 * 2:
        return f"{len(parts)} part(s) of {[len(p) for p in parts]} bytes"
    if expect is not None and parts[0] != expect:
        return "frame bytes differ from the original pixel data"
    return None


def bench_frames(targets: list[Target], ct: Series, runs: int, fresh_samples: int) -> list[Measure]:
    out: list[Measure] = []
    # correctness first (untimed): frame 1 of the middle slice equals the file's pixel data
    middle = len(ct.sops) // 2
    pixels = bytes(dcmread(ct.files[middle]).PixelData)
    problems: dict[str, list[str]] = {t.name: [] for t in targets}
    for t in targets:
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:
            r = client.get(_frames_url(t.dicomweb, ct, ct.sops[middle]), headers={"Accept": FRAME_ACCEPT})
            if (problem := _check_frame(r, pixels)) is not None:
                problems[t.name].append(f"frame check: {problem}")

    # first frame on a fresh connection: alternate servers, and which one goes first
    step = max(1, len(ct.sops) // fresh_samples)
    first: dict[str, list[float]] = {t.name: [] for t in targets}
    for k, sop in enumerate(ct.sops[::step][:fresh_samples]):
        for t in targets if k % 2 == 0 else targets[::-1]:
            client = httpx.Client(timeout=HTTP_TIMEOUT)  # built outside the clock (SSL context etc.)
            try:
                started = time.perf_counter()
                r = client.get(_frames_url(t.dicomweb, ct, sop), headers={"Accept": FRAME_ACCEPT})
                _ = r.content
                first[t.name].append((time.perf_counter() - started) * 1000)
            finally:
                client.close()
            if r.status_code != 200:
                problems[t.name].append(f"first frame of {sop}: HTTP {r.status_code}")
    for t in targets:
        ms = first[t.name]
        out.append(
            Measure(
                "first frame, fresh connection",
                t.name,
                "ms",
                statistics.median(ms),
                [round(v, 2) for v in ms],
                {"p95_ms": round(percentile(ms, 95), 2), "instances": len(ms)},
                list(problems[t.name]),
            )
        )

    def sequential(t: Target) -> tuple[float, list[str]]:
        bad: list[str] = []
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:
            started = time.perf_counter()
            for sop in ct.sops:
                r = client.get(_frames_url(t.dicomweb, ct, sop), headers={"Accept": FRAME_ACCEPT})
                if r.status_code != 200 or len(r.content) < 512 * 512 * 2:
                    bad.append(f"{sop}: HTTP {r.status_code}, {len(r.content)} bytes")
            seconds = time.perf_counter() - started
        return len(ct.sops) / seconds, bad

    def parallel(t: Target) -> tuple[float, list[str]]:
        work: queue.SimpleQueue[str] = queue.SimpleQueue()
        for sop in ct.sops:
            work.put(sop)
        bad: list[str] = []
        gate = threading.Barrier(PARALLEL + 1)

        def worker() -> None:
            with httpx.Client(timeout=HTTP_TIMEOUT) as client:
                gate.wait()
                while True:
                    try:
                        sop = work.get_nowait()
                    except queue.Empty:
                        return
                    r = client.get(_frames_url(t.dicomweb, ct, sop), headers={"Accept": FRAME_ACCEPT})
                    if r.status_code != 200 or len(r.content) < 512 * 512 * 2:
                        bad.append(f"{sop}: HTTP {r.status_code}, {len(r.content)} bytes")

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(PARALLEL)]
        for thread in threads:
            thread.start()
        gate.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        return len(ct.sops) / (time.perf_counter() - started), bad

    for metric, fn in (
        ("frames/s, 1 keep-alive connection", sequential),
        (f"frames/s, {PARALLEL} connections", parallel),
    ):
        rates: dict[str, list[float]] = {t.name: [] for t in targets}
        bad: dict[str, list[str]] = {t.name: [] for t in targets}
        for run in range(runs):
            for t in targets if run % 2 == 0 else targets[::-1]:
                rate, errors = fn(t)
                rates[t.name].append(rate)
                bad[t.name] += errors[:3]
        for t in targets:
            out.append(
                Measure(
                    metric,
                    t.name,
                    "frames/s",
                    statistics.median(rates[t.name]),
                    [round(v, 1) for v in rates[t.name]],
                    {"frames_per_run": len(ct.sops)},
                    bad[t.name],
                )
            )
    return out


def bench_series_retrieve(targets: list[Target], ct: Series, runs: int) -> list[Measure]:
    url = f"/studies/{ct.study_uid}/series/{ct.series_uid}"
    problems: dict[str, list[str]] = {t.name: [] for t in targets}
    # untimed pass (also warms the page cache for both): parts byte-identical to the files
    want = sorted(ct.sha256.values())
    for t in targets:
        with (
            httpx.Client(timeout=HTTP_TIMEOUT) as client,
            client.stream("GET", t.dicomweb + url, headers={"Accept": SERIES_ACCEPT}) as r,
        ):
            if r.status_code != 200:
                problems[t.name].append(f"HTTP {r.status_code}")
                continue
            got = sorted(
                hashlib.sha256(p).hexdigest() for p in _parts(r.headers["content-type"], r.iter_raw())
            )
            if got != want:
                problems[t.name].append(
                    f"{len(got)} parts; {len(set(got) & set(want))} match an original file"
                )
    speeds: dict[str, list[float]] = {t.name: [] for t in targets}
    sizes: dict[str, int] = {}
    for run in range(runs):
        for t in targets if run % 2 == 0 else targets[::-1]:
            with httpx.Client(timeout=HTTP_TIMEOUT) as client:
                started = time.perf_counter()
                size = 0
                with client.stream("GET", t.dicomweb + url, headers={"Accept": SERIES_ACCEPT}) as r:
                    for chunk in r.iter_raw(1 << 20):
                        size += len(chunk)
                seconds = time.perf_counter() - started
            sizes[t.name] = size
            speeds[t.name].append(size / 1e6 / seconds)
            if size < ct.size:
                problems[t.name].append(f"body {size} bytes < {ct.size} bytes of files")
    return [
        Measure(
            "whole-series retrieve",
            t.name,
            "MB/s",
            statistics.median(speeds[t.name]),
            [round(v, 1) for v in speeds[t.name]],
            {"body_bytes": sizes.get(t.name, 0), "instances": len(ct.sops)},
            problems[t.name],
        )
        for t in targets
    ]


def _timed_json(
    client: httpx.Client, url: str, params: dict[str, str] | None = None
) -> tuple[float, Any, int]:
    started = time.perf_counter()
    r = client.get(url, params=params, headers={"Accept": DICOM_JSON})
    body = r.content
    ms = (time.perf_counter() - started) * 1000
    return ms, (json.loads(body) if body else []), r.status_code


def bench_json(
    targets: list[Target],
    metric: str,
    path: str,
    runs: int,
    expect: int,
    params: dict[str, str] | None = None,
) -> list[Measure]:
    """Median ms of a JSON GET (QIDO or /metadata), alternating servers; ``expect`` results each time."""
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    problems: dict[str, list[str]] = {t.name: [] for t in targets}
    clients = {t.name: httpx.Client(timeout=HTTP_TIMEOUT) for t in targets}
    try:
        for k in range(runs):
            for t in targets if k % 2 == 0 else targets[::-1]:
                ms, body, status = _timed_json(clients[t.name], t.dicomweb + path, params)
                times[t.name].append(ms)
                if status != 200 or not isinstance(body, list) or len(body) != expect:
                    n = len(body) if isinstance(body, list) else "?"
                    problems[t.name].append(f"HTTP {status}, {n} results (expected {expect})")
    finally:
        for client in clients.values():
            client.close()
    return [
        Measure(
            metric,
            t.name,
            "ms",
            statistics.median(times[t.name]),
            [round(v, 2) for v in times[t.name]],
            {"results": expect, "runs": runs},
            problems[t.name][:3],
        )
        for t in targets
    ]


# ---------------------------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class SyntheticStudy:
    index: int
    study_uid: str
    patient_id: str
    study_date: str


def synthetic_studies(count: int) -> list[SyntheticStudy]:
    """``count`` studies of ``count // 2`` patients, dates spread over three years (deterministic)."""
    rng = random.Random(100_000)
    root = "1.2.826.0.1.3680043.8.498.99"
    return [
        SyntheticStudy(
            i,
            f"{root}.{i + 1}",
            f"YBP{i // 2:07d}",
            (PG_FIRST_DATE + timedelta(days=rng.randrange(PG_DATE_SPAN_DAYS))).strftime("%Y%m%d"),
        )
        for i in range(count)
    ]


def synthetic_record(study: SyntheticStudy, n: int) -> InstanceRecord:
    series_uid = f"{study.study_uid}.1"
    sop = f"{series_uid}.{n + 1}"
    sha = hashlib.sha256(sop.encode()).hexdigest()
    modality = ("CT", "MR", "DX", "US")[study.index % 4]
    return InstanceRecord(
        patient_id=study.patient_id,
        issuer="",
        patient_name=f"Patient^{study.index // 2:07d}",
        birth_date="19700101",
        sex="MF"[study.index % 2],
        study_uid=study.study_uid,
        study_date=study.study_date,
        study_time="101500",
        accession_number=f"A{study.index:08d}",
        study_id=str(study.index),
        referring_physician="Li^Si",
        study_description=f"{modality} bench",
        institution_name="BENCH_HOSPITAL",
        series_uid=series_uid,
        modality=modality,
        series_number=1,
        series_description="synthetic",
        body_part="CHEST",
        pps_start_date=study.study_date,
        pps_start_time="101500",
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=n + 1,
        transfer_syntax="1.2.840.10008.1.2.1",
        rows=512,
        columns=512,
        bits_allocated=16,
        number_of_frames=None,
        metadata_json="{}",
        size=526_000,
        sha256=sha,
        blob_key=f"{study.study_uid}/{series_uid}/{sop}.{sha[:16]}.dcm",
        received_at=datetime.now(UTC),
        source_ae="BENCH",
    )


def populate(
    url: str, studies: list[SyntheticStudy], budget_s: float
) -> tuple[list[SyntheticStudy], int, float]:
    """Catalogue the studies (``PG_STUDY_SIZE`` instances each) with ``PG_THREADS`` threads until done or
    out of time; returns the studies completed, the instances catalogued and the seconds taken."""
    catalog = Catalog.open(url)
    deadline = time.monotonic() + budget_s
    todo: queue.SimpleQueue[SyntheticStudy] = queue.SimpleQueue()
    for s in studies:
        todo.put(s)
    done: list[SyntheticStudy] = []
    counted = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while time.monotonic() < deadline:
                try:
                    study = todo.get_nowait()
                except queue.Empty:
                    return
                for n in range(PG_STUDY_SIZE):
                    catalog.add_instance(synthetic_record(study, n))
                with lock:
                    done.append(study)
                    counted[0] += PG_STUDY_SIZE
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(PG_THREADS)]
    for thread in threads:
        thread.start()
    last = time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        if time.monotonic() - last > 15:
            console.print(f"    ... {counted[0]:,} instances catalogued")
            last = time.monotonic()
    seconds = time.perf_counter() - started
    catalog.close()
    if errors:
        raise RuntimeError(f"catalog population failed: {errors[0]!r}")
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("ANALYZE")
    return done, counted[0], seconds


def bench_postgres(
    work: Path, instances: int, budget_s: float, queries: int
) -> tuple[list[Measure], dict[str, Any]]:
    name = f"ybyx_bench_{uuid.uuid4().hex[:10]}"
    base = PG_ADMIN.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        # population speed only (no fsync wait per add_instance); queries do not depend on it
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    try:
        studies = synthetic_studies(max(1, instances // PG_STUDY_SIZE))
        console.print(
            f"  cataloguing {len(studies) * PG_STUDY_SIZE:,} synthetic instances in PostgreSQL "
            f"({len(studies):,} studies x {PG_STUDY_SIZE}, {PG_THREADS} threads, budget {budget_s:.0f} s) ..."
        )
        done, catalogued, seconds = populate(url, studies, budget_s)
        console.print(f"    {catalogued:,} instances in {seconds:.0f} s ({catalogued / seconds:.0f}/s)")
        info: dict[str, Any] = {
            "instances_requested": len(studies) * PG_STUDY_SIZE,
            "instances": catalogued,
            "studies": len(done),
            "patients": len({s.patient_id for s in done}),
            "populate_seconds": round(seconds, 1),
            "populate_per_s": round(catalogued / seconds, 1),
            "queries_per_kind": queries,
        }
        center = YbyxCenter(work / "pg-center", db_url=url)
        try:
            measures = _pg_queries(center, done, queries)
        finally:
            center.stop()
        return measures, info
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_queries(center: YbyxCenter, done: list[SyntheticStudy], queries: int) -> list[Measure]:
    rng = random.Random(7)
    by_patient: dict[str, set[str]] = {}
    for s in done:
        by_patient.setdefault(s.patient_id, set()).add(s.study_uid)
    patients = sorted(by_patient)
    out: list[Measure] = []
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        for _ in range(10):  # warm-up: connections, plans, caches
            _timed_json(client, f"{center.dicomweb}/studies", {"PatientID": rng.choice(patients)})

        times: list[float] = []
        problems: list[str] = []
        for _ in range(queries):
            pid = rng.choice(patients)
            ms, body, status = _timed_json(client, f"{center.dicomweb}/studies", {"PatientID": pid})
            times.append(ms)
            got = {a["0020000D"]["Value"][0] for a in body} if status == 200 else set()
            if got != by_patient[pid]:
                problems.append(
                    f"PatientID={pid}: HTTP {status}, {len(got)} studies, expected {len(by_patient[pid])}"
                )
        out.append(_pct_measure("study search by PatientID (PostgreSQL)", times, problems, results=2.0))

        times, problems, sizes = [], [], []
        first = PG_FIRST_DATE.toordinal()
        for _ in range(queries):
            start = date.fromordinal(first + rng.randrange(PG_DATE_SPAN_DAYS - 7))
            end = start + timedelta(days=6)
            span = f"{start:%Y%m%d}-{end:%Y%m%d}"
            ms, body, status = _timed_json(client, f"{center.dicomweb}/studies", {"StudyDate": span})
            times.append(ms)
            want = {s.study_uid for s in done if f"{start:%Y%m%d}" <= s.study_date <= f"{end:%Y%m%d}"}
            got = {a["0020000D"]["Value"][0] for a in body} if status == 200 else set()
            sizes.append(len(got))
            if got != want:
                problems.append(f"StudyDate={span}: HTTP {status}, {len(got)} studies, expected {len(want)}")
        out.append(
            _pct_measure(
                "study search by 7-day StudyDate range (PostgreSQL)", times, problems, statistics.mean(sizes)
            )
        )
    return out


def _pct_measure(metric: str, times: list[float], problems: list[str], results: float) -> Measure:
    return Measure(
        metric,
        "ybyx",
        "ms",
        percentile(times, 50),
        [round(v, 2) for v in times],
        {
            "p50_ms": round(percentile(times, 50), 2),
            "p95_ms": round(percentile(times, 95), 2),
            "max_ms": round(max(times), 2),
            "mean_results": round(results, 1),
        },
        problems[:3],
    )


# ---------------------------------------------------------------------------------------------- end to end


class YbyxFrontend:
    """``ybyx frontend`` forwarding to ``center_url``; only AE ``BENCH`` may call it."""

    def __init__(self, root: Path, center_url: str, settle: float) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.db = root / "catalog.db"
        config = root / "frontend.toml"
        config.write_text(
            "\n".join(
                [
                    'role = "frontend"',
                    'institution = "BENCH_HOSPITAL"',
                    "[dicom]",
                    'ae_title = "YBYX"',
                    'host = "127.0.0.1"',
                    f"port = {self.port}",
                    "[[dicom.peers]]",
                    f'ae_title = "{CALLING_AE}"',
                    'institution = "BENCH_HOSPITAL"',
                    "[http]",
                    'host = "127.0.0.1"',
                    f"port = {self.http_port}",
                    "[storage]",
                    'backend = "folder"',
                    'path = "blobs"',
                    "[database]",
                    'url = "sqlite:///catalog.db"',
                    "[ingest]",
                    'quarantine = "quarantine"',
                    "[forward]",
                    f'center_url = "{center_url}"',
                    f"settle_seconds = {settle}",
                    *NO_AUTH,
                    "",
                ]
            ),
            encoding="utf-8",
        )
        self.log_path = root / "frontend.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [ybyx_binary(), "frontend", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=ENV,
            )
        try:
            _wait_http(
                f"http://127.0.0.1:{self.http_port}/healthz", self.proc, self.log_path, "ybyx frontend"
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_process(self.proc)


class CountPoller:
    """Polls the center's QIDO for the study's NumberOfStudyRelatedInstances every ``POLL_INTERVAL``."""

    def __init__(self, dicomweb: str, study_uid: str, total: int) -> None:
        self.url = f"{dicomweb}/studies"
        self.study_uid = study_uid
        self.total = total
        self.reached: dict[int, float] = {}  # count -> wall time it was first seen
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(
                        self.url, params={"StudyInstanceUID": self.study_uid}, headers={"Accept": DICOM_JSON}
                    )
                    now = time.time()
                    body = r.json() if r.status_code == 200 and r.content else []
                    count = int(body[0]["00201208"]["Value"][0]) if body else 0
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                    self.errors.append(repr(exc))
                    count, now = 0, time.time()
                for k in range(1, count + 1):
                    self.reached.setdefault(k, now)
                if count >= self.total:
                    return
                self._stop.wait(POLL_INTERVAL)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        self._stop.set()
        return len(self.reached) >= self.total


def _catalogued(db: Path) -> dict[str, tuple[float, str]]:
    """SOP Instance UID -> (received_at as epoch seconds, SHA-256) from a SQLite catalog (read-only)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT sop_uid, received_at, sha256 FROM instances").fetchall()
    out: dict[str, tuple[float, str]] = {}
    for sop, stamp, sha in rows:
        when = datetime.fromisoformat(str(stamp))  # stored in UTC, without the zone
        out[str(sop)] = ((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp(), str(sha))
    return out


def bench_e2e(work: Path, ct: Series, settle: float) -> Measure:
    """storescu -> front-end -> center; per-instance C-STORE success -> catalogued at the center."""
    root = Path(tempfile.mkdtemp(prefix=f"e2e-{settle:g}-", dir=work))
    center = YbyxCenter(root / "center")
    frontend = YbyxFrontend(root / "frontend", center.url, settle)
    problems: list[str] = []
    success: dict[str, float] = {}  # SOP UID -> wall time storescu reported success
    by_path = {str(p): sop for p, sop in zip(ct.files, ct.sops, strict=True)}
    poller = CountPoller(center.dicomweb, ct.study_uid, len(ct.sops))
    try:
        poller.start()
        started = time.time()
        proc = subprocess.Popen(
            [
                dcmtk_binary("storescu"),
                "-v",
                "-aet",
                CALLING_AE,
                "-aec",
                "YBYX",
                "127.0.0.1",
                str(frontend.port),
            ]
            + [str(p) for p in ct.files],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=ENV,
        )
        assert proc.stdout is not None
        current: str | None = None
        for line in proc.stdout:
            if line.startswith("I: Sending file: "):
                current = by_path.get(line.removeprefix("I: Sending file: ").strip())
            elif "Received Store Response" in line:
                now = time.time()
                if "(Success)" in line and current is not None:
                    success[current] = now
                else:
                    problems.append(f"storescu: {line.strip()}")
            elif line.startswith(("E:", "F:")):
                problems.append(f"storescu: {line.strip()}")
        code = proc.wait(timeout=600)
        sent_done = time.time()
        if code != 0:
            problems.append(f"storescu exit status {code}")
        if len(success) != len(ct.sops):
            problems.append(f"storescu reported {len(success)} of {len(ct.sops)} successes")
        if not poller.wait(timeout=120 + settle):
            problems.append(f"the center shows {len(poller.reached)} of {len(ct.sops)} after 120 s")
        received = {sop: when for sop, (when, _) in _catalogued(center.db).items()}
        # The front-end writes its own file meta, so its files are not the originals byte for byte;
        # the center must hold exactly what the front-end holds (re-hashed: verify=true).
        at_frontend = {sop: sha for sop, (_, sha) in _catalogued(frontend.db).items()}
        with httpx.Client(timeout=60) as client:
            r = client.get(f"{center.url}/api/v1/studies/{ct.study_uid}/inventory", params={"verify": "true"})
            inventory = (
                {sop: v["sha256"] for sop, v in r.json().get("instances", {}).items()} if r.is_success else {}
            )
        if set(at_frontend) != set(ct.sops) or inventory != at_frontend:
            right = sum(inventory.get(k) == v for k, v in at_frontend.items())
            problems.append(
                f"front-end holds {len(at_frontend)}/{len(ct.sops)}; center inventory {len(inventory)} "
                f"instances, {right} with the front-end's SHA-256"
            )
    finally:
        frontend.stop()
        center.stop()
    latencies = [received[sop] - success[sop] for sop in ct.sops if sop in received and sop in success]
    order = sorted(success.values())
    polled = [poller.reached[k + 1] - order[k] for k in range(min(len(order), len(poller.reached)))]
    last = max(received.values(), default=started)
    if latencies and min(latencies) < -0.05:
        problems.append(f"negative latency {min(latencies):.3f} s: clocks or timestamps are not comparable")
    extra: dict[str, Any] = {
        "settle_seconds": settle,
        "instances": len(ct.sops),
        "storescu_seconds": round(sent_done - started, 2),
        "storescu_inst_per_s": round(len(ct.sops) / (sent_done - started), 1),
        "end_to_end_seconds": round(last - started, 2),
        "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 95), 3) if latencies else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "qido_poll_p50_s": round(percentile(polled, 50), 3) if polled else None,
        "qido_poll_p95_s": round(percentile(polled, 95), 3) if polled else None,
        "qido_poll_errors": poller.errors[:3],
    }
    if not problems:
        shutil.rmtree(root, ignore_errors=True)
    else:
        extra["kept"] = str(root)
    return Measure(
        f"end to end, settle {settle:g} s",
        "ybyx",
        "inst/s",
        len(ct.sops) / (last - started) if last > started else 0.0,
        [round(v, 3) for v in latencies],
        extra,
        problems[:5],
    )


_WRK_SCRIPT = """
paths = {%(paths)s}
i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i], {["Accept"] = '%(accept)s'})
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("YBYX requests=%%d duration_us=%%d bytes=%%d status_errors=%%d other_errors=%%d\\n",
    summary.requests, summary.duration, summary.bytes, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def _wrk(
    base: str, paths: list[str], connections: int, seconds: float, script: Path
) -> tuple[float, list[str]]:
    """frames/s from ``wrk`` cycling over ``paths`` on ``connections`` keep-alive connections."""
    script.write_text(
        _WRK_SCRIPT % {"paths": ",".join(f'"{p}"' for p in paths), "accept": FRAME_ACCEPT}, encoding="utf-8"
    )
    threads = min(2, connections)
    out = subprocess.run(
        [tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s", "-s", str(script), base],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    ).stdout
    m = re.search(
        r"YBYX requests=(\d+) duration_us=(\d+) bytes=(\d+) status_errors=(\d+) other_errors=(\d+)", out
    )
    if m is None:
        return 0.0, [f"wrk printed no summary: {out[-300:]!r}"]
    requests, duration_us, body, status_errors, other_errors = (int(g) for g in m.groups())
    bad: list[str] = []
    if status_errors or other_errors:
        bad.append(f"{status_errors} non-2xx responses, {other_errors} socket errors")
    if requests and body / requests < 512 * 512 * 2:
        bad.append(f"{body / requests:.0f} bytes per response, less than one 512x512x2 frame")
    return requests / (duration_us / 1e6), bad


def bench_frames_native(
    targets: list[Target], ct: Series, runs: int, seconds: float, work: Path
) -> list[Measure]:
    """The frames/s measures again with a native load generator (``wrk``), as a browser's network
    stack is native: the Python client above spends ~0.5-1 ms of its own per request, which caps
    both servers' rates and hides their difference. Same URLs (every instance's frame 1, cycled),
    same Accept, alternating servers run by run."""
    out: list[Measure] = []
    for connections in (1, PARALLEL):
        rates: dict[str, list[float]] = {t.name: [] for t in targets}
        bad: dict[str, list[str]] = {t.name: [] for t in targets}
        for run in range(runs):
            for t in targets if run % 2 == 0 else targets[::-1]:
                root = t.dicomweb.split("/dicom-web")[0]
                paths = [_frames_url(t.dicomweb, ct, sop)[len(root) :] for sop in ct.sops]
                rate, errors = _wrk(root, paths, connections, seconds, work / f"wrk-{t.name}.lua")
                rates[t.name].append(rate)
                bad[t.name] += errors[:3]
        for t in targets:
            out.append(
                Measure(
                    f"frames/s (wrk), {connections} connection{'s' if connections > 1 else ''}",
                    t.name,
                    "frames/s",
                    statistics.median(rates[t.name]),
                    [round(v, 1) for v in rates[t.name]],
                    {"seconds_per_run": seconds, "client": "wrk"},
                    bad[t.name],
                )
            )
    return out


# ---------------------------------------------------------------------------------------------- report

# metric -> (higher is better, goal text, goal check on (ybyx, orthanc) values)
GOALS: dict[str, tuple[bool, str, Callable[[float, float], bool] | None]] = {
    "first frame, fresh connection": (False, "≤ Orthanc", lambda y, o: y <= o),
    "frames/s, 1 keep-alive connection": (True, "≥ 2× Orthanc", lambda y, o: y >= 2 * o),
    f"frames/s, {PARALLEL} connections": (True, "≥ 2× Orthanc", lambda y, o: y >= 2 * o),
    "frames/s (wrk), 1 connection": (True, "≥ 2× Orthanc", lambda y, o: y >= 2 * o),
    f"frames/s (wrk), {PARALLEL} connections": (True, "≥ 2× Orthanc", lambda y, o: y >= 2 * o),
    "whole-series retrieve": (True, "—", None),
    "series /metadata": (
        False,
        "≤ 200 ms and ≥ 10× faster",
        lambda y, o: y <= 200 and o >= 10 * y,
    ),
    "QIDO instances of the CT series": (False, "≥ 10× faster", lambda y, o: o >= 10 * y),
    "QIDO studies?PatientID= (bench data)": (False, "—", None),
}


def comparison_rows(measures: list[Measure]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for key, (higher, goal, check) in GOALS.items():  # keys are metric-name prefixes
        pair = {m.server: m for m in measures if m.metric.startswith(key)}
        y, o = pair.get("ybyx"), pair.get("Orthanc")
        if y is None or o is None:
            continue
        ratio = (y.value / o.value if higher else o.value / y.value) if y.value and o.value else 0.0
        valid = y.valid and o.valid
        met = None if check is None or not valid else check(y.value, o.value)
        rows.append(
            {
                "metric": y.metric,
                "unit": y.unit,
                "ybyx": round(y.value, 2),
                "orthanc": round(o.value, 2),
                "ybyx_advantage": round(ratio, 2),
                "goal": goal,
                "met": met,
                "valid": valid,
                "problems": y.problems + o.problems,
            }
        )
    return rows


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def render(report: dict[str, Any]) -> list[Table]:
    p = report["parameters"]
    main = Table(
        title=f"DICOMweb: ybyx vs Orthanc {report['environment']['orthanc']} + DICOMweb plugin ({p['mode']})"
    )
    for col, justify in (
        ("metric", "left"),
        ("unit", "left"),
        ("ybyx", "right"),
        ("Orthanc", "right"),
        ("ybyx ×", "right"),
        ("goal", "left"),
        ("", "left"),
    ):
        main.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in report["comparison"]:
        verdict = (
            "[red]VOID[/red]"
            if not row["valid"]
            else "—"
            if row["met"] is None
            else "[green]met[/green]"
            if row["met"]
            else "[yellow]missed[/yellow]"
        )
        main.add_row(
            row["metric"],
            row["unit"],
            _fmt(row["ybyx"]),
            _fmt(row["orthanc"]),
            f"{row['ybyx_advantage']:.2f}",
            row["goal"],
            verdict,
        )
    pg = report.get("postgres")
    if pg:
        for m in pg["measures"]:
            e = m["extra"]
            ok = m["problems"] == [] and e["p95_ms"] <= 50
            main.add_row(
                f"{m['metric']}, {pg['info']['instances']:,} inst.",
                "ms p50/p95",
                f"{e['p50_ms']:.1f} / {e['p95_ms']:.1f}",
                "not loaded",
                "",
                "p95 ≤ 50 ms",
                "[red]VOID[/red]"
                if m["problems"]
                else "[green]met[/green]"
                if ok
                else "[yellow]missed[/yellow]",
            )
    for m in report.get("e2e", []):
        e = m["extra"]
        main.add_row(
            f"storescu → front-end → center, settle {e['settle_seconds']:g} s",
            "inst/s; s p50/p95",
            f"{m['value']:.1f}; {e['latency_p50_s']} / {e['latency_p95_s']}"
            if e["latency_p50_s"] is not None
            else f"{m['value']:.1f}",
            "n/a",
            "",
            "—",
            "[red]VOID[/red]" if m["problems"] else "",
        )
    return [main]


def markdown(report: dict[str, Any]) -> str:
    p, env = report["parameters"], report["environment"]
    lines = [
        f"# DICOMweb: ybyx vs Orthanc ({report['timestamp']}, {p['mode']})",
        "",
        f"CT: {p['ct_instances']} × 512×512 int16 ({p['ct_bytes'] / 1e6:.0f} MB); metadata series: "
        f"{p['meta_instances']} × 64×64; {p['runs']} run(s) per throughput measure (median), servers "
        "alternating; client httpx in one Python process on the same machine.",
        "",
        "| metric | unit | ybyx | Orthanc | ybyx × | goal | verdict |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in report["comparison"]:
        verdict = (
            "**VOID**"
            if not row["valid"]
            else "—"
            if row["met"] is None
            else "met"
            if row["met"]
            else "missed"
        )
        lines.append(
            f"| {row['metric']} | {row['unit']} | {_fmt(row['ybyx'])} | {_fmt(row['orthanc'])} | "
            f"{row['ybyx_advantage']:.2f} | {row['goal']} | {verdict} |"
        )
    pg = report.get("postgres")
    if pg:
        for m in pg["measures"]:
            e = m["extra"]
            verdict = "**VOID**" if m["problems"] else "met" if e["p95_ms"] <= 50 else "missed"
            lines.append(
                f"| {m['metric']}, {pg['info']['instances']:,} instances | ms p50 / p95 | "
                f"{e['p50_ms']:.1f} / {e['p95_ms']:.1f} | not loaded | | p95 ≤ 50 ms | {verdict} |"
            )
    for m in report.get("e2e", []):
        e = m["extra"]
        lines.append(
            f"| storescu → front-end → center, settle {e['settle_seconds']:g} s "
            "| inst/s; success→queryable s p50 / p95 "
            f"| {m['value']:.1f}; {e['latency_p50_s']} / {e['latency_p95_s']} | n/a | | — "
            f"| {'**VOID**' if m['problems'] else ''} |"
        )
    lines += ["", "## Details", ""]
    for m in report["measures"]:
        extra = ", ".join(f"{k}={v}" for k, v in m["extra"].items())
        probs = "; ".join(m["problems"]) or "—"
        lines.append(
            f"- {m['metric']} / {m['server']}: {m['value']:.2f} {m['unit']} ({extra}); problems: {probs}"
        )
    if pg:
        info = pg["info"]
        lines.append(
            f"- PostgreSQL catalog: {info['instances']:,} of {info['instances_requested']:,} instances "
            f"requested, {info['studies']:,} studies, {info['patients']:,} patients, populated in "
            f"{info['populate_seconds']} s "
            f"({info['populate_per_s']}/s, {PG_THREADS} threads, synchronous_commit=off for the population); "
            f"{info['queries_per_kind']} queries per kind"
        )
        for m in pg["measures"]:
            e = m["extra"]
            lines.append(
                f"  - {m['metric']}: p50 {e['p50_ms']} ms, p95 {e['p95_ms']} ms, max {e['max_ms']} ms, "
                f"{e['mean_results']} studies per answer; problems: {'; '.join(m['problems']) or '—'}"
            )
    for m in report.get("e2e", []):
        e = m["extra"]
        lines.append(
            f"- end to end, settle {e['settle_seconds']:g} s: storescu {e['storescu_seconds']} s "
            f"({e['storescu_inst_per_s']} inst/s into the front-end); all {e['instances']} at the center "
            f"after {e['end_to_end_seconds']} s ({m['value']:.1f} inst/s); C-STORE success → catalogued at "
            "the center "
            f"p50 {e['latency_p50_s']} s, p95 {e['latency_p95_s']} s, max {e['latency_max_s']} s; QIDO-poll "
            f"cross-check (k-th success → count ≥ k, 100 ms poll) p50 {e['qido_poll_p50_s']} s, p95 "
            f"{e['qido_poll_p95_s']} s; problems: {'; '.join(m['problems']) or '—'}"
        )
    lines += [
        "",
        "## Set-up",
        "",
        f"- machine: {env['cpu']}, {env['cpus']} CPUs, {env['memory_gib']} GiB, Linux {env['kernel']}; load "
        f"average {env['load_before']} before, {env['load_after']} after; servers and client share the CPUs",
        f"- ybyx {env['ybyx_commit']}{' (uncommitted changes)' if env['ybyx_tree_dirty'] else ''}: "
        f"`ybyx center` subprocess (one uvicorn worker), folder blobs + SQLite, Python {env['python']}",
        f"- Orthanc {env['orthanc']} (Debian), DICOMweb plugin {env['dicomweb_plugin']} with default options "
        "(SeriesMetadata Full), SQLite index, TCP_NODELAY=1",
        f"- client: httpx {env['httpx']} (threads for parallel connections); dcmtk {env['dcmtk']}",
        "- authentication off on both sides (loopback only): Orthanc `AuthenticationEnabled: false`, ybyx "
        "`[security] enabled = false`; ybyx's audit trail stays on, as shipped",
        "- a measure is VOID if any response failed its check (status, counts, bytes against the originals)",
    ]
    return "\n".join(lines) + "\n"


def environment(orthanc: OrthancTarget | None, load_before: tuple[float, ...]) -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "httpx": version("httpx"),
        "orthanc": orthanc.version if orthanc else "?",
        "dicomweb_plugin": orthanc.plugin_version if orthanc else "?",
        "dcmtk": (run(dcmtk_binary("storescu"), "--version").splitlines() or ["?"])[0],
        "ybyx_commit": run("git", "rev-parse", "--short", "HEAD"),
        "ybyx_tree_dirty": bool(run("git", "status", "--porcelain")),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer runs, 30k PostgreSQL instances, one e2e setting"
    )
    ap.add_argument("--slices", type=int, default=300, help="CT instances")
    ap.add_argument("--meta-instances", type=int, default=2000, help="instances of the /metadata series")
    ap.add_argument("--runs", type=int, default=None, help="runs per throughput measure (default 3, quick 2)")
    ap.add_argument(
        "--pg-instances", type=int, default=None, help="PostgreSQL catalog size (default 100k, quick 30k)"
    )
    ap.add_argument(
        "--pg-seconds", type=float, default=None, help="time box for the population (default 240, quick 90)"
    )
    ap.add_argument(
        "--settle",
        type=float,
        nargs="+",
        default=None,
        help="e2e forwarder settle_seconds (default 3 0; quick 3)",
    )
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["orthanc", "postgres", "e2e"], help="leave parts out"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where data and servers live (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    runs = args.runs or (2 if args.quick else 3)
    pg_instances = args.pg_instances or (30_000 if args.quick else 100_000)
    pg_seconds = args.pg_seconds or (90.0 if args.quick else 240.0)
    settles = args.settle if args.settle is not None else ([3.0] if args.quick else [3.0, 0.0])
    fresh_samples = 15 if args.quick else 30
    pg_queries = 100 if args.quick else 200

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ybyx-dicomweb-", dir=args.workdir))
    measures: list[Measure] = []
    targets: list[Target] = []
    orthanc: OrthancTarget | None = None
    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        console.print(
            f"generating a {args.slices}-slice CT and a {args.meta_instances}-instance series in {work} ..."
        )
        ct = Series.read(ct_series(work / "ct", slices=args.slices))
        meta = Series.read(small_series(work / "meta", args.meta_instances, ct.files[0]))

        ybyx = YbyxCenter(work / "ybyx")
        targets.append(ybyx)
        if "orthanc" not in args.skip:
            orthanc = OrthancTarget(work / "orthanc")
            targets.append(orthanc)
        for t in targets:
            started = time.perf_counter()
            for s in (ct, meta):
                t.load(s)
            console.print(f"  loaded {t.name} in {time.perf_counter() - started:.1f} s")

        console.print("WADO-RS frames ...")
        measures += bench_frames(targets, ct, runs, fresh_samples)
        if shutil.which("wrk"):
            console.print("WADO-RS frames, native client (wrk) ...")
            measures += bench_frames_native(targets, ct, runs, 3.0 if args.quick else 5.0, work)
        else:
            console.print("[yellow]wrk not installed (make bench installs it): native-client rows left out")
        console.print("WADO-RS whole-series retrieve ...")
        measures += bench_series_retrieve(targets, ct, runs)
        console.print("WADO-RS series metadata ...")
        measures += bench_json(
            targets,
            f"series /metadata, {len(meta.sops):,} instances",
            f"/studies/{meta.study_uid}/series/{meta.series_uid}/metadata",
            META_RUNS,
            len(meta.sops),
        )
        console.print("QIDO-RS ...")
        measures += bench_json(
            targets,
            f"QIDO instances of the CT series ({len(ct.sops)})",
            f"/studies/{ct.study_uid}/series/{ct.series_uid}/instances",
            QIDO_RUNS,
            len(ct.sops),
        )
        measures += bench_json(
            targets,
            "QIDO studies?PatientID= (bench data)",
            "/studies",
            PATIENT_QIDO_RUNS,
            2,
            {"PatientID": ct.patient_id},
        )
        for t in targets:
            t.stop()
        targets = []

        pg: dict[str, Any] | None = None
        if "postgres" not in args.skip:
            console.print("QIDO-RS study search over PostgreSQL (ybyx only) ...")
            pg_measures, info = bench_postgres(work, pg_instances, pg_seconds, pg_queries)
            pg = {"info": info, "measures": [asdict(m) for m in pg_measures]}
        e2e: list[Measure] = []
        if "e2e" not in args.skip:
            for settle in settles:
                console.print(f"end to end, settle {settle:g} s ...")
                e2e.append(bench_e2e(work, ct, settle))

        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        report = {
            "timestamp": stamp,
            "parameters": {
                "mode": "quick" if args.quick else "full",
                "ct_instances": len(ct.sops),
                "ct_bytes": ct.size,
                "meta_instances": len(meta.sops),
                "runs": runs,
                "fresh_connection_samples": fresh_samples,
                "parallel_connections": PARALLEL,
                "pg_instances_requested": pg_instances,
                "pg_seconds": pg_seconds,
                "settle_seconds": settles,
                "wall_seconds": round(time.perf_counter() - t0, 1),
            },
            "environment": environment(orthanc, load_before),
            "comparison": comparison_rows(measures),
            "measures": [asdict(m) for m in measures],
            "postgres": pg,
            "e2e": [asdict(m) for m in e2e],
        }
    finally:
        for t in targets:
            t.stop()
        void = not report or any(m["problems"] for m in report.get("measures", []) + report.get("e2e", []))
        if report.get("postgres"):
            void = void or any(m["problems"] for m in report["postgres"]["measures"])
        if not args.keep and not void:
            shutil.rmtree(work, ignore_errors=True)
        elif report:
            console.print(f"work folder kept: {work}")

    for table in render(report):
        console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"dicomweb-{report['timestamp']}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    base.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    console.print(f"saved {base}.json and {base}.md ({report['parameters']['wall_seconds']:.0f} s)")
    if void:
        console.print(
            "[red]some results are VOID (see the problems in the report): their numbers do not count[/red]"
        )
    return 1 if void else 0


if __name__ == "__main__":
    sys.exit(main())

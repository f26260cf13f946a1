"""Image QC benchmark (issue 4 "Numbers", R-QC-1, R-CE-5): QC ms/image per modality.

For the sample modalities of :mod:`gateway.sample` — CT 512×512 int16, MR 256×256, DX 2500×2048
(12 bits stored), XA multi-frame, US RGB — and for CT and DX as JPEG-LS (what the compression
stage stores and the center receives): the time from the stored file's bytes to the graded
``QcResult`` (parse, decode, header checks, pixel measures, grading), median and 95th percentile
of ``--repeats`` runs over the images, one thread. Then CT throughput with 1 and 2 grading threads
(what ``[qc] workers`` buys on a 2-core machine). Last, **ingest with QC on**: a front-end (this
process, SQLite + folder, compression off) receives ``--ingest-instances`` CT slices from dcmtk
``storescu`` with ``[qc] enabled`` off and on; reported: C-STORE instances/s, the QC backlog
(queued instances) sampled every 0.2 s — peak, when the sender finished, its trend over the second
half of the send — and how long it took to drain after.

Results: a table on the terminal and ``bench/results/qc-<timestamp>.{json,md}``.

    python bench/qc.py                 # 20 CT, 20 MR, DX ×5
    python bench/qc.py --repeats 5 --ingest-instances 2000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import JPEGLSLossless

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/qc.py` puts bench/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

from gateway.config import QcSection  # noqa: E402
from gateway.frontend import Frontend  # noqa: E402
from gateway.qc.engine import QcEngine  # noqa: E402
from gateway.qc.rules import load_rules  # noqa: E402
from gateway.sample import ct_series, write_samples  # noqa: E402
from tests.conftest import frontend_config  # noqa: E402
from tests.peers.orthanc import dcmtk_binary  # noqa: E402


def _jpegls(data: bytes) -> bytes:
    ds = dcmread(io.BytesIO(data))
    ds.compress(JPEGLSLossless)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def corpus(folder: Path) -> dict[str, list[bytes]]:
    write_samples(folder, ct_slices=20)
    files = {
        name: [p.read_bytes() for p in sorted((folder / sub).iterdir())]
        for name, sub in (
            ("CT 512²", "01_CT_chest"),
            ("MR 256²", "02_MR_brain"),
            ("DX 2500×2048", "03_DX_chest"),
            ("XA 10×256²", "04_XA_coronary"),
            ("US 480×640 RGB", "05_US_carotid"),
        )
    }
    files["CT 512² JPEG-LS"] = [_jpegls(d) for d in files["CT 512²"]]
    files["DX 2500×2048 JPEG-LS"] = [_jpegls(d) for d in files["DX 2500×2048"]]
    return files


def bench(engine: QcEngine, images: list[bytes], repeats: int, minimum: int = 5) -> dict[str, Any]:
    times: list[float] = []
    grades: set[str] = set()
    rounds = max(repeats, -(-minimum // len(images)))
    engine.assess_bytes(images[0])  # warm caches and imports
    for _ in range(rounds):
        for data in images:
            t = time.perf_counter()
            result = engine.assess_bytes(data)
            times.append(time.perf_counter() - t)
            grades.add(result.grade.value)
    times.sort()
    median = statistics.median(times)
    return {
        "images": len(times),
        "median_ms": round(median * 1000, 1),
        "p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1000, 1),
        "images_per_s": round(1 / median, 1),
        "grades": sorted(grades),
    }


def throughput(engine: QcEngine, images: list[bytes], threads: int, rounds: int = 3) -> float:
    work = images * rounds
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(engine.assess_bytes, work))
    return round(len(work) / (time.perf_counter() - t), 1)


def bench_ingest(work: Path, files: list[Path], qc_on: bool, workers: int) -> dict[str, Any]:
    cfg = frontend_config(work / f"fe-{qc_on}").model_copy(
        update={"qc": QcSection(enabled=qc_on, rules=ROOT / "config" / "qc.toml", workers=workers)}
    )
    fe = Frontend.start(cfg)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def backlog() -> int:
        return fe.qc.book.waiting() if fe.qc is not None else 0

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), backlog()))
            stop.wait(0.2)

    try:
        sampler = threading.Thread(target=sample, daemon=True)
        started = time.perf_counter()
        sampler.start()
        run = subprocess.run(
            [dcmtk_binary("storescu"), "-aec", "YBYX", "127.0.0.1", str(fe.dicom_port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        sent = time.perf_counter()
        assert run.returncode == 0, run.stderr[-2000:]
        at_end = backlog()
        while backlog():
            time.sleep(0.05)
        drained = time.perf_counter()
        stop.set()
        sampler.join()
        held = fe.archive.catalog.counts()["instances"]
        assert held == len(files), f"front-end holds {held} of {len(files)}"
    finally:
        stop.set()
        fe.stop()
    half = [(t, b) for t, b in samples if started + (sent - started) / 2 <= t <= sent]
    slope = 0.0
    if len(half) > 3:
        ts, bs = [t for t, _ in half], [b for _, b in half]
        mt, mb = statistics.fmean(ts), statistics.fmean(bs)
        var = sum((t - mt) ** 2 for t in ts)
        slope = sum((t - mt) * (b - mb) for t, b in half) / var if var else 0.0
    return {
        "qc": qc_on,
        "qc_workers": workers if qc_on else 0,
        "instances": len(files),
        "send_seconds": round(sent - started, 2),
        "instances_per_s": round(len(files) / (sent - started), 1),
        "backlog_peak": max((b for _, b in samples), default=0),
        "backlog_when_sent": at_end,
        "backlog_growth_per_s_second_half": round(slope, 2),
        "drain_seconds_after_send": round(drained - sent, 2),
        "graded_per_s_overall": round(len(files) / (drained - started), 1) if qc_on else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ingest-instances", type=int, default=300)
    parser.add_argument("--qc-workers", type=int, default=2)
    args = parser.parse_args(argv)
    engine = QcEngine(load_rules(ROOT / "config" / "qc.toml"))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory() as tmp:
        files = corpus(Path(tmp))
    results: dict[str, Any] = {
        "stamp": stamp,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "working_size": engine.rules.working_size,
        "modalities": [],
        "ct_throughput": {},
    }
    print(f"{'images':24s} {'n':>4s} {'median ms':>10s} {'p95 ms':>8s} {'img/s':>7s}  grades")
    for name, images in files.items():
        row = {"modality": name, **bench(engine, images, args.repeats)}
        results["modalities"].append(row)
        print(
            f"{name:24s} {row['images']:4d} {row['median_ms']:10.1f} {row['p95_ms']:8.1f} "
            f"{row['images_per_s']:7.1f}  {' '.join(row['grades'])}"
        )
    for threads in (1, 2):
        results["ct_throughput"][str(threads)] = throughput(engine, files["CT 512²"], threads)
        print(f"CT 512² with {threads} grading thread(s): {results['ct_throughput'][str(threads)]} images/s")
    results["ingest"] = []
    with tempfile.TemporaryDirectory() as tmp:
        series = ct_series(Path(tmp) / "ct", slices=args.ingest_instances)
        for qc_on in (False, True):
            row = bench_ingest(Path(tmp), series, qc_on, args.qc_workers)
            results["ingest"].append(row)
            print(
                f"ingest {row['instances']} CT, QC {'on' if qc_on else 'off'}: "
                f"{row['instances_per_s']} inst/s, QC backlog peak {row['backlog_peak']}, "
                f"at end of send {row['backlog_when_sent']}, "
                f"growth {row['backlog_growth_per_s_second_half']}/s, "
                f"drained {row['drain_seconds_after_send']} s later"
            )
    out = ROOT / "bench" / "results" / f"qc-{stamp}"
    out.with_suffix(".json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    lines = [
        f"# Image QC: ms per image ({stamp})",
        "",
        f"From the stored file's bytes to the graded QcResult (parse, decode, header checks, pixel "
        f"measures on a ≤ {engine.rules.working_size} px working image and a 256² full-resolution "
        f"window, grading), one thread. Python {results['machine']['python']}, "
        f"{results['machine']['cpus']} CPUs (shared with other work while measured).",
        "",
        "| images | n | median ms | p95 ms | images/s | grades |",
        "|---|---:|---:|---:|---:|---|",
        *(
            f"| {r['modality']} | {r['images']} | {r['median_ms']} | {r['p95_ms']} | {r['images_per_s']} | "
            f"{' '.join(r['grades'])} |"
            for r in results["modalities"]
        ),
        "",
        "CT 512² throughput: "
        + ", ".join(f"{t} thread(s) {v} images/s" for t, v in results["ct_throughput"].items())
        + ".",
        "",
        "## Ingest with QC on (CT 512², dcmtk storescu, one association, compression off)",
        "",
        "| QC | workers | instances | inst/s | backlog peak | backlog at end of send "
        "| growth /s (2nd half) | drain s | graded/s overall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {'on' if r['qc'] else 'off'} | {r['qc_workers']} | {r['instances']} "
            f"| {r['instances_per_s']} | {r['backlog_peak']} | {r['backlog_when_sent']} "
            f"| {r['backlog_growth_per_s_second_half']} | {r['drain_seconds_after_send']} "
            f"| {r['graded_per_s_overall'] or '—'} |"
            for r in results["ingest"]
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

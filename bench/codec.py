"""Lossless compression benchmark (issue 4 "Numbers", R-UP-1): codecs, and ingest with it on.

1. **Codecs**: for each codec of ``gateway.codec.CODECS`` on the phantom CT (512x512 int16,
   :func:`gateway.sample.ct_series`) and DX (2500x2048, 12 bits stored): encode ms/image (pydicom
   ``compress`` with the codec's plugin), decode ms/image (pydicom + pylibjpeg/pyjpegls), the full
   stage step ms/image (``gateway.codec.compress``: encode, decode again, compare, header check)
   and the compression ratio (Part-10 file bytes before / after). Medians over the images/repeats.
2. **Ingest**: a front-end (in this process, SQLite + folder, like the tests) receives a CT series
   from dcmtk ``storescu``: first with compression and QC off, then with ``"jpeg-ls"`` *and* image
   QC on (issue 4's goal is for both), with ``[compression] workers`` and ``[qc] workers`` as given
   (default: the product defaults, ``"auto"`` and 1) and QC's ``series_sample`` (default 9).
   Reported for each queue (compression ``codec_queue``, QC ``qc_queue``), sampled every 0.2 s:
   its peak, its value when the sender finished, its growth per second over the second half of the
   send (a least-squares slope: > 0 = it grows), and how long it took to drain after the send. QC's
   drain includes the series' pixel sample, queued when the first pass is done (what the
   forwarder's QC gate does once the study has settled). "Keeps up" means neither backlog grows.

Results: a table on the terminal and ``bench/results/codec-<timestamp>.{json,md}``.

    python bench/codec.py                       # CT 20 slices, DX 3 repeats, ingest 300 instances
    python bench/codec.py --ingest-instances 2000
    python bench/codec.py --skip-codecs --ingest-instances 2000 --codec-workers 1 --qc-sample 0  # "before"
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.pixels.utils import pixel_array

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/codec.py` puts bench/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

from gateway.codec import CODECS, Codec, Status, compress  # noqa: E402
from gateway.config import QcSection  # noqa: E402
from gateway.frontend import Frontend  # noqa: E402
from gateway.sample import ct_series, write_samples  # noqa: E402
from tests.conftest import frontend_config  # noqa: E402
from tests.peers.orthanc import dcmtk_binary  # noqa: E402


def _ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def bench_codec(codec: Codec, files: list[bytes], repeats: int) -> dict[str, Any]:
    encode, decode, stage, ratios = [], [], [], []
    for data in files:
        for _ in range(repeats):
            ds = dcmread(io.BytesIO(data))
            arr = pixel_array(ds, raw=True)
            if ds.get("SamplesPerPixel", 1) > 1:
                ds.PlanarConfiguration = 0
            started = time.perf_counter()
            ds.compress(
                codec.transfer_syntax,
                arr,
                encoding_plugin=codec.plugin,
                generate_instance_uid=False,
                **codec.options,
            )
            encode.append(time.perf_counter() - started)
            started = time.perf_counter()
            out = pixel_array(ds, raw=True)
            decode.append(time.perf_counter() - started)
            assert np.array_equal(out, arr)
            started = time.perf_counter()
            outcome = compress(data, codec)
            stage.append(time.perf_counter() - started)
            assert outcome.status in (Status.COMPRESSED, Status.KEPT), outcome.reason
            ratios.append(len(data) / (outcome.size_after or len(data)))
    return {
        "codec": codec.name,
        "transfer_syntax": str(codec.transfer_syntax),
        "encode_ms": _ms(encode),
        "decode_ms": _ms(decode),
        "stage_ms": _ms(stage),
        "ratio": round(statistics.median(ratios), 2),
        "images": len(files),
        "repeats": repeats,
    }


def phantom_images(work: Path, ct_slices: int) -> dict[str, list[bytes]]:
    ct = [p.read_bytes() for p in ct_series(work / "ct", slices=ct_slices)]
    write_samples(work / "samples", ct_slices=1)
    dx = [p.read_bytes() for p in sorted((work / "samples" / "03_DX_chest").glob("*.dcm"))]
    ds = dcmread(io.BytesIO(dx[0]))
    assert (ds.Rows, ds.Columns) == (2500, 2048)
    return {"CT 512x512": ct, "DX 2500x2048": dx}


def _trend(samples: list[tuple[float, int]], started: float, sent: float) -> float:
    """Least-squares growth (instances/s) of a backlog over the second half of the send."""
    half = [(t, b) for t, b in samples if started + (sent - started) / 2 <= t <= sent]
    return float(np.polyfit([t for t, _ in half], [b for _, b in half], 1)[0]) if len(half) > 3 else 0.0


def bench_ingest(
    work: Path,
    files: list[Path],
    syntax: str,
    *,
    qc: bool,
    codec_workers: int | str | None = None,
    qc_workers: int | str | None = None,
    qc_sample: int | None = None,
) -> dict[str, Any]:
    """One storescu run into a fresh front-end; backlogs of both queues (module docstring)."""
    name = f"{syntax}{'+qc' if qc else ''}-{time.monotonic_ns()}"
    compression: dict[str, Any] = {"transfer_syntax": syntax}
    if codec_workers is not None:
        compression["workers"] = codec_workers
    cfg = frontend_config(work / f"fe-{name}", compression=compression)
    if qc:
        rules = work / f"qc-{name}.toml"
        rules.write_text(
            'role = "qc"\n' + (f"series_sample = {qc_sample}\n" if qc_sample is not None else ""),
            encoding="utf-8",
        )
        section: dict[str, Any] = {"enabled": True, "rules": rules}
        if qc_workers is not None:
            section["workers"] = qc_workers
        cfg = cfg.model_copy(update={"qc": QcSection(**section)})
    fe = Frontend.start(cfg)
    queues: dict[str, list[tuple[float, int]]] = {"codec": [], "qc": []}
    stop = threading.Event()

    def depth() -> dict[str, int]:
        return {
            "codec": fe.compression.backlog() if fe.compression is not None else 0,
            "qc": fe.qc.book.waiting() if fe.qc is not None else 0,
        }

    def sample() -> None:
        while not stop.is_set():
            now = time.perf_counter()
            for queue, n in depth().items():
                queues[queue].append((now, n))
            stop.wait(0.2)

    drained: dict[str, float] = {}
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
        at_end = depth()
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        sampled = False
        while len(drained) < 2 and time.perf_counter() - sent < 1800:
            now = depth()
            if now["qc"] == 0 and fe.qc is not None and not sampled:
                sampled = True  # every header graded: the series' pixel sample (the gate's step)
                if fe.qc.book.queue_samples(study):
                    continue
            for queue, n in now.items():
                if n == 0 and queue not in drained:
                    drained[queue] = time.perf_counter() - sent
            time.sleep(0.05)
        stop.set()
        sampler.join()
        held = fe.archive.catalog.counts()["instances"]
        assert held == len(files), f"front-end holds {held} of {len(files)}"
        counts = dict(fe.compression.counts) if fe.compression is not None else {}
        measured = 0
        if fe.qc is not None:
            measured = sum(r.pixels == "measured" for r in fe.qc.book.results(study))
        workers = {
            "codec": fe.compression.workers if fe.compression is not None else 0,
            "qc": fe.qc.worker.workers if fe.qc is not None else 0,
        }
    finally:
        stop.set()
        fe.stop()
    row: dict[str, Any] = {
        "compression": syntax,
        "qc": qc,
        "codec_workers": workers["codec"],
        "qc_workers": workers["qc"],
        "qc_series_sample": qc_sample if qc_sample is not None else (9 if qc else None),
        "instances": len(files),
        "send_seconds": round(sent - started, 2),
        "instances_per_s": round(len(files) / (sent - started), 1),
        "compressed": counts.get("compressed", 0),
        "ratio": round(counts["bytes_before"] / counts["bytes_after"], 2)
        if counts.get("bytes_after")
        else None,
        "qc_pixel_measured": measured,
    }
    for queue, samples in queues.items():
        row[f"{queue}_backlog_peak"] = max((b for _, b in samples), default=0)
        row[f"{queue}_backlog_when_sent"] = at_end[queue]
        row[f"{queue}_growth_per_s_second_half"] = round(_trend(samples, started, sent), 2)
        row[f"{queue}_drain_seconds_after_send"] = round(drained.get(queue, float("nan")), 2)
    return row


def _workers(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ct-slices", type=int, default=20)
    parser.add_argument("--dx-repeats", type=int, default=3)
    parser.add_argument("--ingest-instances", type=int, default=300)
    parser.add_argument("--skip-codecs", action="store_true", help="only the ingest runs")
    parser.add_argument("--skip-baseline", action="store_true", help="no run with both off")
    parser.add_argument("--codec-workers", type=_workers, default=None, help='N or "auto" (default: config)')
    parser.add_argument("--qc-workers", type=_workers, default=None, help='N or "auto" (default: config)')
    parser.add_argument("--qc-sample", type=int, default=None, help="series_sample (0 = every slice)")
    parser.add_argument("--label", default="", help="suffix of the result files")
    parser.add_argument("--no-qc", action="store_true", help="the compression run without QC")
    args = parser.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "when": stamp,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "codecs": [],
        "ingest": [],
    }
    with tempfile.TemporaryDirectory(prefix="ybyx-bench-codec-") as tmp:
        work = Path(tmp)
        for image, files in ({} if args.skip_codecs else phantom_images(work, args.ct_slices)).items():
            repeats = 1 if image.startswith("CT") else args.dx_repeats
            for codec in CODECS.values():
                row = {"image": image, **bench_codec(codec, files, repeats)}
                results["codecs"].append(row)
                print(row, flush=True)
        series = ct_series(work / "ingest", slices=args.ingest_instances, seed=11)
        runs = [] if args.skip_baseline else [("none", False)]
        for syntax, qc in [*runs, ("jpeg-ls", not args.no_qc)]:
            row = bench_ingest(
                work,
                series,
                syntax,
                qc=qc,
                codec_workers=args.codec_workers,
                qc_workers=args.qc_workers,
                qc_sample=args.qc_sample,
            )
            results["ingest"].append(row)
            print(row, flush=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    out = ROOT / "bench" / "results" / f"codec-{stamp}{'-' + args.label if args.label else ''}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# Lossless compression benchmark {stamp}",
        "",
        f"Python {results['machine']['python']}, {results['machine']['cpus']} CPUs, load average "
        f"{results['machine']['load_average_at_start'][0]:.2f} at start, "
        f"{results['machine']['load_average_at_end'][0]:.2f} at end.",
    ]
    if results["codecs"]:
        lines += [
            "",
            "| image | codec | encode ms | decode ms | stage ms (encode+verify) | ratio |",
            "|---|---|---:|---:|---:|---:|",
        ]
    lines += [
        f"| {r['image']} | {r['codec']} | {r['encode_ms']} | {r['decode_ms']} "
        f"| {r['stage_ms']} | {r['ratio']} |"
        for r in results["codecs"]
    ]
    lines += [
        "",
        "Backlogs: codec / QC queue. Growth: least-squares slope over the second half of the send.",
        "",
        "| compression | QC | workers codec/QC | series_sample | instances | C-STORE inst/s "
        "| backlog peak | at end of send | growth /s (2nd half) | drain s after send | QC pixel-measured "
        "| ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['compression']} | {'on' if r['qc'] else 'off'} | {r['codec_workers']}/{r['qc_workers']} "
        f"| {r['qc_series_sample']} | {r['instances']} | {r['instances_per_s']} "
        f"| {r['codec_backlog_peak']} / {r['qc_backlog_peak']} "
        f"| {r['codec_backlog_when_sent']} / {r['qc_backlog_when_sent']} "
        f"| {r['codec_growth_per_s_second_half']} / {r['qc_growth_per_s_second_half']} "
        f"| {r['codec_drain_seconds_after_send']} / {r['qc_drain_seconds_after_send']} "
        f"| {r['qc_pixel_measured']} | {r['ratio']} |"
        for r in results["ingest"]
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"\nwrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

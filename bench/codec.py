"""Lossless compression benchmark (issue 4 "Numbers", R-UP-1): codecs, and ingest with it on.

1. **Codecs**: for each codec of ``gateway.codec.CODECS`` on the phantom CT (512x512 int16,
   :func:`gateway.sample.ct_series`) and DX (2500x2048, 12 bits stored): encode ms/image (pydicom
   ``compress`` with the codec's plugin), decode ms/image (pydicom + pylibjpeg/pyjpegls), the full
   stage step ms/image (``gateway.codec.compress``: encode, decode again, compare, header check)
   and the compression ratio (Part-10 file bytes before / after). Medians over the images/repeats.
2. **Ingest**: a front-end (in this process, SQLite + folder, like the tests) receives a CT series
   from dcmtk ``storescu`` with ``[compression] transfer_syntax = "none"`` and then ``"jpeg-ls"``.
   Reported: C-STORE instances/s, the compression backlog (queued instances) sampled every 0.2 s —
   its peak and its value when the sender finished — and how long the backlog took to drain after
   that. "Keeps up" means the backlog did not grow over the run (it ends near zero).

Results: a table on the terminal and ``bench/results/codec-<timestamp>.{json,md}``.

    python bench/codec.py                       # CT 20 slices, DX 3 repeats, ingest 300 instances
    python bench/codec.py --ingest-instances 2000
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


def bench_ingest(work: Path, files: list[Path], syntax: str) -> dict[str, Any]:
    cfg = frontend_config(work / f"fe-{syntax}", compression={"transfer_syntax": syntax})
    fe = Frontend.start(cfg)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            backlog = fe.compression.backlog() if fe.compression is not None else 0
            samples.append((time.perf_counter(), backlog))
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
        at_end = fe.compression.backlog() if fe.compression is not None else 0
        while fe.compression is not None and fe.compression.backlog():
            time.sleep(0.05)
        drained = time.perf_counter()
        stop.set()
        sampler.join()
        held = fe.archive.catalog.counts()["instances"]
        assert held == len(files), f"front-end holds {held} of {len(files)}"
        counts = dict(fe.compression.counts) if fe.compression is not None else {}
    finally:
        stop.set()
        fe.stop()
    peak = max((b for _, b in samples), default=0)
    # the backlog's trend over the second half of the send: > 0 instances/s means it grows
    half = [(t, b) for t, b in samples if started + (sent - started) / 2 <= t <= sent]
    slope = float(np.polyfit([t for t, _ in half], [b for _, b in half], 1)[0]) if len(half) > 3 else 0.0
    return {
        "compression": syntax,
        "instances": len(files),
        "send_seconds": round(sent - started, 2),
        "instances_per_s": round(len(files) / (sent - started), 1),
        "backlog_peak": peak,
        "backlog_when_sent": at_end,
        "backlog_growth_per_s_second_half": round(slope, 2),
        "drain_seconds_after_send": round(drained - sent, 2),
        "compressed": counts.get("compressed", 0),
        "ratio": round(counts["bytes_before"] / counts["bytes_after"], 2)
        if counts.get("bytes_after")
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ct-slices", type=int, default=20)
    parser.add_argument("--dx-repeats", type=int, default=3)
    parser.add_argument("--ingest-instances", type=int, default=300)
    args = parser.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "when": stamp,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "codecs": [],
        "ingest": [],
    }
    with tempfile.TemporaryDirectory(prefix="ybyx-bench-codec-") as tmp:
        work = Path(tmp)
        for image, files in phantom_images(work, args.ct_slices).items():
            repeats = 1 if image.startswith("CT") else args.dx_repeats
            for codec in CODECS.values():
                row = {"image": image, **bench_codec(codec, files, repeats)}
                results["codecs"].append(row)
                print(row, flush=True)
        series = ct_series(work / "ingest", slices=args.ingest_instances, seed=11)
        for syntax in ("none", "jpeg-ls"):
            row = bench_ingest(work, series, syntax)
            results["ingest"].append(row)
            print(row, flush=True)
    out = ROOT / "bench" / "results" / f"codec-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# Lossless compression benchmark {stamp}",
        "",
        f"Python {results['machine']['python']}, {results['machine']['cpus']} CPUs.",
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
        "| compression | instances | C-STORE inst/s | backlog peak | backlog at end of send "
        "| backlog growth /s (2nd half) | drain s after send | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['compression']} | {r['instances']} | {r['instances_per_s']} | {r['backlog_peak']} "
        f"| {r['backlog_when_sent']} | {r['backlog_growth_per_s_second_half']} "
        f"| {r['drain_seconds_after_send']} | {r['ratio']} |"
        for r in results["ingest"]
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"\nwrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

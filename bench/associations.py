"""One image per association: what a modality that opens an association for each image costs.

Many modalities and PACS send each instance on an association of its own, so association set-up
(A-ASSOCIATE negotiation of dcmtk ``storescu``'s 128 proposed contexts, release) is paid per image.
``--images`` CT slices (~526 KB each, :func:`gateway.sample.ct_series`) are sent one by one, each
by its own ``storescu`` process, into a fresh ybyx front-end and a fresh Orthanc (the servers of
``bench/ingest.py``, folder + SQLite, ``TCP_NODELAY=1``), alternating ybyx, Orthanc, ybyx, ...
for ``--runs`` runs. Measured: the wall time of each ``storescu`` (process start included, the same
for both servers); reported: the median per run and the median of those, per server, and their
ratio. A run counts only if every ``storescu`` exited 0 and the server then holds every image.

Results: a table on the terminal and ``bench/results/associations-<timestamp>.{json,md}``.

    python bench/associations.py                 # 40 images, 3 runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from ingest import CALLING_AE, ENV, RESULTS, OrthancServer, YbyxServer, console, environment  # noqa: E402

from gateway.sample import ct_series  # noqa: E402
from tests.peers.orthanc import dcmtk_binary  # noqa: E402


def one_run(make: Any, files: list[Path], root: Path) -> tuple[list[float], list[str], str | None]:
    """Each file by its own storescu; the seconds of each, what voids the run, the server's version
    (Orthanc's)."""
    server = make(root)
    version = getattr(server, "version", None)
    problems: list[str] = []
    seconds: list[float] = []
    try:
        time.sleep(0.5)  # as a node that has been up a while: its start-up work is done
        for path in files:
            start = time.perf_counter()
            done = subprocess.run(
                [dcmtk_binary("storescu"), "-aet", CALLING_AE, "-aec", server.ae_title, "127.0.0.1",
                 str(server.port), str(path)],
                env=ENV, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            seconds.append(time.perf_counter() - start)
            if done.returncode != 0:
                problems.append(f"storescu exit {done.returncode}: {done.stderr.strip()[:200]}")
        stored = server.count()
        if stored != len(files):
            problems.append(f"{server.name} holds {stored} of {len(files)} images")
    finally:
        server.stop()
    return seconds, problems, version


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40, help="images, one association each")
    ap.add_argument("--runs", type=int, default=3, help="runs per server (median)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ybyx-assoc-", dir=args.workdir))
    results: dict[str, list[dict[str, Any]]] = {"ybyx": [], "Orthanc": []}
    orthanc_version = "?"
    try:
        files = ct_series(work / "ct", slices=args.images)
        for index in range(args.runs):
            for name, make in (("ybyx", YbyxServer), ("Orthanc", OrthancServer)):
                seconds, problems, version = one_run(make, files, work / f"{name}-{index}")
                orthanc_version = version or orthanc_version
                median_ms = statistics.median(seconds) * 1e3
                results[name].append({"median_ms": round(median_ms, 2), "problems": problems})
                state = "ok" if not problems else f"[red]VOID[/red] {problems[:2]}"
                console.print(f"  {name:8} run {index + 1}/{args.runs}: median {median_ms:6.1f} ms  {state}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary: dict[str, Any] = {}
    for name, runs in results.items():
        valid = [r["median_ms"] for r in runs if not r["problems"]]
        summary[name] = {
            "median_ms": round(statistics.median(valid), 2) if valid else None,
            "valid": len(valid),
        }
    ours, theirs = summary["ybyx"]["median_ms"], summary["Orthanc"]["median_ms"]
    ratio = round(theirs / ours, 2) if ours and theirs else None  # > 1: ybyx takes less time
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "timestamp": stamp,
        "parameters": {"images": args.images, "runs": args.runs},
        "environment": environment(orthanc_version),
        "summary": summary,
        "speed_ratio_ybyx_over_orthanc": ratio,
        "runs": results,
    }
    lines = [
        f"# One image per association ({stamp})",
        "",
        f"{args.images} CT slices, each by its own `storescu`; median over runs of the per-run median.",
        "",
        "| server | ms per association | valid runs |",
        "|---|---:|---:|",
        *(f"| {n} | {s['median_ms']} | {s['valid']}/{args.runs} |" for n, s in summary.items()),
        "",
        f"Speed, ybyx relative to Orthanc: {ratio}×",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"associations-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    base.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    console.print("\n".join(lines))
    console.print(f"saved {base}.json and {base}.md")
    return 0 if all(s["valid"] == args.runs for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

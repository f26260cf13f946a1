"""Viewer benchmark: first image and stack load of the web viewer on loopback (issue 7 §5, R-PF-1).

Issue 7 §5 sets the goal "on loopback: first image <= 1 s from opening the URL, whole 300-slice CT
stack loaded at >= 30 images/s"; ``tests/test_viewer.py`` only measures a 100-slice CT. This script
measures the 300-slice case, once and on demand (it is not a test).

Set-up (fresh, under one temporary folder, loopback only):

* a ybyx **center** in this process (``Center.start``, as the tests start nodes) on free ports, folder
  blob store + SQLite, **security on** (a signing key; the viewer gets a bearer token minted the way
  the tests do — a client registered at the node, ``POST /oauth/token`` — passed as ``#token=``);
* two studies ingested through ``Ingest.accept_file``: the 300-slice 512x512 CT of
  :func:`gateway.sample.ct_series` uncompressed (Explicit VR Little Endian, ~526 KB a slice) and
  the same CT (new UIDs) transcoded to JPEG-LS lossless by ``gateway.codec`` (the archive's
  compressed form, decoded in the browser's decode workers);
* Debian's Chromium (``/usr/bin/chromium``), headless, with the flags of ``tests/test_viewer.py``
  (SwiftShader WebGL2), driven by Playwright, window 1100x760 as in the tests.

For each study, ``--runs`` (3) cold runs, each in a FRESH browser context (empty HTTP cache),
alternating the two studies run by run, then one warm run (a new page in the last cold run's
context: HTTP cache warm, the viewer's image cache empty). Each run opens
``/viewer/?study=UID#token=…`` and waits for ``document.body.dataset.ready``. The numbers are the
viewer's own timing hooks (``window.__ybyx.timings``, ``viewer_assets/src/main.js``):

* **first image** — ``timings.firstImage``: ``performance.now()`` when the first image has been
  painted (the viewport's first ``IMAGE_RENDERED`` of it; results before December 2026 took it when
  ``setStack`` resolved, 100-200 ms before the paint), i.e. ms since navigation start
  (``performance.timeOrigin``);
* **breakdown** — when each step towards the first image was done (HTML, main chunk fetched and
  evaluated, config, QIDO-RS, metadata, Cornerstone init, loader, WebGL engine, first frame
  fetched and decoded, painted: ``STEPS``, documented in ``viewer_assets/src/timing.js``), median
  of the cold runs, printed and saved with the results;
* **stack rate** — ``timings.stackRate``: images / seconds of the prefetch of the whole stack
  (started right after the first image, all images requested at once, as the viewer does);
* **stack loaded** — ``timings.stackLoaded``: ms since navigation start when every image is in the
  viewer's cache; ``300 / stack loaded`` is also given (images/s counted from opening the URL).

Checks (a failed one makes the run VOID): no ``data-error``, no page error, no failed prefetch, the
status line says all images were loaded, and (cold runs) the Resource Timing API saw one request
per image. Median of the cold runs; verdicts against the goals.

Results: a table on the terminal and ``bench/results/viewer-<timestamp>.{json,md}``.

    python bench/viewer.py              # ~3-5 minutes on 2 cores
    python bench/viewer.py --slices 20 --runs 1 --no-save   # smoke check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Response,
    ViewportSize,
    sync_playwright,
)
from pydicom import dcmread
from pydicom.uid import JPEGLSLossless, generate_uid
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
# `python bench/viewer.py` puts bench/ first on the path; put the repository first instead (the
# same fix as bench/dicomweb.py, whose name shadows a package).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (_HERE, ROOT)]

from gateway.center import Center  # noqa: E402
from gateway.codec.table import codec_for  # noqa: E402
from gateway.codec.transcode import Status, compress  # noqa: E402
from gateway.ingest import Refused  # noqa: E402
from gateway.sample import ct_series  # noqa: E402
from tests.conftest import center_config, node_url, token  # noqa: E402
from tests.test_viewer import CHROMIUM_ARGS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CHROMIUM = "/usr/bin/chromium"
WINDOW: ViewportSize = {"width": 1100, "height": 760}
FIRST_IMAGE_GOAL_MS = 1000.0  # issue 7 §5
STACK_RATE_GOAL = 30.0  # images/s, issue 7 §5
READY_TIMEOUT_MS = 180_000
# The Resource Timing buffer holds 250 entries by default: too few to count 300 image requests.
# Raised before any page script runs (the viewer's code is not changed).
INIT_SCRIPT = "performance.setResourceTimingBufferSize(5000);"
# The viewer's steps to the first image, in order (viewer_assets/src/timing.js documents each one).
STEPS = [
    ("htmlResponse", "HTML response"),
    ("earlyFetch", "inline script: study requests started"),
    ("bundleFetched", "main JS chunk fetched"),
    ("bundleEvaluated", "main JS chunk evaluated"),
    ("configFetched", "config.json fetched"),
    ("seriesListed", "QIDO-RS series listed"),
    ("metadataLoaded", "WADO-RS series metadata"),
    ("coreInit", "Cornerstone core init"),
    ("loaderReady", "image loader + decode workers started"),
    ("engineReady", "rendering engine + viewport (WebGL)"),
    ("firstFrameRequested", "first frame requested"),
    ("firstFrameFetched", "first frame fetched"),
    ("firstDecoded", "first frame decoded (worker, codec)"),
    ("stackSet", "stack viewport set (setStack done)"),
    ("firstRendered", "first image painted (IMAGE_RENDERED)"),
    ("firstImage", "first image shown (painted, overlay): the goal's number"),
]
RESOURCES_JS = """() => performance.getEntriesByType('resource')
  .filter((e) => e.name.includes('/frames/'))
  .map((e) => [e.transferSize, e.duration])"""

console = Console() if sys.stdout.isatty() else Console(width=160)


@dataclass
class Study:
    label: str
    uid: str
    transfer_syntax: str
    slices: int
    bytes_on_disk: int


@dataclass
class Run:
    study: str
    kind: str  # "cold" or "warm"
    n: int
    first_image_ms: float | None = None
    stack_rate: float | None = None  # the viewer's own: images / prefetch seconds
    stack_loaded_ms: float | None = None  # since navigation start
    frame_requests: int = 0
    frame_bytes: int = 0  # transferred (0 for HTTP-cache hits)
    wall_s: float = 0.0  # goto() to ready, as seen by this script
    frame_accept: str = ""  # the Accept header of the first frame request (what the viewer asks for)
    frame_content_type: str = ""  # and the Content-Type answered (the transfer syntax sent)
    status: str = ""
    steps: dict[str, float] = field(default_factory=dict)  # STEPS: ms since navigation start
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def rate_from_open(self) -> float | None:
        if not self.stack_loaded_ms:
            return None
        slices = int(m.group(1)) if (m := re.search(r"loaded (\d+) images", self.status)) else 0
        return slices / (self.stack_loaded_ms / 1000.0) if slices else None


# ---------------------------------------------------------------------------------------------- set-up


def load_studies(center: Center, work: Path, slices: int) -> list[Study]:
    """The CT uncompressed and, as a second study, JPEG-LS lossless (``gateway.codec``)."""
    raw = ct_series(work / "ct", slices=slices, study_uid=generate_uid())
    jls_src = ct_series(work / "ct-src", slices=slices, study_uid=generate_uid())
    jls_dir = work / "ct-jls"
    jls_dir.mkdir()
    codec = codec_for("jpeg-ls")
    jls: list[Path] = []
    for i, src in enumerate(jls_src):
        out = compress(src.read_bytes(), codec)
        if out.status is not Status.COMPRESSED or out.data is None:
            raise RuntimeError(f"JPEG-LS of {src.name}: {out.status}: {out.reason}")
        dst = jls_dir / f"{i:04d}.dcm"
        dst.write_bytes(out.data)
        jls.append(dst)
    studies = []
    for label, paths in (("CT uncompressed", raw), ("CT JPEG-LS lossless", jls)):
        for p in paths:
            result = center.ingest.accept_file(p, source="BENCH")
            if isinstance(result, Refused):
                raise RuntimeError(f"ingest of {p}: refused: {result}")
        head = dcmread(paths[0], stop_before_pixels=True)
        studies.append(
            Study(
                label,
                str(head.StudyInstanceUID),
                str(head.file_meta.TransferSyntaxUID),
                len(paths),
                sum(p.stat().st_size for p in paths),
            )
        )
    if studies[1].transfer_syntax != JPEGLSLossless:
        raise RuntimeError(f"second study is {studies[1].transfer_syntax}, not JPEG-LS lossless")
    return studies


# ---------------------------------------------------------------------------------------------- measuring


def measure(ctx: BrowserContext, url: str, study: Study, kind: str, n: int) -> Run:
    run = Run(study.label, kind, n)
    page = ctx.new_page()
    page_errors: list[str] = []
    failed: list[str] = []

    def on_console(m: ConsoleMessage) -> None:
        if m.type in ("warning", "error") and ("prefetch" in m.text or "error" in m.text.lower()):
            failed.append(m.text[:200])

    def on_response(r: Response) -> None:
        if "/frames/" in r.url and not run.frame_content_type:
            run.frame_accept = r.request.headers.get("accept", "")
            # without the boundary (one per response), so the runs' answers compare equal
            run.frame_content_type = re.sub(r";\s*boundary=[^;]*", "", r.headers.get("content-type", ""))

    page.on("pageerror", lambda e: page_errors.append(str(e)[:200]))
    page.on("response", on_response)
    page.on("console", on_console)
    t0 = time.monotonic()
    try:
        page.goto(url)
        page.wait_for_function(
            "document.body.dataset.ready || document.body.dataset.error", timeout=READY_TIMEOUT_MS
        )
        run.wall_s = round(time.monotonic() - t0, 3)
        error = page.evaluate("document.body.dataset.error")
        if error:
            run.problems.append(f"viewer error: {error}")
        timings: dict[str, Any] = page.evaluate("window.__ybyx.timings")
        run.status = page.inner_text("#status").strip()
        resources: list[list[float]] = page.evaluate(RESOURCES_JS)
    except Exception as exc:  # a timeout or a crashed page: this run is VOID, the others still count
        run.problems.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        page.close()
        return run
    page.close()
    run.first_image_ms = _num(timings.get("firstImage"))
    run.stack_rate = _num(timings.get("stackRate"))
    run.stack_loaded_ms = _num(timings.get("stackLoaded"))
    run.steps = {k: v for k, _ in STEPS if (v := _num(timings.get(k))) is not None}
    run.frame_requests = len(resources)
    run.frame_bytes = int(sum(r[0] for r in resources))
    if run.first_image_ms is None or run.stack_rate is None or run.stack_loaded_ms is None:
        run.problems.append(f"timings missing: {timings}")
    loaded = re.search(r"loaded (\d+) images", run.status)
    if not loaded or int(loaded.group(1)) != study.slices:
        run.problems.append(f"status is {run.status!r}, expected {study.slices} images loaded")
    if kind == "cold" and run.frame_requests < study.slices:
        run.problems.append(f"{run.frame_requests} frame requests seen, expected {study.slices}")
    run.problems += [f"page error: {e}" for e in page_errors]
    run.problems += [f"console: {e}" for e in failed]
    return run


def _num(v: Any) -> float | None:
    return round(float(v), 1) if isinstance(v, int | float) else None


def new_context(browser: Browser) -> BrowserContext:
    ctx = browser.new_context(viewport=WINDOW)  # a fresh context: its own, empty HTTP cache
    ctx.add_init_script(INIT_SCRIPT)
    return ctx


def bench(browser: Browser, base: str, bearer: str, studies: list[Study], runs: int) -> list[Run]:
    out: list[Run] = []
    last: dict[str, BrowserContext] = {}
    for i in range(1, runs + 1):
        for s in studies:  # alternate the studies run by run (drift of the machine hits both)
            ctx = new_context(browser)
            out.append(measure(ctx, f"{base}/viewer/?study={s.uid}#token={bearer}", s, "cold", i))
            console.print(_line(out[-1]))
            if s.uid in last:
                last[s.uid].close()
            last[s.uid] = ctx
    for s in studies:  # warm: the same context reopened (HTTP cache filled by the last cold run)
        out.append(measure(last[s.uid], f"{base}/viewer/?study={s.uid}#token={bearer}", s, "warm", 1))
        console.print(_line(out[-1]))
        last[s.uid].close()
    return out


def _line(r: Run) -> str:
    state = "ok" if r.valid else f"VOID ({'; '.join(r.problems)})"
    rate = r.stack_rate and round(r.stack_rate, 1)
    return (
        f"  {r.study} {r.kind} #{r.n}: first image {r.first_image_ms} ms, {rate} images/s,"
        f" stack loaded {r.stack_loaded_ms} ms, {r.frame_requests} requests "
        f"{r.frame_bytes / 1e6:.1f} MB, {state}"
    )


# ---------------------------------------------------------------------------------------------- report


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return round(statistics.median(xs), 1) if xs else None


def summarize(studies: list[Study], runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for s in studies:
        for kind in ("cold", "warm"):
            mine = [r for r in runs if r.study == s.label and r.kind == kind]
            ok = [r for r in mine if r.valid]
            first = _median([r.first_image_ms for r in ok])
            rate = _median([r.stack_rate for r in ok])
            loaded = _median([r.stack_loaded_ms for r in ok])
            from_open = _median([r.rate_from_open for r in ok])
            rows.append(
                {
                    "study": s.label,
                    "kind": kind,
                    "runs": len(mine),
                    "valid_runs": len(ok),
                    "first_image_ms": first,
                    "first_image_ms_all": [r.first_image_ms for r in ok],
                    "stack_rate": rate,
                    "stack_rate_all": [r.stack_rate and round(r.stack_rate, 1) for r in ok],
                    "stack_loaded_ms": loaded,
                    "stack_loaded_ms_all": [r.stack_loaded_ms for r in ok],
                    "rate_from_open": from_open,
                    "first_image_verdict": _verdict(first, FIRST_IMAGE_GOAL_MS, lower_is_better=True),
                    "stack_rate_verdict": _verdict(rate, STACK_RATE_GOAL, lower_is_better=False),
                    "rate_from_open_verdict": _verdict(from_open, STACK_RATE_GOAL, lower_is_better=False),
                }
            )
    return rows


def breakdown(studies: list[Study], runs: list[Run]) -> list[dict[str, Any]]:
    """Per step, the median over the valid cold runs of each study (ms since navigation start)."""
    rows = []
    for key, label in STEPS:
        row: dict[str, Any] = {"step": key, "label": label}
        for s in studies:
            ok = [r for r in runs if r.study == s.label and r.kind == "cold" and r.valid]
            row[s.label] = _median([r.steps.get(key) for r in ok])
        if any(row[s.label] is not None for s in studies):
            rows.append(row)
    first = studies[0].label
    return sorted(rows, key=lambda r: (r[first] is None, r[first] or 0.0))


def breakdown_lines(report: dict[str, Any]) -> list[str]:
    """The breakdown as a Markdown table: when each step was done (median) and since the previous."""
    labels = [s["label"] for s in report["studies"]]
    head = ["step"] + [f"{x} ms (+Δ)" for x in labels]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    prev: dict[str, float] = {}
    for row in report["breakdown"]:
        cells = [f"{row['label']} (`{row['step']}`)"]
        for x in labels:
            v = row[x]
            if v is None:
                cells.append("—")
                continue
            delta = f" (+{v - prev[x]:.0f})" if x in prev else ""
            cells.append(f"{v:.0f}{delta}")
            prev[x] = max(v, prev.get(x, v))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _verdict(value: float | None, goal: float, *, lower_is_better: bool) -> str:
    if value is None:
        return "VOID"
    return "PASS" if (value <= goal if lower_is_better else value >= goal) else "FAIL"


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


HEADERS = [
    "study",
    "run",
    "valid",
    f"first image ms (goal ≤ {FIRST_IMAGE_GOAL_MS:.0f})",
    f"stack images/s (goal ≥ {STACK_RATE_GOAL:.0f})",
    "stack loaded ms (from open)",
    "images/s from open",
]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in report["summary"]:
        median = "median of " if r["kind"] == "cold" and r["valid_runs"] > 1 else ""
        out.append(
            [
                r["study"],
                f"{r['kind']} ({median}{r['valid_runs']})",
                f"{r['valid_runs']}/{r['runs']}",
                f"{_f(r['first_image_ms'])} {r['first_image_verdict']}",
                f"{_f(r['stack_rate'])} {r['stack_rate_verdict']}",
                _f(r["stack_loaded_ms"]),
                f"{_f(r['rate_from_open'])} {r['rate_from_open_verdict']}",
            ]
        )
    return out


def render(report: dict[str, Any]) -> Table:
    t = Table(title=f"ybyx viewer, {report['slices']}-slice 512x512 CT on loopback ({report['timestamp']})")
    for h in HEADERS:
        t.add_column(h)
    for row in table_rows(report):
        t.add_row(*row)
    return t


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Viewer benchmark {report['timestamp']}",
        "",
        f"`bench/viewer.py`: the web viewer (`/viewer/?study=UID#token=…`) on a ybyx center in-process "
        f"(folder + SQLite, security on), {report['slices']}-slice 512x512 CT, Debian Chromium headless "
        "(SwiftShader WebGL2, flags of tests/test_viewer.py), window 1100x760. Cold: a fresh browser "
        f"context each run (median of {report['cold_runs']}); warm: the last cold context reopened (HTTP "
        "cache warm). Numbers are the viewer's own timings (`window.__ybyx.timings`): first image and "
        "stack loaded in ms since navigation start; stack images/s = images / prefetch time (after "
        "the first image); images/s from open = images / stack loaded.",
        "",
        f"Goals (issue 7 §5): first image ≤ {FIRST_IMAGE_GOAL_MS:.0f} ms, ≥ {STACK_RATE_GOAL:.0f} images/s.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += [
        "",
        "## Where the first image's time goes",
        "",
        "Median over the valid cold runs, ms since navigation start (`window.__ybyx.timings`, "
        "steps documented in `viewer_assets/src/timing.js`), in the order of the median; "
        "+Δ is the time since the latest step above it. Steps run partly in parallel.",
        "",
        *breakdown_lines(report),
    ]
    lines += ["", "## Studies", ""]
    for s in report["studies"]:
        lines.append(
            f"- {s['label']}: {s['slices']} instances, {s['bytes_on_disk'] / 1e6:.1f} MB, "
            f"transfer syntax {s['transfer_syntax']}"
        )
    types = sorted({(r["frame_accept"], r["frame_content_type"]) for r in report["runs"]})
    lines += ["", "Frame requests (Accept → Content-Type answered):", ""]
    lines += [f"- `{a}` → `{c}`" for a, c in types]
    lines += ["", "## Runs", ""]
    lines.append("| study | run | first image ms | stack images/s | stack loaded ms | requests | MB | ok |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        ok = "ok" if not r["problems"] else "VOID: " + "; ".join(r["problems"])
        rate = r["stack_rate"] and round(r["stack_rate"], 1)
        lines.append(
            f"| {r['study']} | {r['kind']} #{r['n']} | {r['first_image_ms']} | {rate} | "
            f"{r['stack_loaded_ms']} | {r['frame_requests']} | {r['frame_bytes'] / 1e6:.1f} | {ok} |"
        )
    lines += [
        "",
        "## Environment",
        "",
        f"- {env['cpus']} CPUs ({env['cpu']}), load average before {env['load_before']}, "
        f"after {env['load_after']}",
        f"- {env['chromium']}; Playwright {env['playwright']}; Python {env['python']}",
        f"- git {env['git']}",
        "",
    ]
    return "\n".join(lines)


def environment(load_before: tuple[float, ...]) -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"? ({exc})"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "chromium": run(CHROMIUM, "--version").splitlines()[0] if run(CHROMIUM, "--version") else "?",
        "playwright": version("playwright"),
        "python": platform.python_version(),
        "git": run("git", "rev-parse", "--short", "HEAD"),
    }


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300, help="CT slices (default 300, issue 7 §5)")
    ap.add_argument("--runs", type=int, default=3, help="cold runs per study (default 3)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no result files")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory(prefix="ybyx-bench-viewer-") as tmp:
        work = Path(tmp)
        center = Center.start(center_config(work / "center"))
        try:
            console.print(f"center at {node_url(center)}; writing and ingesting 2 x {args.slices} slices…")
            studies = load_studies(center, work, args.slices)
            bearer = token(center)  # all the center's scopes, for a client registered there
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    runs = bench(browser, node_url(center), bearer, studies, args.runs)
                finally:
                    browser.close()
        finally:
            center.stop()
    report: dict[str, Any] = {
        "benchmark": "viewer",
        "timestamp": stamp,
        "slices": args.slices,
        "cold_runs": args.runs,
        "goals": {"first_image_ms_max": FIRST_IMAGE_GOAL_MS, "stack_images_per_s_min": STACK_RATE_GOAL},
        "studies": [asdict(s) for s in studies],
        "summary": summarize(studies, runs),
        "breakdown": breakdown(studies, runs),
        "runs": [{**asdict(r), "valid": r.valid, "rate_from_open": r.rate_from_open} for r in runs],
        "environment": environment(load_before),
    }
    console.print(render(report))
    console.print("where the first image's time goes (median of the cold runs):")
    console.print("\n".join(breakdown_lines(report)))
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"viewer-{stamp}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (RESULTS / f"viewer-{stamp}.md").write_text(markdown(report), encoding="utf-8")
        console.print(f"saved bench/results/viewer-{stamp}.{{json,md}}")
    if any(not r.valid for r in runs):
        console.print("[red]some runs are VOID (see the problems above): their numbers do not count[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

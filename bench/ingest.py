"""C-STORE ingest benchmark: the ybyx front-end against Orthanc, on this machine, in one run.

A CT series (default 300 slices of 512x512 int16, ~526 KB each, :func:`gateway.sample.ct_series`) is
sent by dcmtk ``storescu`` into

* **ybyx**: ``ybyx frontend -c <generated toml>`` as a subprocess, folder blob store + SQLite catalog;
* **Orthanc**: the Debian package, SQLite index, DICOMweb plugin loaded (``tests/peers/orthanc.py``);

alternating ybyx, Orthanc, ybyx, Orthanc, ... with a fresh server and empty storage for every run.
The measure is the wall time of ``storescu`` for the whole series (1 association, or 2 parallel
``storescu`` processes each sending half the files); the median of ``--runs`` runs is reported as
instances/s and MB/s (10^6 bytes of Part-10 files per second). ``TCP_NODELAY=1`` is set for both
servers and for ``storescu``. A run only counts if every ``storescu`` exited 0, printed no error and
the server then holds every instance; otherwise the run, and any median it belongs to, is VOID.

``--rss-instances N`` adds a longer ybyx-only run (a fresh N-slice series) while sampling the
server's resident memory (``VmRSS`` in ``/proc/PID/status``) every 100 ms.

Results: a table on the terminal and ``bench/results/ingest-<timestamp>.{json,md}``.

    python bench/ingest.py                       # 300 slices, 3 runs, 1 and 2 associations
    python bench/ingest.py --runs 5 --rss-instances 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import generate_uid
from rich.console import Console
from rich.table import Table

from gateway.sample import ct_series

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/ingest.py` puts bench/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

from tests.peers.orthanc import Modality, OrthancPeer, dcmtk_binary  # noqa: E402
from tests.peers.ports import free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CALLING_AE = "BENCH"
YBYX_AE = "YBYX"
ORTHANC_AE = "ORTHANC"
START_TIMEOUT = 30.0
STOP_GRACE = 15.0
SEND_TIMEOUT = 3600.0
RSS_INTERVAL = 0.1
ENV = {**os.environ, "TCP_NODELAY": "1"}

console = Console()


# ---------------------------------------------------------------------------------------------- tools


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


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB; empty once it is gone."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return found


class RssSampler:
    """Samples a process's VmRSS in a background thread."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (seconds since start, KiB)
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = rss_kib(self.pid)
            if "VmRSS" in now:
                self.samples.append((time.perf_counter() - self._t0, now["VmRSS"]))
                self.hwm_kib = max(self.hwm_kib, now.get("VmHWM", 0))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return max((kib for _, kib in self.samples), default=0) / 1024


# ---------------------------------------------------------------------------------------------- servers


class Server(Protocol):
    name: str
    ae_title: str
    port: int
    pid: int
    log_path: Path

    def count(self) -> int: ...

    def stop(self) -> int | None: ...


def _wait_echo(port: int, ae_title: str, proc: subprocess.Popen[bytes], log_path: Path, what: str) -> None:
    """Wait until the SCP answers C-ECHO from our calling AE (i.e. it is ready to take stores)."""
    echoscu = dcmtk_binary("echoscu")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; log tail:\n{log_tail(log_path)}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                time.sleep(0.1)
                continue
        echo = subprocess.run(
            [echoscu, "-aet", CALLING_AE, "-aec", ae_title, "127.0.0.1", str(port)],
            capture_output=True,
            env=ENV,
            timeout=30,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} not answering C-ECHO after {START_TIMEOUT:.0f}s; log:\n{log_tail(log_path)}")


class YbyxServer:
    """``ybyx frontend`` in a subprocess, folder + SQLite under ``root``."""

    name = "ybyx"
    ae_title = YBYX_AE

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
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
                    f'ae_title = "{YBYX_AE}"',
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
                    # like for like with Orthanc, which neither compresses nor grades: the
                    # post-ingest stages have their own benches (bench/codec.py, bench/qc.py)
                    "[compression]",
                    'transfer_syntax = "none"',
                    "",
                ]
            ),
            encoding="utf-8",
        )
        self.log_path = root / "ybyx.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [ybyx_binary(), "frontend", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=ENV,
            )
        self.pid = self.proc.pid
        try:
            _wait_echo(self.port, YBYX_AE, self.proc, self.log_path, "ybyx frontend")
            self._wait_helpers()
        except BaseException:
            self.stop()
            raise

    def _wait_helpers(self) -> None:
        """Wait until the node's ingest helper processes are up (``/healthz``), as on a node that
        has been running for a while: their one-time start is not part of steady-state ingest."""
        deadline = time.monotonic() + START_TIMEOUT
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if json.load(answer).get("ingest_helpers") in ("ready", "none"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"ybyx ingest helpers not ready after {START_TIMEOUT:.0f}s")

    def count(self) -> int:
        """Catalogued instances whose blob file exists (read-only, straight from SQLite)."""
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as conn:
            keys = [row[0] for row in conn.execute("SELECT blob_key FROM instances")]
        return sum(1 for key in keys if (self.root / "blobs" / key).is_file())

    def leftovers(self) -> int:
        """Files left in the spool (received but neither stored nor cleaned up)."""
        spool = self.root / "blobs" / ".spool"
        return sum(1 for p in spool.rglob("*") if p.is_file()) if spool.is_dir() else 0

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


class OrthancServer:
    """Orthanc (Debian package) with the DICOMweb plugin, SQLite index, storage under ``root``."""

    name = "Orthanc"
    ae_title = ORTHANC_AE

    def __init__(self, root: Path) -> None:
        # storescu's AE must be a registered modality: Orthanc is set up not to take stores from anyone.
        self.peer = OrthancPeer.start(
            root, aet=ORTHANC_AE, modalities={"bench": Modality(CALLING_AE, "127.0.0.1", 104)}
        )
        self.port = self.peer.dicom_port
        self.pid = self.peer.proc.pid
        self.log_path = self.peer.log_path
        self.version = str(self.peer.system()["Version"])
        _wait_echo(self.port, ORTHANC_AE, self.peer.proc, self.log_path, "Orthanc")

    def count(self) -> int:
        return self.peer.count_instances()

    def leftovers(self) -> int:
        return 0

    def stop(self) -> int | None:
        self.peer.stop()
        return self.peer.proc.returncode


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Send:
    seconds: float
    exit_codes: list[int]
    error_lines: list[str]


def storescu(files: Sequence[Path], port: int, called_ae: str, parallel: int, logdir: Path) -> Send:
    """Send ``files`` with ``parallel`` storescu processes (contiguous shares); wall time of them all."""
    binary = dcmtk_binary("storescu")
    share = -(-len(files) // parallel)
    chunks = [files[i * share : (i + 1) * share] for i in range(parallel)]
    logs = [logdir / f"storescu-{i}.log" for i in range(parallel)]
    handles = [path.open("wb") for path in logs]
    try:
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [binary, "-aet", CALLING_AE, "-aec", called_ae, "127.0.0.1", str(port), *map(str, chunk)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=ENV,
            )
            for chunk, handle in zip(chunks, handles, strict=True)
        ]
        # a blocking wait: Popen.wait(timeout=...) polls with sleeps of up to 50 ms, which put
        # every measured time on a 50 ms grid (~4% of a 300-slice run)
        watchdog = threading.Timer(SEND_TIMEOUT, lambda: [p.kill() for p in procs])
        watchdog.start()
        try:
            codes = [proc.wait() for proc in procs]
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.close()
    errors = [
        line
        for path in logs
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith(("E:", "F:"))
    ]
    return Send(seconds, codes, errors)


@dataclass
class Run:
    server: str
    parallel: int
    index: int
    instances: int
    bytes: int
    seconds: float
    exit_codes: list[int]
    stored: int
    peak_rss_mib: float
    server_exit: int | None
    problems: list[str] = field(default_factory=list)  # any of these voids the run
    notes: list[str] = field(default_factory=list)  # worth reporting, not about the measurement

    @property
    def valid(self) -> bool:
        return not self.problems


def one_run(
    make: Callable[[Path], Any], files: Sequence[Path], size: int, parallel: int, index: int, work: Path
) -> Run:
    root = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    server = make(root / "server")
    problems: list[str] = []
    try:
        with RssSampler(server.pid) as rss:
            sent = storescu(files, server.port, server.ae_title, parallel, root)
        stored = server.count()
        leftovers = server.leftovers()
    finally:
        server_exit = server.stop()
    if any(sent.exit_codes):
        problems.append(f"storescu exit status {sent.exit_codes}")
    if sent.error_lines:
        problems.append(f"storescu errors: {sent.error_lines[:3]}")
    if stored != len(files):
        problems.append(f"{server.name} holds {stored} of {len(files)} instances")
    if leftovers:
        problems.append(f"{leftovers} file(s) left in the spool")
    run = Run(
        server.name,
        parallel,
        index,
        len(files),
        size,
        sent.seconds,
        sent.exit_codes,
        stored,
        round(rss.peak_mib, 1),
        server_exit,
        problems,
    )
    if server_exit not in (0, None, -signal.SIGTERM):
        # Not a reason to void the timing (the data was counted before the stop), but worth reporting.
        run.notes.append(f"server exit status {server_exit} on SIGTERM; log:\n{log_tail(server.log_path, 8)}")
    if run.valid:
        shutil.rmtree(root, ignore_errors=True)  # keep the evidence of failed runs only
    else:
        console.print(f"[red]{server.name} run {index + 1} ({parallel} assoc) VOID[/red]: {run.problems}")
        console.print(f"  kept in {root}")
    return run


@dataclass
class Summary:
    server: str
    parallel: int
    runs: int
    valid_runs: int
    median_s: float
    min_s: float
    max_s: float
    instances_per_s: float
    mb_per_s: float
    peak_rss_mib: float
    void: bool


def summarise(runs: list[Run]) -> list[Summary]:
    out: list[Summary] = []
    for key in sorted({(r.parallel, r.server) for r in runs}, key=lambda k: (k[0], k[1] != "ybyx")):
        group = [r for r in runs if (r.parallel, r.server) == key]
        times = [r.seconds for r in group]
        median = statistics.median(times)
        void = not all(r.valid for r in group)
        out.append(
            Summary(
                key[1],
                key[0],
                len(group),
                sum(r.valid for r in group),
                round(median, 3),
                round(min(times), 3),
                round(max(times), 3),
                round(group[0].instances / median, 1),
                round(group[0].bytes / 1e6 / median, 1),
                max(r.peak_rss_mib for r in group),
                void,
            )
        )
    return out


def rss_run(slices: int, work: Path) -> dict[str, Any]:
    """A longer ybyx-only run with a fresh series of ``slices`` instances, sampling RSS."""
    folder = work / f"ct{slices}"
    console.print(f"generating a {slices}-slice CT series for the RSS run ...")
    files = ct_series(folder, slices=slices, study_uid=str(generate_uid()))
    size = sum(p.stat().st_size for p in files)
    root = Path(tempfile.mkdtemp(prefix="rss-", dir=work))
    server = YbyxServer(root / "server")
    try:
        idle = rss_kib(server.pid).get("VmRSS", 0)
        with RssSampler(server.pid) as rss:
            sent = storescu(files, server.port, server.ae_title, 1, root)
            time.sleep(1.0)  # a few samples after the association is released
        stored = server.count()
        after = rss_kib(server.pid)
    finally:
        server.stop()
    problems = []
    if any(sent.exit_codes) or sent.error_lines:
        problems.append(f"storescu exit {sent.exit_codes}, errors {sent.error_lines[:3]}")
    if stored != len(files):
        problems.append(f"ybyx holds {stored} of {len(files)} instances")
    samples = rss.samples
    quarter = [samples[min(len(samples) - 1, int(len(samples) * q))][1] / 1024 for q in (0.25, 0.5, 0.75)]
    result = {
        "instances": len(files),
        "bytes": size,
        "seconds": round(sent.seconds, 3),
        "instances_per_s": round(len(files) / sent.seconds, 1),
        "idle_rss_mib": round(idle / 1024, 1),
        "rss_at_25_50_75pct_mib": [round(v, 1) for v in quarter],
        "peak_rss_mib": round(rss.peak_mib, 1),
        "vm_hwm_mib": round(rss.hwm_kib / 1024, 1),
        "final_rss_mib": round(after.get("VmRSS", 0) / 1024, 1),
        "samples": [(round(t, 2), kib) for t, kib in samples[:: max(1, len(samples) // 200)]],
        "problems": problems,
    }
    if not problems:
        shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------- report


def environment(orthanc_version: str) -> dict[str, Any]:
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
        "pynetdicom": version("pynetdicom"),
        "pydicom": version("pydicom"),
        "orthanc": orthanc_version,
        "dcmtk": (run(dcmtk_binary("storescu"), "--version").splitlines() or ["storescu ?"])[0],
        "ybyx_commit": run("git", "rev-parse", "--short", "HEAD"),
        "ybyx_tree_dirty": bool(run("git", "status", "--porcelain")),
    }


def render_table(summaries: list[Summary], title: str) -> Table:
    table = Table(title=title)
    for col, justify in (
        ("server", "left"),
        ("assoc", "right"),
        ("median s", "right"),
        ("min–max s", "right"),
        ("inst/s", "right"),
        ("MB/s", "right"),
        ("peak RSS MiB", "right"),
        ("valid", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in summaries:
        table.add_row(
            s.server,
            str(s.parallel),
            f"{s.median_s:.2f}",
            f"{s.min_s:.2f}–{s.max_s:.2f}",
            f"{s.instances_per_s:.1f}",
            f"{s.mb_per_s:.1f}",
            f"{s.peak_rss_mib:.0f}",
            "[red]VOID[/red]" if s.void else f"{s.valid_runs}/{s.runs}",
        )
    return table


def markdown(report: dict[str, Any]) -> str:
    p, env = report["parameters"], report["environment"]
    lines = [
        f"# C-STORE ingest: ybyx vs Orthanc ({report['timestamp']})",
        "",
        f"{p['instances']} × CT 512×512 int16 ({p['bytes'] / 1e6:.1f} MB of Part-10 files), dcmtk "
        f"storescu over loopback, median of {p['runs']} runs, alternating ybyx/Orthanc, "
        "fresh server + storage per run.",
        "",
        "| server | assoc | median s | min–max s | inst/s | MB/s | peak RSS MiB | valid |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in report["summary"]:
        valid = "**VOID**" if s["void"] else f"{s['valid_runs']}/{s['runs']}"
        lines.append(
            f"| {s['server']} | {s['parallel']} | {s['median_s']:.2f} | {s['min_s']:.2f}–{s['max_s']:.2f} | "
            f"{s['instances_per_s']:.1f} | {s['mb_per_s']:.1f} | {s['peak_rss_mib']:.0f} | {valid} |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| # | server | assoc | s | stored | storescu exit | problems / notes |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for i, r in enumerate(report["runs"], 1):
        text = [*r["problems"], *(f"note: {n}" for n in r["notes"])]
        probs = "; ".join(text).replace("\n", " ").replace("|", "\\|") or "—"
        lines.append(
            f"| {i} | {r['server']} | {r['parallel']} | {r['seconds']:.2f} | "
            f"{r['stored']}/{r['instances']} | {r['exit_codes']} | {probs} |"
        )
    rss = report.get("rss")
    if rss:
        lines += [
            "",
            f"## ybyx RSS over {rss['instances']} instances (1 association)",
            "",
            f"- {rss['seconds']:.1f} s, {rss['instances_per_s']:.1f} inst/s",
            f"- idle {rss['idle_rss_mib']} MiB; at 25/50/75 % of the run "
            f"{rss['rss_at_25_50_75pct_mib']} MiB; peak {rss['peak_rss_mib']} MiB "
            f"(VmHWM {rss['vm_hwm_mib']}); after {rss['final_rss_mib']} MiB",
            f"- problems: {'; '.join(rss['problems']) or 'none'}",
        ]
    lines += [
        "",
        "## Set-up",
        "",
        f"- machine: {env['cpu']}, {env['cpus']} CPUs, {env['memory_gib']} GiB, Linux {env['kernel']}; "
        "servers and storescu share the CPUs",
        f"- ybyx {env['ybyx_commit']}{' (uncommitted changes)' if env['ybyx_tree_dirty'] else ''}: "
        f"`ybyx frontend`, folder blobs + SQLite (WAL, synchronous=FULL), Python {env['python']}, "
        f"pynetdicom {env['pynetdicom']}, pydicom {env['pydicom']}",
        f"- Orthanc {env['orthanc']} (Debian), SQLite index, DICOMweb plugin, SyncStorageArea=true, "
        "StorageCompression=false, default MaximumPduLength",
        f"- client: {env['dcmtk']}, default options; `TCP_NODELAY=1` for servers and client",
        "- a run is VOID unless every storescu exits 0 without errors and the server holds every instance",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per server and parallelism (median)")
    ap.add_argument("--slices", type=int, default=300, help="instances in the series")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2], help="storescu processes")
    ap.add_argument(
        "--rss-instances", type=int, default=0, help="also a ybyx RSS run of N instances (0 = skip)"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where data and servers live (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.slices < 2 or any(n < 1 for n in args.parallel):
        ap.error("--runs, --slices and --parallel must be positive (slices >= 2)")

    work = Path(tempfile.mkdtemp(prefix="ybyx-bench-", dir=args.workdir))
    runs: list[Run] = []
    orthanc_version = "?"
    try:
        console.print(f"generating a {args.slices}-slice CT series in {work} ...")
        files = ct_series(work / "ct", slices=args.slices)
        size = sum(p.stat().st_size for p in files)

        def make_orthanc(root: Path) -> OrthancServer:
            nonlocal orthanc_version
            server = OrthancServer(root)
            orthanc_version = server.version
            return server

        for parallel in args.parallel:
            for index in range(args.runs):
                for make in (YbyxServer, make_orthanc):
                    run = one_run(make, files, size, parallel, index, work)
                    runs.append(run)
                    state = "ok" if run.valid else "[red]VOID[/red]"
                    console.print(
                        f"  {run.server:8} assoc={parallel} run {index + 1}/{args.runs}: "
                        f"{run.seconds:6.2f} s  {run.instances / run.seconds:6.1f} inst/s  {state}"
                    )
        rss = rss_run(args.rss_instances, work) if args.rss_instances else None
    finally:
        if not args.keep and all(r.valid for r in runs):
            shutil.rmtree(work, ignore_errors=True)

    summaries = summarise(runs)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {
        "timestamp": stamp,
        "parameters": {
            "instances": len(files),
            "bytes": size,
            "runs": args.runs,
            "parallel": args.parallel,
            "rss_instances": args.rss_instances,
        },
        "environment": environment(orthanc_version),
        "summary": [asdict(s) for s in summaries],
        "runs": [asdict(r) for r in runs],
        "rss": rss,
    }
    title = f"C-STORE ingest, {len(files)} × 512×512 CT ({size / 1e6:.0f} MB), median of {args.runs}"
    console.print(render_table(summaries, title))
    if rss:
        console.print(
            f"ybyx RSS over {rss['instances']} instances: idle {rss['idle_rss_mib']} MiB, "
            f"25/50/75 % {rss['rss_at_25_50_75pct_mib']} MiB, peak {rss['peak_rss_mib']} MiB, "
            f"after {rss['final_rss_mib']} MiB ({rss['instances_per_s']} inst/s)"
            + (f" [red]VOID: {rss['problems']}[/red]" if rss["problems"] else "")
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"ingest-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    base.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    console.print(f"saved {base}.json and {base}.md")
    void = any(s.void for s in summaries) or bool(rss and rss["problems"])
    if void:
        console.print("[red]some results are VOID (see above): their numbers do not count[/red]")
    return 1 if void else 0


if __name__ == "__main__":
    sys.exit(main())

"""kill -9 the front-end while storescu sends 200 instances: every acknowledged one survives (issue 2).

The front-end runs as a real process (``ybyx frontend``); it is killed once part of the series is
catalogued. After a restart, every instance storescu saw *success* for is in the catalog and the
blob store with the right SHA-256; sending the whole series again completes it without duplicates.
The front-end runs with its default lossless compression (R-UP-1), so the kill also lands while
instances are being compressed: after the restart the compression queue resumes and every
acknowledged instance ends up JPEG-LS with its pixels exactly as sent.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels.utils import pixel_array
from pydicom.uid import JPEGLSLossless

from gateway.archive import Archive
from gateway.config import FrontendConfig, load_config
from tests.conftest import dcmtk
from tests.peers.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def start(config: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "frontend", "-c", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while (
        subprocess.run(
            [dcmtk("echoscu"), "-aec", "YBYX", "127.0.0.1", str(port)], capture_output=True
        ).returncode
        != 0
    ):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        assert time.monotonic() < deadline, "front-end did not start"
        time.sleep(0.2)


def catalogued(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("select count(*) from instances").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def compression_backlog(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("select count(*) from codec_queue").fetchone()[0])
    except sqlite3.OperationalError:
        return -1


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def acknowledged(storescu_log: str) -> list[Path]:
    """Files storescu got a success status for (its -v log: 'Sending file', then the response)."""
    ok, current = [], None
    for line in storescu_log.splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            ok.append(current)
            current = None
    return ok


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(ct200: list[Path], tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "fe.toml"
    config.write_text(
        f'role = "frontend"\ninstitution = "H"\n[dicom]\nae_title = "YBYX"\nhost = "127.0.0.1"\n'
        f"port = {port}\nallow_any_calling_ae = true\n",
        encoding="utf-8",
    )
    db = tmp_path / "data" / "catalog.db"
    proc = start(config)
    wait_listening(port, proc)

    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-nh", "-aec", "YBYX", "127.0.0.1", str(port), *map(str, ct200)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while catalogued(db) < 40:
        assert time.monotonic() < deadline and sender.poll() is None, (
            "transfer too fast or stuck to kill mid-way"
        )
        time.sleep(0.05)
    helpers = children(proc.pid)
    assert helpers, "the node has no child processes (ingest helpers, compression workers)"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    log, _ = sender.communicate(timeout=60)
    acked = acknowledged(log)
    assert 30 <= len(acked) < len(ct200), f"{len(acked)} acknowledged: the kill did not land mid-transfer"

    # the node's child processes do not outlive it (they would pile up with every crash)
    deadline = time.monotonic() + 15
    while alive := [pid for pid in helpers if Path(f"/proc/{pid}").exists() and not zombie(pid)]:
        assert time.monotonic() < deadline, f"child processes {alive} outlived the killed node"
        time.sleep(0.1)

    # restart: the catalog opens cleanly and holds every acknowledged instance, intact; the intake
    # journal (gateway/intake.py) was looked at and emptied before the node listened
    proc = start(config)
    wait_listening(port, proc)
    assert list((tmp_path / "data" / "blobs" / ".intake").iterdir()) == []
    cfg = load_config(config)
    assert isinstance(cfg, FrontendConfig)
    assert cfg.compression.transfer_syntax == "jpeg-ls"  # the default
    deadline = time.monotonic() + 180
    while compression_backlog(db) != 0:  # the queue outlived the kill; the worker resumes it
        assert time.monotonic() < deadline, f"compression backlog stuck at {compression_backlog(db)}"
        time.sleep(0.2)
    archive = Archive.open(cfg.storage, cfg.database)
    try:
        for path in acked:
            sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            [inst] = archive.catalog.locate({"SOPInstanceUID": sop})
            data = b"".join(archive.store.get(inst.blob_key))
            assert hashlib.sha256(data).hexdigest() == inst.sha256
            stored = dcmread(io.BytesIO(data))
            assert inst.transfer_syntax == stored.file_meta.TransferSyntaxUID == JPEGLSLossless
            assert np.array_equal(pixel_array(stored, raw=True), pixel_array(dcmread(path), raw=True))

        # the sender retries everything; the archive completes without duplicates
        again = subprocess.run(
            [dcmtk("storescu"), "-aec", "YBYX", "127.0.0.1", str(port), *map(str, ct200)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert again.returncode == 0, again.stderr
        assert archive.catalog.counts()["instances"] == len(ct200)
    finally:
        archive.close()
        proc.terminate()
        proc.wait(10)

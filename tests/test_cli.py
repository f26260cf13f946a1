"""The command line as an operator uses it: send (resumable, exit codes), sample, demo (issue 2 §7–8)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

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


def test_demo_runs_the_index_and_two_provinces_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """Issue 5 §9: the sample CT archived in province A is found through the index by province B's
    front-end and fetched there for a doctor with the patient's QR grant (R-RT-4, R-CE-7, R-SE-11)."""
    center_port, index_port, center_b_port = free_port(), free_port(), free_port()
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
[center.index]
url = "http://127.0.0.1:{index_port}"
client_id = "demo-center-50"
client_secret_file = "c/index.secret"
retry_initial_seconds = 0.2
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
key_file = "pseudonym.key"
[index]
[index.http]
port = {index_port}
[index.database]
url = "sqlite:///i/index.db"
[index.security]
signing_key_file = "i/signing-key.pem"
[[index.provinces]]
code = "50"
center_url = "http://127.0.0.1:{center_port}"
[[index.provinces]]
code = "52"
center_url = "http://127.0.0.1:{center_b_port}"
[center_b]
province = "52"
[center_b.http]
port = {center_b_port}
[center_b.storage]
path = "cb/blobs"
[center_b.database]
url = "sqlite:///cb/catalog.db"
[center_b.security]
signing_key_file = "cb/signing-key.pem"
[center_b.index]
url = "http://127.0.0.1:{index_port}"
client_id = "demo-center-52"
client_secret_file = "cb/index.secret"
[[center_b.center_peers]]
province = "50"
client_id = "demo-center-52"
client_secret_file = "cb/center-50.secret"
[frontend_b]
institution = "DEMO_B"
[frontend_b.dicom]
ae_title = "YBYX_DEMO_B"
host = "127.0.0.1"
port = {free_port()}
allow_any_calling_ae = true
[frontend_b.http]
port = {free_port()}
[frontend_b.storage]
path = "feb/blobs"
[frontend_b.database]
url = "sqlite:///feb/catalog.db"
[frontend_b.forward]
center_url = "http://127.0.0.1:{center_b_port}"
client_id = "demo-frontend-b"
client_secret_file = "feb/center-client.secret"
[frontend_b.security]
signing_key_file = "feb/signing-key.pem"
[frontend_b.identity]
key_file = "pseudonym.key"
[frontend_b.grants]
insurance_qr_public_keys = ["insurance-platform.pub"]
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
    assert (tmp_path / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    # real node identity: every link's secret generated at start (mode 600), curl lines with tokens
    for secret in (
        "fe/center-client.secret",
        "c/index.secret",
        "cb/center-50.secret",
        "feb/center-client.secret",
    ):
        assert (tmp_path / secret).stat().st_mode & 0o777 == 0o600, secret
    assert "-u demo-his:ybyx_cs_" in text and "Authorization: Bearer $HIS" in text
    # the cross-province part, checked at the nodes with the credentials the demo printed
    assert "retrieval record at the index: retrieve allowed by DEMO_B / DR-B-001" in text, text[-3000:]
    study = re.search(r"/viewer/\?study=([0-9.]+)#token=", text)
    assert study is not None, text[-3000:]
    index_url = f"http://127.0.0.1:{index_port}"
    index_token = _printed_token(text, "demo-index", index_url)
    rows = httpx.get(
        f"{index_url}/api/v1/retrievals",
        params={"institution": "DEMO_B", "result": "allowed"},
        headers={"Authorization": f"Bearer {index_token}"},
    ).json()
    assert [(r["action"], r["study_uid"], r["doctor"]) for r in rows if r["action"] == "retrieve"] == [
        ("retrieve", study[1], "DR-B-001")
    ]
    fe_b = re.search(r"front-end B, fetched from A: (http://127\.0\.0\.1:\d+)/viewer/\S+#token=(\S+)", text)
    assert fe_b is not None, text[-3000:]
    assert "signed in as the demo doctor DR-B-001" in text  # a user token: the grant policy applies
    series = httpx.get(
        f"{fe_b[1]}/dicom-web/studies/{study[1]}/series", headers={"Authorization": f"Bearer {fe_b[2]}"}
    )
    assert series.status_code == 200, series.text
    held = sum(int(s["00201209"]["Value"][0]) for s in series.json())
    assert held == 40  # province B's front-end holds the whole fetched CT
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0


def _printed_token(text: str, client: str, url: str) -> str:
    """A token for the ``client`` whose secret the demo printed in its curl lines."""
    secret = re.search(rf"-u {client}:(ybyx_cs_\S+) ", text)
    assert secret is not None, text[-3000:]
    r = httpx.post(f"{url}/oauth/token", data={"grant_type": "client_credentials"}, auth=(client, secret[1]))
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])

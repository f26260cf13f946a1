"""``ybyx demo``: the one-machine demo — a sharing center and a front-end wired together.

Sample studies are written once, sent to the front-end by C-STORE, and forwarded to the center by
STOW-RS. With real node identity (issue 6 §1): the front-end is a client of the center
(``[forward] client_id``, its secret written on first run), and the demo registers a "HIS" client
at the front-end and a viewer at the center, printing how to get their tokens with curl. Later
issues add the index, a second province and the viewer (ARCHITECTURE: 1 index + 2 provinces).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from dimse.scu import dicom_files, send
from gateway.center import Center
from gateway.config import DemoConfig, ForwardSection
from gateway.frontend import Frontend
from gateway.sample import write_samples
from gateway.security.clients import ClientRegistry
from gateway.security.credentials import write_secret

console = Console()


def load_samples(fe: Frontend, folder: Path) -> int:
    """Write the sample studies (once) and C-STORE them into the running front-end."""
    if not any(folder.rglob("*.dcm")):
        write_samples(folder)
    files = dicom_files([folder])
    report = send(files, "127.0.0.1", fe.dicom_port, fe.cfg.dicom.ae_title, calling_ae="YBYX_DEMO")
    if not report.ok:
        first = next(iter(report.failed.values()))
        raise RuntimeError(f"{len(report.failed)} sample files were not stored: {first}")
    return len(report.sent)


def wait_forwarded(fe: Frontend, timeout: float = 120) -> dict[str, float]:
    """Wait until the front-end's outbox is confirmed (or the timeout); the outbox metrics."""
    assert fe.forwarder is not None
    deadline = time.monotonic() + timeout
    while True:
        m = fe.forwarder.metrics()
        if m["queued"] + m["sending"] + m["sent"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.3)


FORWARDER_SCOPES = "stow api:inventory api:manifest api:exams"
HIS_SCOPES = "api:exams api:monitoring api:forwarding metrics"
VIEWER_SCOPES = "qido wado"


def demo_client(registry: ClientRegistry, client_id: str, scopes: str) -> str:
    """A fresh secret for the demo client ``client_id`` (registered on first use)."""
    if registry.get(client_id) is not None:
        return registry.reset_secret(client_id)
    return registry.add(client_id, scopes, client_id=client_id)[1]


def register_frontend(center: Center, forward: ForwardSection) -> None:
    """Make sure the center knows the front-end's client and its secret file holds the secret."""
    assert forward.client_id is not None and forward.client_secret_file is not None
    known = center.security.clients.get(forward.client_id)
    if known is not None and known.active and forward.client_secret_file.exists():
        return
    secret = demo_client(center.security.clients, forward.client_id, FORWARDER_SCOPES)
    forward.client_secret_file.unlink(missing_ok=True)
    write_secret(forward.client_secret_file, secret)


def run_demo(
    cfg: DemoConfig,
    *,
    start_center: Callable[[], Center],
    start_frontend: Callable[[], Frontend],
    wait: Callable[[], None],
    config_path: str = "config/demo.toml",
) -> int:
    center = start_center()
    try:
        if cfg.frontend.forward.client_id is not None:
            register_frontend(center, cfg.frontend.forward)
        fe = start_frontend()
        try:
            samples = cfg.frontend.storage.path.parent.parent / "samples"
            n = load_samples(fe, samples)
            m = wait_forwarded(fe)
            held = center.archive.catalog.counts()
            ae, port, web = fe.cfg.dicom.ae_title, fe.dicom_port, f"http://127.0.0.1:{fe.http_port}"
            his = demo_client(fe.security.clients, "demo-his", HIS_SCOPES)
            viewer = demo_client(center.security.clients, "demo-viewer", VIEWER_SCOPES)
            get_token = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])'"
            print(f"""
ybyx demo is running
  front-end  AE {ae}, DICOM 127.0.0.1:{port}, HTTP {web}
  center     {center.url} (DICOMweb {center.url}/dicom-web)
sent {n} sample instances to the front-end; forwarded studies confirmed: {m["confirmed"]:g},
failed: {m["failed"]:g}; the center holds {held["studies"]} studies, {held["instances"]} instances.

Try (dcmtk):
  echoscu -aec {ae} 127.0.0.1 {port}
  storescu -aec {ae} -aet MYSCU +sd +r 127.0.0.1 {port} {samples}
  findscu -S -aec {ae} -k QueryRetrieveLevel=STUDY -k PatientName= -k StudyDate= \\
          -k StudyInstanceUID= 127.0.0.1 {port}
  getscu -S -aec {ae} -od /tmp/ybyx-get -k QueryRetrieveLevel=STUDY \\
          -k PatientID=<id from findscu> 127.0.0.1 {port}
DICOMweb and status (curl), with OAuth 2.0 client-credentials tokens (every route but /healthz
needs one; these demo secrets are new on each run and shown only here):
  VIEWER=$(curl -s -u demo-viewer:{viewer} -d grant_type=client_credentials \\
           {center.url}/oauth/token | {get_token})
  curl -H "Authorization: Bearer $VIEWER" \\
       '{center.url}/dicom-web/studies?PatientName=zhang&fuzzymatching=true'
  HIS=$(curl -s -u demo-his:{his} -d grant_type=client_credentials \\
        {web}/oauth/token | {get_token})
  curl -H "Authorization: Bearer $HIS" '{web}/api/v1/forwarding'
  curl -H "Authorization: Bearer $HIS" '{web}/metrics'
  ybyx clients add NAME --scopes "qido wado" -c {config_path} --role frontend   # more clients
Or with ybyx itself:
  ybyx send {samples} --to {ae}@127.0.0.1:{port}

Press Ctrl-C to stop.""")
            wait()
        finally:
            fe.stop()
    finally:
        center.stop()
        console.print("demo stopped")
    return 0

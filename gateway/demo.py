"""``ybyx demo``: the one-machine demo — a sharing center and a front-end wired together.

Sample studies are written once, sent to the front-end by C-STORE, and forwarded to the center by
STOW-RS. Later issues add the index, a second province and the viewer (ARCHITECTURE: 1 index +
2 provinces).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from dimse.scu import dicom_files, send
from gateway.center import Center
from gateway.config import DemoConfig
from gateway.frontend import Frontend
from gateway.sample import write_samples

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


def run_demo(
    cfg: DemoConfig,
    *,
    start_center: Callable[[], Center],
    start_frontend: Callable[[], Frontend],
    wait: Callable[[], None],
) -> int:
    center = start_center()
    try:
        fe = start_frontend()
        try:
            samples = cfg.frontend.storage.path.parent.parent / "samples"
            n = load_samples(fe, samples)
            m = wait_forwarded(fe)
            held = center.archive.catalog.counts()
            ae, port, web = fe.cfg.dicom.ae_title, fe.dicom_port, f"http://127.0.0.1:{fe.http_port}"
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
DICOMweb and status (curl):
  curl '{center.url}/dicom-web/studies?PatientName=zhang&fuzzymatching=true'
  curl '{web}/api/v1/forwarding'
  curl '{web}/metrics'
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

"""``ybyx demo``: the one-machine demo — a front-end on embedded storage with sample studies.

Later issues add the center, the index and the viewer to it (ARCHITECTURE: 1 index + 2 provinces).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from dimse.scu import dicom_files, send
from gateway.config import FrontendConfig
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
        raise RuntimeError(
            f"{len(report.failed)} sample files were not stored: {next(iter(report.failed.values()))}"
        )
    return len(report.sent)


def run_demo(cfg: FrontendConfig, fe: Frontend, *, wait: Callable[[], None]) -> int:
    try:
        samples = cfg.storage.path.parent / "samples"
        n = load_samples(fe, samples)
        counts = fe.archive.catalog.counts()
        ae, port = cfg.dicom.ae_title, fe.dicom_port
        console.print(f"""
[bold green]ybyx demo is running[/bold green] — front-end AE [bold]{ae}[/bold] on DICOM port {port}
sent {n} sample instances; the archive holds {counts["studies"]} studies, {counts["instances"]} instances
data: {cfg.storage.path.parent}

Try (dcmtk):
  echoscu -aec {ae} 127.0.0.1 {port}
  storescu -aec {ae} -aet MYSCU 127.0.0.1 {port} +sd {samples}
  findscu -S -aec {ae} -k QueryRetrieveLevel=STUDY -k PatientName= -k StudyDate= \\
          -k StudyInstanceUID= 127.0.0.1 {port}
  findscu -S -aec {ae} -k QueryRetrieveLevel=SERIES -k Modality=CT -k SeriesInstanceUID= \\
          -k StudyInstanceUID= 127.0.0.1 {port}
  getscu -S -aec {ae} -od /tmp/ybyx-get -k QueryRetrieveLevel=STUDY \\
          -k PatientID=<id from findscu> 127.0.0.1 {port}
Or with ybyx itself:
  ybyx send {samples} --to {ae}@127.0.0.1:{port}

Press Ctrl-C to stop.""")
        wait()
    finally:
        fe.stop()
        console.print("demo stopped")
    return 0

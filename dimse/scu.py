"""C-STORE SCU: send files to a peer (``ybyx send``), streaming each file from disk.

Files are sent as stored (no transcoding): each SOP class is proposed with the file's own transfer
syntax. A journal of what the peer acknowledged makes a rerun skip it (``--journal``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import _config

from dimse.contexts import contexts_for, no_delay_assoc
from dimse.reactor_gate import AE
from dimse.uid_memo import install as _remember_uid_checks

log = logging.getLogger(__name__)
_remember_uid_checks()  # association set-up: each UID's check done once (dimse/uid_memo.py)


@dataclass
class SendReport:
    sent: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already in the journal
    failed: dict[Path, str] = field(default_factory=dict)  # path -> reason

    @property
    def ok(self) -> bool:
        return not self.failed


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and every file below the folders named, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        else:
            out.append(p)
    return out


def send(
    files: list[Path],
    host: str,
    port: int,
    called_ae: str,
    *,
    calling_ae: str = "YBYX_SCU",
    journal: Path | None = None,
    progress: Callable[[Path, bool], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> SendReport:
    """C-STORE every file; a status other than success (or warning) counts as failed.

    ``tls``: DICOM TLS (issue 6 §6, R-SE-5) with this client context; the peer's certificate must
    name ``host``."""
    report = SendReport()
    done: set[str] = set()
    if journal is not None and journal.exists():
        done = set(journal.read_text(encoding="utf-8").splitlines())

    headers: list[tuple[Path, str, str]] = []
    for path in files:
        if str(path.resolve()) in done:
            report.skipped.append(path)
            if progress:
                progress(path, True)
            continue
        try:
            # The file meta is what pynetdicom sends from (the data set is streamed, not parsed).
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            sop_class, syntax = UID(str(meta.MediaStorageSOPClassUID)), UID(str(meta.TransferSyntaxUID))
            if not syntax.is_transfer_syntax or not sop_class.is_valid:
                raise ValueError(f"file meta names no usable SOP class / transfer syntax ({syntax!r})")
            headers.append((path, str(sop_class), str(syntax)))
        except Exception as exc:  # pydicom reports damaged files with many types (issue 6 §8)
            report.failed[path] = f"not a DICOM file: {exc}"
            if progress:
                progress(path, False)
    if not headers:
        return report

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = contexts_for((c, t) for _, c, t in headers)
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=(tls, host) if tls is not None else None)
    if not assoc.is_established:
        for path, _, _ in headers:
            report.failed[path] = f"association with {called_ae}@{host}:{port} refused or failed"
        return report
    no_delay_assoc(assoc)
    jf = journal.open("a", encoding="utf-8") if journal is not None else None
    try:
        for path, _, _ in headers:
            if not assoc.is_established:
                report.failed[path] = "association lost"
                continue
            try:
                status = assoc.send_c_store(path)
            except (ValueError, RuntimeError, OSError) as exc:
                report.failed[path] = str(exc)
                status = None
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is not None and (code == 0 or code in (0xB000, 0xB007, 0xB006)):
                report.sent.append(path)
                if jf is not None:
                    jf.write(f"{path.resolve()}\n")
                    jf.flush()
            elif path not in report.failed:
                comment = status.get("ErrorComment", "") if status is not None else ""
                report.failed[path] = (
                    f"status 0x{code:04X} {comment}".strip()
                    if code is not None
                    else "no response (timeout or abort)"
                )
            if progress:
                progress(path, path not in report.failed)
    finally:
        if jf is not None:
            jf.close()
        if assoc.is_established:
            assoc.release()
    return report

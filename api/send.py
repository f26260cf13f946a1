"""One-click send from the viewer (issue 7 §4, R-VW-1 u): a study or series to a workstation.

``POST /api/v1/send`` ``{"study": UID, "series": UID (optional), "target": NAME}`` starts a
C-STORE SCU job from this node to the workstation ``NAME`` configured in ``config/viewer.toml``
``[send.targets.NAME]`` (AE title, host, port, institution) and answers **202** with the job;
``GET /api/v1/send/{job}`` reports its progress (``sent`` of ``total``, failures by SOP instance
UID) until ``state`` is ``done`` or ``failed``. The viewer polls it for its progress bar.

Files are sent as stored (no transcoding, dimse.scu.send), read from the blob store into a
private spool folder first (the store may be S3) and removed afterwards. Jobs live in memory:
they are user actions watched from the viewer, not durable work (a restart loses the progress
report, never data).

Not yet: choosing targets by the user's institution (users arrive with issue 6 §2; today every
configured target is offered, each carrying its ``institution`` for that filter) and the
``weasis://`` launch link.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api import viewer
from api.errors import BadRequest, parse
from api.viewer import ViewerSettingsError, load_settings
from dimse.scu import send
from gateway.archive import Archive

log = logging.getLogger(__name__)
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"


@dataclass(frozen=True)
class Target:
    name: str
    ae_title: str
    host: str
    port: int
    institution: str = ""
    description: str = ""


def targets_from(settings: dict[str, Any], where: str = "viewer.toml") -> dict[str, Target]:
    """``[send.targets.NAME]`` entries; a malformed one raises with its key named."""
    out: dict[str, Target] = {}
    for name, t in settings.get("send", {}).get("targets", {}).items():
        if not isinstance(t, dict):
            raise ViewerSettingsError(f"{where}: send.targets.{name}: must be a table")
        ae, host, port = t.get("ae_title"), t.get("host"), t.get("port")
        if not isinstance(ae, str) or not 0 < len(ae) <= 16:
            raise ViewerSettingsError(f"{where}: send.targets.{name}.ae_title: 1-16 characters")
        if not isinstance(host, str) or not host:
            raise ViewerSettingsError(f"{where}: send.targets.{name}.host: required")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ViewerSettingsError(f"{where}: send.targets.{name}.port: 1-65535")
        out[name] = Target(name, ae, host, port, str(t.get("institution", "")), str(t.get("description", "")))
    return out


class SendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str = Field(pattern=UID_PATTERN, max_length=64)
    series: str | None = Field(default=None, pattern=UID_PATTERN, max_length=64)
    target: str = Field(min_length=1, max_length=64)


@dataclass
class Job:
    id: str
    target: str
    study: str
    series: str | None
    total: int
    sent: int = 0
    state: str = "running"  # running | done | failed
    failed: dict[str, str] = field(default_factory=dict)
    error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def view(self) -> dict[str, Any]:
        with self.lock:
            return {
                "job": self.id,
                "target": self.target,
                "study": self.study,
                "series": self.series,
                "state": self.state,
                "total": self.total,
                "sent": self.sent,
                "failed": dict(self.failed),
                "error": self.error,
            }


class Sender:
    """The node's send jobs (one thread each; a workstation takes one association at a time)."""

    def __init__(self, archive: Archive, targets: dict[str, Target], calling_ae: str = "YBYX") -> None:
        self.archive = archive
        self.targets = targets
        self.calling_ae = calling_ae
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)

    def start(self, req: SendRequest) -> Job:
        target = self.targets.get(req.target)
        if target is None:
            raise LookupError(
                f"no send target {req.target!r} (configured: {', '.join(self.targets) or 'none'})"
            )
        criteria = {"StudyInstanceUID": req.study}
        if req.series:
            criteria["SeriesInstanceUID"] = req.series
        instances = self.archive.catalog.locate(criteria)
        if not instances:
            raise FileNotFoundError(
                f"no instances of study {req.study}{f' series {req.series}' if req.series else ''}"
            )
        job = Job(str(next(self._ids)), target.name, req.study, req.series, len(instances))
        self.jobs[job.id] = job
        threading.Thread(
            target=self._run, args=(job, target, instances), name=f"send-{job.id}", daemon=True
        ).start()
        return job

    def _run(self, job: Job, target: Target, instances: list[Any]) -> None:
        spool = Path(tempfile.mkdtemp(prefix="ybyx-send-"))
        try:
            files: dict[Path, str] = {}
            for inst in instances:
                path = spool / f"{inst.sop_uid}.dcm"
                with path.open("wb") as f:
                    for chunk in self.archive.store.get(inst.blob_key):
                        f.write(chunk)
                files[path] = inst.sop_uid

            def progress(path: Path, ok: bool) -> None:
                with job.lock:
                    if ok:
                        job.sent += 1

            report = send(
                list(files),
                target.host,
                target.port,
                target.ae_title,
                calling_ae=self.calling_ae,
                progress=progress,
            )
            with job.lock:
                job.failed = {files[p]: why for p, why in report.failed.items()}
                job.state = "done" if report.ok else "failed"
                if not report.ok:
                    job.error = f"{len(report.failed)} of {job.total} not stored by {target.ae_title}"
        except Exception as exc:  # reported to the viewer, never lost silently
            log.exception("send job %s failed", job.id)
            with job.lock:
                job.state, job.error = "failed", str(exc)
        finally:
            shutil.rmtree(spool, ignore_errors=True)


def _sender(request: Request) -> Sender:
    sender = getattr(request.app.state, "sender", None)
    if sender is None:
        sender = Sender(request.app.state.archive, targets_from(load_settings(viewer.SETTINGS)))
        request.app.state.sender = sender
    assert isinstance(sender, Sender)
    return sender


async def start_send(request: Request) -> JSONResponse:
    try:
        req = await parse(request, SendRequest)
    except BadRequest as bad:
        return bad.response
    try:
        job = _sender(request).start(req)
    except LookupError as exc:
        return JSONResponse({"error": "unknown_target", "error_description": str(exc)}, 422)
    except FileNotFoundError as exc:
        return JSONResponse({"error": "not_found", "error_description": str(exc)}, 404)
    return JSONResponse(job.view(), 202, headers={"Location": f"/api/v1/send/{job.id}"})


async def send_status(request: Request) -> JSONResponse:
    job = _sender(request).jobs.get(request.path_params["job"])
    if job is None:
        return JSONResponse({"error": "not_found", "error_description": "no such send job"}, 404)
    return JSONResponse(job.view(), headers={"Cache-Control": "no-store"})


routes = [
    Route("/send", start_send, methods=["POST"]),
    Route("/send/{job}", send_status, methods=["GET"]),
]

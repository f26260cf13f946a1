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

Targets per institution: ``GET /api/v1/send/targets`` lists, and ``POST /api/v1/send`` accepts,
only the targets whose ``institution`` is the calling user's (a user of no institution, or a
target naming none, gets nothing: fail closed); a node client (OAuth client token) sees every
target. A target of another institution is refused as ``unknown_target``, exactly as a name that
does not exist (no oracle for other hospitals' workstations). The ``weasis://`` launch link is
the viewer's (viewer_assets/src/weasis.js).
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
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api import viewer
from api.errors import BadRequest, parse
from api.viewer import ViewerSettingsError, load_settings
from dimse.scu import send
from gateway.archive import Archive
from gateway.security.guard import Principal

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

    def offered_to(self, principal: Principal | None) -> bool:
        """Whether this caller may see and use the target: a user only their institution's."""
        if principal is None or principal.kind != "user":
            return True  # a node client, or a node run with security disabled
        return bool(principal.institution) and principal.institution == self.institution


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

    def offered(self, principal: Principal | None) -> list[Target]:
        """The targets this caller may send to (R-VW-1 u, per institution)."""
        return [t for t in self.targets.values() if t.offered_to(principal)]

    def start(self, req: SendRequest, principal: Principal | None = None) -> Job:
        target = self.targets.get(req.target)
        if target is None or not target.offered_to(principal):
            names = ", ".join(t.name for t in self.offered(principal)) or "none"
            raise LookupError(f"no send target {req.target!r} (offered to you: {names})")
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
    principal = _principal(request)
    if principal is not None and principal.kind == "user":
        # a user sends only a study they may read (institution scoping, as for WADO-RS): another
        # institution's study is "not found", as on the DICOMweb routes
        access = request.app.state.security.study_access
        if access is not None and not await run_in_threadpool(access.may_see, principal, "wado", req.study):
            why = f"no instances of study {req.study}"
            return JSONResponse({"error": "not_found", "error_description": why}, 404)
    try:
        job = _sender(request).start(req, principal)
    except LookupError as exc:
        return JSONResponse({"error": "unknown_target", "error_description": str(exc)}, 422)
    except FileNotFoundError as exc:
        return JSONResponse({"error": "not_found", "error_description": str(exc)}, 404)
    return JSONResponse(job.view(), 202, headers={"Location": f"/api/v1/send/{job.id}"})


def _principal(request: Request) -> Principal | None:
    principal = getattr(request.state, "principal", None)
    return principal if isinstance(principal, Principal) else None


async def list_targets(request: Request) -> JSONResponse:
    """The targets offered to this caller: names and descriptions, never addresses."""
    offered = _sender(request).offered(_principal(request))
    body = {
        "targets": [
            {"name": t.name, "description": t.description, "institution": t.institution} for t in offered
        ]
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def send_status(request: Request) -> JSONResponse:
    job = _sender(request).jobs.get(request.path_params["job"])
    if job is None:
        return JSONResponse({"error": "not_found", "error_description": "no such send job"}, 404)
    return JSONResponse(job.view(), headers={"Cache-Control": "no-store"})


routes = [
    Route("/send", start_send, methods=["POST"]),
    Route("/send/targets", list_targets, methods=["GET"]),  # before /send/{job}
    Route("/send/{job}", send_status, methods=["GET"]),
]

"""The center's ``/api/v1`` routes: per-study inventory for reconciliation (issue 3 §7, R-CE-9)."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.errors import BadRequest, parse
from api.qc import center_routes as qc_routes
from api.qc import manifest_qc
from api.qc import service as qc_service
from dicomweb.audit_hook import record_request
from gateway.archive import Archive
from gateway.archive.blobstore import BlobNotFound
from gateway.audit import EventType
from gateway.exams import ExamBook, ExamForwarded
from gateway.monitoring import check_manifest, monitoring_record


def _inventory(archive: Archive, study: str, verify: bool) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for inst in archive.catalog.locate({"StudyInstanceUID": study}):
        sha, size = inst.sha256, inst.size
        if verify:
            # Hash what is really stored: a corrupted or lost blob must show up as a difference.
            digest, size = hashlib.sha256(), 0
            try:
                for chunk in archive.store.get(inst.blob_key):
                    digest.update(chunk)
                    size += len(chunk)
                sha = digest.hexdigest()
            except BlobNotFound:
                sha, size = "missing", 0
        out[inst.sop_uid] = {"sha256": sha, "size": size}
    return out


async def _study_ready(request: Request, study_uid: str) -> None:
    """Issue 5: exam record + complete images → registered at the national index (if configured)."""
    registrar = getattr(request.app.state, "registrar", None)
    if registrar is not None:
        await run_in_threadpool(registrar.study_ready, study_uid)


async def inventory(request: Request) -> JSONResponse:
    """``GET /api/v1/studies/{study}/inventory[?verify=true]``: SOP Instance UID → SHA-256, size."""
    archive: Archive = request.app.state.archive
    study = request.path_params["study"]
    verify = request.query_params.get("verify", "false").lower() in ("1", "true", "yes")
    items = await run_in_threadpool(_inventory, archive, study, verify)
    if not items:
        return JSONResponse({"error": f"study {study} is not held here"}, status_code=404)
    return JSONResponse({"study": study, "verified": verify, "instances": items})


async def manifest(request: Request) -> JSONResponse:
    """``PUT /api/v1/studies/{study}/manifest``: what a front-end sent → upload-monitoring record."""
    archive: Archive = request.app.state.archive
    try:
        body = await parse(request, Manifest)
    except BadRequest as bad:
        return bad.response
    record = await run_in_threadpool(
        check_manifest, archive.catalog, request.path_params["study"], body.instances
    )
    # R-CE-5: the center's QC goes back to the uploader in its upload-monitoring record
    qc = await run_in_threadpool(manifest_qc, qc_service(request), request.path_params["study"], body.qc)
    if qc is not None:
        record = {**record, "qc": qc}
    await _study_ready(request, request.path_params["study"])
    return JSONResponse(record)


async def monitoring(request: Request) -> JSONResponse:
    """``GET /api/v1/upload-monitoring/{study}``: complete / incomplete / late (R-CE-9)."""
    archive: Archive = request.app.state.archive
    record = await run_in_threadpool(monitoring_record, archive.catalog, request.path_params["study"])
    if record is None:
        return JSONResponse({"error": "no upload-monitoring record for this study"}, status_code=404)
    qc = qc_service(request)
    if qc is not None:  # R-CE-5
        record["qc"] = await run_in_threadpool(qc.study_json, request.path_params["study"])
    return JSONResponse(record)


async def post_exam(request: Request) -> JSONResponse:
    """``POST /api/v1/exams``: an exam record forwarded by a front-end (pseudonym only)."""
    book: ExamBook = request.app.state.exams
    try:
        exam = await parse(request, ExamForwarded)
    except BadRequest as bad:
        return bad.response
    row = await run_in_threadpool(book.record, exam)
    await _study_ready(request, row["study_uid"])
    await record_request(  # R-SE-4
        request,
        EventType.UPLOAD,
        resource=f"exam:{row['hospital_code']}/{row['accession_number']}",
        detail={"study_instance_uid": row["study_uid"], "kind": "exam-record"},
    )
    return JSONResponse({"accession_number": row["accession_number"], "stored": True})


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: dict[str, str]
    qc: dict[str, Any] | None = None  # the front-end's QC of the study (R-QC-1)


routes = [
    Route("/studies/{study}/inventory", inventory, methods=["GET"]),
    Route("/studies/{study}/manifest", manifest, methods=["PUT"]),
    Route("/upload-monitoring/{study}", monitoring, methods=["GET"]),
    Route("/exams", post_exam, methods=["POST"]),
    *qc_routes,
]

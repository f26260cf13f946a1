"""Image QC routes (issue 4 §4-5, R-QC-1, R-CE-5, R-RT-3) on both roles.

- ``GET /api/v1/qc/failures[?study=&limit=&offset=]`` (front-end): instances graded 废 (reject)
  that no passing instance has replaced yet, with the reasons — what the hospital must re-send.
- ``GET /api/v1/studies/{study}/qc`` (front-end and center): the study's QC as graded here
  (per study, series, instance and dimension) and as the other node reported it.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.qc.service import QcService

NOT_ON = {"error": "image QC is not enabled on this node ([qc] enabled = true)"}


def service(request: Request) -> QcService | None:
    qc: QcService | None = getattr(request.app.state, "qc", None)
    return qc


def _study(qc: QcService, study: str, role: str) -> dict[str, Any] | None:
    mine = qc.study_json(study)
    other = "center" if role == "frontend" else "frontend"
    theirs = qc.book.report(study, other)
    if mine is None and theirs is None:
        return None
    instances = [r.to_json() for r in qc.book.results(study, replaced=True)]
    return {"study_uid": study, "graded_here": mine, f"{other}_report": theirs, "instances": instances}


async def study_qc(request: Request) -> Response:
    """``GET /api/v1/studies/{study}/qc``: grade, dimensions, reasons (R-RT-3)."""
    qc = service(request)
    if qc is None:
        return JSONResponse(NOT_ON, status_code=404)
    study = request.path_params["study"]
    body = await run_in_threadpool(_study, qc, study, request.app.state.role)
    if body is None:
        return JSONResponse({"error": f"no QC result for study {study}"}, status_code=404)
    return JSONResponse(body)


async def failures(request: Request) -> Response:
    """``GET /api/v1/qc/failures``: open rejects, newest first (R-QC-1)."""
    qc = service(request)
    if qc is None:
        return JSONResponse(NOT_ON, status_code=404)
    q = request.query_params
    try:
        limit, offset = int(q.get("limit", "100")), int(q.get("offset", "0"))
        if not (1 <= limit <= 1000 and offset >= 0):
            raise ValueError
    except ValueError:
        return JSONResponse({"error": "limit must be 1-1000 and offset ≥ 0"}, status_code=400)
    rows = await run_in_threadpool(qc.book.failures, study_uid=q.get("study"), limit=limit, offset=offset)
    return JSONResponse(rows)


def manifest_qc(qc: QcService | None, study: str, sent: dict[str, Any] | None) -> dict[str, Any] | None:
    """The center's side of a manifest (R-CE-5): keep the front-end's QC, grade what is still
    queued of the study, answer with the center's QC."""
    if qc is None:
        return None
    if sent is not None:
        qc.book.save_report(study, "frontend", sent)
    return qc.study_json(study, grade_now=True)


frontend_routes = [
    Route("/qc/failures", failures, methods=["GET"]),
    Route("/studies/{study}/qc", study_qc, methods=["GET"]),
]
center_routes = [Route("/studies/{study}/qc", study_qc, methods=["GET"])]

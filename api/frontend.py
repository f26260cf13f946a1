"""The front-end's ``/api/v1`` routes and ``/metrics``: forwarding status (issue 3 §6)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from api.errors import BadRequest, parse
from api.qc import frontend_routes as qc_routes
from api.qc import service as qc_service
from dicomweb.audit_hook import record_request
from gateway.audit import EventType
from gateway.codec.stage import CompressionStage
from gateway.exams import ExamBook, ExamIn, SettlementIn
from gateway.forwarder import Forwarder
from gateway.identity import PseudonymKey

STATES = {"queued", "sending", "sent", "confirmed", "failed"}


def _json(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


async def forwarding(request: Request) -> Response:
    """``GET /api/v1/forwarding[?state=&limit=&offset=]``: per study state, attempts, errors."""
    forwarder: Forwarder | None = request.app.state.forwarder
    if forwarder is None:
        return JSONResponse({"error": "forwarding is not configured ([forward] center_url)"}, status_code=404)
    q = request.query_params
    state = q.get("state")
    if state is not None and state not in STATES:
        return JSONResponse({"error": f"state: must be one of {', '.join(sorted(STATES))}"}, status_code=400)
    try:
        limit, offset = int(q.get("limit", "100")), int(q.get("offset", "0"))
        if not (1 <= limit <= 1000 and offset >= 0):
            raise ValueError
    except ValueError:
        return JSONResponse({"error": "limit must be 1-1000 and offset ≥ 0"}, status_code=400)
    rows = await run_in_threadpool(forwarder.status, state=state, limit=limit, offset=offset)
    keep = (
        "study_uid",
        "state",
        "attempts",
        "last_error",
        "enqueued_at",
        "updated_at",
        "next_attempt_at",
        "sent_at",
        "confirmed_at",
        "instances_sent",
        "instances_failed",
    )
    return JSONResponse([{k: _json(r[k]) for k in keep} for r in rows])


async def metrics(request: Request) -> Response:
    """Prometheus text exposition: forward queue depth, oldest age, failures."""
    lines = []
    forwarder: Forwarder | None = request.app.state.forwarder
    if forwarder is not None:
        m = await run_in_threadpool(forwarder.metrics)
        lines += [
            "# HELP ybyx_forward_jobs Studies in the forward outbox by state.",
            "# TYPE ybyx_forward_jobs gauge",
        ]
        lines += [f'ybyx_forward_jobs{{state="{s}"}} {m[s]:g}' for s in sorted(STATES)]
        lines += [
            "# HELP ybyx_forward_oldest_pending_seconds Age of the oldest queued or sending study.",
            "# TYPE ybyx_forward_oldest_pending_seconds gauge",
            f"ybyx_forward_oldest_pending_seconds {m['oldest_pending_seconds']:.3f}",
        ]
    compression: CompressionStage | None = getattr(request.app.state, "compression", None)
    if compression is not None:  # R-UP-1: lossless compression after ingest
        c = await run_in_threadpool(compression.metrics)
        lines += [
            "# HELP ybyx_codec_backlog Instances waiting for lossless compression.",
            "# TYPE ybyx_codec_backlog gauge",
            f"ybyx_codec_backlog {c['backlog']:g}",
            "# HELP ybyx_codec_instances_total Instances through the compression stage by outcome.",
            "# TYPE ybyx_codec_instances_total counter",
        ]
        lines += [
            f'ybyx_codec_instances_total{{outcome="{o}"}} {c.get(o, 0):g}'
            for o in ("compressed", "kept", "mismatch", "failed", "gave-up")
        ]
        lines += [
            "# HELP ybyx_codec_bytes_total Bytes of compressed instances before and after.",
            "# TYPE ybyx_codec_bytes_total counter",
            f'ybyx_codec_bytes_total{{when="before"}} {c.get("bytes_before", 0):g}',
            f'ybyx_codec_bytes_total{{when="after"}} {c.get("bytes_after", 0):g}',
        ]
    qc = qc_service(request)
    if qc is not None:  # R-QC-1: grading keeps up; rejects wait for the hospital
        backlog, held = await run_in_threadpool(lambda: (qc.book.waiting(), qc.book.open_rejects()))
        lines += [
            "# HELP ybyx_qc_backlog Instances waiting to be graded by image QC.",
            "# TYPE ybyx_qc_backlog gauge",
            f"ybyx_qc_backlog {backlog:g}",
            "# HELP ybyx_qc_open_rejects Instances graded 废 (reject) not replaced yet.",
            "# TYPE ybyx_qc_open_rejects gauge",
            f"ybyx_qc_open_rejects {held:g}",
        ]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def post_exam(request: Request) -> Response:
    """``POST /api/v1/exams``: exam basic information from the RIS/HIS (R-UP-5)."""
    book: ExamBook = request.app.state.exams
    key: PseudonymKey | None = request.app.state.pseudonym_key
    try:
        exam = await parse(request, ExamIn)
    except BadRequest as bad:
        return bad.response
    if key is None:
        return JSONResponse({"error": "no pseudonym key configured ([identity] key_file)"}, status_code=503)
    row = await run_in_threadpool(book.record, exam, key=key)
    await record_request(  # R-SE-4
        request,
        EventType.UPLOAD,
        resource=f"exam:{row['hospital_code']}/{row['accession_number']}",
        detail={"study_instance_uid": row["study_uid"], "kind": "exam-record"},
    )
    return JSONResponse(
        {
            "hospital_code": row["hospital_code"],
            "accession_number": row["accession_number"],
            "study_uid": row["study_uid"],
            "id_masked": row["id_masked"],
        },
        status_code=201,
    )


async def post_settlement(request: Request) -> Response:
    """``POST /api/v1/settlements``: the settlement ID of an accession (R-UP-3: due in 24 h)."""
    book: ExamBook = request.app.state.exams
    try:
        settlement = await parse(request, SettlementIn)
    except BadRequest as bad:
        return bad.response
    if not await run_in_threadpool(book.settle, settlement):
        return JSONResponse(
            {"error": f"no exam {settlement.accession_number} at {settlement.hospital_code}"}, status_code=404
        )
    return JSONResponse(
        {"accession_number": settlement.accession_number, "settlement_id": settlement.settlement_id}
    )


async def upload_deadlines(request: Request) -> Response:
    """``GET /api/v1/upload-deadlines[?state=overdue|pending|met|late]`` (R-UP-3)."""
    book: ExamBook = request.app.state.exams
    state = request.query_params.get("state")
    if state is not None and state not in {"overdue", "pending", "met", "late"}:
        return JSONResponse({"error": "state: must be overdue, pending, met or late"}, status_code=400)
    return JSONResponse(await run_in_threadpool(book.deadlines, state=state))


routes = [
    Route("/forwarding", forwarding, methods=["GET"]),
    Route("/exams", post_exam, methods=["POST"]),
    Route("/settlements", post_settlement, methods=["POST"]),
    Route("/upload-deadlines", upload_deadlines, methods=["GET"]),
    *qc_routes,  # R-QC-1
]

"""The national index's HTTP routes (``/api/v1``), behind the one guard (R-SE-16):

* ``POST /api/v1/index-records`` (``index:register``): a center registers a study; idempotent.
* ``GET /api/v1/index-records?person=&from=&to=&modality=&body_part=&exam_item=`` (``index:lookup``).
* ``GET /api/v1/index-records/{study UID | record key}`` (``index:lookup``).
* ``GET /api/v1/provinces`` (``index:lookup``): the directory.
* ``POST``/``GET /api/v1/retrievals`` (``index:retrievals``): every retrieval in the country (R-RT-4).
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from api.errors import BadRequest, parse
from api.federation import query_date, retrieval_routes, unprocessable
from dicomweb.audit_hook import AuditHook, record_request
from gateway.audit import AuditLog, EventType, Result, principal_actor
from gateway.retrievals import RetrievalLog
from gateway.security.guard import Guard
from gateway.security.node import NodeSecurity
from index.directory import Directory
from index.records import HeldElsewhere, IndexBook, IndexRecordIn, Lookup, Outcome


def lookup_params(params: Any) -> Lookup:
    """A :class:`Lookup` from query parameters; ValueError naming the bad one."""
    person = params.get("person")
    if not person:
        raise ValueError("person: required (a pseudonym or a person management code)")
    try:
        limit = int(params.get("limit", "1000"))
    except ValueError:
        raise ValueError("limit: a number") from None
    if not 1 <= limit <= 10000:
        raise ValueError("limit: 1-10000")
    return Lookup(
        person,
        since=query_date(params.get("from"), "from"),
        until=query_date(params.get("to"), "to"),
        modality=params.get("modality") or None,
        body_part=params.get("body_part") or None,
        exam_item=params.get("exam_item") or None,
        limit=limit,
    )


async def register(request: Request) -> Response:
    book: IndexBook = request.app.state.index_book
    directory: Directory = request.app.state.directory
    try:
        rec = await parse(request, IndexRecordIn)
    except BadRequest as bad:
        return bad.response
    if rec.province not in directory:
        return unprocessable(f"province: {rec.province} is not in the index's directory")
    try:
        outcome, row = await run_in_threadpool(book.register, rec)
    except HeldElsewhere as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    if outcome is not Outcome.UNCHANGED:
        await record_request(
            request,
            EventType.UPLOAD,
            resource=f"index-record:{rec.study_uid}",
            detail={"study_instance_uid": rec.study_uid, "kind": "index-record", "outcome": outcome.value},
        )
    return JSONResponse(
        {"outcome": outcome.value, "record": row}, status_code=201 if outcome is Outcome.CREATED else 200
    )


async def lookup(request: Request) -> Response:
    book: IndexBook = request.app.state.index_book
    directory: Directory = request.app.state.directory
    try:
        q = lookup_params(request.query_params)
    except ValueError as exc:
        return unprocessable(str(exc))
    rows = await run_in_threadpool(book.lookup, q)
    for row in rows:
        row["center_url"] = directory.center_url(row["province"])
    # R-SE-4: queued like every HTTP read (the lookup does not wait for the audit write)
    audit: AuditLog = request.app.state.audit
    who = principal_actor(
        getattr(request.state, "principal", None), request.client.host if request.client else ""
    )
    detail = {"person": q.person[:12], "count": len(rows)}
    audit.submit(who, EventType.QUERY, resource="index-records", result=Result.SUCCESS, detail=detail)
    return JSONResponse(rows)


async def one_record(request: Request) -> Response:
    book: IndexBook = request.app.state.index_book
    directory: Directory = request.app.state.directory
    try:
        row = await run_in_threadpool(book.get, request.path_params["key"])
    except ValueError as exc:
        return unprocessable(str(exc))
    if row is None:
        return JSONResponse({"error": "no index record with this key"}, status_code=404)
    row["center_url"] = directory.center_url(row["province"])
    return JSONResponse(row)


async def provinces(request: Request) -> Response:
    directory: Directory = request.app.state.directory
    return JSONResponse(
        [{"code": p.code, "name": p.name, "center_url": p.center_url} for p in directory.all()]
    )


async def _health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "role": "index"})


routes = [
    Route("/index-records", register, methods=["POST"]),
    Route("/index-records", lookup, methods=["GET"]),
    Route("/index-records/{key}", one_record, methods=["GET"]),
    Route("/provinces", provinces, methods=["GET"]),
    *retrieval_routes,
]


def build_index_app(
    security: NodeSecurity, book: IndexBook, directory: Directory, retrievals: RetrievalLog, audit: AuditLog
) -> Starlette:
    """The index's app: its routes, health and token endpoints, inside the guard and audit hook."""
    app = Starlette(
        routes=[Mount("/api/v1", routes=routes), Route("/healthz", _health), *security.routes()],
        middleware=[Middleware(Guard, security=security)],
    )
    app.state.role = "index"
    app.state.security = security
    app.state.index_book = book
    app.state.directory = directory
    app.state.retrievals = retrievals
    app.state.audit = audit
    app.add_middleware(AuditHook)
    return app

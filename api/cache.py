"""Cache-request and fetch routes (issue 5 §3–4; R-SC-3, R-CA-1/2, R-CE-6, R-CE-7):

* front-end ``POST /api/v1/cache-requests`` (``api:cache-requests``): from the HIS at
  registration — name, ID type/number, department, visit time, the patient's consent (422
  without it); recorded with the pseudonym only and pushed to the center.
* center ``POST /api/v1/cache-requests``: a front-end's pushed request (business record, R-CE-4).
* both ``GET /api/v1/cache-requests[?state=]``: the requests and their task state.
* center ``POST /api/v1/fetches`` (``api:fetch``): ``{"study_uid"}`` — held here, else located
  through the index and fetched from the holding center, a copy kept (R-CE-7).
"""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.errors import BadRequest, parse
from dicomweb.audit_hook import record_request
from gateway.audit import EventType
from gateway.cache import CacheRequestForwarded, CacheRequestIn, CacheService, pseudonymised
from gateway.federation import PeerError, PeerNotConfigured
from gateway.identity import PseudonymKey

STATES = {"pending", "running", "completed", "failed"}


class FetchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study_uid: str = Field(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")
    person_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    visit: date | None = None
    wait: Literal["all", "first"] = "all"


def _service(request: Request) -> CacheService | None:
    found: CacheService | None = getattr(request.app.state, "cache", None)
    if found is None:  # a front-end's cache lives with its workstation
        found = getattr(getattr(request.app.state, "workstation", None), "cache", None)
    return found


def _off() -> JSONResponse:
    return JSONResponse({"error": "caching is not configured on this node"}, status_code=503)


async def frontend_post(request: Request) -> Response:
    svc = _service(request)
    try:
        req = await parse(request, CacheRequestIn)
    except BadRequest as bad:
        return bad.response
    key: PseudonymKey | None = getattr(request.app.state, "pseudonym_key", None)
    if svc is None or key is None:
        return JSONResponse(
            {"error": "no pseudonym key or cache service ([identity] key_file)"}, status_code=503
        )
    values = pseudonymised(req, key, svc.institution, svc.book.clock())
    _new, row = await run_in_threadpool(svc.book.record, values)
    pushed = await run_in_threadpool(svc.push_unsent)
    await record_request(
        request,
        EventType.UPLOAD,
        resource=f"cache-request:{row['request_id']}",
        detail={"kind": "cache-request", "consent": True},
    )
    keep = ("request_id", "state", "label", "visit_date", "department", "id_masked", "name_masked")
    return JSONResponse({**{k: row[k] for k in keep}, "pushed_to_center": pushed > 0}, status_code=201)


async def center_post(request: Request) -> Response:
    svc = _service(request)
    if svc is None:
        return _off()
    try:
        req = await parse(request, CacheRequestForwarded)
    except BadRequest as bad:
        return bad.response
    values = {**req.model_dump(), "id_type": req.id_type.value}
    new, row = await run_in_threadpool(svc.book.record, values)
    if new:
        await record_request(
            request,
            EventType.UPLOAD,
            resource=f"cache-request:{req.request_id}",
            detail={"kind": "cache-request"},
        )
    return JSONResponse(row, status_code=201 if new else 200)


async def get_requests(request: Request) -> Response:
    svc = _service(request)
    if svc is None:
        return _off()
    state = request.query_params.get("state")
    if state is not None and state not in STATES:
        return JSONResponse({"error": f"state: one of {', '.join(sorted(STATES))}"}, status_code=422)
    return JSONResponse(await run_in_threadpool(svc.book.search, state))


async def post_fetch(request: Request) -> Response:
    svc = _service(request)
    if svc is None or svc.fetcher is None:
        return _off()
    try:
        body = await parse(request, FetchIn)
    except BadRequest as bad:
        return bad.response
    fetcher = svc.fetcher
    try:
        result = await run_in_threadpool(
            lambda: fetcher.fetch(body.study_uid, visit=body.visit, person=body.person_key, wait=body.wait)
        )
    except PeerError as exc:
        status = 404 if exc.status == 404 else 503 if isinstance(exc, PeerNotConfigured) else 502
        return JSONResponse({"error": str(exc)}, status_code=status)
    if result["source"] != "local":
        await record_request(
            request,
            EventType.RETRIEVAL,
            resource=f"study:{body.study_uid}",
            detail={"study_instance_uid": body.study_uid, "from": result["source"], "kind": "cross-province"},
        )
    return JSONResponse(result)


frontend_routes = [
    Route("/cache-requests", frontend_post, methods=["POST"]),
    Route("/cache-requests", get_requests, methods=["GET"]),
]
center_routes = [
    Route("/cache-requests", center_post, methods=["POST"]),
    Route("/cache-requests", get_requests, methods=["GET"]),
    Route("/fetches", post_fetch, methods=["POST"]),
]

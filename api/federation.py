"""Federation routes a center serves (issue 5): the index lookup for its front-ends (forwarded to
the national index), retrieval records (kept and sent on to the index, R-RT-4). The index itself
serves the retrieval routes too (``index/app.py``)."""

from __future__ import annotations

from datetime import date

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.cache import center_routes as cache_api
from api.errors import BadRequest, parse
from gateway.federation import JsonPeer, PeerError, lookup
from gateway.retrievals import RetrievalLog, RetrievalRecord


def unprocessable(message: str) -> JSONResponse:
    """422 with the field named, like ``api.errors.parse`` answers."""
    field, _, why = message.partition(": ")
    return JSONResponse({"error": message, "errors": [{"field": field, "message": why}]}, status_code=422)


def query_date(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: a date YYYY-MM-DD, got {value!r}") from None


async def post_retrieval(request: Request) -> Response:
    """``POST /api/v1/retrievals``: one retrieval record; idempotent by ``record_id``."""
    log: RetrievalLog = request.app.state.retrievals
    try:
        rec = await parse(request, RetrievalRecord)
    except BadRequest as bad:
        return bad.response
    new = await run_in_threadpool(log.record, rec)
    kick = getattr(request.app.state, "kick_retrievals", None)
    if new and kick is not None:
        kick()  # a center sends it on to the index
    return JSONResponse({"record_id": rec.record_id, "stored": new}, status_code=201 if new else 200)


async def get_retrievals(request: Request) -> Response:
    """``GET /api/v1/retrievals?person=&institution=&result=&from=&to=&limit=``, newest first."""
    log: RetrievalLog = request.app.state.retrievals
    q = request.query_params
    try:
        since, until = query_date(q.get("from"), "from"), query_date(q.get("to"), "to")
        limit = int(q.get("limit", "500"))
    except ValueError as exc:
        return unprocessable(str(exc) if ":" in str(exc) else "limit: a number")
    result = q.get("result")
    if result not in (None, "allowed", "denied"):
        return unprocessable("result: allowed or denied")
    rows = await run_in_threadpool(
        lambda: log.search(
            person_key=q.get("person"),
            institution=q.get("institution"),
            result=result,
            since=since,
            until=until,
            limit=max(1, min(limit, 5000)),
        )
    )
    return JSONResponse(rows)


async def center_lookup(request: Request) -> Response:
    """``GET /api/v1/index-records`` at a center: the same query, answered by the national index."""
    index: JsonPeer | None = getattr(request.app.state, "index", None)
    if index is None:
        return JSONResponse(
            {"error": "this center has no national index configured ([index])"}, status_code=503
        )
    params = dict(request.query_params)
    if not params.get("person"):
        return unprocessable("person: required (a pseudonym or a person management code)")
    try:
        rows = await run_in_threadpool(lookup, index, params)
    except PeerError as exc:
        status = exc.status if exc.status in (400, 404, 422) else 502
        return JSONResponse({"error": f"national index: {exc}"}, status_code=status)
    return JSONResponse(rows)


retrieval_routes = [
    Route("/retrievals", post_retrieval, methods=["POST"]),
    Route("/retrievals", get_retrievals, methods=["GET"]),
]

center_routes = [Route("/index-records", center_lookup, methods=["GET"]), *retrieval_routes, *cache_api]

"""The front-end's doctor workstation routes (issue 5 §6–8), each behind the guard and, for the
patient's data, the patient's authorization (``gateway.grants.check_grant``, R-RT-4):

* ``POST /api/v1/grants`` (``api:grants``): evidence of a patient authorization (method + token,
  e.g. the insurance QR payload) → the verified grant.
* ``DELETE /api/v1/grants/{grant_id}`` (``api:grants``): the patient withdraws a grant (the HIS on
  their behalf); it allows nothing from then on, on the doctor API and on DICOMweb.
* ``GET /api/v1/patients/{person}/history?visit=DATE[&doctor=]`` (``api:doctor``): R-RT-1, R-RT-3.
* ``GET /api/v1/patients/{person}/same-exams?order=ITEM&date=DATE[&doctor=]`` (``api:doctor``): R-RT-2.
* ``POST /api/v1/citations`` (``api:doctor``): R-VW-3.

Who the doctor is: a node client (the HIS) names the doctor (``?doctor=``, the citation's
``doctor``); a logged-in doctor (user role ``doctor``, permission ``api:doctor`` at their own
hospital's front-end) *is* the doctor — the session's username is used, and a ``doctor`` that names
someone else is refused 403 (audited), so nobody acts under another doctor's name (R-SE-2, R-SE-4).
* ``GET /api/v1/code-maps`` (``api:codes``): the maps and the unmapped codes met (R-CE-4).
* ``GET /api/v1/code-maps/unmapped`` (``api:codes``): codes met in orders, index results and
  exam records without a mapping (R-CE-4).
* ``PUT``/``DELETE /api/v1/code-maps/{hospital}/{code}`` (``api:codes:write``): map, re-map or
  unmap one exam-item code, written back to the hospital's TOML file (``gateway/codes.py``) and
  audited with before/after (R-CE-4, R-SE-4).

A denial is 403 ``{"error": "forbidden", "reason": …}``, audited with the reason and recorded as
a denied retrieval that goes to the national index.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.cache import frontend_routes as cache_api
from api.errors import BadRequest, parse
from api.federation import unprocessable
from dicomweb.audit_hook import record_request
from gateway.audit import EventType, Result
from gateway.codes import CODE, UnknownHospital
from gateway.federation import PeerError, PeerNotConfigured
from gateway.grants import GrantDenied, GrantDesk, GrantRejected, RetrievalGrant
from gateway.identity import PERSON_KEY
from gateway.workstation import Workstation

MAX_DOCUMENT_B64 = (10 << 20) * 4 // 3 + 4  # a consent document of at most 10 MiB, base64


class GrantIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    method: str = Field(
        min_length=1,
        max_length=32,
        description="insurance-qr, insurance-app, e-signature, iot-face or written-consent",
    )
    evidence: str = Field(min_length=1, max_length=8192, description="the signed token of the method")
    person_key: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="the patient being served: the evidence must name them (else 403)",
    )
    document: str | None = Field(
        default=None,
        max_length=MAX_DOCUMENT_B64,
        description="e-signature / written consent: the signed document or scan, base64 (at most 10 MiB)",
    )

    def document_bytes(self) -> bytes | None:
        if self.document is None:
            return None
        try:
            return base64.b64decode(self.document, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("document: not base64") from None


class CitationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    person_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    study_uid: str = Field(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")
    section: Literal["findings", "impression"]
    text: str = Field(min_length=1, max_length=20000)
    doctor: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="required from a node client; a logged-in doctor is the doctor",
    )


class CodeMapIn(BaseModel):
    """One mapping: the hospital's code (in the path) = this insurance exam-item code (R-CE-4)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    insurance_code: str = Field(pattern=CODE.pattern, description="医保检查项目编码, e.g. 250301001")


def _ws(request: Request) -> Workstation | None:
    return getattr(request.app.state, "workstation", None)


def _not_configured() -> JSONResponse:
    return JSONResponse({"error": "the doctor workstation API is not configured"}, status_code=503)


def _peer_failed(what: str, exc: PeerError) -> JSONResponse:
    """503 with the reason when this node lacks the peer (no center configured), 502 when the
    peer failed."""
    if isinstance(exc, PeerNotConfigured):
        return JSONResponse({"error": f"{what}: {exc}", "reason": str(exc)}, status_code=503)
    return JSONResponse({"error": f"{what}: {exc}"}, status_code=502)


def _person(request: Request) -> str:
    person = request.path_params["person"]
    if not PERSON_KEY.match(person):
        raise ValueError("person: the patient's pseudonym (64 lower-case hex characters)")
    return str(person)


def _day(value: str | None, name: str) -> date:
    if not value:
        raise ValueError(f"{name}: required, a date YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: a date YYYY-MM-DD, got {value!r}") from None


class NotThisDoctor(Exception):
    """A user's request names another doctor than the logged-in one."""


def _doctor(request: Request, named: str | None) -> str:
    """The doctor of a request: the logged-in user (a ``named`` other doctor is
    :class:`NotThisDoctor`), or whom a node client names ("" if none)."""
    principal = getattr(request.state, "principal", None)
    if principal is not None and principal.kind == "user":
        if named and named != principal.id:
            raise NotThisDoctor(f"doctor: {named!r} is not the logged-in doctor; users act as themselves")
        return str(principal.id)
    return named or ""


async def _not_this_doctor(request: Request, exc: NotThisDoctor, resource: str) -> Response:
    reason = str(exc)
    await record_request(
        request, EventType.RETRIEVAL, resource=resource, result=Result.FAILURE, detail={"reason": reason}
    )
    return JSONResponse({"error": "forbidden", "reason": reason}, status_code=403)


async def _authorize(
    request: Request, ws: Workstation, person: str, action: str
) -> RetrievalGrant | Response:
    try:
        doctor = _doctor(request, request.query_params.get("doctor"))
    except NotThisDoctor as exc:
        return await _not_this_doctor(request, exc, f"patient:{person[:12]}/{action}")
    try:
        return await run_in_threadpool(lambda: ws.authorize(person, doctor=doctor, action=action))
    except GrantDenied as denied:
        await record_request(  # R-SE-4: who was refused what, and why
            request,
            EventType.RETRIEVAL,
            resource=f"patient:{person[:12]}/{action}",
            result=Result.FAILURE,
            detail={"reason": denied.reason, "doctor": doctor},
        )
        return JSONResponse({"error": "forbidden", "reason": denied.reason}, status_code=403)


def _desk(request: Request) -> GrantDesk | None:
    """A front-end's grants are its workstation's; a center has its own desk (``grant_desk``)."""
    desk: GrantDesk | None = getattr(request.app.state, "grant_desk", None)
    ws = _ws(request)
    return desk if desk is not None else (ws.desk if ws is not None else None)


async def _refused(request: Request, body: GrantIn, status: int, reason: str) -> Response:
    await record_request(  # R-SE-4: refused evidence is audited with the reason
        request,
        EventType.SHARE,
        resource=f"grant-evidence:{body.method}",
        result=Result.FAILURE,
        detail={"method": body.method, "reason": reason, "status": status},
    )
    if status == 403:
        return JSONResponse({"error": "forbidden", "reason": reason}, status_code=403)
    named = reason.startswith(("method:", "document:"))  # else the evidence is what was wrong
    return unprocessable(reason if named else f"evidence: {reason}")


async def post_grant(request: Request) -> Response:
    desk = _desk(request)
    if desk is None:
        return _not_configured()
    try:
        body = await parse(request, GrantIn)
    except BadRequest as bad:
        return bad.response
    try:
        document = body.document_bytes()
    except ValueError as exc:
        return unprocessable(str(exc))
    try:
        grant = await run_in_threadpool(
            lambda: desk.accept(body.method, body.evidence, person=body.person_key, document=document)
        )
    except GrantRejected as exc:
        return await _refused(request, body, 422, str(exc))
    except GrantDenied as denied:
        return await _refused(request, body, 403, denied.reason)
    detail = {"method": grant.method.value, "evidence": grant.evidence, "document": grant.document}
    await record_request(request, EventType.SHARE, resource=f"grant:{grant.grant_id}", detail=detail)
    return JSONResponse(grant.as_json(), status_code=201)


async def revoke_grant(request: Request) -> Response:
    desk = _desk(request)
    if desk is None:
        return _not_configured()
    grant_id = str(request.path_params["grant"])
    if not re.fullmatch(r"[0-9a-f\-]{36}", grant_id):
        return unprocessable("grant_id: a grant's UUID")
    grant = await run_in_threadpool(desk.book.revoke, grant_id)
    if grant is None:
        return JSONResponse({"error": "not_found", "error_description": "no such grant"}, status_code=404)
    await record_request(
        request, EventType.SHARE, resource=f"grant:{grant.grant_id}", detail={"revoked": True}
    )
    return JSONResponse(grant.as_json())


async def history(request: Request) -> Response:
    ws = _ws(request)
    if ws is None:
        return _not_configured()
    try:
        person = _person(request)
        visit = _day(request.query_params.get("visit"), "visit")
    except ValueError as exc:
        return unprocessable(str(exc))
    grant = await _authorize(request, ws, person, "history")
    if isinstance(grant, Response):
        return grant
    try:
        result = await run_in_threadpool(ws.history, person, visit, grant)
    except PeerError as exc:
        return _peer_failed("history unavailable", exc)
    await record_request(request, EventType.RETRIEVAL, resource=f"patient:{person[:12]}/history")
    return JSONResponse(result)


async def same_exams(request: Request) -> Response:
    ws = _ws(request)
    if ws is None:
        return _not_configured()
    q = request.query_params
    try:
        person = _person(request)
        order_date = _day(q.get("date"), "date")
        order = q.get("order", "").strip()
        if not order:
            raise ValueError("order: the hospital exam-item code being ordered is required")
    except ValueError as exc:
        return unprocessable(str(exc))
    target = ws.insurance_code(order)
    if target is None:
        return unprocessable(f"order: {order} has no insurance exam-item code in the code map (R-CE-4)")
    grant = await _authorize(request, ws, person, "same-exams")
    if isinstance(grant, Response):
        return grant
    try:
        result = await run_in_threadpool(ws.same_exams, person, target, order_date, grant)
    except PeerError as exc:
        return _peer_failed("same-exam check unavailable", exc)
    return JSONResponse({"order": order, **result})


async def retrieve(request: Request) -> Response:
    """``POST /api/v1/patients/{person}/studies/{study}/fetch[?doctor=]``: one study for the doctor,
    checked against the patient's grant for that study (R-RT-4), from the cache or the center."""
    ws = _ws(request)
    if ws is None:
        return _not_configured()
    try:
        person = _person(request)
        study = request.path_params["study"]
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", study) or len(study) > 64:
            raise ValueError("study: a Study Instance UID")
    except ValueError as exc:
        return unprocessable(str(exc))
    try:
        record = await run_in_threadpool(ws.study_record, person, study)
    except PeerError as exc:
        return _peer_failed("index unavailable", exc)
    if record is None:
        return JSONResponse({"error": "the index knows no such study of this patient"}, status_code=404)
    try:
        doctor = _doctor(request, request.query_params.get("doctor"))
    except NotThisDoctor as exc:
        return await _not_this_doctor(request, exc, f"study:{study}")
    day = date.fromisoformat(
        f"{record['exam_date'][:4]}-{record['exam_date'][4:6]}-{record['exam_date'][6:]}"
    )
    try:
        grant = await run_in_threadpool(
            lambda: ws.authorize(person, doctor=doctor, action="retrieve", study_uid=study, study_date=day)
        )
    except GrantDenied as denied:
        await record_request(
            request,
            EventType.RETRIEVAL,
            resource=f"study:{study}",
            result=Result.FAILURE,
            detail={"reason": denied.reason, "doctor": doctor, "study_instance_uid": study},
        )
        return JSONResponse({"error": "forbidden", "reason": denied.reason}, status_code=403)
    try:
        out = await run_in_threadpool(ws.retrieve, person, study, record)
    except PeerError as exc:
        return _peer_failed("study unavailable", exc)
    await record_request(
        request,
        EventType.RETRIEVAL,
        resource=f"study:{study}",
        detail={"study_instance_uid": study, "source": out["source"], "grant": grant.grant_id},
    )
    return JSONResponse(out)


async def post_citation(request: Request) -> Response:
    ws = _ws(request)
    if ws is None:
        return _not_configured()
    try:
        body = await parse(request, CitationIn)
    except BadRequest as bad:
        return bad.response
    try:
        doctor = _doctor(request, body.doctor)
    except NotThisDoctor as exc:
        return await _not_this_doctor(request, exc, f"citation:{body.study_uid}")
    if not doctor:
        return unprocessable("doctor: required: the doctor who cites (a node client names them)")
    out = await run_in_threadpool(ws.cite, body.person_key, body.study_uid, body.section, body.text, doctor)
    await record_request(
        request,
        EventType.RETRIEVAL,
        resource=f"citation:{out['citation_id']}",
        detail={"study_instance_uid": body.study_uid, "section": body.section},
    )
    return JSONResponse(out, status_code=201)


async def code_maps(request: Request) -> Response:
    ws = _ws(request)
    if ws is None:
        return _not_configured()
    unmapped = await run_in_threadpool(ws.unmapped_codes)
    return JSONResponse({"maps": ws.codes.snapshot(), "unmapped": unmapped})


async def unmapped_codes(request: Request) -> Response:
    ws = _ws(request)
    if ws is None:
        return _not_configured()
    return JSONResponse({"unmapped": await run_in_threadpool(ws.unmapped_codes)})


def _code_path(request: Request) -> tuple[str, str]:
    hospital, code = request.path_params["hospital"], request.path_params["code"]
    for name, value in (("hospital_code", hospital), ("item_code", code)):
        if not CODE.match(value):
            raise ValueError(f"{name}: letters, digits, '.', '_' or '-', at most 64, got {value[:70]!r}")
    return str(hospital), str(code)


async def edit_code(request: Request) -> Response:
    """PUT (map / re-map) or DELETE (unmap) one code; the same-exam reminder uses it at once."""
    ws = _ws(request)
    if ws is None:
        return _not_configured()
    try:
        hospital, code = _code_path(request)
    except ValueError as exc:
        return unprocessable(str(exc))
    insurance: str | None = None
    if request.method == "PUT":
        try:
            insurance = (await parse(request, CodeMapIn)).insurance_code
        except BadRequest as bad:
            return bad.response
    try:
        if insurance is None:
            before = await run_in_threadpool(lambda: ws.codes.delete(hospital, code, own=ws.institution))
        else:
            before = await run_in_threadpool(
                lambda: ws.codes.put(hospital, code, insurance, own=ws.institution)
            )
    except UnknownHospital:
        return unprocessable(f"hospital_code: no code map for hospital {hospital} on this front-end")
    except OSError as exc:  # nothing changed: the file was not replaced
        return JSONResponse({"error": f"the code map could not be written: {exc}"}, status_code=503)
    if insurance is None and before is None:
        return JSONResponse({"error": "not_found", "error_description": "no such mapping"}, status_code=404)
    entry = {"hospital": hospital, "code": code, "insurance_code": insurance}
    if before != insurance:
        await record_request(  # R-SE-4: who changed which mapping, from what to what
            request,
            EventType.CONFIG_CHANGE,
            resource=f"code-map:{hospital}/{code}",
            detail={"before": before, "after": insurance},
        )
    if insurance is None:
        return JSONResponse({**entry, "before": before})
    return JSONResponse({**entry, "before": before}, status_code=201 if before is None else 200)


#: Patient grants: on a front-end, and on a center for its institutions' users (gateway/center.py).
grant_routes = [
    Route("/grants", post_grant, methods=["POST"]),
    Route("/grants/{grant}", revoke_grant, methods=["DELETE"]),
]
routes = [
    *grant_routes,
    Route("/patients/{person}/history", history, methods=["GET"]),
    Route("/patients/{person}/same-exams", same_exams, methods=["GET"]),
    Route("/patients/{person}/studies/{study}/fetch", retrieve, methods=["POST"]),
    Route("/citations", post_citation, methods=["POST"]),
    Route("/code-maps", code_maps, methods=["GET"]),
    Route("/code-maps/unmapped", unmapped_codes, methods=["GET"]),
    Route("/code-maps/{hospital}/{code}", edit_code, methods=["PUT", "DELETE"]),
    *cache_api,  # the HIS's cache requests (api/cache.py)
]

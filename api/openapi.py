"""The HTTP API as OpenAPI 3.1, one document per role (ARCHITECTURE.md "HTTP API documented as
OpenAPI", issue 6 tests, R-CE-1, R-SE-16).

The spec is generated from :data:`OPERATIONS`, a small table of every route (method, path, the
roles that serve it, what it takes and answers); request bodies are the JSON schemas of the very
pydantic models the handlers validate with, so the documented schema cannot drift from what is
enforced. ``tests/test_openapi.py`` walks each role's app and checks that the table lists exactly
its routes, that ``docs/openapi/<role>.json`` equals :func:`spec`, and runs schemathesis against
a live front-end. Regenerate the files with ``python -m api.openapi --write``.

DICOMweb (PS3.18) paths are listed with their parameters and media types, not schematised: PS3.18
is their specification. The viewer's static files are not API and not listed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.auth import LoginIn
from api.cache import FetchIn
from api.center import Manifest
from api.doctor import CitationIn, CodeMapIn, GrantIn
from api.send import SendRequest
from gateway.cache import CacheRequestForwarded, CacheRequestIn
from gateway.exams import ExamForwarded, ExamIn, SettlementIn
from gateway.retrievals import RetrievalRecord
from gateway.security.guard import PUBLIC, required_scope
from index.records import IndexRecordIn

ROLES = ("frontend", "center", "index")
FE, CE, IX = frozenset({"frontend"}), frozenset({"center"}), frozenset({"index"})
BOTH, ALL = FE | CE, frozenset(ROLES)  # the index serves no DICOMweb, sessions or send
DOCS = Path(__file__).resolve().parents[1] / "docs" / "openapi"
UID = r"^[0-9]+(\.[0-9]+)*$"
JSON = "application/json"


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # path | query
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Op:
    """One route. ``body``: the request model; ``ok``: the success status; ``errors``: the
    statuses the handler itself answers besides the guard's 401/403/429."""

    method: str
    path: str
    roles: frozenset[str]
    summary: str
    body: type[BaseModel] | None = None
    ok: int = 200
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    also: tuple[int, ...] = ()  # further success statuses (e.g. 200 for an idempotent repeat)
    media: str = JSON  # of the success response
    tag: str = "api"


def _p(name: str, description: str, pattern: str | None = None) -> Param:
    return Param(
        name, "path", {"type": "string", **({"pattern": pattern} if pattern else {})}, description, True
    )


def _q(name: str, description: str, schema: dict[str, Any] | None = None, required: bool = False) -> Param:
    return Param(name, "query", schema or {"type": "string"}, description, required)


STUDY = _p("study", "Study Instance UID")
PERSON = _p("person", "the patient's pseudonym (person key)", "^[0-9a-f]{64}$")
PAGE = (
    _q("limit", "1-1000 (default 100)", {"type": "integer", "minimum": 1, "maximum": 1000}),
    _q("offset", "≥ 0 (default 0)", {"type": "integer", "minimum": 0}),
)
HOSPITAL = _p("hospital", "the hospital code")
CODE = _p("code", "the hospital's exam-item code")
DOCTOR = _q("doctor", "the doctor asking (recorded with the retrieval)")
DAY = {"type": "string", "format": "date"}

# Bodies rejected before the model: 400 (not JSON), 415 (not application/json), 422 (the model).
BODY_ERRORS = (400, 415, 422)

OPERATIONS: tuple[Op, ...] = (
    # ---- node identity and sessions (gateway/security/node.py, api/auth.py) -----------------------
    Op("GET", "/healthz", ALL, "Liveness: the role", tag="node"),
    Op(
        "POST",
        "/oauth/token",
        ALL,
        "Client credentials → bearer JWT (RFC 6749 §4.4)",
        tag="auth",
        errors=(400, 401, 503),
    ),
    Op("GET", "/.well-known/jwks.json", ALL, "The node's public signing keys", tag="auth"),
    Op(
        "POST",
        "/auth/login",
        BOTH,
        "A user's login → session cookie + bearer JWT",
        LoginIn,
        tag="auth",
        errors=(*BODY_ERRORS, 401, 503),
    ),
    Op("POST", "/auth/logout", BOTH, "End the caller's session", tag="auth"),
    Op("GET", "/auth/whoami", BOTH, "The calling user, role and permitted actions", tag="auth"),
    Op("POST", "/auth/token", BOTH, "A fresh bearer JWT for the caller's session", tag="auth"),
    # ---- front-end (api/frontend.py, api/qc.py) -----------------------------------------------------
    Op(
        "GET",
        "/api/v1/forwarding",
        FE,
        "Forwarding state per study (issue 3 §6)",
        params=(
            _q(
                "state",
                "queued|sending|sent|confirmed|failed",
                {"enum": ["queued", "sending", "sent", "confirmed", "failed"]},
            ),
            *PAGE,
        ),
        errors=(400, 404),
    ),
    Op(
        "POST",
        "/api/v1/exams",
        FE,
        "An exam record from the RIS/HIS (R-UP-5)",
        ExamIn,
        201,
        errors=(*BODY_ERRORS, 503),
    ),
    Op(
        "POST",
        "/api/v1/settlements",
        FE,
        "The settlement ID of an accession (R-UP-3)",
        SettlementIn,
        errors=(*BODY_ERRORS, 404),
    ),
    Op(
        "GET",
        "/api/v1/upload-deadlines",
        FE,
        "Upload deadlines (R-UP-3)",
        params=(_q("state", "overdue|pending|met|late", {"enum": ["overdue", "pending", "met", "late"]}),),
        errors=(400,),
    ),
    Op("GET", "/metrics", FE, "Prometheus metrics", media="text/plain", tag="node"),
    Op(
        "GET",
        "/api/v1/qc/failures",
        FE,
        "Open QC rejects (R-QC-1)",
        params=(_q("study", "Study Instance UID"), *PAGE),
        errors=(400, 404),
    ),
    Op(
        "GET",
        "/api/v1/studies/{study}/qc",
        BOTH,
        "A study's QC (R-RT-3, R-CE-5)",
        params=(STUDY,),
        errors=(404,),
    ),
    # ---- doctor workstation and cache requests, front-end (api/doctor.py, api/cache.py) --------------
    Op(
        "POST",
        "/api/v1/grants",
        BOTH,
        "A patient's authorization (R-RT-4): a signed token of its method",
        GrantIn,
        201,
        errors=(*BODY_ERRORS, 403, 503),
    ),
    Op(
        "DELETE",
        "/api/v1/grants/{grant}",
        BOTH,
        "Withdraw a grant",
        params=(_p("grant", "the grant's UUID"),),
        errors=(404, 422, 503),
    ),
    Op(
        "GET",
        "/api/v1/patients/{person}/history",
        FE,
        "A patient's history (R-RT-1, R-RT-3)",
        params=(PERSON, _q("visit", "the visit date", DAY, True), DOCTOR),
        errors=(403, 422, 502, 503),
    ),
    Op(
        "GET",
        "/api/v1/patients/{person}/same-exams",
        FE,
        "Same exams before ordering (R-RT-2)",
        params=(
            PERSON,
            _q("order", "hospital exam-item code", required=True),
            _q("date", "order date", DAY, True),
            DOCTOR,
        ),
        errors=(403, 422, 502, 503),
    ),
    Op(
        "POST",
        "/api/v1/patients/{person}/studies/{study}/fetch",
        FE,
        "One study for the doctor (R-RT-4)",
        params=(PERSON, STUDY, DOCTOR),
        errors=(403, 404, 422, 502, 503),
    ),
    Op(
        "POST",
        "/api/v1/citations",
        FE,
        "Cite a report section (R-VW-3)",
        CitationIn,
        201,
        errors=(*BODY_ERRORS, 403, 503),
    ),
    Op("GET", "/api/v1/code-maps", FE, "Code maps and unmapped codes (R-CE-4)", errors=(503,)),
    Op("GET", "/api/v1/code-maps/unmapped", FE, "Codes met without a mapping (R-CE-4)", errors=(503,)),
    Op(
        "PUT",
        "/api/v1/code-maps/{hospital}/{code}",
        FE,
        "Map or re-map one exam-item code (R-CE-4)",
        CodeMapIn,
        201,
        params=(HOSPITAL, CODE),
        errors=(*BODY_ERRORS, 503),
        also=(200,),
    ),
    Op(
        "DELETE",
        "/api/v1/code-maps/{hospital}/{code}",
        FE,
        "Unmap one exam-item code (R-CE-4)",
        params=(HOSPITAL, CODE),
        errors=(404, 422, 503),
    ),
    Op(
        "POST",
        "/api/v1/cache-requests",
        FE,
        "A cache request from the HIS (R-CA-1/2)",
        CacheRequestIn,
        201,
        errors=(*BODY_ERRORS, 503),
    ),
    # ---- center (api/center.py, api/federation.py, api/cache.py) ------------------------------------
    Op(
        "GET",
        "/api/v1/studies/{study}/inventory",
        CE,
        "SOP Instance UID → SHA-256, size (R-CE-9)",
        params=(STUDY, _q("verify", "re-hash what is stored", {"type": "boolean"})),
        errors=(404,),
    ),
    Op(
        "PUT",
        "/api/v1/studies/{study}/manifest",
        CE,
        "What a front-end sent → upload monitoring",
        Manifest,
        params=(STUDY,),
        errors=BODY_ERRORS,
    ),
    Op(
        "GET",
        "/api/v1/upload-monitoring/{study}",
        CE,
        "Complete / incomplete / late (R-CE-9)",
        params=(STUDY,),
        errors=(404,),
    ),
    Op(
        "POST",
        "/api/v1/exams",
        CE,
        "An exam record forwarded by a front-end (pseudonym only)",
        ExamForwarded,
        errors=BODY_ERRORS,
    ),
    Op(
        "GET",
        "/api/v1/index-records",
        CE,
        "Index lookup, answered by the national index",
        params=(_q("person", "pseudonym or person management code", required=True),),
        errors=(400, 404, 422, 502, 503),
    ),
    Op(
        "POST",
        "/api/v1/retrievals",
        CE | IX,
        "A retrieval record (R-RT-4)",
        RetrievalRecord,
        201,
        errors=BODY_ERRORS,
        also=(200,),
    ),
    Op(
        "GET",
        "/api/v1/retrievals",
        CE | IX,
        "Retrieval records, newest first",
        params=(
            _q("person", "pseudonym"),
            _q("institution", ""),
            _q("result", "", {"enum": ["allowed", "denied"]}),
            _q("from", "", DAY),
            _q("to", "", DAY),
            _q("limit", "", {"type": "integer"}),
        ),
        errors=(422,),
    ),
    Op(
        "POST",
        "/api/v1/cache-requests",
        CE,
        "A front-end's pushed cache request (R-CE-4)",
        CacheRequestForwarded,
        201,
        errors=(*BODY_ERRORS, 503),
        also=(200,),
    ),
    Op(
        "POST",
        "/api/v1/fetches",
        CE,
        "Cross-province fetch (R-CE-7)",
        FetchIn,
        errors=(*BODY_ERRORS, 404, 502, 503),
    ),
    # ---- the national index (index/app.py, issue 5) ----------------------------------------------
    Op(
        "POST",
        "/api/v1/index-records",
        IX,
        "A center registers a study (idempotent)",
        IndexRecordIn,
        201,
        errors=(*BODY_ERRORS, 409),
        also=(200,),
    ),
    Op(
        "GET",
        "/api/v1/index-records",
        IX,
        "A patient's studies across the country",
        params=(
            _q("person", "pseudonym or person management code", required=True),
            _q("from", "exam date from", DAY),
            _q("to", "exam date to", DAY),
            _q("modality", ""),
            _q("body_part", ""),
            _q("exam_item", "insurance exam-item code"),
            _q("limit", "1-10000 (default 1000)", {"type": "integer", "minimum": 1, "maximum": 10000}),
        ),
        errors=(422,),
    ),
    Op(
        "GET",
        "/api/v1/index-records/{key}",
        IX,
        "One record by Study Instance UID or record key",
        params=(_p("key", "Study Instance UID or record key"),),
        errors=(404, 422),
    ),
    Op("GET", "/api/v1/provinces", IX, "The directory of provincial centers"),
    # ---- both ----------------------------------------------------------------------------------------
    Op(
        "GET",
        "/api/v1/cache-requests",
        BOTH,
        "Cache requests and their state",
        params=(_q("state", "", {"enum": ["pending", "running", "completed", "failed"]}),),
        errors=(422, 503),
    ),
    Op(
        "POST",
        "/api/v1/send",
        BOTH,
        "Send a study or series to a workstation (R-VW-1)",
        SendRequest,
        202,
        errors=(*BODY_ERRORS, 404),
    ),
    Op("GET", "/api/v1/send/targets", BOTH, "The send targets offered to the caller"),
    Op(
        "GET",
        "/api/v1/send/{job}",
        BOTH,
        "A send job's progress",
        params=(_p("job", "the job id"),),
        errors=(404,),
    ),
)

# ---- DICOMweb: paths, parameters and media types only (PS3.18 is their schema) ------------------------
_S, _SE = "/dicom-web/studies/{study}", "/dicom-web/studies/{study}/series/{series}"
_I = _SE + "/instances/{sop}"
_DICOMWEB: tuple[tuple[str, str, str], ...] = (
    ("POST", "/dicom-web/studies", "stow"),
    ("POST", _S, "stow"),
    *(
        ("GET", p, "qido")
        for p in (
            "/dicom-web/studies",
            "/dicom-web/series",
            "/dicom-web/instances",
            _S + "/series",
            _S + "/instances",
            _SE + "/instances",
        )
    ),
    *(("GET", p, "retrieve") for p in (_S, _SE, _I)),
    *(("GET", p + "/metadata", "metadata") for p in (_S, _SE, _I)),
    ("GET", _I + "/frames/{frames}", "frames"),
    ("GET", _I + "/bulk/{tag}", "bulk"),
    *(
        ("GET", p, "rendered")
        for p in (_S + "/rendered", _SE + "/rendered", _I + "/rendered", _I + "/frames/{frames}/rendered")
    ),
    *(
        ("GET", p, "thumbnail")
        for p in (_S + "/thumbnail", _SE + "/thumbnail", _I + "/thumbnail", _I + "/frames/{frames}/thumbnail")
    ),
)
_DW_MEDIA = {
    "stow": "application/dicom+json",
    "qido": "application/dicom+json",
    "retrieve": 'multipart/related; type="application/dicom"',
    "metadata": "application/dicom+json",
    "frames": 'multipart/related; type="application/octet-stream"',
    "bulk": 'multipart/related; type="application/octet-stream"',
    "rendered": "image/jpeg",
    "thumbnail": "image/jpeg",
}
_DW_PARAMS = {
    "study": "Study Instance UID",
    "series": "Series Instance UID",
    "sop": "SOP Instance UID",
    "frames": "frame numbers, comma-separated, from 1",
    "tag": "the bulk-data attribute tag, 8 hex digits",
}


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "error_description": {"type": "string"},
            "reason": {"type": "string"},
            "errors": {
                "type": "array",
                "description": "one entry per bad field (422)",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    }


_WHY = {
    400: "Bad request: a malformed parameter or a body that is not JSON",
    401: "No valid bearer token (``WWW-Authenticate: Bearer``)",
    403: "The token lacks the scope the guard's table names, or the patient's grant denies it",
    404: "Not found, or not configured on this node",
    409: "The study is registered by another province already",
    415: "Content-Type must be application/json",
    422: "Invalid input: each bad field named with why",
    429: "Rate limited (``Retry-After``)",
    502: "A peer (center, index) failed",
    503: "Not configured on this node (e.g. a front-end without a center): the reason says what",
}


def _error(status: int) -> dict[str, Any]:
    return {
        "description": _WHY[status],
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_DW_ERRORS = (400, 404, 406)
_DW_WHY = {
    400: "A malformed UID, frame list, tag, query or multipart body",
    404: "No such study, series, instance, frame or element",
    406: "None of the Accept media types can be served",
    413: "The body is larger than [http] max_request_mb",
    415: 'Content-Type must be multipart/related; type="application/dicom"',
    410: "The instance's encryption key was destroyed (crypto-shredding): it can no longer be read",
}
#: WADO-RS reads of object bytes: a crypto-shredded instance is 410 before any body (dicomweb/wado.py)
_DW_READS = ("retrieve", "frames", "bulk", "rendered", "thumbnail")


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _operation(op: Op, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    public = (op.method, op.path) in PUBLIC
    responses: dict[str, Any] = {str(op.ok): {"description": "OK", "content": {op.media: {"schema": {}}}}}
    for status in op.also:
        responses[str(status)] = {"description": "OK", "content": {op.media: {"schema": {}}}}
    routed = any(p.where == "path" for p in op.params)
    for status in sorted({*op.errors, *(() if public else (401, 403)), 429, *((404,) if routed else ())}):
        responses[str(status)] = _error(status)
    if routed:  # a path parameter holding '/' matches no route: the router's own plain-text 404
        responses["404"]["content"]["text/plain"] = {"schema": {"type": "string"}}
    out: dict[str, Any] = {
        "operationId": f"{op.method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', op.path)}",
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
    }
    if public:
        out["security"] = []
    else:
        scope = required_scope(op.method, op.path)
        out["description"] = f"Scope: `{scope}`."
    if op.params:
        out["parameters"] = [
            {"name": p.name, "in": p.where, "required": p.required, "schema": p.schema}
            | ({"description": p.description} if p.description else {})
            for p in op.params
        ]
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {JSON: {"schema": refs[op.body]}}}
    return out


def _dicomweb(method: str, path: str, kind: str) -> dict[str, Any]:
    names = re.findall(r"\{(\w+)\}", path)
    out: dict[str, Any] = {
        "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}",
        "summary": f"DICOMweb {kind} (PS3.18)",
        "tags": ["dicomweb"],
        "description": f"Scope: `{required_scope(method, path)}`.",
        "parameters": [
            {
                "name": n,
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": _DW_PARAMS[n],
            }
            for n in names
        ],
        "responses": {
            "200": {"description": "OK", "content": {_DW_MEDIA[kind]: {}}},
            **{str(s): _error(s) for s in (401, 403, 429)},
            # PS3.18 errors are plain text naming what was wrong (dicomweb/*.py)
            **{str(s): _text(_DW_WHY[s]) for s in (*_DW_ERRORS, *((413, 415) if method == "POST" else ()))},
            **({"410": _text(_DW_WHY[410])} if kind in _DW_READS else {}),
        },
    }
    if kind == "retrieve" and path != _I:
        out["responses"]["206"] = {
            "description": "Partial Content (PS3.18 §10.4.3): instances whose encryption key was destroyed"
            " are left out, a Warning: 299 header naming each",
            "content": {_DW_MEDIA[kind]: {}},
        }
    if method == "POST":
        out["requestBody"] = {
            "required": True,
            "content": {'multipart/related; type="application/dicom"': {}},
        }
    return out


def operations(role: str) -> list[Op]:
    return [op for op in OPERATIONS if role in op.roles]


def spec(role: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``role``'s HTTP API."""
    ops = operations(role)
    models = sorted({op.body for op in ops if op.body is not None}, key=lambda m: m.__name__)
    keyed, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    refs = {m: keyed[(m, "validation")] for m in models}
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    for method, path, kind in _DICOMWEB if role in BOTH else ():
        paths.setdefault(path, {})[method.lower()] = _dicomweb(method, path, kind)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"ybyx {role} HTTP API",
            "version": "1",
            "description": "Every route is behind the one guard (gateway/security/guard.py): a bearer "
            "JWT from the node's POST /oauth/token (client credentials) or POST /auth/login (users), "
            "carrying the scope each operation names. See docs/http-api.md.",
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {**defs.get("$defs", {}), "Error": _error_schema()},
        },
    }


def render(role: str) -> str:
    return json.dumps(spec(role), indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print or write the OpenAPI documents (docs/openapi/).")
    parser.add_argument("role", nargs="?", choices=ROLES)
    parser.add_argument("--write", action="store_true", help="write docs/openapi/<role>.json for every role")
    args = parser.parse_args(argv)
    if args.write:
        DOCS.mkdir(exist_ok=True)
        for role in ROLES:
            (DOCS / f"{role}.json").write_text(render(role), encoding="utf-8")
        return 0
    sys.stdout.write(render(args.role or "frontend"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

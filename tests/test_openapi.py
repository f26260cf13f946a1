"""The OpenAPI documents stay true (ARCHITECTURE.md "HTTP API documented as OpenAPI"; issue 6 tests
"schemathesis over the OpenAPI spec"; R-CE-1, R-SE-16).

* every route of the front-end's, the center's and the national index's app is in that role's
  spec, and every path of the spec is a route (walked through the Mounts as
  tests/test_security_routes.py does);
* every guarded operation names the scope the guard's table requires, the public ones none;
* ``docs/openapi/<role>.json`` is what ``api.openapi`` generates (``python -m api.openapi --write``);
* schemathesis fuzzes the JSON ``/api/v1`` operations of a live node of each role (a token with every
  scope): no 5xx, and every status and content type is one the spec documents.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from api.openapi import DOCS, ROLES, render, spec
from gateway.center import Center
from gateway.frontend import Frontend
from gateway.identity import write_new_key
from gateway.security.guard import PUBLIC, required_scope
from index.service import NationalIndex
from tests.conftest import auth, node_url
from tests.test_security_routes import walk

Node = Frontend | Center | NationalIndex
CONVERTOR = re.compile(r"\{(\w+):\w+\}")
METHODS = {"get", "post", "put", "delete", "patch"}


def routes(node: Node) -> set[tuple[str, str]]:
    """(method, path template) of the node's API routes; the viewer's static files are not API."""
    app = node.http.server.config.app
    assert isinstance(app, Starlette)
    found = {(m, CONVERTOR.sub(r"{\1}", p)) for m, p in walk(list(app.routes))}
    return {(m, p) for m, p in found if p != "/viewer" and not p.startswith("/viewer/")}


def documented(doc: dict[str, object]) -> set[tuple[str, str]]:
    paths = doc["paths"]
    assert isinstance(paths, dict)
    return {(m.upper(), p) for p, ops in paths.items() for m in ops if m in METHODS}


def bearer(node: Node) -> str:
    """A token from the node's own token endpoint with every scope of its role."""
    scopes = " ".join(sorted(node.security.scopes))
    client, secret = node.security.clients.add("openapi-tests", scopes)
    r = httpx.post(
        f"{node_url(node)}/oauth/token",  # type: ignore[arg-type]
        data={"grant_type": "client_credentials"},
        auth=(client.client_id, secret),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


@pytest.fixture
def nodes(
    start_frontend: Callable[..., Frontend],
    start_center: Callable[..., Center],
    start_index: Callable[..., NationalIndex],
) -> dict[str, Node]:
    return {"frontend": start_frontend(), "center": start_center(), "index": start_index()}


def test_every_route_is_in_the_spec_and_every_operation_is_a_route(nodes: dict[str, Node]) -> None:
    for role, node in nodes.items():
        served, listed = routes(node), documented(spec(role))
        assert len(served) > (7 if role == "index" else 30)
        assert served - listed == set(), f"{role}: routes missing from api/openapi.py OPERATIONS"
        assert listed - served == set(), f"{role}: documented operations no route serves"


def test_each_operation_names_the_guards_scope_and_the_public_ones_need_none() -> None:
    for role in ROLES:
        doc = spec(role)
        assert doc["openapi"] == "3.1.0"
        assert doc["components"]["securitySchemes"]["bearer"] == {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
        }
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                key = (method.upper(), path)
                if key in PUBLIC:
                    assert op["security"] == [] and "403" not in op["responses"], key
                    continue
                scope = required_scope(method.upper(), re.sub(r"\{\w+\}", "1.2.3", path))
                assert scope is not None and f"Scope: `{scope}`." in op["description"], key
                assert {"401", "403", "429"} <= set(op["responses"]), key
                if "requestBody" in op and path.startswith("/api/v1"):
                    assert "422" in op["responses"], key  # a bad body is answered field by field
                    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"]


def test_the_documents_in_docs_are_the_generated_ones() -> None:
    for role in ROLES:
        path = DOCS / f"{role}.json"
        assert path.read_text(encoding="utf-8") == render(role), f"{path}: run python -m api.openapi --write"


def schemathesis(node: Node, role: str, folder: Path, *, skip: tuple[str, ...] = ()) -> str:
    """Run ``st`` over ``role``'s JSON ``/api/v1`` GET and POST operations (all but ``skip``) of a
    live ``node`` with a token carrying every scope: ~25 examples each, deterministic. The
    checks: no 5xx, only documented status codes and content types. Returns its output."""
    schema = folder / f"{role}.json"
    schema.write_text(json.dumps(spec(role)), encoding="utf-8")
    excluded = [arg for path in skip for arg in ("--exclude-path", path)]
    started = time.monotonic()
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "run",
            str(schema),
            "--url",
            f"http://127.0.0.1:{node.http_port}",
            "-H",
            f"Authorization: Bearer {bearer(node)}",
            "--include-path-regex",
            "^/api/v1/",
            "--exclude-method",  # (several --include-* options are OR-ed: exclude instead)
            "PUT",
            "--exclude-method",
            "DELETE",
            *excluded,
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "25",
            "--generation-deterministic",
            "--request-timeout",
            "10",
            "--workers",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=folder,
    )
    took = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert took < 45, took
    return run.stdout


def test_schemathesis_over_the_frontend(start_frontend: Callable[..., Frontend], tmp_path: Path) -> None:
    key = tmp_path / "pseudonym.key"
    write_new_key(key)
    fe = start_frontend(identity={"key_file": str(key)})  # the exam and cache APIs on
    # the doctor's fetch needs the center and the national index, which this lone front-end has
    # not (its answer is 503 with the reason, documented): its input checks are asserted below instead
    fetch = "/api/v1/patients/{person}/studies/{study}/fetch"
    out = schemathesis(fe, "frontend", tmp_path, skip=(fetch,))
    assert "Tested: 17" in out, out[-3000:]  # the 17 operations, none skipped
    for person, study, field in (("ABC", "1.2.3", "person"), ("0" * 64, "1.x", "study")):
        r = httpx.post(node_url(fe) + fetch.format(person=person, study=study), headers=auth(fe))
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == field, r.text


def test_schemathesis_over_the_center(start_center: Callable[..., Center], tmp_path: Path) -> None:
    center = start_center()
    # not configured on this center (no [index], no cache): 503, documented; tests/test_cache.py
    # and tests/test_index.py run them configured
    off = ("/api/v1/index-records", "/api/v1/cache-requests", "/api/v1/fetches")
    out = schemathesis(center, "center", tmp_path, skip=off)
    assert "Tested: 10" in out, out[-3000:]  # with the patient grants (POST /api/v1/grants)
    for method, path in (("GET", off[0]), ("GET", off[1]), ("POST", off[1]), ("POST", off[2])):
        r = httpx.request(method, node_url(center) + path, headers=auth(center), json={})
        assert r.status_code == 503 and "configured" in r.json()["error"], (method, path, r.text)


def test_schemathesis_over_the_national_index(
    start_index: Callable[..., NationalIndex], tmp_path: Path
) -> None:
    out = schemathesis(start_index(), "index", tmp_path)
    assert "Tested: 6" in out, out[-3000:]  # index records (register, lookup, one), provinces, retrievals

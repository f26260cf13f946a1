"""Node identity and the one guard (issue 6 §1, §3, R-SE-16): the route walker and the token endpoint.

The walker enumerates every HTTP route of the front-end app and the center app (through their
Mounts, path parameters filled with dummy UIDs) and calls each: without credentials → 401 with
``WWW-Authenticate: Bearer``; with a valid token lacking the scope the route needs → 403; with an
expired token, one for another audience, one naming an unknown key, a forged ``kid``, a tampered
signature or payload, ``alg: none``, an HMAC token, or one from another node → 401; with exactly
the scope the guard's table names → through to the route. The routes reachable without a token
are asserted explicitly.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom import dcmread
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from dicomweb.client import DicomWebClient
from dimse.scu import send
from gateway.archive.catalog import Catalog
from gateway.archive.schema import oauth_clients
from gateway.center import Center
from gateway.config import ConfigError, parse_config
from gateway.frontend import Frontend
from gateway.security.clients import ClientRegistry
from gateway.security.credentials import ClientCredentials, read_secret
from gateway.security.guard import PUBLIC, ROLE_SCOPES, RULES, Guard, Principal, required_scope
from gateway.security.node import NodeSecurity
from gateway.security.permissions import SELF
from gateway.security.tokens import (
    KeySet,
    SigningKey,
    TokenError,
    TokenIssuer,
    TokenVerifier,
    VerificationKey,
    load_signing_key,
    load_verification_key,
)
from tests.conftest import (
    FORWARDER_SCOPES,
    auth,
    center_client,
    fetch_token,
    forward_to,
    node_url,
    register_client,
    token,
)
from tests.peers.http import serve
from tests.test_forwarding import FAST, wait_until

ROOT = Path(__file__).resolve().parents[1]
Node = Frontend | Center
DUMMY = {"study": "1.2.840.99.1", "series": "1.2.840.99.1.2", "sop": "1.2.840.99.1.2.3"}
PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")
# The viewer's static files (api/viewer.py, issue 7), public as the guard's PUBLIC_STATIC_PREFIX
# says: the program, no patient data (tests/test_viewer_serving.py checks what they hold).
VIEWER_STATIC = {
    ("GET", "/viewer"),
    ("GET", "/viewer/"),
    ("GET", "/viewer/config.json"),
    ("GET", "/viewer/1.2.840.99.9"),
}
OPEN = PUBLIC | VIEWER_STATIC


# ---- walking the routes --------------------------------------------------------------------------


def walk(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path template) of every route, through Mounts (HEAD comes with GET)."""
    for route in routes:
        if isinstance(route, Mount):
            yield from walk(list(route.routes), prefix + route.path)
        elif isinstance(route, Route):
            for method in sorted(route.methods or {"GET"}):
                if method != "HEAD":
                    yield method, prefix + route.path
        else:  # a route kind the walker cannot see into would escape this test
            raise AssertionError(f"unknown route type {type(route).__name__}")


def fill(template: str) -> str:
    """A concrete path: UIDs for study/series/SOP, 1 for frames, a tag for bulk data."""
    values = {**DUMMY, "frames": "1", "tag": "7FE00010"}
    return PARAM.sub(lambda m: values.get(m.group(1), "1.2.840.99.9"), template)


def app_of(node: Node) -> Starlette:
    app = node.http.server.config.app
    assert isinstance(app, Starlette)
    return app


def routes_of(node: Node) -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the node's app."""
    found = sorted({(m, fill(t)) for m, t in walk(list(app_of(node).routes))})
    assert len(found) > 20  # DICOMweb alone has more: the walker did go into the Mounts
    return found


_http = httpx.Client(timeout=30)


def call(node: Node, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return _http.request(method, f"{node_url(node)}{path}", headers=headers or {})


@pytest.fixture
def nodes(start_frontend: Callable[..., Frontend], start_center: Callable[..., Center]) -> list[Node]:
    return [start_frontend(), start_center()]


def test_the_public_routes_are_exactly_health_token_jwks_and_login() -> None:
    assert {
        ("GET", "/healthz"),
        ("POST", "/oauth/token"),
        ("GET", "/.well-known/jwks.json"),
        ("POST", "/auth/login"),
    } == PUBLIC


def test_every_route_needs_a_token_except_the_public_ones(nodes: list[Node]) -> None:
    for node in nodes:
        public_seen = set()
        for method, path in routes_of(node):
            r = call(node, method, path)
            if (method, path) in OPEN:
                public_seen.add((method, path))
                assert r.status_code != 401, (method, path)
                continue
            assert r.status_code == 401, (node.security.role, method, path, r.status_code)
            assert r.headers["www-authenticate"].startswith('Bearer realm="ybyx"'), (method, path)
            # HEAD of a GET route is guarded alike
            if method == "GET":
                assert call(node, "HEAD", path).status_code == 401, path
        assert public_seen == OPEN, node.security.role
        # a path no route has: still 401 without a token (nothing learned about what exists)
        assert call(node, "GET", "/no/such/route").status_code == 401
        assert call(node, "DELETE", "/dicom-web/studies").status_code == 401


def test_every_route_is_covered_by_the_one_table(nodes: list[Node]) -> None:
    for node in nodes:
        needed = set()
        for method, path in routes_of(node):
            if (method, path) in OPEN:
                continue
            scope = required_scope(method, path)
            assert scope is not None, f"{method} {path}: no rule in guard.RULES (it would be denied)"
            if scope != SELF:  # a user's own session: no client scope (tests/test_authz.py)
                needed.add(scope)
        # the scopes a role may grant are exactly those its routes use
        assert needed == set(ROLE_SCOPES[node.security.role]) == set(node.security.scopes)


def test_search_and_retrieval_need_different_scopes() -> None:
    assert required_scope("GET", "/dicom-web/studies") == "qido"
    assert required_scope("GET", "/dicom-web/studies/1.2/series") == "qido"
    assert required_scope("GET", "/dicom-web/studies/1.2/series/1.3/instances") == "qido"
    assert required_scope("GET", "/dicom-web/studies/1.2") == "wado"
    assert required_scope("HEAD", "/dicom-web/studies/1.2/series/1.3/metadata") == "wado"
    assert required_scope("GET", "/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/1") == "wado"
    assert required_scope("POST", "/dicom-web/studies/1.2") == "stow"
    # nothing else matches: odd paths and methods are denied
    for method, path in (
        ("DELETE", "/dicom-web/studies/1.2"),
        ("GET", "/dicom-web/studies/"),
        ("GET", "/dicom-web//studies"),
        ("GET", "/dicom-web"),
        ("PUT", "/api/v1/exams"),
        ("GET", "/api/v1/studies/1.2/inventory/extra"),
    ):
        assert required_scope(method, path) is None, (method, path)
    assert all(r.scope for r in RULES)


def test_a_token_without_the_routes_scope_gets_403_and_with_it_gets_through(nodes: list[Node]) -> None:
    for node in nodes:
        everything = set(node.security.scopes)
        for method, path in routes_of(node):
            if (method, path) in OPEN:
                continue
            needed = required_scope(method, path)
            assert needed is not None
            if needed == SELF:  # users only: a client token with every scope is still refused
                r = call(node, method, path, auth(node))
                assert r.status_code == 403, (method, path, r.status_code)
                continue
            others = " ".join(sorted(everything - {needed}))
            r = call(node, method, path, auth(node, others))
            assert r.status_code == 403, (node.security.role, method, path, r.status_code)
            challenge = r.headers["www-authenticate"]
            assert 'error="insufficient_scope"' in challenge and f'scope="{needed}"' in challenge
            r = call(node, method, path, auth(node, needed))
            assert r.status_code not in (401, 403), (node.security.role, method, path, r.status_code, r.text)
        # an authenticated call that no rule covers is denied, not passed through
        r = call(node, "DELETE", "/dicom-web/studies", auth(node))
        assert r.status_code == 403


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def bad_tokens(node: Node, other: Node) -> dict[str, str]:
    """Tokens the node must refuse, each carrying every scope of its role."""
    issuer = node.security.issuer
    assert issuer is not None
    scopes = node.security.scopes
    good = issuer.issue("mallory", scopes)
    head, payload, signature = good.token.split(".")
    claims = json.loads(_unb64(payload))
    stranger = SigningKey.of(Ed25519PrivateKey.generate())
    header = json.loads(_unb64(head))
    sig = bytearray(_unb64(signature))
    sig[0] ^= 1
    other_issuer = other.security.issuer
    assert other_issuer is not None
    return {
        "expired": issuer.issue("mallory", scopes, now=time.time() - 3600, lifetime=300).token,
        "wrong audience": issuer.issue("mallory", scopes, audience="urn:ybyx:center:99").token,
        "unknown kid": TokenIssuer(issuer.issuer, stranger).issue("mallory", scopes).token,
        # our kid, someone else's key
        "forged kid": jwt.encode(
            claims, stranger.key, algorithm="EdDSA", headers={"kid": header["kid"], "typ": "at+jwt"}
        ),
        "tampered signature": f"{head}.{payload}.{_b64(bytes(sig))}",
        "tampered payload": f"{head}.{_b64(json.dumps({**claims, 'sub': 'admin'}).encode())}.{signature}",
        "alg none": f"{_b64(json.dumps({**header, 'alg': 'none'}).encode())}.{payload}.",
        "hmac with the public key": jwt.encode(
            claims,
            issuer.keys.jwks()["keys"][0]["x"].encode(),  # the classic algorithm confusion
            algorithm="HS256",
            headers={"kid": header["kid"], "typ": "at+jwt"},
        ),
        "another node's token": other_issuer.issue("mallory", scopes).token,
        "not a token": "not-a-jwt",
    }


def test_bad_tokens_get_401_on_every_route(nodes: list[Node]) -> None:
    fe, center = nodes
    for node, other in ((fe, center), (center, fe)):
        tokens = bad_tokens(node, other)
        for method, path in routes_of(node):
            if (method, path) in OPEN:
                continue
            for name, bad in tokens.items():
                r = call(node, method, path, {"Authorization": f"Bearer {bad}"})
                assert r.status_code == 401, (node.security.role, name, method, path, r.status_code)
                assert 'error="invalid_token"' in r.headers["www-authenticate"], name
        # other ways of not presenting a bearer token
        path = "/dicom-web/studies"
        good = token(node)
        assert call(node, "GET", f"{path}?access_token={good}").status_code == 401  # not in the URL
        assert call(node, "GET", path, {"Authorization": f"Basic {good}"}).status_code == 401
        assert call(node, "GET", path, {"Authorization": "Bearer"}).status_code == 401
        assert call(node, "GET", path, {"Authorization": f"Bearer {good}"}).status_code == 200


def test_the_guard_names_the_caller_in_request_state(tmp_path: Path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    key = SigningKey.of(Ed25519PrivateKey.generate())
    issuer = TokenIssuer("urn:test", key)
    security = NodeSecurity(
        "center",
        "urn:test",
        True,
        ROLE_SCOPES["center"],
        ClientRegistry(catalog, ROLE_SCOPES["center"]),
        issuer,
        TokenVerifier("urn:test", {"urn:test": issuer.keys}),
    )

    async def who(request: Request) -> JSONResponse:
        p: Principal = request.state.principal
        return JSONResponse({"kind": p.kind, "id": p.id, "scopes": sorted(p.scopes), "iss": p.issuer})

    app = Starlette(routes=[Route("/dicom-web/studies", who)])
    app.add_middleware(Guard, security=security)
    bearer = issuer.issue("ris-7", {"qido", "wado"}).token
    try:
        with serve(app) as base:
            r = httpx.get(f"{base}/dicom-web/studies", headers={"Authorization": f"Bearer {bearer}"})
    finally:
        catalog.close()
    assert r.json() == {"kind": "client", "id": "ris-7", "scopes": ["qido", "wado"], "iss": "urn:test"}


# ---- the token endpoint --------------------------------------------------------------------------


def ybyx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def write_center_config(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "center.toml"
    path.write_text(
        'role = "center"\nprovince = "50"\n[storage]\npath = "blobs"\n[database]\nurl = "sqlite:///c.db"\n',
        encoding="utf-8",
    )
    return path


def test_clients_cli_shows_the_secret_once_and_stores_only_a_hash(tmp_path: Path) -> None:
    config = write_center_config(tmp_path)
    added = ybyx("clients", "add", "fe-h1", "--scopes", FORWARDER_SCOPES, "-c", str(config))
    assert added.returncode == 0, added.stderr
    client_id = re.search(r"client_id\s+(\S+)", added.stdout)
    secret = re.search(r"client_secret\s+(ybyx_cs_\S+)", added.stdout)
    assert client_id and secret and client_id.group(1).startswith("fe-h1-")
    assert "shown this once" in added.stderr
    listed = ybyx("clients", "list", "-c", str(config))
    assert client_id.group(1) in listed.stdout and secret.group(1) not in listed.stdout
    assert "stow" in listed.stdout
    # in the database: an argon2id hash, never the secret (also not in the WAL)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("c.db*"))
    assert secret.group(1).encode() not in raw
    catalog = Catalog.open(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        with catalog.engine.connect() as conn:
            [stored] = conn.execute(select(oauth_clients.c.secret_hash)).scalars()
        assert stored.startswith("$argon2id$")
    finally:
        catalog.close()
    # a scope the role does not have is refused up front
    bad = ybyx("clients", "add", "x", "--scopes", "stow index:register", "-c", str(config))
    assert bad.returncode == 2 and "unknown scope(s) index:register" in bad.stderr
    # written to a file instead (mode 600), for the front-end's [forward] client_secret_file
    out = tmp_path / "fe.secret"
    reset = ybyx("clients", "reset-secret", client_id.group(1), "-c", str(config), "--secret-out", str(out))
    assert reset.returncode == 0 and "ybyx_cs_" not in reset.stdout
    assert out.stat().st_mode & 0o777 == 0o600 and read_secret(out) != secret.group(1)
    assert ybyx("clients", "revoke", client_id.group(1), "-c", str(config)).returncode == 0
    assert client_id.group(1) not in ybyx("clients", "list", "-c", str(config)).stdout


def test_token_endpoint(start_center: Callable[..., Center]) -> None:
    center = start_center()
    client_id, secret = register_client(center, "fe", "stow api:inventory")
    r = fetch_token(center, client_id, secret)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == "api:inventory stow"
    assert r.headers["cache-control"] == "no-store"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["iss"] == claims["aud"] == "urn:ybyx:center:50"
    assert claims["sub"] == claims["client_id"] == client_id
    assert claims["exp"] - claims["iat"] == 3600 and claims["jti"]
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt"
    jwks = httpx.get(f"{center.url}/.well-known/jwks.json", timeout=10).json()
    assert [k["kid"] for k in jwks["keys"]] == [header["kid"]]
    assert all("d" not in k for k in jwks["keys"])  # public keys only

    # a subset of the client's scopes; form-posted credentials work too
    r = httpx.post(
        f"{center.url}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": secret,
            "scope": "stow",
        },
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["scope"] == "stow"

    def refused(r: httpx.Response, status: int, error: str) -> None:
        assert r.status_code == status, r.text
        assert r.json()["error"] == error

    refused(fetch_token(center, client_id, secret + "x"), 401, "invalid_client")
    assert fetch_token(center, client_id, "wrong").headers["www-authenticate"].startswith("Basic")
    refused(fetch_token(center, "nobody", secret), 401, "invalid_client")
    refused(fetch_token(center, client_id, secret, scope="stow qido"), 400, "invalid_scope")
    refused(fetch_token(center, client_id, secret, scope="stow index:register"), 400, "invalid_scope")
    refused(
        httpx.post(f"{center.url}/oauth/token", data={"grant_type": "password"}, auth=(client_id, secret)),
        400,
        "unsupported_grant_type",
    )
    refused(
        httpx.post(f"{center.url}/oauth/token", json={"grant_type": "client_credentials"}),
        400,
        "invalid_request",
    )
    refused(
        httpx.post(
            f"{center.url}/oauth/token",
            content=b"grant_type=client_credentials&grant_type=client_credentials",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            auth=(client_id, secret),
        ),
        400,
        "invalid_request",
    )
    refused(
        httpx.post(f"{center.url}/oauth/token", data={"grant_type": "client_credentials"}),
        401,
        "invalid_client",
    )
    # a revoked client gets nothing more
    assert center.security.clients.revoke(client_id)
    refused(fetch_token(center, client_id, secret), 401, "invalid_client")


def test_rotation_keeps_tokens_of_the_previous_key_valid_until_it_is_removed(
    start_center: Callable[..., Center], tmp_path: Path
) -> None:
    root = tmp_path / "rotating"
    old = start_center(root=root)
    old_token = token(old, "qido")
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    # rotate: a new current key; the old one (its public half) listed as previous
    rotated = start_center(
        root=root, security={"signing_key_file": "new.pem", "previous_signing_keys": ["signing.pem.pub"]}
    )
    bearer = {"Authorization": f"Bearer {old_token}"}
    assert call(rotated, "GET", "/dicom-web/studies", bearer).status_code == 200
    kids = [k["kid"] for k in httpx.get(f"{rotated.url}/.well-known/jwks.json").json()["keys"]]
    assert rotated.security.issuer is not None
    new_kid = rotated.security.issuer.key.kid
    assert kids == [new_kid, old_kid] and new_kid != old_kid
    assert jwt.get_unverified_header(token(rotated, "qido"))["kid"] == new_kid
    # the previous key removed: its tokens stop working
    retired = start_center(root=root, security={"signing_key_file": "new.pem"})
    r = call(retired, "GET", "/dicom-web/studies", bearer)
    assert r.status_code == 401 and "unknown key" in r.headers["www-authenticate"]


def test_rotation_in_the_token_library(tmp_path: Path) -> None:
    """The same, without a server: key files, kids, the verifier's answers."""
    from gateway.security.tokens import write_signing_key

    a = write_signing_key(tmp_path / "a.pem")
    b = write_signing_key(tmp_path / "b.pem")
    assert load_signing_key(tmp_path / "a.pem").kid == a.kid
    assert load_verification_key(tmp_path / "a.pem.pub") == a.public
    (tmp_path / "a.pem").chmod(0o644)
    with pytest.raises(PermissionError):
        load_signing_key(tmp_path / "a.pem")
    issued_by_a = TokenIssuer("urn:n", a).issue("c", {"qido"}).token
    both = TokenIssuer("urn:n", b, [a.public])
    verifier = TokenVerifier("urn:n", {"urn:n": both.keys})
    assert verifier.verify(issued_by_a).scopes == {"qido"}
    assert verifier.verify(both.issue("c", {"wado"}).token).client_id == "c"
    only_b = TokenVerifier("urn:n", {"urn:n": KeySet([b.public])})
    with pytest.raises(TokenError, match="unknown key"):
        only_b.verify(issued_by_a)
    assert isinstance(a.public, VerificationKey)


# ---- the front-end as a client of its center -------------------------------------------------------


def test_the_forwarder_refetches_a_token_the_center_refuses(
    start_center: Callable[..., Center], start_frontend: Callable[..., Frontend], samples: Path
) -> None:
    center = start_center()
    fe = start_frontend()
    creds = forward_to(center)
    auth_ = ClientCredentials(
        f"{center.url}/oauth/token", creds["client_id"], read_secret(Path(creds["client_secret_file"]))
    )
    # a token the center does not accept (as after a restart with a new key): the first call is
    # refused with 401, a new token is fetched and the request (a streamed STOW body) sent again
    with auth_._lock:
        auth_._token, auth_._refresh_at = "stale.token.value", time.monotonic() + 3600
    client = DicomWebClient(center.url, auth=auth_)
    try:
        files = sorted((samples / "03_DX_chest").iterdir())
        assert send(files, "127.0.0.1", fe.dicom_port, "YBYX").ok
        [stored] = fe.archive.catalog.locate({"StudyInstanceUID": str(dcmread(files[0]).StudyInstanceUID)})
        outcomes = client.stow(stored.study_uid, [stored], fe.archive.store)
        assert outcomes[stored.sop_uid].accepted
        assert auth_._token != "stale.token.value"
        assert client.inventory(stored.study_uid) == {stored.sop_uid: stored.sha256}
    finally:
        client.close()


def test_a_frontend_with_a_wrong_secret_says_so_in_its_forwarding_status(
    start_center: Callable[..., Center],
    start_frontend: Callable[..., Frontend],
    samples: Path,
    tmp_path: Path,
) -> None:
    center = start_center()
    creds = center_client(center.archive.catalog, tmp_path)
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("ybyx_cs_not-the-secret\n")
    wrong.chmod(0o600)
    fe = start_frontend(forward={"center_url": center.url, **creds, "client_secret_file": str(wrong), **FAST})
    assert send(sorted((samples / "03_DX_chest").iterdir()), "127.0.0.1", fe.dicom_port, "YBYX").ok

    def refused() -> bool:
        rows = httpx.get(f"{node_url(fe)}/api/v1/forwarding", headers=auth(fe), timeout=10).json()
        return bool(rows) and "invalid_client" in rows[0]["last_error"]

    wait_until(refused, what="the center's refusal in the forwarding status")
    assert center.archive.catalog.counts()["instances"] == 0


# ---- configuration ----------------------------------------------------------------------------------


def _fe_config(security: dict[str, Any], tmp_path: Path) -> Any:
    data = {
        "role": "frontend",
        "institution": "H1",
        "dicom": {"allow_any_calling_ae": True},
        "security": security,
    }
    return parse_config(data, "fe.toml", tmp_path)


def test_auth_off_needs_the_explicit_insecure_flag(
    tmp_path: Path, start_frontend: Callable[..., Frontend]
) -> None:
    with pytest.raises(ConfigError) as err:
        _fe_config({"enabled": False}, tmp_path)
    assert err.value.problems == [
        "fe.toml: security: enabled = false leaves every route open: also set "
        "insecure_no_auth_i_understand = true (local experiments only)"
    ]
    cfg = _fe_config({"signing_key_file": "k.pem", "previous_signing_keys": ["old.pub"]}, tmp_path)
    assert cfg.security.enabled and cfg.security.signing_key_file == tmp_path / "k.pem"
    assert cfg.security.previous_signing_keys == [tmp_path / "old.pub"]
    with pytest.raises(ConfigError, match="forward: center_url needs client_id"):
        parse_config(
            {
                "role": "frontend",
                "institution": "H1",
                "dicom": {"allow_any_calling_ae": True},
                "forward": {"center_url": "http://c:1"},
            },
            "fe.toml",
        )
    # off on purpose: routes open, the caller anonymous, no tokens issued
    fe = start_frontend(security={"enabled": False, "insecure_no_auth_i_understand": True})
    assert call(fe, "GET", "/api/v1/upload-deadlines").status_code == 200
    assert call(fe, "POST", "/oauth/token").status_code == 503


def test_two_nodes_of_a_demo_may_not_share_a_signing_key(tmp_path: Path) -> None:
    data = {
        "role": "demo",
        "frontend": {"institution": "H1", "dicom": {"allow_any_calling_ae": True}},
        "center": {"province": "50"},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data, "demo.toml", tmp_path)
    assert err.value.problems == [
        "demo.toml: frontend.security.signing_key_file: the same file as the center's; "
        "give each node its own key"
    ]
    data["center"] = {"province": "50", "security": {"signing_key_file": "center.pem"}}
    assert parse_config(data, "demo.toml", tmp_path).role == "demo"

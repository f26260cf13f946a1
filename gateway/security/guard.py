"""The one guard around every HTTP route (issue 6 §3 "applied by one mechanism around every route",
R-SE-16).

:class:`Guard` is an ASGI middleware that ``gateway.web.build_app`` puts around each role's whole
app, so a route added later is covered without anyone remembering to. For each request it:

1. lets through only the :data:`PUBLIC` routes, listed explicitly (health, token endpoint, JWKS);
2. requires ``Authorization: Bearer <jwt>`` verified by the node's :class:`TokenVerifier`
   (signature, ``kid``, expiry, audience, trusted issuer) — else **401** with
   ``WWW-Authenticate: Bearer``;
3. finds the scope the route needs in :data:`RULES` — one table of (method, path pattern) →
   scope; a request no rule matches is **403**, secure by default — and requires it in the
   token's scopes — else **403** ``insufficient_scope``;
4. records the authenticated :class:`Principal` in ``scope["state"]["principal"]``
   (``request.state.principal``) for the audit trail and resource checks.

Extension point (issue 6 §2–3, not built yet): users arrive as another kind of
:class:`Principal` (with role and institution); the scope a rule names is then the *action* a
permission table (role × action × resource kind) is consulted for, here in :meth:`Guard._allowed`,
and resource checks (institution, patient consent) follow in the routes that load the resource.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.security.tokens import Claims, TokenError, UnknownKey

if TYPE_CHECKING:
    from gateway.security.node import NodeSecurity

log = logging.getLogger(__name__)

REALM = "ybyx"

# ---- the one table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Requests with ``method`` whose path matches ``pattern`` need ``scope``.

    A pattern is a path of literal segments, ``*`` (exactly one non-empty segment) and a final
    ``**`` (one or more non-empty segments). Rules are tried in order; the first match wins.
    """

    method: str
    pattern: str
    scope: str
    _segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        segments = tuple(self.pattern.strip("/").split("/"))
        if "**" in segments[:-1]:
            raise ValueError(f"{self.pattern}: '**' only as the last segment")
        object.__setattr__(self, "_segments", segments)

    def matches(self, method: str, path: str) -> bool:
        if method != self.method:
            return False
        if not path.startswith("/"):
            return False
        parts = path[1:].split("/")
        if any(not p for p in parts):  # '//' or a trailing '/': no rule is written for those
            return False
        pattern = self._segments
        if pattern[-1] == "**":
            if len(parts) < len(pattern):
                return False
            pattern, parts = pattern[:-1], parts[: len(pattern) - 1]
        elif len(parts) != len(pattern):
            return False
        return all(p == "*" or p == s for p, s in zip(pattern, parts, strict=True))


STOW, QIDO, WADO = "stow", "qido", "wado"
RULES: tuple[Rule, ...] = (
    # DICOMweb (PS3.18), dicomweb/app.py. STOW-RS:
    Rule("POST", "/dicom-web/studies", STOW),
    Rule("POST", "/dicom-web/studies/*", STOW),
    # QIDO-RS searches (before the WADO-RS catch-all below a study):
    Rule("GET", "/dicom-web/studies", QIDO),
    Rule("GET", "/dicom-web/series", QIDO),
    Rule("GET", "/dicom-web/instances", QIDO),
    Rule("GET", "/dicom-web/studies/*/series", QIDO),
    Rule("GET", "/dicom-web/studies/*/instances", QIDO),
    Rule("GET", "/dicom-web/studies/*/series/*/instances", QIDO),
    # WADO-RS: retrieve, metadata, frames, bulk data, rendered, thumbnails.
    Rule("GET", "/dicom-web/studies/**", WADO),
    # The front-end's API (api/frontend.py) and metrics:
    Rule("GET", "/api/v1/forwarding", "api:forwarding"),
    Rule("POST", "/api/v1/exams", "api:exams"),
    Rule("POST", "/api/v1/settlements", "api:exams"),
    Rule("GET", "/api/v1/upload-deadlines", "api:monitoring"),
    Rule("GET", "/metrics", "metrics"),
    # The center's API (api/center.py); POST /api/v1/exams is above.
    Rule("GET", "/api/v1/studies/*/inventory", "api:inventory"),
    Rule("PUT", "/api/v1/studies/*/manifest", "api:manifest"),
    Rule("GET", "/api/v1/upload-monitoring/*", "api:monitoring"),
    # The federation (issue 5). The national index (index/app.py); a center answers the same
    # lookup path for its front-ends (forwarded to the index) and takes their retrieval records:
    Rule("POST", "/api/v1/index-records", "index:register"),
    Rule("GET", "/api/v1/index-records", "index:lookup"),
    Rule("GET", "/api/v1/index-records/*", "index:lookup"),
    Rule("GET", "/api/v1/provinces", "index:lookup"),
    Rule("POST", "/api/v1/retrievals", "index:retrievals"),
    Rule("GET", "/api/v1/retrievals", "index:retrievals"),
    # Patient authorizations and the doctor workstation (api/doctor.py, front-end):
    Rule("POST", "/api/v1/grants", "api:grants"),
    Rule("GET", "/api/v1/patients/*/history", "api:doctor"),
    Rule("GET", "/api/v1/patients/*/same-exams", "api:doctor"),
    Rule("POST", "/api/v1/citations", "api:doctor"),
    Rule("GET", "/api/v1/code-maps", "api:codes"),
)

# Reachable without a token, and nothing else: health, and how to get and check a token.
PUBLIC: frozenset[tuple[str, str]] = frozenset(
    {("GET", "/healthz"), ("POST", "/oauth/token"), ("GET", "/.well-known/jwks.json")}
)

# The web viewer's static files (api/viewer.py, issue 7): GET only, ``/viewer`` and everything
# below ``/viewer/``. Public because they are the viewer *program* and display settings and carry
# no patient data; every image and header the viewer shows comes through the DICOMweb routes
# above, with the user's bearer token, checked here like any other request.
PUBLIC_STATIC_PREFIX = "/viewer"

# The scopes each role's routes use (what `ybyx clients add` may grant there).
ROLE_SCOPES: dict[str, frozenset[str]] = {
    "frontend": frozenset({STOW, QIDO, WADO, "api:forwarding", "api:exams", "api:monitoring", "metrics"})
    | {"api:grants", "api:doctor", "api:codes"},
    "center": frozenset({STOW, QIDO, WADO, "api:inventory", "api:manifest", "api:exams", "api:monitoring"})
    | {"index:lookup", "index:retrievals"},
    "index": frozenset({"index:register", "index:lookup", "index:retrievals"}),
}


def _method(method: str) -> str:
    return "GET" if method == "HEAD" else method


def is_public(method: str, path: str) -> bool:
    method = _method(method)
    if method == "GET" and (path == PUBLIC_STATIC_PREFIX or path.startswith(PUBLIC_STATIC_PREFIX + "/")):
        return True
    return (method, path) in PUBLIC


def required_scope(method: str, path: str, rules: Iterable[Rule] = RULES) -> str | None:
    """The scope a request needs, or None when no rule covers it (the guard then denies)."""
    method = _method(method)
    return next((r.scope for r in rules if r.matches(method, path)), None)


# ---- who is calling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of a request (``request.state.principal``).

    ``kind`` is ``client`` (an OAuth client: a node or system) or ``anonymous`` (only with
    ``[security] enabled = false``); users (issue 6 §2) will be a third kind with role and
    institution.
    """

    kind: Literal["client", "anonymous"]
    id: str
    scopes: frozenset[str]
    issuer: str = ""
    token_id: str = ""

    @classmethod
    def of(cls, claims: Claims) -> Principal:
        return cls("client", claims.client_id, claims.scopes, claims.issuer, claims.token_id)


# ---- the middleware --------------------------------------------------------------------------------

_BEARER = re.compile(r"^Bearer +([A-Za-z0-9\-._~+/]+=*) *$", re.IGNORECASE)  # RFC 6750 §2.1


def route_path(scope: Scope) -> str:
    """The path the router matches (``path`` without the ``root_path`` a proxy mounts us under)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path != root and path[len(root)] == "/":
        return path[len(root) :]
    return path


def _quote(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")


class Guard:
    """ASGI middleware: authenticate, authorize by :data:`RULES`, record the principal."""

    def __init__(self, app: ASGIApp, security: NodeSecurity, rules: tuple[Rule, ...] = RULES) -> None:
        self.app = app
        self.security = security
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websocket routes exist: refuse rather than pass unchecked
            await send({"type": "websocket.close", "code": 1008})
            return
        method, path = scope["method"], route_path(scope)
        if is_public(method, path):
            await self.app(scope, receive, send)
            return
        if not self.security.enabled:
            principal = Principal("anonymous", "anonymous", self.security.scopes)
        else:
            token = self._bearer(scope)
            if token is None:
                await self._deny(send, 401, "", "a bearer token is required", scope)
                return
            try:
                claims = await self._verify(token)
            except TokenError as exc:
                await self._deny(send, 401, "invalid_token", str(exc), scope)
                return
            principal = Principal.of(claims)
        # known from here on, so a 403 is audited with who asked, not as anonymous
        scope.setdefault("state", {})["principal"] = principal
        needed = required_scope(method, path, self.rules)
        if needed is None:
            await self._deny(send, 403, "insufficient_scope", "no access rule covers this request", scope)
            return
        if not self._allowed(principal, needed):
            why = f"this request needs scope {needed}"
            await self._deny(send, 403, "insufficient_scope", why, scope, needed)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _allowed(principal: Principal, needed: str) -> bool:
        # issue 6 §3: a user principal will be checked against the permission table here.
        return needed in principal.scopes

    @staticmethod
    def _bearer(scope: Scope) -> str | None:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) != 1:
            return None
        m = _BEARER.match(values[0].decode("latin-1"))
        return m.group(1) if m else None

    async def _verify(self, token: str) -> Claims:
        verifier = self.security.verifier
        assert verifier is not None  # enabled implies a verifier (node.py)
        try:
            return verifier.verify(token)
        except UnknownKey as exc:
            # A remote issuer may have rotated its key: fetch its JWKS (rate-limited), once.
            if not await run_in_threadpool(exc.source.refresh):
                raise
            return verifier.verify(token)

    @staticmethod
    async def _deny(
        send: Send, status: int, error: str, description: str, scope: Scope, needed: str | None = None
    ) -> None:
        # issue 6 §4: "denied access" becomes an audit record here.
        log.info("denied %s %s: %d %s", scope["method"], scope["path"], status, description)
        challenge = f'Bearer realm="{REALM}"'
        if error:
            challenge += f', error="{error}", error_description="{_quote(description)}"'
        if needed:
            challenge += f', scope="{needed}"'
        body = json.dumps({"error": error or "unauthorized", "error_description": description}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", challenge.encode("latin-1", "replace")),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

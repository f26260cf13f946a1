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

Users (issue 6 §2–3, R-SE-1/2/3): a person logs in at ``POST /auth/login`` (public) and is then
a :class:`Principal` of kind ``user`` (role, institution), by the session cookie (pages; a
request that changes anything must also carry the CSRF token) or a bearer JWT with ``role``,
``institution`` and ``sid`` claims (APIs), accepted only while its session is active. The scope a
rule names is then the *action* the permission table (``permissions.py``: role × action × resource
kind) and the sensitivity labels (``sensitivity.py``) are consulted for, in
:meth:`Guard._allowed`; the rule names :data:`SELF` for the routes of one's own session, which no
node client has. Resource checks follow here too (``resources.py``): a user's request below
``/dicom-web/studies/{study}`` is answered 404 unless the study is visible to them, and the QIDO
routes get the same condition for their one SQL statement in ``scope["state"]["study_filter"]``.
Every authenticated caller then takes a token from its per-client bucket (``ratelimit.py``): 429
with Retry-After when empty.
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

from gateway.security import sensitivity
from gateway.security.permissions import SELF, Kind, Reach, permission
from gateway.security.sessions import COOKIE, CSRF_HEADER, SAFE_METHODS
from gateway.security.tokens import Claims, TokenError, UnknownKey

if TYPE_CHECKING:
    from gateway.security.node import NodeSecurity
    from gateway.security.sessions import Session

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
    # A user's own session (api/auth.py; POST /auth/login is public): users only, never clients.
    Rule("POST", "/auth/logout", SELF),
    Rule("GET", "/auth/whoami", SELF),
    Rule("POST", "/auth/token", SELF),
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
    # Cache requests: HIS → front-end → center (api/cache.py):
    Rule("POST", "/api/v1/cache-requests", "api:cache-requests"),
    Rule("GET", "/api/v1/cache-requests", "api:cache-requests"),
    # Patient authorizations (api/doctor.py; front-end and center) and the doctor workstation
    # (api/doctor.py, front-end):
    Rule("POST", "/api/v1/grants", "api:grants"),
    Rule("DELETE", "/api/v1/grants/*", "api:grants"),
    Rule("GET", "/api/v1/patients/*/history", "api:doctor"),
    Rule("GET", "/api/v1/patients/*/same-exams", "api:doctor"),
    Rule("POST", "/api/v1/patients/*/studies/*/fetch", "api:doctor"),
    Rule("POST", "/api/v1/citations", "api:doctor"),
    Rule("GET", "/api/v1/code-maps", "api:codes"),
    Rule("GET", "/api/v1/code-maps/unmapped", "api:codes"),
    # editing the code map is its own action, apart from reading it (R-CE-4)
    Rule("PUT", "/api/v1/code-maps/*/*", "api:codes:write"),
    Rule("DELETE", "/api/v1/code-maps/*/*", "api:codes:write"),
    # Cross-province fetch at a center (api/cache.py):
    Rule("POST", "/api/v1/fetches", "api:fetch"),
    # Image QC (api/qc.py, issue 4, R-QC-1, R-CE-5): a front-end's rejects; a study's QC (both roles)
    Rule("GET", "/api/v1/qc/failures", "api:qc"),
    Rule("GET", "/api/v1/studies/*/qc", "api:qc"),
)

# Reachable without a token, and nothing else: health, and how to get and check a token.
PUBLIC: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/healthz"),
        ("POST", "/oauth/token"),
        ("GET", "/.well-known/jwks.json"),
        ("POST", "/auth/login"),
    }
)

# The web viewer's static files (api/viewer.py, issue 7): GET only, ``/viewer`` and everything
# below ``/viewer/``. Public because they are the viewer *program* and display settings and carry
# no patient data; every image and header the viewer shows comes through the DICOMweb routes
# above, with the user's bearer token, checked here like any other request.
PUBLIC_STATIC_PREFIX = "/viewer"

# The scopes each role's routes use (what `ybyx clients add` may grant there).
ROLE_SCOPES: dict[str, frozenset[str]] = {
    "frontend": frozenset({STOW, QIDO, WADO, "api:forwarding", "api:exams", "api:monitoring", "metrics"})
    | {"api:cache-requests", "api:grants", "api:doctor", "api:codes", "api:codes:write", "api:qc"},
    "center": frozenset({STOW, QIDO, WADO, "api:inventory", "api:manifest", "api:exams", "api:monitoring"})
    | {"index:lookup", "index:retrievals", "api:cache-requests", "api:fetch", "api:qc", "api:grants"},
    "index": frozenset({"index:register", "index:lookup", "index:retrievals"}),
}


# One-click send from the viewer (api/send.py, issue 7 §4, R-VW-1 u), on both roles: its own
# scope, so sending studies out of the node is granted apart from reading them.
SEND_RULES = (Rule("POST", "/api/v1/send", "api:send"), Rule("GET", "/api/v1/send/*", "api:send"))
RULES = RULES + SEND_RULES
ROLE_SCOPES = {**ROLE_SCOPES, **{r: ROLE_SCOPES[r] | {"api:send"} for r in ("frontend", "center")}}


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

    ``kind`` is ``client`` (an OAuth client: a node or system), ``user`` (a person, with
    ``role`` and ``institution``; ``scopes`` empty: the permission table decides) or
    ``anonymous`` (only with ``[security] enabled = false``).
    """

    kind: Literal["client", "anonymous", "user"]
    id: str
    scopes: frozenset[str]
    issuer: str = ""
    token_id: str = ""
    role: str = ""
    institution: str = ""
    person_key: str = ""
    session_id: str = ""
    via_cookie: bool = False

    @classmethod
    def of(cls, claims: Claims) -> Principal:
        return cls("client", claims.client_id, claims.scopes, claims.issuer, claims.token_id)


def _user_principal(session: Session, issuer: str, token_id: str, *, via_cookie: bool) -> Principal:
    user = session.user
    return Principal(
        "user",
        user.username,
        frozenset(),
        issuer,
        token_id,
        role=user.role.value,
        institution=user.institution,
        person_key=user.person_key or "",
        session_id=session.session_id,
        via_cookie=via_cookie,
    )


# ---- the middleware --------------------------------------------------------------------------------

# Actions on studies (resources.py checks them per study); a study's own path below DICOMweb:
STUDY_ACTIONS = (STOW, QIDO, WADO)
_STUDY_PATH = re.compile(r"^/dicom-web/studies/([^/]+)(?:/|$)")

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
        principal: Principal | None
        if not self.security.enabled:
            principal = Principal("anonymous", "anonymous", self.security.scopes)
        else:
            token = self._bearer(scope)
            cookie = self._cookie(scope) if token is None and self.security.logins is not None else None
            if token is None and cookie is None:
                await self._deny(send, 401, "", "a bearer token is required", scope)
                return
            try:
                if token is not None:
                    claims = await self._verify(token)
                    principal = Principal.of(claims) if not claims.role else await self._user(claims)
                else:
                    assert cookie is not None
                    principal = await self._cookie_user(cookie)
            except TokenError as exc:
                await self._deny(send, 401, "invalid_token", str(exc), scope)
                return
            if principal is None:
                await self._deny(send, 401, "invalid_token", "the session has ended: log in again", scope)
                return
        # known from here on, so a 403 is audited with who asked, not as anonymous
        scope.setdefault("state", {})["principal"] = principal
        if principal.via_cookie and method not in SAFE_METHODS and not await self._csrf_ok(scope, principal):
            await self._deny(send, 403, "csrf", f"a cookie session must send its {CSRF_HEADER} header", scope)
            return
        limiter = self.security.limiter
        if limiter is not None and principal.kind != "anonymous":
            wait = limiter.client(f"user:{principal.id}" if principal.kind == "user" else principal.id)
            if wait:
                from gateway.security.ratelimit import too_many  # (ratelimit imports this module)

                await too_many(send, wait, "too many requests from this caller")
                return
        needed = required_scope(method, path, self.rules)
        if needed is None:
            await self._deny(send, 403, "insufficient_scope", "no access rule covers this request", scope)
            return
        if not self._allowed(principal, needed):
            why = f"this request needs scope {needed}"
            await self._deny(send, 403, "insufficient_scope", why, scope, needed)
            return
        if principal.kind == "user" and not await self._resource_ok(scope, principal, needed, path):
            await self._not_found(send, scope)
            return
        await self.app(scope, receive, send)

    def _allowed(self, principal: Principal, needed: str) -> bool:
        """The one authorization decision: a node client by its token's scopes (never a user-only
        action); a user by the permission table and the sensitivity labels (R-SE-2, R-SE-3)."""
        if principal.kind == "user":
            granted = permission(principal.role, needed)
            if granted is None or not sensitivity.may(principal.role, needed):
                return False
            if granted.reach is Reach.INSTITUTION and granted.kind is not Kind.STUDY:
                # operations of a front-end are its own hospital's: only that institution's admins
                return bool(principal.institution) and principal.institution == self.security.home_institution
            return True
        return needed != SELF and needed in principal.scopes

    async def _resource_ok(self, scope: Scope, principal: Principal, needed: str, path: str) -> bool:
        """Institution scoping (IDOR): a study path is checked now; a search gets its filter."""
        access = self.security.study_access
        if access is None or needed not in STUDY_ACTIONS:
            return True
        m = _STUDY_PATH.match(path)
        if m is not None:
            return await run_in_threadpool(access.may_see, principal, needed, m.group(1))
        scope["state"]["study_filter"] = access.condition(principal, needed)
        return True

    async def _user(self, claims: Claims) -> Principal | None:
        """A user's JWT: accepted while its login session is active (logout ends it at once)."""
        logins = self.security.logins
        if logins is None or not claims.session_id:
            raise TokenError("user tokens are not accepted here")
        session = await run_in_threadpool(logins.sessions.by_id, claims.session_id)
        if session is None or session.user.username != claims.subject:
            return None
        return _user_principal(session, claims.issuer, claims.token_id, via_cookie=False)

    async def _cookie_user(self, secret: str) -> Principal | None:
        logins = self.security.logins
        assert logins is not None
        session = await run_in_threadpool(logins.sessions.by_cookie, secret)
        if session is None:
            return None
        return _user_principal(session, self.security.node_id, "", via_cookie=True)

    async def _csrf_ok(self, scope: Scope, principal: Principal) -> bool:
        logins = self.security.logins
        if logins is None:
            return False
        values = [v.decode("latin-1") for k, v in scope["headers"] if k == CSRF_HEADER.encode()]
        if len(values) != 1:
            return False
        session = await run_in_threadpool(logins.sessions.by_id, principal.session_id)
        return session is not None and session.csrf_ok(values[0])

    @staticmethod
    def _cookie(scope: Scope) -> str | None:
        for k, v in scope["headers"]:
            if k != b"cookie":
                continue
            text: str = v.decode("latin-1")
            for part in text.split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE and value:
                    return value
        return None

    @staticmethod
    async def _not_found(send: Send, scope: Scope) -> None:
        # The same answer as for a study that does not exist: nothing is learned (no IDOR oracle).
        log.info("hidden %s %s: not visible to this user", scope["method"], scope["path"])
        body = b'{"error":"not_found","error_description":"no such study"}'
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

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

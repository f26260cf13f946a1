"""Login, logout, whoami and user tokens: ``/auth/…`` (issue 6 §2; R-SE-1, R-SE-4, R-SE-16).

``POST /auth/login`` is public (``guard.PUBLIC``) and rate-limited per address
(``ratelimit.CREDENTIAL_ROUTES``); the others need a logged-in user (rule action ``self``), by
session cookie or bearer token. Every login attempt — success, failure, lockout, missing second
factor — and every logout is one audit record (``EventType.LOGIN`` / ``LOGOUT``) through the one
audit call; the reason of a failure is in the record, never in the answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.errors import BadRequest, parse
from gateway.audit import Actor, AuditLog, EventType, Result
from gateway.security.guard import Principal
from gateway.security.login import LoginResult, Outcome
from gateway.security.node import NodeSecurity
from gateway.security.permissions import actions_of
from gateway.security.sessions import COOKIE, CSRF_COOKIE, Session

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=128)
    totp: str | None = Field(default=None, max_length=16, description="the 6-digit code, when required")


def _security(request: Request) -> NodeSecurity:
    security: NodeSecurity = request.app.state.security
    return security


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _audit(
    request: Request, who: Actor, event: EventType, resource: str, ok: bool, detail: dict[str, Any]
) -> None:
    audit: AuditLog | None = getattr(request.app.state, "audit", None)
    if audit is not None:
        result = Result.SUCCESS if ok else Result.FAILURE
        await run_in_threadpool(audit.record_as, who, event, resource=resource, result=result, detail=detail)


def _token(security: NodeSecurity, session: Session) -> dict[str, Any]:
    """A short-lived bearer JWT for the session's user (role, institution, sid claims)."""
    assert security.issuer is not None
    user = session.user
    issued = security.issuer.issue(
        user.username,
        (),
        lifetime=security.user_token_lifetime,
        claims={"role": user.role.value, "institution": user.institution, "sid": session.session_id},
    )
    return {"access_token": issued.token, "token_type": "Bearer", "expires_in": issued.expires_in}


def _error(status: int, error: str, description: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={**_NO_STORE, **headers},
    )


async def login(request: Request) -> Response:
    """``POST /auth/login`` ``{"username", "password", "totp"?}`` → session cookie + bearer token."""
    security = _security(request)
    if security.logins is None or security.issuer is None:
        return _error(503, "temporarily_unavailable", "user logins are off on this node")
    try:
        body = await parse(request, LoginIn)
    except BadRequest as bad:
        return bad.response
    address = _address(request)
    result: LoginResult = await run_in_threadpool(
        security.logins.login, body.username, body.password, body.totp, address
    )
    user = result.user
    who = Actor(body.username, user.role.value if user else "", user.institution if user else "", address)
    detail: dict[str, Any] = {"outcome": result.outcome.value, "reason": result.reason}
    if result.session is not None:
        detail["session"] = result.session.session.session_id
    await _audit(request, who, EventType.LOGIN, f"user:{body.username}", result.outcome is Outcome.OK, detail)
    if result.outcome is Outcome.LOCKED and result.reason.endswith("now locked"):
        # a lock just set is an anomaly worth an alert (brute force), not only a failed login
        lock = {"reason": "repeated failed logins", "locked_seconds": round(result.retry_after)}
        await _audit(request, who, EventType.ANOMALY, f"user:{body.username}", False, lock)

    if result.outcome is Outcome.LOCKED:
        seconds = str(max(1, int(result.retry_after + 0.999)))
        return _error(429, "locked", "too many failed logins; try again later", **{"Retry-After": seconds})
    if result.outcome is Outcome.MFA_REQUIRED:
        return _error(401, "mfa_required", "enter the code from your authenticator app (totp)")
    if result.outcome is Outcome.MFA_NOT_ENROLLED:
        return _error(
            403, "mfa_not_enrolled", "a second factor is required; ask an administrator to enrol one"
        )
    if result.outcome is not Outcome.OK or result.session is None or user is None:
        return _error(401, "invalid_credentials", "wrong user name, password or code")
    new = result.session
    response = JSONResponse(
        {
            "username": user.username,
            "role": user.role.value,
            "institution": user.institution,
            "csrf_token": new.csrf_token,
            "session_expires_at": new.session.expires_at.isoformat(),
            **_token(security, new.session),
        },
        headers=_NO_STORE,
    )
    max_age = int(security.logins.sessions.lifetime.total_seconds())
    response.set_cookie(
        COOKIE, new.cookie_secret, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict"
    )
    # readable by the page's script, which echoes it in X-CSRF-Token (the server checks its hash)
    response.set_cookie(
        CSRF_COOKIE, new.csrf_token, max_age=max_age, path="/", secure=True, httponly=False, samesite="strict"
    )
    return response


def _user(request: Request) -> Principal | None:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal if principal is not None and principal.kind == "user" else None


async def logout(request: Request) -> Response:
    """``POST /auth/logout``: ends the session — its cookie and every token issued for it."""
    security, principal = _security(request), _user(request)
    if principal is None or security.logins is None:
        return _error(400, "not_a_user", "only a logged-in user has a session to end")
    ended = await run_in_threadpool(security.logins.sessions.revoke, principal.session_id)
    who = Actor(principal.id, principal.role, principal.institution, _address(request))
    detail = {"session": principal.session_id}
    await _audit(request, who, EventType.LOGOUT, f"user:{principal.id}", ended, detail)
    response = JSONResponse({"logged_out": True}, headers=_NO_STORE)
    for name, httponly in ((COOKIE, True), (CSRF_COOKIE, False)):
        response.delete_cookie(name, path="/", secure=True, httponly=httponly, samesite="strict")
    return response


async def whoami(request: Request) -> Response:
    """``GET /auth/whoami``: the user, role, institution and the actions the role may perform."""
    principal = _user(request)
    if principal is None:
        return _error(400, "not_a_user", "this is a node client's token, not a user's")
    return JSONResponse(
        {
            "username": principal.id,
            "role": principal.role,
            "institution": principal.institution,
            "actions": sorted(actions_of(principal.role)),
            "via": "cookie" if principal.via_cookie else "bearer",
        },
        headers=_NO_STORE,
    )


async def token(request: Request) -> Response:
    """``POST /auth/token``: a fresh short-lived bearer JWT for the current session."""
    security, principal = _security(request), _user(request)
    if principal is None or security.logins is None:
        return _error(400, "not_a_user", "only a logged-in user gets a user token")
    session = await run_in_threadpool(security.logins.sessions.by_id, principal.session_id)
    if session is None:
        return _error(401, "invalid_token", "the session has ended: log in again")
    return JSONResponse(_token(security, session), headers=_NO_STORE)


routes = [
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/whoami", whoami, methods=["GET"]),
    Route("/token", token, methods=["POST"]),
]

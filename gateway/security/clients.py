"""OAuth 2.0 client-credentials clients and the token endpoint (issue 6 §1, R-SE-16).

A client is a node or system that calls this node: a front-end at its center, the HIS posting
exam records to its front-end, a workstation reading DICOMweb. ``ybyx clients add NAME --scopes …``
generates the client id and a 256-bit secret, shows the secret once and stores only its argon2id
hash (argon2-cffi) in the catalog's ``oauth_clients`` table. The scopes stored
with a client are the most its tokens may carry.

``POST /oauth/token`` (RFC 6749 §4.4) takes ``grant_type=client_credentials``, the client's
credentials (HTTP Basic, or ``client_id`` + ``client_secret`` in the form) and an optional
``scope``; it answers ``{"access_token", "token_type": "Bearer", "expires_in", "scope"}``. A
wrong secret or unknown client is 401 ``invalid_client`` (the hash check takes as long either
way), a scope the client may not have is 400 ``invalid_scope``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote_plus

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.archive.catalog import Catalog
from gateway.archive.schema import oauth_clients
from gateway.security.tokens import format_scopes, parse_scopes

if TYPE_CHECKING:
    from gateway.security.node import NodeSecurity

CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
SECRET_PREFIX = "ybyx_cs_"  # lets secret scanners find a leaked client secret
MAX_FORM_BYTES = 4096
# argon2id at OWASP's minimum (m=19 MiB, t=2, p=1), ~30 ms: a client secret is 256 random bits, so
# the hash need not slow guessing (there is nothing to guess); it keeps a copied database from
# yielding usable secrets, and keeps the token endpoint (which hashes even for unknown ids) cheap.
# User passwords (issue 6 §2) get the stronger RFC 9106 parameters.
SECRET_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


class ClientError(ValueError):
    """A client that cannot be added or changed; the message says why."""


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    scopes: frozenset[str]
    created_at: datetime
    secret_set_at: datetime
    revoked_at: datetime | None
    institution: str | None = None  # whose transfer key seals its uploads (R-CE-2, transfer_keys.py)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class ClientRegistry:
    """The clients allowed to obtain tokens from this node (``oauth_clients`` in the catalog)."""

    def __init__(
        self, catalog: Catalog, allowed_scopes: frozenset[str], *, hasher: PasswordHasher | None = None
    ) -> None:
        self.catalog = catalog
        self.allowed_scopes = allowed_scopes
        self._hasher = hasher or SECRET_HASHER
        self._dummy_hash: str | None = None

    def _scopes(self, scopes: str | frozenset[str] | set[str] | list[str]) -> frozenset[str]:
        try:
            wanted = parse_scopes(scopes)
        except ValueError as exc:
            raise ClientError(str(exc)) from None
        if not wanted:
            raise ClientError("give at least one scope")
        unknown = wanted - self.allowed_scopes
        if unknown:
            known = format_scopes(self.allowed_scopes)
            raise ClientError(f"unknown scope(s) {format_scopes(unknown)}; this role has: {known}")
        return wanted

    def add(
        self,
        name: str,
        scopes: str | frozenset[str] | set[str] | list[str],
        *,
        client_id: str | None = None,
        institution: str | None = None,
    ) -> tuple[Client, str]:
        """Register a client; returns it and its secret (the only time the secret is seen).
        ``institution``: the institution (code) it uploads for (R-CE-2)."""
        if institution is not None and not CLIENT_ID.match(institution):
            raise ClientError(f"institution {institution!r}: 1-64 letters, digits, '.', '_', '-'")
        if not CLIENT_ID.match(name):
            raise ClientError(f"name {name!r}: 1-64 letters, digits, '.', '_', '-' (starting alphanumeric)")
        cid = client_id or f"{name}-{secrets.token_hex(4)}"
        if not CLIENT_ID.match(cid):
            raise ClientError(f"client id {cid!r}: 1-64 letters, digits, '.', '_', '-'")
        granted = self._scopes(scopes)
        secret = new_secret()
        now = datetime.now(UTC)
        try:
            with self.catalog.write() as conn:
                conn.execute(
                    oauth_clients.insert().values(
                        client_id=cid,
                        name=name,
                        secret_hash=self._hasher.hash(secret),
                        scopes=format_scopes(granted),
                        created_at=now,
                        secret_set_at=now,
                        institution=institution,
                    )
                )
        except IntegrityError:
            raise ClientError(
                f"client id {cid!r} exists (`ybyx clients reset-secret` gives it a new secret)"
            ) from None
        return Client(cid, name, granted, now, now, None, institution), secret

    def reset_secret(self, client_id: str) -> str:
        """A new secret for an active client (the old one stops working at once); shown once."""
        secret = new_secret()
        with self.catalog.write() as conn:
            done = conn.execute(
                update(oauth_clients)
                .where(oauth_clients.c.client_id == client_id, oauth_clients.c.revoked_at.is_(None))
                .values(secret_hash=self._hasher.hash(secret), secret_set_at=datetime.now(UTC))
            ).rowcount
        if not done:
            raise ClientError(f"no active client {client_id!r}")
        return secret

    def revoke(self, client_id: str) -> bool:
        """Stop a client from obtaining tokens (tokens it holds expire within minutes)."""
        with self.catalog.write() as conn:
            done = conn.execute(
                update(oauth_clients)
                .where(oauth_clients.c.client_id == client_id, oauth_clients.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            ).rowcount
        return bool(done)

    def get(self, client_id: str) -> Client | None:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(select(oauth_clients).where(oauth_clients.c.client_id == client_id)).first()
        return None if row is None else _client(row)

    def list(self, *, include_revoked: bool = False) -> list[Client]:
        query = select(oauth_clients).order_by(oauth_clients.c.id)
        if not include_revoked:
            query = query.where(oauth_clients.c.revoked_at.is_(None))
        with self.catalog.engine.connect() as conn:
            return [_client(r) for r in conn.execute(query)]

    def authenticate(self, client_id: str, secret: str) -> Client | None:
        """The active client with this id and secret, else None. An unknown id costs one hash
        check like a known one, so timing does not tell which client ids exist; argon2 compares
        in constant time."""
        with self.catalog.engine.connect() as conn:
            row = conn.execute(
                select(oauth_clients).where(
                    oauth_clients.c.client_id == client_id, oauth_clients.c.revoked_at.is_(None)
                )
            ).first()
        if row is None:
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash(new_secret())
            with contextlib.suppress(VerificationError, InvalidHashError):
                self._hasher.verify(self._dummy_hash, secret)
            return None
        try:
            self._hasher.verify(row.secret_hash, secret)
        except (VerificationError, InvalidHashError):
            return None
        return _client(row)


def institution_of(catalog: Catalog, principal: object) -> str | None:
    """The institution a request's caller uploads for (R-CE-2): a user's own institution, or the
    institution a client was registered for (``ybyx clients add … --institution``); else None."""
    kind = getattr(principal, "kind", "")
    if kind == "user":
        return getattr(principal, "institution", "") or None
    if kind != "client":
        return None
    with catalog.engine.connect() as conn:
        found = conn.execute(
            select(oauth_clients.c.institution).where(
                oauth_clients.c.client_id == getattr(principal, "id", "")
            )
        ).scalar()
    return str(found) if found else None


def _client(row: object) -> Client:
    return Client(
        client_id=row.client_id,  # type: ignore[attr-defined]
        name=row.name,  # type: ignore[attr-defined]
        scopes=frozenset(row.scopes.split()),  # type: ignore[attr-defined]
        created_at=row.created_at,  # type: ignore[attr-defined]
        secret_set_at=row.secret_set_at,  # type: ignore[attr-defined]
        revoked_at=row.revoked_at,  # type: ignore[attr-defined]
        institution=row.institution,  # type: ignore[attr-defined]
    )


# ---- the token endpoint -------------------------------------------------------------------------

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _oauth_error(status: int, error: str, description: str, **headers: str) -> JSONResponse:
    """An RFC 6749 §5.2 error answer."""
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={**_NO_STORE, **headers},
    )


def _invalid_client() -> JSONResponse:
    return _oauth_error(
        401, "invalid_client", "client authentication failed", **{"WWW-Authenticate": 'Basic realm="ybyx"'}
    )


class _BadForm(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded body (small; each parameter at most once, RFC 6749 §3.2)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise _BadForm(
            _oauth_error(400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded")
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise _BadForm(_oauth_error(413, "invalid_request", "request body too large"))
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise _BadForm(_oauth_error(400, "invalid_request", "malformed form body")) from None
    repeated = sorted(k for k, v in fields.items() if len(v) > 1)
    if repeated:
        raise _BadForm(_oauth_error(400, "invalid_request", f"parameter repeated: {repeated[0]}"))
    return {k: v[0] for k, v in fields.items()}


def _basic(header: str) -> tuple[str, str] | None:
    """``client_id``, ``client_secret`` from HTTP Basic (each form-urlencoded, RFC 6749 §2.3.1)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (unquote_plus(user), unquote_plus(password)) if sep else None


async def token_endpoint(request: Request) -> Response:
    """``POST /oauth/token``: client credentials → a short-lived access token."""
    node: NodeSecurity = request.app.state.security
    if node.issuer is None:
        return _oauth_error(503, "temporarily_unavailable", "this node issues no tokens")
    try:
        form = await _form(request)
    except _BadForm as bad:
        return bad.response
    grant = form.get("grant_type")
    if grant is None:
        return _oauth_error(400, "invalid_request", "grant_type is required")
    if grant != "client_credentials":
        return _oauth_error(400, "unsupported_grant_type", "only client_credentials is supported")
    header = request.headers.get("authorization")
    if header is not None:
        creds = _basic(header)
        if creds is None or "client_secret" in form:
            return _invalid_client()
        if "client_id" in form and form["client_id"] != creds[0]:
            return _oauth_error(400, "invalid_request", "client_id differs from the authenticated client")
    elif "client_id" in form and "client_secret" in form:
        creds = (form["client_id"], form["client_secret"])
    else:
        return _invalid_client()
    client = await run_in_threadpool(node.clients.authenticate, *creds)
    if client is None:
        return _invalid_client()
    try:
        asked = parse_scopes(form["scope"]) if form.get("scope") else client.scopes
    except ValueError:
        return _oauth_error(400, "invalid_scope", "malformed scope")
    beyond = asked - client.scopes
    if beyond or not asked:
        return _oauth_error(
            400, "invalid_scope", f"not granted to this client: {format_scopes(beyond) or '(none asked)'}"
        )
    issued = node.issuer.issue(client.client_id, asked)
    return JSONResponse(
        {
            "access_token": issued.token,
            "token_type": "Bearer",
            "expires_in": issued.expires_in,
            "scope": format_scopes(issued.scopes),
        },
        headers=_NO_STORE,
    )


async def jwks_endpoint(request: Request) -> Response:
    """``GET /.well-known/jwks.json``: this node's current and previous public keys."""
    node: NodeSecurity = request.app.state.security
    keys = node.issuer.keys.jwks() if node.issuer is not None else {"keys": []}
    return JSONResponse(keys, headers={"Cache-Control": "public, max-age=300"})

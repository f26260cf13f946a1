"""A role's security, assembled from its ``[security]`` section (issue 6 §1, §3, R-SE-16).

Each node issues the tokens for its own routes: it runs the token endpoint, keeps the client
registry and signs with its own key; its guard accepts those tokens (audience: this node) and
those of the issuers its config lists as trusted. A front-end calls its center as a client of the
center (``[forward] client_id`` + ``client_secret_file``, :mod:`.credentials`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from starlette.routing import BaseRoute, Route

from gateway.archive import ArchiveUnavailable
from gateway.archive.catalog import Catalog
from gateway.config import SecuritySection
from gateway.security.clients import ClientRegistry, jwks_endpoint, token_endpoint
from gateway.security.guard import ROLE_SCOPES
from gateway.security.kms import Kms, KmsError
from gateway.security.login import Logins
from gateway.security.ratelimit import RateLimiter
from gateway.security.resources import StudyAccess, StudyOwnership
from gateway.security.tokens import (
    KeySet,
    KeySource,
    RemoteKeySet,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
    load_signing_key,
    load_verification_key,
    write_signing_key,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def default_node_id(role: str, code: str) -> str:
    """``urn:ybyx:<role>:<institution or province code>`` when ``[security] issuer`` is unset."""
    return f"urn:ybyx:{role}:{code}"


@dataclass
class NodeSecurity:
    """What the guard and the token endpoint of one node use."""

    role: str
    node_id: str
    enabled: bool
    scopes: frozenset[str]  # every scope this role's routes need
    clients: ClientRegistry
    issuer: TokenIssuer | None = None
    verifier: TokenVerifier | None = None
    # users (issue 6 §2-3, §7): logins and sessions, institution scoping, rate limits
    logins: Logins | None = None
    study_access: StudyAccess | None = None
    limiter: RateLimiter | None = None
    home_institution: str = ""  # a front-end's hospital ("" at a center)
    user_token_lifetime: int = 300
    created_keys: list[tuple[str, str]] = field(default_factory=list)  # (purpose, KMS key id) made now

    @classmethod
    def open(
        cls,
        cfg: SecuritySection,
        *,
        role: str,
        node_id: str,
        catalog: Catalog,
        ownership: StudyOwnership | None = None,
        kms: Kms | None = None,
    ) -> NodeSecurity:
        """Load keys and trust; raise :class:`ArchiveUnavailable` naming the config key at fault.
        ``ownership``: how studies map to institutions here (a front-end's peers; resources.py);
        ``kms``: the node's KMS, which holds the signing key with ``signing_key_source = "kms"``."""
        scopes = ROLE_SCOPES[role]
        clients = ClientRegistry(catalog, scopes)
        limiter = RateLimiter(cfg.limits)
        if not cfg.enabled:
            log.warning(
                "[security] enabled = false: every HTTP route of this %s is open to anyone who can reach it",
                role,
            )
            return cls(role, node_id, False, scopes, clients, limiter=limiter)
        created: list[tuple[str, str]] = []
        if cfg.signing_key_source == "kms":  # R-SE-14: the key stays in the KMS, which signs
            from gateway.security.managed import TOKEN_SIGNING, ManagedTokenKeys, ensure_active

            if kms is None:
                raise ArchiveUnavailable("security.signing_key_source", "kms: this node has no KMS")
            try:
                key_id, made = ensure_active(kms, TOKEN_SIGNING)
            except KmsError as exc:
                raise ArchiveUnavailable("security.signing_key_source", str(exc)) from exc
            if made:
                created.append((TOKEN_SIGNING, key_id))
            issuer = TokenIssuer(node_id, ManagedTokenKeys(kms), lifetime=cfg.token_lifetime_seconds)
        else:
            key = _load("security.signing_key_file", cfg.signing_key_file, _signing_key)
            previous = [
                _load(f"security.previous_signing_keys.{n}", p, load_verification_key)
                for n, p in enumerate(cfg.previous_signing_keys)
            ]
            issuer = TokenIssuer(node_id, key, previous, lifetime=cfg.token_lifetime_seconds)
        trusted: dict[str, KeySource] = {node_id: issuer.keys}
        for n, t in enumerate(cfg.trusted_issuers):
            if t.issuer in trusted:
                raise ArchiveUnavailable(f"security.trusted_issuers.{n}.issuer", f"{t.issuer!r} listed twice")
            if t.public_key_file is not None:
                path = t.public_key_file
                trusted[t.issuer] = KeySet(
                    [_load(f"security.trusted_issuers.{n}.public_key_file", path, load_verification_key)]
                )
            else:
                assert t.jwks_url is not None  # the config model requires one of the two
                remote = RemoteKeySet(t.jwks_url)
                remote.refresh()  # best effort now; again on an unknown kid
                trusted[t.issuer] = remote
        log.info("%s %s signs tokens with key %s", role, node_id, issuer.key.kid)
        ownership = ownership or StudyOwnership()
        return cls(
            role,
            node_id,
            True,
            scopes,
            clients,
            issuer,
            TokenVerifier(node_id, trusted),
            logins=Logins(catalog, cfg.users),
            study_access=StudyAccess(catalog, ownership),
            limiter=limiter,
            home_institution=ownership.home or "",
            user_token_lifetime=cfg.users.token_lifetime_seconds,
            created_keys=created,
        )

    def routes(self) -> list[BaseRoute]:
        """The public token endpoint and key set (listed in ``guard.PUBLIC``)."""
        return [
            Route("/oauth/token", token_endpoint, methods=["POST"]),
            Route("/.well-known/jwks.json", jwks_endpoint, methods=["GET"]),
        ]


def _signing_key(path: Path) -> SigningKey:
    """The node's signing key; made on first start if the file does not exist (like an SSH host
    key: it signs only this node's short-lived tokens, and clients simply fetch new ones)."""
    if not path.exists():
        try:
            key = write_signing_key(path)
        except FileExistsError:  # another process of this node made it first
            return load_signing_key(path)
        log.warning("generated a new token-signing key %s (kid %s)", path, key.kid)
        return key
    return load_signing_key(path)


def _load(key: str, path: Path, loader: Callable[[Path], _T]) -> _T:
    try:
        return loader(path)
    except FileNotFoundError:
        raise ArchiveUnavailable(key, f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ArchiveUnavailable(key, str(exc)) from exc

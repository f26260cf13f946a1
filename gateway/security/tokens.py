"""EdDSA (Ed25519) JWT access tokens: issue, verify, rotate (issue 6 §1, R-SE-16).

A token is an RFC 9068 JWT access token (header ``typ: at+jwt``, ``alg: EdDSA``, ``kid``) with
the claims ``iss`` (the issuing node), ``sub`` and ``client_id`` (the OAuth client), ``aud`` (the
node the token is for), ``scope`` (space-separated), ``iat``, ``exp`` (minutes, not hours) and
``jti``. Each node signs the tokens for its own routes; a verifier also accepts the issuers listed
as trusted in its config (their keys from a file or a JWKS URL).

Keys are named by their RFC 7638 thumbprint, so a ``kid`` needs no bookkeeping. Rotation: a node
signs with its current key and still publishes (and accepts) its previous keys until they are
removed from the config, so tokens already handed out stay valid for their few minutes. With
``[security] signing_key_source = "kms"`` the keys are managed keys of the node's KMS
(``gateway/security/managed.py``): the issuer only asks the KMS to sign, and a rotation there
(``ybyx keys rotate --purpose token-signing``) is picked up without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

ALGORITHM = "EdDSA"
TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1: tells access tokens from any other JWT we may sign later
MAX_TOKEN_LENGTH = 8192
DEFAULT_LEEWAY = 30.0  # seconds of clock skew between nodes
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3


class TokenError(Exception):
    """A token that must not be accepted; the message is safe to send to the client."""


class UnknownKey(TokenError):
    """The token names a ``kid`` its issuer's key set does not hold (yet: a remote set may refresh)."""

    def __init__(self, message: str, source: KeySource) -> None:
        super().__init__(message)
        self.source = source


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def kid_of(public: Ed25519PublicKey) -> str:
    """The key's RFC 7638 JWK thumbprint (SHA-256, base64url): its ``kid``."""
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url(_raw(public))}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def parse_scopes(value: str | Iterable[str]) -> frozenset[str]:
    """A space-separated scope string (or scope names) as a set; ValueError for a malformed name."""
    names = value.split() if isinstance(value, str) else list(value)
    bad = [n for n in names if not _SCOPE_TOKEN.match(n)]
    if bad:
        raise ValueError(f"malformed scope name {bad[0]!r}")
    return frozenset(names)


def format_scopes(scopes: Iterable[str]) -> str:
    return " ".join(sorted(scopes))


@dataclass(frozen=True)
class VerificationKey:
    """A public key that verifies tokens, with its ``kid``."""

    kid: str
    key: Ed25519PublicKey

    @classmethod
    def of(cls, public: Ed25519PublicKey) -> VerificationKey:
        return cls(kid_of(public), public)

    def jwk(self) -> dict[str, str]:
        """The public JWK (RFC 8037) as published in the JWKS."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64url(_raw(self.key)),
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }


class Signer(Protocol):
    """What signing needs of a key: an ``Ed25519PrivateKey``, or a KMS key (``managed.KmsSigner``)."""

    def sign(self, data: bytes) -> bytes: ...

    def public_key(self) -> Ed25519PublicKey: ...


@dataclass(frozen=True)
class SigningKey:
    """The private key a node signs its tokens with (or the KMS key standing for it)."""

    kid: str
    key: Signer

    @classmethod
    def of(cls, private: Signer) -> SigningKey:
        return cls(kid_of(private.public_key()), private)

    @property
    def public(self) -> VerificationKey:
        return VerificationKey(self.kid, self.key.public_key())


# ---- key files ------------------------------------------------------------------------------------


def write_signing_key(path: Path) -> SigningKey:
    """Create a new Ed25519 private key (PKCS#8 PEM, mode 600, never overwriting) and its public
    key beside it (``<path>.pub``); returns the key (``ybyx keys generate-signing``)."""
    private = Ed25519PrivateKey.generate()
    key = SigningKey.of(private)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(f"{path}.pub").write_bytes(public)
    return key


def _private_file(path: Path) -> Ed25519PrivateKey:
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path}: signing key is readable by others (chmod 600)")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key (`ybyx keys generate-signing`)")
    return key


def load_signing_key(path: Path) -> SigningKey:
    """Read a signing key file; refuse one others can read or that is not Ed25519."""
    return SigningKey.of(_private_file(path))


def load_verification_key(path: Path) -> VerificationKey:
    """A public key from a PEM file: a public key, or a (retired) private key file."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        return VerificationKey.of(_private_file(path).public_key())
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return VerificationKey.of(key)


# ---- key sets ---------------------------------------------------------------------------------------


class KeySource(Protocol):
    """Where a verifier finds an issuer's keys by ``kid``."""

    def get(self, kid: str) -> VerificationKey | None: ...

    def refresh(self) -> bool:
        """Fetch the keys again if that may help (a remote set); True if anything was fetched."""
        ...


class KeySet:
    """A fixed set of verification keys (a node's own, or a trusted issuer's key file)."""

    def __init__(self, keys: Iterable[VerificationKey]) -> None:
        self._keys = {k.kid: k for k in keys}

    def get(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)

    def refresh(self) -> bool:
        return False

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWK Set (RFC 7517 §5) served at ``/.well-known/jwks.json``."""
        return {"keys": [k.jwk() for k in self._keys.values()]}

    @classmethod
    def from_jwks(cls, data: Mapping[str, Any]) -> KeySet:
        """The Ed25519 signing keys of a JWK Set (others are ignored)."""
        found = []
        for jwk in data.get("keys", []):
            if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
                continue
            if jwk.get("use", "sig") != "sig" or not isinstance(jwk.get("x"), str):
                continue
            x = jwk["x"]
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            public = Ed25519PublicKey.from_public_bytes(raw)
            kid = jwk.get("kid")
            found.append(VerificationKey(kid if isinstance(kid, str) and kid else kid_of(public), public))
        return cls(found)


class RemoteKeySet:
    """A trusted issuer's JWKS fetched from its URL, cached; fetched again for an unknown ``kid``
    (its key was rotated) at most once per ``min_interval`` seconds, so random kids cannot make us
    hammer the issuer."""

    def __init__(
        self,
        url: str,
        *,
        min_interval: float = 30,
        timeout: float = 10,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.min_interval = min_interval
        self._timeout = timeout
        self._transport = transport
        self._clock = clock
        self._keys = KeySet(())
        self._fetched_at: float | None = None
        self._lock = threading.Lock()

    def get(self, kid: str) -> VerificationKey | None:
        return self._keys.get(kid)

    def refresh(self) -> bool:
        with self._lock:
            now = self._clock()
            if self._fetched_at is not None and now - self._fetched_at < self.min_interval:
                return False
            self._fetched_at = now
            try:
                with httpx.Client(timeout=self._timeout, transport=self._transport) as http:
                    response = http.get(self.url, headers={"Accept": "application/json"})
                response.raise_for_status()
                self._keys = KeySet.from_jwks(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("JWKS %s: %s", self.url, exc)
                return False
            return True


# ---- issuing and verifying ------------------------------------------------------------------------


@dataclass(frozen=True)
class Claims:
    """A verified token's claims."""

    issuer: str
    subject: str
    client_id: str
    audience: tuple[str, ...]
    scopes: frozenset[str]
    issued_at: float
    expires_at: float
    token_id: str
    # a user's token (issue 6 §2): role, institution and login session (``sid``); "" for clients
    role: str = ""
    institution: str = ""
    session_id: str = ""


#: The claims that make a token a user's (users.py, sessions.py); a client's token has none.
USER_CLAIMS = ("role", "institution", "sid")


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    scopes: frozenset[str]


class SigningKeyRing(Protocol):
    """Keys that change without a restart (``managed.ManagedTokenKeys``): the one to sign with now,
    and the ones that verify (a :class:`KeySource` with ``jwks``)."""

    def current(self) -> SigningKey: ...

    def get(self, kid: str) -> VerificationKey | None: ...

    def refresh(self) -> bool: ...

    def jwks(self) -> dict[str, list[dict[str, str]]]: ...


def encode_jws(payload: Mapping[str, Any], key: SigningKey, headers: Mapping[str, str]) -> str:
    """A compact JWS (RFC 7515) signed EdDSA (RFC 8037) by ``key``: only ``key.key.sign`` is used,
    so a KMS or HSM key signs as well as a key in memory."""
    header = {"alg": ALGORITHM, **headers, "kid": key.kid}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        for part in (header, payload)
    )
    return f"{signing_input}.{_b64url(key.key.sign(signing_input.encode('ascii')))}"


class TokenIssuer:
    """Signs this node's access tokens with its current key; publishes current + previous keys
    (``key``: a fixed key from a file, or a :class:`SigningKeyRing` in the KMS)."""

    def __init__(
        self,
        issuer: str,
        key: SigningKey | SigningKeyRing,
        previous: Sequence[VerificationKey] = (),
        *,
        lifetime: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.lifetime = lifetime
        self._clock = clock
        self.keys: KeySet | SigningKeyRing
        if isinstance(key, SigningKey):
            self._fixed: SigningKey | None = key
            self.keys = KeySet([key.public, *(p for p in previous if p.kid != key.kid)])
        else:
            self._fixed = None
            self.keys = key

    @property
    def key(self) -> SigningKey:
        """The key tokens are signed with now."""
        if self._fixed is not None:
            return self._fixed
        assert not isinstance(self.keys, KeySet)
        return self.keys.current()

    def issue(
        self,
        subject: str,
        scopes: Iterable[str],
        *,
        audience: str | None = None,
        lifetime: int | None = None,
        now: float | None = None,
        claims: Mapping[str, str] | None = None,
    ) -> IssuedToken:
        """A signed token for ``subject`` (a client id) with ``scopes``, for ``audience`` (this node
        by default); ``claims``: the :data:`USER_CLAIMS` of a user's token."""
        granted = frozenset(scopes)
        issued = int(self._clock() if now is None else now)
        ttl = self.lifetime if lifetime is None else lifetime
        payload = {
            "iss": self.issuer,
            "sub": subject,
            "client_id": subject,
            "aud": audience or self.issuer,
            "scope": format_scopes(granted),
            "iat": issued,
            "exp": issued + ttl,
            "jti": secrets.token_urlsafe(16),
        }
        for name, value in (claims or {}).items():
            if name not in USER_CLAIMS:
                raise ValueError(f"claim {name!r}: only {', '.join(USER_CLAIMS)} may be added")
            payload[name] = value
        token = encode_jws(payload, self.key, {"typ": TOKEN_TYPE})
        return IssuedToken(token, ttl, granted)


class TokenVerifier:
    """Checks a token: form, type, algorithm, trusted issuer, known ``kid``, signature, expiry,
    audience (this node) and the required claims. Raises :class:`TokenError` otherwise."""

    def __init__(
        self,
        audience: str,
        issuers: Mapping[str, KeySource],
        *,
        leeway: float = DEFAULT_LEEWAY,
    ) -> None:
        self.audience = audience
        self.issuers = dict(issuers)
        self.leeway = leeway

    def verify(self, token: str) -> Claims:
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenError("token too long")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenError("malformed token") from None
        if header.get("alg") != ALGORITHM:
            raise TokenError("unsupported token algorithm")
        if header.get("typ") != TOKEN_TYPE:
            raise TokenError("not an access token")
        kid, issuer = header.get("kid"), unverified.get("iss")
        if not isinstance(kid, str) or not kid:
            raise TokenError("token has no key id")
        if not isinstance(issuer, str) or issuer not in self.issuers:
            raise TokenError("token issuer is not trusted")
        source = self.issuers[issuer]
        key = source.get(kid)
        if key is None:
            raise UnknownKey("token signed with an unknown key", source)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti", "scope"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token is for another audience") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        scope, subject = claims["scope"], claims["sub"]
        if not isinstance(scope, str) or not isinstance(subject, str) or not subject:
            raise TokenError("invalid token: sub and scope must be strings")
        try:
            scopes = parse_scopes(scope)
        except ValueError:
            raise TokenError("invalid token: malformed scope") from None
        aud = claims["aud"]
        client_id = claims.get("client_id", subject)
        return Claims(
            issuer=issuer,
            subject=subject,
            client_id=client_id if isinstance(client_id, str) else subject,
            audience=(aud,) if isinstance(aud, str) else tuple(aud),
            scopes=scopes,
            issued_at=float(claims["iat"]),
            expires_at=float(claims["exp"]),
            token_id=str(claims["jti"]),
            role=_text(claims.get("role")),
            institution=_text(claims.get("institution")),
            session_id=_text(claims.get("sid")),
        )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""

"""How this node proves who it is to a peer: OAuth 2.0 client credentials (issue 6 §1, R-SE-16).

:class:`ClientCredentials` is an ``httpx.Auth``: it obtains a token from the peer's token endpoint
(HTTP Basic client authentication, RFC 6749 §2.3.1), caches it, refreshes it before it expires and,
when the peer still answers 401 (its key was rotated, it restarted), fetches a new one and sends the
request once more. Bodies must be replayable for that retry (bytes, or an iterable that can be
iterated again — ``DicomWebClient`` streams STOW bodies that way). Used by the synchronous
``httpx.Client`` only (the forwarder's threads).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class TokenRequestFailed(httpx.HTTPError):
    """The token endpoint refused us or answered nonsense (an ``httpx.HTTPError``: callers that
    report a peer as unavailable report this too, with the endpoint's reason)."""


def read_secret(path: Path) -> str:
    """A client secret file (one line); refuse one others can read."""
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path}: client secret is readable by others (chmod 600)")
    secret = path.read_text(encoding="utf-8").strip()
    if not secret:
        raise ValueError(f"{path}: empty client secret")
    return secret


def write_secret(path: Path, secret: str) -> None:
    """Write a client secret file readable by its owner only (never overwriting one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")


class ClientCredentials(httpx.Auth):
    """Bearer tokens for one client at one token endpoint, fetched and refreshed as needed."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | None = None,
        timeout: float = 30,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """``verify``: how the token endpoint's certificate is checked (issue 6 §6: the center's CA)."""
        self.token_url = token_url
        self._verify = verify
        self.client_id = client_id
        self.scope = scope
        self._secret = client_secret
        self._timeout = timeout
        self._transport = transport
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def __repr__(self) -> str:  # never the secret
        return f"ClientCredentials({self.token_url!r}, {self.client_id!r})"

    def token(self) -> str:
        """A token valid for a while yet (fetched when none is cached or it is near its end)."""
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                self._token, lifetime = self._fetch()
                # refresh with a fifth of the lifetime left (at least 10 s): never send a stale one
                self._refresh_at = self._clock() + max(lifetime - max(lifetime / 5, 10), 0)
            return self._token

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the peer refused it); a concurrent refresh is kept."""
        with self._lock:
            if self._token == token:
                self._token = None

    def _fetch(self) -> tuple[str, float]:
        data = {"grant_type": "client_credentials", **({"scope": self.scope} if self.scope else {})}
        with httpx.Client(timeout=self._timeout, transport=self._transport, verify=self._verify) as http:
            response = http.post(
                self.token_url, data=data, auth=httpx.BasicAuth(self.client_id, self._secret)
            )
        try:
            answer = response.json()
        except ValueError:
            answer = None
        body: dict[str, object] = answer if isinstance(answer, dict) else {}
        if response.status_code != 200:
            reason = f"{body.get('error', '')} {body.get('error_description', '')}".strip()
            raise TokenRequestFailed(
                f"token endpoint {self.token_url} answered {response.status_code} {reason}"
            )
        token, lifetime = body.get("access_token"), body.get("expires_in")
        bearer = body.get("token_type") == "Bearer"
        if not isinstance(token, str) or not isinstance(lifetime, int | float) or not bearer:
            raise TokenRequestFailed(f"token endpoint {self.token_url}: not a bearer token answer")
        log.debug("token for %s from %s, %ds", self.client_id, self.token_url, lifetime)
        return token, float(lifetime)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            self.invalidate(token)
            request.headers["Authorization"] = f"Bearer {self.token()}"
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        raise NotImplementedError("ClientCredentials fetches tokens synchronously: use httpx.Client")
        yield request  # pragma: no cover  (makes this an async generator)

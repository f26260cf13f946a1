"""Abuse control: token buckets and concurrency caps, answered with 429 + Retry-After (R-SE-16,
issue 6 §7).

Four limits, each from ``[security.limits]`` (``docs/config.md``):

* **per address** — every request from one network address takes a token from that address's
  bucket (``per_address_rate`` per second, up to ``per_address_burst`` saved up), checked by the
  :class:`RateLimit` middleware before anything else, so floods without credentials are cut too;
* **per client** — every authenticated request takes one from its caller's bucket (a node client
  by client id, a user by user name), checked by the guard right after authentication
  (:meth:`RateLimiter.client`): many callers behind one NAT are not one caller;
* **credential endpoints** — ``POST /auth/login`` and ``POST /oauth/token`` have their own, much
  smaller per-address buckets (per minute); :func:`credential_route` registers another endpoint
  that takes a secret (the share-link password of issue 7 will) under one of those kinds;
* **concurrency** — at most ``max_concurrent[action]`` requests of one action (the name the
  guard's RULES give a route: ``stow``, ``wado``, ``qido`` …; ``default`` for the rest) run at once
  on this node; one more is refused at once rather than queued.

Refusals are ``429 Too Many Requests`` with ``Retry-After`` (whole seconds, at least 1) and a JSON
body. State is per process and bounded (least recently used keys are dropped beyond
:data:`MAX_KEYS`); with several processes behind a balancer each enforces its share.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.security.guard import required_scope, route_path

if TYPE_CHECKING:
    from gateway.config import LimitsSection

MAX_KEYS = 100_000
Clock = Callable[[], float]

#: Endpoints that take a secret, by kind (``login`` or ``token`` limits apply).
CREDENTIAL_ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/auth/login"): "login",
    ("POST", "/oauth/token"): "token",
}


def credential_route(method: str, path: str, kind: str = "login") -> None:
    """Put another secret-taking endpoint (e.g. a share-link password) under the ``kind`` limits."""
    if kind not in ("login", "token"):
        raise ValueError(f"kind {kind!r}: login or token")
    CREDENTIAL_ROUTES[(method.upper(), path)] = kind


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there will be."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate > 0 else math.inf


class Buckets:
    """One bucket per key (address, client), least recently used dropped beyond ``max_keys``."""

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic, max_keys: int = MAX_KEYS):
        self.rate, self.burst = rate, float(burst)
        self._clock = clock
        self._max = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
                if len(self._buckets) > self._max:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            return bucket.take(now)


class Gate:
    """Concurrency caps by action."""

    def __init__(self, caps: dict[str, int]) -> None:
        self.caps = caps
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def cap(self, action: str) -> int:
        return self.caps.get(action, self.caps.get("default", 0))

    def enter(self, action: str) -> bool:
        cap = self.cap(action)
        with self._lock:
            n = self._running.get(action, 0)
            if cap and n >= cap:
                return False
            self._running[action] = n + 1
            return True

    def leave(self, action: str) -> None:
        with self._lock:
            self._running[action] -= 1

    def running(self, action: str) -> int:
        return self._running.get(action, 0)


class RateLimiter:
    """The limits of one node (see the module docstring)."""

    def __init__(self, cfg: LimitsSection, *, clock: Clock = time.monotonic) -> None:
        self.enabled = cfg.enabled
        self.address = Buckets(cfg.per_address_rate, cfg.per_address_burst, clock=clock)
        self.clients = Buckets(cfg.per_client_rate, cfg.per_client_burst, clock=clock)
        self.credentials = {
            "login": Buckets(cfg.login_per_minute / 60, cfg.login_burst, clock=clock),
            "token": Buckets(cfg.token_per_minute / 60, cfg.token_burst, clock=clock),
        }
        self.gate = Gate(dict(cfg.max_concurrent))

    def client(self, key: str) -> float:
        """Seconds to wait before ``key`` (a client id or ``user:NAME``) may call again; 0: go."""
        return self.clients.take(key) if self.enabled else 0.0


def retry_after(wait: float) -> int:
    return max(1, math.ceil(min(wait, 86400.0)))


async def too_many(send: Send, wait: float, why: str) -> None:
    """A 429 answer with Retry-After (RFC 6585 §4, RFC 9110 §10.2.3)."""
    seconds = retry_after(wait)
    body = json.dumps(
        {"error": "too_many_requests", "error_description": why, "retry_after": seconds}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(seconds).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class RateLimit:
    """ASGI middleware (outside the guard): per-address and credential buckets, concurrency caps."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limiter.enabled:
            await self.app(scope, receive, send)
            return
        address = client_address(scope)
        wait = self.limiter.address.take(address)
        if wait:
            await too_many(send, wait, "too many requests from this address")
            return
        method, path = scope["method"], route_path(scope)
        kind = CREDENTIAL_ROUTES.get((method, path))
        if kind is not None:
            wait = self.limiter.credentials[kind].take(address)
            if wait:
                await too_many(send, wait, f"too many {kind} attempts from this address")
                return
        action = kind or required_scope(method, path) or "default"
        gate = self.limiter.gate
        if not gate.enter(action):
            await too_many(send, 1.0, f"too many {action} requests running at once")
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave(action)

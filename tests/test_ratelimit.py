"""Abuse control (issue 6 §7, R-SE-16): token buckets per address, per client and on the credential
endpoints, concurrency caps per action; 429 with Retry-After. Real uvicorn servers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.center import Center
from gateway.config import LimitsSection
from gateway.frontend import Frontend
from gateway.security.ratelimit import (
    CREDENTIAL_ROUTES,
    Buckets,
    Gate,
    RateLimit,
    RateLimiter,
    credential_route,
)
from tests.conftest import auth, fetch_token, node_url, register_client
from tests.peers.http import serve


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    buckets = Buckets(rate=0.5, burst=3, clock=clock)  # one every 2 s, 3 saved up
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(2.0)
    assert buckets.take("b") == 0.0  # per key
    clock.now += 1
    assert buckets.take("a") == pytest.approx(1.0)
    clock.now += 1
    assert buckets.take("a") == 0.0
    clock.now += 100
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, not beyond
    small = Buckets(rate=1, burst=1, clock=clock, max_keys=2)
    for key in "xyz":
        small.take(key)
    assert len(small._buckets) == 2  # bounded: the least recently used key is dropped


def test_concurrency_caps_by_action() -> None:
    gate = Gate({"stow": 2, "default": 1})
    assert gate.enter("stow") and gate.enter("stow") and not gate.enter("stow")
    gate.leave("stow")
    assert gate.enter("stow")
    assert gate.enter("metrics") and not gate.enter("metrics")  # the default cap
    assert Gate({"qido": 0}).enter("qido")  # 0: no cap


def test_credential_routes_are_listed_and_a_share_password_route_can_join() -> None:
    assert CREDENTIAL_ROUTES[("POST", "/auth/login")] == "login"
    assert CREDENTIAL_ROUTES[("POST", "/oauth/token")] == "token"
    credential_route("POST", "/share/x/unlock")
    try:
        assert CREDENTIAL_ROUTES[("POST", "/share/x/unlock")] == "login"
    finally:
        del CREDENTIAL_ROUTES[("POST", "/share/x/unlock")]
    with pytest.raises(ValueError):
        credential_route("POST", "/x", "other")


def test_login_and_token_endpoints_have_their_own_small_buckets(
    start_frontend: Callable[..., Frontend],
) -> None:
    fe = start_frontend(
        security={
            "limits": {"login_burst": 2, "login_per_minute": 1, "token_burst": 2, "token_per_minute": 2}
        }
    )
    url = node_url(fe)
    guesses = [
        httpx.post(f"{url}/auth/login", json={"username": "x", "password": f"Guess-{n}-abc"}, timeout=30)
        for n in range(3)
    ]
    assert [r.status_code for r in guesses] == [401, 401, 429]
    assert 55 <= int(guesses[-1].headers["retry-after"]) <= 60
    assert guesses[-1].json()["error"] == "too_many_requests"
    client_id, secret = register_client(fe, "burst", "qido")
    answers = [fetch_token(fe, client_id, secret) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert 25 <= int(answers[-1].headers["retry-after"]) <= 30
    # other routes are not held back by those buckets
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


def test_each_client_has_its_own_bucket(start_center: Callable[..., Center]) -> None:
    center = start_center(security={"limits": {"per_client_burst": 3, "per_client_rate": 0.5}})
    url = f"{node_url(center)}/dicom-web/studies"
    first = auth(center, "qido")
    codes = [httpx.get(url, headers=first, timeout=10).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = httpx.get(url, headers=first, timeout=10)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 2
    # another client from the same address is not slowed by the first
    assert httpx.get(url, headers=auth(center, "qido wado"), timeout=10).status_code == 200


def test_one_address_is_cut_off_before_authentication(start_center: Callable[..., Center]) -> None:
    center = start_center(security={"limits": {"per_address_burst": 5, "per_address_rate": 0.2}})
    codes = [httpx.get(f"{node_url(center)}/dicom-web/studies", timeout=10).status_code for _ in range(6)]
    assert codes == [401] * 5 + [429]
    r = httpx.get(f"{node_url(center)}/healthz", timeout=10)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 5


def test_a_route_over_its_concurrency_cap_gets_429_at_once() -> None:
    release = threading.Event()

    async def slow(request: Request) -> JSONResponse:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return JSONResponse({"ok": True})

    limiter = RateLimiter(LimitsSection(max_concurrent={"wado": 1, "default": 8}))
    app = Starlette(routes=[Route("/dicom-web/studies/{study}", slow), Route("/other", slow)])
    app.add_middleware(RateLimit, limiter=limiter)
    with serve(app) as base:
        results: list[int] = []
        first = threading.Thread(
            target=lambda: results.append(httpx.get(f"{base}/dicom-web/studies/1.2", timeout=30).status_code)
        )
        first.start()
        deadline = time.monotonic() + 10
        while limiter.gate.running("wado") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = httpx.get(f"{base}/dicom-web/studies/1.3", timeout=30)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        release.set()
        first.join(10)
        assert results == [200]
        assert limiter.gate.running("wado") == 0  # released after the response
        assert httpx.get(f"{base}/dicom-web/studies/1.3", timeout=30).status_code == 200

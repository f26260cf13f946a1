"""Talking to the other nodes of the federation (issue 5): the national index and other
provinces' centers, through the one HTTP client (``dicomweb.client.DicomWebClient.call_json``).

The domain modules (registration, cache jobs, the doctor's history) take a :class:`JsonPeer` and
never an HTTP library: the role wiring (``gateway/center.py``, ``gateway/frontend.py``) hands them
a client authenticated with the node's client credentials at that peer (issue 6 §1).
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.forwarder import CenterUnavailable


class JsonPeer(Protocol):
    def call_json(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> tuple[int, Any]: ...


class PeerError(Exception):
    """A peer could not be reached or refused; the message says which and why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PeerNotConfigured(PeerError):
    """No such peer is configured on this node (e.g. a front-end without ``[forward] center_url``):
    the service is unavailable here — the routes answer 503 with this reason, not 502 (a peer
    that failed)."""


NO_CENTER = "this front-end has no center configured ([forward] center_url)"


def call(
    peer: JsonPeer,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: Any = None,
    ok: tuple[int, ...] = (200, 201),
) -> Any:
    """The decoded body of a call answered with one of ``ok``; :class:`PeerError` otherwise."""
    try:
        status, answer = peer.call_json(method, path, params=params, body=body)
    except CenterUnavailable as exc:
        raise PeerError(f"{method} {path}: unreachable ({exc})") from exc
    if status not in ok:
        reason = answer.get("error") if isinstance(answer, dict) else None
        raise PeerError(f"{method} {path} answered {status}: {reason or answer}", status)
    return answer


def lookup(peer: JsonPeer, params: dict[str, str]) -> list[dict[str, Any]]:
    """``GET /api/v1/index-records`` at the index (or a center that forwards it there)."""
    answer = call(peer, "GET", "/api/v1/index-records", params=params)
    if not isinstance(answer, list):
        raise PeerError("GET /api/v1/index-records: the answer is not a list")
    return answer

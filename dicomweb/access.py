"""What the guard decided about the caller, as the DICOMweb routes apply it (issue 6 §3, R-SE-3).

The guard (``gateway/security/guard.py``) authorizes every request and, for a user, leaves the
condition on studies that user may see in ``request.state.study_filter`` (QIDO-RS adds it to its
one SQL statement) and the user's role in ``request.state.principal`` (search results and metadata
are masked by the sensitivity labels for that role, ``gateway/security/sensitivity.py``). Node
clients get neither: no filter, no masking.
"""

from __future__ import annotations

import json
from typing import Any, AnyStr

from sqlalchemy import ColumnElement
from starlette.requests import Request

from gateway.security.sensitivity import redact


def study_filter(request: Request) -> ColumnElement[bool] | None:
    state: dict[str, Any] = request.scope.get("state") or {}
    condition: ColumnElement[bool] | None = state.get("study_filter")
    return condition


def _user_role(request: Request) -> str | None:
    principal = (request.scope.get("state") or {}).get("principal")
    if principal is None or getattr(principal, "kind", "") != "user":
        return None
    return str(principal.role)


def redacted(request: Request, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DICOM JSON data sets as the caller may see them (unchanged for node clients)."""
    role = _user_role(request)
    return docs if role is None else [redact(d, role) for d in docs]


def redacted_json(request: Request, docs: list[AnyStr]) -> list[AnyStr]:
    """The same for data sets kept as JSON text or UTF-8 bytes (WADO-RS metadata from the catalog);
    each comes back in the form it came in."""
    role = _user_role(request)
    if role is None:
        return docs
    out: list[Any] = []
    for doc in docs:
        text = json.dumps(redact(json.loads(doc), role), ensure_ascii=False, separators=(",", ":"))
        out.append(text.encode("utf-8") if isinstance(doc, bytes) else text)
    return out

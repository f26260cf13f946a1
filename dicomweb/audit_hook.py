"""The one audit hook of the HTTP side (R-SE-4, issue 6 §4): an outermost ASGI middleware.

After each response it records, for every DICOMweb request (``/dicom-web/…``), an ``upload``
(STOW-RS), ``query`` (QIDO-RS) or ``retrieval`` (WADO-RS) with the method, path, query string and
status; and for any route, a 401/403 answer as ``access-denied``. The actor is
``request.state.principal`` when the authentication layer set one (read after the inner app ran,
so the guard may sit inside this middleware), else ``anonymous``; the source is the peer address.
Records are queued (:meth:`gateway.audit.AuditLog.submit`): the response never waits for the
audit write. The log is ``app.state.audit``; without one the hook does nothing.

Instances stored by STOW-RS are also recorded one by one by ingest (with the study and SOP UIDs).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.audit import AuditLog, EventType, Result, principal_actor

log = logging.getLogger(__name__)

DICOMWEB_ROOT = "/dicom-web"
_COLLECTIONS = ("/studies", "/series", "/instances")


def classify(method: str, path: str, status: int) -> EventType | None:
    """The event a request is, or None if it is not audited here."""
    if status in (401, 403):
        return EventType.ACCESS_DENIED
    if not (path == DICOMWEB_ROOT or path.startswith(DICOMWEB_ROOT + "/")):
        return None
    if method == "POST":
        return EventType.UPLOAD
    if method in ("GET", "HEAD"):
        return EventType.QUERY if path.rstrip("/").endswith(_COLLECTIONS) else EventType.RETRIEVAL
    return EventType.ACCESS_DENIED if status == 405 else None


#: Per-instance reads a viewer makes by the hundred: frames, rendered images, thumbnails, bulk data.
_GROUPED_KINDS = ("frames", "rendered", "thumbnail", "bulkdata")


def _grouped_read(event: EventType, status: int, path: str, params: Any) -> tuple[str, str] | None:
    """For a successful per-instance read of :data:`_GROUPED_KINDS`: the series-level resource its
    record is grouped under and the item (instance, and frame list) it adds; else None. Failures
    are never grouped: each refused or failed read keeps its own record."""
    if event is not EventType.RETRIEVAL or status >= 400 or not params.get("sop"):
        return None
    segments = path.rstrip("/").split("/")
    kind = next((k for k in _GROUPED_KINDS if k in segments[-2:]), None)
    if kind is None or not params.get("study") or not params.get("series"):
        return None
    cut = path.index("/studies/")
    resource = f"{path[:cut]}/studies/{params['study']}/series/{params['series']}/instances/*/{kind}"
    item = str(params["sop"]) + (f"/frames/{params['frames']}" if params.get("frames") else "")
    return resource, item


class AuditHook:
    """ASGI middleware recording DICOMweb requests and denied requests in the audit trail."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # one state dict shared with the inner layers (principal)
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            try:
                self._record(scope, status)
            except Exception:  # auditing must not turn a served request into an error
                log.exception("audit hook failed")

    @staticmethod
    def _record(scope: Scope, status: int) -> None:
        app = scope.get("app")
        audit: AuditLog | None = getattr(getattr(app, "state", None), "audit", None)
        if audit is None:
            return
        method, path = str(scope.get("method", "")), str(scope.get("path", ""))
        event = classify(method, path, status)
        if event is None:
            return
        client = scope.get("client")
        principal: Any = (scope.get("state") or {}).get("principal")
        who = principal_actor(principal, str(client[0]) if client else "unknown")
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        params = scope.get("path_params") or {}
        detail: dict[str, Any] = {"method": method, "status": status}
        if query:
            detail["query"] = query
        for key, name in (
            ("study", "study_instance_uid"),
            ("series", "series_instance_uid"),
            ("sop", "sop_instance_uid"),
        ):
            if params.get(key):
                detail[name] = str(params[key])
        grouped = _grouped_read(event, status, path, params)
        if grouped is not None:  # one record per transfer, not per frame (R-SE-4)
            resource, item = grouped
            audit.submit_grouped(
                who,
                event,
                resource=resource,
                result=Result.SUCCESS,
                item=f"{item}?{query}" if query else item,
                detail=detail,
            )
            return
        audit.submit(
            who,
            event,
            resource=f"{path}?{query}" if query else path,
            result=Result.SUCCESS if status < 400 else Result.FAILURE,
            detail=detail,
        )


async def record_request(
    request: Any,
    event: EventType,
    *,
    resource: str,
    result: Result = Result.SUCCESS,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record an event of a route (e.g. an exam record received) as the request's principal, durably
    (own transaction, in a worker thread); nothing if the app has no audit log."""
    from starlette.concurrency import run_in_threadpool

    audit: AuditLog | None = getattr(request.app.state, "audit", None)
    if audit is None:
        return
    client = request.client.host if request.client else "unknown"
    who = principal_actor(getattr(request.state, "principal", None), client)
    await run_in_threadpool(audit.record_as, who, event, resource=resource, result=result, detail=detail)

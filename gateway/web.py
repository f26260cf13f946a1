"""The HTTP side of a role: one Starlette app (DICOMweb + /api/v1 + /metrics) served by uvicorn.

This is composition (like ``frontend.py`` wiring the DIMSE server): it mounts the edges' routes
and hands them the domain objects through ``app.state``. Every app is wrapped in the one
:class:`~gateway.security.guard.Guard` (issue 6 §3, R-SE-16): no route, present or added later, is
reachable without a token carrying the scope the guard's table names for it, except the public
health and token routes.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route

from api.auth import routes as auth_routes
from api.send import routes as send_routes
from api.viewer import routes as viewer_routes
from dicomweb.app import DicomWebContext
from dicomweb.app import routes as dicomweb_routes
from dicomweb.audit_hook import AuditHook
from gateway.archive import Archive
from gateway.config import TlsSection
from gateway.ingest import Ingest
from gateway.security.guard import Guard
from gateway.security.node import NodeSecurity
from gateway.security.ratelimit import RateLimit

log = logging.getLogger(__name__)


async def _health(request: Request) -> JSONResponse:
    """Liveness and role; ``ingest_helpers`` says whether the ingest helper processes are
    ``ready``, ``starting`` or ``none`` (off, or not yet needed) — e.g. for a benchmark to wait on."""
    helpers = request.app.state.dicomweb.ingest.helpers
    state = "none" if helpers is None or not helpers.started else "ready" if helpers.ready else "starting"
    return JSONResponse({"status": "ok", "role": request.app.state.role, "ingest_helpers": state})


def build_app(
    role: str,
    archive: Archive,
    ingest: Ingest,
    *,
    max_request_bytes: int,
    spool: str,
    api_routes: list[BaseRoute],
    security: NodeSecurity,
    extra_routes: list[BaseRoute] | None = None,
    state: dict[str, Any] | None = None,
) -> Starlette:
    app = Starlette(
        routes=[
            Mount("/dicom-web", routes=dicomweb_routes()),
            Mount("/api/v1", routes=[*api_routes, *send_routes]),  # + the viewer's one-click send
            Route("/healthz", _health),
            *security.routes(),
            Mount("/auth", routes=auth_routes),  # users' login, logout, whoami, token (issue 6 §2)
            *viewer_routes(),  # static, public: the viewer (issue 7); its data comes via /dicom-web
            *(extra_routes or []),
        ],
        middleware=[
            # per-address and credential buckets, concurrency caps before the guard (issue 6 §7)
            *([Middleware(RateLimit, limiter=security.limiter)] if security.limiter is not None else []),
            Middleware(Guard, security=security),
        ],
    )
    app.state.role = role
    app.state.security = security
    app.state.archive = archive
    app.state.dicomweb = DicomWebContext(archive, ingest, max_request_bytes=max_request_bytes, spool=spool)
    for key, value in (state or {}).items():
        setattr(app.state, key, value)
    # outermost, so it also sees the guard's 401/403; records into state["audit"] if given (R-SE-4)
    app.add_middleware(AuditHook)
    return app


class HttpServer:
    """uvicorn in a background thread (one worker; scale out with more processes behind a balancer)."""

    def __init__(self, app: Starlette, host: str, port: int, *, tls: TlsSection | None = None) -> None:
        """``tls``: serve HTTPS (issue 6 §6, R-SE-5), asking for a client certificate for mutual TLS."""
        options: dict[str, Any] = {}
        if tls is not None:
            options = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
            if tls.ca_file is not None:
                options["ssl_ca_certs"] = str(tls.ca_file)
                options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
        self.scheme = "https" if tls is not None else "http"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host=host, port=port, log_level="warning", lifespan="off", access_log=False, **options
            )
        )
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def start(self, timeout: float = 15) -> int:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(
                    f"HTTP server did not start on {self.server.config.host}:{self.server.config.port}"
                )
            time.sleep(0.02)
        port = int(self.server.servers[0].sockets[0].getsockname()[1])
        log.info("HTTP listening on %s:%d", self.server.config.host, port)
        return port

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)

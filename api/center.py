"""The center's ``/api/v1`` routes: per-study inventory for reconciliation (issue 3 §7, R-CE-9)."""

from __future__ import annotations

import hashlib

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.archive import Archive
from gateway.archive.blobstore import BlobNotFound


def _inventory(archive: Archive, study: str, verify: bool) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for inst in archive.catalog.locate({"StudyInstanceUID": study}):
        sha, size = inst.sha256, inst.size
        if verify:
            # Hash what is really stored: a corrupted or lost blob must show up as a difference.
            digest, size = hashlib.sha256(), 0
            try:
                for chunk in archive.store.get(inst.blob_key):
                    digest.update(chunk)
                    size += len(chunk)
                sha = digest.hexdigest()
            except BlobNotFound:
                sha, size = "missing", 0
        out[inst.sop_uid] = {"sha256": sha, "size": size}
    return out


async def inventory(request: Request) -> JSONResponse:
    """``GET /api/v1/studies/{study}/inventory[?verify=true]``: SOP Instance UID → SHA-256, size."""
    archive: Archive = request.app.state.archive
    study = request.path_params["study"]
    verify = request.query_params.get("verify", "false").lower() in ("1", "true", "yes")
    items = await run_in_threadpool(_inventory, archive, study, verify)
    if not items:
        return JSONResponse({"error": f"study {study} is not held here"}, status_code=404)
    return JSONResponse({"study": study, "verified": verify, "instances": items})


routes = [Route("/studies/{study}/inventory", inventory, methods=["GET"])]

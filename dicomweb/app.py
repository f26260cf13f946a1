"""The DICOMweb edge: one Starlette app per archive, mounted at ``/dicom-web``.

Routes are plain functions in ``stow.py``, ``qido.py`` and ``wado.py``; they reach the archive
through ``request.app.state.dicomweb`` (a :class:`DicomWebContext`). The edge translates HTTP to
domain calls and domain results to PS3.18 responses; it knows nothing of provinces or patients.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.routing import Mount, Route

from gateway.archive import Archive
from gateway.ingest import Ingest


@dataclass(frozen=True)
class DicomWebContext:
    """What the DICOMweb routes need: the archive, its ingest, and limits from config."""

    archive: Archive
    ingest: Ingest
    max_request_bytes: int = 2 << 30  # STOW-RS body limit -> 413
    spool: str | None = None  # where STOW parts are written before ingest (default: ingest's)


def context(request: Request) -> DicomWebContext:
    ctx: DicomWebContext = request.app.state.dicomweb
    return ctx


def routes() -> list[Route | Mount]:
    """The PS3.18 resources (relative to the DICOMweb root)."""
    from dicomweb import qido, stow, wado

    s = "/studies/{study}"
    se = f"{s}/series/{{series}}"
    i = f"{se}/instances/{{sop}}"
    return [
        # STOW-RS
        Route("/studies", stow.store, methods=["POST"]),
        Route(s, stow.store, methods=["POST"]),
        # QIDO-RS
        Route("/studies", qido.search_studies, methods=["GET"]),
        Route(f"{s}/series", qido.search_series, methods=["GET"]),
        Route("/series", qido.search_series, methods=["GET"]),
        Route(f"{s}/instances", qido.search_instances, methods=["GET"]),
        Route(f"{se}/instances", qido.search_instances, methods=["GET"]),
        Route("/instances", qido.search_instances, methods=["GET"]),
        # WADO-RS
        Route(s, wado.retrieve, methods=["GET"]),
        Route(se, wado.retrieve, methods=["GET"]),
        Route(i, wado.retrieve, methods=["GET"]),
        Route(f"{s}/metadata", wado.metadata, methods=["GET"]),
        Route(f"{se}/metadata", wado.metadata, methods=["GET"]),
        Route(f"{i}/metadata", wado.metadata, methods=["GET"]),
        Route(f"{i}/frames/{{frames}}", wado.frames, methods=["GET"]),
        Route(f"{i}/bulk/{{tag}}", wado.bulk, methods=["GET"]),
        Route(f"{s}/rendered", wado.rendered, methods=["GET"]),
        Route(f"{se}/rendered", wado.rendered, methods=["GET"]),
        Route(f"{i}/rendered", wado.rendered, methods=["GET"]),
        Route(f"{i}/frames/{{frames}}/rendered", wado.rendered, methods=["GET"]),
        Route(f"{s}/thumbnail", wado.thumbnail, methods=["GET"]),
        Route(f"{se}/thumbnail", wado.thumbnail, methods=["GET"]),
        Route(f"{i}/thumbnail", wado.thumbnail, methods=["GET"]),
        Route(f"{i}/frames/{{frames}}/thumbnail", wado.thumbnail, methods=["GET"]),
    ]

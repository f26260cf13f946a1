"""STOW-RS: ``POST /studies`` and ``POST /studies/{study}`` (PS3.18 §10.5; issue 3 §2).

The request body is ``multipart/related; type="application/dicom"``, one Part-10 instance a
part. It is read as a stream (:func:`dicomweb.multipart.spool_parts`): each part goes to a file in
the spool folder as it arrives, never into memory. Only when the whole body has arrived and parsed
are the parts handed, one by one in a worker thread, to :meth:`gateway.ingest.Ingest.accept_file`
(the same domain entry point as C-STORE). So a request that is malformed (400), too large (413)
or cut off stores nothing, and the spool holds at most ``max_request_bytes`` per request.

Per part, before ingest:

* an optional ``Content-Digest`` (RFC 9530, ``sha-256=:<base64>:``; ``sha-512`` also understood)
  must match the part's bytes;
* with a study in the path, the instance's StudyInstanceUID (read from the header, pixel data
  skipped) must be that study (PS3.18 §10.5.1).

A part failing either check is not quarantined (the sender still holds the good bytes and is told
why); parts that ingest refuses are, as for C-STORE (issue 2 §6).

Response (PS3.18 §10.5.3 and Annex I), ``application/dicom+json``: Retrieve URL (0008,1190, Type 2)
of the study when the stored instances all belong to one, else empty; Referenced SOP Sequence
(0008,1199) with SOP Class/Instance UIDs, the instance's Retrieve URL and, if any, Warning Reason
(0008,1196); Failed SOP Sequence (0008,1198) with Failure Reason (0008,1197). Failures and
warnings are also explained in words, one ``Warning: 299 ybyx "part N (UID): reason"`` header each
(at most :data:`MAX_WARNING_HEADERS`), for people and logs; programs read the sequences.

Status codes (PS3.18 Table 10.5.3-1). What 202 means has drifted between editions, so clients
(ours included) should read the per-instance sequences, not only the code:

=====  ==================================================================================
200    every instance stored, no warnings (a duplicate — same UID, same bytes — is success)
202    some stored, some failed, or any stored with a warning
409    none stored (every part failed; the per-instance reasons say why)
400    the body is not valid multipart (no boundary, truncated, no closing delimiter, no parts)
413    the body is larger than ``max_request_bytes`` (Content-Length up front, or while read)
415    not ``multipart/related; type="application/dicom"`` (``type=application/dicom+json``,
       i.e. STOW of JSON metadata plus bulk data, PS3.18 §10.5.1, is not supported)
=====  ==================================================================================

Failure reasons (PS3.18 Annex I, Table I.2-2):

=======  ==========================================================================================
0xC000   Cannot understand: the part is not a readable Part-10 instance or lacks a required UID
         (ingest's ``malformed``, ``missing-attribute``, ``mismatch``)
0xA901   (43265; A9xx "Data Set does not match") its StudyInstanceUID is not the study in the
         request path. 43265 is the value other servers send for this (e.g. Microsoft's DICOM
         service); note it is 0xA901, not 0xA900 (which is 43264)
0x0110   Processing failure: the ``Content-Digest`` does not match the bytes received (corrupted in
         transit; the sender should send it again), or is not a valid RFC 9530 field
0xA700   Out of resources: the blob store or catalog could not take the instance (ingest's
         ``storage``; try again later)
=======  ==========================================================================================

Warning reason 0xB000 (Coercion of Data Elements, Table I.2-1) is given when the instance UID
was already held with other bytes and the archive keeps the earlier ones current (``on_conflict
= "keep-first"``, :attr:`~gateway.archive.catalog.AddOutcome.VERSION_KEPT`): a retrieve will not
return what was sent. A replacement under ``keep-newest`` (``REPLACED``) returns what was sent, so
it is plain success (ingest logs it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
from pydicom import dcmread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response

from dicomweb.app import DicomWebContext, context
from dicomweb.multipart import MultipartError, SpooledPart, check_boundary, parse_content_type, spool_parts
from gateway.archive.blobstore import CHUNK, FolderBlobStore
from gateway.archive.catalog import AddOutcome
from gateway.ingest import Accepted, Refused
from gateway.security.clients import institution_of
from gateway.security.transfer_keys import uploading_for

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"

# Failure Reason (0008,1197) and Warning Reason (0008,1196) values, PS3.18 Tables I.2-2 and I.2-1.
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
STUDY_UID_MISMATCH = 0xA901  # 43265: A9xx "Data Set does not match", for the path's study
CANNOT_UNDERSTAND = 0xC000
COERCION_OF_DATA_ELEMENTS = 0xB000

#: Failure reason per :attr:`gateway.ingest.Refused.kind`.
REFUSED_REASON: Mapping[str, int] = {
    "malformed": CANNOT_UNDERSTAND,
    "missing-attribute": CANNOT_UNDERSTAND,
    "mismatch": CANNOT_UNDERSTAND,
    "storage": OUT_OF_RESOURCES,
}
MAX_WARNING_HEADERS = 20


@dataclass(frozen=True)
class InstanceResult:
    """What became of one part: stored (``failure`` is None) or not."""

    part: int
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    failure: int | None = None
    warning: int | None = None
    reason: str = ""


class _TooLarge(Exception):
    pass


async def store(request: Request) -> Response:
    """Store the instances of a STOW-RS request (PS3.18 §10.5)."""
    ctx = context(request)
    study = request.path_params.get("study")
    received = request.headers.get("content-type", "")
    try:
        boundary = _boundary(received)
    except _Problem as problem:
        return problem.response()

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > ctx.max_request_bytes:
        return _too_large(ctx, f"Content-Length is {declared}")

    spool = await anyio.to_thread.run_sync(_spool_folder, ctx)
    parts: list[SpooledPart] = []
    try:
        try:
            body = _limited(request.stream(), ctx.max_request_bytes)
            async with aclosing(spool_parts(body, boundary, spool, write_batch=CHUNK)) as stream:
                async for part in stream:
                    parts.append(part)
        except MultipartError as exc:
            log.warning("STOW-RS from %s: malformed multipart body: %s", _client(request), exc)
            return PlainTextResponse(f"malformed multipart/related body: {exc}", status_code=400)
        except _TooLarge:
            return _too_large(ctx, "the body")
        except ClientDisconnect:
            log.warning("STOW-RS from %s: client went away mid-request; nothing stored", _client(request))
            return Response(status_code=400)  # nobody reads it
        if not parts:
            return PlainTextResponse("the multipart/related body has no parts", status_code=400)

        source = _source(request)
        principal = getattr(request.state, "principal", None)
        institution = await anyio.to_thread.run_sync(institution_of, ctx.ingest.catalog, principal)
        with uploading_for(institution):  # sealed under the institution's transfer key (R-CE-2)
            results = [
                await anyio.to_thread.run_sync(partial(_store_part, ctx, part, study, source))
                for part in parts
            ]
    finally:
        await anyio.to_thread.run_sync(_remove, [p.path for p in parts])
    return _response(results, _dicomweb_root(request))


# ---------------------------------------------------------------------------- the request


class _Problem(Exception):
    """The request as a whole cannot be processed: an HTTP status and a message saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> Response:
        return PlainTextResponse(self.message, status_code=self.status)


def _boundary(content_type: str) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` body, or a 415/400."""
    expected = 'multipart/related; type="application/dicom"'
    try:
        media_type, params = parse_content_type(content_type)
    except MultipartError as exc:
        if content_type.split(";")[0].strip().lower() != "multipart/related":
            raise _Problem(415, f"Content-Type must be {expected}, got {content_type!r}") from exc
        raise _Problem(400, str(exc)) from exc
    if media_type != "multipart/related":
        raise _Problem(415, f"Content-Type must be {expected}, got {content_type!r}")
    # RFC 2387 makes ``type`` required; some clients leave it out, and the parts are checked anyway.
    part_type = params.get("type", "application/dicom").split(";")[0].strip().lower()
    if part_type == DICOM_JSON:
        raise _Problem(
            415,
            f"Content-Type {content_type!r}: STOW-RS of DICOM JSON metadata with bulk data "
            f"(type={DICOM_JSON}) is not supported; send Part-10 instances as {expected}",
        )
    if part_type != "application/dicom":
        raise _Problem(415, f"Content-Type must be {expected}, got type={part_type!r} ({content_type!r})")
    if not params.get("boundary"):
        raise _Problem(400, f"Content-Type {content_type!r} has no boundary parameter")
    try:
        check_boundary(params["boundary"])
    except MultipartError as exc:
        raise _Problem(400, f"Content-Type {content_type!r}: {exc}") from exc
    return params["boundary"]


async def _limited(chunks: AsyncGenerator[bytes, None], limit: int) -> AsyncIterator[bytes]:
    """``chunks``, raising :class:`_TooLarge` as soon as more than ``limit`` bytes have come."""
    seen = 0
    async with aclosing(chunks):
        async for chunk in chunks:
            seen += len(chunk)
            if seen > limit:
                raise _TooLarge
            yield chunk


def _too_large(ctx: DicomWebContext, what: str) -> Response:
    return PlainTextResponse(
        f"{what} exceeds the STOW-RS request limit of {ctx.max_request_bytes} bytes; "
        "send the instances in smaller requests",
        status_code=413,
        headers={"Connection": "close"},
    )


def _spool_folder(ctx: DicomWebContext) -> Path:
    """Where parts wait for ingest: ``ctx.spool``, else beside the blobs (so ingest can hard-link
    them into the store instead of copying), else next to the quarantine folder."""
    if ctx.spool:
        folder = Path(ctx.spool)
    elif isinstance(ctx.ingest.store, FolderBlobStore):
        folder = ctx.ingest.store.root / ".spool"
    else:
        folder = ctx.ingest.quarantine.parent / "spool"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _source(request: Request) -> str:
    """The ``source`` recorded with each instance (catalog ``source_ae``, quarantine file names)."""
    # TODO(security): the authenticated node or user, once routes are authenticated (issue 3).
    return re.sub(r"[^A-Za-z0-9.-]", "_", f"STOW-{_client(request)}")[:64]


def _dicomweb_root(request: Request) -> str:
    """The absolute URL of the DICOMweb root, e.g. ``http://host:8080/dicom-web``."""
    path = request.url.path
    suffix = "/studies" + (f"/{request.path_params['study']}" if "study" in request.path_params else "")
    root = path[: -len(suffix)] if path.endswith(suffix) else path.rsplit("/studies", 1)[0]
    return str(request.url.replace(path=root, query="", fragment="")).rstrip("/")


# ---------------------------------------------------------------------------- one part


def _store_part(ctx: DicomWebContext, part: SpooledPart, study: str | None, source: str) -> InstanceResult:
    """Check and ingest one spooled part (runs in a worker thread); its file is removed after."""
    try:
        return _check_and_ingest(ctx, part, study, source)
    except Exception as exc:  # one part's surprise must not lose the results of the others
        log.exception("STOW-RS part %d from %s: unexpected error", part.index, source)
        return InstanceResult(
            part.index, "", "", "", "", failure=PROCESSING_FAILURE, reason=f"internal error: {exc}"
        )
    finally:
        part.path.unlink(missing_ok=True)


def _check_and_ingest(
    ctx: DicomWebContext, part: SpooledPart, study: str | None, source: str
) -> InstanceResult:
    ids = _peek_uids(part.path)
    sop_class, sop, study_uid, series_uid = ids or ("", "", "", "")

    def failed(code: int, reason: str) -> InstanceResult:
        log.warning("STOW-RS part %d (%s) from %s failed: %s", part.index, sop or "?", source, reason)
        return InstanceResult(part.index, sop_class, sop, study_uid, series_uid, failure=code, reason=reason)

    digest_problem = _check_digest(part)
    if digest_problem:
        return failed(PROCESSING_FAILURE, digest_problem)
    if study is not None and study_uid and study_uid != study:  # absent: ingest refuses it, 0xC000
        return failed(
            STUDY_UID_MISMATCH,
            f"StudyInstanceUID {study_uid} differs from the study {study} in the request URL",
        )
    # If the header could not be read, ingest reads it the same way and refuses the part.
    outcome = ctx.ingest.accept_file(part.path, source=source)
    if isinstance(outcome, Refused):
        return failed(REFUSED_REASON.get(outcome.kind, PROCESSING_FAILURE), outcome.reason)
    assert isinstance(outcome, Accepted)
    if study is not None and outcome.study_uid != study:  # unreachable: the header was checked
        log.error("STOW-RS stored %s into study %s, not %s", outcome.sop_uid, outcome.study_uid, study)
    warning, reason = None, ""
    if outcome.outcome is AddOutcome.VERSION_KEPT:
        warning = COERCION_OF_DATA_ELEMENTS
        reason = "already held with other bytes; those stay current (the new ones are kept as a version)"
    return InstanceResult(
        part.index,
        outcome.sop_class_uid,
        outcome.sop_uid,
        outcome.study_uid,
        series_uid,
        warning=warning,
        reason=reason,
    )


def _peek_uids(path: Path) -> tuple[str, str, str, str] | None:
    """(SOP class, SOP instance, study, series) UIDs from the header, or None if unreadable."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        return (
            str(ds.get("SOPClassUID", "") or ""),
            str(ds.get("SOPInstanceUID", "") or ""),
            str(ds.get("StudyInstanceUID", "") or ""),
            str(ds.get("SeriesInstanceUID", "") or ""),
        )
    except Exception:  # any failure to read is ingest's to report, in its own words
        return None


_DIGEST_ITEM = re.compile(r"\s*([a-z0-9_.*-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*(?:;[^,]*)?$")
_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512"}


def _check_digest(part: SpooledPart) -> str | None:
    """Why the part's ``Content-Digest`` (RFC 9530 §2) does not hold, or None if it holds or is absent.

    The field is a structured dictionary (``sha-256=:…:, sha-512=:…:``); every member with an
    algorithm we know is checked, others are ignored (RFC 9530 §6). SHA-256 was computed while the
    part was spooled; SHA-512 is computed on demand.
    """
    field = part.headers.get("content-digest")
    if field is None:
        return None
    checked = 0
    for member in field.split(","):
        m = _DIGEST_ITEM.match(member)
        if m is None:
            return f"Content-Digest {field!r} is not an RFC 9530 field (algorithm=:base64:)"
        algorithm, encoded = m.group(1), m.group(2)
        if algorithm not in _ALGORITHMS:
            continue
        try:
            claimed = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            return f"Content-Digest {algorithm}: {encoded!r} is not base64"
        if algorithm == "sha-256":
            actual = part.sha256
        else:
            digest = hashlib.new(_ALGORITHMS[algorithm])
            with part.path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
            actual = digest.digest()
        if claimed != actual:
            return (
                f"Content-Digest {algorithm} does not match the {part.size} bytes received "
                f"(got :{base64.b64encode(actual).decode()}:); corrupted in transit?"
            )
        checked += 1
    if not checked:
        log.info("part %d: Content-Digest %r has no algorithm we check; ignored", part.index, field)
    return None


# ---------------------------------------------------------------------------- the response


def _response(results: list[InstanceResult], root: str) -> Response:
    stored = [r for r in results if r.failure is None]
    failed = [r for r in results if r.failure is not None]
    if not stored:
        status = 409
    elif failed or any(r.warning is not None for r in stored):
        status = 202
    else:
        status = 200

    studies = {r.study_uid for r in stored}
    body: dict[str, Any] = {
        "00081190": _attr("UR", f"{root}/studies/{studies.pop()}" if len(studies) == 1 else None)
    }
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": _attr("UI", r.sop_class_uid),
                    "00081155": _attr("UI", r.sop_uid),
                    "00081197": _attr("US", r.failure),
                }
                for r in failed
            ],
        }
    if stored:
        items: list[dict[str, Any]] = []
        for r in stored:
            item = {
                "00081150": _attr("UI", r.sop_class_uid),
                "00081155": _attr("UI", r.sop_uid),
                "00081190": _attr(
                    "UR", f"{root}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"
                ),
            }
            if r.warning is not None:
                item["00081196"] = _attr("US", r.warning)
            items.append(item)
        body["00081199"] = {"vr": "SQ", "Value": items}

    response = Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type=DICOM_JSON)
    for r in [r for r in results if r.reason][:MAX_WARNING_HEADERS]:
        text = f"part {r.part} ({r.sop_uid or 'SOP Instance UID unknown'}): {r.reason}"
        text = text.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "/")
        # values from a damaged data set may hold control characters: not allowed in a header
        text = _CONTROL.sub("?", text)
        response.headers.append("Warning", f'299 ybyx "{text[:300]}"')
    return response


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _attr(vr: str, value: str | int | None) -> dict[str, Any]:
    """One DICOM JSON attribute (PS3.18 §F.2.2); an empty value has no ``Value``."""
    if value is None or value == "":
        return {"vr": vr}
    return {"vr": vr, "Value": [value]}

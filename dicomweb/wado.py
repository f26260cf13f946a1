"""WADO-RS: retrieve instances, metadata, frames, bulk data and rendered images (issue 3 §4).

PS3.18 §10.4 (Retrieve Transaction). Every route is a plain sync function (Starlette runs it in a
worker thread: catalog and blob reads block) and reads the archive through
:func:`dicomweb.app.context`. One catalog statement per request; bytes come from the blob store.

* **Instances** (§10.4.1.1.1) — ``multipart/related; type="application/dicom"``, streamed part by
  part (one instance in memory at most, and only when it is transcoded). Transfer syntax
  negotiation (§8.7.3.5): ``transfer-syntax=*`` → as stored, byte for byte; no parameter → the
  default, Explicit VR Little Endian (compressed instances are decoded, see ``frames.py``); an
  explicit UID → served when it is the stored one or Explicit VR Little Endian; else 406.
* **Metadata** (§10.4.1.1.2) — ``application/dicom+json`` built by joining the catalog's stored
  DICOM JSON strings (no file opened), with the relative ``BulkDataURI`` values made absolute for
  the request's DICOMweb root by a string-level prefix.
* **Frames** (§10.4.1.1.5, Table 8.7.3-5) — native frames by one range read each; encapsulated
  frames through the offset table, returned in their stored media type (``image/jls``,
  ``image/jpeg``, ``image/jp2``, ``image/dicom-rle``, …) or decoded to
  ``application/octet-stream`` when that is all the client accepts. No Accept header (or
  ``*/*``) means as stored; each part's ``transfer-syntax`` parameter names what it is.
* **Bulk data** (§10.4.1.1.4) — ``/bulk/{tag}``: the element's value as
  ``application/octet-stream`` (encapsulated pixel data: its frames, negotiated like ``/frames``).
* **Rendered / thumbnail** (§10.4.1.1.3, §10.4.1.1.4, §8.3.5) — JPEG (default) or PNG, with
  ``window``, ``viewport`` and ``quality``; study and series resources render a representative
  image: the middle instance of the first series that has pixel data (thumbnail: the middle
  frame of a multi-frame instance; rendered: frame 1).

Errors carry a plain-text message: 400 malformed parameters (frame numbers, window, viewport,
quality, UIDs, tags), 404 unknown study/series/instance or no pixel data, 406 an Accept header
this server cannot satisfy (the message says what it can serve), 410 an instance whose encryption
key was destroyed (crypto-shredding; checked before the response starts — a study or series with
only some such instances is 206 without them, a ``Warning`` header naming each).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dicomweb import access
from dicomweb.app import context
from dicomweb.frames import (
    PIXEL_TAGS,
    CannotDecode,
    IndexedPixels,
    NeedsHeader,
    NoPixelData,
    PixelDataError,
    PixelSource,
    can_decode,
    indexed_pixels,
    open_blob,
    open_pixels,
    read_blob,
    to_explicit_le,
)
from dicomweb.multipart import MultipartError, MultipartWriter, Part, parse_content_type
from dicomweb.qido import service_url
from dicomweb.render import (
    THUMBNAIL_VIEWPORT,
    RenderParamError,
    parse_params,
    render,
)
from gateway.archive import Archive
from gateway.archive.blobstore import BlobStore, FolderBlobStore
from gateway.archive.catalog import PixelRow, StoredInstance
from gateway.archive.encrypted import shredded
from gateway.qc.dicom_json import with_private_blocks
from gateway.qc.service import QcService
from gateway.security.envelope import KeyGone

log = logging.getLogger(__name__)

DICOM = "application/dicom"
OCTET = "application/octet-stream"
DICOM_JSON = "application/dicom+json"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
MAX_FRAMES_PER_REQUEST = 10_000


# --------------------------------------------------------------------------- Accept


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header (RFC 9110 §12.5.1) with its parameters and weight."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def inner(self) -> str | None:
        """The ``type`` parameter of a ``multipart/related`` range (lower-cased), if any."""
        t = self.params.get("type")
        return t.strip().lower() if t else None

    @property
    def transfer_syntax(self) -> str | None:
        ts = self.params.get("transfer-syntax")
        return ts.strip() if ts else None


def _split_outside_quotes(value: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_accept(value: str | None) -> list[MediaRange]:
    """The media ranges of an Accept value, highest ``q`` first (ties keep their order).

    Unparseable ranges and ``q=0`` are dropped; ``None`` or an empty header gives ``[]``.
    """
    ranges: list[MediaRange] = []
    for item in _split_outside_quotes(value or ""):
        try:
            media_type, params = parse_content_type(item)
        except MultipartError:
            continue
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(media_type, params, q))
    return sorted(ranges, key=lambda r: -r.q)


def _accept(request: Request) -> list[MediaRange] | None:
    """The request's acceptable media ranges, or None when it states no preference."""
    ranges = parse_accept(request.headers.get("accept"))
    return ranges or None


def _not_acceptable(request: Request, offer: str) -> HTTPException:
    got = request.headers.get("accept", "")
    return HTTPException(406, f"cannot satisfy Accept: {got!r}; this resource is available as {offer}")


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """The study, series or instance a request names, as catalog criteria."""

    level: str  # "study" | "series" | "instance"
    criteria: dict[str, str]

    def not_found(self) -> HTTPException:
        c = self.criteria
        if self.level == "study":
            return HTTPException(404, f"study {c['StudyInstanceUID']} not found")
        if self.level == "series":
            return HTTPException(
                404, f"series {c['SeriesInstanceUID']} not found in study {c['StudyInstanceUID']}"
            )
        return HTTPException(
            404,
            f"instance {c['SOPInstanceUID']} not found in series {c['SeriesInstanceUID']} "
            f"of study {c['StudyInstanceUID']}",
        )


def _target(request: Request) -> Target:
    p = request.path_params
    criteria: dict[str, str] = {}
    keys = (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"), ("sop", "SOPInstanceUID"))
    for param, key in keys:
        if param in p:
            uid = str(p[param])
            if len(uid) > 64 or not _UID.match(uid):
                raise HTTPException(400, f"{key} {uid!r} is not a valid UID")
            criteria[key] = uid
    level = "instance" if "sop" in p else "series" if "series" in p else "study"
    return Target(level, criteria)


def _instances(request: Request, target: Target) -> list[StoredInstance]:
    found = context(request).archive.catalog.locate(target.criteria)
    if not found:
        raise target.not_found()
    return found


def dicomweb_root(request: Request) -> str:
    """The absolute URL of the DICOMweb root this request came through, ending in ``/``.

    QIDO-RS's :func:`~dicomweb.qido.service_url` (Host header; the connected port added back for
    clients such as dicomweb-client that omit it, unless proxied), so RetrieveURL and BulkDataURI
    values agree.
    """
    return service_url(request) + "/"


# --------------------------------------------------------------------------- instances


def _dicom_requests(request: Request) -> list[str]:
    """Acceptable transfer syntaxes for ``application/dicom`` parts in preference order.

    ``"*"`` means as stored. PS3.18 §8.7.3.5.2: a range without ``transfer-syntax`` asks for the
    default, Explicit VR Little Endian.
    """
    ranges = _accept(request)
    if ranges is None:
        return [ExplicitVRLittleEndian]
    wanted: list[str] = []
    for r in ranges:
        if r.media_type == "multipart/related" and (r.inner or DICOM) in (DICOM, "*/*", "application/*"):
            wanted.append(r.transfer_syntax or ExplicitVRLittleEndian)
        elif r.media_type in ("*/*", "multipart/*"):
            wanted.append(ExplicitVRLittleEndian)
    if not wanted:
        raise _not_acceptable(
            request,
            'multipart/related; type="application/dicom" '
            "(transfer-syntax=* as stored, or 1.2.840.10008.1.2.1, the default)",
        )
    return wanted


def _choose_syntax(inst: StoredInstance, wanted: list[str]) -> str | None:
    for ts in wanted:
        if ts == "*" or ts == inst.transfer_syntax:
            return inst.transfer_syntax
        if ts == ExplicitVRLittleEndian and can_decode(inst.transfer_syntax):
            return ExplicitVRLittleEndian
    return None


def _syntax_name(ts: str) -> str:
    name = UID(ts).name
    return f"{ts} ({name})" if name and name != ts else ts


def _instance_parts(store: BlobStore, plan: list[tuple[StoredInstance, str]]) -> Iterator[Part]:
    """One ``application/dicom`` part per instance; blobs are streamed, transcoded ones built whole."""
    for inst, ts in plan:
        headers = {"Content-Type": f"{DICOM}; transfer-syntax={ts}"}
        if ts == inst.transfer_syntax:
            headers["Content-Length"] = str(inst.size)
            yield headers, store.get(inst.blob_key)
            continue
        try:
            body = to_explicit_le(read_blob(store, inst), inst.transfer_syntax)
        except Exception:
            # The response has started: all that is left is to end it short (the client sees a
            # truncated multipart body) and say why in the log.
            log.exception("WADO-RS: cannot transcode %s from %s", inst.sop_uid, inst.transfer_syntax)
            raise
        headers["Content-Length"] = str(len(body))
        yield headers, body


#: Warning headers naming skipped (crypto-shredded) instances, at most; then one saying how many more.
MAX_SKIP_WARNINGS = 20
GONE = "its encryption key was destroyed (crypto-shredding); it can no longer be read"


def _gone(inst: StoredInstance) -> HTTPException:
    return HTTPException(410, f"instance {inst.sop_uid}: {GONE}")


@contextmanager
def _key_gone_is_410(inst: StoredInstance) -> Iterator[None]:
    """An object whose data key was destroyed answers 410 Gone, not a 500 or a broken body."""
    try:
        yield
    except KeyGone:
        raise _gone(inst) from None


def _without_shredded(
    request: Request, target: Target, plan: list[tuple[StoredInstance, str]]
) -> tuple[list[tuple[StoredInstance, str]], list[str]]:
    """The plan without the instances whose key was destroyed, checked before the response starts
    (one catalog query per 500 instances, no object read); the Warning header values naming the
    ones left out. All of them shredded → 410 Gone (for a study or series: how many)."""
    gone = shredded(context(request).archive.store, [inst.blob_key for inst, _ in plan])
    if not gone:
        return plan, []
    skipped = [inst for inst, _ in plan if inst.blob_key in gone]
    kept = [(inst, ts) for inst, ts in plan if inst.blob_key not in gone]
    for inst in skipped:
        log.warning("WADO-RS: %s not served: %s", inst.sop_uid, gone[inst.blob_key])
    if not kept:
        if target.level == "instance":
            raise _gone(skipped[0])
        raise HTTPException(410, f"all {len(skipped)} instances of this {target.level}: {GONE}")
    service = service_url(request)  # the form of QIDO-RS's warnings (PS3.18 §8.3.4.2)
    texts = [f"instance {inst.sop_uid} left out, {GONE}" for inst in skipped]
    if len(texts) > MAX_SKIP_WARNINGS:
        more = len(texts) - MAX_SKIP_WARNINGS
        texts = [*texts[:MAX_SKIP_WARNINGS], f"and {more} more instances left out, {GONE}"]
    return kept, [f"299 {service}: {text}" for text in texts]


def retrieve(request: Request) -> Response:
    """Retrieve Study/Series/Instance (PS3.18 §10.4.1.1.1): every instance as a multipart part.

    Instances whose encryption key was destroyed (R-SE-10 crypto-shredding) are found before the
    response starts: a shredded instance, or a study/series all of whose instances are, is 410
    Gone; a study or series with some shredded is 206 Partial Content (PS3.18 §10.4.3) without
    them, one ``Warning: 299`` header per instance left out."""
    target = _target(request)
    wanted = _dicom_requests(request)
    found = _instances(request, target)
    plan: list[tuple[StoredInstance, str]] = []
    for inst in found:
        ts = _choose_syntax(inst, wanted)
        if ts is None:
            raise _not_acceptable(
                request,
                f"instance {inst.sop_uid} is stored as {_syntax_name(inst.transfer_syntax)}; it can be "
                "served as stored (transfer-syntax=*)"
                + (" or as 1.2.840.10008.1.2.1" if can_decode(inst.transfer_syntax) else ""),
            )
        plan.append((inst, ts))
    plan, warnings = _without_shredded(request, target, plan)
    writer = MultipartWriter(DICOM)
    store = context(request).archive.store
    response = StreamingResponse(
        writer.iter(_instance_parts(store, plan)),
        status_code=206 if warnings else 200,
        media_type=writer.content_type,
    )
    for value in warnings:
        response.headers.append("Warning", value)
    return response


# --------------------------------------------------------------------------- metadata


def metadata(request: Request) -> Response:
    """Retrieve Metadata (PS3.18 §10.4.1.1.2) from the catalog's DICOM JSON, no file opened."""
    target = _target(request)
    ranges = _accept(request)
    if ranges is not None and not any(
        r.media_type in (DICOM_JSON, "application/json", "application/*", "*/*") for r in ranges
    ):
        raise _not_acceptable(request, "application/dicom+json")
    docs = context(request).archive.catalog.metadata(target.criteria)
    if not docs:
        raise target.not_found()
    docs = access.redacted_json(request, docs)  # masked by sensitivity labels for users (R-SE-3)
    docs = _with_qc(request, target.criteria, docs)  # the QC private block (R-CE-5, R-RT-3)
    root = json.dumps(dicomweb_root(request), ensure_ascii=False)[1:-1]
    # bytes end to end: joining and searching a str holding Chinese names (2 bytes a character)
    # and encoding it costs several times more than this
    body = b"[" + b",".join(docs) + b"]"
    body = body.replace(b'"BulkDataURI":"studies/', b'"BulkDataURI":"' + root.encode("utf-8") + b"studies/")
    return Response(body, media_type=DICOM_JSON)


def _with_qc(request: Request, criteria: Mapping[str, str], docs: list[bytes]) -> list[bytes]:
    """Each graded instance's QC as private block (gateway/qc/dicom_json.py), if QC is on."""
    qc: QcService | None = getattr(request.app.state, "qc", None)
    study_uid = criteria.get("StudyInstanceUID")
    if qc is None or not study_uid:
        return docs
    found = qc.book.blocks(study_uid)
    if found is None:
        return docs
    return with_private_blocks(docs, *found)


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameChoice:
    """How frames are returned: media type, transfer syntax, and whether they must be decoded."""

    media_type: str
    transfer_syntax: str
    decode: bool


def _frame_choice(request: Request, src: PixelSource | IndexedPixels) -> FrameChoice:
    """Negotiate the frames' media type (PS3.18 §8.7.3.5, Table 8.7.3-5) for this instance.

    Lenient on purpose: a compressed media type without ``transfer-syntax`` matches any stored
    syntax of that media type (the part's ``transfer-syntax`` parameter says which it is).
    """
    stored_ts = str(src.transfer_syntax)
    stored = (
        FrameChoice(src.media_types[0], stored_ts, False)
        if src.encapsulated
        else FrameChoice(OCTET, ExplicitVRLittleEndian, False)
    )
    raw = FrameChoice(OCTET, ExplicitVRLittleEndian, src.encapsulated)
    ranges = _accept(request) or [MediaRange("multipart/related", {"type": "*/*"})]
    for r in ranges:
        if r.media_type in ("*/*", "multipart/*"):
            return stored
        if r.media_type != "multipart/related":
            continue
        inner, ts = r.inner or "*/*", r.transfer_syntax
        if inner == "*/*":
            return stored
        if inner == OCTET and ts == "*" and src.encapsulated:
            # "any transfer syntax": the stored (compressed) frame as is, its part labelled with
            # transfer-syntax=<stored> — what Cornerstone's loader asks for by default and decodes
            # in the browser; decoding here would send ~2.6x the bytes of a JPEG-LS archive
            return FrameChoice(OCTET, stored_ts, False)
        if inner == OCTET and ts in (None, "*", ExplicitVRLittleEndian):
            if not raw.decode or can_decode(stored_ts):
                return raw
            continue
        if src.encapsulated and inner in src.media_types and ts in (None, "*", stored_ts):
            return stored
        if src.encapsulated and inner == "image/*" and ts in (None, "*"):
            return stored
    offer = 'multipart/related; type="application/octet-stream"'
    if src.encapsulated:
        alternative = f'multipart/related; type="{src.media_types[0]}"; transfer-syntax={stored_ts}'
        offer = alternative + (f" or {offer}" if can_decode(stored_ts) else "")
    raise _not_acceptable(request, offer)


def _frame_numbers(text: str) -> list[int]:
    numbers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise HTTPException(400, f"frame list {text!r}: frame numbers are integers from 1 (e.g. 1,3,5)")
        numbers.append(int(part))
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise HTTPException(400, f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    return numbers


def _one_instance(request: Request) -> StoredInstance:
    target = _target(request)
    found = _instances(request, target)
    return found[0]


def _pixels(request: Request, inst: StoredInstance) -> PixelSource:
    try:
        return open_pixels(context(request).archive.store, inst)
    except NoPixelData:
        raise HTTPException(404, f"instance {inst.sop_uid} has no pixel data") from None
    except PixelDataError as exc:
        raise HTTPException(500, f"instance {inst.sop_uid}: {exc}") from exc


def _frame_bytes(src: PixelSource, n: int, choice: FrameChoice) -> bytes:
    return src.decoded_frame(n) if choice.decode else src.stored_frame(n)


def _frame_parts(src: PixelSource, numbers: list[int], choice: FrameChoice, first: bytes) -> Iterator[Part]:
    """One part per requested frame; closes ``src`` when done (or when the client goes away)."""
    try:
        for i, n in enumerate(numbers):
            data = first if i == 0 else _frame_bytes(src, n, choice)
            headers = {
                "Content-Type": f"{choice.media_type}; transfer-syntax={choice.transfer_syntax}",
                "Content-Length": str(len(data)),
            }
            yield headers, data
    except Exception:
        log.exception("WADO-RS: frames of %s failed mid-response", src.inst.sop_uid)
        raise
    finally:
        src.close()


def _frames_response(request: Request, src: PixelSource, numbers: list[int]) -> Response:
    try:
        src.check_frames(numbers)
        choice = _frame_choice(request, src)
        # Read (and decode) the first frame before answering, so a broken offset table or an
        # undecodable frame is an error response rather than a truncated body.
        first = _frame_bytes(src, numbers[0], choice)
    except PixelDataError as exc:
        src.close()
        raise HTTPException(400, str(exc)) from exc
    except BaseException:
        src.close()
        raise
    writer = MultipartWriter(choice.media_type)
    body = writer.iter(_frame_parts(src, numbers, choice, first))
    return StreamingResponse(body, media_type=writer.content_type)


# Frames answered in one body (not streamed) up to this many bytes.
_INLINE_FRAMES_MAX = 8 << 20


def _indexed_frames_response(request: Request, src: IndexedPixels, numbers: list[int]) -> Response | None:
    """Frames cut at the catalog's pixel offset (no header read), or None to parse the header.

    A body up to :data:`_INLINE_FRAMES_MAX` is built here and sent as a plain response (no
    generator pulled through a worker thread per chunk); larger ones are streamed.
    """
    try:
        src.check_frames(numbers)
    except PixelDataError as exc:
        raise HTTPException(400, str(exc)) from exc
    choice = _frame_choice(request, src)
    if choice.decode:
        return None  # decoding needs the Image Pixel module: the header path
    try:
        first = src.stored_frame(numbers[0])
    except NeedsHeader:
        return None
    except PixelDataError as exc:
        raise HTTPException(400, str(exc)) from exc
    writer = MultipartWriter(choice.media_type)
    content_type = f"{choice.media_type}; transfer-syntax={choice.transfer_syntax}"

    def parts() -> Iterator[Part]:
        try:
            for i, n in enumerate(numbers):
                data = first if i == 0 else src.stored_frame(n)
                yield {"Content-Type": content_type, "Content-Length": str(len(data))}, data
        except Exception:
            log.exception("WADO-RS: frames of %s failed mid-response", src.inst.sop_uid)
            raise

    if len(numbers) == 1 or (not src.encapsulated and len(numbers) * src.frame_size <= _INLINE_FRAMES_MAX):
        try:
            body = b"".join(writer.iter(parts()))
        except PixelDataError as exc:
            raise HTTPException(400, str(exc)) from exc
        return Response(body, media_type=writer.content_type)
    return StreamingResponse(writer.iter(parts()), media_type=writer.content_type)


# Frames served on the event loop (no worker-thread hop) when the catalog is local SQLite and the
# store a local folder: one indexed row and one pread of at most this many bytes per request.
_ON_LOOP_MAX = 2 << 20


def _local(archive: Archive) -> bool:
    return isinstance(archive.store, FolderBlobStore) and archive.catalog.engine.dialect.name == "sqlite"


def _pixel_row(archive: Archive, target: Target) -> PixelRow:
    c = target.criteria
    row = archive.catalog.pixel_row(c["StudyInstanceUID"], c["SeriesInstanceUID"], c["SOPInstanceUID"])
    if row is None:
        raise target.not_found()
    return row


def _frames(request: Request, numbers: list[int], target: Target, row: PixelRow | None) -> Response:
    archive = context(request).archive
    if row is None:
        row = _pixel_row(archive, target)
    # the first frame is read before any answer: a destroyed key is 410, not a broken body
    with _key_gone_is_410(row.instance):
        src = indexed_pixels(archive.store, row)
        if src is not None:
            fast = _indexed_frames_response(request, src, numbers)
            if fast is not None:
                return fast
        return _frames_response(request, _pixels(request, row.instance), numbers)


async def frames(request: Request) -> Response:
    """Retrieve Frames (PS3.18 §10.4.1.1.5): ``/frames/1,3,5``, read by range from the blob.

    One catalog row says where the pixel data is (recorded at ingest): frames are then cut without
    reading the header. Rows without it (stored before migration 0007, or layouts the row cannot
    describe) parse the header by range reads (:func:`open_pixels`). Only native frames from a
    local catalog and folder are served on the event loop (a ~15 µs query and one pread);
    everything else (PostgreSQL, S3, encapsulated data, decoding) runs in a worker thread.
    """
    numbers = _frame_numbers(str(request.path_params["frames"]))
    target = _target(request)
    archive = context(request).archive
    if not _local(archive):
        return await run_in_threadpool(_frames, request, numbers, target, None)
    row = _pixel_row(archive, target)
    src = indexed_pixels(archive.store, row)
    if src is not None and not src.encapsulated and len(numbers) * src.frame_size <= _ON_LOOP_MAX:
        return _frames(request, numbers, target, row)
    return await run_in_threadpool(_frames, request, numbers, target, row)


# --------------------------------------------------------------------------- bulk data


def _find_element(ds: Dataset, tag: int) -> object | None:
    """The first element with ``tag`` in ``ds`` or its sequences (depth first), raw if unread."""
    if tag in ds:
        return ds.get_item(tag)
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                found = _find_element(item, tag)
                if found is not None:
                    return found
    return None


def _element_bytes(elem: object) -> bytes:
    value = elem.value if isinstance(elem, RawDataElement) else getattr(elem, "value", b"")
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


def bulk(request: Request) -> Response:
    """Retrieve Bulkdata (PS3.18 §10.4.1.1.4) named by the BulkDataURIs of ``/metadata``."""
    tag_text = str(request.path_params["tag"])
    if not _TAG.match(tag_text):
        raise HTTPException(400, f"bulk data tag {tag_text!r} is not 8 hexadecimal digits (e.g. 7FE00010)")
    tag = int(tag_text, 16)
    inst = _one_instance(request)
    with _key_gone_is_410(inst):
        return _bulk(request, inst, tag, tag_text)


def _bulk(request: Request, inst: StoredInstance, tag: int, tag_text: str) -> Response:
    if tag in PIXEL_TAGS:
        src = _pixels(request, inst)
        if src.tag != tag:
            src.close()
            raise _no_element(inst, tag_text)
        if src.encapsulated:
            return _frames_response(request, src, list(range(1, src.number_of_frames + 1)))
        try:
            _octet_only(request)
        except BaseException:
            src.close()
            raise
        assert src.length is not None
        length = src.length

        def pixel_chunks() -> Iterator[bytes]:
            try:
                yield from src.native_value()
            finally:
                src.close()

        return _octet_response([({"Content-Type": OCTET, "Content-Length": str(length)}, pixel_chunks())])
    _octet_only(request)
    store = context(request).archive.store
    with open_blob(store, inst) as fh:
        ds = dcmread(fh, stop_before_pixels=tag < 0x7FE00010)
        elem = _find_element(ds, tag)
    if elem is None:
        raise _no_element(inst, tag_text)
    data = _element_bytes(elem)
    return _octet_response([({"Content-Type": OCTET, "Content-Length": str(len(data))}, data)])


def _no_element(inst: StoredInstance, tag_text: str) -> HTTPException:
    return HTTPException(404, f"instance {inst.sop_uid} has no ({tag_text[:4]},{tag_text[4:]}) element")


def _octet_only(request: Request) -> None:
    ranges = _accept(request)
    if ranges is None:
        return
    for r in ranges:
        if r.media_type in ("*/*", "multipart/*"):
            return
        if r.media_type == "multipart/related" and (r.inner or OCTET) in (OCTET, "*/*", "application/*"):
            return
    raise _not_acceptable(request, 'multipart/related; type="application/octet-stream"')


def _octet_response(parts: list[Part]) -> Response:
    writer = MultipartWriter(OCTET)
    return StreamingResponse(writer.iter(parts), media_type=writer.content_type)


# --------------------------------------------------------------------------- rendered


def _render_media_type(request: Request) -> str:
    """JPEG or PNG per the ``accept`` query parameter (PS3.18 §8.3.3.1) or the Accept header."""
    value = request.query_params.get("accept") or request.headers.get("accept")
    ranges = parse_accept(value)
    if not ranges:
        return "image/jpeg"
    for r in ranges:
        if r.media_type in ("image/jpeg", "image/png"):
            return r.media_type
        if r.media_type in ("image/*", "*/*"):
            return "image/jpeg"
    got = value or ""
    raise HTTPException(406, f"cannot satisfy Accept: {got!r}; rendered images are image/jpeg or image/png")


def _representatives(found: list[StoredInstance]) -> Iterator[StoredInstance]:
    """The middle instance of each series, first series first (catalog order)."""
    by_series: dict[str, list[StoredInstance]] = {}
    for inst in found:
        by_series.setdefault(inst.series_uid, []).append(inst)
    for members in by_series.values():
        yield members[len(members) // 2]


def _render(request: Request, *, thumbnail: bool) -> Response:
    media_type = _render_media_type(request)
    query: Mapping[str, str] = request.query_params
    try:
        params = parse_params(query, media_type, default_viewport=THUMBNAIL_VIEWPORT if thumbnail else None)
    except RenderParamError as exc:
        raise HTTPException(400, str(exc)) from exc
    requested: int | None = None
    if "frames" in request.path_params:
        numbers = _frame_numbers(str(request.path_params["frames"]))
        if len(numbers) != 1:
            raise HTTPException(400, "rendered frames: name one frame (e.g. /frames/1/rendered)")
        requested = numbers[0]
    target = _target(request)
    found = _instances(request, target)
    candidates = iter(found[:1]) if target.level == "instance" else _representatives(found)
    src: PixelSource | None = None
    for inst in candidates:
        try:
            with _key_gone_is_410(inst):
                src = open_pixels(context(request).archive.store, inst)
            break
        except NoPixelData:
            if target.level == "instance":
                raise HTTPException(404, f"instance {inst.sop_uid} has no pixel data") from None
    if src is None:
        raise HTTPException(404, f"no instance with pixel data in this {target.level}")
    try:
        n = requested or (src.number_of_frames // 2 + 1 if thumbnail else 1)
        src.check_frames([n])
        frame = src.frame_dataset(n)
        data = render(frame, src.header, n - 1, params)
    except RenderParamError as exc:
        raise HTTPException(400, str(exc)) from exc
    except CannotDecode as exc:
        raise HTTPException(406, f"cannot render instance {src.inst.sop_uid}: {exc}") from exc
    except PixelDataError as exc:
        raise HTTPException(400, str(exc)) from exc
    finally:
        src.close()
    return Response(data, media_type=media_type)


def rendered(request: Request) -> Response:
    """Retrieve Rendered (PS3.18 §10.4.1.1.3): JPEG/PNG with window, viewport and quality."""
    return _render(request, thumbnail=False)


def thumbnail(request: Request) -> Response:
    """Retrieve Thumbnail (PS3.18 §10.4.1.1.4): rendered with a default 128x128 viewport."""
    return _render(request, thumbnail=True)

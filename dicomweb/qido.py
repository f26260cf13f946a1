"""QIDO-RS: search for studies, series and instances (PS3.18 §10.6; issue 3 §3).

Resources (relative to the DICOMweb root): ``/studies``, ``/studies/{study}/series``, ``/series``,
``/studies/{study}/instances``, ``/studies/{study}/series/{series}/instances``, ``/instances``.

Query parameters (PS3.18 §8.3.4):

* attribute matching by keyword or tag (``PatientID=…``, ``00100020=…``) with the rules of PS3.4
  C.2.2.2 (single value, ``*``/``?`` wildcards, date/time ranges, UID lists separated by ``,`` or
  ``\\``, universal matching for an empty value); the path's UIDs are matching keys too;
* ``includefield`` (repeatable, comma lists, keywords, tags, ``all``) (§8.3.4.3);
* ``fuzzymatching=true``: fuzzy person-name matching, pinyin-aware (:mod:`gateway.archive.query`)
  (§8.3.4.2);
* ``limit``/``offset`` (§8.3.4.4): paging over a stable order, so pages concatenate to the full list.

Every search is ONE SQL statement whatever the result size (:meth:`Catalog.find`), includefield
of attributes the catalog does not keep included: those come from the instance's stored DICOM
JSON header (``metadata_json``), read in the same statement.

Responses (§10.6.3, §8.7.3): ``200`` with a DICOM JSON array (``application/dicom+json``, also
offered as ``application/json``), ``[]`` when nothing matches: PS3.18 2026a answers a search with
no match with 200 and an empty list (CP-2473; editions up to 2025 said 204 No Content, which
RFC 9110 §15.3.5 forbids to carry the empty array). ``400`` names the bad parameter, ``406`` when
the Accept header (or ``accept`` parameter, §8.3.3.1) admits no JSON. Warnings (``Warning: 299
{service}: …``, RFC 7234 §5.5, §8.3.4.2) tell of parameters ignored, fuzzy matching not applied,
and results held back by the server's maximum (:data:`MAX_RESULTS`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from dicomweb import access, json_model
from dicomweb.app import context
from gateway.archive.query import ATTRIBUTES, COMPUTED, Level, QueryError, fuzzy_applies, supported

#: The most results one response carries; more are announced with a Warning (PS3.18 §8.3.4.4).
MAX_RESULTS = 1000
#: The media types a search answers in (PS3.18 §10.6.3.2, §8.7.3.5.1).
DICOM_JSON = "application/dicom+json"
JSON = "application/json"

FUZZY_NOT_SUPPORTED = (
    "The fuzzymatching parameter is not supported. Only literal matching has been performed."
)
MORE_RESULTS = "There are additional results that can be requested."

_RESERVED = frozenset({"limit", "offset", "includefield", "fuzzymatching", "accept", "charset"})
_PN_KEYS = frozenset(k for k, a in ATTRIBUTES.items() if a.kind == "pn")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_UINT = re.compile(r"^\d+$")
_ORDER = {Level.STUDY: 0, Level.SERIES: 1, Level.IMAGE: 2}

# Return keys of PS3.18 Table 10.6.3-3 (study), -4 (series), -5 (instance) the archive can fill;
# Timezone Offset From UTC is not kept (it is conditional on being known).
STUDY_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "RetrieveURL",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "Modality",
    "SeriesDescription",
    "RetrieveURL",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "StudyInstanceUID",  # the parent's key, so a result can be retrieved on its own
)
INSTANCE_KEYS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "RetrieveURL",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
# Attributes computed or made up per result rather than stored in a catalog column.
_LEVEL_OF_COMPUTED = {k: lvl for lvl, keys in COMPUTED.items() for k in keys}
_EXTRA = {"InstanceAvailability", "RetrieveURL", "AvailableTransferSyntaxUID"}


class BadRequest(ValueError):
    """A query parameter that cannot be used; the message names it (answered with 400)."""


@dataclass
class Search:
    """One parsed QIDO-RS request."""

    level: Level
    criteria: dict[str, str] = field(default_factory=dict)
    returned: set[str] = field(default_factory=set)  # keywords to return (besides the defaults)
    include_tags: set[int] = field(default_factory=set)  # includefield tags the catalog lacks
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    ignored: list[str] = field(default_factory=list)  # parameters not supported (warned about)
    fuzzy_not_applied: bool = False


def service_url(request: Request) -> str:
    """The DICOMweb root URL the request came in under (``http://host:port/dicom-web``).

    Used for RetrieveURL and as the ``{service}`` of Warning headers (PS3.18 §8.3.4.2). Built from
    the Host header; a client that sent it without the port it connected to (dicomweb-client does)
    gets the port added back, unless the request came through a proxy (``Forwarded`` /
    ``X-Forwarded-*``), whose Host is the public one.
    """
    url = request.url
    netloc = url.netloc
    server = request.scope.get("server")
    proxied = any(h in request.headers for h in ("forwarded", "x-forwarded-for", "x-forwarded-host"))
    if server and server[1] and not proxied and url.port is None:
        default = 443 if url.scheme == "https" else 80
        if server[1] != default:
            netloc = f"{url.hostname}:{server[1]}" if ":" not in (url.hostname or "") else netloc
    return f"{url.scheme}://{netloc}{request.scope.get('root_path', '')}".rstrip("/")


def negotiate(request: Request) -> str | None:
    """The media type to answer in, or None when the client accepts no JSON (→ 406).

    The ``accept`` query parameter, when given, replaces the Accept header (PS3.18 §8.3.3.1).
    ``application/dicom+json`` is preferred; ``application/json``, ``application/*`` and ``*/*``
    are accepted as well (§8.7.3.5.1).
    """
    accept = request.query_params.get("accept") or request.headers.get("accept") or "*/*"
    best: tuple[float, int, str] | None = None
    for media_range in accept.split(","):
        kind, *params = (p.strip() for p in media_range.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = kind.lower().replace(" ", "+")  # an unencoded "+" in ?accept= arrives as a space
        if q <= 0:
            continue
        if kind in (DICOM_JSON, "application/*", "*/*"):
            choice = (q, 1, DICOM_JSON)
        elif kind == JSON:
            choice = (q, 0, JSON)
        else:
            continue
        if best is None or choice[:2] > best[:2]:
            best = choice
    return None if best is None else best[2]


def _check_value(key: str, value: str) -> str:
    """``value`` checked and normalised for matching ``key``; raises BadRequest naming ``key``."""
    attr = ATTRIBUTES.get(key)
    value = value.strip()
    if key == "ModalitiesInStudy":
        return "\\".join(m.strip() for m in re.split(r"[,\\]", value) if m.strip())
    if attr is None or value in ("", "*"):
        return value
    if attr.kind == "uid":
        uids = [u.strip() for u in re.split(r"[,\\]", value) if u.strip()]
        for uid in uids:
            if len(uid) > 64 or not _UID.match(uid):
                raise BadRequest(f"{key}: {uid!r} is not a UID")
        return "\\".join(uids)
    if attr.kind in ("date", "time"):
        pattern = _DATE if attr.kind == "date" else _TIME
        low, dash, high = value.partition("-")
        parts = [p for p in (low.strip(), high.strip()) if p]
        if not parts or not all(pattern.match(p) for p in parts) or (not dash and len(parts) != 1):
            what = "date (YYYYMMDD)" if attr.kind == "date" else "time (HHMMSS.FFFFFF)"
            raise BadRequest(f"{key}: {value!r} is not a {what} or a range of them")
    return value


def _uint(name: str, value: str) -> int:
    if not _UINT.match(value.strip()):
        raise BadRequest(f"{name}: {value!r} is not a non-negative integer")
    return int(value)


def _level_of(keyword: str) -> Level | None:
    attr = ATTRIBUTES.get(keyword)
    if attr is not None:
        return attr.level
    return _LEVEL_OF_COMPUTED.get(keyword)


def parse(level: Level, params: Sequence[tuple[str, str]], path: Mapping[str, str]) -> Search:
    """The search ``params`` ask for at ``level``, with the path's UIDs as matching keys.

    Raises :class:`BadRequest` for a value that cannot be used (PS3.18 §8.3.4, 400).
    """
    search = Search(level)
    for name, raw in params:
        lname = name.lower()
        if lname == "limit":
            search.limit = _uint(name, raw)
        elif lname == "offset":
            search.offset = _uint(name, raw)
        elif lname == "fuzzymatching":
            if raw.strip().lower() not in ("true", "false"):
                raise BadRequest(f"fuzzymatching: {raw!r} is neither true nor false")
            search.fuzzy = raw.strip().lower() == "true"
        elif lname == "includefield":
            _include(search, raw)
        elif lname in _RESERVED:
            continue  # accept / charset: handled by negotiate()
        else:
            _match_key(search, name, raw)
    for keyword, uid in path.items():
        search.criteria[keyword] = _check_value(keyword, uid)
    if search.fuzzy:
        search.fuzzy_not_applied = any(
            not fuzzy_applies(v) for k, v in search.criteria.items() if k in _PN_KEYS and v.strip()
        )
    return search


def _include(search: Search, raw: str) -> None:
    for item in (i.strip() for i in raw.split(",")):
        if not item:
            continue
        if item.lower() == "all":
            search.include_all = True
            continue
        if "." in item:  # a sequence path (00081111.00081150): not supported
            search.ignored.append(f"includefield={item}")
            continue
        tag = json_model.tag_of(item)
        if tag is None:
            raise BadRequest(f"includefield: {item!r} is not a DICOM keyword or tag")
        keyword = json_model.keyword_of(tag)
        lvl = _level_of(keyword)
        if lvl is not None or keyword in _EXTRA:
            if lvl is None or _ORDER[lvl] <= _ORDER[search.level]:
                search.returned.add(keyword)  # deeper levels are not returned (§10.6.3.3.2)
        else:
            search.include_tags.add(tag)


def _match_key(search: Search, name: str, raw: str) -> None:
    tag = json_model.tag_of(name) if "." not in name else None
    keyword = json_model.keyword_of(tag) if tag is not None else ""
    if not keyword or not supported(keyword):
        search.ignored.append(name)
        return
    value = _check_value(keyword, raw)
    if keyword in search.criteria:
        if ATTRIBUTES.get(keyword) is None or ATTRIBUTES[keyword].kind != "uid":
            raise BadRequest(f"{name}: given more than once")
        value = "\\".join(v for v in (search.criteria[keyword], value) if v)
    search.criteria[keyword] = value
    search.returned.add(keyword)


def _defaults(level: Level, scope: str) -> tuple[str, ...]:
    """Return keys for ``level`` (PS3.18 §10.6.3.3): a search of all series adds the study keys,
    a study's instances the series keys, all instances both."""
    if level is Level.STUDY:
        return STUDY_KEYS
    if level is Level.SERIES:
        return SERIES_KEYS + (STUDY_KEYS if scope == "all" else ())
    parents = {"all": STUDY_KEYS + SERIES_KEYS, "study": SERIES_KEYS, "series": ()}[scope]
    return INSTANCE_KEYS + parents


def _retrieve_url(base: str, level: Level, row: Mapping[str, Any]) -> str:
    url = f"{base}/studies/{row['StudyInstanceUID']}"
    if level is not Level.STUDY:
        url += f"/series/{row['SeriesInstanceUID']}"
    if level is Level.IMAGE:
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


def _value(keyword: str, level: Level, row: Mapping[str, Any], base: str) -> Any:
    if keyword == "RetrieveURL":
        return _retrieve_url(base, level, row)
    if keyword == "InstanceAvailability":
        return "ONLINE"  # the archive serves everything it catalogues from its blob store
    if keyword == "AvailableTransferSyntaxUID":
        return row.get("_transfer_syntax")
    return row.get(keyword)


@dataclass(frozen=True)
class _Column:
    """A returned attribute, resolved once per request (tag, JSON key, VR), not once per row."""

    keyword: str
    tag: int
    key: str
    vr: str


def _columns(keys: Iterable[str], row_keys: Iterable[str]) -> list[_Column]:
    """The attributes of ``keys`` the rows carry, in ascending tag order (§F.2.1.1)."""
    present = set(row_keys)
    found: list[_Column] = []
    for keyword in keys:
        tag = json_model.tag_of(keyword)
        if tag is None or (keyword not in present and keyword not in _EXTRA):
            continue
        found.append(_Column(keyword, tag, json_model.tag_key(tag), json_model.vr_of(tag)))
    return sorted(found, key=lambda c: c.tag)


def _result(
    search: Search, columns: Sequence[_Column], row: Mapping[str, Any], base: str
) -> json_model.JsonDataset:
    """One search result as a DICOM JSON data set (attributes in ascending tag order)."""
    doc: json_model.JsonDataset = {}
    for col in columns:
        values = json_model.encode_values(col.vr, _value(col.keyword, search.level, row, base))
        doc[col.key] = {"vr": col.vr, "Value": values} if values else {"vr": col.vr}
    if not row.get("_metadata_json"):
        return doc
    stored = json_model.strip_bulk_data(json.loads(row["_metadata_json"]))
    merged: dict[str, dict[str, Any]] = {}
    if search.include_all and search.level is Level.IMAGE:
        merged.update(stored)
    for included in search.include_tags:
        key = json_model.tag_key(included)
        if key in stored:
            merged[key] = stored[key]
    merged.update(doc)  # the catalog's own values win, as before
    return json_model.sort_dataset(merged)


def _keys(search: Search, scope: str, row_keys: Iterable[str]) -> list[str]:
    keys = list(_defaults(search.level, scope))
    if search.include_all:
        keys += [k for k in row_keys if not k.startswith("_")]
        keys += ["AvailableTransferSyntaxUID"] if search.level is Level.IMAGE else []
    keys += sorted(search.returned)
    return list(dict.fromkeys(keys))


def _parent_counts(search: Search, scope: str) -> bool:
    """Whether the enclosing levels' computed attributes are to be returned (§10.6.3.3)."""
    if scope == "all" or (search.level is Level.IMAGE and scope == "study") or search.include_all:
        return search.level is not Level.STUDY
    return any(_LEVEL_OF_COMPUTED.get(k, search.level) is not search.level for k in search.returned)


def _warning(service: str, text: str) -> str:
    return f"299 {service}: {text}"


async def _search(request: Request, level: Level, scope: str) -> Response:
    media_type = negotiate(request)
    if media_type is None:
        return PlainTextResponse(
            f"Not Acceptable: search results are {DICOM_JSON} (or {JSON})", status_code=406
        )
    path: dict[str, str] = {}
    if "study" in request.path_params:
        path["StudyInstanceUID"] = request.path_params["study"]
    if "series" in request.path_params:
        path["SeriesInstanceUID"] = request.path_params["series"]
    try:
        search = parse(level, request.query_params.multi_items(), path)
    except BadRequest as exc:
        return PlainTextResponse(f"Bad Request: {exc}", status_code=400)

    cap = MAX_RESULTS if search.limit is None else min(search.limit, MAX_RESULTS)
    metadata = bool(search.include_tags) or (search.include_all and level is Level.IMAGE)
    catalog = context(request).archive.catalog
    try:
        rows = await run_in_threadpool(
            catalog.find,
            level,
            search.criteria,
            limit=cap + 1,
            offset=search.offset,
            fuzzy=search.fuzzy,
            metadata=metadata,
            parent_counts=_parent_counts(search, scope),
            restrict=access.study_filter(request),  # who may see which studies (issue 6 §3)
        )
    except QueryError as exc:
        return PlainTextResponse(f"Bad Request: {exc}", status_code=400)

    base = service_url(request)
    more = len(rows) > cap
    rows = rows[:cap]
    row_keys = list(rows[0].keys()) if rows else []
    columns = _columns(_keys(search, scope, row_keys), row_keys)
    body = access.redacted(request, [_result(search, columns, row, base) for row in rows])  # R-SE-3
    response = Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        status_code=200,
        media_type=media_type,
    )
    warnings: list[str] = []
    if search.fuzzy_not_applied:
        warnings.append(FUZZY_NOT_SUPPORTED)
    if search.ignored:
        warnings.append(
            "The following query parameters are not supported and have been ignored: "
            + ", ".join(quote(name, safe="=()") for name in dict.fromkeys(search.ignored))
        )
    if more and (search.limit is None or search.limit > MAX_RESULTS):
        warnings.append(MORE_RESULTS)
    for text in warnings:
        response.headers.append("Warning", _warning(base, text))
    return response


async def search_studies(request: Request) -> Response:
    """``GET /studies`` (PS3.18 §10.6.1, target resource "All Studies")."""
    return await _search(request, Level.STUDY, "all")


async def search_series(request: Request) -> Response:
    """``GET /series`` and ``GET /studies/{study}/series`` (PS3.18 §10.6.1)."""
    return await _search(request, Level.SERIES, "study" if "study" in request.path_params else "all")


async def search_instances(request: Request) -> Response:
    """``GET /instances``, ``/studies/{study}/instances``, ``/studies/{study}/series/{series}/instances``
    (PS3.18 §10.6.1)."""
    params = request.path_params
    scope = "series" if "series" in params else "study" if "study" in params else "all"
    return await _search(request, Level.IMAGE, scope)

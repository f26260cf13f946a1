"""The one DICOMweb client (httpx): STOW in batches, QIDO, WADO, and the center's inventory.

Used by the forwarder (front-end → center) and later by cross-province fetch (issue 3 §5). It
implements :class:`gateway.forwarder.CenterLink`. Every STOW part carries a ``Content-Digest``
(RFC 9530, SHA-256) so the center can prove the bytes arrived intact; the per-instance sequences of
the response are read, not only the status code (PS3.18 Table 10.5.3-1 has drifted over editions).
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from dicomweb.multipart import MultipartParser, MultipartWriter, PartData, PartStart, parse_content_type
from gateway.archive.blobstore import BlobStore
from gateway.archive.catalog import StoredInstance
from gateway.forwarder import CenterUnavailable, InstanceOutcome

log = logging.getLogger(__name__)

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


def content_digest(sha256_hex: str) -> str:
    """``sha-256=:<base64>:`` for a hex SHA-256 (RFC 9530)."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


def _batches(
    items: Sequence[StoredInstance], max_count: int, max_bytes: int
) -> Iterator[list[StoredInstance]]:
    batch: list[StoredInstance] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= max_count or size + item.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.size
    if batch:
        yield batch


class _Replayable:
    """A streamed body that can be sent again (each iteration starts afresh: the blobs are read
    again), so a request refused with 401 can be retried with a new token."""

    def __init__(self, make: Callable[[], Iterator[bytes]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[bytes]:
        return self._make()


def _first(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


class DicomWebClient:
    """A DICOMweb peer at ``base_url`` (the server root; DICOMweb under ``/dicom-web``)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60,
        max_batch_instances: int = 50,
        max_batch_bytes: int = 256 << 20,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        auth: httpx.Auth | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """``auth``: how to prove who we are (the front-end's ``ClientCredentials`` at its center,
        issue 6 §1); it may send a request twice, so bodies here are replayable."""
        self.base_url = base_url.rstrip("/")
        self.dicomweb = f"{self.base_url}/dicom-web"
        self.max_batch_instances = max_batch_instances
        self.max_batch_bytes = max_batch_bytes
        # verify: the peer's certificate checked against the configured CA (issue 6 §6, R-SE-5)
        self.http = httpx.Client(
            timeout=timeout, headers=headers, transport=transport, auth=auth, verify=verify
        )

    def close(self) -> None:
        self.http.close()

    # ---- STOW-RS -------------------------------------------------------------------------------

    def stow(
        self, study_uid: str, items: Sequence[StoredInstance], store: BlobStore
    ) -> dict[str, InstanceOutcome]:
        """Store instances under their study, in batches; the center's answer per instance."""
        outcomes: dict[str, InstanceOutcome] = {}
        for batch in _batches(items, self.max_batch_instances, self.max_batch_bytes):
            outcomes.update(self._stow_batch(study_uid, batch, store))
        return outcomes

    def _stow_batch(
        self, study_uid: str, batch: list[StoredInstance], store: BlobStore
    ) -> dict[str, InstanceOutcome]:
        writer = MultipartWriter("application/dicom")

        def make_body() -> Iterator[bytes]:
            parts = (
                (
                    {"Content-Type": "application/dicom", "Content-Digest": content_digest(i.sha256)},
                    store.get(i.blob_key),
                )
                for i in batch
            )
            return writer.iter(parts)

        try:
            response = self.http.post(
                f"{self.dicomweb}/studies/{study_uid}",
                content=_Replayable(make_body),
                headers={"Content-Type": writer.content_type, "Accept": "application/dicom+json"},
            )
        except httpx.HTTPError as exc:
            raise CenterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code not in (200, 202, 409):
            raise CenterUnavailable(f"STOW-RS answered {response.status_code}: {response.text[:300]}")
        try:
            body = response.json()
        except ValueError as exc:
            raise CenterUnavailable(f"STOW-RS answer is not JSON ({response.status_code})") from exc
        outcomes: dict[str, InstanceOutcome] = {}
        for item in body.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []):
            sop = _first(item, REFERENCED_SOP_INSTANCE_UID)
            if sop:
                warning = _first(item, WARNING_REASON)
                outcomes[str(sop)] = InstanceOutcome(True, f"warning 0x{warning:04X}" if warning else "")
        for item in body.get(FAILED_SOP_SEQUENCE, {}).get("Value", []):
            sop = _first(item, REFERENCED_SOP_INSTANCE_UID)
            if sop:
                reason = _first(item, FAILURE_REASON)
                outcomes[str(sop)] = InstanceOutcome(False, f"failure 0x{int(reason or 0):04X}")
        return outcomes

    # ---- the center's inventory (issue 3 §7) -----------------------------------------------------

    def inventory(self, study_uid: str, *, verify: bool = True) -> dict[str, str]:
        """SOP Instance UID → SHA-256 of what the center holds for the study (verify: re-hashed)."""
        try:
            response = self.http.get(
                f"{self.base_url}/api/v1/studies/{study_uid}/inventory",
                params={"verify": "true" if verify else "false"},
            )
        except httpx.HTTPError as exc:
            raise CenterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            return {}
        if response.status_code != 200:
            raise CenterUnavailable(f"inventory answered {response.status_code}: {response.text[:300]}")
        return {sop: str(v["sha256"]) for sop, v in response.json()["instances"].items()}

    def report_manifest(
        self, study_uid: str, manifest: dict[str, str], qc: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``PUT /api/v1/studies/{study}/manifest`` (with our QC of the study, R-QC-1): the center's
        upload-monitoring record back (with its QC, R-CE-5)."""
        body: dict[str, Any] = {"instances": manifest, **({"qc": qc} if qc is not None else {})}
        return self._api("PUT", f"/api/v1/studies/{study_uid}/manifest", body)

    def post_exam(self, record: dict[str, Any]) -> None:
        """``POST /api/v1/exams`` at the center: an exam record with the pseudonym (R-UP-5)."""
        self._api("POST", "/api/v1/exams", record)

    def call_json(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
    ) -> tuple[int, Any]:
        """A JSON API call at the peer's ``path`` (the national index, another center's
        ``/api/v1``, issue 5): (status, decoded body or None). Raises :class:`CenterUnavailable`
        only when the peer cannot be reached; the caller decides what a status means."""
        try:
            response = self.http.request(method, f"{self.base_url}{path}", params=params, json=body)
        except httpx.HTTPError as exc:
            raise CenterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        try:
            decoded = response.json() if response.content else None
        except ValueError:
            decoded = None
        return response.status_code, decoded

    def _api(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self.http.request(method, f"{self.base_url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise CenterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 300:
            raise CenterUnavailable(f"{method} {path} answered {response.status_code}: {response.text[:300]}")
        result: dict[str, Any] = response.json()
        return result

    # ---- QIDO-RS / WADO-RS ---------------------------------------------------------------------

    def search(
        self, level: str, params: dict[str, str] | None = None, *, study: str | None = None
    ) -> list[dict[str, Any]]:
        """QIDO-RS at ``level`` ("studies", "series", "instances"), optionally within a study."""
        path = f"/studies/{study}/{level}" if study and level != "studies" else f"/{level}"
        response = self.http.get(
            f"{self.dicomweb}{path}", params=params, headers={"Accept": "application/dicom+json"}
        )
        response.raise_for_status()
        if response.status_code == 204 or not response.content:
            return []
        result: list[dict[str, Any]] = response.json()
        return result

    def retrieve(
        self,
        out: Path,
        study: str,
        series: str | None = None,
        sop: str | None = None,
        *,
        as_stored: bool = True,
        on_part: Callable[[Path], None] | None = None,
    ) -> list[Path]:
        """WADO-RS retrieve into ``out`` (one file per instance), streamed: the response is parsed
        as it arrives and each part written to disk, so a study never sits in memory.
        ``on_part`` is called with each file as soon as its part is complete (a cross-province
        fetch stores the first instance while the rest is still arriving, issue 5).

        ``as_stored``: ask for ``transfer-syntax=*`` (the bytes as archived); else the server's
        default (Explicit VR Little Endian).
        """
        path = (
            f"/studies/{study}"
            + (f"/series/{series}" if series else "")
            + (f"/instances/{sop}" if sop else "")
        )
        accept = 'multipart/related; type="application/dicom"' + ("; transfer-syntax=*" if as_stored else "")
        return self._multipart_to_files(f"{self.dicomweb}{path}", accept, out, ".dcm", on_part)

    def frames(
        self,
        out: Path,
        study: str,
        series: str,
        sop: str,
        frames: Sequence[int],
        *,
        media_type: str = "application/octet-stream",
    ) -> list[Path]:
        """WADO-RS ``/frames/{list}`` into ``out``, one file per frame, in the order asked."""
        instance = f"{self.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
        url = f"{instance}/frames/{','.join(map(str, frames))}"
        return self._multipart_to_files(url, f'multipart/related; type="{media_type}"', out, ".frame")

    def _multipart_to_files(
        self, url: str, accept: str, out: Path, suffix: str, on_part: Callable[[Path], None] | None = None
    ) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        with self.http.stream("GET", url, headers={"Accept": accept}) as response:
            if response.status_code != 200:
                response.read()
                raise httpx.HTTPStatusError(
                    f"{response.status_code}: {response.text[:300]}",
                    request=response.request,
                    response=response,
                )
            _type, params = parse_content_type(response.headers.get("content-type", ""))
            parser = MultipartParser(params.get("boundary", ""))
            fh = None
            try:
                for chunk in response.iter_bytes():
                    for event in parser.feed(chunk):
                        if isinstance(event, PartStart):
                            target = out / f"{len(written) + 1:05d}{suffix}"
                            fh = target.open("wb")
                            written.append(target)
                        elif isinstance(event, PartData) and fh is not None:
                            fh.write(event.data)
                        elif fh is not None:
                            fh.close()
                            fh = None
                            if on_part is not None:
                                on_part(written[-1])
                parser.finish()
            finally:
                if fh is not None:
                    fh.close()
        return written

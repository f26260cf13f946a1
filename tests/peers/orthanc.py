"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) as a DICOM peer for tests and benchmarks.

:meth:`OrthancPeer.start` writes a JSON configuration into a work folder (storage and SQLite index
there too), starts ``Orthanc CONFIG.json`` with ``TCP_NODELAY=1`` in its environment, and waits until
``GET /system`` answers and the DICOMweb plugin is loaded. The ``orthanc`` fixture yields one peer
for the whole test session; since the ybyx front-end's port is only known per test, modalities are
(re)defined at run time with :meth:`OrthancPeer.set_modality` (``PUT /modalities/{name}``, kept in
memory when ``DicomModalitiesInDatabase`` is false).

Orthanc 1.10 specifics handled here:

* it has no bind-address option: the HTTP server and the DICOM SCP listen on every interface.
  ``RemoteAccessAllowed: false`` makes the HTTP server answer loopback clients only (so no
  authentication is needed), and the DICOM SCP only accepts C-STORE/C-FIND/... from *registered*
  modalities whose host matches (``DicomAlwaysAllowStore: false``, ``DicomCheckModalityHost: true``,
  ``DicomCheckCalledAet: true``);
* the DICOMweb plugin is found under ``/usr/share/orthanc/plugins`` (or ``/usr/lib/orthanc``);
* it saves its jobs registry on exit by default; that is switched off (``SaveJobs: false``);
* ``SynchronousCMove`` (the default) makes a C-MOVE SCU call return once every sub-operation is done.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.peers.ports import free_port

START_TIMEOUT = 30.0
STOP_GRACE = 10.0
LOG_TAIL_LINES = 40
# Retrieves and stores are synchronous REST calls: allow a large study over a slow link.
HTTP_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
)


@dataclass(frozen=True)
class Modality:
    """A remote DICOM application entity, as Orthanc's ``DicomModalities`` describes it."""

    aet: str
    host: str
    port: int

    def as_json(self) -> dict[str, Any]:
        return {"AET": self.aet, "Host": self.host, "Port": self.port, "Manufacturer": "Generic"}


class OrthancError(RuntimeError):
    """Orthanc could not be started, or a REST call did not do what it was asked to."""


def orthanc_binary() -> str:
    """The ``Orthanc`` executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise OrthancError("Orthanc not found: `make setup` installs the orthanc Debian package")
    return found


def dcmtk_binary(name: str) -> str:
    """A dcmtk tool (``storescu``, ``echoscu``, ...) — the compiled one, never a same-named script.

    pynetdicom installs Python apps called ``storescu``, ``echoscu``, ... into the venv's ``bin``, which
    comes first on ``PATH`` in an activated venv; ``shutil.which`` alone would pick those.
    """
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for folder in dict.fromkeys(d for d in dirs if d):
        candidate = Path(folder) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with candidate.open("rb") as fh:
            if fh.read(4) == b"\x7fELF":
                return str(candidate)
    raise OrthancError(f"dcmtk's {name} not found: `make setup` installs the dcmtk Debian package")


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin shared object of the ``orthanc-dicomweb`` package."""
    for pattern in PLUGIN_GLOBS:
        for match in sorted(glob.glob(pattern)):
            return Path(match)
    raise OrthancError("DICOMweb plugin not found: `make setup` installs the orthanc-dicomweb package")


def orthanc_config(
    root: Path,
    *,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Mapping[str, Modality],
    name: str = "ybyx-test-peer",
) -> dict[str, Any]:
    """The configuration of a loopback-only Orthanc keeping everything under ``root``."""
    return {
        "Name": name,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),  # the default SQLite index
        "StorageCompression": False,
        "MaximumStorageSize": 0,
        "MaximumPatientCount": 0,
        "SyncStorageArea": True,  # fsync each stored file, like ybyx does
        "OverwriteInstances": False,
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Host": "127.0.0.1",
            "Ssl": False,
        },
        "ConcurrentJobs": 2,
        "SaveJobs": False,
        "JobsHistorySize": 100,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # 1.10 cannot bind to loopback only: refuse non-local clients
        "AuthenticationEnabled": False,  # acceptable only because of the line above
        "HttpCompressionEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "ExecuteLuaEnabled": False,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "HttpTimeout": 60,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,  # only registered modalities may store into it
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalitiesInDatabase": False,
        "DicomModalities": {key: m.as_json() for key, m in modalities.items()},
        "DicomScuTimeout": 30,
        "DicomScpTimeout": 30,
        "SynchronousCMove": True,
        "UnknownSopClassAccepted": False,
        "DefaultEncoding": "Utf8",
        "StableAge": 5,
        "DeidentifyLogs": True,
    }


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(lines[-LOG_TAIL_LINES:])


class OrthancPeer:
    """A running Orthanc and a small REST client for it (``httpx``)."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        root: Path,
        aet: str,
        dicom_port: int,
        http_port: int,
        log_path: Path,
    ) -> None:
        self.proc = proc
        self.root = root
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{http_port}"
        self.http = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT)

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        root: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Modality] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> OrthancPeer:
        """Configure and start Orthanc in ``root``; return once it answers REST calls."""
        root.mkdir(parents=True, exist_ok=True)
        dicom_port = free_port()
        http_port = free_port()
        while http_port == dicom_port:
            http_port = free_port()
        config = orthanc_config(
            root, aet=aet, dicom_port=dicom_port, http_port=http_port, modalities=modalities or {}
        )
        config_path = root / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        log_path = root / "orthanc.log"
        environment = {**os.environ, **(env or {}), "TCP_NODELAY": "1"}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [orthanc_binary(), str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=environment,
            )
        peer = cls(proc, root, aet, dicom_port, http_port, log_path)
        try:
            peer._wait_ready()
        except BaseException:
            peer.stop()
            raise
        return peer

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with code {self.proc.returncode} before becoming ready; "
                    f"log tail:\n{_log_tail(self.log_path)}"
                )
            try:
                response = self.http.get("/system", timeout=2.0)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                last_error = exc
                time.sleep(0.1)
                continue
            plugins = self.http.get("/plugins").json()
            if "dicom-web" not in plugins:
                raise OrthancError(
                    f"Orthanc started without the DICOMweb plugin (plugins: {plugins}); "
                    f"log tail:\n{_log_tail(self.log_path)}"
                )
            return
        raise OrthancError(
            f"Orthanc on {self.url} not ready after {START_TIMEOUT:.0f}s "
            f"(last error: {last_error!r}); log tail:\n{_log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after a grace period) and close the client."""
        self.http.close()
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self) -> str:
        return _log_tail(self.log_path)

    # ---- REST helpers ----------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise OrthancError(f"{method} {path}: HTTP {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/system")
        return result

    def set_modality(self, name: str, modality: Modality) -> None:
        """Define (or redefine) a remote modality at run time: ``PUT /modalities/{name}``."""
        self._call("PUT", f"/modalities/{name}", json=modality.as_json())

    def modalities(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/modalities", params={"expand": ""})
        return result

    def echo(self, modality: str) -> None:
        """C-ECHO to a modality (raises on failure)."""
        self._call("POST", f"/modalities/{modality}/echo", json={})

    def upload(self, path: Path) -> str:
        """``POST /instances`` with one Part-10 file; returns Orthanc's instance ID."""
        result = self._call(
            "POST",
            "/instances",
            content=Path(path).read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        if result.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload of {path} failed: {result}")
        return str(result["ID"])

    def upload_all(self, paths: Iterable[Path]) -> list[str]:
        return [self.upload(p) for p in paths]

    def store_to(self, modality: str, resources: Iterable[str]) -> dict[str, Any]:
        """C-STORE Orthanc resources (any level) to a modality, synchronously; returns the job result."""
        result: dict[str, Any] = self._call(
            "POST", f"/modalities/{modality}/store", json={"Resources": list(resources), "Synchronous": True}
        )
        failed = int(result.get("FailedInstancesCount", 0))
        if failed:
            raise OrthancError(f"store to {modality}: {failed} instance(s) failed: {result}")
        return result

    def query(self, modality: str, level: str, query: Mapping[str, str]) -> str:
        """C-FIND SCU to a modality; returns the query ID (``/queries/{id}``)."""
        result = self._call(
            "POST", f"/modalities/{modality}/query", json={"Level": level, "Query": dict(query)}
        )
        return str(result["ID"])

    def query_answers(self, query_id: str) -> list[dict[str, Any]]:
        """The C-FIND answers of a query, tag names as keys (``?simplify``)."""
        answers: list[dict[str, Any]] = self._call(
            "GET", f"/queries/{query_id}/answers", params={"expand": "", "simplify": ""}
        )
        return answers

    def retrieve(self, query_id: str, target_aet: str | None = None) -> dict[str, Any]:
        """C-MOVE every answer of a query to ``target_aet`` (default: this Orthanc), synchronously."""
        result: dict[str, Any] = self._call(
            "POST",
            f"/queries/{query_id}/retrieve",
            json={"TargetAet": target_aet or self.aet, "Synchronous": True},
        )
        return result

    def move_from(
        self, modality: str, level: str, query: Mapping[str, str], target_aet: str | None = None
    ) -> dict[str, Any]:
        """C-MOVE SCU: ask a modality to send what ``query`` names to ``target_aet`` (default: us)."""
        result: dict[str, Any] = self._call(
            "POST",
            f"/modalities/{modality}/move",
            json={
                "Level": level,
                "Resources": [dict(query)],
                "TargetAet": target_aet or self.aet,
                "Synchronous": True,
            },
        )
        return result

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        ids: list[str] = self._call("GET", "/instances")
        return ids

    def sop_instance_uids(self, study_uid: str | None = None) -> dict[str, str]:
        """SOP Instance UID -> Orthanc instance ID, of everything (or of one study)."""
        query = {"StudyInstanceUID": study_uid} if study_uid else {}
        found: list[dict[str, Any]] = self._call(
            "POST", "/tools/find", json={"Level": "Instance", "Query": query, "Expand": True}
        )
        return {str(item["MainDicomTags"]["SOPInstanceUID"]): str(item["ID"]) for item in found}

    def instance_file(self, instance_id: str) -> bytes:
        """The stored Part-10 file of an instance."""
        response = self.http.get(f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content

    def count_instances(self) -> int:
        return int(self._call("GET", "/statistics")["CountInstances"])

    def study_id(self, study_uid: str) -> str:
        """Orthanc's ID of the study with this Study Instance UID (raises if Orthanc has none)."""
        found: list[str] = self._call(
            "POST", "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        )
        if len(found) != 1:
            raise OrthancError(f"Orthanc holds {len(found)} studies with UID {study_uid}")
        return found[0]

    # ---- the DICOMweb plugin as a client (``/dicom-web/servers/...``) ----------------------------

    def set_dicomweb_server(self, name: str, url: str, headers: Mapping[str, str] | None = None) -> None:
        """Define a remote DICOMweb server at run time (``PUT /dicom-web/servers/{name}``).

        ``url`` is the DICOMweb root (``http://host:port/dicom-web``); the plugin wants it to end
        in ``/``. Kept in memory (``DicomWeb.ServersInDatabase`` is off), like ``set_modality``.
        ``headers`` are sent with every request (``HttpHeaders``: e.g. a bearer token).
        """
        server: dict[str, Any] = {"Url": url.rstrip("/") + "/"}
        if headers:
            server["HttpHeaders"] = dict(headers)
        self._call("PUT", f"/dicom-web/servers/{name}", json=server)

    def dicomweb_retrieve(self, server: str, study_uid: str, series_uid: str | None = None) -> dict[str, Any]:
        """Pull a study (or one series) from a DICOMweb server by WADO-RS into this Orthanc, synchronously.

        Returns the plugin's answer, e.g. ``{"ReceivedInstancesCount": "12", "NetworkUsageMB": "6"}``.
        """
        resource = {"Study": study_uid, **({"Series": series_uid} if series_uid else {})}
        result: dict[str, Any] = self._call(
            "POST", f"/dicom-web/servers/{server}/retrieve", json={"Resources": [resource]}
        )
        return result

    def dicomweb_stow(self, server: str, resources: Iterable[str]) -> dict[str, Any]:
        """Push Orthanc resources (IDs, any level) to a DICOMweb server by STOW-RS, synchronously.

        Returns the plugin's answer, e.g. ``{"InstancesCount": "20", "NetworkSizeMB": "2"}``; a
        refusal by the server surfaces as :class:`OrthancError` (the plugin answers HTTP 500).
        """
        result: dict[str, Any] = self._call(
            "POST",
            f"/dicom-web/servers/{server}/stow",
            json={"Resources": list(resources), "Synchronous": True},
        )
        return result

    def dicomweb_qido(
        self, server: str, uri: str, arguments: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """QIDO-RS through the plugin: ``uri`` relative to the server's root (``/studies``).

        Answers are DICOM JSON objects as the plugin reformats them: tag → ``{"Name", "vr",
        "Value"}`` with ``Value`` a string for single values, a PN's Alphabetic group only, and
        (plugin 1.7) ``null`` for IS/DS values the server encoded as JSON numbers.
        """
        answers: list[dict[str, Any]] = self._call(
            "POST",
            f"/dicom-web/servers/{server}/qido",
            json={"Uri": uri, "Arguments": dict(arguments or {})},
        )
        return answers

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self._call("GET", "/patients"):
            self._call("DELETE", f"/patients/{patient}")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancPeer]:
    """A started Orthanc for the session; tests register their modalities with ``set_modality``."""
    peer = OrthancPeer.start(tmp_path_factory.mktemp("orthanc"), aet="ORTHANC_T")
    try:
        yield peer
    finally:
        peer.stop()

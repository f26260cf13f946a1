"""``ybyx demo``: the one-machine demo — the national index and two provinces on loopback.

Province A (``[center]`` + ``[frontend]``): sample studies are written once, sent to the front-end
by C-STORE and forwarded to the center by STOW-RS; the HIS's exam record of the sample patient's
CT goes the same way, so center A registers that study at the national index (R-CE-9). Province B
(``[center_b]`` + ``[frontend_b]``, issue 5 §9): a doctor there is authorized by the patient's
insurance QR code (signed by a key pair the demo makes on each start, standing in for the
insurance platform, R-RT-4), sees the history (R-RT-1) and fetches the study: front-end B → center
B → index lookup → center A by WADO-RS (R-CE-7); the retrieval record reaches the index (R-SE-11).

Every credential between the nodes is generated here (issue 6 §1): each link's client is
registered in the callee's client registry and its secret written to the file the caller's config
names (mode 600), on first run; the HIS, doctor, viewer and index clients get a new secret on
every run, printed once, and so does the demo doctor account at front-end B (a user of its
institution whom the grant names: its viewer link carries that user's token). A demo config
without ``[index]`` runs province A alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydicom import dcmread
from rich.console import Console

from dimse.scu import dicom_files, send
from gateway.center import Center
from gateway.config import CenterConfig, DemoConfig, FrontendConfig, IndexConfig
from gateway.frontend import Frontend
from gateway.grants import sign_qr
from gateway.identity import IdType, load_key, person_key, resident_id_check
from gateway.sample import ZHANG_SAN, write_samples
from gateway.security.clients import ClientRegistry
from gateway.security.credentials import ClientCredentials, write_secret
from gateway.security.passwords import generate as generate_password
from gateway.security.permissions import Role
from gateway.security.users import UserStore
from index.service import NationalIndex

console = Console()
CST = timezone(timedelta(hours=8))


def load_samples(fe: Frontend, folder: Path) -> int:
    """Write the sample studies (once) and C-STORE them into the running front-end."""
    if not any(folder.rglob("*.dcm")):
        write_samples(folder)
    files = dicom_files([folder])
    report = send(files, "127.0.0.1", fe.dicom_port, fe.cfg.dicom.ae_title, calling_ae="YBYX_DEMO")
    if not report.ok:
        first = next(iter(report.failed.values()))
        raise RuntimeError(f"{len(report.failed)} sample files were not stored: {first}")
    return len(report.sent)


class Stopped(Exception):
    """Ctrl-C (or SIGTERM) came during the start-up: stop every node started so far."""


def _never() -> bool:
    return False


def wait_forwarded(
    fe: Frontend, timeout: float = 120, stopping: Callable[[], bool] = _never
) -> dict[str, float]:
    """Wait until the front-end's outbox is confirmed (or the timeout); the outbox metrics."""
    assert fe.forwarder is not None
    deadline = time.monotonic() + timeout
    while True:
        if stopping():
            raise Stopped
        m = fe.forwarder.metrics()
        if m["queued"] + m["sending"] + m["sent"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.3)


# What each link's client may do at its callee (docs/index.md "Who calls whom").
FORWARDER_SCOPES = "stow api:inventory api:manifest api:exams"
FRONTEND_AT_CENTER = (
    f"{FORWARDER_SCOPES} index:lookup index:retrievals api:cache-requests api:fetch wado qido"
)
CENTER_AT_INDEX = "index:register index:lookup index:retrievals"
CENTER_AT_CENTER = "wado qido api:fetch"
HIS_SCOPES = "api:exams api:monitoring api:forwarding api:grants metrics"
VIEWER_SCOPES = "qido wado"
DOCTOR_SCOPES = "api:doctor qido wado"
INDEX_READER_SCOPES = "index:lookup index:retrievals"
DOCTOR = "DR-B-001"  # the demo doctor at province B's hospital


def demo_client(registry: ClientRegistry, client_id: str, scopes: str) -> str:
    """A fresh secret for the demo client ``client_id`` (registered on first use)."""
    if registry.get(client_id) is not None:
        return registry.reset_secret(client_id)
    return registry.add(client_id, scopes, client_id=client_id)[1]


def link_client(registry: ClientRegistry, client_id: str, secret_file: Path, scopes: str) -> None:
    """Make sure the callee's ``registry`` knows the caller's client and ``secret_file`` holds its
    secret: registered (or its secret reset) and written on first run, kept afterwards."""
    known = registry.get(client_id)
    if known is not None and known.active and secret_file.exists():
        return
    secret = demo_client(registry, client_id, scopes)
    secret_file.unlink(missing_ok=True)
    write_secret(secret_file, secret)


def _forward_client(callee: Center, fe: FrontendConfig, scopes: str) -> None:
    forward = fe.forward
    if forward.client_id is not None and forward.client_secret_file is not None:
        link_client(callee.security.clients, forward.client_id, forward.client_secret_file, scopes)


def _index_client(index: NationalIndex, center: CenterConfig) -> None:
    if center.index is not None:
        link_client(
            index.security.clients, center.index.client_id, center.index.client_secret_file, CENTER_AT_INDEX
        )


def _fe_url(fe: Frontend) -> str:
    return f"http://127.0.0.1:{fe.http_port}"


@dataclass
class Caller:
    """A demo client calling one node over HTTP with client-credentials tokens."""

    base: str
    client_id: str
    secret: str

    def __post_init__(self) -> None:
        auth = ClientCredentials(f"{self.base}/oauth/token", self.client_id, self.secret)
        self.http = httpx.Client(base_url=self.base, auth=auth, timeout=60)

    def token(self) -> str:
        """A fresh access token (for the viewer's ``#token=``)."""
        r = httpx.post(
            f"{self.base}/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=(self.client_id, self.secret),
            timeout=30,
        )
        r.raise_for_status()
        return str(r.json()["access_token"])

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if not r.is_success:
            raise RuntimeError(f"{method} {self.base}{path}: {r.status_code} {r.text[:300]}")
        return r.json()


def demo_doctor(fe: Frontend, username: str) -> str:
    """The demo doctor's account at ``fe`` (its institution; R-SE-1): made on first run, a new
    generated password on every run — returned to be printed once, stored only as a hash."""
    store = UserStore(fe.archive.catalog)
    password = generate_password()
    if store.get(username) is None:
        store.create(username, Role.DOCTOR, password, institution=fe.cfg.institution)
    else:
        store.set_password(username, password)
    return password


def login(base: str, username: str, password: str) -> str:
    """``POST /auth/login`` (from loopback: an internal network, no TOTP); the user's token."""
    r = httpx.post(f"{base}/auth/login", json={"username": username, "password": password}, timeout=30)
    if not r.is_success:
        raise RuntimeError(f"POST {base}/auth/login as {username}: {r.status_code} {r.text[:300]}")
    return str(r.json()["access_token"])


def sample_patient_id() -> str:
    """A synthetic, valid resident ID for the sample patient 张三 (born 1968-03-15, male)."""
    first17 = "110105" + ZHANG_SAN.birth_date.strftime("%Y%m%d") + "001"
    return first17 + resident_id_check(first17)


def post_exam_record(his: Caller, fe: FrontendConfig, ct_file: Path) -> str:
    """The HIS's exam record of the sample CT (R-FE-3) at front-end A; its Study Instance UID."""
    ds = dcmread(ct_file, stop_before_pixels=True)
    at = datetime.strptime(f"{ds.StudyDate}{ds.StudyTime[:6]}", "%Y%m%d%H%M%S").replace(tzinfo=CST)
    his.ok(
        "POST",
        "/api/v1/exams",
        json={
            "hospital_code": fe.institution,
            "hospital_level": "三级甲等",
            "accession_number": str(ds.AccessionNumber),
            "study_uid": str(ds.StudyInstanceUID),
            "id_type": IdType.RESIDENT_ID.value,
            "id_number": sample_patient_id(),
            "patient_name": "张三",
            "exam_item_code": "CT001",
            "exam_item_name": "胸部CT平扫",
            "body_part": "CHEST",
            "device": "CT0000000001A",
            "modality": "CT",
            "description": "双肺纹理清晰，未见明显实变影。",
            "diagnosis": "胸部CT平扫未见明显异常。",
            "exam_time": at.isoformat(),
            "report_time": (at + timedelta(hours=2)).isoformat(),
            "visit_type": "outpatient",
        },
    )
    return str(ds.StudyInstanceUID)


def _until(
    what: str, probe: Callable[[], Any], timeout: float = 60, stopping: Callable[[], bool] = _never
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if stopping():
            raise Stopped
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"the demo gave up waiting for {what} after {timeout:g} s")
        time.sleep(0.2)


@dataclass
class CrossProvince:
    """What the cross-province part did, for the summary."""

    person: str
    study: str
    records: list[dict[str, Any]]
    history: dict[str, Any]
    fetch: dict[str, Any]
    fetch_seconds: float
    retrieval: dict[str, Any]
    instances_b: int
    qr: str


def insurance_platform(cfg: FrontendConfig) -> Ed25519PrivateKey:
    """The demo's stand-in for the insurance platform: a key pair made on each start (the private
    half only in memory), its public half written where ``[grants]`` of ``cfg`` expects it."""
    platform = Ed25519PrivateKey.generate()
    pem = platform.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    for path in cfg.grants.insurance_qr_public_keys[:1]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pem)
    return platform


def cross_province(
    index_reader: Caller,
    his_b: Caller,
    doctor_b: Caller,
    fe_b: Frontend,
    platform: Ed25519PrivateKey,
    person: str,
    study: str,
    stopping: Callable[[], bool] = _never,
) -> CrossProvince:
    """Province B's doctor: grant → history → fetch the study held in province A (issue 5 §9)."""
    records = _until(
        "the index record of the sample CT (center A registers it once the images and exam record are in)",
        lambda: index_reader.ok("GET", "/api/v1/index-records", params={"person": person}),
        stopping=stopping,
    )
    now = int(time.time())
    claims = {"person": person, "institution": fe_b.cfg.institution, "doctor": DOCTOR}
    qr = sign_qr(platform, {"jti": f"demo-{uuid.uuid4()}", "iat": now - 5, "exp": now + 3600, **claims})
    his_b.ok("POST", "/api/v1/grants", json={"method": "insurance-qr", "evidence": qr})
    today = datetime.now(CST).date().isoformat()
    path = f"/api/v1/patients/{person}"
    history = doctor_b.ok("GET", f"{path}/history", params={"visit": today, "doctor": DOCTOR})
    since, started = datetime.now(UTC), time.monotonic()
    fetch = doctor_b.ok("POST", f"{path}/studies/{study}/fetch", params={"doctor": DOCTOR})
    took = time.monotonic() - started

    def retrieved() -> dict[str, Any] | None:  # this run's record (newest first)
        rows = index_reader.ok(
            "GET", "/api/v1/retrievals", params={"person": person, "institution": fe_b.cfg.institution}
        )
        return next(
            (
                r
                for r in rows
                if r["action"] == "retrieve"
                and r["result"] == "allowed"
                and r["study_uid"] == study
                and datetime.fromisoformat(r["at"]) >= since - timedelta(seconds=1)
            ),
            None,
        )

    retrieval = _until("the retrieval record at the index", retrieved, timeout=30, stopping=stopping)
    held = len(fe_b.archive.catalog.locate({"StudyInstanceUID": study}))
    # a fresh QR for the user's own curl (the key stays in memory: valid until it expires)
    user_qr = sign_qr(platform, {"jti": f"demo-{uuid.uuid4()}", "iat": now - 5, "exp": now + 3600, **claims})
    return CrossProvince(person, study, records, history, fetch, took, retrieval, held, user_qr)


@dataclass(frozen=True)
class Starters:
    """How the CLI starts each role (a start failure becomes a config problem there)."""

    index: Callable[[IndexConfig], NationalIndex]
    center: Callable[[CenterConfig], Center]
    frontend: Callable[[FrontendConfig], Frontend]


GET_TOKEN = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])'"


def _token_line(var: str, caller: Caller) -> str:
    return (
        f"  {var}=$(curl -s -u {caller.client_id}:{caller.secret} -d grant_type=client_credentials \\\n"
        f"        {caller.base}/oauth/token | {GET_TOKEN})"
    )


def run_demo(
    cfg: DemoConfig,
    *,
    start: Starters,
    wait: Callable[[], None],
    stopping: Callable[[], bool] = _never,
    config_path: str = "config/demo.toml",
) -> int:
    """Start the nodes (index, centers, front-ends), load the samples, show the cross-province
    retrieval, print what to try, wait for Ctrl-C; every node is stopped on the way out, also
    when Ctrl-C comes during the start-up (``stopping`` says so; checked between the steps)."""
    with ExitStack() as nodes:
        nodes.callback(lambda: console.print("demo stopped"))
        try:
            _run(cfg, nodes, start, wait, stopping, config_path)
        except Stopped:
            console.print("interrupted during the start-up")
    return 0


def _run(
    cfg: DemoConfig,
    nodes: ExitStack,
    start: Starters,
    wait: Callable[[], None],
    stopping: Callable[[], bool],
    config_path: str,
) -> None:
    def step() -> None:
        if stopping():
            raise Stopped

    index = None
    if cfg.index is not None:
        index = start.index(cfg.index)
        nodes.callback(index.stop)
        step()
        for c in (cfg.center, cfg.center_b):
            if c is not None:
                _index_client(index, c)
    center = start.center(cfg.center)
    nodes.callback(center.stop)
    step()
    _forward_client(center, cfg.frontend, FRONTEND_AT_CENTER)
    center_b = fe_b = platform = None
    if cfg.center_b is not None and cfg.frontend_b is not None:
        for peer in cfg.center_b.center_peers:
            if peer.province == cfg.center.province:  # B fetches A's studies as A's client
                link_client(
                    center.security.clients, peer.client_id, peer.client_secret_file, CENTER_AT_CENTER
                )
        center_b = start.center(cfg.center_b)
        nodes.callback(center_b.stop)
        step()
        _forward_client(center_b, cfg.frontend_b, FRONTEND_AT_CENTER)
        platform = insurance_platform(cfg.frontend_b)
    fe = start.frontend(cfg.frontend)
    nodes.callback(fe.stop)
    step()
    if cfg.frontend_b is not None:
        fe_b = start.frontend(cfg.frontend_b)
        nodes.callback(fe_b.stop)
        step()

    web = _fe_url(fe)
    his = Caller(web, "demo-his", demo_client(fe.security.clients, "demo-his", HIS_SCOPES))
    viewer = Caller(web, "demo-viewer", demo_client(fe.security.clients, "demo-viewer", VIEWER_SCOPES))
    samples = cfg.frontend.storage.path.parent.parent / "samples"
    if not any(samples.rglob("*.dcm")):
        write_samples(samples)
    study = post_exam_record(his, cfg.frontend, min((samples / "01_CT_chest").glob("*.dcm")))
    n = load_samples(fe, samples)
    step()
    m = wait_forwarded(fe, stopping=stopping)
    held = center.archive.catalog.counts()
    lines = [
        "",
        "ybyx demo is running" + (" — the national index and two provinces" if index else ""),
    ]
    if index is not None:
        lines.append(f"  national index     {index.url}")
    lines += [
        f"  province {cfg.center.province} (A)   center {center.url}; front-end "
        f"{cfg.frontend.institution}: HTTP {web}, DICOM AE {fe.cfg.dicom.ae_title} "
        f"127.0.0.1:{fe.dicom_port}",
    ]
    if center_b is not None and fe_b is not None:
        lines.append(
            f"  province {center_b.cfg.province} (B)   center {center_b.url}; front-end "
            f"{fe_b.cfg.institution}: HTTP {_fe_url(fe_b)}, DICOM AE {fe_b.cfg.dicom.ae_title} "
            f"127.0.0.1:{fe_b.dicom_port}"
        )
    lines += [
        f"sent {n} sample instances to front-end A; forwarded studies confirmed: {m['confirmed']:g}, "
        f"failed: {m['failed']:g};",
        f"the center holds {held['studies']} studies, {held['instances']} instances.",
    ]
    tries: list[str] = []
    views = [f"  front-end A, the sample CT:  {web}/viewer/?study={study}#token={viewer.token()}"]
    if index is not None and fe_b is not None and platform is not None:
        key_file = cfg.frontend.identity.key_file
        assert key_file is not None
        person = person_key(IdType.RESIDENT_ID, sample_patient_id(), load_key(key_file))
        web_b = _fe_url(fe_b)
        reader = Caller(
            index.url,
            "demo-index",
            demo_client(index.security.clients, "demo-index", INDEX_READER_SCOPES),
        )
        his_b = Caller(web_b, "demo-his", demo_client(fe_b.security.clients, "demo-his", HIS_SCOPES))
        doctor = Caller(
            web_b, "demo-doctor", demo_client(fe_b.security.clients, "demo-doctor", DOCTOR_SCOPES)
        )
        x = cross_province(reader, his_b, doctor, fe_b, platform, person, study, stopping)
        lines += _cross_summary(x, fe_b)
        password = demo_doctor(fe_b, DOCTOR)
        views += [
            f"  front-end B, fetched from A: {web_b}/viewer/?study={study}"
            f"#token={login(web_b, DOCTOR, password)}",
            f"  (signed in as the demo doctor {DOCTOR}, whom the patient's grant names; password "
            f"{password} — new on each run, shown only here;",
            f"   a new token: curl -s -H 'Content-Type: application/json' "
            f'-d \'{{"username": "{DOCTOR}", "password": "{password}"}}\' {web_b}/auth/login)',
        ]
        today = datetime.now(CST).date().isoformat()
        tries += [
            "The national index and province B's doctor (the grant above is valid for an hour):",
            _token_line("INDEX", reader),
            f'  curl -H "Authorization: Bearer $INDEX" \\\n'
            f"       '{index.url}/api/v1/index-records?person={person}'",
            f"  curl -H \"Authorization: Bearer $INDEX\" '{index.url}/api/v1/retrievals?result=allowed'",
            _token_line("DOCTOR", doctor),
            f'  curl -H "Authorization: Bearer $DOCTOR" \\\n'
            f"       '{web_b}/api/v1/patients/{person}/history?visit={today}&doctor={DOCTOR}'",
            f'  curl -X POST -H "Authorization: Bearer $DOCTOR" \\\n'
            f"       '{web_b}/api/v1/patients/{person}/studies/{study}/fetch?doctor={DOCTOR}'",
            f"  curl -H \"Authorization: Bearer $DOCTOR\" '{web_b}/dicom-web/studies/{study}/series'",
            "  a fresh patient grant (another QR code, signed by this run's demo insurance key):",
            _token_line("HIS_B", his_b),
            f"  curl -H \"Authorization: Bearer $HIS_B\" -H 'Content-Type: application/json' \\\n"
            f'       -d \'{{"method": "insurance-qr", "evidence": "{x.qr}"}}\' {web_b}/api/v1/grants',
        ]
    ae, port = fe.cfg.dicom.ae_title, fe.dicom_port
    lifetime = cfg.frontend.security.token_lifetime_seconds
    lines += [
        "",
        f"Open in a browser (the tokens in the links last {lifetime // 60} minutes; "
        "the curl lines below get new ones):",
        *views,
        "",
        "Try (dcmtk, front-end A):",
        f"  echoscu -aec {ae} 127.0.0.1 {port}",
        f"  storescu -aec {ae} -aet MYSCU +sd +r 127.0.0.1 {port} {samples}",
        f"  findscu -S -aec {ae} -k QueryRetrieveLevel=STUDY -k PatientName= -k StudyDate= \\",
        f"          -k StudyInstanceUID= 127.0.0.1 {port}",
        f"  getscu -S -aec {ae} -od /tmp/ybyx-get -k QueryRetrieveLevel=STUDY \\",
        f"          -k PatientID={ZHANG_SAN.patient_id} 127.0.0.1 {port}",
        "DICOMweb and the APIs (curl) with OAuth 2.0 client-credentials tokens (every route but",
        "/healthz needs one; these demo secrets are new on each run and shown only here):",
        _token_line("VIEWER", viewer),
        f'  curl -H "Authorization: Bearer $VIEWER" \\\n'
        f"       '{web}/dicom-web/studies?PatientName=zhang&fuzzymatching=true'",
        _token_line("HIS", his),
        f"  curl -H \"Authorization: Bearer $HIS\" '{web}/api/v1/forwarding'",
        f"  curl -H \"Authorization: Bearer $HIS\" '{web}/metrics'",
        *tries,
        f'  ybyx clients add NAME --scopes "qido wado" -c {config_path} --role frontend  # more',
        "Or with ybyx itself:",
        f"  ybyx send {samples} --to {ae}@127.0.0.1:{port}",
        "",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)
    wait()


def _cross_summary(x: CrossProvince, fe_b: Frontend) -> list[str]:
    rec = next((r for r in x.records if r["study_uid"] == x.study), x.records[0])
    r = x.retrieval
    return [
        "",
        "Cross-province retrieval with a patient grant (issue 5 §9):",
        f"  index records of 张三 (pseudonym {x.person[:12]}…): {len(x.records)} — "
        f"{rec['modality']} {rec['body_part']} {_iso(rec['exam_date'])} at {rec['hospital_code']}, "
        f"held by province {rec['province']}",
        f"  grant: insurance QR code (signed by the demo's stand-in platform key) for "
        f"{fe_b.cfg.institution}, doctor {DOCTOR}, 1 hour",
        f"  history at front-end B: {len(x.history['studies'])} study(ies) from {x.history['from']} to "
        f"{x.history['to']}",
        f"  fetch at front-end B: source {x.fetch['source']} in {x.fetch_seconds:.2f} s; front-end B now "
        f"holds {x.instances_b} instances of {x.study}",
        *(
            ["  (held since an earlier run: delete var/demo to see the fetch through the index again)"]
            if x.fetch["source"] == "local"
            else []
        ),
        f"  retrieval record at the index: {r['action']} {r['result']} by {r['institution']} / "
        f"{r['doctor']}, grant {r['grant_id']}, node {r['node']}",
    ]


def _iso(day: str) -> str:
    """``YYYYMMDD`` (the index's exam date) as ``YYYY-MM-DD``."""
    return f"{day[:4]}-{day[4:6]}-{day[6:]}" if len(day) == 8 else day

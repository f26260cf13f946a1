"""Transport security (issue 6 §6, R-SE-5): DICOM TLS with dcmtk and our own SCU, HTTPS with a
client that checks the certificate (and fails against another CA), mutual TLS that refuses a
client without a certificate, and the front-end forwarding to an HTTPS center it verifies.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]
from sqlalchemy import select

from dimse.reactor_gate import AE
from dimse.scu import send
from gateway.archive.schema import forward_jobs
from gateway.center import Center
from gateway.config import TlsSection
from gateway.frontend import Frontend
from gateway.security.tls import DevCerts, client_context, write_dev_certs
from tests.conftest import center_config, dcmtk, forward_to, frontend_config


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return write_dev_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    """A second, unrelated development CA: nothing of ours chains to it."""
    return write_dev_certs(tmp_path_factory.mktemp("other-certs"))


def dicom_tls(certs: DevCerts, *, mutual: bool = False) -> dict[str, Any]:
    return {
        "cert_file": str(certs.server),
        "key_file": str(certs.server_key),
        "ca_file": str(certs.ca),
        "require_client_cert": mutual,
    }


def http_tls(certs: DevCerts, *, mutual: bool = False) -> TlsSection:
    return TlsSection.model_validate(dicom_tls(certs, mutual=mutual))


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[[Any], Any]]:
    """Start a role from a config (stopped after the test)."""
    started: list[Frontend | Center] = []

    def start(cfg: Any) -> Any:
        node = Frontend.start(cfg) if cfg.role == "frontend" else Center.start(cfg)
        started.append(node)
        return node

    yield start
    for node in reversed(started):
        node.stop()


def storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("storescu"), "-aec", "YBYX", *tls, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---- DICOM TLS --------------------------------------------------------------------------------


def test_dcmtk_storescu_stores_over_dicom_tls(
    start_frontend: Callable[..., Frontend], samples: Path, certs: DevCerts
) -> None:
    fe = start_frontend(tls=dicom_tls(certs))
    [dx] = sorted((samples / "03_DX_chest").iterdir())
    plain = storescu(fe.dicom_port, dx)  # a plain-TCP peer gets nowhere
    assert plain.returncode != 0
    assert fe.archive.catalog.counts()["instances"] == 0
    secure = storescu(
        fe.dicom_port, dx, "+tls", str(certs.client_key), str(certs.client), "-pw", "+cf", str(certs.ca)
    )
    assert secure.returncode == 0, secure.stderr
    [inst] = fe.archive.catalog.locate({})
    assert inst.sop_uid == str(dcmread(dx, stop_before_pixels=True).SOPInstanceUID)


def test_our_scu_checks_the_scp_certificate(
    start_frontend: Callable[..., Frontend], samples: Path, certs: DevCerts, other_ca: DevCerts
) -> None:
    fe = start_frontend(tls=dicom_tls(certs))
    files = sorted((samples / "02_MR_brain").iterdir())[:2]
    wrong = send(files, "127.0.0.1", fe.dicom_port, "YBYX", tls=client_context(other_ca.ca))
    assert not wrong.ok and fe.archive.catalog.counts()["instances"] == 0
    right = send(files, "127.0.0.1", fe.dicom_port, "YBYX", tls=client_context(certs.ca))
    assert right.ok, right.failed
    assert fe.archive.catalog.counts()["instances"] == 2


def test_mutual_dicom_tls_refuses_a_peer_without_certificate(
    start_frontend: Callable[..., Frontend], samples: Path, certs: DevCerts
) -> None:
    fe = start_frontend(tls=dicom_tls(certs, mutual=True))
    [dx] = sorted((samples / "03_DX_chest").iterdir())
    anonymous = storescu(fe.dicom_port, dx, "+tla", "+cf", str(certs.ca))
    assert anonymous.returncode != 0
    assert fe.archive.catalog.counts()["instances"] == 0
    ok = storescu(
        fe.dicom_port, dx, "+tls", str(certs.client_key), str(certs.client), "-pw", "+cf", str(certs.ca)
    )
    assert ok.returncode == 0, ok.stderr
    assert fe.archive.catalog.counts()["instances"] == 1


def test_c_move_to_a_tls_destination(
    start_frontend: Callable[..., Frontend], samples: Path, certs: DevCerts, tmp_path: Path
) -> None:
    """C-MOVE sub-operations go over DICOM TLS to a destination marked ``tls`` (dcmtk storescp)."""
    from tests.peers.ports import free_port

    port = free_port()
    out = tmp_path / "moved"
    out.mkdir()
    scp = subprocess.Popen(
        [
            dcmtk("storescp"),
            "+tls",
            str(certs.server_key),
            str(certs.server),
            "-pw",
            "+cf",
            str(certs.ca),
            "-aet",
            "DEST",
            "-od",
            str(out),
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        fe = start_frontend(
            tls=dicom_tls(certs),
            move_destinations=[{"ae_title": "DEST", "host": "127.0.0.1", "port": port, "tls": True}],
        )
        [dx] = sorted((samples / "03_DX_chest").iterdir())
        assert send([dx], "127.0.0.1", fe.dicom_port, "YBYX", tls=client_context(certs.ca)).ok
        study = str(dcmread(dx, stop_before_pixels=True).StudyInstanceUID)
        # dcmtk's movescu has no TLS: the C-MOVE request comes from pynetdicom over TLS
        ae = AE(ae_title="MOVER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate(
            "127.0.0.1",
            fe.dicom_port,
            ae_title="YBYX",
            tls_args=(
                client_context(certs.ca, cert_file=certs.client, key_file=certs.client_key),
                "127.0.0.1",
            ),
        )
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study
        statuses = [
            int(s.Status)
            for s, _ in assoc.send_c_move(query, "DEST", StudyRootQueryRetrieveInformationModelMove)
            if s
        ]
        assoc.release()
        assert statuses[-1] == 0, [hex(s) for s in statuses]
        deadline = time.monotonic() + 10
        while not list(out.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        [got] = list(out.iterdir())
        assert dcmread(got).SOPInstanceUID == dcmread(dx).SOPInstanceUID
    finally:
        scp.terminate()
        scp.wait(10)


# ---- HTTPS ---------------------------------------------------------------------------------------


def test_https_is_verified_against_the_configured_ca(
    run: Callable[[Any], Any], tmp_path: Path, certs: DevCerts, other_ca: DevCerts
) -> None:
    cfg = frontend_config(tmp_path / "fe")
    fe = run(cfg.model_copy(update={"http": cfg.http.model_copy(update={"tls": http_tls(certs)})}))
    url = f"https://127.0.0.1:{fe.http_port}/healthz"
    assert httpx.get(url, verify=client_context(certs.ca)).json()["status"] == "ok"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url, verify=client_context(other_ca.ca))
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port gets nothing
        httpx.get(f"http://127.0.0.1:{fe.http_port}/healthz")


def test_mutual_tls_refuses_a_client_without_certificate(
    run: Callable[[Any], Any], tmp_path: Path, certs: DevCerts
) -> None:
    cfg = frontend_config(tmp_path / "fe")
    fe = run(
        cfg.model_copy(update={"http": cfg.http.model_copy(update={"tls": http_tls(certs, mutual=True)})})
    )
    url = f"https://127.0.0.1:{fe.http_port}/healthz"
    with pytest.raises(httpx.TransportError):
        httpx.get(url, verify=client_context(certs.ca))
    with_cert = client_context(certs.ca, cert_file=certs.client, key_file=certs.client_key)
    assert httpx.get(url, verify=with_cert).status_code == 200


def _job(fe: Frontend) -> Any:
    with fe.archive.catalog.engine.connect() as conn:
        return conn.execute(select(forward_jobs.c.state, forward_jobs.c.last_error)).first()


def test_front_end_forwards_to_an_https_center_it_verifies(
    run: Callable[[Any], Any], tmp_path: Path, samples: Path, certs: DevCerts, other_ca: DevCerts
) -> None:
    ccfg = center_config(tmp_path / "center")
    center = run(ccfg.model_copy(update={"http": ccfg.http.model_copy(update={"tls": http_tls(certs)})}))
    assert center.url.startswith("https://")
    fast = {"settle_seconds": 0.2, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0}
    [dx] = sorted((samples / "03_DX_chest").iterdir())

    wrong = run(
        frontend_config(tmp_path / "fe-wrong", forward=forward_to(center, ca_file=str(other_ca.ca), **fast))
    )
    assert send([dx], "127.0.0.1", wrong.dicom_port, "YBYX").ok
    deadline = time.monotonic() + 20
    while ((job := _job(wrong)) is None or not job.last_error) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job is not None and job.state != "confirmed"
    assert "CERTIFICATE_VERIFY_FAILED" in job.last_error

    fe = run(frontend_config(tmp_path / "fe", forward=forward_to(center, ca_file=str(certs.ca), **fast)))
    assert send([dx], "127.0.0.1", fe.dicom_port, "YBYX").ok
    deadline = time.monotonic() + 30
    while ((job := _job(fe)) is None or job.state != "confirmed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job is not None and job.state == "confirmed", job
    assert center.archive.catalog.counts()["instances"] == 1


def test_certs_dev_keys_are_private(certs: DevCerts) -> None:
    for key in (certs.ca_key, certs.server_key, certs.client_key):
        assert key.stat().st_mode & 0o077 == 0
    ctx = ssl.create_default_context(cafile=str(certs.ca))  # the server certificate chains to the CA
    assert ctx.get_ca_certs()[0]["subject"][-1][0][1] == "ybyx development CA"
    with pytest.raises(FileExistsError):
        write_dev_certs(certs.ca.parent)


def test_commitment_report_to_a_tls_peer_on_a_new_association(
    start_frontend: Callable[..., Frontend], samples: Path, certs: DevCerts
) -> None:
    """Storage commitment: the N-EVENT-REPORT after the modality hung up goes over DICOM TLS to a
    peer marked ``tls`` (its certificate checked against [dicom.tls] ca_file)."""
    from dimse.contexts import STORAGE_COMMITMENT_PUSH
    from gateway.security.tls import server_context
    from tests.peers.ports import free_port
    from tests.test_commitment import WELL_KNOWN, _collector, _request

    modality_port = free_port()
    reports, got, on_report = _collector()
    scp = AE(ae_title="MODALITY")
    scp.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
    server = scp.start_server(
        ("127.0.0.1", modality_port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        ssl_context=server_context(certs.server, certs.server_key),
    )
    tls = client_context(certs.ca, cert_file=certs.client, key_file=certs.client_key)
    try:
        peer = {"ae_title": "MODALITY", "institution": "H", "host": "127.0.0.1", "port": modality_port}
        fe = start_frontend(allow_any_calling_ae=False, peers=[{**peer, "tls": True}], tls=dicom_tls(certs))
        files = sorted((samples / "01_CT_chest").iterdir())[:3]
        assert send(files, "127.0.0.1", fe.dicom_port, "YBYX", calling_ae="MODALITY", tls=tls).ok
        transaction, info = _request(files, [])
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        assoc = ae.associate("127.0.0.1", fe.dicom_port, ae_title="YBYX", tls_args=(tls, "127.0.0.1"))
        # it hangs up at once: no answer to a report racing its release (see test_commitment.py)
        assoc._serve_request = lambda msg, context_id: None  # type: ignore[method-assign]
        status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT_PUSH, WELL_KNOWN)
        assoc.release()  # before the report can come on this association
        assert status.Status == 0x0000
        assert got.wait(15), "no N-EVENT-REPORT over TLS on a new association"
    finally:
        server.shutdown()
    event_type, report = reports[0]
    assert event_type == 1 and report.TransactionUID == transaction
    assert len(report.ReferencedSOPSequence) == len(files)


def test_a_center_verifies_the_index_it_calls_against_its_peer_ca(
    tmp_path: Path, certs: DevCerts, other_ca: DevCerts
) -> None:
    """The index serves HTTPS ([http.tls]); the center's client there checks it against
    ``[security] peer_ca_file`` and presents its own certificate."""
    from gateway.center import peer_client, peer_tls
    from gateway.forwarder import CenterUnavailable
    from index.service import NationalIndex
    from tests.federation import client_at, index_config

    icfg = index_config(tmp_path / "index")
    index = NationalIndex.start(
        icfg.model_copy(update={"http": icfg.http.model_copy(update={"tls": http_tls(certs)})})
    )
    try:
        assert index.url.startswith("https://")
        client_id, secret = client_at(index, "center-50", "index:lookup", tmp_path)
        ccfg = center_config(tmp_path / "center")

        def center_with(ca: Path) -> Any:
            security = ccfg.security.model_copy(update={"peer_ca_file": ca})
            http = ccfg.http.model_copy(update={"tls": http_tls(certs)})
            return ccfg.model_copy(update={"security": security, "http": http})

        good = peer_client(index.url, client_id, secret, key="index", verify=peer_tls(center_with(certs.ca)))
        assert good.call_json("GET", "/healthz")[0] == 200
        good.close()
        bad = peer_client(
            index.url, client_id, secret, key="index", verify=peer_tls(center_with(other_ca.ca))
        )
        with pytest.raises(CenterUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            bad.call_json("GET", "/healthz")
        bad.close()
    finally:
        index.stop()

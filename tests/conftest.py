"""Shared fixtures: real PostgreSQL, real SeaweedFS (S3), an in-process front-end on a free port.

Heavy peers are session-scoped (started once per run); the front-end is cheap and per test.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from gateway.archive.catalog import Catalog
from gateway.center import Center
from gateway.config import CenterConfig, FrontendConfig, parse_config
from gateway.frontend import Frontend
from gateway.sample import ct_series, write_samples
from gateway.security.clients import ClientRegistry
from gateway.security.credentials import write_secret
from gateway.security.guard import ROLE_SCOPES
from index.service import NationalIndex
from tests.peers.ports import free_port
from tests.peers.seaweedfs import S3Endpoint, seaweedfs  # noqa: F401  (session fixture)

PG_ADMIN = os.environ.get("YBYX_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped at the end)."""
    name = f"ybyx_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def new_pg_db(pg_url: str) -> Iterator[Callable[[], str]]:
    """Make empty PostgreSQL databases for this test (dropped afterwards): ``new_pg_db() -> url``."""
    made: list[str] = []
    base = PG_ADMIN.rsplit("/", 1)[0]

    def make() -> str:
        name = f"ybyx_t_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{base}/{name}"

    yield make
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_pg_url(new_pg_db: Callable[[], str]) -> str:
    """An empty PostgreSQL database for this test, so tests don't see each other's rows."""
    return new_pg_db()


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo sample set (CT, MR, DX, multi-frame, RGB; Chinese names), written once."""
    out = tmp_path_factory.mktemp("samples")
    write_samples(out, ct_slices=12)
    return out


@pytest.fixture(scope="session")
def ct200(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 200-slice CT series (crash test)."""
    return ct_series(tmp_path_factory.mktemp("ct200"), slices=200)


def frontend_config(
    root: Path,
    *,
    db_url: str | None = None,
    s3: S3Endpoint | None = None,
    forward: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    security: dict[str, Any] | None = None,
    encryption: dict[str, Any] | None = None,
    compression: dict[str, Any] | None = None,
    **dicom: Any,
) -> FrontendConfig:
    """A front-end config living in ``root`` on free ports; ``dicom`` overrides [dicom] keys.

    ``forward``: e.g. :func:`forward_to` (center URL and this front-end's credentials there).
    ``compression``: the [compression] section; off unless given (the product default is JPEG-LS,
    but most tests compare stored bytes with those sent; tests/test_codec.py turns it on)."""
    data: dict[str, Any] = {
        "role": "frontend",
        "institution": "TEST_HOSPITAL",
        "dicom": {
            "ae_title": "YBYX",
            "host": "127.0.0.1",
            "port": free_port(),
            "allow_any_calling_ae": True,
            **dicom,
        },
        "http": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"backend": "folder", "path": "blobs"},
        "database": {"url": db_url or "sqlite:///catalog.db"},
        "ingest": {"quarantine": "quarantine"},
        **({"forward": forward} if forward else {}),
        **({"identity": identity} if identity else {}),
        **({"encryption": encryption} if encryption else {}),
        "security": {**TEST_SECURITY, **(security or {})},
        "compression": compression or {"transfer_syntax": "none"},
    }
    if s3 is not None:
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        data["storage"] = {
            "backend": "s3",
            "s3": {
                "endpoint": s3.endpoint,
                "bucket": bucket,
                "access_key": s3.access_key,
                "secret_key": s3.secret_key,
                "secure": False,
            },
        }
        data["ingest"]["spool"] = "spool"
    cfg = parse_config(data, "test.toml", root)
    assert isinstance(cfg, FrontendConfig)
    return cfg


@pytest.fixture
def start_frontend(tmp_path: Path) -> Iterator[Callable[..., Frontend]]:
    """Start in-process front-ends (stopped after the test): ``start_frontend(**dicom_overrides)``."""
    started: list[Frontend] = []

    def start(
        *,
        db_url: str | None = None,
        s3: S3Endpoint | None = None,
        root: Path | None = None,
        forward: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
        security: dict[str, Any] | None = None,
        encryption: dict[str, Any] | None = None,
        compression: dict[str, Any] | None = None,
        **dicom: Any,
    ) -> Frontend:
        cfg = frontend_config(
            root or tmp_path / f"fe{len(started)}",
            db_url=db_url,
            s3=s3,
            forward=forward,
            identity=identity,
            security=security,
            encryption=encryption,
            compression=compression,
            **dicom,
        )
        fe = Frontend.start(cfg)
        started.append(fe)
        return fe

    yield start
    for fe in started:
        fe.stop()


@pytest.fixture
def frontend(start_frontend: Callable[..., Frontend]) -> Frontend:
    """One front-end on SQLite + folder that accepts any calling AE."""
    return start_frontend()


def dcmtk(tool: str) -> str:
    """A dcmtk tool from the system (pynetdicom installs same-named apps into the venv)."""
    venv_bin = str(Path(sys.executable).parent)
    search = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    path = shutil.which(tool, path=search or "/usr/bin")
    if path is None:
        raise RuntimeError(f"{tool} not found: `make setup` installs dcmtk")
    return path


@pytest.fixture
def dicomweb(frontend: Frontend) -> str:
    """The front-end's DICOMweb root URL (its own uvicorn, serving its local archive)."""
    return f"http://127.0.0.1:{frontend.http_port}/dicom-web"


@pytest.fixture
def headers(frontend: Frontend) -> dict[str, str]:
    """Bearer headers for the ``frontend`` fixture, with every scope its routes need."""
    return auth(frontend)


def center_config(
    root: Path,
    *,
    port: int | None = None,
    db_url: str | None = None,
    s3: S3Endpoint | None = None,
    security: dict[str, Any] | None = None,
) -> CenterConfig:
    data: dict[str, Any] = {
        "role": "center",
        "province": "50",
        "http": {"host": "127.0.0.1", "port": port or free_port()},
        "storage": {"backend": "folder", "path": "blobs"},
        "database": {"url": db_url or "sqlite:///catalog.db"},
        "ingest": {"quarantine": "quarantine"},
        "security": {**TEST_SECURITY, **(security or {})},
    }
    if s3 is not None:
        data["storage"] = {
            "backend": "s3",
            "s3": {
                "endpoint": s3.endpoint,
                "bucket": f"c-{uuid.uuid4().hex[:12]}",
                "access_key": s3.access_key,
                "secret_key": s3.secret_key,
                "secure": False,
            },
        }
        data["ingest"]["spool"] = "spool"
    cfg = parse_config(data, "center.toml", root)
    assert isinstance(cfg, CenterConfig)
    return cfg


@pytest.fixture
def start_center(tmp_path: Path) -> Iterator[Callable[..., Center]]:
    started: list[Center] = []

    def start(*, root: Path | None = None, **kw: Any) -> Center:
        center = Center.start(center_config(root or tmp_path / f"center{len(started)}", **kw))
        started.append(center)
        return center

    yield start
    for c in started:
        c.stop()


# ---- node identity (issue 6 §1): every HTTP call of a test carries a token ---------------------

# A signing key per node, made on first start beside its catalog; tokens outlive a test module.
TEST_SECURITY: dict[str, Any] = {"signing_key_file": "signing.pem", "token_lifetime_seconds": 3600}
# What a front-end needs at its center (the forwarder: STOW-RS, inventory, manifest, exam records).
FORWARDER_SCOPES = "stow api:inventory api:manifest api:exams"
Node = Frontend | Center
_tokens: dict[tuple[int, str, str], str] = {}


def node_url(node: Node) -> str:
    return f"http://127.0.0.1:{node.http_port}"


def register_client(node: Node, name: str, scopes: str) -> tuple[str, str]:
    """A new client of ``node`` (its registry, as ``ybyx clients add`` does): (client id, secret)."""
    client, secret = node.security.clients.add(name, scopes)
    return client.client_id, secret


def fetch_token(node: Node, client_id: str, secret: str, scope: str | None = None) -> httpx.Response:
    """``POST /oauth/token`` at ``node`` with HTTP Basic client authentication."""
    return httpx.post(
        f"{node_url(node)}/oauth/token",
        data={"grant_type": "client_credentials", **({"scope": scope} if scope else {})},
        auth=(client_id, secret),
        timeout=30,
    )


def token(node: Node, scopes: str | None = None) -> str:
    """A token from ``node``'s own token endpoint with ``scopes`` (default: all its role's routes
    need), for a client registered for it; cached per node key and scopes."""
    wanted = scopes or " ".join(sorted(node.security.scopes))
    assert node.security.issuer is not None
    key = (node.http_port, node.security.issuer.key.kid, wanted)
    if key not in _tokens:
        client_id, secret = register_client(node, "tests", wanted)
        r = fetch_token(node, client_id, secret)
        assert r.status_code == 200, r.text
        _tokens[key] = r.json()["access_token"]
    return _tokens[key]


def auth(node: Node, scopes: str | None = None) -> dict[str, str]:
    """``Authorization: Bearer …`` headers for calls to ``node`` (see :func:`token`)."""
    return {"Authorization": f"Bearer {token(node, scopes)}"}


def center_client(catalog: Catalog, folder: Path, scopes: str = FORWARDER_SCOPES) -> dict[str, str]:
    """Register a front-end at a center (its catalog: the center may not run yet); the
    ``[forward]`` keys naming the client and its secret file."""
    client, secret = ClientRegistry(catalog, ROLE_SCOPES["center"]).add("frontend", scopes)
    path = folder / f"{client.client_id}.secret"
    write_secret(path, secret)
    return {"client_id": client.client_id, "client_secret_file": str(path)}


def forward_to(center: Center, **forward: Any) -> dict[str, Any]:
    """``[forward]`` for a front-end sending to ``center``, as a client registered there."""
    creds = center_client(center.archive.catalog, center.cfg.security.signing_key_file.parent)
    return {"center_url": center.url, **creds, **forward}


def center_client_before_start(root: Path) -> dict[str, str]:
    """Register a front-end in the catalog of a center that will start later from ``root``."""
    catalog = Catalog.open(f"sqlite:///{root / 'catalog.db'}")
    try:
        return center_client(catalog, root)
    finally:
        catalog.close()


# ---- the federation (national index, centers, front-ends on loopback; tests/federation.py) ------
# Imported inside the fixtures: tests/federation.py imports this module.


@pytest.fixture
def start_index(tmp_path: Path) -> Iterator[Callable[..., NationalIndex]]:
    from tests.federation import index_starter

    yield from index_starter(tmp_path)


@pytest.fixture
def start_fed_center(tmp_path: Path) -> Iterator[Callable[..., Center]]:
    from tests.federation import center_starter

    yield from center_starter(tmp_path)


@pytest.fixture
def start_fed_frontend(tmp_path: Path) -> Iterator[Callable[..., Frontend]]:
    from tests.federation import frontend_starter

    yield from frontend_starter(tmp_path)

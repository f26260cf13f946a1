"""Configuration is validated at start: every problem is one `file: key: reason` line (issue 2 §3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import CenterConfig, ConfigError, DemoConfig, FrontendConfig, IndexConfig, load_config
from tests.peers.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
FE_OPEN = 'role = "frontend"\ninstitution = "H1"\n[dicom]\nallow_any_calling_ae = true\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fe.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return err.value.problems


@pytest.mark.parametrize(
    "name,model",
    [
        ("frontend.toml", FrontendConfig),
        ("center.toml", CenterConfig),
        ("index.toml", IndexConfig),
        ("demo.toml", DemoConfig),
    ],
)
def test_example_configs_are_valid(name: str, model: type) -> None:
    assert isinstance(load_config(ROOT / "config" / name), model)


def test_a_federation_demo_needs_index_center_b_and_frontend_b_each_with_its_own_key(tmp_path: Path) -> None:
    """Issue 5 §9: the demo's federation tables come together; every node signs with its own key."""
    demo = (ROOT / "config" / "demo.toml").read_text(encoding="utf-8")
    cfg = load_config(ROOT / "config" / "demo.toml")
    assert isinstance(cfg, DemoConfig) and cfg.index is not None and cfg.frontend_b is not None
    assert cfg.node("center_b").role == "center"
    assert cfg.frontend.identity.key_file == cfg.frontend_b.identity.key_file  # one national key
    cut = demo[: demo.index("\n[center_b]\n")]  # [index] without province B
    path = tmp_path / "demo.toml"
    path.write_text(cut, encoding="utf-8")
    assert problems(path) == [
        f"{path}: center_b: a federation demo needs all of [index], [center_b] and [frontend_b]"
    ]
    same = demo.replace("../var/demo/frontend-b/signing-key.pem", "../var/demo/index/signing-key.pem")
    path.write_text(same, encoding="utf-8")
    assert problems(path) == [
        f"{path}: frontend_b.security.signing_key_file: the same file as the index's; "
        "give each node its own key"
    ]


def test_unknown_key_is_named_with_its_section(tmp_path: Path) -> None:
    path = write(tmp_path, 'role = "frontend"\ninstitution = "H1"\n[dicom]\nae_tittle = "X"\n')
    assert problems(path) == [f"{path}: dicom.ae_tittle: unknown key"]


def test_wrong_type_and_bad_ae_title_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'role = "frontend"\ninstitution = "H1"\n[dicom]\nport = "eleven"\n'
        'ae_title = "THIS_TITLE_IS_WAY_TOO_LONG"\n',
    )
    found = problems(path)
    assert len(found) == 2
    assert any(p.startswith(f"{path}: dicom.port: ") and "integer" in p for p in found)
    assert any(p.startswith(f"{path}: dicom.ae_title: ") and "not a valid AE title" in p for p in found)


def test_backslash_in_ae_title_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'role = "frontend"\ninstitution = "H1"\n[[dicom.peers]]\nae_title = "CT\\\\1"\ninstitution = "H1"\n',
    )
    assert problems(path)[0].startswith(f"{path}: dicom.peers.0.ae_title: ")


def test_a_frontend_nobody_may_call_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, 'role = "frontend"\ninstitution = "H1"\n[dicom]\nport = 104\n')
    assert problems(path) == [
        f"{path}: dicom: no [[dicom.peers]] listed: list the AEs that may connect, "
        "or set allow_any_calling_ae = true"
    ]


def test_duplicate_peer_titles_are_refused(tmp_path: Path) -> None:
    peer = '[[dicom.peers]]\nae_title = "CT1"\ninstitution = "H1"\n'
    path = write(tmp_path, f'role = "frontend"\ninstitution = "H1"\n{peer}{peer}')
    assert "AE title listed twice: CT1" in problems(path)[0]


def test_missing_file_and_bad_syntax(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.toml") == [f"{tmp_path / 'nope.toml'}: (file): no such file"]
    assert problems(write(tmp_path, "role = = 1"))[0].startswith(f"{tmp_path / 'fe.toml'}: (syntax): ")


def test_missing_or_unknown_role(tmp_path: Path) -> None:
    assert (
        "role: must be one of frontend, center, index, demo"
        in problems(write(tmp_path, 'institution = "H"\n'))[0]
    )


def test_s3_backend_needs_its_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        FE_OPEN + '[storage]\nbackend = "s3"\n',
    )
    assert problems(path) == [f"{path}: storage: backend 's3' needs a [storage.s3] section"]


def test_bad_bucket_name_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        FE_OPEN + '[storage]\nbackend = "s3"\n[storage.s3]\n'
        'endpoint = "127.0.0.1:9000"\nbucket = "B"\naccess_key = "a"\nsecret_key = "s"\n',
    )
    assert problems(path)[0].startswith(f"{path}: storage.s3.bucket: String should match pattern")


def test_relative_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            FE_OPEN + '[storage]\npath = "b"\n',
        )
    )
    assert isinstance(cfg, FrontendConfig)
    assert cfg.storage.path == tmp_path / "b"
    assert cfg.database.url == f"sqlite:///{tmp_path / 'data/catalog.db'}"
    assert cfg.ingest.quarantine == tmp_path / "data/quarantine"


def ybyx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_config_check_cli_exit_codes(tmp_path: Path) -> None:
    good = ybyx("config", "check", str(ROOT / "config/frontend.toml"))
    assert good.returncode == 0 and "ok (frontend)" in good.stdout
    bad = ybyx(
        "config",
        "check",
        str(
            write(
                tmp_path,
                'role = "frontend"\ninstitution = "H"\nbogus = 1\n[dicom]\nallow_any_calling_ae = true\n',
            )
        ),
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"{tmp_path / 'fe.toml'}: bogus: unknown key"


def test_unreachable_storage_stops_the_frontend(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    path = write(
        tmp_path,
        f'role = "frontend"\ninstitution = "H1"\n[dicom]\nport = {free_port()}\nallow_any_calling_ae = true\n'
        f'[storage]\nbackend = "s3"\n[storage.s3]\nendpoint = "127.0.0.1:{port}"\nbucket = "ybyx-test"\n'
        'access_key = "a"\nsecret_key = "s"\nsecure = false\n',
    )
    run = ybyx("frontend", "-c", str(path))
    assert run.returncode == 2
    assert run.stderr.strip().startswith(f"{path}: storage: ")
    assert f"127.0.0.1:{port}" in run.stderr


def test_unreachable_database_stops_the_frontend(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'role = "frontend"\ninstitution = "H1"\n[dicom]\nport = {free_port()}\nallow_any_calling_ae = true\n'
        f'[database]\nurl = "postgresql://nobody@127.0.0.1:{free_port()}/none"\n',
    )
    run = ybyx("frontend", "-c", str(path))
    assert run.returncode == 2
    assert run.stderr.strip().startswith(f"{path}: database.url: cannot open the catalog")

"""The viewer's static route (issue 7 §1, R-FE-1): public program files, data only via DICOMweb.

No browser here (tests/test_viewer.py drives Chromium): what the node serves at ``/viewer/`` on
both roles, how it is cached and compressed, that nothing outside the built bundle is reachable
through it, that the guard's public prefix covers exactly GET under ``/viewer``, and that
``config/viewer.toml`` is validated with the key named.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from api.viewer import DIST, SETTINGS, ViewerSettingsError, load_settings, public_settings
from gateway.center import Center
from gateway.frontend import Frontend
from gateway.security.guard import is_public
from tests.conftest import auth, node_url


def test_the_public_prefix_is_exactly_get_under_viewer() -> None:
    for path in ("/viewer", "/viewer/", "/viewer/assets/index-abc.js", "/viewer/config.json"):
        assert is_public("GET", path) and is_public("HEAD", path), path
    for method, path in (
        ("POST", "/viewer/"),
        ("PUT", "/viewer/config.json"),
        ("GET", "/viewerx"),
        ("GET", "/viewer-admin/x"),
        ("GET", "/dicom-web/studies"),
        ("GET", "/api/v1/viewer/"),
    ):
        assert not is_public(method, path), (method, path)


def test_both_roles_serve_the_viewer_and_keep_data_behind_the_guard(
    start_frontend: Callable[..., Frontend], start_center: Callable[..., Center]
) -> None:
    assert (DIST / "index.html").is_file(), "viewer not built: make setup"
    for node in (start_frontend(), start_center()):
        base = node_url(node)
        with httpx.Client(timeout=30) as http:
            page = http.get(f"{base}/viewer/?study=1.2.3")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert page.headers["cache-control"] == "no-cache"
            assert page.headers["referrer-policy"] == "no-referrer"
            scripts = re.findall(r'src="(/viewer/assets/[^"]+\.js)"', page.text)
            assert scripts, page.text
            js = http.get(f"{base}{scripts[0]}", headers={"Accept-Encoding": "gzip"})
            assert js.status_code == 200 and js.headers["content-encoding"] == "gzip"
            assert js.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert js.headers["content-type"].startswith("text/javascript")
            plain = http.get(f"{base}{scripts[0]}", headers={"Accept-Encoding": "identity"})
            assert "content-encoding" not in plain.headers and plain.content == js.content
            wasm = [p for p in (DIST / "assets").iterdir() if p.suffix == ".wasm"]
            assert wasm, "codecs missing from the bundle"
            r = http.get(f"{base}/viewer/assets/{wasm[0].name}")
            assert r.status_code == 200 and r.headers["content-type"] == "application/wasm"
            # the site settings, as JSON
            cfg = http.get(f"{base}/viewer/config.json")
            assert cfg.status_code == 200 and cfg.json() == public_settings(load_settings(SETTINGS))
            assert "host" not in cfg.text  # send targets by name only
            assert cfg.json()["presets"]["CT"]["lung"] == {"window": 1500, "level": -600, "key": "1"}
            # /viewer → /viewer/ with the query kept
            r = http.get(f"{base}/viewer?study=1.2.3")
            assert r.status_code == 308 and r.headers["location"] == "/viewer/?study=1.2.3"
            # nothing outside the bundle, nothing unknown inside it
            for path in (
                "/viewer/../pyproject.toml",
                "/viewer/%2e%2e/pyproject.toml",
                "/viewer/assets/nope.js",
            ):
                r = http.get(f"{base}{path}")  # (the client folds a literal '..' itself: 401)
                assert r.status_code in (401, 404) and "[project]" not in r.text, path
            assert http.get(f"{base}/viewer/%2e%2e/pyproject.toml").status_code == 404  # reached us
            # data still needs a token; with one it is there
            assert http.get(f"{base}/dicom-web/studies").status_code == 401
            assert http.get(f"{base}/dicom-web/studies", headers=auth(node, "qido")).status_code in (200, 204)
            # only GET: other methods on viewer paths meet the guard
            assert http.post(f"{base}/viewer/").status_code == 401


def test_viewer_settings_errors_name_the_key(tmp_path: Path) -> None:
    bad = {
        'toolbar = { position = "left" }': "toolbar.position",
        "[presets.CT]\nlung = { window = 0, level = -600 }": "presets.CT.lung.window",
        '[presets.CT]\nlung = { window = "wide", level = 1 }': "presets.CT.lung",
        'embed = { origins = "https://his" }': "embed.origins",
        "toolbar = [": "viewer.toml",
        "[weasis]\nenable = true": "weasis.enable",  # unknown key (R-VW-1 u)
        '[weasis]\nenabled = "yes"': "weasis.enabled",
    }
    for text, key in bad.items():
        path = tmp_path / "viewer.toml"
        path.write_text(text)
        with pytest.raises(ViewerSettingsError, match=re.escape(key)):
            load_settings(path)
    assert load_settings(tmp_path / "absent.toml") == {}


def test_send_refuses_bad_requests_by_name(start_frontend: Callable[..., Frontend]) -> None:
    """One-click send (R-VW-1 u) input errors; the delivery itself is in tests/test_viewer.py."""
    fe = start_frontend()
    url = f"{node_url(fe)}/api/v1/send"
    body = {"study": "1.2.3", "target": "NOPE"}
    with httpx.Client(timeout=30) as http:
        assert http.post(url, json=body).status_code == 401
        assert http.post(url, json=body, headers=auth(fe, "qido wado")).status_code == 403
        h = auth(fe, "api:send")
        r = http.post(url, json=body, headers=h)
        assert r.status_code == 422 and "NOPE" in r.json()["error_description"]
        r = http.post(url, json={"study": "1.2.x", "target": "A"}, headers=h)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "study"
        r = http.post(url, json={**body, "extra": 1}, headers=h)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "extra"
        assert http.get(f"{url}/99", headers=h).status_code == 404


def test_send_targets_are_validated_with_the_key_named() -> None:
    from api.send import targets_from

    good = {"ae_title": "WS", "host": "10.0.0.1", "port": 104}
    assert targets_from({"send": {"targets": {"WS": good}}})["WS"].port == 104
    for bad, key in (
        ({**good, "ae_title": "X" * 17}, "send.targets.WS.ae_title"),
        ({**good, "port": 0}, "send.targets.WS.port"),
        ({**good, "host": ""}, "send.targets.WS.host"),
        ("WS", "send.targets.WS"),
    ):
        with pytest.raises(ViewerSettingsError, match=re.escape(key)):
            targets_from({"send": {"targets": {"WS": bad}}})


def test_send_targets_per_institution(
    start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R-VW-1 u per institution: a doctor is offered, and may use, only their institution's
    workstations (and only for studies they may read); a node client sees every target."""
    from api import viewer as viewer_module
    from dimse.scu import send
    from gateway.security.permissions import Role
    from tests.conftest import dcmtk
    from tests.peers.ports import free_port
    from tests.test_authz import OTHER, PEERS, user_token

    received = tmp_path / "ws_a"
    received.mkdir()
    port = free_port()
    storescp = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "WS_A", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        settings = tmp_path / "viewer.toml"
        settings.write_text(
            f'[send.targets.WS_A]\nae_title = "WS_A"\nhost = "127.0.0.1"\nport = {port}\n'
            'institution = "TEST_HOSPITAL"\ndescription = "A reading room"\n'
            '[send.targets.WS_B]\nae_title = "WS_B"\nhost = "127.0.0.1"\nport = 9\ninstitution = "H_B"\n'
            '[send.targets.WS_SHARED]\nae_title = "WS_S"\nhost = "127.0.0.1"\nport = 9\n',
            encoding="utf-8",
        )
        monkeypatch.setattr(viewer_module, "SETTINGS", settings)
        fe = start_frontend(peers=PEERS)
        files = sorted((samples / "03_DX_chest").iterdir())
        assert send(files, "127.0.0.1", fe.dicom_port, "YBYX", calling_ae="MOD_A").ok
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        base = f"{node_url(fe)}/api/v1/send"
        doctor_a = {"Authorization": f"Bearer {user_token(fe, 'dr.a', Role.DOCTOR, 'TEST_HOSPITAL')}"}
        doctor_b = {"Authorization": f"Bearer {user_token(fe, 'dr.b', Role.DOCTOR, OTHER)}"}
        with httpx.Client(timeout=30) as http:

            def names(h: dict[str, str]) -> list[str]:
                return [t["name"] for t in http.get(f"{base}/targets", headers=h).json()["targets"]]

            assert names(doctor_a) == ["WS_A"]
            assert names(doctor_b) == ["WS_B"]
            assert names(auth(fe, "api:send")) == ["WS_A", "WS_B", "WS_SHARED"]
            assert "host" not in http.get(f"{base}/targets", headers=doctor_a).text
            cfg = http.get(f"{node_url(fe)}/viewer/config.json").json()
            assert cfg["send"] == {"configured": True}  # no names of anyone's workstations in public
            # another institution's (or no institution's) target: refused as if it did not exist
            for other in ("WS_B", "WS_SHARED"):
                r = http.post(base, json={"study": study, "target": other}, headers=doctor_a)
                assert r.status_code == 422 and r.json()["error"] == "unknown_target", r.text
                assert r.json()["error_description"].endswith("(offered to you: WS_A)")
            # B's doctor cannot send A's study even to B's own workstation (not visible: 404)
            r = http.post(base, json={"study": study, "target": "WS_B"}, headers=doctor_b)
            assert r.status_code == 404, r.text
            # A's doctor sends A's study to A's workstation: delivered
            r = http.post(base, json={"study": study, "target": "WS_A"}, headers=doctor_a)
            assert r.status_code == 202, r.text
            job = r.json()
            for _ in range(100):
                job = http.get(f"{base}/{job['job']}", headers=doctor_a).json()
                if job["state"] != "running":
                    break
                time.sleep(0.1)
            assert job["state"] == "done" and job["sent"] == len(files), job
        assert len(list(received.iterdir())) == len(files)
    finally:
        storescp.terminate()
        storescp.wait(10)

"""WADO-RS of crypto-shredded objects (R-SE-10, R-CE-2, issue 6 §5): once an object's key is
destroyed (here: its institution's transfer key), a retrieve answers a clear status before any byte
of the body — 410 Gone for the instance, its frames, bulk data and rendered image, and for a series
all of whose instances are shredded; a study or series with only some shredded is 206 Partial
Content with the readable instances, whole, and a ``Warning: 299`` naming each one left out
(PS3.18 §10.4.3). Before the fix the instance retrieve answered 200 and its body broke off."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from gateway.center import Center
from gateway.config import CenterConfig, load_config
from gateway.ingest import Accepted
from gateway.security.transfer_keys import uploading_for
from tests.conftest import auth, node_url
from tests.federation import tiny_study
from tests.test_transfer_keys import write_center
from tests.test_wado import parts

DICOM_ANY = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


@dataclass
class Shredded:
    center: Center
    study: str
    mixed: str  # series: instance 0 under institution A's key (destroyed), 1 and 2 under the KEK
    all_gone: str  # series: both instances under A's key
    sops: dict[str, list[str]]  # series -> SOP instance UIDs in storing order
    files: dict[str, Path]  # SOP instance UID -> the Part-10 file stored

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        url = f"{node_url(self.center)}/dicom-web/studies/{self.study}{path}"
        return httpx.get(url, headers={**auth(self.center), **(headers or DICOM_ANY)}, timeout=30)


@pytest.fixture
def shredded(tmp_path: Path) -> Iterator[Shredded]:
    cfg = load_config(str(write_center(tmp_path / "center", f"sqlite:///{tmp_path / 'center' / 'c.db'}")))
    assert isinstance(cfg, CenterConfig)
    center = Center.start(cfg)
    try:
        transfer = center.archive.store.keys.transfer  # type: ignore[attr-defined]
        transfer.generate("A")
        study = generate_uid()
        mixed = tiny_study(tmp_path / "mixed", study, count=3)
        gone = tiny_study(tmp_path / "gone", study, count=2)
        for n, f in enumerate([*mixed, *gone]):
            with uploading_for("A" if n == 0 or n >= 3 else None):
                stored = center.ingest.accept_file(f, source="test")
            assert isinstance(stored, Accepted), stored
        sops: dict[str, list[str]] = {}
        files: dict[str, Path] = {}
        for f in [*mixed, *gone]:
            ds = dcmread(f, stop_before_pixels=True)
            sops.setdefault(ds.SeriesInstanceUID, []).append(ds.SOPInstanceUID)
            files[ds.SOPInstanceUID] = f
        series = list(sops)
        case = Shredded(center, study, series[0], series[1], sops, files)
        inst = f"/series/{case.mixed}/instances/{sops[case.mixed][0]}"
        assert case.get(inst).status_code == 200  # readable until the key is destroyed
        transfer.destroy("A")
        center.archive.store.forget_cached_keys()  # type: ignore[attr-defined]
        yield case
    finally:
        center.stop()


def test_a_shredded_instance_is_410_before_any_body_and_its_frames_bulk_and_rendered_too(
    shredded: Shredded,
) -> None:
    s = shredded
    inst = f"/series/{s.mixed}/instances/{s.sops[s.mixed][0]}"
    for path, headers in [
        (inst, DICOM_ANY),
        (inst, {"Accept": 'multipart/related; type="application/dicom"'}),  # the transcoding path
        (f"{inst}/frames/1", {"Accept": 'multipart/related; type="application/octet-stream"'}),
        (f"{inst}/bulk/7FE00010", {"Accept": 'multipart/related; type="application/octet-stream"'}),
        (f"{inst}/rendered", {"Accept": "image/jpeg"}),
        (f"{inst}/thumbnail", {"Accept": "image/jpeg"}),
    ]:
        r = s.get(path, headers)
        assert r.status_code == 410, (path, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("text/plain"), (path, r.headers["content-type"])
        gone = "its encryption key was destroyed (crypto-shredding); it can no longer be read"
        assert r.text == f"instance {s.sops[s.mixed][0]}: {gone}", (path, r.text)
    readable = s.sops[s.mixed][1]
    ok = s.get(f"/series/{s.mixed}/instances/{readable}/frames/1", {"Accept": "*/*"})
    assert ok.status_code == 200 and "warning" not in ok.headers


def test_a_series_with_some_shredded_instances_is_206_with_the_rest_whole_and_a_warning_each(
    shredded: Shredded,
) -> None:
    s = shredded
    first, *rest = s.sops[s.mixed]
    r = s.get(f"/series/{s.mixed}")
    assert r.status_code == 206, (r.status_code, r.text[:200])
    got = parts(r)  # the multipart body is complete (the parser checks the closing boundary)
    assert [body for _h, body in got] == [s.files[sop].read_bytes() for sop in rest]
    warnings = r.headers.get_list("warning")
    assert len(warnings) == 1 and warnings[0].startswith("299 "), warnings
    assert f"instance {first} left out, its encryption key was destroyed" in warnings[0]

    whole = s.get("")  # the study: both series, three instances shredded, two served
    assert whole.status_code == 206
    assert sorted(body for _h, body in parts(whole)) == sorted(s.files[sop].read_bytes() for sop in rest)
    named = " ".join(whole.headers.get_list("warning"))
    assert all(sop in named for sop in [first, *s.sops[s.all_gone]])


def test_a_series_all_of_whose_instances_are_shredded_is_410(shredded: Shredded) -> None:
    s = shredded
    r = s.get(f"/series/{s.all_gone}")
    assert r.status_code == 410, (r.status_code, r.text[:200])
    gone = "its encryption key was destroyed (crypto-shredding); it can no longer be read"
    assert r.text == f"all 2 instances of this series: {gone}"
    assert s.get(f"/series/{s.mixed}/instances/{s.sops[s.mixed][2]}").status_code == 200

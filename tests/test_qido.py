"""QIDO-RS against a live uvicorn over a front-end's archive (issue 3 §3, PS3.18 §10.6).

The demo sample set (5 studies: CT ×12, MR ×20, DX, XA, US; Chinese names) is stored over DIMSE,
plus two instances of patients whose names have no alphabetic group (``=张^三`` and ``张三``), then
searched with dicomweb-client for every endpoint and with raw httpx for the finer points.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import UID, CTImageStorage
from sqlalchemy import event, text

import gateway.archive.catalog as catalog_module
from dicomweb import qido
from dimse.scu import send
from gateway.archive.catalog import Catalog, make_engine
from gateway.archive.query import Level
from gateway.frontend import Frontend
from tests.conftest import auth
from tests.test_catalog import rec

Result = dict[str, dict[str, Any]]

# Tags used below (PS3.18 Annex F keys).
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
PATIENT_NAME, PATIENT_ID, STUDY_DATE = "00100010", "00100020", "00080020"
RETRIEVE_URL, MODALITIES, AVAILABILITY = "00081190", "00080061", "00080056"
FUZZY_WARNING = "The fuzzymatching parameter is not supported. Only literal matching has been performed."


@dataclass(frozen=True)
class Archive:
    """A loaded front-end and its DICOMweb root URL."""

    fe: Frontend
    url: str
    files: list[Path]
    headers: dict[str, str]  # a bearer token with the qido and wado scopes

    def get(self, path: str, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return httpx.get(f"{self.url}{path}", timeout=30, headers=headers, **kw)

    def search(self, path: str, params: Any = None, **kw: Any) -> list[Result]:
        rsp = self.get(path, params=params, **kw)
        assert rsp.status_code == 200, rsp.text
        assert rsp.headers["content-type"].startswith("application/dicom+json")
        body: list[Result] = rsp.json()
        return body


def value(result: Result, tag: str) -> Any:
    """The first value of ``tag`` in a result (None when it has none)."""
    return (result.get(tag, {}).get("Value") or [None])[0]


def uids(results: list[Result], tag: str = STUDY_UID) -> list[str]:
    return [value(r, tag) for r in results]


@pytest.fixture(scope="module")
def no_alphabetic(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two one-instance studies of patients named only in Chinese characters.

    ``=张^三``: only the ideographic group; ``张三``: Han characters in the single (first) group.
    """
    out = tmp_path_factory.mktemp("ideographic")
    src = sorted((samples / "02_MR_brain").iterdir())[0]
    paths = []
    for n, name in enumerate(("=张^三", "张三"), start=1):
        ds = dcmread(src)
        ds.PatientName = name
        ds.PatientID = f"YB990000000{n}"
        ds.StudyDate = f"2019010{n}"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.99.{n}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.99.{n}.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(
            f"1.2.826.0.1.3680043.8.498.99.{n}.1.1"
        )
        path = out / f"ideographic{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def archive(frontend: Frontend, dicomweb: str, samples: Path, no_alphabetic: list[Path]) -> Archive:
    files = sorted(p for p in samples.rglob("*") if p.is_file()) + no_alphabetic
    report = send(files, "127.0.0.1", frontend.dicom_port, "YBYX")
    assert report.ok, report.failed
    return Archive(frontend, dicomweb, files, auth(frontend, "qido wado"))


@pytest.fixture
def ct(samples: Path) -> dict[str, str]:
    """UIDs and attributes of the 12-slice CT study (patient Zhang^San=张^三, GB18030)."""
    ds = dcmread(sorted((samples / "01_CT_chest").iterdir())[0], stop_before_pixels=True)
    return {
        "study": ds.StudyInstanceUID,
        "series": ds.SeriesInstanceUID,
        "date": ds.StudyDate,
        "patient": ds.PatientID,
        "accession": ds.AccessionNumber,
    }


def client(archive: Archive) -> DICOMwebClient:
    return DICOMwebClient(url=archive.url, headers=archive.headers)


# ---- every endpoint through dicomweb-client ------------------------------------------------------


def test_search_for_studies_returns_the_required_keys(archive: Archive, ct: dict[str, str]) -> None:
    studies = client(archive).search_for_studies()
    assert len(studies) == 7
    [study] = client(archive).search_for_studies(search_filters={"PatientID": ct["patient"]})
    # PS3.18 Table 10.6.3-3 with their VRs
    expected_vrs = {
        "00080020": "DA",
        "00080030": "TM",
        "00080050": "SH",
        AVAILABILITY: "CS",
        MODALITIES: "CS",
        "00080090": "PN",
        RETRIEVE_URL: "UR",
        PATIENT_NAME: "PN",
        PATIENT_ID: "LO",
        "00100030": "DA",
        "00100040": "CS",
        STUDY_UID: "UI",
        "00200010": "SH",
        "00201206": "IS",
        "00201208": "IS",
    }
    assert {tag: study[tag]["vr"] for tag in expected_vrs} == expected_vrs
    assert list(study) == sorted(study), "attributes in tag order (PS3.18 F.2.1.1)"
    assert value(study, STUDY_UID) == ct["study"]
    assert value(study, RETRIEVE_URL) == f"{archive.url}/studies/{ct['study']}"
    assert study[MODALITIES]["Value"] == ["CT"]
    assert value(study, "00201206") == 1 and value(study, "00201208") == 12  # JSON numbers
    assert value(study, AVAILABILITY) == "ONLINE"
    assert value(study, PATIENT_NAME) == {"Alphabetic": "Zhang^San", "Ideographic": "张^三"}

    [mr] = client(archive).search_for_studies(
        search_filters={"ModalitiesInStudy": "MR", "PatientID": "YB3100000002"},
        fields=["StudyDescription", "00080080"],
    )
    assert value(mr, "00081030") == "头颅MR平扫" and value(mr, "00080080") == "复旦大学附属华山医院"
    assert mr[MODALITIES]["Value"] == ["MR"] and value(mr, "00201208") == 20


def test_search_for_series_in_a_study_and_in_all_studies(archive: Archive, ct: dict[str, str]) -> None:
    [series] = client(archive).search_for_series(study_instance_uid=ct["study"])
    assert value(series, SERIES_UID) == ct["series"]
    assert value(series, "00080060") == "CT" and value(series, "00201209") == 12
    assert value(series, "00200011") == 2 and series["00200011"]["vr"] == "IS"
    assert value(series, RETRIEVE_URL) == f"{archive.url}/studies/{ct['study']}/series/{ct['series']}"
    for tag in ("0008103E", "00400244", "00400245"):  # Table 10.6.3-4
        assert tag in series
    assert PATIENT_ID not in series, "study keys only when searching all series"

    every = client(archive).search_for_series()
    assert len(every) == 7
    assert {value(s, PATIENT_ID) for s in every} >= {ct["patient"], "YB9900000001"}
    assert len(client(archive).search_for_series(search_filters={"Modality": "MR"})) == 3
    [mr] = client(archive).search_for_series(search_filters={"Modality": "MR", "PatientName": "Li*"})
    assert value(mr, "00201209") == 20 and value(mr, "00201208") == 20 and mr[MODALITIES]["Value"] == ["MR"]


def test_search_for_instances_at_every_scope(archive: Archive, ct: dict[str, str]) -> None:
    in_series = client(archive).search_for_instances(
        study_instance_uid=ct["study"], series_instance_uid=ct["series"]
    )
    assert [value(i, "00200013") for i in in_series] == list(range(1, 13))
    first = in_series[0]
    assert value(first, "00280010") == 512 and first["00280010"]["vr"] == "US"
    assert value(first, "00080016") == CTImageStorage and value(first, AVAILABILITY) == "ONLINE"
    assert value(first, RETRIEVE_URL) == (
        f"{archive.url}/studies/{ct['study']}/series/{ct['series']}/instances/{value(first, SOP_UID)}"
    )
    assert "00080060" not in first, "no series keys in a series' instances"

    in_study = client(archive).search_for_instances(study_instance_uid=ct["study"])
    assert uids(in_study, SOP_UID) == uids(in_series, SOP_UID)
    assert value(in_study[0], "00080060") == "CT" and value(in_study[0], "00201209") == 12

    every = client(archive).search_for_instances()
    assert len(every) == 37
    ct_only = client(archive).search_for_instances(search_filters={"SOPClassUID": CTImageStorage})
    assert sorted(uids(ct_only, SOP_UID)) == sorted(uids(in_series, SOP_UID))
    assert value(ct_only[0], PATIENT_ID) == ct["patient"] and ct_only[0][MODALITIES]["Value"] == ["CT"]


# ---- matching --------------------------------------------------------------------------------------


def test_wildcards(archive: Archive, ct: dict[str, str]) -> None:
    assert uids(archive.search("/studies", {"PatientID": "YB11*"})) == [ct["study"]]
    assert uids(archive.search("/studies", {"PatientID": "YB?100000001"})) == [ct["study"]]
    assert uids(archive.search("/studies", {"PatientName": "zhANG*"})) == [ct["study"]]  # case-insensitive
    assert len(archive.search("/studies", {"PatientName": "zh*"})) == 2  # Zhang^San, Zhao^Liu
    found = archive.search("/studies", {"PatientName": "张*"})
    assert set(uids(found)) == {
        ct["study"],
        "1.2.826.0.1.3680043.8.498.99.1",
        "1.2.826.0.1.3680043.8.498.99.2",
    }
    assert len(archive.search(f"/studies/{ct['study']}/series", {"Modality": "C?"})) == 1
    assert archive.search("/studies", {"AccessionNumber": "*", "StudyDescription": "头颅*"})[0][MODALITIES][
        "Value"
    ] == ["MR"]


def test_date_ranges_and_bad_range(archive: Archive, ct: dict[str, str]) -> None:
    dates = sorted(value(s, STUDY_DATE) for s in archive.search("/studies"))
    assert uids(archive.search("/studies", {"StudyDate": f"{ct['date']}-{ct['date']}"})) == [ct["study"]]
    assert len(archive.search("/studies", {"StudyDate": f"{dates[2]}-"})) == 5
    assert len(archive.search("/studies", {"StudyDate": f"-{dates[1]}"})) == 2
    assert len(archive.search("/studies", {"StudyDate": f"{dates[1]}-{dates[3]}"})) == 3
    assert uids(archive.search("/studies", {"StudyDate": "20190101"})) == ["1.2.826.0.1.3680043.8.498.99.1"]

    bad = archive.get("/studies", params={"StudyDate": "20250101-20240101"})
    assert bad.status_code == 400 and "StudyDate" in bad.text
    assert archive.get("/studies", params={"StudyDate": "2025-01-01"}).status_code == 400


def test_uid_lists_comma_or_backslash(archive: Archive, ct: dict[str, str]) -> None:
    other = "1.2.826.0.1.3680043.8.498.99.2"
    for sep in (",", "\\"):
        found = archive.search("/studies", {"StudyInstanceUID": f"{ct['study']}{sep}{other}"})
        assert set(uids(found)) == {ct["study"], other}
    # a backslash sent percent-encoded, as PS3.18 §8.3.4.1 writes it
    found = archive.search(f"/studies?0020000D={ct['study']}%5C{other}")
    assert set(uids(found)) == {ct["study"], other}
    sops = uids(archive.search(f"/studies/{ct['study']}/instances"), SOP_UID)
    assert uids(archive.search("/instances", {"SOPInstanceUID": ",".join(sops[3:6])}), SOP_UID) == sops[3:6]
    assert archive.get("/studies", params={"StudyInstanceUID": "1.2.x"}).status_code == 400


def test_paging_is_stable_and_complete(archive: Archive) -> None:
    full = uids(archive.search("/instances"), SOP_UID)
    assert len(full) == len(set(full)) == 37
    pages: list[str] = []
    for offset in range(0, 40, 5):
        page = uids(archive.search("/instances", {"limit": 5, "offset": offset}), SOP_UID)
        assert len(page) == min(5, 37 - offset)
        pages += page
    assert pages == full, "pages concatenated are the full list, in order, without overlap"

    studies = uids(archive.search("/studies"))
    assert (
        uids(archive.search("/studies", {"limit": 3}))
        + uids(archive.search("/studies", {"limit": 3, "offset": 3}))
        + uids(archive.search("/studies", {"offset": 6}))
        == studies
    )
    assert archive.search("/studies", {"offset": 100}) == []
    paged = client(archive).search_for_studies(limit=2, offset=2)
    assert uids(paged) == studies[2:4]


def test_results_beyond_the_server_maximum_are_announced(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qido, "MAX_RESULTS", 5)
    rsp = archive.get("/instances")
    assert len(rsp.json()) == 5
    assert rsp.headers["Warning"] == f"299 {archive.url}: There are additional results that can be requested."
    rsp = archive.get("/instances", params={"limit": 5, "offset": 35})
    assert len(rsp.json()) == 2 and "Warning" not in rsp.headers
    assert "Warning" not in archive.get("/instances", params={"limit": 3}).headers
    # dicomweb-client's get_remaining pages on with offset until an empty page
    assert len(client(archive).search_for_instances(get_remaining=True)) == 37


def test_includefield(archive: Archive, ct: dict[str, str]) -> None:
    [inst] = archive.search(
        f"/studies/{ct['study']}/series/{ct['series']}/instances",
        {"InstanceNumber": "3", "includefield": "all"},
    )
    assert value(inst, "00280010") == 512 and value(inst, "00280011") == 512  # Rows, Columns
    assert inst["00280030"]["vr"] == "DS" and all(isinstance(v, float) for v in inst["00280030"]["Value"])
    assert value(inst, "00180050") is not None  # SliceThickness, only in the stored header
    assert "7FE00010" not in inst, "no bulk data in search results"
    assert value(inst, "00083002") == "1.2.840.10008.1.2.1"  # AvailableTransferSyntaxUID
    assert value(inst, PATIENT_NAME) == {"Alphabetic": "Zhang^San", "Ideographic": "张^三"}

    # keywords, tags, comma lists and repeats; attributes the catalog lacks come from the header
    [study] = archive.search(
        "/studies",
        [
            ("PatientID", ct["patient"]),
            ("includefield", "PatientAge,00080080"),
            ("includefield", "Manufacturer"),
        ],
    )
    assert value(study, "00101010") and value(study, "00080070") == "UIH"
    assert value(study, "00080080") is not None
    [series] = archive.search(
        f"/studies/{ct['study']}/series", {"includefield": "Rows,SeriesDate,NumberOfStudyRelatedInstances"}
    )
    assert "00280010" not in series, "instance attributes are not returned at series level"
    assert value(series, "00201208") == 12
    assert value(series, "00080021") == ct["date"]
    [study] = archive.search("/studies", {"PatientID": ct["patient"], "includefield": "all"})
    for tag in ("00080080", "00081030", "00100021"):  # InstitutionName, StudyDescription, Issuer
        assert tag in study
    assert "0020000E" not in study, "includefield=all at study level: study-level attributes only"
    assert archive.get("/studies", params={"includefield": "NoSuchKeyword"}).status_code == 400


# ---- names: Chinese, fuzzy -------------------------------------------------------------------------


def test_chinese_names_in_the_ideographic_group(archive: Archive, ct: dict[str, str]) -> None:
    # literal matching compares whole groups: =张^三 matches, 张三 (no separator) does not
    found = {value(s, STUDY_UID): s for s in archive.search("/studies", {"PatientName": "张^三"})}
    assert set(found) == {ct["study"], "1.2.826.0.1.3680043.8.498.99.1"}
    study = found[ct["study"]]
    assert study[PATIENT_NAME] == {"vr": "PN", "Value": [{"Alphabetic": "Zhang^San", "Ideographic": "张^三"}]}
    [only] = archive.search("/studies", {"PatientID": "YB9900000001"})
    assert value(only, PATIENT_NAME) == {"Ideographic": "张^三"}
    mr = client(archive).search_for_studies(search_filters={"PatientName": "Li^Si"})
    assert value(mr[0], PATIENT_NAME) == {"Alphabetic": "Li^Si", "Ideographic": "李^四"}
    assert value(mr[0], "00080090") == {"Alphabetic": "Chen^Jing", "Ideographic": "陈^静"}


def test_fuzzy_matching_is_pinyin_aware(archive: Archive, ct: dict[str, str]) -> None:
    zhang_san = {ct["study"], "1.2.826.0.1.3680043.8.498.99.1", "1.2.826.0.1.3680043.8.498.99.2"}
    # literal: "zhang" is not a whole name; "zhang*" finds only the name with an alphabetic group
    assert archive.search("/studies", {"PatientName": "zhang"}) == []
    assert uids(archive.search("/studies", {"PatientName": "zhang*"})) == [ct["study"]]
    # fuzzy: prefix of any component, any group, case and accents ignored, Chinese as pinyin
    for query in ("zhang", "ZHANG^san", "san", "Zhāng", "zhangsan", "张", "zhang*"):
        rsp = archive.get("/studies", params={"PatientName": query, "fuzzymatching": "true"})
        assert rsp.status_code == 200 and "Warning" not in rsp.headers, query
        assert set(uids(rsp.json())) == zhang_san, query
    found = client(archive).search_for_studies(search_filters={"PatientName": "zhang"}, fuzzymatching=True)
    assert set(uids(found)) == zhang_san
    assert client(archive).search_for_studies(search_filters={"PatientName": "zhao"}, fuzzymatching=True)
    # the extra studies are copies of the MR study, referring physician Chen^Jing=陈^静 included
    by_doctor = archive.search("/studies", {"ReferringPhysicianName": "陈", "fuzzymatching": "true"})
    assert set(uids(by_doctor)) == set(uids(archive.search("/studies", {"ModalitiesInStudy": "MR"})))
    assert archive.search("/studies", {"PatientName": "zhangsi", "fuzzymatching": "true"}) == []


def test_warning_when_fuzzy_matching_is_not_applied(archive: Archive, ct: dict[str, str]) -> None:
    # Fuzzy matching is implemented, except for values with '?' or an inner '*': those are matched
    # literally, and the response says so with the Warning of PS3.18 §8.3.4.2.
    rsp = archive.get("/studies", params={"PatientName": "zh?ng*", "fuzzymatching": "true"})
    assert rsp.status_code == 200
    assert rsp.headers["Warning"] == f"299 {archive.url}: {FUZZY_WARNING}"
    assert uids(rsp.json()) == [ct["study"]]  # literal wildcard matching
    plain = archive.get("/studies", params={"PatientName": "zh?ng*"})
    assert "Warning" not in plain.headers
    assert archive.get("/studies", params={"fuzzymatching": "maybe"}).status_code == 400


# ---- the rest of the protocol ----------------------------------------------------------------------


def test_unknown_parameters_are_ignored_with_a_warning(archive: Archive, ct: dict[str, str]) -> None:
    rsp = archive.get("/studies", params={"PatientID": ct["patient"], "foo": "bar", "PatientAge": "057Y"})
    assert rsp.status_code == 200 and uids(rsp.json()) == [ct["study"]]
    assert rsp.headers["Warning"].startswith(f"299 {archive.url}: ")
    assert "foo" in rsp.headers["Warning"] and "PatientAge" in rsp.headers["Warning"]
    # names that are not ASCII still make a valid header (percent-encoded)
    rsp = archive.get("/studies", params={"患者": "张三", "PatientID": ct["patient"]})
    assert rsp.status_code == 200 and "%E6%82%A3%E8%80%85" in rsp.headers["Warning"]


BAD_VALUES: list[tuple[str, dict[str, str], str]] = [
    ("/studies", {"StudyDate": "20250101-20240101"}, "StudyDate"),
    ("/studies", {"limit": "-1"}, "limit"),
    ("/studies", {"limit": "abc"}, "limit"),
    ("/studies", {"offset": "1.5"}, "offset"),
    ("/series", {"SeriesNumber": "one"}, "SeriesNumber"),
    ("/studies", {"StudyTime": "25h"}, "StudyTime"),
    ("/studies", {"SOPInstanceUID": "1.2.3"}, "SOPInstanceUID"),  # an instance key in a study search
    ("/studies", {"PatientID": "a", "00100020": "b"}, "00100020"),  # one key given twice
    ("/studies/not-a-uid/series", {}, "StudyInstanceUID"),
]


def test_bad_values_are_400_naming_the_parameter(archive: Archive) -> None:
    for path, params, named in BAD_VALUES:
        rsp = archive.get(path, params=params)
        assert rsp.status_code == 400 and named in rsp.text, (path, params, rsp.text)


def test_media_types(archive: Archive) -> None:
    assert archive.get("/studies", headers={"Accept": "image/png"}).status_code == 406
    rsp = archive.get("/studies", headers={"Accept": "application/json"})
    assert rsp.status_code == 200 and rsp.headers["content-type"].startswith("application/json")
    for accept in ("*/*", "application/dicom+json", "image/png, application/*;q=0.5"):
        rsp = archive.get("/studies", headers={"Accept": accept})
        assert rsp.headers["content-type"].startswith("application/dicom+json"), accept
    assert archive.get("/studies", headers={"Accept": "application/dicom+json;q=0"}).status_code == 406
    # the accept query parameter replaces the header (PS3.18 §8.3.3.1), "+" encoded or not
    for query in ("accept=application/dicom%2Bjson", "accept=application/dicom+json"):
        rsp = archive.get(f"/studies?{query}", headers={"Accept": "image/png"})
        assert rsp.status_code == 200 and rsp.headers["content-type"].startswith("application/dicom+json")
    assert archive.get("/studies?accept=image/png").status_code == 406


def test_no_match_is_200_with_an_empty_array(archive: Archive) -> None:
    # PS3.18 2026a (CP-2473): zero results are 200 with an empty list, not 204.
    rsp = archive.get("/studies", params={"PatientID": "nobody"})
    assert rsp.status_code == 200 and rsp.json() == []
    assert client(archive).search_for_series(search_filters={"Modality": "NM"}) == []
    assert archive.search("/studies/1.2.3.4/series") == []


@pytest.fixture
def statements(archive: Archive) -> Iterator[list[str]]:
    """SQL statements the catalog runs while the test body runs (transaction control left out)."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        control = statement.strip().upper() in ("BEGIN", "COMMIT", "ROLLBACK", "BEGIN IMMEDIATE")
        if not control and "audit_" not in statement:  # the audit trail's writes come after the response
            seen.append(statement)

    engine = archive.fe.archive.catalog.engine
    event.listen(engine, "before_cursor_execute", count)
    yield seen
    event.remove(engine, "before_cursor_execute", count)


def test_one_sql_statement_per_request(archive: Archive, ct: dict[str, str], statements: list[str]) -> None:
    series = f"/studies/{ct['study']}/series/{ct['series']}/instances"
    for path, params in (
        (series, {}),
        (series, {"includefield": "all"}),
        ("/instances", {"includefield": "PixelSpacing"}),
        ("/studies", {"PatientName": "zhang", "fuzzymatching": "true", "includefield": "PatientAge"}),
        ("/series", {}),
    ):
        statements.clear()
        found = archive.search(path, params)
        assert found
        assert len(statements) == 1, (path, params, statements)
        assert statements[0].lstrip().upper().startswith("SELECT")
    statements.clear()
    assert len(archive.search(series)) == 12 and len(statements) == 1


# ---- the catalog side, on SQLite and PostgreSQL ----------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'c.db'}"
    url: str = request.getfixturevalue("fresh_pg_url")
    return url


def test_catalog_search_options_on_both_databases(catalog_url: str) -> None:
    catalog = Catalog.open(catalog_url)
    try:
        header = '{"00101010":{"vr":"AS","Value":["045Y"]}}'
        catalog.add_instance(
            rec("1.8.0.1", study="1.8", series="1.8.0", patient_id="P8", metadata_json=header)
        )
        catalog.add_instance(rec("1.8.0.2", study="1.8", series="1.8.0", patient_id="P8"))
        catalog.add_instance(rec("1.8.1.1", study="1.8", series="1.8.1", patient_id="P8", modality="SR"))
        catalog.add_instance(
            rec("1.9.0.1", study="1.9", series="1.9.0", patient_id="P9", patient_name="曾^小明")
        )
        found = catalog.find(Level.STUDY, {"PatientName": "zeng^xiao"}, fuzzy=True)
        assert [r["StudyInstanceUID"] for r in found] == ["1.9"]  # 曾 read as a surname
        assert [r["StudyInstanceUID"] for r in catalog.find(Level.STUDY, {"PatientName": "zhang"})] == []
        found = catalog.find(Level.STUDY, {"PatientName": "zhang"}, fuzzy=True)
        assert [r["StudyInstanceUID"] for r in found] == ["1.8"]

        series = catalog.find(Level.SERIES, {"StudyInstanceUID": "1.8"}, parent_counts=True, metadata=True)
        assert [s["NumberOfSeriesRelatedInstances"] for s in series] == [2, 1]
        assert all(s["NumberOfStudyRelatedInstances"] == 3 for s in series)
        assert all(s["ModalitiesInStudy"] == ["CT", "SR"] for s in series)
        assert series[0]["_metadata_json"] == header  # the series' first instance

        # ModalitiesInStudy at instance level: instances of studies holding an SR, CT ones included
        images = catalog.find(Level.IMAGE, {"ModalitiesInStudy": "SR"}, parent_counts=True, metadata=True)
        assert [i["SOPInstanceUID"] for i in images] == ["1.8.0.1", "1.8.0.2", "1.8.1.1"]
        assert [i["NumberOfSeriesRelatedInstances"] for i in images] == [2, 2, 1]
        assert images[1]["_metadata_json"] == "{}"
    finally:
        catalog.close()


def test_migration_0002_fills_existing_names(catalog_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    engine = make_engine(catalog_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(catalog_module.__file__).with_name("migrations")))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO patients"
                    " (patient_id, issuer, patient_name, patient_name_folded, birth_date, sex)"
                    " VALUES ('P1', '', '张三', '张三', '', '')"
                )
            )
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        with engine.connect() as conn:
            fuzzy = conn.execute(text("SELECT patient_name_fuzzy FROM patients")).scalar_one()
        assert fuzzy.split() == ["zhangsan", "zhang", "san"]
    finally:
        engine.dispose()

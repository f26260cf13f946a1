"""Anonymised export for secondary use (issue 6 §9, R-SE-9): the PS3.15 Basic Application Level
Confidentiality Profile leaves no PHI — checked attribute by attribute against the profile's table —
UIDs are remapped consistently within an export, and identified export needs a recorded consent.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dimse.scu import send
from gateway.anonymize import PROFILE, Anonymizer, NotAnonymizable, remaining_phi
from gateway.archive.schema import audit_log
from gateway.frontend import Frontend

ROOT = Path(__file__).resolve().parents[1]
SKIP_GROUPS = (0x0000, 0x0002, 0xFFFA, 0xFFFC)  # command, file meta, signatures/padding: not data set


def ybyx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def phi_value(vr: str, n: int) -> Any:
    """A value of ``vr`` that is recognisably identifying (contains ``PHI`` where the VR allows text)."""
    numbers: dict[str, Any] = {
        "DA": "20200102",
        "TM": "101010",
        "DT": "20200102101010",
        "AS": "045Y",
        "IS": str(7000 + n),
        "DS": f"{n}.5",
        "US": n,
        "SS": n,
        "UL": n,
        "SL": n,
        "UV": n,
        "SV": n,
        "FL": n + 0.5,
        "FD": n + 0.5,
        "AT": 0x00100010,
        "UI": f"1.2.826.0.1.3680043.9.7.{n}",
        "UR": f"http://phi.example/{n}",
        "PN": f"PHI^NAME{n}",
    }
    if vr in numbers:
        return numbers[vr]
    if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
        return b"PHI-" + str(n).encode().rjust(4, b"0")
    return f"PHI{n}"


def identified_instance() -> tuple[Dataset, dict[int, Any]]:
    """An instance holding every attribute of the profile's table (where pydicom knows one VR),
    each with an identifying value; nested items and private tags too."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    originals: dict[int, Any] = {}
    for n, tag in enumerate(sorted(PROFILE)):
        if tag >> 16 in SKIP_GROUPS:
            continue
        vr = dictionary_VR(tag)
        if " or " in vr:
            continue
        if vr == "SQ":
            item = Dataset()
            item.PatientName = f"PHI^NESTED{n}"
            item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.9.8.{n}"
            ds.add_new(tag, "SQ", Sequence([item]))
            continue
        value = phi_value(vr, n)
        ds.add_new(tag, vr, value)
        originals[tag] = value
    ds.add_new(0x00091010, "LO", "PHI private creator")  # private
    ds.add_new(0x00091001, "LO", "PHI private")
    ds.add_new(0x60003000, "OW", b"PHIO")  # overlay data
    ds.add_new(0x60004000, "LT", "PHI overlay comment")
    ds.add_new(0x50000010, "US", 1)  # curve (retired): removed as a group
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds, originals


def test_no_phi_left_per_the_profile_table() -> None:
    ds, originals = identified_instance()
    before = {tag: ds[tag].value for tag in PROFILE if tag in ds}
    Anonymizer().apply(ds)
    checked = 0
    for tag, action in PROFILE.items():
        if tag not in before:
            continue
        checked += 1
        name = f"{tag:08X} ({action})"
        if action == "X":
            assert tag not in ds, f"{name} not removed"
            continue
        assert tag in ds, f"{name} removed, but the profile keeps it (replaced)"
        value = ds[tag].value
        if ds[tag].VR == "SQ":  # kept as a sequence, its items de-identified
            for item in value:
                assert item.get("PatientName") in (None, ""), f"{name}: nested name kept"
                uid = str(item.get("ReferencedSOPInstanceUID", ""))
                assert uid.startswith("2.25."), f"{name}: nested UID not replaced: {uid}"
            continue
        if tag in (0x00100010, 0x00100020):  # Z, given a consistent pseudonym
            assert str(value) == "ANON0001"
        elif action in ("Z", "X/Z"):
            assert value in (None, "", b""), f"{name} not emptied: {value!r}"
        elif action == "U":
            assert str(value).startswith("2.25.") and value != before[tag], f"{name}: {value!r}"
        else:  # D and the choices that resolve to D
            assert value not in (None, "", b"") and value != before[tag], f"{name} kept: {value!r}"
    assert checked > 500  # the whole table was exercised, not a handful
    assert not any(t.is_private for t in ds)
    assert 0x60003000 not in ds and 0x60004000 not in ds and 0x50000010 not in ds
    assert remaining_phi(ds, originals) == []
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert b"PHI" not in buffer.getvalue()
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_uids_are_remapped_consistently_within_an_export_and_not_across() -> None:
    study, series = generate_uid(), generate_uid()
    first, second = Dataset(), Dataset()
    for ds in (first, second):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.FrameOfReferenceUID = "1.2.3.4"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref = Dataset()
    ref.ReferencedSOPClassUID = first.SOPClassUID
    ref.ReferencedSOPInstanceUID = first.SOPInstanceUID
    second.ReferencedImageSequence = Sequence([ref])
    export = Anonymizer()
    old_first_sop = first.SOPInstanceUID
    export.apply(first)
    export.apply(second)
    assert first.StudyInstanceUID == second.StudyInstanceUID != study
    assert first.SeriesInstanceUID == second.SeriesInstanceUID != series
    assert first.FrameOfReferenceUID == second.FrameOfReferenceUID
    assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID != old_first_sop
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # the class is not identifying: kept
    other = Dataset()
    other.StudyInstanceUID = study
    Anonymizer().apply(other)
    assert other.StudyInstanceUID != first.StudyInstanceUID  # another export, other UIDs


def test_burned_in_annotation_is_refused() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = generate_uid()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(NotAnonymizable, match="burned into its pixels"):
        Anonymizer().apply(ds)


def _config(fe: Frontend, path: Path) -> Path:
    cfg = fe.cfg
    path.write_text(
        "\n".join(
            [
                'role = "frontend"',
                'institution = "TEST_HOSPITAL"',
                "[dicom]",
                "allow_any_calling_ae = true",
                "[storage]",
                f'path = "{cfg.storage.path}"',
                "[database]",
                f'url = "{cfg.database.url}"',
                "[audit]",
                f'signing_key = "{cfg.audit.signing_key}"',
                f'export_path = "{cfg.audit.export_path}"',
            ]
        )
    )
    return path


def test_export_cli_anonymises_and_refuses_identified_export_without_consent(
    start_frontend: Callable[..., Frontend], samples: Path, tmp_path: Path
) -> None:
    fe = start_frontend()
    mr = sorted((samples / "02_MR_brain").iterdir())[:3]
    assert send(mr, "127.0.0.1", fe.dicom_port, "YBYX").ok
    source = dcmread(mr[0])
    study = str(source.StudyInstanceUID)
    config = _config(fe, tmp_path / "fe.toml")

    out = tmp_path / "anon"
    done = ybyx("export", study, "--anonymize", "--out", str(out), "-c", str(config))
    assert done.returncode == 0, done.stderr
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 3
    names = [p for p in str(source.PatientName).split("=") if p]
    for f in files:
        blob = f.read_bytes()
        for name in names:
            for enc in ("utf-8", "gb18030"):
                assert name.encode(enc) not in blob, f"{f}: {name!r}"
        ds = dcmread(f)
        assert ds.StudyInstanceUID != study and ds.PatientIdentityRemoved == "YES"
        assert str(source.PatientID).encode() not in blob
        assert f.parent.parent.name == ds.StudyInstanceUID  # written under the new UIDs
    assert len({dcmread(f).StudyInstanceUID for f in files}) == 1

    refused = ybyx("export", study, "--out", str(tmp_path / "ident"), "-c", str(config))
    assert refused.returncode == 2 and "no recorded consent" in refused.stderr
    assert not (tmp_path / "ident").exists()
    recorded = ybyx("consent", "record", study, "--evidence", "form 2026-117", "-c", str(config))
    assert recorded.returncode == 0, recorded.stderr
    allowed = ybyx("export", study, "--out", str(tmp_path / "ident"), "-c", str(config))
    assert allowed.returncode == 0, allowed.stderr
    [first, *_] = sorted((tmp_path / "ident").rglob("*.dcm"))
    assert dcmread(first).PatientName == source.PatientName  # identified, as consented

    with fe.archive.catalog.engine.connect() as conn:
        exports = [
            json.loads(r.detail)
            for r in conn.execute(select(audit_log.c.detail).where(audit_log.c.resource == "export:research"))
        ]
    assert [(e["anonymized"], e["instances"]) for e in exports] == [(True, 3), (False, 0), (False, 3)]

"""De-identification for secondary use: the DICOM PS3.15 Basic Application Level Confidentiality
Profile (Annex E, Table E.1-1), irreversible (R-SE-9, R-SE-8; issue 6 §9).

AI training, analytics and research get images only anonymised this way, or identified with a
recorded consent (``gateway/export.py``). The profile's action table is data here
(:data:`PROFILE`, from PS3.15 2023 Table E.1-1, Basic Profile column); :class:`Anonymizer` applies
it to every element, in every sequence item, of every instance of one export:

* ``X`` remove; ``Z`` empty (or a dummy); ``D`` a dummy value of the element's VR; ``U`` a new UID;
* where the table leaves the choice to the IOD (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``) the choice
  that is valid whatever the attribute's type in the IOD: ``X/Z`` → ``Z``, the others → ``D``;
  ``X/Z/U*`` (referenced image sequences) keeps the sequence with its UIDs replaced;
* UIDs are replaced by new random ``2.25.`` UIDs, the same old UID always by the same new one
  within one :class:`Anonymizer` (one export), so studies, series and references stay consistent;
  the mapping is never written anywhere (irreversible);
* Patient ID and Patient's Name (``Z``) get a dummy that is consistent within the export
  (``ANON0001``…), so a research set can still group a person's studies without identifying them;
* private attributes are removed (the Retain Safe Private Option is not offered), as are curves
  and overlays (``50xx``, ``60xx,3000``, ``60xx,4000``);
* an instance flagged Burned In Annotation = YES is refused (the profile cannot clean pixels);
* Patient Identity Removed = YES, De-identification Method and its code ``113100`` (DCM, "Basic
  Application Confidentiality Profile") are added, as the profile requires.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

# PS3.15 Table E.1-1, Basic Profile column: action -> tags (GGGGEEEE). Grouped by action to keep the
# table reviewable against the standard; repeating groups (curves, overlays) are in REPEATING.
_TABLE: Final[dict[str, str]] = {
    "D": """
        001811BB 006A0005 006A0003 00440104 04000562 300C0127 04000115 00120081 00120020 00120010
        00120040 00120042 00400512 0040A730 00080107 00080106 0040A121 0040A120 00189701 21000140
        3010002D 04000105 00686226 00420011 30100035 30100038 00189804 00340002 00340001 00189074
        00340007 00189151 00189623 00700001 0072000A 003A0314 00686270 300A0741 300A0742 300A0783
        04000563 300A0760 00401101 0040A123 300A0002 30100054 300A062A 300A0619 300A0623 300A067C
        04000565 300A073A 0040A13A 30080162 30080164 30080166 30080168 0072005E 0072005F 00720061
        00720063 00720066 00720068 00720065 0072006A 0072006C 0072006E 0072006B 0072006D 00720071
        00720070 0018936A 00340005 00189369 300A022C 300A022E 00400551 30060002 0040A122 30080024
        30080025 300A0608 300A0736 300A0734 30100033 30100034 0040A030 0040A075 0040A073 0040A027
        00189371 00189367
    """,
    "Z": """
        00080050 00181203 00120060 00120021 00120030 00120031 00120050 3010000F 30100017 0008009C
        3010001B 00402017 3010007F 00400513 00400562 30100043 0040A082 00100020 00100030 00100010
        00100040 00402016 3010007B 30100081 300600A6 30060026 300A0615 300A0611 3010005A 300A067D
        3010005C 00080090 300E0004 300E0005 04000564 00400610 30060008 30060009 00080020 00200010
        00080030 3010007A 0040A088
    """,
    "X": """
        00184000 00189424 00404035 001021B0 0040A353 00380010 00380020 00081084 00081080 00380021
        00001000 00102110 006A0006 00440004 40000010 00440105 0040A078 300A00C3 300A00DD 00101081
        0014407E 0014407C 0016004D 00181007 04000310 00120082 00120072 00120071 00120051 00400310
        00400280 300A02EB 00403001 0008009D 0050001B 0040051A 00700086 00181042 00181043 0018A002
        0018A003 00102150 21000040 21000050 0040A307 00380300 00080025 00080035 0040A07C FFFCFFFC
        0040A110 00181205 00181200 00181204 00181012 00181202 0018937F 00082111 00500020 0016004B
        FFFAFFFA 00380030 00380040 00380032 300A079A 4008011A 40080119 300A0016 30100037 30100036
        300A0676 00120087 00120086 00102160 00404011 003A032B 0040A023 0040A024 300A0196 300A0072
        00209158 00160076 00160075 0016008C 0016007B 0016008D 00160088 0016008A 00160089 00160086
        00160085 00160087 00160084 00160083 0016008E 00160081 00160080 00160072 00160071 00160074
        00160073 00160082 0016007A 0016008B 00160078 0016007D 0016007C 00160079 00160077 0016007F
        0016007E 00160070 00181008 00181005 0040E004 00404037 00404036 00880200 00084000 00204000
        00284000 00402400 40080300 00080015 04000600 00080081 00081040 00081041 00101050 30100085
        00401011 40080112 40080113 40080111 4008010C 40080115 40080200 40080202 40080100 40080101
        40080102 4008010B 4008010A 40080108 40080109 00180035 00180027 00402004 00402005 00380011
        00380014 00100021 00380061 00380064 001021D0 0016004F 00160050 00160051 0016004E 00500021
        04000404 0016002B 00102000 00101090 00101080 04000550 00203403 00203406 00203405 00203401
        0018937B 00081060 00401010 00081000 04000552 04000551 0040A192 0040A033 0040A193 00102180
        00402010 00402011 00402008 00402009 04000561 21000070 00101000 00101002 00101001 00080024
        00080034 0040A07A 00104000 300A0794 00380500 00401004 300A0792 300A078E 00101040 00101010
        00101005 00100032 00380400 00100050 00101060 00100101 00100102 001021F0 00101020 00102155
        00102154 00101030 00400243 00400254 00400250 00404051 00400251 00400253 00400244 00404050
        00400245 00400241 00404030 00400242 00404028 00081052 00081050 00401102 00401104 00401103
        40080114 00081062 00081048 00081049 00181004 30020123 30020121 00400012 001021C0 300A000E
        00700082 00700083 30100061 00404052 0044000B 00081088 00200027 30060028 30060038 30060088
        30060085 300A0004 300A0003 00181078 00181072 00181079 00181073 300C0113 0040100A 00321030
        00321066 00321067 00402001 00401002 00741234 04000402 00380004 00101100 00081120 04000403
        00080096 00080092 00080094 00102152 00400275 00321070 00401400 00401001 00401005 00189937
        00741236 00321032 00321033 00189185 00102299 00102297 40084000 40080118 40080040 40080042
        00080054 01000420 0038001A 0038001B 0038001C 0038001D 00404034 0038001E 0040000B 00400006
        00400007 00400004 00400005 00404008 00400009 00400011 00404010 00400002 00404005 00400003
        00400001 00404027 00400010 00404025 00321020 00321021 00321000 00321001 00321010 00321011
        0008103E 00380062 00380060 300A01B2 300A01A6 004006FA 001021A0 300A0216 00380050 0040050A
        00400602 00400600 00080055 30060006 30060004 00321040 00321041 00324000 00321050 00321051
        00081030 00320012 00320034 00320035 00320032 00320033 00440010 0040A354 0040DB07 0040DB06
        40004000 20300020 0040A112 00181201 00181014 00080201 00880910 00880912 00880906 00880904
        00185011 300A000B 0018100A 00181009 0040A352 0040A358 00384000 00189373 003A0329
    """,
    "U": """
        00080017 00209161 30100006 30100013 00181002 04000100 00209164 300A0013 3010006E 00080058
        0070031A 00200052 00080014 00083010 00281214 0018100B 00020003 003A0310 0040A402 0040A171
        00281199 300A0650 00701101 00701102 00080019 3010003B 3010000B 300A0083 3010006F 30100031
        30060024 00404023 0040A172 00081155 00041511 300A0785 300600C2 00001001 00080018 0020000E
        30100015 00640003 00400554 00880140 0020000D 00200200 00182042 0040DB0D 0040DB0C 00620021
        00081195 300A0609 300A0700 0040A124
    """,
    "Z/D": "00700084 00080023 00080033 00180010 00189919",
    "X/Z": """
        00400555 00080022 00080032 22000005 22000002 00102203 00081110 00321060 300E0008 30080105
        300A00B2
    """,
    "X/D": """
        00181400 0018700C 0018700A 00189517 30080054 00080012 3010004D 3010004C 30080056 0040A032
        00081072 00181030 300A0006 300A0007 30100056 00080021 00080031 00189516 0018700E 30080250
        30100077 30080251
    """,
    "X/Z/D": "0008002A 00181000 00080013 00080082 00080080 00081070 00081111 00081010",
    "X/Z/U*": "00081140 00082112",
}

PROFILE: Final[dict[int, str]] = {
    int(tag, 16): action for action, tags in _TABLE.items() for tag in tags.split()
}
"""Tag → Basic Profile action (PS3.15 Table E.1-1)."""

# Repeating groups (mask, value): curve data 50xx,xxxx; overlay data 60xx,3000; overlay comments 60xx,4000
REPEATING: Final[tuple[tuple[int, int], ...]] = (
    (0xFF000000, 0x50000000),
    (0xFF00FFFF, 0x60003000),
    (0xFF00FFFF, 0x60004000),
)

DEIDENTIFICATION_METHOD: Final = "PS3.15 Basic Application Level Confidentiality Profile"  # LO: 64 max


class NotAnonymizable(ValueError):
    """The instance cannot be made anonymous by this profile (e.g. identifying text burned into
    the pixels); the message says why."""


def action_for(tag: int) -> str | None:
    """The Basic Profile's action for a (public) tag, or None: keep."""
    action = PROFILE.get(tag)
    if action is not None:
        return action
    if any(tag & mask == value for mask, value in REPEATING):
        return "X"
    return None


def new_uid() -> str:
    """A fresh UID (``2.25.`` + a random UUID as an integer, PS3.5 B.2): unrelated to the old one."""
    return f"2.25.{uuid.uuid4().int}"


_DUMMY_TEXT = "ANONYMIZED"
_DUMMIES: Final[dict[str, Any]] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "PN": "ANONYMIZED",
    "AE": "ANONYMIZED",
    "CS": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "LO": _DUMMY_TEXT,
    "LT": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT,
    "UT": _DUMMY_TEXT,
    "UC": _DUMMY_TEXT,
    "UR": "urn:anonymized",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
    "AT": 0,
    "OB": b"\x00\x00",
    "OW": b"\x00\x00",
    "OD": b"\x00" * 8,
    "OF": b"\x00" * 4,
    "OL": b"\x00" * 4,
    "OV": b"\x00" * 8,
    "UN": b"\x00\x00",
}


@dataclass
class Anonymizer:
    """Applies the profile to the instances of one export (see the module docstring)."""

    uids: dict[str, str] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)

    def uid(self, old: str) -> str:
        """The new UID for ``old``: the same one every time within this export."""
        old = str(old).strip()
        if not old:
            return old
        if old not in self.uids:
            self.uids[old] = new_uid()
        return self.uids[old]

    def patient(self, old_id: str, old_name: str) -> str:
        key = f"{old_id}\x00{old_name}"
        if key not in self.patients:
            self.patients[key] = f"ANON{len(self.patients) + 1:04d}"
        return self.patients[key]

    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and its file meta) and return it; raises
        :class:`NotAnonymizable` for burned-in annotation."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise NotAnonymizable(
                f"instance {ds.get('SOPInstanceUID', '?')} has identifying text burned into its pixels "
                "(Burned In Annotation = YES): not exported"
            )
        pseudonym = self.patient(str(ds.get("PatientID", "")), str(ds.get("PatientName", "")))
        self._clean(ds)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        code = Dataset()
        code.CodeValue = "113100"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    def _clean(self, ds: Dataset) -> None:
        for elem in list(ds):
            tag = int(elem.tag)
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            action = action_for(tag)
            if action is None:
                if elem.VR == "SQ":
                    self._items(elem.value)
                continue
            self._act(ds, elem, action)

    def _items(self, items: Iterable[Dataset]) -> None:
        for item in items:
            self._clean(item)

    def _act(self, ds: Dataset, elem: DataElement, action: str) -> None:
        if action == "X":
            del ds[elem.tag]
        elif action in ("Z", "X/Z"):
            elem.value = Sequence() if elem.VR == "SQ" else None
        elif action == "U":
            if elem.VR == "UI":
                elem.value = _map_values(elem.value, self.uid)
            elif elem.VR == "SQ":
                self._items(elem.value)
        elif action == "X/Z/U*":
            if elem.VR == "SQ":
                self._items(elem.value)  # the references stay, their UIDs replaced
            elif elem.VR == "UI":
                elem.value = _map_values(elem.value, self.uid)
            else:
                elem.value = None
        else:  # D, Z/D, X/D, X/Z/D: a dummy of the VR (valid whatever the attribute's type)
            self._dummy(elem)

    def _dummy(self, elem: DataElement) -> None:
        if elem.VR == "SQ":
            self._items(elem.value)  # a sequence's dummy: its items, themselves de-identified
        elif elem.VR == "UI":
            elem.value = _map_values(elem.value, self.uid)
        else:
            elem.value = _DUMMIES.get(str(elem.VR), _DUMMY_TEXT)


def _map_values(value: Any, mapper: Any) -> Any:
    if value is None or value == "":
        return value
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        return [mapper(v) for v in value]
    return mapper(value)


def remaining_phi(ds: Dataset, originals: dict[int, Any]) -> list[str]:
    """Profile check (used by tests and by ``ybyx export --verify``): the tags of ``ds`` — at any
    depth — whose action is not keep and that still hold their original value, plus any private
    tag. ``originals``: tag → value in the source instance."""
    found: list[str] = []

    def walk(d: Dataset, path: str) -> None:
        for elem in d:
            tag = int(elem.tag)
            where = f"{path}{Tag(tag)}"
            if elem.tag.is_private:
                found.append(f"{where} private")
                continue
            action = action_for(tag)
            if elem.VR == "SQ":
                for n, item in enumerate(elem.value):
                    walk(item, f"{where}[{n}].")
                continue
            if action is None or elem.value in (None, "", b""):
                continue
            before = originals.get(tag)
            if before is not None and before not in ("", b"") and str(elem.value) == str(before):
                found.append(f"{where} {action}: still {elem.value!r}")

    walk(ds, "")
    return found

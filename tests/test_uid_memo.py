"""UID validation remembered (dimse/uid_memo.py): the libraries' answers, each UID checked once."""

from __future__ import annotations

import warnings

import pytest
from pydicom import config, valuerep
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.utils import set_uid

import dimse.server  # noqa: F401  (installs the memos, as the SCP does)
from dimse import uid_memo

UIDS = ["1.2.840.10008.1.2.1", "1.2.3.04", "1.2.abc", "1." + "2" * 70, "", "0.0"]


def _originals() -> tuple[object, object]:
    return (
        getattr(valuerep.VALIDATORS["UI"], uid_memo.ORIGINAL),
        getattr(_config.VALIDATORS["UI"], uid_memo.ORIGINAL),
    )


@pytest.mark.parametrize("text", UIDS)
def test_answers_are_the_libraries_own(text: str) -> None:
    pydicom_own, pynetdicom_own = _originals()
    for _ in range(2):  # a miss, then a hit
        assert valuerep.VALIDATORS["UI"]("UI", text) == pydicom_own("UI", text)  # type: ignore[operator]
        assert valuerep.VALIDATORS["UI"]("UI", UID(text, config.IGNORE)) == pydicom_own("UI", text)  # type: ignore[operator]
        for enforce in (False, True):
            _config.ENFORCE_UID_CONFORMANCE = enforce
            try:
                assert _config.VALIDATORS["UI"](UID(text, config.IGNORE)) == pynetdicom_own(
                    UID(text, config.IGNORE)
                )  # type: ignore[operator]
            finally:
                _config.ENFORCE_UID_CONFORMANCE = False


@pytest.mark.parametrize("text", UIDS)
def test_is_valid_is_pydicoms_own(text: str) -> None:
    own = UID.__dict__["is_valid"].fget
    assert getattr(own, uid_memo.ORIGINAL).fget is not own  # the memo is installed
    for _ in range(2):  # a miss, then a hit
        assert UID(text, config.IGNORE).is_valid is getattr(own, uid_memo.ORIGINAL).fget(
            UID(text, config.IGNORE)
        )


def test_is_valid_is_checked_once_per_text(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []

    def counting(self: UID) -> bool:
        checked.append(str(self))
        return True

    monkeypatch.setattr(UID, "is_valid", property(counting))
    uid_memo.install()  # wraps the (counting) property now in place
    for _ in range(50):
        assert UID("1.2.840.10008.1.2").is_valid and UID("1.2.840.10008.1.2.1").is_valid
    assert sorted(checked) == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
    wrapped = UID.__dict__["is_valid"]
    uid_memo.install()  # twice: not wrapped again
    assert UID.__dict__["is_valid"] is wrapped


def test_invalid_uids_still_warn_and_raise() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            UID("1.2.abc", config.WARN)
    assert len(seen) == 2 and "Invalid value for VR UI" in str(seen[0].message)
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid value for VR UI"):
            UID("1.2.abc", config.RAISE)
        with pytest.raises(ValueError, match="Invalid 'Abstract Syntax Name'"):
            set_uid("1." + "2" * 70, "Abstract Syntax Name")


def test_each_uid_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(vr: str, value: object) -> tuple[bool, str]:
        calls.append(str(value))
        return True, ""

    monkeypatch.setitem(valuerep.VALIDATORS, "UI", counting)
    uid_memo.install()  # wraps the (counting) validator now in place
    assert valuerep.VALIDATORS["UI"] is not counting
    for _ in range(50):
        for text in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            set_uid(text, "Transfer Syntax Name")
            UID(text)
    assert sorted(calls) == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
    uid_memo.install()  # twice: not wrapped again
    assert getattr(valuerep.VALIDATORS["UI"], uid_memo.ORIGINAL) is counting

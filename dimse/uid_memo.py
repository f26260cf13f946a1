"""UID validation, remembered: association set-up without validating the same UIDs again and again.

**Why.** Decoding an A-ASSOCIATE-RQ makes pynetdicom build a ``pydicom.uid.UID`` for every abstract
and transfer syntax it names (dcmtk ``storescu`` proposes 128 presentation contexts, ~500 UIDs),
and each is validated twice by regular expression: by pydicom (``UID.__new__`` →
``valuerep.VALIDATORS["UI"]``) and by pynetdicom (``set_uid`` → ``_config.VALIDATORS["UI"]``). That
was about a third of the interpreter-lock time of accepting an association (``py-spy --gil``,
40 one-file ``storescu`` associations): ~10 ms of CPU per association on this project's 2-core
machine, paid per image by the many modalities that open an association for each one. The UIDs
are nearly always the same few hundred SOP class and transfer syntax UIDs.

**What.** Both libraries make their validators replaceable for this purpose (pydicom's
``valuerep.VALIDATORS`` table, pynetdicom's documented ``_config.VALIDATORS``); :func:`install`
wraps each "UI" validator in a bounded memo keyed by everything its answer depends on (the VR and
the text; for pynetdicom also ``_config.ENFORCE_UID_CONFORMANCE``). A miss calls the library's own
function, so every answer — warnings, errors and their messages included — is the library's.

pynetdicom's ``set_uid`` then asks ``UID.is_valid`` as well (a regular expression again, only to
log a warning): that property has no table to hook into, so :func:`install` replaces it on the
class with one that remembers pydicom's own property's answer per UID text (~15 % of the lock
time of a one-image association, session 7).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pydicom import valuerep
from pydicom.uid import UID
from pynetdicom import _config

MEMO_SIZE = 8192  # distinct UIDs remembered per validator (~1 MB at most)

ORIGINAL = "_ybyx_uid_memo"  # attribute of a memo: the validator it wraps


def _pydicom_memo(validate: Callable[[str, Any], tuple[bool, str]]) -> Callable[[str, Any], tuple[bool, str]]:
    cached = functools.lru_cache(maxsize=MEMO_SIZE)(lambda vr, text: validate(vr, text))

    def memo(vr: str, value: Any) -> tuple[bool, str]:
        if isinstance(value, str):  # UID is a str: its answer is the same text's
            return cached(vr, str(value))
        return validate(vr, value)

    setattr(memo, ORIGINAL, validate)
    return memo


def _pynetdicom_memo(validate: Callable[[Any], tuple[bool, str]]) -> Callable[[Any], tuple[bool, str]]:
    cached = functools.lru_cache(maxsize=MEMO_SIZE)(lambda text, _enforce: validate(text))

    def memo(value: Any) -> tuple[bool, str]:
        if isinstance(value, str):
            return cached(value, _config.ENFORCE_UID_CONFORMANCE)
        return validate(value)

    setattr(memo, ORIGINAL, validate)
    return memo


def _is_valid_memo(prop: property) -> property:
    check = prop.fget
    assert check is not None
    cached = functools.lru_cache(maxsize=MEMO_SIZE)(check)  # keyed by the UID's text (a str)

    def is_valid(self: UID) -> bool:
        return bool(cached(self))

    setattr(is_valid, ORIGINAL, prop)
    return property(is_valid, doc=prop.__doc__)


def install() -> None:
    """Wrap pydicom's and pynetdicom's "UI" validators, and ``UID.is_valid``, in memos (once;
    later calls do nothing)."""
    current = valuerep.VALIDATORS["UI"]
    if not hasattr(current, ORIGINAL):
        valuerep.VALIDATORS["UI"] = _pydicom_memo(current)
    theirs = _config.VALIDATORS["UI"]
    if not hasattr(theirs, ORIGINAL):
        _config.VALIDATORS["UI"] = _pynetdicom_memo(theirs)
    prop = UID.__dict__["is_valid"]
    if not hasattr(prop.fget, ORIGINAL):
        setattr(UID, "is_valid", _is_valid_memo(prop))  # noqa: B010 - a property, replaced on the class

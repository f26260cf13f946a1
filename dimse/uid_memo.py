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
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pydicom import valuerep
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


def install() -> None:
    """Wrap pydicom's and pynetdicom's "UI" validators in memos (once; later calls do nothing)."""
    current = valuerep.VALIDATORS["UI"]
    if not hasattr(current, ORIGINAL):
        valuerep.VALIDATORS["UI"] = _pydicom_memo(current)
    theirs = _config.VALIDATORS["UI"]
    if not hasattr(theirs, ORIGINAL):
        _config.VALIDATORS["UI"] = _pynetdicom_memo(theirs)

"""Identity (issue 5 §1): ID types, normalisation, validation, the pseudonym and the national
index record key (R-UP-5, R-SE-8)."""

from __future__ import annotations

from datetime import datetime

import pytest

from gateway.identity import (
    IdType,
    IndexRecordKey,
    InvalidId,
    is_person_ref,
    normalise,
    normalise_uscc,
    pseudonymise,
    resident_id_check,
    uscc_check,
)

KEY = bytes(range(32))
USCC = "91350100M000100Y43"  # a published example code


def test_resident_id_is_normalised_from_full_width_spaces_and_lower_case() -> None:
    assert normalise(IdType.RESIDENT_ID, "１１０１０５ 19491231 002x") == "11010519491231002X"
    assert normalise(IdType.RESIDENT_ID, "110105-19491231-002X") == "11010519491231002X"


def test_first_generation_15_digit_card_becomes_18_characters() -> None:
    assert normalise(IdType.RESIDENT_ID, "110105491231002") == "11010519491231002X"


@pytest.mark.parametrize(
    "number,reason",
    [
        ("110105194912310025", "check character"),
        ("1101051949123100", "18 characters"),
        ("11010519491331002X", "not a date"),
        ("1101051949123100XX", "18 characters"),
        ("", "empty"),
    ],
)
def test_wrong_resident_ids_say_why(number: str, reason: str) -> None:
    with pytest.raises(InvalidId, match=reason):
        normalise(IdType.RESIDENT_ID, number)


def test_new_permanent_residence_card_has_a_check_character() -> None:
    first17 = "93315619900101001"
    good = first17 + resident_id_check(first17)
    assert normalise(IdType.FOREIGNER_PERMANENT, good) == good
    wrong = first17 + ("0" if good[-1] != "0" else "1")
    with pytest.raises(InvalidId, match="check character"):
        normalise(IdType.FOREIGNER_PERMANENT, wrong)
    assert normalise(IdType.FOREIGNER_PERMANENT, "usa 123456789012") == "USA123456789012"


def test_permits_and_passports() -> None:
    assert normalise(IdType.HK_MACAO_PERMIT, "h1234567801") == "H1234567801"
    assert normalise(IdType.TAIWAN_PERMIT, "12345678") == "12345678"
    assert normalise(IdType.PASSPORT, "e 1234 5678") == "E12345678"
    with pytest.raises(InvalidId, match="H or M"):
        normalise(IdType.HK_MACAO_PERMIT, "K12345678")
    with pytest.raises(InvalidId, match="5-20"):
        normalise(IdType.PASSPORT, "E1")


def test_pseudonym_is_keyed_and_the_same_for_every_spelling() -> None:
    a, masked = pseudonymise(IdType.RESIDENT_ID, "11010519491231002x", KEY)
    b, _ = pseudonymise(IdType.RESIDENT_ID, "110105491231002", KEY)
    c, _ = pseudonymise(IdType.RESIDENT_ID, "11010519491231002X", bytes(32))
    assert a == b != c and is_person_ref(a) and masked == "1101**********002X"
    # the same number under another ID type is another person
    assert pseudonymise(IdType.PASSPORT, "11010519491231002X", KEY)[0] != a


def test_unified_social_credit_code_check_character() -> None:
    assert uscc_check(USCC[:17]) == USCC[17]
    assert normalise_uscc(USCC.lower()) == USCC
    with pytest.raises(InvalidId, match="MOD 31"):
        normalise_uscc(USCC[:17] + "4")
    with pytest.raises(InvalidId, match="not used"):
        normalise_uscc("91350100M000100I43")
    with pytest.raises(InvalidId, match="18 characters"):
        normalise_uscc(USCC[:10])


def test_index_record_key_round_trips_and_names_the_bad_part() -> None:
    code = "1" * 26
    text = f"{code}-202511201430-000000101-CT0000000001A-{USCC}"
    key = IndexRecordKey.parse(text)
    assert key.exam_time == datetime(2025, 11, 20, 14, 30) and key.storing_unit == USCC
    assert str(key) == text
    assert IndexRecordKey.parse(text.replace("-", "\u2013")) == key  # en dashes, as in documents
    assert is_person_ref(code) and not is_person_ref("1" * 25)
    for bad, reason in (
        (text.replace(code, "1" * 25), "person management code"),
        (text.replace("202511201430", "202511311430"), "not a date"),
        (text.replace("000000101", "00000101"), "body-part code"),
        (text.replace("CT0000000001A", "CT01"), "device code"),
        (text[:-1] + "4", "MOD 31"),
        (text.rsplit("-", 1)[0], "5 parts"),
    ):
        with pytest.raises(InvalidId, match=reason):
            IndexRecordKey.parse(bad)

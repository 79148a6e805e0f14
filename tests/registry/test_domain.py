"""Pure rules of the register, without servers."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from services.common.auth import Principal, Role
from services.common.errors import InvalidArgument
from services.registry import domain


@pytest.mark.parametrize(
    ("written", "folded"),
    [
        ("Nguyễn Thị Bê", "nguyen thi be"),
        ("ĐẶNG  Văn   Đức", "dang van duc"),
        ("Nguye\u0302\u0303n", "nguyen"),  # decomposed input folds the same
        ("\u00d0inh Thị \u00f0ào", "dinh thi dao"),  # Ð, ð: often typed for Đ, đ
    ],
)
def test_fold_removes_diacritics(written: str, folded: str) -> None:
    assert domain.fold(written) == folded


def test_names_are_normalised_and_checked() -> None:
    assert domain.normalize_name("full_name", "  Nguye\u0302\u0303n   Văn A ") == "Nguyễn Văn A"
    for bad in ("", "   ", "A\x00B", "x" * 121):
        with pytest.raises(InvalidArgument) as error:
            domain.normalize_name("full_name", bad)
        assert error.value.field == "full_name"


def test_citizen_id_matches_birth_year_and_sex() -> None:
    # 048 Đà Nẵng, 0 = male born 1900s, 90 = 1990.
    assert domain.check_citizen_id("048090123456", date(1990, 5, 1), 1) == "048090123456"
    assert domain.check_citizen_id("048305123456", date(2005, 5, 1), 2) == "048305123456"
    for cid, born, sex in [
        ("04809012345", None, 0),  # 11 digits
        ("999090123456", None, 0),  # no such province
        ("048090123456", date(1991, 1, 1), 1),  # year differs
        ("048090123456", date(1990, 1, 1), 2),  # sex differs
    ]:
        with pytest.raises(InvalidArgument):
            domain.check_citizen_id(cid, born, sex)


def test_masking_hides_the_middle() -> None:
    assert domain.mask_citizen_id("048090123456") == "048******456"


def test_vault_seals_and_opens_and_hashes_stably() -> None:
    vault = domain.CitizenIdVault("k" * 40)
    sealed = vault.seal("048090123456")
    assert b"048090123456" not in sealed
    assert vault.open(sealed) == "048090123456"
    assert vault.seal("048090123456") != sealed  # a fresh nonce each time
    assert vault.lookup_hash("048090123456") == domain.CitizenIdVault("k" * 40).lookup_hash(
        "048090123456"
    )
    assert vault.lookup_hash("048090123456") != domain.CitizenIdVault("j" * 40).lookup_hash(
        "048090123456"
    )


def test_birth_date_bounds_for_age_ranges() -> None:
    day = date(2026, 3, 10)
    earliest, latest = domain.birth_dates_for_ages(18, 27, day)
    assert (earliest, latest) == ("1998-03-11", "2008-03-10")
    assert domain.age_on(date(2008, 3, 10), day) == 18
    assert domain.age_on(date(1998, 3, 11), day) == 27
    assert domain.age_on(date(1998, 3, 10), day) == 28
    assert domain.birth_dates_for_ages(70, None, day) == (None, "1956-03-10")
    # Under a year old: born within the last year, up to as_of itself.
    assert domain.birth_dates_for_ages(0, 0, day) == ("2025-03-11", "2026-03-10")
    # Everyone alive on a day past: nobody born after it.
    assert domain.birth_dates_for_ages(0, None, date(2020, 1, 1)) == (None, "2020-01-01")
    with pytest.raises(InvalidArgument):
        domain.birth_dates_for_ages(30, 20, day)


def test_vietnamese_calendar_day() -> None:
    assert domain.local_date(datetime(2026, 1, 1, 18, 0, tzinfo=UTC)) == date(2026, 1, 2)


def test_unit_tree_rules() -> None:
    assert domain.child_unit_id("dn.hc", "hc1") == "dn.hc.hc1"
    domain.check_child_kind(domain.UnitKind.WARD, domain.UnitKind.GROUP)
    with pytest.raises(InvalidArgument):
        domain.check_child_kind(domain.UnitKind.WARD, domain.UnitKind.WARD)
    with pytest.raises(InvalidArgument):
        domain.check_child_kind(domain.UnitKind.GROUP, domain.UnitKind.GROUP)
    with pytest.raises(InvalidArgument):
        domain.child_unit_id("dn", "Hải Châu")


def test_no_unit_id_holds_the_page_tokens_separator() -> None:
    """A page token is `unit|id|…`: a unit id is the only caller-chosen part (its code; record
    ids are generated, `hh-` or `p-` and an ObjectId), so a code with a `|` is refused."""
    with pytest.raises(InvalidArgument) as refused:
        domain.child_unit_id("dn", "hc|1")
    assert refused.value.field == "code"


def test_who_sees_citizen_ids() -> None:
    assert domain.may_see_citizen_id(Principal("w", Role.WARD_OFFICER, "dn.hc.hc1"), "hh-1")
    assert not domain.may_see_citizen_id(Principal("g", Role.GROUP_LEADER, "dn.hc.hc1.t17"), "hh-1")
    own = Principal("r", Role.RESIDENT, "dn.hc.hc1.t17", "hh-1")
    assert domain.may_see_citizen_id(own, "hh-1")
    assert not domain.may_see_citizen_id(own, "hh-2")


def test_contacts_are_taken_as_people_write_them() -> None:
    assert domain.check_contact("c", " 0905 123 456 ", "") == ("0905 123 456", "")
    assert domain.check_contact("c", "+84 (236) 3.821.234", "an.nguyen@mail.com.vn") == (
        "+84 (236) 3.821.234",
        "an.nguyen@mail.com.vn",
    )
    assert domain.check_contact("c", "", "") == ("", "")


@pytest.mark.parametrize(
    "name",
    ["Nguyễn Thị Bê", "H'Hen Niê", "Y-Ngông Niê Kdăm", "Hồ Thị H’Linh", "Trần V. An", "Ksor Ơi"],
)
def test_a_persons_name_in_letters_is_kept_as_written(name: str) -> None:
    assert domain.person_name("full_name", f"  {name} ") == name


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ("0905123456", "holds '01234569': a name is written in letters"),
        ("Nguyễn Văn 2", "holds '2': a name is written in letters"),
        ("An@home", "holds '@': a name is written in letters"),
        ("- . '", "has no letters"),
    ],
)
def test_a_persons_name_with_other_than_letters_is_refused(written: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        domain.person_name("full_name", written)
    assert (refused.value.field, refused.value.problem) == ("full_name", problem)


def test_a_stay_begins_within_a_year() -> None:
    """Registered ahead of arriving, by weeks; a start years off is a mistyped year."""
    today = date(2026, 11, 25)
    domain.check_stay(date(2027, 11, 25), date(2028, 1, 1), today, None)
    with pytest.raises(InvalidArgument, match=r"^stay_start: is more than a year ahead"):
        domain.check_stay(date(2062, 11, 25), date(2063, 1, 1), today, None)

"""Pure rules, alone: ages as birth-date bounds, timing, who may publish and count where."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from services.common.auth import Principal, Role
from services.common.errors import InvalidArgument, PermissionDenied
from services.notices import domain
from services.notices.domain import Audience, Priority
from services.notices.records import audience_document, audience_of


def test_age_bounds_are_birth_date_bounds() -> None:
    on = date(2026, 11, 23)
    # Aged 18 to 27 on that day: born after 1998-11-23, on or before 2008-11-23.
    assert domain.birth_date_bounds(Audience(min_age=18, max_age=27), on) == (
        "2008-11-23",
        "1998-11-23",
    )
    assert domain.birth_date_bounds(Audience(min_age=60), on) == ("1966-11-23", None)
    assert domain.birth_date_bounds(Audience(max_age=5), on) == (None, "2020-11-23")
    # 29 February counts from the 28th in other years.
    assert domain.birth_date_bounds(Audience(min_age=1), date(2024, 2, 29)) == ("2023-02-28", None)
    # Infants not yet a year old: max_age 0, set.
    infants = Audience(max_age=0)
    assert infants.filters_members
    assert domain.birth_date_bounds(infants, on) == (None, "2025-11-23")
    assert domain.birthdays_between([infants], on - timedelta(days=1), on) == [
        ("2025-11-22", "2025-11-23")
    ]


def test_an_audience_stored_before_infants_could_be_one_reads_as_it_was_meant() -> None:
    """Stored then, max_age 0 meant no upper bound."""
    old = {"min_age": 60, "max_age": 0, "sex": 0, "residence_kinds": []}
    assert audience_of({"audience": old}) == Audience(min_age=60)
    for audience in (Audience(max_age=0), Audience(min_age=60), Audience(min_age=6, max_age=17)):
        assert audience_of({"audience": audience_document(audience)}) == audience


def test_timing_rules() -> None:
    now = datetime(2026, 11, 23, 8, tzinfo=UTC)
    past = domain.check_timing(now, now - timedelta(hours=1), None, Priority.NORMAL, None)
    assert past.publish_at is None  # a time already passed means now
    emergency = domain.check_timing(now, None, None, Priority.EMERGENCY, None)
    assert emergency.resend_after == domain.DEFAULT_RESEND_AFTER
    with pytest.raises(InvalidArgument, match=r"^expires_at"):
        domain.check_timing(
            now, now + timedelta(hours=2), now + timedelta(hours=1), Priority.NORMAL, None
        )
    with pytest.raises(InvalidArgument, match=r"^resend_after"):
        domain.check_timing(now, None, None, Priority.IMPORTANT, timedelta(minutes=5))
    # Up for a year at most, counted from publication (a scheduled one's too).
    later = now + timedelta(days=30)
    year = domain.check_timing(now, later, later + timedelta(days=366), Priority.NORMAL, None)
    assert year.expires_at == later + timedelta(days=366)
    with pytest.raises(InvalidArgument, match=r"^expires_at: is more than a year after"):
        domain.check_timing(now, None, now + timedelta(days=367), Priority.NORMAL, None)


def test_publishing_and_reach_scopes() -> None:
    leader = Principal("l", Role.GROUP_LEADER, "dn.hc.hc1.g17")
    domain.may_publish(leader, "dn.hc.hc1.g17")
    for unit in ("dn.hc.hc1", "dn.hc.hc1.g18", "dn.hc.hc1.g171"):
        with pytest.raises(PermissionDenied):
            domain.may_publish(leader, unit)
    # A group leader counts their own group of a ward notice; the ward officer the whole ward.
    assert domain.reach_area(leader, "dn.hc.hc1", "") == "dn.hc.hc1.g17"
    officer = Principal("w", Role.WARD_OFFICER, "dn.hc.hc1")
    assert domain.reach_area(officer, "dn.hc.hc1.g17", "") == "dn.hc.hc1.g17"
    assert domain.reach_area(officer, "dn.hc.hc1", "dn.hc.hc1.g18") == "dn.hc.hc1.g18"
    with pytest.raises(InvalidArgument, match=r"^unit_id"):
        domain.reach_area(officer, "dn.hc.hc1.g17", "dn.hc.hc1.g18")
    # g17 merged into g18: g18's leader sees g17's notices, and counts them in g18.
    other = Principal("o", Role.GROUP_LEADER, "dn.hc.hc1.g18")
    assert not domain.may_see_as_official(other, "dn.hc.hc1.g17")
    assert domain.may_see_as_official(other, "dn.hc.hc1.g17", ["dn.hc.hc1.g18"])
    assert not domain.may_see_as_official(other, "dn.hc.hc1.g17", ["dn.hc.hc1.g19"])
    assert domain.reach_area(other, "dn.hc.hc1.g17", "", ["dn.hc.hc1.g18"]) == "dn.hc.hc1.g18"
    merged_into = ["dn.hc.hc1.g18"]
    assert domain.reach_area(officer, "dn.hc.hc1.g17", "", merged_into) == "dn.hc.hc1.g17"
    assert domain.reach_area(officer, "dn.hc.hc1.g17", "dn.hc.hc1.g18", merged_into) == (
        "dn.hc.hc1.g18"
    )


def test_ancestors_and_record_ids() -> None:
    assert domain.ancestors("dn.hc.hc1") == ["dn", "dn.hc", "dn.hc.hc1"]
    assert domain.delivery_id("nt-1", "hh-2") == "nt-1:hh-2"
    assert domain.check_audience(0, 0, 0, [3, 3], False).residence_kinds == (3,)


def test_birthdays_between_cross_each_age_bound_once() -> None:
    """Into a range on the day of turning min_age, out of it on the day of turning max_age + 1;
    someone born on 29 February turns a year older on 1 March in other years."""
    over_70 = domain.Audience(min_age=70)
    up_to_15 = domain.Audience(max_age=15)
    women = domain.Audience(sex=2)
    day = date(2026, 11, 24)
    assert domain.birthdays_between([over_70, up_to_15, women, over_70], day, day) == [
        ("2010-11-24", "2010-11-24"),
        ("1956-11-24", "1956-11-24"),
    ]
    three_days = domain.birthdays_between([over_70], date(2026, 11, 21), day)
    assert three_days == [("1956-11-21", "1956-11-24")]
    # Born 29 February 1956: not yet 70 on 28 February 2026, 70 on 1 March.
    leap = domain.birthdays_between([over_70], date(2026, 2, 28), date(2026, 3, 1))
    assert leap == [("1956-02-28", "1956-03-01")]
    assert domain.birthdays_between([women], date(2026, 1, 1), day) == []


def test_text_is_plain_text_without_control_characters() -> None:
    """C1 control characters (mis-decoded Windows text brings them: "\\x93trích\\x94") are
    refused as C0 ones are, and a one-line field takes no Unicode line break either."""
    assert domain.check_body("Họp tổ\n- Mang sổ\tđỏ") == "Họp tổ\n- Mang sổ\tđỏ"
    for body in ("\x93Họp tổ\x94", "Họp\x85tổ", "Họp \x9b31m tổ"):
        with pytest.raises(InvalidArgument, match=r"^body: contains control characters"):
            domain.check_body(body)
    with pytest.raises(InvalidArgument, match=r"^title: contains control characters"):
        domain.check_title("Họp\x85tổ")
    for title in ("Họp\u2028tổ", "Họp\u2029tổ", "Họp\ntổ"):
        with pytest.raises(InvalidArgument, match=r"^title: must be one line"):
            domain.check_title(title)
    with pytest.raises(InvalidArgument, match=r"^attachments\[0\]\.file_name"):
        domain.check_file_name("attachments[0].file_name", "lịch\x96họp.pdf")

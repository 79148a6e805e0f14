"""Audience filters, resolved from the service's own view of the registry: households with a
member in an age range and sex, households with a member over some age, renters only."""

from __future__ import annotations

from datetime import date

import grpc
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import registry_pb2

from tests.notices.conftest import Town, eventually, refused

MALE, FEMALE = registry_pb2.SEX_MALE, registry_pb2.SEX_FEMALE


def born(years_ago: int) -> str:
    """A birth date `years_ago` years back, on the 1st of this month (so the age is exact)."""
    today = date.today()
    return date(today.year - years_ago, today.month, 1).isoformat()


async def audience_of(town: Town, audience: notices_pb2.Audience) -> set[str]:
    notice = await town.publish(audience=audience)
    await town.delivered(notice.notice_id)
    records = await town.service.store.deliveries.find({"notice_id": notice.notice_id}).to_list()
    return {r["household_id"] for r in records}


async def test_each_audience_filter_picks_its_households(town: Town) -> None:
    group = town.city.group
    # Heads are men born in 1975. Add: a young man, a young woman, an old woman, a renter.
    young_man, young_woman, elderly = town.households[group]
    await town.add_member(young_man, born(20), MALE)
    await town.add_member(young_woman, born(21), FEMALE)
    await town.add_member(elderly, born(82), FEMALE)
    renters = await town.add_household(
        town.city.other_group, residence_kind=registry_pb2.RESIDENCE_KIND_RENTER
    )

    military_age = notices_pb2.Audience(
        member=notices_pb2.MemberFilter(min_age=18, max_age=27, sex=MALE)
    )
    assert await audience_of(town, military_age) == {young_man}

    young_people = notices_pb2.Audience(member=notices_pb2.MemberFilter(min_age=18, max_age=27))
    assert await audience_of(town, young_people) == {young_man, young_woman}

    elderly_only = notices_pb2.Audience(member=notices_pb2.MemberFilter(min_age=80))
    assert await audience_of(town, elderly_only) == {elderly}

    women = notices_pb2.Audience(member=notices_pb2.MemberFilter(sex=FEMALE))
    assert await audience_of(town, women) == {young_woman, elderly}

    renters_only = notices_pb2.Audience(residence_kinds=[registry_pb2.RESIDENCE_KIND_RENTER])
    assert await audience_of(town, renters_only) == {renters}

    # Both at once: renters with a man aged 40 to 60 (the renting head, born 1975, is one).
    head_age = date.today().year - 1975
    both = notices_pb2.Audience(
        member=notices_pb2.MemberFilter(min_age=head_age - 1, max_age=head_age + 1, sex=MALE),
        residence_kinds=[registry_pb2.RESIDENCE_KIND_RENTER],
    )
    assert await audience_of(town, both) == {renters}

    assert await audience_of(town, notices_pb2.Audience()) == set(town.everyone)


async def test_a_member_who_left_no_longer_counts(town: Town) -> None:
    household = town.households[town.city.group][0]
    await town.add_member(household, born(19), MALE)
    view = town.service.store.view
    person = await view.persons.find_one(
        {"household_id": household, "sex": MALE, "birth_date": born(19)}
    )
    assert person is not None
    await town.city.ward_officer.MoveOut(
        registry_pb2.MoveOutRequest(
            request_id=str(person["_id"]) + "-out", person_id=person["_id"], destination="TP HCM"
        )
    )

    async def gone() -> bool:
        moved = await view.persons.find_one({"_id": person["_id"]})
        return moved is not None and moved["status"] == "gone"

    await eventually(gone, what="the move-out in the notices view")
    young_men = notices_pb2.Audience(member=notices_pb2.MemberFilter(max_age=25, sex=MALE))
    assert household not in await audience_of(town, young_men)


async def test_bad_audiences_are_refused(town: Town) -> None:
    cases = [
        (notices_pb2.MemberFilter(min_age=30, max_age=20), "audience.member.max_age"),
        (notices_pb2.MemberFilter(min_age=-1), "audience.member.min_age"),
        (notices_pb2.MemberFilter(max_age=200), "audience.member.max_age"),
        (notices_pb2.MemberFilter(sex=7), "audience.member.sex"),  # type: ignore[arg-type]
        (notices_pb2.MemberFilter(), "audience.member"),
    ]
    for member, field in cases:
        audience = notices_pb2.Audience(member=member)
        await refused(grpc.StatusCode.INVALID_ARGUMENT, town.publish(audience=audience), field)
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        town.publish(audience=notices_pb2.Audience(residence_kinds=[9])),  # type: ignore[list-item]
        "audience.residence_kinds[0]",
    )

"""Audience filters, resolved from the service's own view of the registry: households with a
member in an age range and sex, households with a member over some age, renters only."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import grpc
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import registry_pb2

from services.common.mongo import Session, in_transaction
from services.notices.domain import local_day
from services.notices.events import Reconciler
from tests.conftest import Clock
from tests.notices.conftest import Town, events_pb2, eventually, refused, rid

MALE, FEMALE = registry_pb2.SEX_MALE, registry_pb2.SEX_FEMALE


def born(years_ago: int) -> str:
    """A birth date `years_ago` years back, on the 1st of this month (so the age is exact)."""
    today = date.today()
    return date(today.year - years_ago, today.month, 1).isoformat()


async def lodger(
    town: Town,
    clock: Clock,
    household: str,
    name: str,
    birth_date: str,
    sex: int,
    last_day: date | None = None,
    first_day: date | None = None,
) -> registry_pb2.RegisterTemporaryStayResponse:
    """A guest staying from today (or `first_day`) beside the household's head, ten days unless
    its `last_day` is given, once this service knows."""
    today = first_day or local_day(clock())
    guest: registry_pb2.RegisterTemporaryStayResponse = (
        await town.city.leader.RegisterTemporaryStay(
            registry_pb2.RegisterTemporaryStayRequest(
                request_id=rid(),
                household_id=household,
                person=registry_pb2.PersonDetails(
                    full_name=name,
                    birth_date=birth_date,
                    sex=sex,  # type: ignore[arg-type]
                    relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE,
                ),
                stay_start=today.isoformat(),
                stay_end=(last_day or today + timedelta(days=10)).isoformat(),
            )
        )
    )
    await town.known(household, residents=2)
    return guest


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


async def test_a_guest_whose_stay_has_ended_no_longer_counts_until_it_is_extended(
    town: Town, clock: Clock
) -> None:
    """A lodger registered for a term is a "virtual resident" once it is over: notices for
    young men no longer go to the house they left, until the stay is extended."""
    household = await town.add_household(town.city.group)
    guest = await lodger(town, clock, household, "Trần Văn Khách", born(20), MALE)
    young_men = notices_pb2.Audience(member=notices_pb2.MemberFilter(max_age=25, sex=MALE))
    assert household in await audience_of(town, young_men)

    clock.advance(days=11)
    assert household not in await audience_of(town, young_men)

    extended_to = (local_day(clock()) + timedelta(days=30)).isoformat()
    await town.city.leader.ExtendTemporaryStay(
        registry_pb2.ExtendTemporaryStayRequest(
            request_id=rid(), person_id=guest.person.person_id, stay_end=extended_to
        )
    )
    view = town.service.store.view

    async def extended() -> bool:
        found = await view.persons.find_one({"_id": guest.person.person_id})
        return found is not None and found.get("stay_end") == extended_to

    await eventually(extended, what="the extended stay in the notices view")
    assert household in await audience_of(town, young_men)


async def test_a_house_left_to_guests_whose_stay_has_ended_is_not_sent_notices(
    town: Town, clock: Clock
) -> None:
    """Everyone's notices too: a house whose only residents are lodgers past their term has
    nobody living there, until a stay is extended."""
    household = await town.add_household(town.city.group)
    guest = await lodger(town, clock, household, "Trần Thị Trọ", born(30), FEMALE)
    await town.empty_of_head(household)
    assert household in await audience_of(town, notices_pb2.Audience())

    clock.advance(days=11)
    notice = await town.publish()
    await town.delivered(notice.notice_id)
    records = town.service.store.deliveries
    assert await records.count_documents({"notice_id": notice.notice_id}) > 0
    assert (
        await records.find_one({"notice_id": notice.notice_id, "household_id": household}) is None
    )

    # A change to the house that leaves it empty does not bring the notice either.
    await town.city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(), household_id=household, update_fields=["address"], address="Kiệt 9"
        )
    )

    async def readdressed() -> bool:
        found = await town.service.store.view.household(household)
        return found is not None and found.get("address") == "Kiệt 9"

    await eventually(readdressed, what="the new address in the notices view")
    assert (
        await records.find_one({"notice_id": notice.notice_id, "household_id": household}) is None
    )

    # The stay extended, the live notice arrives (the registry's event, not a new notice).
    await town.city.leader.ExtendTemporaryStay(
        registry_pb2.ExtendTemporaryStayRequest(
            request_id=rid(),
            person_id=guest.person.person_id,
            stay_end=(local_day(clock()) + timedelta(days=30)).isoformat(),
        )
    )

    async def arrived() -> bool:
        found = {"notice_id": notice.notice_id, "household_id": household, "withdrawn_at": None}
        return await records.find_one(found | {"pending": {"$exists": False}}) is not None

    await eventually(arrived, what="the notice at the house whose guest stays on")


async def test_a_notice_for_infants_reaches_only_households_with_a_baby(town: Town) -> None:
    """Vaccinations for babies not yet a year old: max_age 0, set, is not "any age"."""
    with_baby = await town.add_household(town.city.group)
    with_toddler = await town.add_household(town.city.group)
    baby = (date.today() - timedelta(days=120)).isoformat()
    await town.add_member(with_baby, baby, FEMALE)
    await town.add_member(with_toddler, born(2), MALE)
    infants = notices_pb2.Audience(member=notices_pb2.MemberFilter(max_age=0))
    reached = await audience_of(town, infants)
    assert with_baby in reached
    assert with_toddler not in reached
    unbounded = notices_pb2.Audience(member=notices_pb2.MemberFilter(min_age=1))
    assert with_toddler in await audience_of(town, unbounded)


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


async def inbox_ids(town: Town, household: str) -> list[str]:
    return [n.notice.notice_id for n in await town.inbox(household)]


async def reach_of(town: Town, notice_id: str) -> int:
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice_id))
    return int(reach.total.delivered)


async def change_kind(town: Town, household: str, kind: int) -> None:
    await town.city.ward_officer.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=household,
            update_fields=["residence_kind"],
            residence_kind=kind,  # type: ignore[arg-type]
        )
    )


async def test_a_household_whose_kind_changes_leaves_or_joins_a_live_notice(town: Town) -> None:
    """A renters' notice: a renting household that becomes a permanent one stops seeing it
    (withdrawn, counted out, announced), and one that comes to rent receives it late."""
    renting = await town.add_household(
        town.city.group, residence_kind=registry_pb2.RESIDENCE_KIND_RENTER
    )
    owning = town.households[town.city.other_group][0]
    notice = await town.publish(
        audience=notices_pb2.Audience(residence_kinds=[registry_pb2.RESIDENCE_KIND_RENTER])
    )
    assert (await town.delivered(notice.notice_id)).total.delivered == 1
    assert await inbox_ids(town, renting) == [notice.notice_id]

    await change_kind(town, renting, registry_pb2.RESIDENCE_KIND_PERMANENT)
    await change_kind(town, owning, registry_pb2.RESIDENCE_KIND_RENTER)

    async def swapped() -> bool:
        return await inbox_ids(town, renting) == [] and await inbox_ids(town, owning) == [
            notice.notice_id
        ]

    await eventually(swapped, what="the notice following the households' kinds")
    withdrawn = await town.events(notice.notice_id, events_pb2.NoticeWithdrawn)
    assert [e.household_id for e in withdrawn] == [renting]
    late = await town.events(notice.notice_id, events_pb2.NoticeDelivered)
    assert [e.household_ids for e in late if e.late] == [[owning]]
    assert await reach_of(town, notice.notice_id) == 1


async def test_a_household_whose_matching_member_dies_loses_the_notice(town: Town) -> None:
    """A notice to households with someone over 70: the only such member dies, and the
    household no longer sees it; it is counted out once, however often the registry's change
    is reconciled again."""
    household, other = town.households[town.city.group][:2]
    await town.add_member(household, born(82), FEMALE)
    await town.add_member(other, born(75), MALE)
    elderly = notices_pb2.Audience(member=notices_pb2.MemberFilter(min_age=70))
    notice = await town.publish(audience=elderly)
    assert (await town.delivered(notice.notice_id)).total.delivered == 2

    view = town.service.store.view
    person = await view.persons.find_one({"household_id": household, "birth_date": born(82)})
    assert person is not None
    await town.city.ward_officer.RegisterDeath(
        registry_pb2.RegisterDeathRequest(
            request_id=rid(), person_id=person["_id"], death_date=date.today().isoformat()
        )
    )

    async def withdrawn() -> bool:
        return await inbox_ids(town, household) == []

    await eventually(withdrawn, what="the notice withdrawn after the death")
    assert await inbox_ids(town, other) == [notice.notice_id]
    assert await reach_of(town, notice.notice_id) == 1
    events = await town.events(notice.notice_id, events_pb2.NoticeWithdrawn)
    assert [e.household_id for e in events] == [household]

    # The same change reconciled again (a redelivered event) changes nothing more.
    service = town.service
    reconciler = Reconciler(service.store, service.host.outbox, service.clock)

    async def again(session: Session) -> dict[str, Any]:
        return await reconciler.households_changed([household, other], session)

    assert await in_transaction(service.client, again) == {}
    assert await reach_of(town, notice.notice_id) == 1


async def test_a_birthday_alone_brings_a_household_into_or_out_of_a_live_notice(
    town: Town, clock: Clock
) -> None:
    """No registry event comes when someone turns 70 or 16; the day they do, the household of
    the one turning 70 receives the live notice for the over-70s (late), and that of the one
    turning 16 stops seeing the notice for children up to 15."""
    store = town.service.store
    today = local_day(clock())
    # The day after any the service has swept already (the test clock goes back after a test).
    birthday = max(today, await store.birthdays_swept() or today) + timedelta(days=1)
    elder_home = await town.add_household(town.city.group)
    child_home = await town.add_household(town.city.group)
    await town.add_member(elder_home, years_before(birthday, 70), FEMALE)
    await town.add_member(child_home, years_before(birthday, 16), MALE)
    over_70 = await town.publish(
        unit_id=town.city.group,
        audience=notices_pb2.Audience(member=notices_pb2.MemberFilter(min_age=70)),
    )
    children = await town.publish(
        unit_id=town.city.group,
        audience=notices_pb2.Audience(member=notices_pb2.MemberFilter(max_age=15)),
    )
    await town.delivered(over_70.notice_id)
    await town.delivered(children.notice_id)
    assert await inbox_ids(town, elder_home) == []
    assert await inbox_ids(town, child_home) == [children.notice_id]

    clock.advance(days=(birthday - today).days)

    async def turned() -> bool:
        return await inbox_ids(town, elder_home) == [over_70.notice_id] and (
            await inbox_ids(town, child_home) == []
        )

    await eventually(turned, what="the notices following the birthdays")
    late = await town.events(over_70.notice_id, events_pb2.NoticeDelivered)
    assert [e.household_ids for e in late if e.late] == [[elder_home]]
    withdrawn = await town.events(children.notice_id, events_pb2.NoticeWithdrawn)
    assert [e.household_id for e in withdrawn] == [child_home]
    # The day is swept once: a second round that day changes nothing.
    assert await town.service.deliverer.birthdays_due() == 0
    assert await reach_of(town, over_70.notice_id) == 1


def years_before(day: date, years: int) -> str:
    try:
        return day.replace(year=day.year - years).isoformat()
    except ValueError:  # 29 February in a year without it
        return day.replace(year=day.year - years, day=28).isoformat()


async def test_a_house_whose_guests_stay_ends_loses_its_live_notices_that_day(
    town: Town, clock: Clock
) -> None:
    """No registry event comes when a lodger's term is over; the day after its last day, the
    house left to that lodger alone has nobody living there: it stops seeing the live notice
    (and is no longer a door to knock on), as a house emptied by a move-out does, until the
    stay is extended."""
    store = town.service.store
    today = local_day(clock())
    # Past any day the service has swept already (the test clock goes back after a test).
    last_day = max(today, await store.birthdays_swept() or today) + timedelta(days=1)
    household = await town.add_household(town.city.group)
    guest = await lodger(town, clock, household, "Trần Văn Trọ", born(24), MALE, last_day)
    await town.empty_of_head(household)
    notice = await town.publish(unit_id=town.city.group)
    await town.delivered(notice.notice_id)
    assert await inbox_ids(town, household) == [notice.notice_id]

    clock.advance(days=(last_day - today).days + 1)

    async def gone() -> bool:
        return await inbox_ids(town, household) == []

    await eventually(gone, what="the notice gone from the house left empty")
    withdrawn = await town.events(notice.notice_id, events_pb2.NoticeWithdrawn)
    assert [e.household_id for e in withdrawn] == [household]
    unopened = await town.ward_officer.ListNotReached(
        notices_pb2.ListNotReachedRequest(notice_id=notice.notice_id)
    )
    assert household not in [h.household_id for h in unopened.households]

    await town.city.leader.ExtendTemporaryStay(
        registry_pb2.ExtendTemporaryStayRequest(
            request_id=rid(),
            person_id=guest.person.person_id,
            stay_end=(local_day(clock()) + timedelta(days=30)).isoformat(),
        )
    )

    async def back() -> bool:
        return await inbox_ids(town, household) == [notice.notice_id]

    await eventually(back, what="the notice back at the house whose guest stays on")


async def test_a_house_whose_only_guest_arrives_later_sees_the_live_notice_from_that_day(
    town: Town, clock: Clock
) -> None:
    """A lodger registered ahead of arriving lives in the house from the stay's first day, as
    the registry counts: a house left to that lodger alone gets the live notice only then, from
    that day's sweep (no registry event comes when a stay begins)."""
    store = town.service.store
    today = local_day(clock())
    # Past any day the service has swept already (the test clock goes back after a test).
    first_day = max(today, await store.birthdays_swept() or today) + timedelta(days=1)
    household = await town.add_household(town.city.group)
    await lodger(
        town,
        clock,
        household,
        "Trần Văn Đến",
        born(24),
        MALE,
        first_day + timedelta(days=30),
        first_day=first_day,
    )
    await town.empty_of_head(household)
    notice = await town.publish(unit_id=town.city.group)
    await town.delivered(notice.notice_id)
    assert await inbox_ids(town, household) == []

    clock.advance(days=(first_day - today).days)

    async def arrived() -> bool:
        return await inbox_ids(town, household) == [notice.notice_id]

    await eventually(arrived, what="the notice at the house from its guest's first day")
    delivered = await town.events(notice.notice_id, events_pb2.NoticeDelivered)
    assert [e.late for e in delivered if household in e.household_ids] == [True]


async def test_a_first_delivery_running_past_midnight_counts_ages_on_the_day_it_delivers(
    town: Town, clock: Clock
) -> None:
    """Ages are counted on the day of delivery: a notice for children up to 15 whose first
    delivery reaches a household only on the day its child turns 16 (the day's birthdays
    already swept, before that household had a record to withdraw) does not deliver it there."""
    store, deliverer = town.service.store, town.service.deliverer
    today = local_day(clock())
    # The day after any the service has swept already (the test clock goes back after a test).
    birthday = max(today, await store.birthdays_swept() or today) + timedelta(days=1)
    # After the group's first households in the delivery's order: in its second batch.
    child_home = await town.add_household(town.city.group)
    await town.add_member(child_home, years_before(birthday, 16), MALE)
    await deliverer.stop()
    try:
        children = await town.publish(
            town.leader,
            unit_id=town.city.group,
            audience=notices_pb2.Audience(member=notices_pb2.MemberFilter(max_age=15)),
        )
        assert await deliverer.fan_out_batch()
        clock.advance(days=(birthday - today).days)
        await deliverer.birthdays_due()
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.start()
    reach = await town.delivered(children.notice_id)
    assert reach.total.delivered == 0
    assert await inbox_ids(town, child_home) == []

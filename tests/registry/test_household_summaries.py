"""The facts dues depend on: certified poor households, war invalids among the members, and a
unit's households summarised for levying dues (what the ledger reads)."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.registry.v1 import events_pb2, registry_pb2

from services.common.auth import Role
from services.common.cloudevents import type_name
from services.common.config import Settings
from services.common.wire import VIETNAM, local_date
from services.registry.main import RegistryService
from tests.conftest import Clock
from tests.kafka_reader import TopicReader, eventually, of_type, with_key
from tests.registry_fixtures import (
    Caller,
    City,
    citizen_id,
    new_household,
    outlive_the_first_page,
    person,
    rid,
)


async def test_poor_and_war_invalid_are_recorded_but_never_published(
    city: City, settings: Settings
) -> None:
    poor = await new_household(city.leader, city.group, head_name="Phạm Thị Bình", poor=True)
    household_id = poor.household.household_id
    assert poor.household.poor
    veteran = person("Lê Văn Công", "1950-04-30", registry_pb2.SEX_MALE)
    veteran.citizen_id = citizen_id("1950-04-30", registry_pb2.SEX_MALE)
    veteran.relationship = registry_pb2.RELATIONSHIP_PARENT
    veteran.war_invalid = True
    registered = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=household_id, person=veteran
        )
    )
    assert registered.person.war_invalid
    updated = await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(), household_id=household_id, update_fields=["poor"], poor=False
        )
    )
    assert not updated.household.poor
    got = await city.leader.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=household_id)
    )
    assert not got.household.poor
    assert [m.war_invalid for m in got.members if m.full_name == "Lê Văn Công"] == [True]

    async with TopicReader(settings.kafka_bootstrap_servers, "civic.registry.v1") as reader:
        wanted = (household_id, registered.person.person_id)
        # The household's creation and the member's registration: the change of poverty
        # publishes nothing.
        records = await reader.collect(
            lambda rs: len(with_key(rs, *wanted)) >= 2, what="the household's events"
        )
    mine = with_key(records, *wanted)
    # The topic is kept for ever and read by every consumer: poverty and a war invalid's health
    # are read through ListHouseholdSummaries by those allowed, never published.
    (created,) = of_type(mine, type_name(events_pb2.HouseholdCreated()))
    assert events_pb2.HouseholdCreated.FromString(created.value).household_id == household_id
    assert not events_pb2.HouseholdCreated.FromString(created.value).poor
    persons = [
        events_pb2.PersonRegistered.FromString(r.value)
        for r in of_type(mine, type_name(events_pb2.PersonRegistered()))
    ]
    assert [p.war_invalid for p in persons if p.person_id == registered.person.person_id] == [False]


async def test_a_change_of_poverty_is_not_told_by_the_fields_an_update_publishes(
    city: City, registry: RegistryService
) -> None:
    """Leaving the value out is not enough: `updated_fields: ["poor"]` on a topic kept for ever
    tells that the household's certification changed."""
    home = await new_household(city.leader, city.group)
    household_id = home.household.household_id

    async def update(fields: list[str], **values: Any) -> registry_pb2.Household:
        response: registry_pb2.UpdateHouseholdResponse = await city.leader.UpdateHousehold(
            registry_pb2.UpdateHouseholdRequest(
                request_id=rid(), household_id=household_id, update_fields=fields, **values
            )
        )
        return response.household

    assert (await update(["poor"], poor=True)).poor
    both = await update(["poor", "address"], poor=False, address="9 Kiệt 3 Lê Duẩn")
    assert (both.poor, both.address) == (False, "9 Kiệt 3 Lê Duẩn")

    staged = [
        events_pb2.HouseholdUpdated.FromString(event["data"])
        async for entry in registry.db["outbox"].find({"events.key": household_id})
        for event in entry["events"]
        if event["type"] == type_name(events_pb2.HouseholdUpdated())
    ]
    assert [list(event.updated_fields) for event in staged] == [["address"]]
    # The household's own history, projected from the topic, still has the address change.
    resident = city.as_role(Role.RESIDENT, city.group, household_id)

    async def updates() -> list[str]:
        history = await resident.GetHouseholdHistory(
            registry_pb2.GetHouseholdHistoryRequest(household_id=household_id)
        )
        return [e.summary for e in history.entries if e.summary.startswith("updated")]

    assert await eventually(updates, what="the address change in the history") == [
        "updated: address"
    ]


async def test_household_summaries_for_dues(city: City) -> None:
    first = await new_household(city.leader, city.group, head_name="Trần Văn An", poor=True)
    await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(),
            household_id=first.household.household_id,
            person=person(citizen_id=citizen_id("1990-05-17", registry_pb2.SEX_FEMALE)),
        )
    )
    second = await new_household(city.leader, city.group, head_name="Hoàng Văn Dũng")
    elsewhere = await new_household(city.other_leader, city.other_group)

    as_service = city.as_role(Role.SERVICE, city.group)
    page = await as_service.ListHouseholdSummaries(
        registry_pb2.ListHouseholdSummariesRequest(
            unit_id=city.group, page=types_pb2.PageRequest(page_size=1)
        )
    )
    rest = await as_service.ListHouseholdSummaries(
        registry_pb2.ListHouseholdSummariesRequest(
            unit_id=city.group, page=types_pb2.PageRequest(page_token=page.next_page_token)
        )
    )
    summaries = {s.household_id: s for s in [*page.households, *rest.households]}
    assert len(page.households) == 1 and not rest.next_page_token
    assert set(summaries) == {first.household.household_id, second.household.household_id}
    one = summaries[first.household.household_id]
    assert (one.head_name, one.residents, one.poor, one.war_invalid_member) == (
        "Trần Văn An",
        2,
        True,
        False,
    )
    ward = await city.ward_officer.ListHouseholdSummaries(
        registry_pb2.ListHouseholdSummariesRequest(unit_id=city.ward)
    )
    assert elsewhere.household.household_id in {s.household_id for s in ward.households}
    # Asked for some households by id: those of them in the unit, and no other.
    named = await city.ward_officer.ListHouseholdSummaries(
        registry_pb2.ListHouseholdSummariesRequest(
            unit_id=city.group,
            household_ids=[second.household.household_id, elsewhere.household.household_id],
        )
    )
    assert [s.household_id for s in named.households] == [second.household.household_id]
    with pytest.raises(grpc.aio.AioRpcError) as too_many:
        await city.ward_officer.ListHouseholdSummaries(
            registry_pb2.ListHouseholdSummariesRequest(
                unit_id=city.group, household_ids=[f"hh-{i}" for i in range(101)]
            )
        )
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (too_many.value.details() or "").startswith("household_ids: ")

    # The read of the heads' names is in each household's access log.
    resident = city.as_role(Role.RESIDENT, city.group, second.household.household_id)
    log = await resident.ListAccessLog(
        registry_pb2.ListAccessLogRequest(household_id=second.household.household_id)
    )
    assert "ListHouseholdSummaries" in {entry.action for entry in log.entries}

    for caller, unit in [
        (city.as_role(Role.RESIDENT, city.group, second.household.household_id), city.group),
        (city.as_role(Role.TREASURER, city.group), city.group),
        (city.as_role(Role.SERVICE, city.other_group), city.group),
        (city.other_leader, city.group),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await caller.ListHouseholdSummaries(
                registry_pb2.ListHouseholdSummariesRequest(unit_id=unit)
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await city.leader.ListHouseholdSummaries(registry_pb2.ListHouseholdSummariesRequest())
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (bad.value.details() or "").startswith("unit_id: ")


async def test_a_guest_whose_stay_has_ended_is_not_levied_on(city: City, clock: Clock) -> None:
    """A summary counts who lives in the household, as the census does: a guest counts up to
    the stay's last day, and not after it (a war invalid among them neither)."""
    today = local_date(clock())
    lodging = await new_household(city.leader, city.group, head_name="Chủ Nhà Trọ")
    guest = person("Khách Trọ", "1950-01-01", relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE)
    guest.war_invalid = True
    await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=lodging.household.household_id,
            person=guest,
            stay_start=today.isoformat(),
            stay_end=(today + timedelta(days=30)).isoformat(),
        )
    )

    async def summary() -> tuple[int, bool]:
        page = await city.leader.ListHouseholdSummaries(
            registry_pb2.ListHouseholdSummariesRequest(unit_id=city.group)
        )
        [one] = [s for s in page.households if s.household_id == lodging.household.household_id]
        return one.residents, one.war_invalid_member

    clock.advance(days=30)  # the stay's last day
    assert await summary() == (2, True)
    clock.advance(days=1)
    assert await summary() == (1, False)


async def test_every_page_of_summaries_counts_who_lives_here_on_the_first_pages_day(
    city: City, clock: Clock
) -> None:
    """A levy's pages are read as the register was at the first, and so counted: a page read
    after midnight no longer counted a guest whose last day the first page was read on, so
    that households of one levy were counted by two days' rules."""
    day = local_date(clock()) + timedelta(days=1)
    move_to = datetime.combine(day, time(23, 58), tzinfo=VIETNAM)
    clock.advance(seconds=(move_to - clock()).total_seconds())
    first = await new_household(city.leader, city.group)
    lodging = await new_household(city.leader, city.group, head_name="Chủ Nhà Trọ")
    guest = person("Khách Trọ", "1990-01-01", relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE)
    await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=lodging.household.household_id,
            person=guest,
            stay_start=day.isoformat(),
            stay_end=day.isoformat(),  # a guest for the night
        )
    )

    async def page(token: str) -> registry_pb2.ListHouseholdSummariesResponse:
        read: registry_pb2.ListHouseholdSummariesResponse = (
            await city.leader.ListHouseholdSummaries(
                registry_pb2.ListHouseholdSummariesRequest(
                    unit_id=city.group, page=types_pb2.PageRequest(page_size=1, page_token=token)
                )
            )
        )
        return read

    opening = await page("")
    assert [s.household_id for s in opening.households] == [first.household.household_id]
    clock.advance(minutes=5)  # past midnight: the guest's stay is over now
    after = await page(opening.next_page_token)
    assert [(s.household_id, s.residents) for s in after.households] == [
        (lodging.household.household_id, 2)
    ]


async def test_a_summary_read_records_no_citizen_id_as_shown(city: City) -> None:
    """A ward officer may see citizen IDs, but a summary shows only the head's name: the
    household's access log must not say the head's ID was shown."""
    home = await new_household(city.leader, city.group)
    household_id = home.household.household_id
    await city.ward_officer.ListHouseholdSummaries(
        registry_pb2.ListHouseholdSummariesRequest(unit_id=city.group)
    )
    resident = city.as_role(Role.RESIDENT, city.group, household_id)
    log = await resident.ListAccessLog(registry_pb2.ListAccessLogRequest(household_id=household_id))
    read = [
        (e.actor_role, e.person_id, e.citizen_id_shown)
        for e in log.entries
        if e.action == "ListHouseholdSummaries"
    ]
    assert read == [("ward_officer", home.head.person_id, False)]
    # Where the ID is shown to the same officer, it is recorded as shown.
    await city.ward_officer.GetPerson(registry_pb2.GetPersonRequest(person_id=home.head.person_id))
    log = await resident.ListAccessLog(registry_pb2.ListAccessLogRequest(household_id=household_id))
    assert [e.citizen_id_shown for e in log.entries if e.action == "GetPerson"] == [True]


async def test_a_wards_households_are_paged_in_index_order_without_a_sort(
    city: City, registry: RegistryService
) -> None:
    """Every household of the ward once, across its groups, page by page; each page read from
    where the last ended in the (unit, id) index, never the ward's households sorted again."""
    homes = {
        (await new_household(city.leader, city.group)).household.household_id for _ in range(3)
    }
    homes |= {
        (await new_household(city.other_leader, city.other_group)).household.household_id
        for _ in range(3)
    }
    db = registry.db
    await db.command("profile", 2)
    try:
        listed: list[str] = []
        token = ""
        while True:
            page = await city.ward_officer.ListHouseholdSummaries(
                registry_pb2.ListHouseholdSummariesRequest(
                    unit_id=city.ward, page=types_pb2.PageRequest(page_size=2, page_token=token)
                )
            )
            listed += [s.household_id for s in page.households]
            token = page.next_page_token
            if not token:
                break
    finally:
        await db.command("profile", 0)
    reads = (
        await db["system.profile"]
        .find({"ns": f"{db.name}.households", "op": "query", "command.filter.active": True})
        .to_list()
    )
    await db["system.profile"].drop()
    assert sorted(listed) == sorted(homes)
    plans = {r["planSummary"] for r in reads}
    assert plans == {"IXSCAN { unit_id: 1, _id: 1 }"}, plans
    assert not [r for r in reads if r.get("hasSortStage")]

    with pytest.raises(grpc.aio.AioRpcError) as forged:
        await city.ward_officer.ListHouseholdSummaries(
            registry_pb2.ListHouseholdSummariesRequest(
                unit_id=city.ward, page=types_pb2.PageRequest(page_token="hh-1")
            )
        )
    assert forged.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def summaries_from(
    caller: Caller, unit_id: str, token: str, size: int = 0
) -> tuple[list[str], str]:
    page = await caller.ListHouseholdSummaries(
        registry_pb2.ListHouseholdSummariesRequest(
            unit_id=unit_id, page=types_pb2.PageRequest(page_size=size, page_token=token)
        )
    )
    return [s.household_id for s in page.households], page.next_page_token


async def rest_of(caller: Caller, unit_id: str, token: str) -> list[str]:
    """The households of the pages after `token`, to the last."""
    listed: list[str] = []
    while token:
        page, token = await summaries_from(caller, unit_id, token)
        listed += page
    return listed


@pytest.mark.parametrize(
    ("first_page", "merged_group", "into"),
    [
        # Group 18's households, older (lower ids) than group 17's, move into group 17 once all
        # of it was read: below where the read is in the (unit, id) order, never reached.
        (3, "other_group", "group"),
        # Group 17 moves into group 18 after two of its households: ahead of the read, met again.
        (2, "group", "other_group"),
    ],
)
async def test_a_paged_read_sees_the_register_as_it_was_at_its_first_page(
    city: City, first_page: int, merged_group: str, into: str
) -> None:
    """The ledger levies dues on what one read of the register lists, a page at a time: a
    merge of groups between two pages moves households to the other side of where the read
    is. Every page reads the register as it was at the first, so each household is listed
    once, in the group it had then."""
    before = [(await new_household(city.other_leader, city.other_group)).household for _ in "ab"]
    before += [(await new_household(city.leader, city.group)).household for _ in "abc"]
    listed, token = await summaries_from(city.ward_officer, city.ward, "", first_page)
    assert token
    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(),
            source_unit_id=getattr(city, merged_group),
            target_unit_id=getattr(city, into),
        )
    )
    listed += await rest_of(city.ward_officer, city.ward, token)
    assert sorted(listed) == sorted(h.household_id for h in before)
    # A read begun now sees the merge.
    now = await city.ward_officer.ListHouseholdSummaries(
        registry_pb2.ListHouseholdSummariesRequest(unit_id=city.ward)
    )
    assert {s.unit_id for s in now.households} == {getattr(city, into)}


async def test_a_page_token_past_the_kept_history_says_to_start_again(
    city: City, registry: RegistryService
) -> None:
    """MongoDB keeps the register's past for minSnapshotHistoryWindowInSeconds (300 s): a later
    page asked for after that cannot be read as the first was. It is refused, naming the
    token, never read from the register as it is now."""
    for _ in "ab":
        await new_household(city.leader, city.group)
    _, token = await summaries_from(city.ward_officer, city.ward, "", 1)
    error = await outlive_the_first_page(
        registry,
        lambda: new_household(city.other_leader, city.other_group),
        lambda: summaries_from(city.ward_officer, city.ward, token),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.details() or "").startswith("page.page_token: ")
    assert "first page" in (error.details() or "")


async def test_a_page_token_of_a_moment_to_come_is_invalid(city: City) -> None:
    await new_household(city.leader, city.group)
    await new_household(city.leader, city.group)
    _, token = await summaries_from(city.ward_officer, city.ward, "", 1)
    unit, household_id = token.split("|")[:2]
    with pytest.raises(grpc.aio.AioRpcError) as future:
        await summaries_from(city.ward_officer, city.ward, f"{unit}|{household_id}|4000000000.1")
    assert future.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (future.value.details() or "").startswith("page.page_token: ")


async def test_a_page_token_given_before_reads_were_pinned_to_a_moment_still_reads(
    city: City,
) -> None:
    """A token of the form `unit|id` (no moment) continues the read from the register as it
    is now, and the pages after it are read as that page was."""
    homes = sorted(
        [(await new_household(city.leader, city.group)).household for _ in "abc"],
        key=lambda h: h.household_id,
    )
    listed, token = await summaries_from(
        city.ward_officer, city.ward, f"{city.group}|{homes[0].household_id}", 1
    )
    assert listed == [homes[1].household_id]
    assert token.count("|") == 3  # the moment read at, and the clock then
    assert await rest_of(city.ward_officer, city.ward, token) == [homes[2].household_id]

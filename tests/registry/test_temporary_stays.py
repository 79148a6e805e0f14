"""A guest's temporary stay extended: renters stay on, often past the day registered, and the
leader finds them among the suspects whose stay expired."""

from __future__ import annotations

from datetime import date, timedelta

import grpc
import pytest
from civic.registry.v1 import events_pb2, registry_pb2
from google.protobuf.message import Message

from services.common.cloudevents import decode
from services.registry.domain import local_date
from services.registry.main import RegistryService
from tests.conftest import Clock
from tests.kafka_reader import eventually
from tests.registry_fixtures import City, new_household, person, rid

EXTENDED = "civic.registry.v1.TemporaryStayExtended"


async def guest_of(city: City, household_id: str, start: date, end: date) -> registry_pb2.Person:
    response = await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=household_id,
            person=person(
                "Khách Trọ", "2001-01-01", relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE
            ),
            stay_start=start.isoformat(),
            stay_end=end.isoformat(),
        )
    )
    guest: registry_pb2.Person = response.person
    return guest


async def published(registry: RegistryService, person_id: str) -> list[Message]:
    """The events staged under the person's key, decoded, in order."""
    return [
        decode(event["type"], event["data"])
        async for entry in registry.db["outbox"].find({"events.key": person_id}).sort("order")
        for event in entry["events"]
        if event["key"] == person_id
    ]


async def test_an_ended_stay_extended_counts_is_found_and_is_no_longer_a_suspect(
    city: City, registry: RegistryService, clock: Clock
) -> None:
    today = local_date(clock())
    lodging = await new_household(
        city.leader,
        city.group,
        head_name="Chủ Nhà Trọ",
        residence_kind=registry_pb2.RESIDENCE_KIND_RENTER,
    )
    household_id = lodging.household.household_id
    guest = await guest_of(city, household_id, today, today + timedelta(days=30))
    guest_id = guest.person_id

    async def counted() -> tuple[int, int]:
        counts = await city.ward_officer.CountByUnit(
            registry_pb2.CountByUnitRequest(unit_id=city.ward)
        )
        group = next(c for c in counts.children if c.unit_id == city.group)
        return group.population, group.temporary_residents

    async def found() -> list[str]:
        page = await city.leader.SearchPersons(
            registry_pb2.SearchPersonsRequest(unit_id=city.group, name="Khach Tro")
        )
        return [p.person_id for p in page.persons]

    async def suspects() -> dict[str, list[int]]:
        listed = await city.leader.ListSuspectedVirtualResidents(
            registry_pb2.ListSuspectedVirtualResidentsRequest(unit_id=city.group)
        )
        return {r.person.person_id: list(r.reasons) for r in listed.residents}

    clock.advance(days=45)  # the stay ended two weeks ago; the guest is still there
    now = local_date(clock())
    assert await counted() == (1, 0)
    assert await found() == []
    assert await suspects() == {guest_id: [registry_pb2.VIRTUAL_RESIDENT_REASON_STAY_EXPIRED]}
    active_before = (await registry.db["households"].find_one({"_id": household_id}) or {})[
        "last_activity_at"
    ]

    request = registry_pb2.ExtendTemporaryStayRequest(
        request_id=rid(), person_id=guest_id, stay_end=(now + timedelta(days=180)).isoformat()
    )
    extended = (await city.leader.ExtendTemporaryStay(request)).person

    assert (extended.stay_start, extended.stay_end) == (guest.stay_start, request.stay_end)
    assert extended.residence_kind == registry_pb2.RESIDENCE_KIND_TEMPORARY
    assert await counted() == (2, 1)
    assert await found() == [guest_id]
    assert await suspects() == {}
    # A renewed stay is a residence event, as its registration was: a sign of life there.
    assert (await registry.db["households"].find_one({"_id": household_id}) or {})[
        "last_activity_at"
    ] > active_before

    # A retry answers as the first time and tells nothing more; so does restating the end.
    assert (await city.leader.ExtendTemporaryStay(request)).person == extended
    restated = registry_pb2.ExtendTemporaryStayRequest(
        request_id=rid(), person_id=guest_id, stay_end=request.stay_end
    )
    active_after = (await registry.db["households"].find_one({"_id": household_id}) or {})[
        "last_activity_at"
    ]
    assert (await city.leader.ExtendTemporaryStay(restated)).person.stay_end == request.stay_end
    assert (await registry.db["households"].find_one({"_id": household_id}) or {})[
        "last_activity_at"
    ] == active_after
    messages = await published(registry, guest_id)
    assert [type(m).__name__ for m in messages] == ["PersonRegistered", "TemporaryStayExtended"]
    assert messages[1] == events_pb2.TemporaryStayExtended(
        person_id=guest_id,
        household_id=household_id,
        unit_id=city.group,
        stay_end=request.stay_end,
    )
    # The request_id names that request only.
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await city.leader.ExtendTemporaryStay(
            registry_pb2.ExtendTemporaryStayRequest(
                request_id=request.request_id,
                person_id=guest_id,
                stay_end=(now + timedelta(days=200)).isoformat(),
            )
        )
    assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    async def history() -> list[str]:
        entries = await city.leader.GetHouseholdHistory(
            registry_pb2.GetHouseholdHistoryRequest(household_id=household_id)
        )
        return [e.summary for e in entries.entries if e.event_type == EXTENDED]

    assert await eventually(history, what="the extension in the household's history") == [
        f"temporary stay extended to {request.stay_end}"
    ]


async def test_only_a_guest_in_the_callers_scope_has_a_stay_to_extend(
    city: City, registry: RegistryService, clock: Clock
) -> None:
    today = local_date(clock())
    home = await new_household(city.leader, city.group)
    guest = await guest_of(city, home.household.household_id, today, today + timedelta(days=30))
    later = (today + timedelta(days=60)).isoformat()

    async def refused(caller_: str, person_id: str) -> grpc.StatusCode:
        caller = getattr(city, caller_)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await caller.ExtendTemporaryStay(
                registry_pb2.ExtendTemporaryStayRequest(
                    request_id=rid(), person_id=person_id, stay_end=later
                )
            )
        code: grpc.StatusCode = error.value.code()
        return code

    # A resident for good has no stay to extend.
    assert await refused("leader", home.head.person_id) == grpc.StatusCode.FAILED_PRECONDITION
    # Another group's leader does not find this group's guest.
    assert await refused("other_leader", guest.person_id) == grpc.StatusCode.NOT_FOUND
    assert await refused("leader", "p-nobody") == grpc.StatusCode.NOT_FOUND
    # A guest who moved out is no longer here to stay on: registered again, if they return.
    await city.leader.MoveOut(
        registry_pb2.MoveOutRequest(request_id=rid(), person_id=guest.person_id)
    )
    assert await refused("leader", guest.person_id) == grpc.StatusCode.FAILED_PRECONDITION
    assert [type(m).__name__ for m in await published(registry, guest.person_id)] == [
        "PersonRegistered",
        "PersonMovedOut",
    ]


async def test_a_guest_registered_ahead_of_arriving_counts_from_the_stays_first_day(
    city: City, clock: Clock
) -> None:
    today = local_date(clock())
    lodging = await new_household(city.leader, city.group, head_name="Chủ Nhà Trọ")
    household_id = lodging.household.household_id
    guest = await guest_of(
        city, household_id, today + timedelta(days=10), today + timedelta(days=40)
    )

    async def living() -> tuple[int, list[str], int]:
        counts = await city.ward_officer.CountByUnit(
            registry_pb2.CountByUnitRequest(unit_id=city.group)
        )
        found = await city.leader.SearchPersons(
            registry_pb2.SearchPersonsRequest(unit_id=city.group, name="Khach Tro")
        )
        summaries = await city.leader.ListHouseholdSummaries(
            registry_pb2.ListHouseholdSummariesRequest(
                unit_id=city.group, household_ids=[household_id]
            )
        )
        [summary] = summaries.households
        return (
            counts.total.population,
            [p.person_id for p in found.persons],
            summary.residents,
        )

    assert await living() == (1, [], 1)
    clock.advance(days=10)  # the stay's first day
    assert await living() == (2, [guest.person_id], 2)


async def test_a_guest_who_stays_on_is_renewed_past_two_years_from_arrival(
    city: City, clock: Clock
) -> None:
    """A stay is registered for two years at most, and renewed as often as the guest stays on:
    each renewal for two years at most from the day it is made."""
    today = local_date(clock())
    lodging = await new_household(city.leader, city.group)
    guest = await guest_of(
        city, lodging.household.household_id, today, today + timedelta(days=2 * 365)
    )
    clock.advance(days=2 * 365 - 10)
    now = local_date(clock())

    async def extend(days: int) -> registry_pb2.ExtendTemporaryStayResponse:
        response: registry_pb2.ExtendTemporaryStayResponse = await city.leader.ExtendTemporaryStay(
            registry_pb2.ExtendTemporaryStayRequest(
                request_id=rid(),
                person_id=guest.person_id,
                stay_end=(now + timedelta(days=days)).isoformat(),
            )
        )
        return response

    renewed = (await extend(365)).person
    assert (renewed.stay_start, renewed.stay_end) == (
        guest.stay_start,
        (now + timedelta(days=365)).isoformat(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await extend(2 * 366 + 1)
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (too_long.value.details() or "").startswith("stay_end:")


async def test_a_stay_registration_retried_after_its_last_day_gets_its_first_answer(
    city: City, clock: Clock
) -> None:
    """The answer was lost on a stay ending today; the app retries after midnight."""
    today = local_date(clock())
    household_id = (await new_household(city.leader, city.group)).household.household_id
    request = registry_pb2.RegisterTemporaryStayRequest(
        request_id=rid(),
        household_id=household_id,
        person=person("Khách Một Ngày", "2001-01-01"),
        stay_start=today.isoformat(),
        stay_end=today.isoformat(),
    )
    first = await city.leader.RegisterTemporaryStay(request)
    clock.advance(days=1)
    again = await city.leader.RegisterTemporaryStay(request)
    assert again.person.person_id == first.person.person_id
    # A new registration of the same past stay is still refused.
    request.request_id = rid()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await city.leader.RegisterTemporaryStay(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stay_end" in (refused.value.details() or "")

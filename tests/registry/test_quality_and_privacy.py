"""Data quality ("correct, complete, clean, live") and who sees personal data."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.registry.v1 import events_pb2, registry_pb2

from services.common.auth import Role
from services.common.cloudevents import decode
from services.common.config import Settings
from services.common.registry_view import RegistryView
from services.common.wire import VIETNAM
from services.registry.domain import local_date
from services.registry.main import RegistryService
from tests.batches import scratch_databases
from tests.conftest import Clock, token
from tests.indexes import examined, index_uses, used_since
from tests.kafka_reader import eventually
from tests.registry_fixtures import Caller, City, new_household, person, rid

NON_RELATIVE = registry_pb2.RELATIONSHIP_NON_RELATIVE


async def test_overdue_verification_after_six_months(city: City, clock: Clock) -> None:
    verified = await new_household(city.leader, city.group)
    never = await new_household(city.leader, city.group, head_name="Hà Văn Chưa")
    await city.leader.VerifyHousehold(
        registry_pb2.VerifyHouseholdRequest(
            request_id=rid(), household_id=verified.household.household_id, note="đã kiểm tra"
        )
    )

    async def overdue() -> set[str]:
        found = await city.leader.ListOverdueVerifications(
            registry_pb2.ListOverdueVerificationsRequest(unit_id=city.group)
        )
        return {h.household_id for h in found.households}

    assert await overdue() == {never.household.household_id}
    clock.advance(days=200)
    assert await overdue() == {verified.household.household_id, never.household.household_id}


async def test_an_official_who_does_not_say_why_reads_nothing(city: City) -> None:
    home = await new_household(city.leader, city.group)
    hid = home.household.household_id
    silent = Caller(city.target, token(Role.WARD_OFFICER, city.ward), purpose="")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await silent.GetHousehold(registry_pb2.GetHouseholdRequest(household_id=hid))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("x-civic-purpose:")
    resident = city.as_role(Role.RESIDENT, city.group, household_id=hid)
    log = await resident.ListAccessLog(registry_pb2.ListAccessLogRequest(household_id=hid))
    assert not [e for e in log.entries if e.actor_role == "ward_officer"]


async def test_a_leaders_list_of_overdue_households_is_logged_for_each(city: City) -> None:
    """The list shows each household's address, book number and place: an official's read of
    personal data, on record for the household though no person of it is shown."""
    home = await new_household(city.leader, city.group)
    hid = home.household.household_id
    found = await city.leader.ListOverdueVerifications(
        registry_pb2.ListOverdueVerificationsRequest(unit_id=city.group)
    )
    assert hid in {h.household_id for h in found.households}

    resident = city.as_role(Role.RESIDENT, city.group, household_id=hid)
    log = await resident.ListAccessLog(registry_pb2.ListAccessLogRequest(household_id=hid))
    entries = [(e.actor_role, e.action, e.person_id) for e in log.entries]
    assert ("group_leader", "ListOverdueVerifications", "") in entries


async def test_virtual_residents_are_flagged(city: City, clock: Clock) -> None:
    lively = await new_household(city.leader, city.group)
    quiet = await new_household(city.leader, city.group, head_name="Lâm Văn Vắng")
    absent = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=lively.household.household_id, person=person("Đi Xa")
        )
    )
    await city.leader.MarkPersonAbsent(
        registry_pb2.MarkPersonAbsentRequest(
            request_id=rid(), person_id=absent.person.person_id, absent=True, note="đi làm xa"
        )
    )
    stay = await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=lively.household.household_id,
            person=person(
                "Khách Trọ", "2001-01-01", relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE
            ),
            stay_start=date.today().isoformat(),
            stay_end=(date.today() + timedelta(days=30)).isoformat(),
        )
    )

    clock.advance(days=400)
    await city.leader.VerifyHousehold(
        registry_pb2.VerifyHouseholdRequest(
            request_id=rid(), household_id=lively.household.household_id
        )
    )
    found = await city.leader.ListSuspectedVirtualResidents(
        registry_pb2.ListSuspectedVirtualResidentsRequest(unit_id=city.group)
    )
    reasons = {r.person.person_id: set(r.reasons) for r in found.residents}

    assert reasons == {
        absent.person.person_id: {registry_pb2.VIRTUAL_RESIDENT_REASON_MARKED_ABSENT},
        stay.person.person_id: {registry_pb2.VIRTUAL_RESIDENT_REASON_STAY_EXPIRED},
        quiet.head.person_id: {registry_pb2.VIRTUAL_RESIDENT_REASON_NOT_VERIFIED},
    }


async def test_a_move_into_a_household_clears_the_movers_absent_mark(
    city: City, registry: RegistryService, settings: Settings
) -> None:
    """Marked absent where they were registered, then moved into another household: the move
    is the evidence that they live there, so they are no longer a suspect, and consumers built
    before the move cleared the mark (the services' views of the registry) learn it from the
    PersonMarkedAbsent they already know, in the move's transaction."""
    home = await new_household(city.leader, city.group)
    new_home = await new_household(city.other_leader, city.other_group, head_name="Lê Văn Mới")
    mover = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=home.household.household_id, person=person("Đi Xa")
        )
    )
    person_id = mover.person.person_id
    await city.leader.MarkPersonAbsent(
        registry_pb2.MarkPersonAbsentRequest(
            request_id=rid(), person_id=person_id, absent=True, note="đi làm xa"
        )
    )
    moved = await city.ward_officer.MovePerson(
        registry_pb2.MovePersonRequest(
            request_id=rid(),
            person_id=person_id,
            to_household_id=new_home.household.household_id,
            relationship=NON_RELATIVE,
        )
    )

    assert not moved.person.marked_absent
    found = await city.other_leader.ListSuspectedVirtualResidents(
        registry_pb2.ListSuspectedVirtualResidentsRequest(unit_id=city.other_group)
    )
    assert person_id not in {r.person.person_id for r in found.residents}
    # A move of someone not marked absent tells nothing more.
    await city.ward_officer.MovePerson(
        registry_pb2.MovePersonRequest(
            request_id=rid(),
            person_id=person_id,
            to_household_id=home.household.household_id,
            relationship=NON_RELATIVE,
        )
    )
    staged = [
        event
        async for entry in registry.db["outbox"].find({"events.key": person_id}).sort("order")
        for event in entry["events"]
        if event["key"] == person_id
    ]
    assert [event["type"].rsplit(".", 1)[-1] for event in staged] == [
        "PersonRegistered",
        "PersonMarkedAbsent",
        "PersonMoved",
        "PersonMarkedAbsent",
        "PersonMoved",
    ]
    messages = [decode(event["type"], event["data"]) for event in staged]
    cleared = messages[3]
    assert isinstance(cleared, events_pb2.PersonMarkedAbsent)
    assert (cleared.absent, cleared.household_id, cleared.unit_id) == (
        False,
        new_home.household.household_id,
        city.other_group,
    )
    # A consumer's view of the registry, as every service keeps it, has them present.
    async with scratch_databases(settings, 1) as [db]:
        view = RegistryView(db, people=True)
        await view.apply_all(messages[:4])
        seen = await db["persons"].find_one({"_id": person_id}) or {}
    assert (seen["household_id"], seen["absent"]) == (new_home.household.household_id, False)


async def test_a_guest_whose_stay_has_ended_is_neither_counted_nor_found_but_flagged(
    city: City, clock: Clock
) -> None:
    """A temporary resident lives here until the stay's last day. After it they are not a
    resident the census counts or a search finds (a "virtual resident" otherwise), but they
    stay on the register, listed as a suspect whose stay expired, until the leader acts."""
    today = local_date(clock())
    host = await new_household(city.leader, city.group)
    lodging = await new_household(
        city.leader,
        city.group,
        head_name="Chủ Nhà Trọ",
        residence_kind=registry_pb2.RESIDENCE_KIND_RENTER,
    )
    guest = await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=lodging.household.household_id,
            person=person("Khách Trọ", "2001-01-01", relationship=NON_RELATIVE),
            stay_start=today.isoformat(),
            stay_end=(today + timedelta(days=30)).isoformat(),
        )
    )
    guest_id = guest.person.person_id
    # The guest alone lives in the lodging house now.
    await city.leader.MoveOut(
        registry_pb2.MoveOutRequest(request_id=rid(), person_id=lodging.head.person_id)
    )

    async def counted() -> tuple[int, int, int, int]:
        counts = await city.ward_officer.CountByUnit(
            registry_pb2.CountByUnitRequest(unit_id=city.ward)
        )
        group = next(c for c in counts.children if c.unit_id == city.group)
        return group.population, group.households, group.renters, group.temporary_residents

    async def found(**search: object) -> list[str]:
        page = await city.leader.SearchPersons(
            registry_pb2.SearchPersonsRequest(unit_id=city.group, **search)  # type: ignore[arg-type]
        )
        return [p.person_id for p in page.persons]

    clock.advance(days=30)  # the stay's last day: still living here
    assert await counted() == (2, 2, 1, 1)
    assert await found(name="Khach Tro") == [guest_id]
    first = await city.leader.SearchPersons(
        registry_pb2.SearchPersonsRequest(
            unit_id=city.group, page=types_pb2.PageRequest(page_size=1)
        )
    )
    clock.advance(days=1)  # the stay has ended
    assert await counted() == (1, 1, 0, 0)
    assert await found(name="Khach Tro") == []
    # A search's later pages are on its first page's day, when the guest still lived here.
    assert await found(page=types_pb2.PageRequest(page_token=first.next_page_token)) == [guest_id]
    assert await found(min_age=18) == [host.head.person_id]
    suspects = await city.leader.ListSuspectedVirtualResidents(
        registry_pb2.ListSuspectedVirtualResidentsRequest(unit_id=city.group)
    )
    assert {r.person.person_id: list(r.reasons) for r in suspects.residents} == {
        guest_id: [registry_pb2.VIRTUAL_RESIDENT_REASON_STAY_EXPIRED]
    }


async def test_a_household_the_leader_found_empty_flags_its_residents(city: City) -> None:
    home = await new_household(city.leader, city.group, head_name="Lâm Văn Khóa")
    household_id = home.household.household_id

    async def reasons() -> dict[str, set[int]]:
        found = await city.leader.ListSuspectedVirtualResidents(
            registry_pb2.ListSuspectedVirtualResidentsRequest(unit_id=city.group)
        )
        return {r.person.person_id: set(r.reasons) for r in found.residents}

    assert await reasons() == {}
    marked = await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=household_id,
            update_fields=["marked_absent"],
            marked_absent=True,
        )
    )
    assert marked.household.marked_absent
    assert await reasons() == {
        home.head.person_id: {registry_pb2.VIRTUAL_RESIDENT_REASON_HOUSEHOLD_MARKED_ABSENT}
    }
    # Someone was found living there after all.
    await city.leader.VerifyHousehold(
        registry_pb2.VerifyHouseholdRequest(request_id=rid(), household_id=household_id)
    )
    assert await reasons() == {}


async def test_reads_by_officials_are_logged_for_the_household(city: City) -> None:
    home = await new_household(city.leader, city.group)
    hid = home.household.household_id
    purposeful = Caller(city.target, token(Role.WARD_OFFICER, city.ward), purpose="xác nhận cư trú")
    await purposeful.GetHousehold(registry_pb2.GetHouseholdRequest(household_id=hid))
    await city.leader.SearchPersons(registry_pb2.SearchPersonsRequest(unit_id=city.group))

    resident = city.as_role(Role.RESIDENT, city.group, household_id=hid)
    own = await resident.GetHousehold(registry_pb2.GetHouseholdRequest(household_id=hid))
    assert not own.head.citizen_id_masked  # a household sees its own IDs in full
    log = await resident.ListAccessLog(registry_pb2.ListAccessLogRequest(household_id=hid))

    entries = [(e.actor_role, e.action, e.purpose, e.citizen_id_shown) for e in log.entries]
    assert ("ward_officer", "GetHousehold", "xác nhận cư trú", True) in entries
    assert ("group_leader", "SearchPersons", "census work", False) in entries
    assert all(e.person_id == home.head.person_id for e in log.entries)
    assert not any(e.actor_role == "resident" for e in log.entries)  # own reads are not logged


async def test_each_household_sees_every_person_a_read_showed_and_only_its_own(
    city: City,
) -> None:
    home = await new_household(city.leader, city.group)
    hid = home.household.household_id
    child = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=hid, person=person("Con Út", "2015-06-01")
        )
    )
    neighbour = await new_household(city.leader, city.group, head_name="Hàng Xóm")
    await city.leader.GetHousehold(registry_pb2.GetHouseholdRequest(household_id=hid))
    # One search shows persons of both households.
    await city.leader.SearchPersons(registry_pb2.SearchPersonsRequest(unit_id=city.group))

    async def entries(household: registry_pb2.CreateHouseholdResponse) -> set[tuple[str, str]]:
        resident = city.as_role(
            Role.RESIDENT, city.group, household_id=household.household.household_id
        )
        log = await resident.ListAccessLog(
            registry_pb2.ListAccessLogRequest(household_id=household.household.household_id)
        )
        return {(e.action, e.person_id) for e in log.entries}

    head, young = home.head.person_id, child.person.person_id
    assert await entries(home) == {
        ("GetHousehold", head),
        ("GetHousehold", young),
        ("SearchPersons", head),
        ("SearchPersons", young),
    }
    assert await entries(neighbour) == {("SearchPersons", neighbour.head.person_id)}


async def test_a_persons_reads_follow_them_to_the_household_they_move_to(city: City) -> None:
    """The audit trail is for the person's own household to see: after a move, the one they
    live in now, not the one they left."""
    home = await new_household(city.leader, city.group)
    son = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(),
            household_id=home.household.household_id,
            person=person(
                "Trần Văn Con", "2000-01-02", relationship=registry_pb2.RELATIONSHIP_CHILD
            ),
        )
    )
    await city.ward_officer.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=home.household.household_id)
    )
    own = await new_household(city.leader, city.group, head_name="Lê Thị Vợ")
    await city.leader.MovePerson(
        registry_pb2.MovePersonRequest(
            request_id=rid(),
            person_id=son.person.person_id,
            to_household_id=own.household.household_id,
            relationship=registry_pb2.RELATIONSHIP_SPOUSE,
        )
    )

    async def reads(household_id: str) -> set[tuple[str, str]]:
        resident = city.as_role(Role.RESIDENT, city.group, household_id=household_id)
        log = await resident.ListAccessLog(
            registry_pb2.ListAccessLogRequest(household_id=household_id)
        )
        return {(e.action, e.person_id) for e in log.entries}

    son_id, father = son.person.person_id, home.head.person_id
    assert await reads(home.household.household_id) == {("GetHousehold", father)}
    assert ("GetHousehold", son_id) in await reads(own.household.household_id)
    assert ("GetHousehold", father) not in await reads(own.household.household_id)


async def test_an_officials_command_answered_with_a_record_is_logged_as_a_read(
    city: City,
) -> None:
    """A command answers with the whole record, changed or not: one that changes nothing (a
    person "marked present" who was never absent) must not be a way to read unlogged."""
    home = await new_household(city.leader, city.group)
    hid, head = home.household.household_id, home.head.person_id
    no_purpose = Caller(city.target, token(Role.WARD_OFFICER, city.ward), purpose="")
    answer = await no_purpose.MarkPersonAbsent(
        registry_pb2.MarkPersonAbsentRequest(request_id=rid(), person_id=head, absent=False)
    )
    assert answer.person.full_name == "Trần Văn An"
    await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(), household_id=hid, update_fields=["poor"], poor=False
        )
    )
    resident = city.as_role(Role.RESIDENT, city.group, household_id=hid)
    log = await resident.ListAccessLog(registry_pb2.ListAccessLogRequest(household_id=hid))
    assert {(e.actor_role, e.action, e.person_id, e.purpose) for e in log.entries} == {
        ("ward_officer", "MarkPersonAbsent", head, "answer to MarkPersonAbsent"),
        ("group_leader", "UpdateHousehold", "", "census work"),
    }
    # The answer is kept for retries, so even a ward officer is shown the ID masked: the
    # household's trail must not say it was seen in full.
    assert answer.person.citizen_id_masked
    shown = next(e for e in log.entries if e.action == "MarkPersonAbsent")
    assert not shown.citizen_id_shown


async def test_residents_see_only_their_own_household(city: City) -> None:
    mine = await new_household(city.leader, city.group)
    theirs = await new_household(city.leader, city.group, head_name="Hàng Xóm")
    resident = city.as_role(Role.RESIDENT, city.group, household_id=mine.household.household_id)
    # The neighbours' household is not found, as one that does not exist.
    for call in (
        resident.GetHousehold(
            registry_pb2.GetHouseholdRequest(household_id=theirs.household.household_id)
        ),
        resident.ListAccessLog(
            registry_pb2.ListAccessLogRequest(household_id=theirs.household.household_id)
        ),
        resident.GetPerson(registry_pb2.GetPersonRequest(person_id=theirs.head.person_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await call
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        assert (hidden.value.details() or "").endswith(" not found")
    # What a resident may not do at all is refused as such.
    for call in (
        resident.SearchPersons(registry_pb2.SearchPersonsRequest(unit_id=city.group)),
        resident.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                request_id=rid(), household_id=mine.household.household_id, person=person()
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Integrators get counts, never persons.
    integrator = city.as_role(Role.INTEGRATOR, city.city)
    counts = await integrator.CountByUnit(registry_pb2.CountByUnitRequest(unit_id=city.group))
    assert counts.total.population == 2
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await integrator.GetHousehold(
            registry_pb2.GetHouseholdRequest(household_id=mine.household.household_id)
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_citizen_ids_are_not_stored_in_clear(city: City, registry: object) -> None:
    home = await new_household(city.leader, city.group)
    full = await city.ward_officer.GetPerson(
        registry_pb2.GetPersonRequest(person_id=home.head.person_id)
    )
    stored = await registry.store.persons.find_one({"_id": home.head.person_id})  # type: ignore[attr-defined]
    assert full.person.citizen_id not in repr(stored)


async def test_an_officials_read_of_a_households_history_is_logged(city: City) -> None:
    """Births, deaths and moves are personal data like the register itself."""
    home = await new_household(city.leader, city.group)
    hid = home.household.household_id
    resident = city.as_role(Role.RESIDENT, city.group, household_id=hid)

    async def projected() -> bool:
        history = await resident.GetHouseholdHistory(
            registry_pb2.GetHouseholdHistoryRequest(household_id=hid)
        )
        return any(e.person_id == home.head.person_id for e in history.entries)

    await eventually(projected, what="the household's creation in its history")
    await city.ward_officer.GetHouseholdHistory(
        registry_pb2.GetHouseholdHistoryRequest(household_id=hid)
    )
    log = await resident.ListAccessLog(registry_pb2.ListAccessLogRequest(household_id=hid))
    assert [(e.actor_role, e.action, e.person_id) for e in log.entries] == [
        ("ward_officer", "GetHouseholdHistory", home.head.person_id)
    ]


async def test_a_household_nobody_lives_in_is_not_due_for_verification(
    city: City, registry: RegistryService
) -> None:
    """As in the census, a household counts while someone lives in it: one whose people all
    died or left is an address, with nobody to verify."""
    lived_in = await new_household(city.leader, city.group)
    left = await new_household(city.leader, city.group, head_name="Hà Văn Đi")
    died = await new_household(city.leader, city.group, head_name="Hà Văn Mất")
    await city.leader.MoveOut(
        registry_pb2.MoveOutRequest(request_id=rid(), person_id=left.head.person_id)
    )
    await city.leader.RegisterDeath(
        registry_pb2.RegisterDeathRequest(
            request_id=rid(), person_id=died.head.person_id, death_date="2025-01-02"
        )
    )
    households, persons = registry.store.households, registry.store.persons
    before = await index_uses(households), await index_uses(persons)
    listed: list[str] = []
    page_token = ""
    while True:  # one a page: an empty household does not cut a page short
        page = await city.leader.ListOverdueVerifications(
            registry_pb2.ListOverdueVerificationsRequest(
                unit_id=city.group, page=types_pb2.PageRequest(page_size=1, page_token=page_token)
            )
        )
        listed += [h.household_id for h in page.households]
        page_token = page.next_page_token
        if not page_token:
            break
    assert listed == [lived_in.household.household_id]
    assert "unit_id_1__id_1" in await used_since(households, before[0])
    assert "household_id_1_status_1" in await used_since(persons, before[1])
    counts = await city.leader.CountByUnit(registry_pb2.CountByUnitRequest(unit_id=city.group))
    assert counts.total.households == len(listed)


async def suspects_from(
    caller: Caller, unit_id: str, token: str, size: int = 0
) -> tuple[list[tuple[str, list[int]]], str]:
    """A page of suspected virtual residents: each person with the reasons shown."""
    page = await caller.ListSuspectedVirtualResidents(
        registry_pb2.ListSuspectedVirtualResidentsRequest(
            unit_id=unit_id, page=types_pb2.PageRequest(page_size=size, page_token=token)
        )
    )
    return [(r.person.person_id, sorted(r.reasons)) for r in page.residents], page.next_page_token


async def test_a_paged_list_of_suspects_is_the_list_as_of_its_first_page(
    city: City, clock: Clock
) -> None:
    """Which households hold suspects, and why, is worked out again for every page: a household
    verified or found empty, or a stay that ends, between two pages, changed who the later
    pages showed and why. Every page now works it out as at the first page (the register and
    the clock then), so the pages together are the list as it was then."""
    homes = [await new_household(city.leader, city.group) for _ in "abc"]
    today = local_date(clock())
    guest = await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=homes[0].household.household_id,
            person=person("Khách Trọ", "2001-01-01", relationship=NON_RELATIVE),
            stay_start=today.isoformat(),
            stay_end=(today + timedelta(days=420)).isoformat(),
        )
    )
    clock.advance(days=400)  # every household quiet for over a year; the stay not yet over
    whole, _ = await suspects_from(city.leader, city.group, "", 1000)
    not_verified = [registry_pb2.VIRTUAL_RESIDENT_REASON_NOT_VERIFIED]
    assert sorted(whole) == sorted(
        [(h.head.person_id, not_verified) for h in homes] + [(guest.person.person_id, not_verified)]
    )

    listed, token = await suspects_from(city.leader, city.group, "", 1)
    assert token
    await city.leader.VerifyHousehold(
        registry_pb2.VerifyHouseholdRequest(
            request_id=rid(), household_id=homes[1].household.household_id
        )
    )
    await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=homes[2].household.household_id,
            update_fields=["marked_absent"],
            marked_absent=True,
        )
    )
    clock.advance(days=30)  # the guest's stay is over
    while token:
        page, token = await suspects_from(city.leader, city.group, token, 1)
        listed += page
    assert sorted(listed) == sorted(whole)
    # A list begun now sees the changes.
    fresh, _ = await suspects_from(city.leader, city.group, "", 1000)
    assert sorted(fresh) != sorted(whole)


async def test_a_suspects_page_token_from_before_the_clock_was_pinned_still_reads(
    city: City, clock: Clock
) -> None:
    """A token that carries the register's moment but not the clock's (`unit|id|moment`, as
    given before) reads on at that moment with the clock as it is; one whose clock is not a
    moment, or one still to come, is refused, naming the token."""
    homes = [await new_household(city.leader, city.group) for _ in "abc"]
    clock.advance(days=400)
    first, token = await suspects_from(city.leader, city.group, "", 1)
    unit, person_id, moment, _ = token.split("|")  # and the clock
    rest: list[tuple[str, list[int]]] = []
    old_token = given = f"{unit}|{person_id}|{moment}"
    while given:
        page, given = await suspects_from(city.leader, city.group, given, 1)
        rest += page
    assert sorted(p for p, _ in first + rest) == sorted(h.head.person_id for h in homes)
    for clock_then in ("soon", "1|2", "99999999999999999", str(10**30)):  # the last two to come
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await suspects_from(city.leader, city.group, f"{old_token}|{clock_then}", 1)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (bad.value.details() or "").startswith("page.page_token: ")
    # A listing that does not read the clock gave no token that carries one.
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await city.leader.ListHouseholdsWithoutHead(
            registry_pb2.ListHouseholdsWithoutHeadRequest(
                unit_id=city.group, page=types_pb2.PageRequest(page_token=token)
            )
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (bad.value.details() or "").startswith("page.page_token: ")


async def test_a_page_of_suspects_reads_no_more_of_the_area_than_the_page_needs(
    city: City, registry: RegistryService, clock: Clock
) -> None:
    """Every page read all the area's suspect households and asked for their people in one
    `$in` of their ids: a district's tens of thousands, for a page of a hundred. A page now
    reads its people in order and, as it goes, each one's household."""
    homes = [await new_household(city.leader, city.group) for _ in range(40)]
    clock.advance(days=400)  # every household a suspect
    db = registry.store.db
    async with examined(db, city.group, collection="households") as households_read:
        listed, token = await suspects_from(city.leader, city.group, "", 2)
    async with examined(
        db, *(h.household.household_id for h in homes), collection="persons"
    ) as named:
        listed += (await suspects_from(city.leader, city.group, token, 2))[0]
    assert [p for p, _ in listed] == [h.head.person_id for h in homes[:4]]
    assert households_read.docs == 0  # each person's household is read with them
    assert named.operations == 0


async def overdue_from(
    caller: Caller, unit_id: str, token: str, size: int
) -> tuple[list[str], str]:
    page = await caller.ListOverdueVerifications(
        registry_pb2.ListOverdueVerificationsRequest(
            unit_id=unit_id, page=types_pb2.PageRequest(page_size=size, page_token=token)
        )
    )
    return [h.household_id for h in page.households], page.next_page_token


async def test_a_paged_list_of_overdue_households_is_the_list_as_of_its_first_page(
    city: City, clock: Clock
) -> None:
    """The cutoff, six months before now, was worked out again for every page, it moved
    on between two pages and brought in households that were not overdue at the first. Every
    page now reads as the first did, with the clock then: a household verified meanwhile is
    still listed, one overdue only since is not."""
    homes = [(await new_household(city.leader, city.group)).household for _ in "abc"]

    async def verify(household: registry_pb2.Household) -> None:
        await city.leader.VerifyHousehold(
            registry_pb2.VerifyHouseholdRequest(
                request_id=rid(), household_id=household.household_id
            )
        )

    for household in homes[:2]:
        await verify(household)
    clock.advance(days=30)
    await verify(homes[2])  # overdue a month after the others
    clock.advance(days=170)
    whole, _ = await overdue_from(city.leader, city.group, "", 1000)
    assert whole == [h.household_id for h in homes[:2]]

    listed, token = await overdue_from(city.leader, city.group, "", 1)
    assert token
    await verify(homes[1])
    clock.advance(days=30)
    while token:
        page, token = await overdue_from(city.leader, city.group, token, 1)
        listed += page
    assert listed == whole
    # A list begun now sees the changes.
    assert (await overdue_from(city.leader, city.group, "", 1000))[0] == [
        homes[0].household_id,
        homes[2].household_id,
    ]


def move_clock_to(clock: Clock, day: date, at: time) -> None:
    """The clock moved on to `at` on `day` in Vietnam."""
    clock.advance(seconds=(datetime.combine(day, at, tzinfo=VIETNAM) - clock()).total_seconds())


async def test_the_six_months_run_out_at_a_day_in_vietnam_not_at_the_hour_verified(
    city: City, clock: Clock
) -> None:
    """A household verified at noon was overdue from noon six months on, and suspect too: the
    lists changed through the day, a household missing from the morning's list and on the
    afternoon's with nothing done. Both now change at midnight in Vietnam: a household
    verified on a day is overdue, and suspect, once the days it may go unverified are over."""
    verified_on = local_date(clock()) + timedelta(days=1)
    move_clock_to(clock, verified_on, time(12))
    home = await new_household(city.leader, city.group)
    hid = home.household.household_id
    await city.leader.VerifyHousehold(
        registry_pb2.VerifyHouseholdRequest(request_id=rid(), household_id=hid)
    )

    async def overdue() -> bool:
        listed, _ = await overdue_from(city.leader, city.group, "", 1000)
        return hid in listed

    async def suspect() -> bool:
        listed = await city.leader.ListSuspectedVirtualResidents(
            registry_pb2.ListSuspectedVirtualResidentsRequest(unit_id=city.group, inactive_days=183)
        )
        return home.head.person_id in {r.person.person_id for r in listed.residents}

    move_clock_to(clock, verified_on + timedelta(days=183), time(23, 59))
    assert not await overdue()
    assert not await suspect()
    move_clock_to(clock, verified_on + timedelta(days=184), time(0, 1))
    assert await overdue()
    assert await suspect()

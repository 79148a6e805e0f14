"""Rules a household keeps through births, moves and changes: one head, a stay stays temporary,
members live as their household does, and a merge is no sign of life."""

from __future__ import annotations

from datetime import date, timedelta

import grpc
import pytest
from civic.registry.v1 import registry_pb2

from tests.conftest import Clock
from tests.registry_fixtures import City, new_household, person, rid


async def household(city: City, household_id: str) -> registry_pb2.GetHouseholdResponse:
    found: registry_pb2.GetHouseholdResponse = await city.leader.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=household_id)
    )
    return found


async def counts(city: City) -> registry_pb2.UnitCount:
    found = await city.leader.CountByUnit(registry_pb2.CountByUnitRequest(unit_id=city.group))
    total: registry_pb2.UnitCount = found.total
    return total


async def test_a_household_whose_head_died_gets_one_head_again(city: City) -> None:
    home = await new_household(city.leader, city.group)
    hid = home.household.household_id
    await city.leader.RegisterDeath(
        registry_pb2.RegisterDeathRequest(
            request_id=rid(), person_id=home.head.person_id, death_date=date.today().isoformat()
        )
    )
    head = registry_pb2.RELATIONSHIP_HEAD
    first = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=hid, person=person("Trần Văn Một", relationship=head)
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await city.leader.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                request_id=rid(), household_id=hid, person=person("Trần Văn Hai", relationship=head)
            )
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    got = await household(city, hid)
    assert got.household.head_person_id == first.person.person_id
    assert [m.person_id for m in got.members if m.relationship == head] == [first.person.person_id]


async def test_a_temporary_resident_moved_to_another_household_stays_temporary(
    city: City,
) -> None:
    host = await new_household(city.leader, city.group)
    other = await new_household(city.leader, city.group, head_name="Phạm Văn Bình")
    stay = await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=host.household.household_id,
            person=person("Võ Thị Khách", relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE),
            stay_start=date.today().isoformat(),
            stay_end=(date.today() + timedelta(days=30)).isoformat(),
        )
    )
    assert (await counts(city)).temporary_residents == 1

    moved = await city.leader.MovePerson(
        registry_pb2.MovePersonRequest(
            request_id=rid(),
            person_id=stay.person.person_id,
            to_household_id=other.household.household_id,
            relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE,
        )
    )

    assert moved.person.residence_kind == registry_pb2.RESIDENCE_KIND_TEMPORARY
    assert (await counts(city)).temporary_residents == 1


async def test_members_live_as_their_household_does_after_it_changes(city: City) -> None:
    home = await new_household(city.leader, city.group)
    hid = home.household.household_id
    await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=hid,
            update_fields=["residence_kind"],
            residence_kind=registry_pb2.RESIDENCE_KIND_TEMPORARY,
        )
    )
    await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(request_id=rid(), household_id=hid, person=person())
    )
    kinds = {m.residence_kind for m in (await household(city, hid)).members}
    assert kinds == {registry_pb2.RESIDENCE_KIND_TEMPORARY}
    assert (await counts(city)).temporary_residents == 2


async def test_a_merge_is_no_sign_of_life(city: City, clock: Clock) -> None:
    quiet = await new_household(city.other_leader, city.other_group, head_name="Lâm Văn Vắng")
    clock.advance(days=400)

    async def suspects() -> set[str]:
        found = await city.ward_officer.ListSuspectedVirtualResidents(
            registry_pb2.ListSuspectedVirtualResidentsRequest(unit_id=city.ward)
        )
        return {r.person.person_id for r in found.residents}

    assert quiet.head.person_id in await suspects()
    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.other_group, target_unit_id=city.group
        )
    )
    assert quiet.head.person_id in await suspects()

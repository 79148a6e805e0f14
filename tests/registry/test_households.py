"""Households with their members, over real gRPC and MongoDB."""

from __future__ import annotations

import grpc
import pytest
from civic.registry.v1 import registry_pb2

from services.common.auth import Role
from tests.registry_fixtures import Caller, City, citizen_id, new_household, person, rid


async def test_household_with_head_and_members(city: City) -> None:
    created = await new_household(city.leader, city.group)
    household_id = created.household.household_id
    spouse_born = "1978-09-09"
    spouse = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(),
            household_id=household_id,
            person=person(
                "Lê Thị Hoa",
                spouse_born,
                citizen_id=citizen_id(spouse_born, registry_pb2.SEX_FEMALE),
            ),
        )
    )

    got = await city.leader.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=household_id)
    )

    assert got.household.unit_id == city.group
    assert got.household.housing.storeys == 3
    assert got.head.full_name == "Trần Văn An"
    assert got.head.relationship == registry_pb2.RELATIONSHIP_HEAD
    assert {m.person_id for m in got.members} == {
        created.head.person_id,
        spouse.person.person_id,
    }


async def test_a_new_head_leaves_the_household_one_head(city: City) -> None:
    created = await new_household(city.leader, city.group)
    household_id = created.household.household_id
    spouse = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=household_id, person=person("Lê Thị Hoa")
        )
    )
    await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=household_id,
            update_fields=["head_person_id"],
            head_person_id=spouse.person.person_id,
        )
    )
    got = await city.leader.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=household_id)
    )
    relationships = {m.person_id: m.relationship for m in got.members}
    assert relationships == {
        spouse.person.person_id: registry_pb2.RELATIONSHIP_HEAD,
        # To the new head: not known until the leader says.
        created.head.person_id: registry_pb2.RELATIONSHIP_UNSPECIFIED,
    }
    assert got.head.person_id == spouse.person.person_id


async def test_a_household_of_another_group_is_not_found_by_its_leader(city: City) -> None:
    """Outside the caller's scope a household is answered as one that does not exist: the
    answer tells nothing of whether the id is real."""
    created = await new_household(city.leader, city.group)
    household_id = created.household.household_id

    async def answer(household: str) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await city.other_leader.GetHousehold(
                registry_pb2.GetHouseholdRequest(household_id=household)
            )
        return refused.value.code(), (refused.value.details() or "").replace(household, "<id>")

    made_up = "hh-" + "0" * 24
    assert await answer(household_id) == await answer(made_up)
    assert await answer(household_id) == (grpc.StatusCode.NOT_FOUND, "household <id> not found")
    for refused_call in (
        city.other_leader.GetHouseholdHistory(
            registry_pb2.GetHouseholdHistoryRequest(household_id=household_id)
        ),
        city.other_leader.VerifyHousehold(
            registry_pb2.VerifyHouseholdRequest(request_id=rid(), household_id=household_id)
        ),
        city.other_leader.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                request_id=rid(), household_id=household_id, person=person()
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await refused_call
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


async def test_households_left_without_a_head_are_listed_until_one_is_named(city: City) -> None:
    """The head died or left: someone still living there must be named head, and the group
    leader finds those households to do it."""

    async def listed(caller: Caller, unit_id: str = "") -> set[str]:
        found = await caller.ListHouseholdsWithoutHead(
            registry_pb2.ListHouseholdsWithoutHeadRequest(unit_id=unit_id)
        )
        return {h.household_id for h in found.households}

    async def with_spouse(caller: Caller, group: str, head: str) -> tuple[str, str, str]:
        home = await new_household(caller, group, head_name=head)
        spouse = await caller.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                request_id=rid(), household_id=home.household.household_id, person=person()
            )
        )
        return home.household.household_id, home.head.person_id, spouse.person.person_id

    headed, _, _ = await with_spouse(city.leader, city.group, "Trần Văn Còn")
    widowed, late_head, widow = await with_spouse(city.leader, city.group, "Trần Văn Mất")
    await city.leader.RegisterDeath(
        registry_pb2.RegisterDeathRequest(
            request_id=rid(), person_id=late_head, death_date="2025-03-04"
        )
    )
    emptied = await new_household(city.leader, city.group, head_name="Trần Văn Đi")
    await city.leader.MoveOut(
        registry_pb2.MoveOutRequest(request_id=rid(), person_id=emptied.head.person_id)
    )
    elsewhere, gone_head, _ = await with_spouse(city.other_leader, city.other_group, "Lý Văn Xa")
    await city.other_leader.MoveOut(
        registry_pb2.MoveOutRequest(request_id=rid(), person_id=gone_head)
    )

    # Nobody lives in the emptied one: no head to name there.
    assert await listed(city.leader) == {widowed}
    assert await listed(city.ward_officer) == {widowed, elsewhere}
    assert headed not in await listed(city.ward_officer, city.ward)

    await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=widowed,
            update_fields=["head_person_id"],
            head_person_id=widow,
        )
    )
    assert await listed(city.leader) == set()

    resident = city.as_role(Role.RESIDENT, city.group, household_id=headed)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await resident.ListHouseholdsWithoutHead(registry_pb2.ListHouseholdsWithoutHeadRequest())
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

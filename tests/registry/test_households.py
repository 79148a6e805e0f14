"""Households with their members, over real gRPC and MongoDB."""

from __future__ import annotations

import grpc
import pytest
from civic.registry.v1 import registry_pb2

from tests.registry_fixtures import City, citizen_id, new_household, person, rid


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


async def test_group_leader_of_another_group_is_denied(city: City) -> None:
    created = await new_household(city.leader, city.group)

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await city.other_leader.GetHousehold(
            registry_pb2.GetHouseholdRequest(household_id=created.household.household_id)
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

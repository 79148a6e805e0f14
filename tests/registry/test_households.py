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

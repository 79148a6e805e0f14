"""Administrative units: create, rename, merge groups (households move, history kept), list."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from civic.registry.v1 import registry_pb2

from services.common.auth import Role
from tests.registry_fixtures import City, create_unit, new_household, rid


async def test_tree_is_listed_by_parent(city: City) -> None:
    children = await city.admin.ListChildUnits(
        registry_pb2.ListChildUnitsRequest(unit_id=city.ward)
    )
    assert [u.unit_id for u in children.units] == [city.group, city.other_group]
    assert all(u.kind == registry_pb2.UNIT_KIND_GROUP for u in children.units)
    assert children.units[0].parent_id == city.ward


async def test_rename_keeps_id(city: City) -> None:
    renamed = await city.ward_officer.RenameUnit(
        registry_pb2.RenameUnitRequest(request_id=rid(), unit_id=city.group, name="Tổ 17 mới")
    )
    assert renamed.unit.unit_id == city.group
    got = await city.leader.GetUnit(registry_pb2.GetUnitRequest(unit_id=city.group))
    assert got.unit.name == "Tổ 17 mới"


async def test_merge_moves_households_and_keeps_their_history(city: City) -> None:
    moving = await new_household(city.other_leader, city.other_group)
    household_id = moving.household.household_id

    merged = await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.other_group, target_unit_id=city.group
        )
    )

    assert merged.households_moved == 1
    got = await city.leader.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=household_id)
    )
    assert got.household.unit_id == city.group
    assert all(member.unit_id == city.group for member in got.members)
    source = await city.admin.GetUnit(registry_pb2.GetUnitRequest(unit_id=city.other_group))
    assert not source.unit.active and source.unit.merged_into_id == city.group
    active = await city.admin.ListChildUnits(registry_pb2.ListChildUnitsRequest(unit_id=city.ward))
    assert [u.unit_id for u in active.units] == [city.group]
    # The old leader's group is gone: new households there are refused.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await new_household(city.ward_officer, city.other_group)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # History from before the merge stays with the household, and the move is added to it.
    for _ in range(100):
        history = await city.leader.GetHouseholdHistory(
            registry_pb2.GetHouseholdHistoryRequest(household_id=household_id)
        )
        if len(history.entries) >= 3:
            break
        await asyncio.sleep(0.1)
    types = [entry.event_type for entry in history.entries]
    assert types[0] == "civic.registry.v1.HouseholdCreated"
    assert "civic.registry.v1.HouseholdMoved" in types


async def test_unit_rules(city: City, unique: str) -> None:
    cases = [
        (city.admin, city.ward, "x", registry_pb2.UNIT_KIND_WARD, grpc.StatusCode.INVALID_ARGUMENT),
        (
            city.admin,
            city.group,
            "x",
            registry_pb2.UNIT_KIND_GROUP,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            city.admin,
            city.ward,
            "Bad Code",
            registry_pb2.UNIT_KIND_GROUP,
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            city.admin,
            city.ward,
            "g17",
            registry_pb2.UNIT_KIND_GROUP,
            grpc.StatusCode.ALREADY_EXISTS,
        ),
        (
            city.admin,
            f"{city.ward}.nope",
            "g1",
            registry_pb2.UNIT_KIND_GROUP,
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            city.leader,
            city.ward,
            "g99",
            registry_pb2.UNIT_KIND_GROUP,
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ]
    for caller, parent, code, kind, status in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await create_unit(caller, parent, code, "Tổ mới", kind)
        assert error.value.code() == status, (parent, code)
    other_ward = city.as_role(Role.WARD_OFFICER, f"{city.district}.other")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await create_unit(other_ward, city.ward, "g20", "Tổ 20", registry_pb2.UNIT_KIND_GROUP)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED

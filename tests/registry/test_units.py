"""Administrative units: create, rename, merge groups (households move, history kept), list."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from civic.registry.v1 import registry_pb2
from pymongo import AsyncMongoClient

from services.common.auth import Role
from services.common.config import Settings
from services.common.mongo import Document
from services.registry.main import RegistryService
from services.registry.store import BOOK_NUMBER_INDEX, RegistryStore
from tests.registry.test_import import chunks, row
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
    # The household did not move house: its line says its group was merged.
    (moved,) = [e for e in history.entries if e.event_type == "civic.registry.v1.HouseholdMoved"]
    assert moved.summary == f"group {city.other_group} merged into {city.group}"


def merge(city: City) -> registry_pb2.MergeGroupsRequest:
    return registry_pb2.MergeGroupsRequest(
        request_id=rid(), source_unit_id=city.other_group, target_unit_id=city.group
    )


async def test_a_merged_away_groups_lists_say_where_its_households_went(city: City) -> None:
    """Its leader's token still names it; an empty overdue list would read as nothing to do."""
    await new_household(city.other_leader, city.other_group)
    await city.ward_officer.MergeGroups(merge(city))
    leader = city.other_leader
    for listing in (
        leader.ListOverdueVerifications(registry_pb2.ListOverdueVerificationsRequest()),
        leader.ListSuspectedVirtualResidents(registry_pb2.ListSuspectedVirtualResidentsRequest()),
        leader.ListHouseholdsWithoutHead(registry_pb2.ListHouseholdsWithoutHeadRequest()),
        leader.ListLikelyDuplicatePersons(registry_pb2.ListLikelyDuplicatePersonsRequest()),
        leader.SearchPersons(registry_pb2.SearchPersonsRequest(unit_id=city.other_group)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await listing
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details() == (
            f"unit_id: group {city.other_group} was merged into {city.group}; its households "
            "are listed there"
        )
    # The group it joined lists them.
    listed = await city.leader.SearchPersons(registry_pb2.SearchPersonsRequest())
    assert listed.persons


async def test_a_group_merging_away_is_not_merged_into_at_the_same_moment(
    city: City, registry: RegistryService
) -> None:
    """Two merges at once, the other group into this one and this one into a third: the
    second to commit is refused, and no household is left in a retired group."""
    third = await create_unit(city.admin, city.ward, "t19", "Tổ 19", registry_pb2.UNIT_KIND_GROUP)
    await new_household(city.other_leader, city.other_group)
    store = registry.servicer.store
    read_unit = store.unit
    interleaved = False

    async def merged_away_meanwhile(unit_id: str, session: object = None) -> Document | None:
        nonlocal interleaved
        if unit_id == city.group and session is not None and not interleaved:
            interleaved = True  # the first merge has read its source; this one commits now
            await city.ward_officer.MergeGroups(
                registry_pb2.MergeGroupsRequest(
                    request_id=rid(), source_unit_id=city.group, target_unit_id=third
                )
            )
        return await read_unit(unit_id, session)  # type: ignore[arg-type]

    store.unit = merged_away_meanwhile  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await city.ward_officer.MergeGroups(merge(city))
    finally:
        del store.unit
    assert interleaved
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{city.group} was merged into {third}" in (refused.value.details() or "")
    retired = {"_id": {"$in": [city.group]}, "active": False}
    assert await registry.db["units"].count_documents(retired) == 1
    assert await registry.db["households"].count_documents({"unit_id": city.group}) == 0
    assert await registry.db["households"].count_documents({"unit_id": city.other_group}) == 1


async def test_groups_that_both_issued_a_book_number_merge(city: City) -> None:
    """Book numbers are unique in the group that issued them: two groups may each have had a
    "HK-1". They still merge, and an import into the merged group finds its own HK-1."""
    staying = await new_household(city.leader, city.group, external_ref="HK-1")
    moving = await new_household(city.other_leader, city.other_group, external_ref="HK-1")
    merged = await city.ward_officer.MergeGroups(merge(city))
    assert merged.households_moved == 1
    got = await city.ward_officer.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=moving.household.household_id)
    )
    assert got.household.unit_id == city.group
    assert got.household.external_ref == "HK-1"

    imported = await city.leader.ImportPersons(
        chunks([row(1, city.group, "HK-1", "Đỗ Thị Mới", "2001-03-04")], 10)
    )
    assert (imported.households_created, imported.persons_created) == (0, 1), imported
    own = await city.leader.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=staying.household.household_id)
    )
    assert "Đỗ Thị Mới" in [member.full_name for member in own.members]
    # A row naming the merged group's HK-1 (a file written before the merge) means the book
    # that group issued: the household that moved, not the merged-into group's own HK-1.
    older = await city.ward_officer.ImportPersons(
        chunks([row(1, city.other_group, "HK-1", "Đỗ Văn Cũ", "2001-03-04")], 10)
    )
    assert (older.households_created, older.persons_created, list(older.errors)) == (0, 1, [])
    theirs = await city.ward_officer.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=moving.household.household_id)
    )
    assert "Đỗ Văn Cũ" in [member.full_name for member in theirs.members]


async def test_a_household_created_while_its_group_merges_is_not_left_behind(
    city: City, registry: RegistryService
) -> None:
    """The merge moves the households it can see; one created in the retired group at the same
    moment must not be left there."""
    store = registry.servicer.store
    insert_household = store.insert_household
    merged = False

    async def merge_first(household: Document, session: object) -> None:
        nonlocal merged
        if not merged:
            merged = True
            await city.ward_officer.MergeGroups(merge(city))
        await insert_household(household, session)  # type: ignore[arg-type]

    store.insert_household = merge_first  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await new_household(city.other_leader, city.other_group)
    finally:
        del store.insert_household
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"merged into {city.group}" in (refused.value.details() or "")
    assert await registry.db["households"].count_documents({"unit_id": city.other_group}) == 0

    # The importer's batch, checked against the group before its transaction, likewise.
    importer = registry.servicer.importer
    group_of = importer._group_of

    async def merged_after_the_check(*args: object) -> tuple[str, str]:
        found = await group_of(*args)  # type: ignore[arg-type]
        await city.ward_officer.MergeGroups(
            registry_pb2.MergeGroupsRequest(
                request_id=rid(), source_unit_id=city.group, target_unit_id=third
            )
        )
        return found

    third = await create_unit(city.admin, city.ward, "t19", "Tổ 19", registry_pb2.UNIT_KIND_GROUP)
    importer._group_of = merged_after_the_check  # type: ignore[method-assign,assignment]
    try:
        late = await city.leader.ImportPersons(
            chunks([row(1, city.group, "HK-9", "Lý Văn Muộn", "1990-01-01")], 10)
        )
    finally:
        del importer._group_of
    assert late.persons_created == 0
    assert [e.message for e in late.errors] == [f"group {city.group} was merged into {third}"]
    assert await registry.db["persons"].count_documents({"full_name": "Lý Văn Muộn"}) == 0


async def test_a_store_of_book_numbers_per_current_group_is_migrated(
    settings: Settings, unique: str
) -> None:
    client: AsyncMongoClient[Document] = AsyncMongoClient(settings.mongo_uri)
    db = client[f"{settings.database_prefix}_book_numbers_{unique}"]
    try:
        await db["households"].create_index(
            [("unit_id", 1), ("external_ref", 1)],
            unique=True,
            partialFilterExpression={"external_ref": {"$type": "string"}},
        )
        await db["persons"].create_index(
            "cid_hash", unique=True, partialFilterExpression={"cid_hash": {"$type": "string"}}
        )
        await db["households"].insert_many(
            [
                {"_id": "hh-1", "unit_id": "dn.a.b.g1", "external_ref": "HK-1"},
                {"_id": "hh-2", "unit_id": "dn.a.b.g2", "external_ref": "HK-1"},
                {"_id": "hh-3", "unit_id": "dn.a.b.g2", "external_ref": None},
            ]
        )
        # Two instances starting at once, then one starting again later.
        await asyncio.gather(RegistryStore(db).ensure_indexes(), RegistryStore(db).ensure_indexes())
        await RegistryStore(db).ensure_indexes()
        by_id = {h["_id"]: h async for h in db["households"].find()}
        assert by_id["hh-1"]["ref_unit_id"] == "dn.a.b.g1"
        assert by_id["hh-2"]["ref_unit_id"] == "dn.a.b.g2"
        assert "ref_unit_id" not in by_id["hh-3"]
        indexes = await db["households"].index_information()
        assert "unit_id_1_external_ref_1" not in indexes
        assert indexes[BOOK_NUMBER_INDEX]["unique"]
        # The partial filter a plain equality query can use (a `$type` filter it never can).
        assert indexes[BOOK_NUMBER_INDEX]["partialFilterExpression"] == {
            "external_ref": {"$gt": ""}
        }
        persons = await db["persons"].index_information()
        assert persons["cid_hash_1"]["partialFilterExpression"] == {"cid_hash": {"$gt": ""}}
        # Both now live in one group, as after a merge.
        await db["households"].update_one({"_id": "hh-2"}, {"$set": {"unit_id": "dn.a.b.g1"}})
    finally:
        await client.drop_database(db.name)
        await client.close()


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


@pytest.mark.parametrize("missing", ["source_unit_id", "target_unit_id", "both"])
async def test_a_merge_naming_no_group_is_bad_input(city: City, missing: str) -> None:
    """A group left out of the request is INVALID_ARGUMENT naming it, not a unit outside the
    caller's scope; nothing merges."""
    request = merge(city)
    if missing in ("source_unit_id", "both"):
        request.source_unit_id = ""
    if missing in ("target_unit_id", "both"):
        request.target_unit_id = ""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await city.ward_officer.MergeGroups(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    field = "source_unit_id" if missing == "both" else missing
    assert (error.value.details() or "").startswith(f"{field}: is required")
    groups = await city.admin.ListChildUnits(registry_pb2.ListChildUnitsRequest(unit_id=city.ward))
    assert [u.unit_id for u in groups.units] == [city.group, city.other_group]

"""Scale-out: two ledger instances side by side in one group split the registry's household
moves between them; one is killed mid-load and restarted as the same instance, and every
household the ledger knows still ends up in the group it was merged into — nothing lost."""

from __future__ import annotations

import uuid
from pathlib import Path

from civic.registry.v1 import registry_pb2

from services.common.config import Settings
from services.ledger.events import MOVES
from services.ledger.main import NAME
from tests.registry_fixtures import create_unit, new_city, new_household, rid
from tests.scale_out import Deployment, committed_events

GROUPS = 18


async def test_two_instances_split_the_household_moves_and_a_killed_one_loses_none(
    settings: Settings, tmp_path: Path
) -> None:
    async with Deployment(settings, tmp_path) as deployment:
        registry = await deployment.start("registry", "registry-0")
        ledger = await deployment.side_by_side(NAME, CIVIC_REGISTRY_TARGET=registry.target)
        city = await new_city(registry.target, "c" + uuid.uuid4().hex[:8])
        groups = [
            await create_unit(
                city.admin, city.ward, f"m{n}", f"Tổ {n}", registry_pb2.UNIT_KIND_GROUP
            )
            for n in range(GROUPS)
        ]
        homes = {
            (await new_household(city.ward_officer, group)).household.household_id: group
            for group in groups
        }
        # What a dues list or a contribution would have taught the ledger of each household.
        await deployment.db(NAME)["households"].insert_many(
            [
                {"_id": home, "unit_id": group, "name": "Trần Văn An"}
                for home, group in homes.items()
            ]
        )

        async def merge(number: int) -> None:
            await city.ward_officer.MergeGroups(
                registry_pb2.MergeGroupsRequest(
                    request_id=rid(), source_unit_id=groups[number], target_unit_id=city.group
                )
            )

        await ledger.under_load(GROUPS, merge)
        await city.ward_officer.channel.close()

        moves = [e for e in await committed_events(deployment.db("registry")) if e["type"] in MOVES]
        assert len(moves) == 2 * GROUPS  # each merge's GroupsMerged and its HouseholdMoved
        group = deployment.group(NAME, "household-moves")
        by_instance = await ledger.handled(group, [event["_id"] for event in moves])
        assert set(by_instance) == set(ledger.instances), by_instance
        known = {
            doc["_id"]: doc["unit_id"] async for doc in deployment.db(NAME)["households"].find()
        }
        assert known == dict.fromkeys(homes, city.group)

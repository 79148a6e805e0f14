"""Scale-out: two registry instances side by side in one consumer group split the household-history
work between them; one is killed mid-load and restarted as the same instance, and every event is
still handled exactly once — nothing twice, nothing lost."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

from services.common.config import Settings
from services.registry.main import NAME
from tests.registry_fixtures import new_city, new_household, numbered
from tests.scale_out import Deployment, committed_events

HOUSEHOLDS = 60
UNIT_CREATED = "civic.registry.v1.UnitCreated"


async def test_two_instances_split_the_work_and_a_killed_one_repeats_and_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    async with Deployment(settings, tmp_path) as deployment:
        registry = await deployment.side_by_side(NAME)
        city = await new_city(registry.first.target, "c" + uuid.uuid4().hex[:8])
        leader = city.leader
        await registry.under_load(
            HOUSEHOLDS,
            lambda number: new_household(
                leader, city.group, head_name=numbered("Nguyễn Văn Số", number)
            ),
        )
        await leader.channel.close()

        db = deployment.db(NAME)
        committed = await committed_events(db)
        # Each household: HouseholdCreated and its head's PersonRegistered.
        of_households = [event["_id"] for event in committed if event["type"] != UNIT_CREATED]
        assert len(of_households) == 2 * HOUSEHOLDS

        group = deployment.group(NAME, "household-history")
        by_instance = await registry.handled(group, [event["_id"] for event in committed])

        households = await db["households"].distinct("_id", {"unit_id": city.group})
        lines = db["household_history"].find({"household_id": {"$in": households}})
        history = Counter([line["event_id"] async for line in lines])
        assert history == Counter(of_households), "an event handled twice or not at all"
        assert set(by_instance) == set(registry.instances), by_instance

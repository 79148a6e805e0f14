"""Scale-out: two GIS instances side by side in one registry-view group split the registry's
events between them; one is killed mid-load and restarted as the same instance, and every new
household is still put on the map exactly once — nothing twice, nothing lost."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

from civic.common.v1 import types_pb2
from civic.gis.v1 import events_pb2

from services.common.cloudevents import type_name
from services.common.config import Settings
from services.gis.domain import Layer, household_feature_id
from services.gis.main import NAME
from tests.registry_fixtures import new_city
from tests.scale_out import Deployment, committed_events, households_through_the_registry_view

HOUSEHOLDS = 60
FEATURES_CHANGED = type_name(events_pb2.FeaturesChanged())


def doorstep(number: int) -> types_pb2.GeoPoint:
    """A house of its own along a street in Hải Châu, ten metres apart."""
    return types_pb2.GeoPoint(latitude=16.0600 + number * 0.0001, longitude=108.2200)


async def test_two_instances_split_the_registry_events_and_a_killed_one_maps_each_household_once(
    settings: Settings, tmp_path: Path
) -> None:
    async with Deployment(settings, tmp_path) as deployment:
        registry = await deployment.start("registry", "registry-0")
        gis = await deployment.side_by_side(NAME, CIVIC_REGISTRY_TARGET=registry.target)
        city = await new_city(registry.target, "c" + uuid.uuid4().hex[:8])
        households = await households_through_the_registry_view(gis, city, HOUSEHOLDS, doorstep)
        points = [household_feature_id(household_id) for household_id in households]
        features = deployment.db(NAME)["features"]
        mapped = await features.distinct(
            "_id", {"layer": Layer.HOUSEHOLD.key, "unit_id": city.group}
        )
        assert sorted(mapped) == sorted(points)

        # Putting a household on the map stages its FeaturesChanged in the same transaction.
        # The group maps every household on the topic: other deployments' too, in their units.
        announced = Counter[str]()
        for event in await committed_events(deployment.db(NAME)):
            if event["type"] == FEATURES_CHANGED and event["key"] == city.group:
                changed = events_pb2.FeaturesChanged.FromString(bytes(event["data"]))
                assert not changed.removed_ids
                announced.update(changed.upserted_ids)
        assert announced == Counter(points), "a household mapped twice or not at all"

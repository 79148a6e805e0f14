"""A group merged away: its map becomes the map of the group it went into, which that group's
leader keeps from then on (redrawing it whole, replacing what is no longer there)."""

from __future__ import annotations

from collections.abc import Awaitable

from civic.gis.v1 import gis_pb2

from services.gis.domain import Layer
from tests.gis.conftest import Ward, point_feature, polygon_feature
from tests.kafka_reader import eventually


async def test_the_merged_groups_drawings_are_the_map_of_the_group_it_went_into(
    ward: Ward,
) -> None:
    city = ward.city
    store = ward.service.store
    east_houses = [
        polygon_feature(ward.box(100 + 40 * i, 100, 120 + 40 * i, 115), f"e{i}", storeys=2)
        for i in range(3)
    ]
    done = await ward.import_features(
        gis_pb2.LAYER_BUILDING, east_houses, caller=ward.other_leader, unit_id=city.other_group
    )
    assert done.created == 3
    hydrant = point_feature(ward.at(300, 0), "h-east", kind="hydrant", name="TCH Đông")
    done = await ward.import_features(
        gis_pb2.LAYER_HYDRANT, [hydrant], caller=ward.other_leader, unit_id=city.other_group
    )
    assert done.created == 1
    await ward.merge_other_group()

    async def carried() -> bool:
        left = await store.features.count_documents(
            {"layer": {"$ne": Layer.BOUNDARY.key}, "source_unit": city.other_group}
        )
        return left == 0

    await eventually(carried, what="the merged group's drawings go to the group it went into")
    houses = await ward.features(unit_id=city.ward, layers=[gis_pb2.LAYER_BUILDING])
    east = [f for f in houses["features"] if f["properties"]["storeys"] == 2]
    assert {f["properties"]["unit_id"] for f in east} == {city.group}

    # The group's leader surveys the grown group anew, the east houses and the hydrant among
    # it, and replaces the layers: the merged group's copies go, none is left twice.
    done = await ward.import_features(
        gis_pb2.LAYER_BUILDING,
        [
            polygon_feature(ring["geometry"]["coordinates"][0], f"new-{i}", storeys=2)
            for i, ring in enumerate(east_houses)
        ],
        caller=ward.leader,
        unit_id=city.group,
        replace=True,
    )
    assert (done.created, done.removed, list(done.rejected)) == (3, 3, [])
    done = await ward.import_features(
        gis_pb2.LAYER_HYDRANT,
        [point_feature(ward.at(300, 0), "h-new", kind="hydrant", name="TCH Đông")],
        caller=ward.leader,
        unit_id=city.group,
        replace=True,
    )
    assert (done.created, done.removed) == (1, 1)

    async def hydrants_there() -> list[str]:
        nearest = await ward.leader.NearestHydrants(
            gis_pb2.NearestHydrantsRequest(point=ward.point(300, 0), limit=2, max_distance_m=100)
        )
        return [h.feature_id for h in nearest.hydrants]

    # The hydrant mirror follows the stored layer by a change stream: once it has caught up.
    stored = await store.features.find(
        {"layer": Layer.HYDRANT.key, "unit_id": city.group}
    ).to_list()
    await eventually(
        lambda: _equal(hydrants_there(), [doc["_id"] for doc in stored]),
        what="the nearest hydrants are the stored ones",
    )
    assert len(stored) == 1 and stored[0]["source_id"] == "h-new"

    # Its outline drawn again around both: the merged group's outline goes.
    grown = polygon_feature(ward.box(-600, -400, 600, 400), "grown", unit_id=city.group)
    done = await ward.import_features(
        gis_pb2.LAYER_BOUNDARY, [grown], caller=ward.leader, unit_id=city.group
    )
    assert (done.updated, done.removed, list(done.rejected)) == (1, 1, [])
    outlines = await ward.features(unit_id=city.ward, layers=[gis_pb2.LAYER_BOUNDARY])
    assert sorted(f["properties"]["unit_id"] for f in outlines["features"]) == [
        city.ward,
        city.group,
    ]


async def _equal(found: Awaitable[list[str]], expected: list[str]) -> bool:
    return await found == expected

"""Reading the map: a bounding box or a unit's boundary as RFC 7946 GeoJSON with paging (and
the export opens in GDAL/OGR, through pyogrio), the unit containing a point, the nearest
hydrants with their distances (answered while a large import is checked), and bad queries
refused."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import pyogrio
import pytest
import shapely
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2
from pyogrio import raw
from pyproj import Geod
from shapely.geometry import shape

from services.common.auth import Role
from services.gis import api as gis_api
from tests.gis.conftest import Ward, line_feature, point_feature, polygon_feature
from tests.gis.test_imports import refused
from tests.kafka_reader import eventually


async def draw(ward: Ward) -> None:
    """60 small houses in a 10 x 6 grid in the west group, 12 in the east one; hydrants; alleys."""
    houses = [
        polygon_feature(
            ward.box(-550 + 40 * i, -300 + 40 * j, -530 + 40 * i, -285 + 40 * j),
            f"w{i}-{j}",
            storeys=1 + (i + j) % 4,
        )
        for i in range(10)
        for j in range(6)
    ] + [
        # Drawn clockwise: stored by the right-hand rule all the same.
        polygon_feature(ward.box(50 + 40 * i, 0, 70 + 40 * i, 15)[::-1], f"e{i}", storeys=2)
        for i in range(12)
    ]
    assert (await ward.import_features(gis_pb2.LAYER_BUILDING, houses)).created == 72
    hydrants = [
        point_feature(ward.at(-100, 100), "near", kind="hydrant", name="TCH-1"),
        point_feature(ward.at(-100, 400 - 1), "edge", kind="well"),
        point_feature(ward.at(300, 100), "east", kind="hydrant"),
    ]
    assert (await ward.import_features(gis_pb2.LAYER_HYDRANT, hydrants)).created == 3
    alleys = [line_feature([ward.at(-600, 0), ward.at(600, 0)], "main", width_m=6, name="Kiệt 45")]
    assert (await ward.import_features(gis_pb2.LAYER_ALLEY, alleys)).created == 1


def geodesic(ward: Ward, a: tuple[float, float], b: tuple[float, float]) -> float:
    (lon1, lat1), (lon2, lat2) = ward.at(*a), ward.at(*b)
    return float(Geod(ellps="WGS84").inv(lon1, lat1, lon2, lat2)[2])


def check_rfc7946(collection: dict[str, Any]) -> None:
    """What RFC 7946 asks of a FeatureCollection, checked strictly."""
    assert set(collection) == {"type", "features"}  # no "crs" member (section 4)
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and isinstance(feature["id"], str)
        assert isinstance(feature["properties"], dict)
        geometry = feature["geometry"]
        for x, y in shapely.get_coordinates(shape(geometry)):
            assert -180 <= x <= 180 and -90 <= y <= 90  # longitude first, WGS84 degrees
        assert shape(geometry).is_valid
        if geometry["type"] == "Polygon":
            outer = shapely.geometry.Polygon(geometry["coordinates"][0])
            assert outer.exterior.is_ccw  # the right-hand rule (section 3.1.6)
            ring = geometry["coordinates"][0]
            assert ring[0] == ring[-1] and len(ring) >= 4


async def test_features_in_a_box_and_in_a_boundary_page_by_page(ward: Ward) -> None:
    await draw(ward)
    west, south = ward.at(-600, -400)
    east, north = ward.at(-1, 400)
    box = gis_pb2.BoundingBox(west=west, south=south, east=east, north=north)
    in_box = await ward.features(bbox=box, layers=[gis_pb2.LAYER_BUILDING])
    assert len(in_box["features"]) == 60  # the west group's houses, over two pages of 50
    assert len({f["id"] for f in in_box["features"]}) == 60
    first = await ward.officer.ListFeatures(
        gis_pb2.ListFeaturesRequest(
            bbox=box, layers=[gis_pb2.LAYER_BUILDING], page=types_pb2.PageRequest(page_size=50)
        )
    )
    assert first.count == 50 and first.next_page_token

    in_group = await ward.features(unit_id=ward.city.other_group, layers=[gis_pb2.LAYER_BUILDING])
    assert {f["id"] for f in in_group["features"]}.isdisjoint({f["id"] for f in in_box["features"]})
    assert len(in_group["features"]) == 12
    everything = await ward.features(unit_id=ward.city.ward)
    layers = [f["properties"]["layer"] for f in everything["features"]]
    assert (layers.count("building"), layers.count("hydrant"), layers.count("alley")) == (72, 3, 1)
    assert layers.count("boundary") == 3


async def test_exported_geojson_opens_in_gdal(ward: Ward, tmp_path: Path) -> None:
    await draw(ward)
    collection = await ward.features(unit_id=ward.city.ward)
    check_rfc7946(collection)
    path = tmp_path / "ward.geojson"
    path.write_text(json.dumps(collection, ensure_ascii=False), encoding="utf-8")

    info = pyogrio.read_info(path)
    assert info["driver"] == "GeoJSON" and info["features"] == len(collection["features"])
    assert info["crs"] == "EPSG:4326"
    meta, _, geometries, fields = raw.read(path)
    columns = dict(zip(meta["fields"], fields, strict=True))
    assert sorted(set(columns["layer"])) == ["alley", "boundary", "building", "hydrant"]
    read_back = shapely.from_wkb(geometries)
    ours = [shape(f["geometry"]) for f in collection["features"]]
    for got, sent in zip(read_back, ours, strict=True):
        assert got.equals_exact(sent, 1e-9)
    assert "Kiệt 45" in set(columns["name"])


async def test_the_unit_containing_a_point(ward: Ward) -> None:
    west = await ward.officer.LocateUnit(gis_pb2.LocateUnitRequest(point=ward.point(-200, 10)))
    assert west.unit_id == ward.city.group
    assert [u.unit_id for u in west.units] == [ward.city.group, ward.city.ward]
    assert west.units[0].name == "Tổ dân phố 17"  # the registry's name, from its events
    east = await ward.officer.LocateUnit(gis_pb2.LocateUnitRequest(point=ward.point(250, -10)))
    assert east.unit_id == ward.city.other_group
    outside = await ward.officer.LocateUnit(gis_pb2.LocateUnitRequest(point=ward.point(0, 900)))
    assert outside.unit_id == "" and not outside.units
    # Any signed-in caller may ask (tickets place complaints with it).
    resident = ward.caller(Role.RESIDENT, ward.city.group, "hh-x")
    assert (await resident.LocateUnit(gis_pb2.LocateUnitRequest(point=ward.point(-5, 0)))).unit_id


async def test_a_place_in_a_group_merged_away_lies_in_the_group_it_went_into(
    ward: Ward,
) -> None:
    """The merged group's outline stays on the map until the group it went into is redrawn:
    a place inside it is that group's, whether only the old outline holds it or both do."""
    city = ward.city
    await ward.merge_other_group()
    east = gis_pb2.LocateUnitRequest(point=ward.point(250, -10))
    found = await ward.officer.LocateUnit(east)
    assert found.unit_id == city.group
    assert [(u.unit_id, u.name) for u in found.units][:1] == [(city.group, "Tổ dân phố 17")]
    assert [u.unit_id for u in found.units] == [city.group, city.ward]

    grown = polygon_feature(ward.box(-600, -400, 600, 400), "grown", unit_id=city.group)
    assert (await ward.import_features(gis_pb2.LAYER_BOUNDARY, [grown])).updated == 1
    found = await ward.officer.LocateUnit(east)
    assert [u.unit_id for u in found.units] == [city.group, city.ward]


async def test_the_nearest_hydrants_with_their_distances(ward: Ward) -> None:
    await draw(ward)
    answer = await ward.officer.NearestHydrants(
        gis_pb2.NearestHydrantsRequest(point=ward.point(-100, 0), limit=2)
    )
    # Distances along the WGS84 ellipsoid, to the centimetre.
    got = [(h.name, h.kind, round(h.distance_m, 2)) for h in answer.hydrants]
    assert got == [
        ("TCH-1", "hydrant", round(geodesic(ward, (-100, 0), (-100, 100)), 2)),
        ("", "well", round(geodesic(ward, (-100, 0), (-100, 399)), 2)),
    ]
    near = await ward.officer.NearestHydrants(
        gis_pb2.NearestHydrantsRequest(point=ward.point(-100, 0), max_distance_m=150)
    )
    assert [h.name for h in near.hydrants] == ["TCH-1"]
    everything = await ward.officer.NearestHydrants(
        gis_pb2.NearestHydrantsRequest(point=ward.point(-100, 0), limit=5)
    )
    expected = geodesic(ward, (-100, 0), (300, 100))
    assert everything.hydrants[2].distance_m == pytest.approx(expected, abs=0.01)
    assert expected == pytest.approx(math.hypot(400, 100), rel=0.01)
    assert near.hydrants[0].location.latitude == ward.point(-100, 100).latitude


async def test_household_points_are_for_officials_only(ward: Ward) -> None:
    for caller in (
        ward.caller(Role.RESIDENT, ward.city.group, "hh-1"),
        ward.caller(Role.INTEGRATOR, ward.city.city),
    ):
        await refused(
            grpc.StatusCode.PERMISSION_DENIED,
            caller.ListFeatures(
                gis_pb2.ListFeaturesRequest(
                    unit_id=ward.city.ward, layers=[gis_pb2.LAYER_HOUSEHOLD]
                )
            ),
        )
        # Public layers they may see.
        seen = await ward.features(caller=caller, unit_id=ward.city.ward)
        assert {f["properties"]["layer"] for f in seen["features"]} == {"boundary"}


async def test_bad_queries_are_refused(ward: Ward) -> None:
    def box(**fields: float) -> gis_pb2.BoundingBox:
        west, south = ward.at(-100, -100)
        east, north = ward.at(100, 100)
        edges = {"west": west, "south": south, "east": east, "north": north}
        return gis_pb2.BoundingBox(**(edges | fields))

    west = box().west
    cases = [
        (gis_pb2.ListFeaturesRequest(), "bbox"),
        (gis_pb2.ListFeaturesRequest(bbox=box(), unit_id=ward.city.ward), "bbox"),
        (gis_pb2.ListFeaturesRequest(bbox=box(east=west - 0.01)), "bbox.east"),
        (gis_pb2.ListFeaturesRequest(bbox=box(north=91)), "bbox.north"),
        (gis_pb2.ListFeaturesRequest(bbox=box(), layers=[gis_pb2.Layer.ValueType(9)]), "layers[0]"),
        (
            gis_pb2.ListFeaturesRequest(bbox=box(), page=types_pb2.PageRequest(page_size=10_001)),
            "page.page_size",
        ),
    ]
    for request, field in cases:
        details = await refused(
            grpc.StatusCode.INVALID_ARGUMENT, ward.officer.ListFeatures(request)
        )
        assert details.startswith(field), details
    await refused(
        grpc.StatusCode.NOT_FOUND,
        ward.officer.ListFeatures(gis_pb2.ListFeaturesRequest(unit_id=ward.city.ward + ".x")),
    )
    for request_, field in (
        (gis_pb2.NearestHydrantsRequest(), "point"),
        (gis_pb2.NearestHydrantsRequest(point=ward.point(0, 0), limit=51), "limit"),
        (
            gis_pb2.NearestHydrantsRequest(point=ward.point(0, 0), max_distance_m=-1),
            "max_distance_m",
        ),
        (
            gis_pb2.NearestHydrantsRequest(point=types_pb2.GeoPoint(latitude=95, longitude=108)),
            "point.latitude",
        ),
    ):
        details = await refused(
            grpc.StatusCode.INVALID_ARGUMENT, ward.officer.NearestHydrants(request_)
        )
        assert details.startswith(field), details
    details = await refused(
        grpc.StatusCode.INVALID_ARGUMENT, ward.officer.LocateUnit(gis_pb2.LocateUnitRequest())
    )
    assert details.startswith("point")


async def test_hydrants_another_instance_writes_or_removes_are_found_by_this_one(
    ward: Ward,
) -> None:
    """NearestHydrants answers from memory; what another instance writes to the layer (here
    written to the collection the same way, next to this instance) reaches it too."""
    hydrant = point_feature(ward.at(-50, 90), "h-model", kind="hydrant", name="TCH-8")
    assert (await ward.import_features(gis_pb2.LAYER_HYDRANT, [hydrant])).created == 1
    features = ward.service.store.features
    model = await features.find_one({"layer": "hydrant", "properties.name": "TCH-8"})
    assert model is not None
    written = model | {
        "_id": model["_id"] + "-other",
        "geometry": {"type": "Point", "coordinates": ward.at(-50, 60)},
        "properties": model["properties"] | {"name": "TCH-9"},
    }

    async def nearest_names() -> list[str]:
        answer = await ward.officer.NearestHydrants(
            gis_pb2.NearestHydrantsRequest(point=ward.point(-50, 0), max_distance_m=100)
        )
        return [h.name for h in answer.hydrants]

    assert await nearest_names() == ["TCH-8"]
    assert ward.service.store.hydrants.following  # answered from memory, not by a $near find
    await features.insert_one(written)
    await eventually(
        lambda: _equals(nearest_names(), ["TCH-9", "TCH-8"]), what="the other's hydrant here"
    )
    await features.delete_one({"_id": written["_id"]})
    await eventually(lambda: _equals(nearest_names(), ["TCH-8"]), what="the hydrant gone here")


async def test_a_hydrant_import_is_found_at_once_by_the_instance_that_made_it(
    ward: Ward,
) -> None:
    hydrant = point_feature(ward.at(250, -60), "h-own", kind="hydrant", name="TCH-7")
    assert (await ward.import_features(gis_pb2.LAYER_HYDRANT, [hydrant])).created == 1
    answer = await ward.officer.NearestHydrants(
        gis_pb2.NearestHydrantsRequest(point=ward.point(250, 0), max_distance_m=100)
    )
    assert [h.name for h in answer.hydrants] == ["TCH-7"]


async def _equals(names: Awaitable[list[str]], expected: list[str]) -> bool:
    return await names == expected


async def test_nearest_hydrants_from_mongodb_are_ranked_by_the_geodesic_as_from_memory(
    ward: Ward, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the in-memory layer is not following MongoDB's (at start, or reloading after its
    change stream broke) $near answers, on a sphere that puts a point 100 m north of here
    100.6 m away: only the geodesic decides what is within reach, and in which order."""
    geod = Geod(ellps="WGS84")
    lon, lat = ward.at(-300, 0)
    north = [round(v, 7) for v in geod.fwd(lon, lat, 0, 100.0)[:2]]
    east = [round(v, 7) for v in geod.fwd(lon, lat, 90, 100.4)[:2]]
    hydrants = [point_feature(north, "north", name="N"), point_feature(east, "east", name="E")]
    assert (await ward.import_features(gis_pb2.LAYER_HYDRANT, hydrants)).created == 2

    async def nearest(limit: int) -> list[tuple[str, float]]:
        answer = await ward.officer.NearestHydrants(
            gis_pb2.NearestHydrantsRequest(
                point=ward.point(-300, 0), limit=limit, max_distance_m=100.5
            )
        )
        return [(h.name, round(h.distance_m, 1)) for h in answer.hydrants]

    from_memory = [await nearest(2), await nearest(1)]
    assert from_memory == [[("N", 100.0), ("E", 100.4)], [("N", 100.0)]]
    monkeypatch.setattr(ward.service.store.hydrants, "following", False)
    assert [await nearest(2), await nearest(1)] == from_memory


async def test_a_hydrant_is_found_while_a_large_import_is_checked(
    ward: Ward, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking every feature of an import (of up to 64 MiB) is seconds of CPU work: done on
    the event loop, a fire crew's NearestHydrants would wait for all of it. Only the order of
    what happens is compared, never how long it took."""
    hydrant = point_feature(ward.at(-200, 0), "h", kind="hydrant", name="TCH-1")
    assert (await ward.import_features(gis_pb2.LAYER_HYDRANT, [hydrant])).created == 1
    happened: list[str] = []
    checks = gis_api.GisServicer._accepted
    loop = asyncio.get_running_loop()
    began = asyncio.Event()

    def watched(servicer: gis_api.GisServicer, *args: Any) -> Any:
        happened.append("checks began")
        loop.call_soon_threadsafe(began.set)  # from whichever thread checks
        try:
            return checks(servicer, *args)
        finally:
            happened.append("checks ended")

    monkeypatch.setattr(gis_api.GisServicer, "_accepted", watched)
    # 6,000 houses of 8 m x 8 m, 12 m apart, within the ward.
    houses = [
        polygon_feature(ward.box(x, y, x + 8, y + 8), f"b{x}-{y}", storeys=2)
        for x in range(-590, 580, 12)
        for y in range(-390, 390, 12)
    ][:6000]
    importing = asyncio.create_task(ward.import_features(gis_pb2.LAYER_BUILDING, houses))
    await asyncio.wait_for(began.wait(), 60)
    answer = await ward.officer.NearestHydrants(
        gis_pb2.NearestHydrantsRequest(point=ward.point(-200, 10), limit=1)
    )
    happened.append("hydrant found")
    done = await importing
    assert happened == ["checks began", "hydrant found", "checks ended"]
    assert [h.name for h in answer.hydrants] == ["TCH-1"]
    assert (done.created, list(done.rejected)) == (len(houses), [])

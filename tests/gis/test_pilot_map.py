"""The pilot's generated map: what the generator lays out (houses where the households are,
one network of ways reaching them, water points beside the ways), and what `make run`'s load
puts on the GIS service's map through its import API — loaded twice, the same map."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import pytest
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2
from civic.registry.v1 import registry_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from shapely.geometry import LineString, Point, Polygon

from infra.local import free_port
from services.common.auth import Role
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.demo import PILOT
from services.demo_map import RURAL, URBAN, UnitMap, pilot_homes, pilot_maps, street_entry
from services.gis.geometry import LocalFrame, Position, distance_m
from services.gis.main import GisService
from services.gis.routing import network
from services.platform import create_pilot_units, demo_admin, load_map_demo
from services.registry.main import RegistryService
from tests.conftest import Clock, token
from tests.gis.conftest import GisCaller
from tests.registry_fixtures import next_to_registry

MAPS = list(pilot_maps())
HOMES = pilot_homes()
LISTED = [
    gis_pb2.LAYER_BOUNDARY,
    gis_pb2.LAYER_BUILDING,
    gis_pb2.LAYER_ALLEY,
    gis_pb2.LAYER_HYDRANT,
]


def local(unit: UnitMap) -> LocalFrame:
    lat, lon = unit.group.centre
    return LocalFrame(lon, lat)


def shaped(unit: UnitMap, feature: dict[str, Any]) -> Any:
    """The feature's geometry in metres from the unit's centre."""
    frame = local(unit)
    geometry = feature["geometry"]
    if geometry["type"] == "Point":
        return Point(frame.metres(tuple(geometry["coordinates"])))
    if geometry["type"] == "LineString":
        return LineString([frame.metres(tuple(p)) for p in geometry["coordinates"]])
    return Polygon([frame.metres(tuple(p)) for p in geometry["coordinates"][0]])


@pytest.mark.parametrize("unit", MAPS, ids=[m.group.unit_id for m in MAPS])
def test_each_household_has_a_house_of_its_size_at_its_door(unit: UnitMap) -> None:
    homes = {home.ref: home for home in HOMES[unit.group.unit_id]}
    assert sorted(b["id"] for b in unit.buildings) == sorted(homes)
    frame = local(unit)
    houses = {b["id"]: shaped(unit, b) for b in unit.buildings}
    for building in unit.buildings:
        home = homes[building["id"]]
        properties = building["properties"]
        assert (properties["storeys"], properties["floor_area_m2"]) == (
            home.storeys,
            home.floor_area_m2,
        )
        house = houses[building["id"]]
        # The floor area is the footprint on every storey (corners rounded to a centimetre).
        assert house.area * home.storeys == pytest.approx(home.floor_area_m2, rel=0.01)
        assert house.distance(Point(frame.metres((home.longitude, home.latitude)))) < 25
    # Houses stand apart from each other and off the ways (each way's width).
    ways = [shaped(unit, a).buffer(a["properties"]["width_m"] / 2) for a in unit.alleys]
    placed = list(houses.values())
    for number, house in enumerate(placed):
        assert not any(house.intersects(way) for way in ways)
        assert not any(house.intersection(other).area > 0.01 for other in placed[number + 1 :])


@pytest.mark.parametrize("unit", MAPS, ids=[m.group.unit_id for m in MAPS])
def test_the_ways_are_one_network_that_reaches_every_household(unit: UnitMap) -> None:
    layout = URBAN if unit.group.urban else RURAL
    # The GIS joins lines where they share a vertex: the ways must be one network that way,
    # for a fire engine (3.5 m) as well as on foot.
    on_foot, truck = network(unit.alleys, 0), network(unit.alleys, 3.5)
    assert nx.is_connected(on_foot) and nx.is_connected(truck)
    assert truck.number_of_edges() < on_foot.number_of_edges()  # some lanes are too narrow
    frame = local(unit)
    lines = [shaped(unit, a) for a in unit.alleys]
    for home in HOMES[unit.group.unit_id]:
        door = Point(frame.metres((home.longitude, home.latitude)))
        assert min(line.distance(door) for line in lines) <= layout.alley_spacing_m / 2 + 5
    # Water points stand beside a way, within its setback, where no house covers them.
    houses = [shaped(unit, b) for b in unit.buildings]
    for hydrant in unit.hydrants:
        point = shaped(unit, hydrant)
        assert any(
            line.distance(point) <= a["properties"]["width_m"] / 2 + layout.setback_m
            for line, a in zip(lines, unit.alleys, strict=True)
        )
        assert not any(house.covers(point) for house in houses)
    kinds = Counter(h["properties"]["kind"] for h in unit.hydrants)
    assert kinds["hydrant"] > 0 and (kinds["well"] > 0) == (not unit.group.urban)


# ---- loaded through the GIS service --------------------------------------------------------------


@dataclass(frozen=True)
class Pilot:
    settings: Settings
    gis: str  # where the GIS service listens
    first_load: str  # what the map load said


@pytest.fixture(scope="module")
async def pilot(
    settings: Settings, session_clock: Clock, span_processor: SimpleSpanProcessor
) -> AsyncIterator[Pilot]:
    """A registry and a GIS service of their own (the pilot's units and places must not meet
    other tests' maps), with the pilot's units created and their map loaded as `make run` does
    (the households are left out: the map's layers do not depend on them)."""
    own = settings.model_copy(
        update={"database_prefix": settings.database_prefix + "map", "grpc_port": free_port()}
    )
    registry = RegistryService(own, clock=session_clock, span_processor=span_processor)
    await registry.start()
    gis = GisService(next_to_registry(own, registry), clock=session_clock)
    await gis.start()
    try:
        loaded = own.model_copy(update={"registry_target": f"127.0.0.1:{registry.port}"})
        async with civic_channel(loaded.registry(), demo_admin(loaded)) as channel:
            await create_pilot_units(registry_pb2_grpc.RegistryServiceStub(channel))
        target = f"127.0.0.1:{gis.port}"
        yield Pilot(loaded, target, await load_map_demo(loaded, target))
    finally:
        await gis.stop()
        await registry.stop()


def officer(target: str, unit_id: str) -> GisCaller:
    return GisCaller(target, token(Role.WARD_OFFICER, unit_id.rsplit(".", 1)[0]), "fire safety")


async def the_map(target: str) -> dict[str, list[dict[str, Any]]]:
    """Every pilot unit's boundary, buildings, alleys and hydrants, as the GIS lists them."""
    found = {}
    for group in PILOT:
        gis = officer(target, group.unit_id)  # held: a dropped caller closes its channel
        listed = await gis.ListFeatures(
            gis_pb2.ListFeaturesRequest(
                layers=LISTED,
                unit_id=group.unit_id,
                page=types_pb2.PageRequest(page_size=10_000),
            )
        )
        assert not listed.next_page_token
        found[group.unit_id] = json.loads(listed.geojson)["features"]
    return found


async def test_the_load_maps_every_pilot_unit_and_a_second_load_changes_nothing(
    pilot: Pilot,
) -> None:
    features = sum(len(fs) for unit in MAPS for _, fs in unit.layers())
    assert f"{features} features created, 0 changed, 0 already there" in pilot.first_load
    first = await the_map(pilot.gis)
    for unit in MAPS:
        listed = first[unit.group.unit_id]
        layers = Counter(f["properties"]["layer"] for f in listed)
        assert layers == {
            "boundary": 1,
            "building": len(unit.buildings),
            "alley": len(unit.alleys),
            "hydrant": len(unit.hydrants),
        }
        assert all(f["properties"]["unit_id"] == unit.group.unit_id for f in listed)
        # Each house as the registry has its household: storeys, floor area, footprint.
        houses = sorted(
            (f["properties"]["storeys"], f["properties"]["floor_area_m2"])
            for f in listed
            if f["properties"]["layer"] == "building"
        )
        homes = HOMES[unit.group.unit_id]
        assert houses == sorted((h.storeys, h.floor_area_m2) for h in homes)

    again = await load_map_demo(pilot.settings, pilot.gis)
    assert f"0 features created, 0 changed, {features} already there" in again
    assert await the_map(pilot.gis) == first


def nearest_generated(unit: UnitMap, at: Position) -> tuple[float, str]:
    return min(
        (distance_m(at, tuple(h["geometry"]["coordinates"])), h["properties"]["name"])
        for h in unit.hydrants
    )


@pytest.mark.parametrize("unit", MAPS, ids=[m.group.unit_id for m in MAPS])
async def test_nearest_water_and_a_fire_route_inside_a_pilot_unit(
    pilot: Pilot, unit: UnitMap
) -> None:
    gis = officer(pilot.gis, unit.group.unit_id)
    frame = local(unit)
    homes = HOMES[unit.group.unit_id]

    # The water point nearest to each of a few households is the one generated nearest to it.
    for home in homes[:5]:
        found = await gis.NearestHydrants(
            gis_pb2.NearestHydrantsRequest(point=point(home.longitude, home.latitude))
        )
        metres, name = nearest_generated(unit, (home.longitude, home.latitude))
        assert (found.hydrants[0].name, found.hydrants[0].distance_m) == (
            name,
            pytest.approx(metres, abs=0.05),
        )
        assert metres < 250

    # A fire engine from the west end of the middle street to the household farthest from it.
    entry = street_entry(unit.group)
    door = max(
        ((home.longitude, home.latitude) for home in homes), key=lambda at: distance_m(entry, at)
    )
    route = await gis.PlanFireRoute(
        gis_pb2.PlanFireRouteRequest(entry=point(*entry), destination=point(*door), min_width_m=3.5)
    )
    line = json.loads(route.geojson)["features"][0]["geometry"]["coordinates"]
    assert line[0] == pytest.approx(list(entry), abs=1e-7)
    assert line[-1] == pytest.approx(list(door), abs=1e-7)
    assert distance_m(entry, door) <= route.length_m < 2 * distance_m(entry, door)
    # Between leaving the street and walking to the door, it keeps to ways 3.5 m wide or more.
    wide = [shaped(unit, a) for a in unit.alleys if a["properties"]["width_m"] >= 3.5]
    for spot in line[1:-1]:
        assert min(way.distance(Point(frame.metres(tuple(spot)))) for way in wide) < 0.05
    names = {h["properties"]["name"] for h in unit.hydrants}
    assert route.hydrants and {h.hydrant.name for h in route.hydrants} <= names


def point(longitude: float, latitude: float) -> types_pb2.GeoPoint:
    return types_pb2.GeoPoint(latitude=latitude, longitude=longitude)

"""Generated map layers for the four pilot units (no real survey): each unit's boundary, a
building for every pilot household, the streets and alleys that reach them, and hydrants or
wells along them, laid out around the unit's centre.

The layout is a street through the middle and one along each side (in town, streets of the
group's ward), joined by alleys (kiệt) running north-south every few dozen metres, a town alley
named after the house number where it leaves the middle street: the ways the households'
addresses name (services/demo.py). Every alley meets the streets at a vertex both share, since
that is where the GIS joins lines into a network. A household's building stands on its point
where that is free, else at the nearest spot where it overlaps no way and no house.

Deterministic, like the households: the same seed gives the same features with the same ids, so
importing them again changes nothing.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from civic.gis.v1 import gis_pb2

from services.demo import (
    PILOT,
    PILOT_DAY,
    REACH_M,
    TOWN_ALLEY_SPACING_M,
    PilotGroup,
    alley_count,
    alley_x,
    kiet_name,
    pilot_rows,
)
from services.gis.geometry import DIGITS, LocalFrame

Feature = dict[str, Any]
# West, south, east, north in metres east and north of the unit's centre.
Rect = tuple[float, float, float, float]

BOUNDARY_MARGIN_M = 25.0


@dataclass(frozen=True)
class Layout:
    """How a kind of place is built: town blocks of tube houses, or a village."""

    alley_spacing_m: float
    street_width_m: float
    alley_widths_m: tuple[float, ...]
    # Free space between a way's edge and the buildings along it.
    setback_m: float
    # Tube houses have narrow fronts and go deep; village houses are squarer.
    depth_per_front: float
    hydrant_every_m: float
    # Every n-th lane has a well half-way along; 0: none.
    well_every: int
    # Town alleys are named after the house number where they leave the middle street (kiệt);
    # village lanes are counted.
    kiet: bool


URBAN = Layout(
    alley_spacing_m=TOWN_ALLEY_SPACING_M,
    street_width_m=7.5,
    alley_widths_m=(2.0, 2.5, 2.5, 3.0, 3.5, 3.5, 4.0, 5.0),
    setback_m=0.5,
    depth_per_front=3.0,
    hydrant_every_m=100.0,
    well_every=0,
    kiet=True,
)
RURAL = Layout(
    alley_spacing_m=70.0,
    street_width_m=5.5,
    alley_widths_m=(2.5, 3.0, 3.5, 3.5, 4.0, 4.5),
    setback_m=2.0,
    depth_per_front=1.3,
    hydrant_every_m=240.0,
    well_every=2,
    kiet=False,
)


@dataclass(frozen=True)
class Way:
    """A street or alley in metres from the unit's centre."""

    fid: str
    points: list[tuple[float, float]]
    name: str
    width_m: float

    @property
    def is_street(self) -> bool:
        return self.fid.startswith("street-")


@dataclass(frozen=True)
class Home:
    """What the map needs of a pilot household: where it is and how it is housed."""

    ref: str
    address: str
    longitude: float
    latitude: float
    storeys: int
    floor_area_m2: float


@dataclass
class UnitMap:
    group: PilotGroup
    boundary: list[Feature] = field(default_factory=list)
    buildings: list[Feature] = field(default_factory=list)
    alleys: list[Feature] = field(default_factory=list)
    hydrants: list[Feature] = field(default_factory=list)

    def layers(self) -> list[tuple[gis_pb2.Layer.ValueType, list[Feature]]]:
        """In import order: the boundary first, since the others are checked against it."""
        return [
            (gis_pb2.LAYER_BOUNDARY, self.boundary),
            (gis_pb2.LAYER_BUILDING, self.buildings),
            (gis_pb2.LAYER_ALLEY, self.alleys),
            (gis_pb2.LAYER_HYDRANT, self.hydrants),
        ]


def geojson(features: list[Feature]) -> bytes:
    return json.dumps(
        {"type": "FeatureCollection", "features": features},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def pilot_homes() -> dict[str, list[Home]]:
    """Each pilot unit's households, as the registry's demo data has them."""
    homes: dict[str, dict[str, Home]] = {group.unit_id: {} for group in PILOT}
    for row in pilot_rows(PILOT_DAY):
        if row.household_ref not in homes[row.unit_id]:
            homes[row.unit_id][row.household_ref] = Home(
                row.household_ref,
                row.address,
                row.location.longitude,
                row.location.latitude,
                row.housing.storeys,
                row.housing.floor_area_m2,
            )
    return {unit: list(found.values()) for unit, found in homes.items()}


def street_entry(group: PilotGroup) -> tuple[float, float]:
    """Where a fire engine leaves the main road for the unit: the west end of its middle
    street, as (longitude, latitude)."""
    lat, lon = group.centre
    return LocalFrame(lon, lat).degrees((-REACH_M, 0.0))


def pilot_maps(seed: int = 2025) -> Iterator[UnitMap]:
    homes = pilot_homes()
    for group in PILOT:
        yield unit_map(group, homes[group.unit_id], random.Random(f"{seed}:{group.unit_id}"))


def unit_map(group: PilotGroup, homes: list[Home], rng: random.Random) -> UnitMap:
    """The unit's layers in WGS84, laid out in metres around its centre."""
    layout = URBAN if group.urban else RURAL
    lat, lon = group.centre
    frame = LocalFrame(lon, lat)

    def at(point: tuple[float, float]) -> list[float]:
        # Rounded as the GIS stores positions, so that shared vertices stay exactly equal.
        longitude, latitude = frame.degrees(point)
        return [round(longitude, DIGITS), round(latitude, DIGITS)]

    ways = _ways(layout, group.streets, rng)
    taken = [_corridor(layout, way) for way in ways]
    unit = UnitMap(group)
    unit.boundary = [
        _feature(
            "boundary",
            "Polygon",
            [[at(p) for p in _boundary_ring(rng)]],
            unit_id=group.unit_id,
            name=group.group[1],
        )
    ]
    unit.alleys = [
        _feature(
            way.fid, "LineString", [at(p) for p in way.points], name=way.name, width_m=way.width_m
        )
        for way in ways
    ]
    unit.hydrants = [
        _feature(fid, "Point", at(point), kind=kind, name=name)
        for fid, point, kind, name in _water_points(layout, ways)
    ]
    for home in homes:
        west, south, east, north = house = _house(
            layout, frame.metres((home.longitude, home.latitude)), home, taken
        )
        taken.append(house)
        ring = [at((west, south)), at((east, south)), at((east, north)), at((west, north))]
        unit.buildings.append(
            _feature(
                home.ref,
                "Polygon",
                [[*ring, ring[0]]],
                name=home.address,
                storeys=home.storeys,
                floor_area_m2=home.floor_area_m2,
                use="residential",
            )
        )
    return unit


def _feature(fid: str, shape: str, coordinates: Any, **properties: Any) -> Feature:
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": shape, "coordinates": coordinates},
        "properties": properties,
    }


def _boundary_ring(rng: random.Random) -> list[tuple[float, float]]:
    """A square just outside the side streets, the middle of each edge pushed out a little,
    counterclockwise and closed."""
    edge = REACH_M + BOUNDARY_MARGIN_M
    corners = [(-edge, -edge), (edge, -edge), (edge, edge), (-edge, edge)]
    ring = []
    for (x0, y0), (x1, y1) in itertools.pairwise([*corners, corners[0]]):
        bulge = rng.uniform(0, 20) / (2 * edge)  # along the outward normal (dy, -dx)
        ring += [(x0, y0), ((x0 + x1) / 2 + (y1 - y0) * bulge, (y0 + y1) / 2 - (x1 - x0) * bulge)]
    return [*ring, ring[0]]


def _ways(layout: Layout, streets: tuple[str, str, str], rng: random.Random) -> list[Way]:
    """Alleys from the middle street to each side street, then the three streets, each with a
    vertex wherever an alley meets it."""
    count = alley_count(layout.alley_spacing_m)
    ways: list[Way] = []
    meets: dict[float, set[float]] = {-REACH_M: set(), 0.0: set(), REACH_M: set()}
    for half, side in (("s", -REACH_M), ("n", REACH_M)):
        for index in range(count):
            # Jitter of a tenth of the spacing leaves room for the deepest house between two.
            jitter = layout.alley_spacing_m * rng.uniform(-0.1, 0.1)
            x = round(alley_x(index, layout.alley_spacing_m) + jitter, 1)
            meets[side].add(x)
            meets[0.0].add(x)
            name = (
                kiet_name(index, half == "n", streets[1])
                if layout.kiet
                else f"Đường xóm {len(ways) + 1}"
            )
            width = rng.choice(layout.alley_widths_m)
            ways.append(Way(f"alley-{half}-{index + 1:02d}", [(x, 0.0), (x, side)], name, width))
    for (key, y), name in zip(
        (("s", -REACH_M), ("mid", 0.0), ("n", REACH_M)), streets, strict=True
    ):
        xs = sorted({-REACH_M, REACH_M, *meets[y]})
        width = layout.street_width_m + (1.5 if key == "mid" else 0.0)
        ways.append(Way(f"street-{key}", [(x, y) for x in xs], name, width))
    return ways


def _corridor(layout: Layout, way: Way) -> Rect:
    """The space a way takes up with its setbacks, where no house may stand."""
    clear = way.width_m / 2 + layout.setback_m
    xs = [x for x, _ in way.points]
    ys = [y for _, y in way.points]
    return (min(xs) - clear, min(ys) - clear, max(xs) + clear, max(ys) + clear)


def _water_points(
    layout: Layout, ways: list[Way]
) -> Iterator[tuple[str, tuple[float, float], str, str]]:
    """(id, position, kind, name): hydrants at even steps along each street, on its inner side;
    in villages a well half-way along some lanes. Each stands in its way's setback, where no
    house covers it."""
    number = 0
    lanes = 0
    for way in ways:
        inset = way.width_m / 2 + layout.setback_m / 2
        if way.is_street:
            y = way.points[0][1]
            x = -REACH_M + layout.hydrant_every_m / 2
            while x < REACH_M:
                number += 1
                name = f"Trụ cứu hỏa {number:02d} {way.name}"
                yield f"water-{number:02d}", (x, y - inset if y > 0 else y + inset), "hydrant", name
                x += layout.hydrant_every_m
            continue
        lanes += 1
        if layout.well_every and lanes % layout.well_every == 0:
            number += 1
            (x, y0), (_, y1) = way.points
            yield f"water-{number:02d}", (x + inset, (y0 + y1) / 2), "well", f"Giếng {way.name}"


# Where a house may stand instead of right on its household's point, nearest first: along its
# alley (north-south) and away from it (east-west).
SHIFTS_M = sorted(
    ((1.5 * east, 1.5 * north) for east in range(-10, 11) for north in range(-12, 13)),
    key=lambda shift: (shift[0] ** 2 + shift[1] ** 2, shift),
)


def _house(layout: Layout, spot: tuple[float, float], home: Home, taken: list[Rect]) -> Rect:
    """The household's house: its floor area over its storeys, on its point or as near to it
    as it stands clear of the ways and of the houses already placed."""
    footprint = home.floor_area_m2 / home.storeys
    front = max(3.5, min(12.0, (footprint / layout.depth_per_front) ** 0.5))
    depth = footprint / front
    x, y = spot
    for east, north in SHIFTS_M:
        house = (
            x + east - depth / 2,
            y + north - front / 2,
            x + east + depth / 2,
            y + north + front / 2,
        )
        if not any(_overlap(house, other) for other in taken):
            return house
    raise ValueError(f"no room for the house of {home.ref} near its point")


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

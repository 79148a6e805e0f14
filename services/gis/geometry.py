"""Pure geometry: coordinate systems, validity, distances in metres. No I/O.

Stored geometry is GeoJSON in WGS84 (longitude, latitude), as MongoDB's 2dsphere indexes and
RFC 7946 want it. Distances on a group's or ward's scale (a few kilometres) are computed in a
local equirectangular frame around the place, scaled by the WGS84 ellipsoid's metres per degree at
its latitude, which is accurate to well under a metre there. MongoDB's index sees the same
positions on a sphere, with every edge a great circle: a polygon is checked there too.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from pyproj import CRS, Geod, Transformer
from pyproj.exceptions import CRSError
from shapely.geometry import LineString, Point, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import explain_validity

# Stored coordinates are rounded to 1e-7 degrees: about a centimetre.
DIGITS = 7
WGS84 = "EPSG:4326"
# Where Vietnam lies (with its islands), for imports into a unit whose boundary is not known yet.
VIETNAM = (102.0, 8.0, 118.0, 24.0)
# The most positions one feature may have: a surveyed ward boundary has thousands.
MAX_POSITIONS = 50_000
# A box's south and north edges get a position this often (degrees of longitude).
BOX_EDGE_STEP = 0.01
# A box is queried in strips at most this wide, each far smaller than a hemisphere.
BOX_STRIP_DEGREES = 90.0

Position = tuple[float, float]
_GEOD = Geod(ellps="WGS84")
Transform = Callable[[float, float], Position]


class GeometryError(ValueError):
    """What is wrong with one feature's geometry, in words for the person who drew it."""


@lru_cache(maxsize=64)
def to_wgs84(source_crs: str) -> Transform:
    """A function taking (x, y) in the source CRS to (longitude, latitude); raises ValueError
    for an unknown CRS or one that is neither geographic nor projected."""
    if not source_crs.strip():
        return lambda x, y: (x, y)
    try:
        crs = CRS.from_user_input(source_crs.strip())
    except CRSError as error:
        raise ValueError(f"is not a coordinate reference system PROJ knows ({error})") from None
    if not (crs.is_projected or crs.is_geographic):
        raise ValueError("must be a projected or geographic CRS (e.g. VN-2000 / UTM zone 48N)")
    transformer = Transformer.from_crs(crs, WGS84, always_xy=True)

    def transform(x: float, y: float) -> Position:
        lon, lat = transformer.transform(x, y, errcheck=True)
        return float(lon), float(lat)

    return transform


def same_crs(first: str, second: str) -> bool:
    """Whether the two name one CRS ("" is WGS84), whichever order they give the axes in;
    ValueError for one PROJ does not know."""
    try:
        a, b = (CRS.from_user_input(name.strip() or WGS84) for name in (first, second))
    except CRSError as error:
        raise ValueError(f"is not a coordinate reference system PROJ knows ({error})") from None
    return bool(a.equals(b, ignore_axis_order=True))


# Multi-part types, and the single part each holds.
PARTS = {"MultiPoint": "Point", "MultiLineString": "LineString", "MultiPolygon": "Polygon"}


def one_part(geometry: dict[str, Any], allowed: Sequence[str]) -> dict[str, Any]:
    """A multi-part geometry of one part as that part, where only single parts are allowed:
    GIS programs type every feature of a layer multi-part (QGIS's new layers, GDAL from a
    GeoPackage), though each is one building, hydrant or alley."""
    part = PARTS.get(geometry["type"])
    coordinates = geometry["coordinates"]
    one = isinstance(coordinates, list) and len(coordinates) == 1
    if one and part in allowed and geometry["type"] not in allowed:
        return {"type": part, "coordinates": coordinates[0]}
    return geometry


def convert(geometry: dict[str, Any], transform: Transform) -> dict[str, Any]:
    """The GeoJSON geometry with every position transformed and rounded."""

    def position(p: Sequence[float]) -> list[float]:
        if len(p) < 2 or not all(isinstance(v, int | float) for v in p[:2]):
            raise GeometryError("coordinates must be pairs of numbers")
        try:
            x, y = float(p[0]), float(p[1])
        except OverflowError:  # an integer too long for any float (JSON allows one)
            raise GeometryError("coordinates must be finite numbers") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise GeometryError("coordinates must be finite numbers")
        try:
            lon, lat = transform(x, y)
        except Exception:
            raise GeometryError(f"position {list(p[:2])} cannot be converted to WGS84") from None
        if not (math.isfinite(lon) and math.isfinite(lat)) or abs(lat) > 90 or abs(lon) > 180:
            raise GeometryError(f"position {list(p[:2])} does not convert to a place on Earth")
        return [round(lon, DIGITS), round(lat, DIGITS)]

    def walk(coordinates: Any, depth: int) -> Any:
        if not isinstance(coordinates, list | tuple):
            raise GeometryError("coordinates must be nested arrays")
        if depth == 0:
            return position(coordinates)
        return [walk(c, depth - 1) for c in coordinates]

    depth = {"Point": 0, "LineString": 1, "Polygon": 2, "MultiPolygon": 3}.get(geometry["type"])
    if depth is None:
        raise GeometryError(f"geometry type {geometry['type']} is not supported here")
    return {"type": geometry["type"], "coordinates": walk(geometry["coordinates"], depth)}


def oriented(geometry: dict[str, Any]) -> dict[str, Any]:
    """Polygons by the right-hand rule of RFC 7946: outer rings counterclockwise, holes
    clockwise (drawings come either way)."""

    def ring(points: list[list[float]], outer: bool) -> list[list[float]]:
        twice_area = sum(a[0] * b[1] - b[0] * a[1] for a, b in itertools.pairwise(points))
        return points if (twice_area > 0) == outer else points[::-1]

    def polygon(rings: list[list[list[float]]]) -> list[list[list[float]]]:
        return [ring(r, number == 0) for number, r in enumerate(rings)]

    if geometry["type"] == "Polygon":
        return {"type": "Polygon", "coordinates": polygon(geometry["coordinates"])}
    if geometry["type"] == "MultiPolygon":
        return {
            "type": "MultiPolygon",
            "coordinates": [polygon(p) for p in geometry["coordinates"]],
        }
    return geometry


def check(geometry: dict[str, Any]) -> BaseGeometry:
    """The geometry as shapely's, if it is valid; otherwise GeometryError saying why."""
    kind = geometry["type"]
    coordinates = geometry["coordinates"]
    if kind == "LineString" and len(coordinates) < 2:
        raise GeometryError("a line needs at least two positions")
    polygons = [coordinates] if kind == "Polygon" else coordinates if kind == "MultiPolygon" else []
    for polygon in polygons:
        if not polygon:
            raise GeometryError("a polygon needs an outer ring")
        for number, ring in enumerate(polygon):
            which = "outer ring" if number == 0 else f"hole {number}"
            if len(ring) < 4:
                raise GeometryError(f"the {which} needs at least four positions (closed)")
            if ring[0] != ring[-1]:
                raise GeometryError(
                    f"the {which} is not closed: its last position is not its first"
                )
    shaped = shape(geometry)
    if shaped.is_empty:
        raise GeometryError("the geometry is empty")
    positions = shapely.get_num_coordinates(shaped)
    if positions > MAX_POSITIONS:  # a feature is one document, and a page holds many
        raise GeometryError(f"has {positions:,} positions, at most {MAX_POSITIONS:,}")
    if not shaped.is_valid:
        reason = explain_validity(shaped)
        if "Self-intersection" in reason or "Ring Self-intersection" in reason:
            raise GeometryError(f"the polygon intersects itself ({reason})")
        raise GeometryError(f"invalid geometry ({reason})")
    if kind == "LineString" and shapely.length(shaped) == 0:
        raise GeometryError("the line has no length")
    if kind in ("Polygon", "MultiPolygon"):
        for polygon in getattr(shaped, "geoms", [shaped]):
            check_on_sphere(polygon)
    return shaped


def check_on_sphere(polygon: Polygon) -> None:
    """GeometryError unless the polygon is valid as MongoDB's 2dsphere index sees it: on a
    sphere, each edge the great circle between its ends. A long edge bows towards the pole
    (2.7 cm over 2 km at 16°N), so a vertex beside it on a flat map may lie across it there, and
    MongoDB refuses the polygon. Great circles are straight lines in a gnomonic projection:
    the polygon valid there is the polygon MongoDB takes."""
    centre = polygon.centroid
    projection = Gnomonic(centre.x, centre.y)
    seen = shapely.transform(polygon, projection.forward)
    if seen.is_valid:
        return
    spot = re.search(r"\[(\S+) (\S+)\]", explain_validity(seen))
    near = ""
    if spot:
        lon, lat = projection.inverse(float(spot[1]), float(spot[2]))
        near = f" near {lon:.7f} {lat:.7f}"
    raise GeometryError(
        f"the polygon intersects itself on the sphere, where MongoDB draws each edge as a great "
        f"circle{near}: a vertex lies too close to a long edge (give the edge a vertex there)"
    )


@dataclass(frozen=True)
class Gnomonic:
    """The gnomonic projection of a sphere (longitude and latitude taken as spherical, as MongoDB
    takes them) onto the plane touching it at (lon0, lat0), in radii: every great circle is a
    straight line there."""

    lon0: float
    lat0: float

    def forward(self, lonlat: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        sin0, cos0 = math.sin(math.radians(self.lat0)), math.cos(math.radians(self.lat0))
        lon, lat = np.radians(lonlat[:, 0] - self.lon0), np.radians(lonlat[:, 1])
        cos_lat, sin_lat, cos_lon = np.cos(lat), np.sin(lat), np.cos(lon)
        scale = 1 / (sin0 * sin_lat + cos0 * cos_lat * cos_lon)
        return np.column_stack(
            [scale * cos_lat * np.sin(lon), scale * (cos0 * sin_lat - sin0 * cos_lat * cos_lon)]
        )

    def inverse(self, x: float, y: float) -> Position:
        rho = math.hypot(x, y)
        if rho == 0:
            return self.lon0, self.lat0
        sin0, cos0 = math.sin(math.radians(self.lat0)), math.cos(math.radians(self.lat0))
        sin_c, cos_c = math.sin(math.atan(rho)), math.cos(math.atan(rho))
        lat = math.asin(cos_c * sin0 + y * sin_c * cos0 / rho)
        lon = math.atan2(x * sin_c, rho * cos0 * cos_c - y * sin0 * sin_c)
        return self.lon0 + math.degrees(lon), math.degrees(lat)


# ---- metres ----------------------------------------------------------------------------------


def distance_m(a: Position, b: Position) -> float:
    """Along the WGS84 ellipsoid (a geodesic), in metres."""
    _, _, metres = _GEOD.inv(a[0], a[1], b[0], b[1])
    return float(metres)


def metres_per_degree(lat: float) -> tuple[float, float]:
    """(east-west, north-south) metres per degree at this latitude, on the WGS84 ellipsoid."""
    phi = math.radians(lat)
    per_lon = 111_412.84 * math.cos(phi) - 93.5 * math.cos(3 * phi)
    per_lat = 111_132.954 - 559.822 * math.cos(2 * phi) + 1.175 * math.cos(4 * phi)
    return per_lon, per_lat


@dataclass(frozen=True)
class LocalFrame:
    """Metres east and north of an origin (equirectangular, with the ellipsoid's metres per
    degree at the origin's latitude: a sphere's would be 0.5% long north-south at 16°N)."""

    lon0: float
    lat0: float

    @cached_property
    def _scale(self) -> tuple[float, float]:
        return metres_per_degree(self.lat0)

    def metres(self, p: Position) -> Position:
        kx, ky = self._scale
        return ((p[0] - self.lon0) * kx, (p[1] - self.lat0) * ky)

    def degrees(self, p: Position) -> Position:
        kx, ky = self._scale
        return (self.lon0 + p[0] / kx, self.lat0 + p[1] / ky)

    def project(self, geometry: BaseGeometry) -> BaseGeometry:
        kx, ky = self._scale
        return shapely.transform(
            geometry,
            lambda xy: (xy - [self.lon0, self.lat0]) * [kx, ky],
        )


def frame_at(geometry: BaseGeometry) -> LocalFrame:
    centre = geometry.centroid
    return LocalFrame(centre.x, centre.y)


def distance_outside_m(geometry: BaseGeometry, area: BaseGeometry) -> float:
    """How far the geometry's farthest part lies outside the area, in metres (0 inside)."""
    frame = frame_at(area)
    local_area = frame.project(area)
    local = frame.project(geometry)
    if local_area.covers(local):
        return 0.0
    points = shapely.get_coordinates(local)
    return float(max(local_area.distance(Point(x, y)) for x, y in points))


def overlap_m2(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """How much two polygons overlap, and the smaller one's area, in square metres."""
    first, second = shape(a), shape(b)
    frame = frame_at(first)
    first, second = frame.project(first), frame.project(second)
    return first.intersection(second).area, min(first.area, second.area)


def outside_extent(geometry: BaseGeometry, extent: tuple[float, float, float, float]) -> bool:
    west, south, east, north = extent
    minx, miny, maxx, maxy = geometry.bounds
    return minx < west or maxx > east or miny < south or maxy > north


def line_length_m(positions: Sequence[Position]) -> float:
    return sum(distance_m(a, b) for a, b in itertools.pairwise(positions))


def along_and_offset_m(route: Sequence[Position], point: Position) -> tuple[float, float]:
    """(distance along the route to the point's nearest spot, distance from the route)."""
    frame = LocalFrame(*route[0])
    local = Point(frame.metres(point))
    if len(route) < 2:  # the entry is the destination: the route is a spot
        return 0.0, float(Point(frame.metres(route[0])).distance(local))
    line = LineString([frame.metres(p) for p in route])
    return float(line.project(local)), float(line.distance(local))


def bounds_of(geometries: Iterable[dict[str, Any]]) -> tuple[float, float, float, float] | None:
    coordinates = [c for g in geometries for c in shapely.get_coordinates(shape(g))]
    if not coordinates:
        return None
    xs = [c[0] for c in coordinates]
    ys = [c[1] for c in coordinates]
    return min(xs), min(ys), max(xs), max(ys)


def bbox_polygon(west: float, south: float, east: float, north: float) -> dict[str, Any]:
    """The box as a GeoJSON polygon whose south and north edges follow their parallels: MongoDB
    draws an edge as a great circle, which between distant corners bows towards the pole (65 m
    for a 1-degree box here), so those edges get a position every BOX_EDGE_STEP degrees.

    MongoDB takes a polygon to be the smaller of the two areas its ring bounds: a box 180
    degrees wide or more (a map zoomed out to the world) would be read as what lies outside it.
    A box wider than BOX_STRIP_DEGREES is therefore a MultiPolygon of strips no wider."""
    strips = max(1, math.ceil((east - west) / BOX_STRIP_DEGREES))
    edges = [west + (east - west) * i / strips for i in range(strips)] + [east]
    rings = [_box_ring(a, south, b, north) for a, b in itertools.pairwise(edges)]
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": rings}
    return {"type": "MultiPolygon", "coordinates": [[ring] for ring in rings]}


def _box_ring(west: float, south: float, east: float, north: float) -> list[list[float]]:
    steps = max(1, math.ceil((east - west) / BOX_EDGE_STEP))
    xs = [west + (east - west) * i / steps for i in range(steps + 1)]

    def edge(lat: float, xs: list[float]) -> list[list[float]]:
        # At a pole the parallel is one point: its corners only (thousands of copies of the pole
        # keep MongoDB busy for minutes).
        return [[x, lat] for x in (xs if abs(lat) < 90 else [xs[0], xs[-1]])]

    return [*edge(south, xs), *edge(north, xs[::-1]), [west, south]]

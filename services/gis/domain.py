"""The map's rules: layers, feature ids, what each layer's features carry, who sees and changes
what, and ages. Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import date
from enum import IntEnum
from typing import Any

from services.common.auth import Principal, Role
from services.common.errors import PermissionDenied


class Layer(IntEnum):
    """As civic.gis.v1.Layer."""

    BOUNDARY = 1
    BUILDING = 2
    HOUSEHOLD = 3
    HYDRANT = 4
    ALLEY = 5

    @property
    def key(self) -> str:
        return self.name.lower()


IMPORTABLE = (Layer.BOUNDARY, Layer.BUILDING, Layer.HYDRANT, Layer.ALLEY)
# Layers anyone signed in may see: the city's infrastructure, no personal data.
PUBLIC_LAYERS = (Layer.BOUNDARY, Layer.BUILDING, Layer.HYDRANT, Layer.ALLEY)
GEOMETRY_TYPES: dict[Layer, tuple[str, ...]] = {
    Layer.BOUNDARY: ("Polygon", "MultiPolygon"),
    Layer.BUILDING: ("Polygon",),
    Layer.HOUSEHOLD: ("Point",),
    Layer.HYDRANT: ("Point",),
    Layer.ALLEY: ("LineString",),
}
# A feature farther than this outside its unit's boundary is refused as misplaced: a street or
# alley runs on past the unit (the fire route needs the way in). A building, hydrant or a
# unit's own outline lies in its unit, give or take where two surveys of the shared edge
# disagree or a hydrant stands across the street the edge follows: one farther out lies in
# the neighbouring unit, whose leader could not remove it (nor draw their own outline over it).
FAR_OUTSIDE_M = 500.0
STANDING_OUTSIDE_M = 50.0
ELDERLY_AGE = 60
MAX_STOREYS = 100
MAX_WIDTH_M = 100.0
HYDRANT_KINDS = ("hydrant", "well", "pond", "tank", "river")
RENTER_KINDS = (2, 3)  # ResidenceKind TEMPORARY, RENTER


def outside_allowed_m(layer: Layer) -> float:
    """How far outside its unit's boundary a feature of the layer may lie."""
    return FAR_OUTSIDE_M if layer is Layer.ALLEY else STANDING_OUTSIDE_M


def kind_of(layer: Layer) -> str:
    return {"Polygon": "polygon", "Point": "point", "LineString": "line"}[GEOMETRY_TYPES[layer][0]]


def feature_id(layer: Layer, unit_id: str, source_id: str, drawing: str = "") -> str:
    """The same feature of the same unit's drawing gets the same id on every import; two
    drawings' entities with one handle get two ids."""
    source = f"{drawing}/{source_id}" if drawing else source_id
    digest = hashlib.sha256(f"{unit_id}\n{layer.key}\n{source}".encode()).hexdigest()[:24]
    return f"{layer.key}-{digest}"


def boundary_feature_id(bounded_unit: str) -> str:
    """A unit has one boundary, whoever draws it (its ward, or its own leader): the id comes
    from the unit it bounds, so drawing it again replaces it."""
    digest = hashlib.sha256(f"{bounded_unit}\n{Layer.BOUNDARY.key}".encode()).hexdigest()[:24]
    return f"{Layer.BOUNDARY.key}-{digest}"


def household_feature_id(household_id: str) -> str:
    return f"household-{household_id}"


def geometry_source_id(geometry: dict[str, Any]) -> str:
    """For a feature its file gives no id: its geometry, so a rerun still finds it."""
    return "g" + hashlib.sha256(json.dumps(geometry, sort_keys=True).encode()).hexdigest()[:24]


def content_hash(doc: dict[str, Any]) -> str:
    relevant = {k: doc[k] for k in ("unit_id", "geometry", "properties") if k in doc}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _number(properties: dict[str, Any], name: str) -> float | None:
    value = properties.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"properties.{name}: must be a number")
    try:
        number = float(str(value).replace(",", "."))
    except ValueError:
        raise ValueError(f"properties.{name}: must be a number") from None
    if not math.isfinite(number):
        raise ValueError(f"properties.{name}: must be a finite number")
    return number


def _text(properties: dict[str, Any], name: str, limit: int = 200) -> str:
    value = properties.get(name)
    return "" if value is None else str(value).strip()[:limit]


def clean_properties(
    layer: Layer, properties: dict[str, Any], import_unit: str, area_m2: float
) -> tuple[str, dict[str, Any]]:
    """(the unit the feature belongs to, the properties kept); ValueError naming the property."""
    # A shapefile's attributes (and the GeoJSON GDAL makes of one) are named STOREYS as often
    # as storeys: ignored, the house would be one storey. The name as written goes first.
    properties = {**{key.casefold(): value for key, value in properties.items()}, **properties}
    unit_id = import_unit
    kept: dict[str, Any] = {}
    if name := _text(properties, "name"):
        kept["name"] = name
    if layer is Layer.BUILDING:
        storeys = _number(properties, "storeys")
        if storeys is None:
            storeys = 1
        if storeys != int(storeys) or not 1 <= storeys <= MAX_STOREYS:
            raise ValueError(f"properties.storeys: must be a whole number from 1 to {MAX_STOREYS}")
        kept["storeys"] = int(storeys)
        floor_area = _number(properties, "floor_area_m2")
        if floor_area is not None and floor_area <= 0:
            raise ValueError("properties.floor_area_m2: must be positive")
        kept["footprint_m2"] = round(area_m2, 1)
        kept["floor_area_m2"] = round(floor_area if floor_area else area_m2 * storeys, 1)
        kept["use"] = _text(properties, "use", 60) or "residential"
    elif layer is Layer.ALLEY:
        width = _number(properties, "width_m")
        if width is None:
            raise ValueError("properties.width_m: is required (the alley's width in metres)")
        if not 0 < width <= MAX_WIDTH_M:
            raise ValueError(f"properties.width_m: must be more than 0 and at most {MAX_WIDTH_M:g}")
        kept["width_m"] = width
    elif layer is Layer.HYDRANT:
        # "Well" or "HYDRANT", as an attribute table spells it, is the kind it names.
        kind = _text(properties, "kind", 30).casefold() or "hydrant"
        if kind not in HYDRANT_KINDS:
            raise ValueError(f"properties.kind: must be one of {', '.join(HYDRANT_KINDS)}")
        kept["kind"] = kind
    elif layer is Layer.BOUNDARY:
        bounded = _text(properties, "unit_id", 100)
        code = _text(properties, "unit_code", 60)
        if not bounded and code:
            bounded = code if "." in code else f"{import_unit}.{code}"
        if not bounded:
            raise ValueError("properties.unit_id: is required (the unit this boundary bounds)")
        if not (bounded == import_unit or bounded.startswith(import_unit + ".")):
            raise ValueError(f"properties.unit_id: {bounded} is not {import_unit} or a unit in it")
        unit_id = bounded
    return unit_id, kept


# How many merges in a row are followed (a group merged into one merged in turn since): a
# bound, should the view ever hold a loop.
MAX_MERGES = 16


def retired(unit_id: str, unit: dict[str, Any]) -> str:
    """Why a unit the service's view of the registry has takes no more drawing (the registry
    merged it away: its map is the unit it went into); "" while it is active."""
    if unit.get("active"):
        return ""
    merged = unit.get("merged_into_id")
    return f"{unit_id} is not a known unit any more" + (
        f" (it was merged into {merged})" if merged else ""
    )


# Neighbouring units' boundaries may overlap by a sliver along their shared edge (two surveys of
# one line never quite agree), not more: where they overlap, a point would be in both units.
SLIVER_SHARE = 0.02


def side_by_side(a: str, b: str) -> bool:
    """Whether two units are on one level of the tree (groups, of one ward or of two wards):
    none lies in the other, so no place may lie in both."""
    return a != b and a.count(".") == b.count(".")


def overlap_problem(other: str, overlap_m2: float, smaller_m2: float) -> str:
    """Why a boundary may not overlap a neighbour's boundary this much; "" for a sliver."""
    if overlap_m2 <= SLIVER_SHARE * smaller_m2:
        return ""
    return (
        f"geometry: overlaps the boundary of {other} by {overlap_m2:,.0f} m²"
        " (draw the shared edge once, or redraw both in one file)"
    )


def not_drawable(unit_id: str, unit: dict[str, Any] | None) -> str:
    """Why no boundary may be drawn for the unit, as the service's view of the registry has it
    (None: the view has no such unit); "" when one may."""
    if unit is None:
        return f"properties.unit_id: {unit_id} is not a known unit"
    gone = retired(unit_id, unit)
    return f"properties.unit_id: {gone}" if gone else ""


# ---- who may do what -------------------------------------------------------------------------


def may_edit_map(caller: Principal, unit_id: str) -> None:
    """Group leaders and the officials above them draw their own units' maps."""
    if not caller.is_official:
        raise PermissionDenied(f"role {caller.role.value} may not change the map")
    caller.require_unit(unit_id)


def sees_households(caller: Principal) -> bool:
    """Household points place people: officials see those in their scope, nobody else does."""
    return caller.is_official


def may_list_residents(caller: Principal) -> None:
    if not caller.is_official:
        raise PermissionDenied(f"role {caller.role.value} may not list residents")


def may_count(caller: Principal, unit_id: str) -> None:
    """Counts hold no personal data: officials, auditors and integrators in scope."""
    if not (caller.is_official or caller.role in (Role.AUDITOR, Role.INTEGRATOR)):
        raise PermissionDenied(f"role {caller.role.value} may not read unit statistics")
    caller.require_unit(unit_id)


def age_on(birth_date: str, today: date) -> int:
    try:
        born = date.fromisoformat(birth_date)
    except ValueError:
        return -1
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def born_on_or_before_age(age: int, today: date) -> str:
    """The latest birth date (ISO) of someone aged `age` or more today."""
    try:
        return today.replace(year=today.year - age).isoformat()
    except ValueError:  # 29 February
        return today.replace(year=today.year - age, day=28).isoformat()

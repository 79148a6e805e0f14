"""AutoCAD DXF drawings in VN-2000, as wards digitised their paper maps, land on the WGS84 map
within a metre of where they are: the expected positions are computed independently of PROJ
(tests/gis/vn2000.py), the drawing is built here with ezdxf. Labels name the outline they lie in
and no smaller one."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
from civic.gis.v1 import gis_pb2
from ezdxf.document import Drawing

from services.gis import domain
from services.gis.domain import Layer
from tests.gis.conftest import Ward, rid
from tests.gis.test_import_edges import drawing_text
from tests.gis.vn2000 import DA_NANG_TM3, to_da_nang_tm3, to_utm_49n

Plane = Callable[[float, float], tuple[float, float]]


def metres_apart(a: list[float], b: list[float]) -> float:
    lon1, lat1, lon2, lat2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6_371_008.8 * math.asin(math.sqrt(h))


def drawing(ward: Ward, plane: Plane) -> tuple[bytes, dict[str, Any]]:
    """A small map in VN-2000 plane coordinates: two houses labelled with their storeys (one
    drawn with its ring left open), two hydrants with their names, an alley 4 m wide; and the
    WGS84 positions each was drawn from."""
    doc = Drawing.new("R2010")
    msp = doc.modelspace()
    for name in ("NHA", "TRU_CUU_HOA", "HEM"):
        doc.layers.add(name)
    houses = {
        "closed": [ward.at(x, y) for x, y in ((-300, 50), (-285, 50), (-285, 62), (-300, 62))],
        "open": [ward.at(x, y) for x, y in ((-250, 50), (-240, 50), (-240, 58), (-250, 58))],
    }
    for corners, storeys, closed in ((houses["closed"], "3T", True), (houses["open"], "2", False)):
        msp.add_lwpolyline([plane(*c) for c in corners], close=closed, dxfattribs={"layer": "NHA"})
        middle = (sum(c[0] for c in corners) / 4, sum(c[1] for c in corners) / 4)
        msp.add_text(storeys, dxfattribs={"layer": "NHA", "insert": plane(*middle)})
    hydrants = {"TCH-01": ward.at(-200, 0), "TCH-02": ward.at(-100, -150)}
    for name, at in hydrants.items():
        x, y = plane(*at)
        msp.add_circle((x, y), radius=0.5, dxfattribs={"layer": "TRU_CUU_HOA"})
        msp.add_text(name, dxfattribs={"layer": "TRU_CUU_HOA", "insert": (x + 2, y + 2)})
    alley = [ward.at(-500, -20), ward.at(-300, -20), ward.at(-300, -200)]
    msp.add_lwpolyline([plane(*p) for p in alley], dxfattribs={"layer": "HEM", "const_width": 4.0})
    out = io.StringIO()
    doc.write(out)
    return out.getvalue().encode(), {"houses": houses, "hydrants": hydrants, "alley": alley}


async def import_dxf(
    ward: Ward, content: bytes, crs: str, layer: gis_pb2.Layer.ValueType, dxf_layer: str
) -> gis_pb2.ImportLayerResponse:
    response: gis_pb2.ImportLayerResponse = await ward.officer.ImportLayer(
        gis_pb2.ImportLayerRequest(
            request_id=rid(),
            unit_id=ward.city.ward,
            layer=layer,
            format=gis_pb2.SOURCE_FORMAT_DXF,
            source_crs=crs,
            content=content,
            dxf_layer=dxf_layer,
        )
    )
    return response


@pytest.mark.parametrize(
    ("crs", "plane"),
    [(DA_NANG_TM3, to_da_nang_tm3), ("EPSG:3406", to_utm_49n)],
    ids=["tm3-da-nang", "utm-49n"],
)
async def test_a_vn2000_drawing_lands_within_a_metre(ward: Ward, crs: str, plane: Plane) -> None:
    content, truth = drawing(ward, plane)

    houses = await import_dxf(ward, content, crs, gis_pb2.LAYER_BUILDING, "NHA")
    assert houses.created == 1
    # The house whose outline was left open is refused, by its entity handle, and not stored.
    assert len(houses.rejected) == 1 and "not closed" in houses.rejected[0].message
    assert houses.rejected[0].source_id
    hydrants = await import_dxf(ward, content, crs, gis_pb2.LAYER_HYDRANT, "TRU_CUU_HOA")
    alleys = await import_dxf(ward, content, crs, gis_pb2.LAYER_ALLEY, "HEM")
    assert (hydrants.created, alleys.created) == (2, 1)

    listed = await ward.features(unit_id=ward.city.ward)
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for feature in listed["features"]:
        by_layer.setdefault(feature["properties"]["layer"], []).append(feature)

    (house,) = by_layer["building"]
    assert house["properties"]["storeys"] == 3
    ring = house["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    for got, expected in zip(ring, truth["houses"]["closed"], strict=False):
        assert metres_apart(got, expected) < 1.0, (got, expected)

    named = {h["properties"]["name"]: h for h in by_layer["hydrant"]}
    assert set(named) == set(truth["hydrants"])
    for name, expected in truth["hydrants"].items():
        assert metres_apart(named[name]["geometry"]["coordinates"], expected) < 1.0

    (alley,) = by_layer["alley"]
    assert alley["properties"]["width_m"] == 4.0
    for got, expected in zip(alley["geometry"]["coordinates"], truth["alley"], strict=True):
        assert metres_apart(got, expected) < 1.0

    # The same drawing again changes nothing: ids come from the entity handles.
    again = await import_dxf(ward, content, crs, gis_pb2.LAYER_HYDRANT, "TRU_CUU_HOA")
    assert (again.created, again.updated, again.unchanged) == (0, 0, 2)


async def test_a_drawing_in_the_wrong_crs_is_refused_as_far_away(ward: Ward) -> None:
    content, _ = drawing(ward, to_da_nang_tm3)
    # Read as UTM 48N the same numbers lie hundreds of kilometres away.
    response = await import_dxf(ward, content, "EPSG:3405", gis_pb2.LAYER_HYDRANT, "TRU_CUU_HOA")
    assert response.created == 0 and len(response.rejected) == 2
    assert all("outside" in error.message for error in response.rejected)


async def test_each_label_names_the_smallest_outline_around_it(ward: Ward) -> None:
    """A ward's drawing of its boundaries: its own outline labelled with its unit id, its
    groups' outlines inside it labelled with their codes, which lie inside its outline too."""
    doc = Drawing.new("R2010")
    msp = doc.modelspace()

    def outline(west: float, south: float, east: float, north: float) -> None:
        corners = [(west, south), (east, south), (east, north), (west, north)]
        msp.add_lwpolyline([to_da_nang_tm3(*ward.at(*c)) for c in corners], close=True)

    def label(text: str, east: float, north: float) -> None:
        msp.add_text(text, dxfattribs={"insert": to_da_nang_tm3(*ward.at(east, north))})

    outline(-610, -410, 610, 410)
    outline(-600, -400, -5, 400)
    label(ward.city.group.rsplit(".", 1)[1], -300, 0)
    outline(5, -400, 600, 400)
    label(ward.city.other_group.rsplit(".", 1)[1], 300, 0)
    label(ward.city.ward, 0, 405)  # between the groups' outlines and the ward's
    done = await import_dxf(ward, drawing_text(doc), DA_NANG_TM3, gis_pb2.LAYER_BOUNDARY, "")
    assert (done.updated, list(done.rejected)) == (3, [])

    async def units_at(east: float, north: float) -> list[str]:
        located = await ward.officer.LocateUnit(
            gis_pb2.LocateUnitRequest(point=ward.point(east, north))
        )
        return [unit.unit_id for unit in located.units]

    assert await units_at(-300, 0) == [ward.city.group, ward.city.ward]
    assert await units_at(300, 0) == [ward.city.other_group, ward.city.ward]
    # Between the groups, and beyond them: the ward's outline, drawn first, is the ward's.
    assert await units_at(0, 0) == [ward.city.ward]
    assert await units_at(605, 0) == [ward.city.ward]


async def test_a_storeys_label_too_long_for_a_float_refuses_its_building_alone(
    ward: Ward,
) -> None:
    """A label of 309 digits or more is no float (it reads as infinite): that building is
    refused by its handle, as for any impossible storeys, and the rest of the drawing stored."""
    doc = Drawing.new("R2010")
    msp = doc.modelspace()
    handles = []
    for west, label in ((-300, "1" * 400), (-250, "3")):
        corners = [(west, 50), (west + 15, 50), (west + 15, 62), (west, 62)]
        house = msp.add_lwpolyline([to_da_nang_tm3(*ward.at(*c)) for c in corners], close=True)
        handles.append(house.dxf.handle)
        msp.add_mtext(label, dxfattribs={"insert": to_da_nang_tm3(*ward.at(west + 7, 56))})
    done = await import_dxf(ward, drawing_text(doc), DA_NANG_TM3, gis_pb2.LAYER_BUILDING, "")
    assert done.created == 1
    assert [(r.source_id, r.message) for r in done.rejected] == [
        (handles[0], "properties.storeys: must be a finite number")
    ]
    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_BUILDING])
    assert [f["properties"]["storeys"] for f in listed["features"]] == [3]


def hydrant_drawing(ward: Ward, east: float, name: str, version: str = "R2010") -> Drawing:
    doc = Drawing.new(version)
    x, y = to_da_nang_tm3(*ward.at(east, 0))
    doc.modelspace().add_circle((x, y), radius=0.5)
    doc.modelspace().add_text(name, dxfattribs={"insert": (x + 2, y + 2)})
    return doc


async def hydrants_named(ward: Ward) -> list[str]:
    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_HYDRANT])
    return sorted(f["properties"].get("name", "") for f in listed["features"])


async def test_two_drawings_of_one_unit_keep_their_features_though_their_handles_match(
    ward: Ward,
) -> None:
    """Handles are unique within one drawing only: two surveyors' drawings of one ward number
    their entities alike. Each drawing keeps its own features, and importing one again
    changes nothing."""
    north, south = hydrant_drawing(ward, -200, "TCH-01"), hydrant_drawing(ward, 200, "TCH-02")
    [north_circle] = north.modelspace().query("CIRCLE")
    [south_circle] = south.modelspace().query("CIRCLE")
    assert north_circle.dxf.handle == south_circle.dxf.handle
    for doc in (north, south):
        done = await import_dxf(ward, drawing_text(doc), DA_NANG_TM3, gis_pb2.LAYER_HYDRANT, "")
        assert (done.created, list(done.rejected)) == (1, [])
    assert await hydrants_named(ward) == ["TCH-01", "TCH-02"]
    again = await import_dxf(ward, drawing_text(north), DA_NANG_TM3, gis_pb2.LAYER_HYDRANT, "")
    assert (again.created, again.updated, again.unchanged) == (0, 0, 1)
    assert await hydrants_named(ward) == ["TCH-01", "TCH-02"]


async def test_a_drawings_feature_stored_under_its_handle_alone_gives_way_once(
    ward: Ward,
) -> None:
    """Before features kept their drawing, a DXF entity's id came from its handle alone: the
    drawing imported again replaces that feature with its own, once; a drawing without its
    own id (R12 has none) keeps ids from handles, the same on every import."""
    store = ward.service.store
    doc = hydrant_drawing(ward, -200, "TCH-01")
    content = drawing_text(doc)
    await import_dxf(ward, content, DA_NANG_TM3, gis_pb2.LAYER_HYDRANT, "")
    # This ward's: other tests' hydrants share the collection.
    stored = await store.features.find_one({"layer": "hydrant", "unit_id": ward.city.ward})
    assert stored is not None and stored["drawing"]
    handle_alone = domain.feature_id(Layer.HYDRANT, ward.city.ward, stored["source_id"])
    await store.features.delete_one({"_id": stored["_id"]})
    del stored["drawing"]
    await store.features.insert_one(stored | {"_id": handle_alone})

    done = await import_dxf(ward, content, DA_NANG_TM3, gis_pb2.LAYER_HYDRANT, "")
    assert (done.created, done.removed) == (1, 1)
    assert await hydrants_named(ward) == ["TCH-01"]
    assert await store.features.find_one({"_id": handle_alone}) is None

    r12 = drawing_text(hydrant_drawing(ward, 200, "TCH-02", version="R12"))
    first = await import_dxf(ward, r12, DA_NANG_TM3, gis_pb2.LAYER_HYDRANT, "")
    second = await import_dxf(ward, r12, DA_NANG_TM3, gis_pb2.LAYER_HYDRANT, "")
    assert (first.created, second.created, second.unchanged) == (1, 0, 1)
    assert await hydrants_named(ward) == ["TCH-01", "TCH-02"]

"""Imports and listings at their edges: a drawing layer named in another case, or not in the
drawing, never empties a layer; loops stay closed and mirrored drawings land where drawn; a
feature too long for one document is refused by its index, and so is one with a coordinate too
long for a float (a file Python cannot read is the file's fault); a page stays within what a
client takes; a wide box keeps to its parallels, and one as wide as the world holds what lies
inside it; a route that is a spot still finds its hydrants; a polygon valid only on a flat map
(not on MongoDB's sphere) is refused as a feature, or as a query's argument."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2
from ezdxf.document import Drawing

from services.gis import api, geometry
from services.gis.domain import Layer
from services.gis.sources import read_dxf
from tests.gis.conftest import Ward, line_feature, point_feature, polygon_feature, rid
from tests.gis.vn2000 import DA_NANG_TM3, to_da_nang_tm3


def drawing_text(doc: Drawing) -> bytes:
    out = io.StringIO()
    doc.write(out)
    return out.getvalue().encode()


async def test_a_drawing_layer_is_found_in_any_case_and_one_not_drawn_is_refused(
    ward: Ward,
) -> None:
    spots = [ward.at(-500 + 10 * i, -300) for i in range(3)]
    hydrants = [point_feature(at, f"h{i}", kind="hydrant") for i, at in enumerate(spots)]
    assert (await ward.import_features(gis_pb2.LAYER_HYDRANT, hydrants)).created == 3
    doc = Drawing.new("R2010")
    doc.layers.add("TRU_CUU_HOA")
    for at in spots:
        doc.modelspace().add_circle(
            to_da_nang_tm3(*at), radius=0.5, dxfattribs={"layer": "TRU_CUU_HOA"}
        )

    def imported(dxf_layer: str) -> gis_pb2.ImportLayerRequest:
        return gis_pb2.ImportLayerRequest(
            request_id=rid(),
            unit_id=ward.city.ward,
            layer=gis_pb2.LAYER_HYDRANT,
            format=gis_pb2.SOURCE_FORMAT_DXF,
            source_crs=DA_NANG_TM3,
            content=drawing_text(doc),
            dxf_layer=dxf_layer,
            replace=True,
        )

    replaced = await ward.officer.ImportLayer(imported("tru_cuu_hoa"))
    assert (replaced.created, replaced.removed, list(replaced.rejected)) == (3, 3, [])
    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_HYDRANT])
    assert len(listed["features"]) == 3

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await ward.officer.ImportLayer(imported("TRU_CUU_HOA_CU"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("dxf_layer:")
    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_HYDRANT])
    assert len(listed["features"]) == 3


def test_a_closed_polyline_alley_is_a_loop_and_a_mirrored_circle_lands_where_drawn() -> None:
    doc = Drawing.new("R2010")
    msp = doc.modelspace()
    msp.add_lwpolyline([(0, 0), (10, 0), (10, 10), (0, 10)], close=True)
    # Mirrored export: the centre is stored in the circle's own (flipped) coordinate system.
    msp.add_circle((-500_000, 1_780_000), radius=0.3, dxfattribs={"extrusion": (0, 0, -1)})
    content = drawing_text(doc)

    [alley] = read_dxf(content, Layer.ALLEY, "")
    assert alley.geometry is not None
    assert alley.geometry["coordinates"] == [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    [hydrant] = read_dxf(content, Layer.HYDRANT, "")
    assert hydrant.geometry is not None
    assert [round(c) for c in hydrant.geometry["coordinates"]] == [500_000, 1_780_000]


def test_a_mirrored_exports_labels_name_what_they_stand_by() -> None:
    """A building and its storeys label, both stored flipped, as a mirrored export has them."""
    doc = Drawing.new("R2010")
    msp = doc.modelspace()
    flipped = {"extrusion": (0, 0, -1)}
    msp.add_lwpolyline([(-10, 0), (-20, 0), (-20, 10), (-10, 10)], close=True, dxfattribs=flipped)
    msp.add_text("3", dxfattribs={"insert": (-15, 5), **flipped})

    [building] = read_dxf(drawing_text(doc), Layer.BUILDING, "")
    assert building.geometry is not None
    assert building.geometry["coordinates"][0][0] == [10, 0]
    assert building.properties == {"storeys": 3}


async def test_a_feature_with_too_many_positions_is_refused_by_its_index(
    ward: Ward, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(geometry, "MAX_POSITIONS", 100)
    long = [ward.at(-500 + i, -200 + (i % 2)) for i in range(101)]
    short = [ward.at(-500, 200), ward.at(-400, 200)]
    done = await ward.import_features(
        gis_pb2.LAYER_ALLEY,
        [line_feature(short, "short", width_m=3), line_feature(long, "long", width_m=3)],
    )
    assert done.created == 1
    assert [(r.index, "positions" in r.message) for r in done.rejected] == [(1, True)]


async def test_a_number_too_long_for_a_float_is_the_files_fault_not_an_internal_error(
    ward: Ward,
) -> None:
    # JSON allows integers of any length: one as a coordinate is that feature's mistake.
    huge = b'{"type":"Feature","id":"huge","properties":{},"geometry":{"type":"Point",'
    huge += b'"coordinates":[1' + b"0" * 400 + b",16]}}"
    good = json.dumps(point_feature(ward.at(0, 0), "good", kind="hydrant")).encode()
    done = await ward.officer.ImportLayer(
        gis_pb2.ImportLayerRequest(
            request_id=rid(),
            unit_id=ward.city.ward,
            layer=gis_pb2.LAYER_HYDRANT,
            format=gis_pb2.SOURCE_FORMAT_GEOJSON,
            content=b'{"type":"FeatureCollection","features":[' + huge + b"," + good + b"]}",
        )
    )
    assert done.created == 1
    assert [(r.index, r.source_id) for r in done.rejected] == [(0, "huge")]
    assert "finite numbers" in done.rejected[0].message
    # One Python will not read at all, or arrays nested past the parser's depth: the file.
    for content in (b'{"type":"Point","coordinates":[1' + b"0" * 5000 + b",16]}", b"[" * 100_000):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ward.officer.ImportLayer(
                gis_pb2.ImportLayerRequest(
                    request_id=rid(),
                    unit_id=ward.city.ward,
                    layer=gis_pb2.LAYER_HYDRANT,
                    format=gis_pb2.SOURCE_FORMAT_GEOJSON,
                    content=content,
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith("content: is not valid GeoJSON")


async def test_a_page_of_long_features_is_cut_short_and_goes_on(
    ward: Ward, monkeypatch: pytest.MonkeyPatch
) -> None:
    alleys = [
        line_feature([ward.at(-500 + j, -100 + 5 * i) for j in range(0, 50, 5)], f"p{i}", width_m=3)
        for i in range(6)
    ]
    assert (await ward.import_features(gis_pb2.LAYER_ALLEY, alleys)).created == 6
    monkeypatch.setattr(api, "MAX_PAGE_BYTES", 1_000)  # about two of these per page
    first = await ward.officer.ListFeatures(
        gis_pb2.ListFeaturesRequest(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_ALLEY])
    )
    assert 0 < first.count < 6 and first.next_page_token
    everything = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_ALLEY])
    assert len(everything["features"]) == 6


async def test_a_wide_box_keeps_to_its_parallels(ward: Ward) -> None:
    lon, lat = ward.at(0, -390)
    await ward.import_features(
        gis_pb2.LAYER_HYDRANT, [point_feature([lon, lat], "edge", kind="hydrant")]
    )
    south = lat - 0.0003  # the hydrant is 33 m inside the box's south edge
    box = gis_pb2.BoundingBox(west=lon - 0.5, south=south, east=lon + 0.5, north=south + 1.0)
    found = await ward.features(bbox=box, layers=[gis_pb2.LAYER_HYDRANT])
    assert [lon, lat] in [f["geometry"]["coordinates"] for f in found["features"]]


async def test_a_box_as_wide_as_the_world_holds_what_lies_inside_it(ward: Ward) -> None:
    """A map zoomed out to the world asks for a box 360 degrees wide: MongoDB would read one
    polygon that wide as what lies outside it (the poles, here). And a box reaching a pole is
    answered in a moment, not minutes."""
    at = ward.at(0, 0)
    await ward.import_features(gis_pb2.LAYER_HYDRANT, [point_feature(at, "h", kind="hydrant")])
    for west, south, east, north in (
        (-180, -85.05, 180, 85.05),  # a web map's whole world
        (-179, -80, 179, 80),
        (-180, -90, 180, 90),
    ):
        box = gis_pb2.BoundingBox(west=west, south=south, east=east, north=north)
        found = await asyncio.wait_for(
            ward.features(bbox=box, layers=[gis_pb2.LAYER_HYDRANT]), timeout=20
        )
        assert at in [f["geometry"]["coordinates"] for f in found["features"]], (west, east)


def test_a_route_that_is_one_spot_measures_from_it() -> None:
    along, offset = geometry.along_and_offset_m([(108.0, 16.0)], (108.001, 16.0))
    assert along == 0.0
    assert 100 < offset < 110


def notched(ward: Ward) -> list[list[float]]:
    """A ring valid on a flat map: its south edge, 2.1 km long, passes 1 cm under a vertex of
    the north side. On MongoDB's sphere that edge is a great circle, which bows 2.7 cm north of
    its parallel here: it crosses the vertex, and MongoDB refuses the polygon."""
    (x0, y0), (x1, _) = ward.at(-1050, -450), ward.at(1050, -450)
    middle, top = round((x0 + x1) / 2, 7), round(y0 + 0.001, 7)
    return [[x0, y0], [x1, y0], [x1, top], [middle, round(y0 + 1e-7, 7)], [x0, top], [x0, y0]]


@pytest.fixture(params=["checked here", "refused by MongoDB"])
def sphere_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Polygons checked on the sphere by the service, or (as if that check let one through)
    only by MongoDB."""
    if request.param == "refused by MongoDB":
        monkeypatch.setattr(geometry, "check_on_sphere", lambda polygon: None)
    return str(request.param)


async def test_a_polygon_valid_only_on_a_flat_map_is_refused_by_its_index_and_the_rest_written(
    ward: Ward, monkeypatch: pytest.MonkeyPatch, sphere_check: str
) -> None:
    monkeypatch.setattr(api, "IMPORT_BATCH", 1)  # as a drawing of thousands is written
    # The ward drawn wide enough to hold the long polygon (a building stands in its unit).
    wide = polygon_feature(ward.box(-1060, -500, 1060, 400), "ward", unit_id=ward.city.ward)
    assert (await ward.import_features(gis_pb2.LAYER_BOUNDARY, [wide])).updated == 1
    houses = [
        polygon_feature(ward.box(-500, 100, -480, 115), "before"),
        polygon_feature(notched(ward), "notched"),
        polygon_feature(ward.box(-450, 100, -430, 115), "after"),
    ]
    done = await ward.import_features(gis_pb2.LAYER_BUILDING, houses)
    assert done.created == 2
    [refusal] = done.rejected
    assert (refusal.index, refusal.source_id) == (1, "notched")
    reason = "on the sphere" if sphere_check == "checked here" else "Edges 0 and 2 cross"
    assert refusal.message.startswith("geometry: ") and reason in refusal.message, refusal
    assert len(refusal.message) < 400
    stored = await ward.service.store.features.count_documents(
        {"source_unit": ward.city.ward, "source_id": {"$in": ["before", "notched", "after"]}}
    )
    assert stored == 2


async def test_an_evacuation_area_valid_only_on_a_flat_map_is_refused_as_the_callers_ring(
    ward: Ward, sphere_check: str
) -> None:
    ring = [types_pb2.GeoPoint(longitude=lon, latitude=lat) for lon, lat in notched(ward)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ward.officer.ListResidentsInArea(gis_pb2.ListResidentsInAreaRequest(ring=ring))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert str(caught.value.details()).startswith("ring"), caught.value.details()

"""GeoJSON imports: stored in WGS84, idempotent, invalid features refused one by one, every
change announced on civic.gis.v1, and bad requests refused with nothing written. A unit has one
boundary, whoever draws it, and only a unit the registry has; a group merged away takes no more
imports; footprints are in square metres on the ellipsoid."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from civic.gis.v1 import events_pb2, gis_pb2
from pyproj import Geod, Transformer
from shapely.geometry import shape

from services.common.auth import Role
from services.common.cloudevents import type_name
from services.common.config import Settings
from services.gis import api as gis_api
from services.gis import domain
from services.gis.domain import Layer
from tests.gis.conftest import Ward, line_feature, point_feature, polygon_feature, rid
from tests.kafka_reader import Record, TopicReader, of_type, with_key
from tests.objects import put, put_refused

TOPIC = "civic.gis.v1"


async def refused(code: grpc.StatusCode, call: Awaitable[Any]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


def buildings(ward: Ward) -> list[dict[str, Any]]:
    return [
        polygon_feature(ward.box(-500, 100, -480, 115), "b1", storeys=3, use="residential"),
        polygon_feature(ward.box(-450, 100, -430, 120), "b2", storeys="2"),
        polygon_feature(ward.box(100, -100, 130, -80), "b3", storeys=5, floor_area_m2=2500),
    ]


async def test_a_geojson_import_stores_wgs84_features_once_and_announces_them(
    ward: Ward, settings: Any
) -> None:
    first = await ward.import_features(gis_pb2.LAYER_BUILDING, buildings(ward))
    assert (first.created, first.updated, first.unchanged, list(first.rejected)) == (3, 0, 0, [])

    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_BUILDING])
    by_name = {f["properties"]["storeys"]: f for f in listed["features"]}
    assert set(by_name) == {3, 2, 5}
    b1 = by_name[3]
    assert b1["geometry"]["coordinates"][0][0] == ward.at(-500, 100)
    assert b1["properties"]["unit_id"] == ward.city.ward
    # 20 m x 15 m footprint, three storeys.
    assert b1["properties"]["footprint_m2"] == pytest.approx(300, rel=0.01)
    assert b1["properties"]["floor_area_m2"] == pytest.approx(900, rel=0.01)
    assert by_name[5]["properties"]["floor_area_m2"] == 2500

    # The same file again (a retry under a new request id): nothing changes, nothing announced.
    again = await ward.import_features(gis_pb2.LAYER_BUILDING, buildings(ward))
    assert (again.created, again.updated, again.unchanged) == (0, 0, 3)
    # One building redrawn taller: only it changes.
    changed = buildings(ward)
    changed[1]["properties"]["storeys"] = 4
    third = await ward.import_features(gis_pb2.LAYER_BUILDING, changed)
    assert (third.created, third.updated, third.unchanged) == (0, 1, 2)

    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        records = await reader.collect(
            lambda rs: (
                len(of_type(with_key(rs, ward.city.ward), type_name(events_pb2.LayerImported())))
                >= 3
            ),
            what="three LayerImported events",
        )
        records = await reader.read_to_end()
    mine = with_key(records, ward.city.ward)
    changes = [
        events_pb2.FeaturesChanged.FromString(r.value)
        for r in of_type(mine, type_name(events_pb2.FeaturesChanged()))
    ]
    building_changes = [c for c in changes if c.layer == gis_pb2.LAYER_BUILDING]
    # The first import announced three features, the rerun nothing, the redraw one.
    assert [len(c.upserted_ids) for c in building_changes] == [3, 1]
    assert building_changes[0].origin == events_pb2.CHANGE_ORIGIN_IMPORT
    assert building_changes[1].upserted_ids[0] in {f["id"] for f in listed["features"]}
    imported = [
        events_pb2.LayerImported.FromString(r.value)
        for r in of_type(mine, type_name(events_pb2.LayerImported()))
    ]
    assert [(i.created, i.updated, i.unchanged) for i in imported if i.layer == 2] == [
        (3, 0, 0),
        (0, 0, 3),
        (0, 1, 2),
    ]


async def test_a_retried_import_request_returns_the_first_answer(ward: Ward) -> None:
    request = gis_pb2.ImportLayerRequest(
        request_id=rid(),
        unit_id=ward.city.ward,
        layer=gis_pb2.LAYER_HYDRANT,
        format=gis_pb2.SOURCE_FORMAT_GEOJSON,
        content=json.dumps(point_feature(ward.at(10, 10), "h1")).encode(),
    )
    first = await ward.officer.ImportLayer(request)
    second = await ward.officer.ImportLayer(request)
    assert first == second and first.created == 1
    other = gis_pb2.ImportLayerRequest()
    other.CopyFrom(request)
    other.replace = True
    await refused(grpc.StatusCode.FAILED_PRECONDITION, ward.officer.ImportLayer(other))


async def test_invalid_geometry_is_refused_feature_by_feature(ward: Ward) -> None:
    bowtie = [
        ward.at(-100, 0),
        ward.at(-80, 20),
        ward.at(-80, 0),
        ward.at(-100, 20),
        ward.at(-100, 0),
    ]
    unclosed = ward.box(-200, 0, -180, 20)[:-1]
    features = [
        polygon_feature(ward.box(-300, 0, -280, 20), "good", storeys=2),
        polygon_feature(bowtie, "bowtie"),
        polygon_feature(unclosed, "unclosed"),
        # 3 km east of the ward's boundary.
        polygon_feature(
            [ward.at(3600, 0), ward.at(3620, 0), ward.at(3620, 20), ward.at(3600, 0)], "far"
        ),
        point_feature(ward.at(0, 0), "a-point"),
        polygon_feature(ward.box(-250, 0, -230, 20), "zero-storeys", storeys=0),
        {"type": "Feature", "id": "nothing", "properties": {}},
        # A hand-edited file: the type given as a list.
        {
            "type": "Feature",
            "id": "listed-type",
            "geometry": {"type": ["Polygon"], "coordinates": [ward.box(-150, 0, -130, 20)]},
        },
    ]
    response = await ward.import_features(gis_pb2.LAYER_BUILDING, features)
    assert response.created == 1
    errors = {e.source_id: (e.index, e.message) for e in response.rejected}
    assert set(errors) == {
        "bowtie",
        "unclosed",
        "far",
        "a-point",
        "zero-storeys",
        "nothing",
        "listed-type",
    }
    assert errors["listed-type"] == (7, errors["listed-type"][1])
    assert errors["listed-type"][1].startswith("geometry: type")
    assert errors["bowtie"][0] == 1 and "intersects itself" in errors["bowtie"][1]
    assert "not closed" in errors["unclosed"][1]
    assert "outside" in errors["far"][1] and ward.city.ward in errors["far"][1]
    assert errors["a-point"][1].startswith("geometry: a building must be a Polygon")
    assert errors["zero-storeys"][1].startswith("properties.storeys:")
    assert "no geometry" in errors["nothing"][1]

    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_BUILDING])
    assert [f["properties"]["storeys"] for f in listed["features"]] == [2]

    hydrants = await ward.import_features(
        gis_pb2.LAYER_HYDRANT,
        [point_feature(ward.at(0, 0), "ok"), point_feature(ward.at(0, 5000), "far")],
    )
    assert hydrants.created == 1 and [e.source_id for e in hydrants.rejected] == ["far"]
    alleys = await ward.import_features(
        gis_pb2.LAYER_ALLEY,
        [line_feature([ward.at(0, 0), ward.at(0, 50)], "no-width")],
    )
    assert alleys.created == 0
    assert alleys.rejected[0].message.startswith("properties.width_m: is required")


async def test_features_of_a_layer_exported_multi_part_are_taken_one_part_each(
    ward: Ward,
) -> None:
    """As QGIS and GDAL export a layer typed multi-part: each feature one building, hydrant or
    alley all the same. One of two parts is not one building."""

    def multi(part: str, coordinates: Any, fid: str, **properties: Any) -> dict[str, Any]:
        geometry = {"type": f"Multi{part}", "coordinates": coordinates}
        return {"type": "Feature", "id": fid, "geometry": geometry, "properties": properties}

    houses = [
        multi("Polygon", [[ward.box(-300, 0, -280, 20)]], "one", storeys=2),
        multi("Polygon", [[ward.box(-250, 0, -230, 20)], [ward.box(-200, 0, -180, 20)]], "two"),
    ]
    done = await ward.import_features(gis_pb2.LAYER_BUILDING, houses)
    assert done.created == 1
    assert [(e.source_id, e.message) for e in done.rejected] == [
        ("two", "geometry: a building must be a Polygon")
    ]
    hydrant = multi("Point", [ward.at(-100, 100)], "tch", kind="hydrant")
    assert (await ward.import_features(gis_pb2.LAYER_HYDRANT, [hydrant])).created == 1
    way = multi("LineString", [[ward.at(-600, 0), ward.at(0, 0)]], "kiet", width_m=3)
    assert (await ward.import_features(gis_pb2.LAYER_ALLEY, [way])).created == 1
    listed = await ward.features(unit_id=ward.city.group)
    kinds = {f["id"].split("-")[0]: f["geometry"]["type"] for f in listed["features"]}
    assert kinds == {
        "boundary": "Polygon",
        "building": "Polygon",
        "hydrant": "Point",
        "alley": "LineString",
    }


async def test_replacing_a_layer_removes_what_the_new_drawing_lacks(
    ward: Ward, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ward.import_features(gis_pb2.LAYER_BUILDING, buildings(ward))
    # Removed in batches like the writes (here of one), so no event outgrows a Kafka record.
    monkeypatch.setattr(gis_api, "IMPORT_BATCH", 1)
    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        before = len(await reader.read_to_end())
        response = await ward.import_features(
            gis_pb2.LAYER_BUILDING, buildings(ward)[:1], replace=True
        )

        def replace_announced(records: list[Record]) -> bool:
            mine = with_key(records[before:], ward.city.ward)
            return bool(of_type(mine, type_name(events_pb2.LayerImported())))

        records = await reader.collect(replace_announced, what="the replace's LayerImported")
    assert (response.unchanged, response.removed) == (1, 2)
    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_BUILDING])
    assert len(listed["features"]) == 1
    changes = of_type(
        with_key(records[before:], ward.city.ward), type_name(events_pb2.FeaturesChanged())
    )
    removals = [events_pb2.FeaturesChanged.FromString(r.value).removed_ids for r in changes]
    assert [len(ids) for ids in removals] == [1, 1]


async def test_a_replace_with_refused_features_removes_nothing(ward: Ward) -> None:
    """A wrong CRS refuses every feature: replacing would empty the layer."""
    await ward.import_features(gis_pb2.LAYER_BUILDING, buildings(ward))
    broken = [*buildings(ward)[:1], point_feature(ward.at(0, 0), "a-point")]
    response = await ward.import_features(gis_pb2.LAYER_BUILDING, broken, replace=True)
    assert (response.unchanged, len(response.rejected), response.removed) == (1, 1, 0)
    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_BUILDING])
    assert len(listed["features"]) == 3


async def test_a_large_drawing_is_uploaded_to_object_storage_then_imported(ward: Ward) -> None:
    features = [
        point_feature(ward.at(-500 + 10 * i, -300), f"h{i}", kind="hydrant") for i in range(80)
    ]
    body = json.dumps({"type": "FeatureCollection", "features": features}).encode()
    upload = await ward.officer.CreateImportUpload(
        gis_pb2.CreateImportUploadRequest(
            unit_id=ward.city.ward, file_name="hydrants.geojson", size_bytes=len(body)
        )
    )
    # The link takes the declared size only: it cannot be used to store a larger file.
    await put_refused(upload.upload_url, body + b" " * 1024, "")
    await put(upload.upload_url, body, "")
    response = await ward.officer.ImportLayer(
        gis_pb2.ImportLayerRequest(
            request_id=rid(),
            unit_id=ward.city.ward,
            layer=gis_pb2.LAYER_HYDRANT,
            format=gis_pb2.SOURCE_FORMAT_GEOJSON,
            object_key=upload.object_key,
        )
    )
    assert response.created == 80
    # An upload key is good only for the unit it was handed out for.
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        ward.officer.ImportLayer(
            gis_pb2.ImportLayerRequest(
                request_id=rid(),
                unit_id=ward.city.group,
                layer=gis_pb2.LAYER_HYDRANT,
                format=gis_pb2.SOURCE_FORMAT_GEOJSON,
                object_key=upload.object_key,
            )
        ),
    )


async def test_bad_requests_are_refused_with_nothing_written(ward: Ward) -> None:
    store = ward.service.store
    before = await store.features.count_documents({})
    good = json.dumps(point_feature(ward.at(0, 0), "h")).encode()

    def request(**fields: Any) -> gis_pb2.ImportLayerRequest:
        base: dict[str, Any] = {
            "request_id": rid(),
            "unit_id": ward.city.ward,
            "layer": gis_pb2.LAYER_HYDRANT,
            "format": gis_pb2.SOURCE_FORMAT_GEOJSON,
            "content": good,
        }
        return gis_pb2.ImportLayerRequest(**(base | fields))

    cases = [
        (request(request_id=""), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (request(unit_id=""), grpc.StatusCode.INVALID_ARGUMENT, "unit_id"),
        (request(unit_id=ward.city.ward + ".nowhere"), grpc.StatusCode.NOT_FOUND, "unit"),
        (request(layer=gis_pb2.LAYER_HOUSEHOLD), grpc.StatusCode.INVALID_ARGUMENT, "layer"),
        (request(layer=0), grpc.StatusCode.INVALID_ARGUMENT, "layer"),
        (request(format=0), grpc.StatusCode.INVALID_ARGUMENT, "format"),
        (request(source_crs="EPSG:999999"), grpc.StatusCode.INVALID_ARGUMENT, "source_crs"),
        (request(source_crs="nonsense"), grpc.StatusCode.INVALID_ARGUMENT, "source_crs"),
        (request(content=b"{not json"), grpc.StatusCode.INVALID_ARGUMENT, "content"),
        (
            request(content=b'{"type": "FeatureCollection"}'),
            grpc.StatusCode.INVALID_ARGUMENT,
            "content",
        ),
        (request(content=b""), grpc.StatusCode.INVALID_ARGUMENT, "content"),
        (
            request(format=gis_pb2.SOURCE_FORMAT_DXF, content=b"0\nEOF\n"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "source_crs",
        ),
        (
            request(format=gis_pb2.SOURCE_FORMAT_DXF, source_crs="EPSG:3405", content=b"garbage"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "content",
        ),
        (request(object_key="elsewhere/x.dxf"), grpc.StatusCode.INVALID_ARGUMENT, "object_key"),
        (
            request(object_key=f"{ward.city.ward}/missing.geojson"),
            grpc.StatusCode.NOT_FOUND,
            "missing",
        ),
    ]
    for bad, code, named in cases:
        details = await refused(code, ward.officer.ImportLayer(bad))
        assert named in details, details
    # Who: a group leader outside the unit, a resident, an integrator.
    for caller in (
        ward.other_leader,
        ward.caller(Role.RESIDENT, ward.city.group, "hh-1"),
        ward.caller(Role.INTEGRATOR, ward.city.city),
    ):
        await refused(grpc.StatusCode.PERMISSION_DENIED, caller.ImportLayer(request()))
    # Whether a unit exists is told only to a caller who may draw it.
    unknown = request(unit_id=ward.city.ward + ".nowhere")
    await refused(grpc.StatusCode.PERMISSION_DENIED, ward.other_leader.ImportLayer(unknown))
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        ward.other_leader.CreateImportUpload(
            gis_pb2.CreateImportUploadRequest(unit_id=unknown.unit_id, file_name="to.dxf")
        ),
    )
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        ward.officer.CreateImportUpload(
            gis_pb2.CreateImportUploadRequest(unit_id=ward.city.ward, file_name="../etc/passwd")
        ),
    )
    for size in (-1, gis_api.MAX_UPLOAD_BYTES + 1):
        details = await refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            ward.officer.CreateImportUpload(
                gis_pb2.CreateImportUploadRequest(
                    unit_id=ward.city.ward, file_name="to.dxf", size_bytes=size
                )
            ),
        )
        assert details.startswith("size_bytes:"), details
    assert await store.features.count_documents({}) == before


async def test_a_geojson_file_in_vn2000_is_read_in_the_crs_it_declares(ward: Ward) -> None:
    """As GDAL writes a file not in WGS84: with a crs member naming its CRS. Read in it when the
    import names none; refused, naming source_crs, when the import names another."""
    to_vn2000 = Transformer.from_crs("EPSG:4326", "EPSG:3406", always_xy=True)
    spots = [ward.at(-200, 50), ward.at(150, -80)]
    features = [
        point_feature(list(to_vn2000.transform(spot[0], spot[1])), f"h{number}", kind="hydrant")
        for number, spot in enumerate(spots)
    ]
    declared = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3406"}}
    content = json.dumps({"type": "FeatureCollection", "crs": declared, "features": features})

    def request(source_crs: str) -> gis_pb2.ImportLayerRequest:
        return gis_pb2.ImportLayerRequest(
            request_id=rid(),
            unit_id=ward.city.ward,
            layer=gis_pb2.LAYER_HYDRANT,
            format=gis_pb2.SOURCE_FORMAT_GEOJSON,
            source_crs=source_crs,
            content=content.encode(),
        )

    store = ward.service.store
    before = await store.features.count_documents({})
    details = await refused(
        grpc.StatusCode.INVALID_ARGUMENT, ward.officer.ImportLayer(request("EPSG:3405"))
    )
    assert details.startswith("source_crs:") and "EPSG::3406" in details, details
    assert await store.features.count_documents({}) == before

    for source_crs in ("", "EPSG:3406"):
        done = await ward.officer.ImportLayer(request(source_crs))
        assert list(done.rejected) == []
    stored = store.features.find({"layer": "hydrant", "source_unit": ward.city.ward})
    landed = sorted([doc["geometry"]["coordinates"] async for doc in stored])
    assert len(landed) == len(spots)
    for got, sent in zip(landed, sorted(spots), strict=True):
        assert got == pytest.approx(sent, abs=1e-7)


async def test_a_unit_has_one_boundary_whoever_draws_it(ward: Ward, settings: Settings) -> None:
    """The ward drew its groups' boundaries (the fixture); the group's leader draws the group's
    own. Before boundaries took their unit's id, each outline of a drawing kept its own: one
    stored that way (from an earlier drawing of the ward's) is replaced as well."""
    store = ward.service.store
    group = ward.city.group
    drawn = await store.boundary(group)
    assert drawn is not None
    earlier_id = domain.feature_id(Layer.BOUNDARY, ward.city.ward, "g17-2019")
    earlier = drawn | {"_id": earlier_id, "source_id": "g17-2019"}
    await store.features.insert_one(earlier)
    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        before = len(await reader.read_to_end())
        done = await ward.import_features(
            gis_pb2.LAYER_BOUNDARY,
            [polygon_feature(ward.box(-600, -400, -5, 400), "mine", unit_id=group)],
            caller=ward.leader,
            unit_id=group,
        )

        def imported(records: list[Record]) -> bool:
            mine = with_key(records[before:], group)
            return bool(of_type(mine, type_name(events_pb2.LayerImported())))

        records = await reader.collect(imported, what="the leader's LayerImported")
    assert (done.created, done.updated, done.removed, list(done.rejected)) == (0, 1, 1, [])
    (change,) = [
        events_pb2.FeaturesChanged.FromString(r.value)
        for r in of_type(with_key(records[before:], group), type_name(events_pb2.FeaturesChanged()))
    ]
    assert (list(change.upserted_ids), list(change.removed_ids)) == (
        [drawn["_id"]],
        [earlier["_id"]],
    )

    located = await ward.officer.LocateUnit(gis_pb2.LocateUnitRequest(point=ward.point(-300, 0)))
    assert [u.unit_id for u in located.units] == [group, ward.city.ward]
    counts = await ward.officer.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=ward.city.ward))
    shaded = [f["properties"]["unit_id"] for f in json.loads(counts.geojson)["features"]]
    assert sorted(shaded) == [group, ward.city.other_group]

    # The ward's drawing without the group no longer removes it: it is the leader's now.
    fixture = [
        polygon_feature(
            ward.box(-600, -400, 600, 400), "ward", unit_id=ward.city.ward, name="Phường"
        ),
        polygon_feature(ward.box(0, -400, 600, 400), "g18", unit_id=ward.city.other_group),
    ]
    again = await ward.import_features(gis_pb2.LAYER_BOUNDARY, fixture, replace=True)
    assert (again.unchanged, again.removed) == (2, 0)
    mine = await store.boundary(group)
    assert mine is not None and (mine["source_unit"], mine["source_id"]) == (group, "mine")


async def test_a_units_own_outline_drawn_again_lies_within_the_boundary_around_it(
    ward: Ward,
) -> None:
    """Not within the outline it replaces: a group that took in its neighbour reaches 600 m
    past its old outline, and a ward's first outline, drawn 1 km off, must be correctable."""
    group = ward.city.group
    # As the registry's events leave the neighbour merged into the group.
    await ward.service.store.units.update_one(
        {"_id": ward.city.other_group}, {"$set": {"active": False, "merged_into_id": group}}
    )
    grown = polygon_feature(ward.box(-600, -400, 600, 400), "merged", unit_id=group)
    done = await ward.import_features(
        gis_pb2.LAYER_BOUNDARY, [grown], caller=ward.leader, unit_id=group
    )
    assert (done.updated, list(done.rejected)) == (1, [])
    # Past the ward's boundary, by more than the margin, it is still refused, naming the ward.
    astray = polygon_feature(ward.box(-1800, -400, 0, 400), "astray", unit_id=group)
    done = await ward.import_features(
        gis_pb2.LAYER_BOUNDARY, [astray], caller=ward.leader, unit_id=group
    )
    assert done.updated == 0
    assert f"1,200 m outside {ward.city.ward}'s boundary" in done.rejected[0].message
    # Nothing is drawn around the ward: its outline only has to lie in Vietnam.
    moved = polygon_feature(ward.box(-600, 600, 600, 1400), "ward", unit_id=ward.city.ward)
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, [moved])
    assert (done.updated, list(done.rejected)) == (1, [])


async def test_an_outline_redrawn_for_another_unit_is_announced_removed_from_the_one_it_left(
    ward: Ward, settings: Settings
) -> None:
    ring = ward.box(-590, -390, -10, 390)
    store = ward.service.store
    await ward.import_features(
        gis_pb2.LAYER_BOUNDARY, [polygon_feature(ring, "b-x", unit_id=ward.city.group)]
    )
    left = await store.boundary(ward.city.group)
    assert left is not None
    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        before = len(await reader.read_to_end())
        # The drawing is mended: outline b-x bounds the other group, not this one.
        fixed = await ward.import_features(
            gis_pb2.LAYER_BOUNDARY, [polygon_feature(ring, "b-x", unit_id=ward.city.other_group)]
        )

        def imported(records: list[Record]) -> bool:
            mine = with_key(records[before:], ward.city.ward)
            return bool(of_type(mine, type_name(events_pb2.LayerImported())))

        records = await reader.collect(imported, what="the mended drawing's LayerImported")
    assert (fixed.created, fixed.updated, fixed.removed) == (0, 1, 1)
    changes = [
        (r.key_text, events_pb2.FeaturesChanged.FromString(r.value))
        for r in of_type(records[before:], type_name(events_pb2.FeaturesChanged()))
        if r.key_text in (ward.city.group, ward.city.other_group)
    ]
    assert [key for key, change in changes if change.upserted_ids] == [ward.city.other_group]
    assert [(key, list(c.removed_ids)) for key, c in changes if c.removed_ids] == [
        (ward.city.group, [left["_id"]])
    ]
    assert await store.boundary(ward.city.group) is None


async def test_a_boundary_is_only_for_a_unit_the_registry_has(ward: Ward) -> None:
    store = ward.service.store
    merged = ward.city.ward + ".g99"
    # As the registry's events leave a group merged into another.
    await store.units.insert_one(
        {
            "_id": merged,
            "kind": 4,
            "name": "Tổ 99",
            "active": False,
            "merged_into_id": ward.city.group,
        }
    )
    response = await ward.import_features(
        gis_pb2.LAYER_BOUNDARY,
        [
            polygon_feature(
                ward.box(-500, -300, -400, -200), "typo", unit_id=ward.city.ward + ".g71"
            ),
            polygon_feature(ward.box(-300, -300, -200, -200), "label", unit_code="Tổ 17"),
            polygon_feature(ward.box(-100, -300, -50, -200), "gone", unit_id=merged),
        ],
    )
    assert [(r.index, r.message) for r in response.rejected] == [
        (0, f"properties.unit_id: {ward.city.ward}.g71 is not a known unit"),
        (1, f"properties.unit_id: {ward.city.ward}.Tổ 17 is not a known unit"),
        (
            2,
            f"properties.unit_id: {merged} is not a known unit any more "
            f"(it was merged into {ward.city.group})",
        ),
    ]
    assert response.created == 0
    located = await ward.officer.LocateUnit(gis_pb2.LocateUnitRequest(point=ward.point(-450, -250)))
    assert located.unit_id == ward.city.group


async def test_nothing_is_imported_into_a_group_merged_away(ward: Ward) -> None:
    """Once the registry merges a group into another, its map is drawn as the other's: an
    import into it, of any layer, is refused with nothing written."""
    city = ward.city
    await ward.merge_other_group()
    store = ward.service.store
    before = await store.features.count_documents({"source_unit": city.other_group})
    drawings = {
        gis_pb2.LAYER_BUILDING: polygon_feature(ward.box(100, 100, 120, 115), "b", storeys=2),
        gis_pb2.LAYER_HYDRANT: point_feature(ward.at(200, 0), "h", kind="hydrant"),
        gis_pb2.LAYER_ALLEY: line_feature([ward.at(100, 0), ward.at(300, 0)], "a", width_m=3),
        gis_pb2.LAYER_BOUNDARY: polygon_feature(
            ward.box(0, -400, 600, 400), "g18", unit_id=city.other_group
        ),
    }
    for layer, feature in drawings.items():
        details = await refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            ward.import_features(layer, [feature], unit_id=city.other_group),
        )
        assert details == (
            f"unit_id: {city.other_group} is not a known unit any more "
            f"(it was merged into {city.group})"
        )
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        ward.officer.CreateImportUpload(
            gis_pb2.CreateImportUploadRequest(unit_id=city.other_group, file_name="map.dxf")
        ),
    )
    assert await store.features.count_documents({"source_unit": city.other_group}) == before
    # The group it went into is drawn as before.
    done = await ward.import_features(
        gis_pb2.LAYER_HYDRANT, [drawings[gis_pb2.LAYER_HYDRANT]], unit_id=city.group
    )
    assert done.created == 1


async def test_a_footprint_is_its_area_on_the_ellipsoid(ward: Ward) -> None:
    """100 m by 100 m along the ellipsoid: a sphere's degree of latitude, 0.5% longer than the
    ellipsoid's here, would make it 50 m² too small."""
    geod = Geod(ellps="WGS84")
    lon, lat = ward.at(-300, -300)
    sw = (lon, lat)
    se = geod.fwd(lon, lat, 90, 100.0)[:2]
    ne = geod.fwd(*se, 0, 100.0)[:2]
    nw = geod.fwd(lon, lat, 0, 100.0)[:2]
    ring = [[round(lon, 7), round(lat, 7)] for lon, lat in (sw, se, ne, nw, sw)]
    square = polygon_feature(ring, "square", storeys=1)
    assert (await ward.import_features(gis_pb2.LAYER_BUILDING, [square])).created == 1
    truth = abs(geod.geometry_area_perimeter(shape(square["geometry"]))[0])
    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_BUILDING])
    (building,) = listed["features"]
    assert building["properties"]["footprint_m2"] == pytest.approx(truth, abs=1.0)


async def test_a_groups_boundary_reaching_into_a_neighbouring_wards_group_is_refused(
    ward: Ward,
) -> None:
    """Across the line between two wards, as between two groups of one: a place there would lie
    in two groups, each of its own ward."""
    store = ward.service.store
    neighbour = ward.city.district + ".neighbour" + ward.city.ward.rsplit(".", 1)[-1]
    across = neighbour + ".g1"
    # As the registry's events leave a ward east of this one (short of the next test's ward),
    # with a group along the line.
    await store.units.insert_many(
        [
            {"_id": neighbour, "kind": 3, "name": "Phường bên", "active": True},
            {"_id": across, "kind": 4, "name": "Tổ 1", "active": True},
        ]
    )
    district = ward.caller(Role.DISTRICT_OFFICER, ward.city.district)
    outlines = [
        polygon_feature(ward.box(600, -400, 1200, 400), "ward", unit_id=neighbour),
        polygon_feature(ward.box(600, -400, 1000, 400), "g1", unit_id=across),
    ]
    done = await ward.import_features(
        gis_pb2.LAYER_BOUNDARY, outlines, caller=district, unit_id=ward.city.district
    )
    assert (done.created, list(done.rejected)) == (2, [])
    # 40 m into the neighbouring ward's group, along the whole edge: within the margin past
    # this ward's boundary that two surveys of it may disagree by, but a tenth of that group.
    astray = polygon_feature(ward.box(0, -400, 640, 400), "astray", unit_id=ward.city.other_group)
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, [astray])
    assert done.updated == 0
    [refused] = done.rejected
    assert refused.message.startswith(f"geometry: overlaps the boundary of {across} by ")
    located = await ward.officer.LocateUnit(gis_pb2.LocateUnitRequest(point=ward.point(750, 0)))
    assert located.unit_id == across


async def test_a_boundary_overlapping_a_sibling_units_by_more_than_a_sliver_is_refused(
    ward: Ward,
) -> None:
    """The fixture's two groups share the line east 0. A point where two groups' boundaries
    overlap would lie in both: a ticket there could go to either group, a census count it
    twice. Two surveys of a shared edge never quite agree, so a sliver passes."""
    store = ward.service.store
    group, other = ward.city.group, ward.city.other_group
    before = await store.boundary(group)
    # 100 m into the neighbour along the whole edge: 80,000 m², a sixth of the group.
    astray = polygon_feature(ward.box(-600, -400, 100, 400), "astray", unit_id=group)
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, [astray])
    assert done.updated == 0
    [refused] = done.rejected
    assert refused.source_id == "astray"
    overlaps = f"geometry: overlaps the boundary of {other} by "
    assert refused.message.startswith(overlaps)
    square_metres = int(refused.message.removeprefix(overlaps).split(" m²")[0].replace(",", ""))
    assert 79_000 < square_metres < 81_000  # the fixture's metres are a sphere's
    assert await store.boundary(group) == before
    # 3 m past the line (2,400 m², 0.5% of the group): the survey's sliver.
    sliver = polygon_feature(ward.box(-600, -400, 3, 400), "survey", unit_id=group)
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, [sliver])
    assert (done.updated, list(done.rejected)) == (1, [])
    # Both redrawn in one file, the line moved east together: the file's own outline of the
    # neighbour counts, not the stored one; a third outline overlapping both is refused.
    moved = [
        polygon_feature(ward.box(-600, -400, 100, 400), "g17", unit_id=group),
        polygon_feature(ward.box(100, -400, 600, 400), "g18", unit_id=other),
    ]
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, moved)
    assert (done.updated, list(done.rejected)) == (2, [])
    crossing = polygon_feature(
        ward.box(-200, -100, 300, 100), "new", unit_id=ward.city.ward + ".g99"
    )
    await store.units.insert_one({"_id": ward.city.ward + ".g99", "kind": 4, "active": True})
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, [crossing])
    assert done.created == 0
    assert done.rejected[0].message.startswith("geometry: overlaps the boundary of ")


async def test_a_groups_houses_and_hydrants_stand_in_it_while_its_alleys_run_on(
    ward: Ward,
) -> None:
    """A street runs on past the group, and the fire route needs it; a house or hydrant 100 m
    inside the neighbouring group is misplaced there, where that group's leader could not
    remove it. One just across the line (two surveys of the shared edge) is kept."""
    group = ward.city.group  # the west half: its east edge runs north-south through the centre
    houses = [
        polygon_feature(ward.box(80, 0, 100, 15), "next-door", storeys=2),
        polygon_feature(ward.box(-10, 100, 15, 115), "on-the-line", storeys=2),
    ]
    done = await ward.import_features(
        gis_pb2.LAYER_BUILDING, houses, caller=ward.leader, unit_id=group
    )
    assert done.created == 1
    assert [(e.source_id, e.message) for e in done.rejected] == [
        ("next-door", f"geometry: lies 100 m outside {group}'s boundary")
    ]
    hydrants = [point_feature(ward.at(100, 50), "next-door", kind="hydrant")]
    done = await ward.import_features(
        gis_pb2.LAYER_HYDRANT, hydrants, caller=ward.leader, unit_id=group
    )
    assert done.created == 0 and [e.source_id for e in done.rejected] == ["next-door"]
    street = [line_feature([ward.at(-300, 50), ward.at(300, 50)], "street", width_m=6)]
    done = await ward.import_features(
        gis_pb2.LAYER_ALLEY, street, caller=ward.leader, unit_id=group
    )
    assert (done.created, list(done.rejected)) == (1, [])
    assert await ward.service.store.features.count_documents({"source_unit": group}) == 2


async def test_property_names_in_capitals_as_shapefiles_give_them_count(ward: Ward) -> None:
    """A layer exported from a shapefile (GDAL keeps the DBF's field names) names its
    attributes STOREYS or Width_M: a five-storey house is not stored as one storey."""
    house = polygon_feature(
        ward.box(-500, 100, -480, 115), "h", STOREYS=5, USE="school", NAME="Trường Tiểu học"
    )
    done = await ward.import_features(gis_pb2.LAYER_BUILDING, [house])
    assert (done.created, list(done.rejected)) == (1, [])
    alley = line_feature([ward.at(-500, 0), ward.at(-300, 0)], "k", Width_M="3,5")
    done = await ward.import_features(gis_pb2.LAYER_ALLEY, [alley])
    assert (done.created, list(done.rejected)) == (1, [])
    listed = await ward.features(
        unit_id=ward.city.ward, layers=[gis_pb2.LAYER_BUILDING, gis_pb2.LAYER_ALLEY]
    )
    kept = {f["properties"]["layer"]: f["properties"] for f in listed["features"]}
    assert (kept["building"]["storeys"], kept["building"]["use"]) == (5, "school")
    assert kept["building"]["name"] == "Trường Tiểu học"
    assert kept["alley"]["width_m"] == 3.5
    water = [
        point_feature(ward.at(-450, 50), "w", KIND="Well"),
        point_feature(ward.at(-400, 50), "h", Kind="HYDRANT"),
    ]
    done = await ward.import_features(gis_pb2.LAYER_HYDRANT, water)
    assert (done.created, list(done.rejected)) == (2, [])
    listed = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_HYDRANT])
    assert sorted(f["properties"]["kind"] for f in listed["features"]) == ["hydrant", "well"]


async def test_a_groups_outline_lies_within_its_wards(ward: Ward) -> None:
    """An outline 300 m past its ward's lies in the next ward: a complaint there would go to
    this group, and the next ward's own group, drawn later, would be refused for overlapping
    it, by a ward that cannot redraw it. Where two surveys of the edge disagree, it passes."""
    group = ward.city.group
    reaching = polygon_feature(ward.box(-600, -400, 0, 700), "g17", unit_id=group)
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, [reaching])
    [refusal] = done.rejected
    assert refusal.message.endswith(f"m outside {ward.city.ward}'s boundary"), refusal.message
    surveyed = polygon_feature(ward.box(-620, -410, 0, 400), "g17", unit_id=group)
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, [surveyed])
    assert (done.updated, list(done.rejected)) == (1, [])


async def test_a_drawing_named_in_vietnamese_is_uploaded_and_imported(ward: Ward) -> None:
    """Wards name their files as they speak: the name goes into the object's key unmarked."""
    features = [point_feature(ward.at(-400, -200), "h1", kind="hydrant")]
    body = json.dumps({"type": "FeatureCollection", "features": features}).encode()
    upload = await ward.officer.CreateImportUpload(
        gis_pb2.CreateImportUploadRequest(
            unit_id=ward.city.ward,
            file_name="Trụ nước Đà Nẵng (2024).GeoJSON",
            size_bytes=len(body),
        )
    )
    assert upload.object_key.endswith("-Tru-nuoc-Da-Nang-2024-.GeoJSON"), upload.object_key
    await put(upload.upload_url, body, "")
    response = await ward.officer.ImportLayer(
        gis_pb2.ImportLayerRequest(
            request_id=rid(),
            unit_id=ward.city.ward,
            layer=gis_pb2.LAYER_HYDRANT,
            format=gis_pb2.SOURCE_FORMAT_GEOJSON,
            object_key=upload.object_key,
        )
    )
    assert response.created == 1
    for name in ("tổ 17/../bản đồ.dxf", "bản đồ.pdf", "x" * 100 + ".dxf", "   "):
        details = await refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            ward.officer.CreateImportUpload(
                gis_pb2.CreateImportUploadRequest(unit_id=ward.city.ward, file_name=name)
            ),
        )
        assert details.startswith("file_name"), details


async def test_a_request_id_reused_for_another_file_at_once_writes_only_the_first(
    ward: Ward,
) -> None:
    """Two files sent at once under one request_id (a form submitted again with another file
    while the first was still importing): one is imported, the other refused with nothing of
    it written."""
    request_id = rid()

    def sending(name: str, east_m: float) -> Awaitable[gis_pb2.ImportLayerResponse]:
        hydrant = point_feature(ward.at(east_m, -250), name, kind="hydrant")
        sent: Awaitable[gis_pb2.ImportLayerResponse] = ward.officer.ImportLayer(
            gis_pb2.ImportLayerRequest(
                request_id=request_id,
                unit_id=ward.city.ward,
                layer=gis_pb2.LAYER_HYDRANT,
                format=gis_pb2.SOURCE_FORMAT_GEOJSON,
                content=json.dumps(hydrant).encode(),
            )
        )
        return sent

    answers = await asyncio.gather(
        *(sending(f"h{i}", -500 + 40 * i) for i in range(4)), return_exceptions=True
    )
    imported = [a for a in answers if isinstance(a, gis_pb2.ImportLayerResponse)]
    refusals = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(imported) == 1 and imported[0].created == 1, answers
    assert [r.code() for r in refusals] == [grpc.StatusCode.FAILED_PRECONDITION] * 3, answers
    stored = await ward.service.store.features.count_documents(
        {"layer": "hydrant", "source_unit": ward.city.ward}
    )
    assert stored == 1

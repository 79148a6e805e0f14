"""The width-limited fire access route on a small network with a known answer, the hydrants
along it (in metres on the ellipsoid), and the rendered map (SVG and PNG) with the route drawn on
it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import signal
import stat
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from civic.gis.v1 import gis_pb2
from PIL import Image
from pyproj import Geod

from infra.local import REPO_ROOT
from services import cli
from services.common.auth import Role
from services.gis import geometry, routing
from tests.conftest import token
from tests.gis.conftest import Ward, line_feature, point_feature, polygon_feature
from tests.gis.test_imports import refused
from tests.gis.test_registry_view import located
from tests.registry_fixtures import new_household

SVG = "{http://www.w3.org/2000/svg}"
GEOD = Geod(ellps="WGS84")


def length(ward: Ward, spots: Sequence[tuple[float, float]]) -> float:
    """The geodesic length of the way through these spots (metres east, north of the centre)."""
    points = [ward.at(*spot) for spot in spots]
    return float(GEOD.line_length([p[0] for p in points], [p[1] for p in points]))


async def draw_network(ward: Ward) -> None:
    """The street enters at E (-550, 0) and runs 150 m to A (-400, 0), 8 m wide. From A a
    narrow alley (2.5 m) goes straight 300 m east to D (-100, 0); a wide one (4 m) goes round:
    150 m north to P, 300 m east to Q, 150 m south to D."""
    a, d = ward.at(-400, 0), ward.at(-100, 0)
    alleys = [
        line_feature([ward.at(-550, 0), a], "street", width_m=8),
        line_feature([a, d], "narrow", width_m=2.5),
        line_feature([a, ward.at(-400, 150), ward.at(-100, 150), d], "wide", width_m=4),
    ]
    assert (await ward.import_features(gis_pb2.LAYER_ALLEY, alleys)).created == 3
    hydrants = [
        point_feature(ward.at(-420, 10), "by-the-street", name="TCH-A"),
        point_feature(ward.at(-300, 120), "on-the-wide-way", name="TCH-B"),
        point_feature(ward.at(-100, -200), "too-far", name="TCH-C"),
    ]
    assert (await ward.import_features(gis_pb2.LAYER_HYDRANT, hydrants)).created == 3
    houses = [
        polygon_feature(ward.box(-110, -40, -90, -25), "target", storeys=4),
        polygon_feature(ward.box(-300, 20, -280, 40), "other", storeys=1),
    ]
    assert (await ward.import_features(gis_pb2.LAYER_BUILDING, houses)).created == 2


async def test_the_route_uses_only_alleys_wide_enough(ward: Ward) -> None:
    await draw_network(ward)
    home = await new_household(ward.city.leader, ward.city.group, location=ward.point(-100, -20))
    household_id = home.household.household_id
    await located(ward, household_id, ward.at(-100, -20))

    def request(width: float) -> gis_pb2.PlanFireRouteRequest:
        return gis_pb2.PlanFireRouteRequest(
            entry=ward.point(-550, 0), household_id=household_id, min_width_m=width
        )

    # A truck (3.5 m) goes round: 150 + 150 + 300 + 150 m, then 20 m from D to the house.
    truck = await ward.leader.PlanFireRoute(request(3.5))
    way_round = [(-550, 0), (-400, 0), (-400, 150), (-100, 150), (-100, 0), (-100, -20)]
    assert truck.length_m == pytest.approx(length(ward, way_round), abs=0.05)
    assert truck.length_m == pytest.approx(770, rel=0.005)
    assert [(h.hydrant.name, round(h.along_m)) for h in truck.hydrants[:1]] == [("TCH-A", 130)]
    # TCH-B is passed 100 m along P-Q: along the ellipsoid, as the route's length is measured
    # (the ward's metres north here are 0.6% short of it).
    assert truck.hydrants[1].hydrant.name == "TCH-B"
    passed = [*way_round[:3], (-300, 150)]
    assert truck.hydrants[1].along_m == pytest.approx(length(ward, passed), abs=0.1)
    assert round(truck.hydrants[1].hydrant.distance_m) == 30
    # A motor pump (2 m) takes the narrow alley: 150 + 300 + 20 m; TCH-B is 120 m off it.
    pump = await ward.leader.PlanFireRoute(request(2.0))
    straight = [(-550, 0), (-400, 0), (-100, 0), (-100, -20)]
    assert pump.length_m == pytest.approx(length(ward, straight), abs=0.05)
    assert [h.hydrant.name for h in pump.hydrants] == ["TCH-A"]
    line = json.loads(pump.geojson)["features"][0]["geometry"]
    assert line["type"] == "LineString"
    assert line["coordinates"][0] == ward.at(-550, 0)
    assert line["coordinates"][-1] == ward.at(-100, -20)

    # Only the street is 8 m wide: the house is cut off for anything that big.
    details = await refused(
        grpc.StatusCode.FAILED_PRECONDITION, ward.leader.PlanFireRoute(request(5))
    )
    assert "destination" in details
    details = await refused(
        grpc.StatusCode.FAILED_PRECONDITION, ward.leader.PlanFireRoute(request(9))
    )
    assert "no alley at least 9 m wide" in details

    # To a point rather than a household: anyone may ask; a household only its officials.
    resident = ward.caller(Role.RESIDENT, ward.city.group, household_id)
    to_point = await resident.PlanFireRoute(
        gis_pb2.PlanFireRouteRequest(
            entry=ward.point(-550, 0), destination=ward.point(-100, 150), min_width_m=3
        )
    )
    assert to_point.length_m == pytest.approx(length(ward, way_round[:4]), abs=0.05)
    await refused(grpc.StatusCode.NOT_FOUND, resident.PlanFireRoute(request(2)))
    await refused(grpc.StatusCode.NOT_FOUND, ward.other_leader.PlanFireRoute(request(2)))
    for bad, field in (
        (gis_pb2.PlanFireRouteRequest(household_id=household_id), "entry"),
        (gis_pb2.PlanFireRouteRequest(entry=ward.point(-550, 0)), "destination"),
        (
            gis_pb2.PlanFireRouteRequest(
                entry=ward.point(-550, 0), household_id=household_id, min_width_m=-1
            ),
            "min_width_m",
        ),
    ):
        details = await refused(grpc.StatusCode.INVALID_ARGUMENT, ward.leader.PlanFireRoute(bad))
        assert details.startswith(field), details


async def test_a_rendered_map_of_the_group(ward: Ward) -> None:
    await draw_network(ward)
    route = gis_pb2.PlanFireRouteRequest(
        entry=ward.point(-550, 0), destination=ward.point(-100, -20), min_width_m=3.5
    )
    svg = await ward.leader.RenderMap(
        gis_pb2.RenderMapRequest(
            unit_id=ward.city.group, format=gis_pb2.IMAGE_FORMAT_SVG, width_px=800, route=route
        )
    )
    assert svg.content_type == "image/svg+xml" and svg.width_px == 800
    root = ElementTree.fromstring(svg.content)
    assert root.tag == f"{SVG}svg" and root.get("width") == "800"
    groups = {g.get("id"): g for g in root.iter(f"{SVG}g")}
    storeys = sorted(int(p.get("data-storeys", 0)) for p in groups["buildings"])
    assert storeys == [1, 4]
    fills = {p.get("data-storeys"): p.get("fill") for p in groups["buildings"]}
    assert fills["1"] != fills["4"]  # shaded by storeys
    assert len(list(groups["hydrants"])) == 3
    assert len(list(groups["alleys"])) == 3
    assert root.find(f"{SVG}polyline[@id='route']") is not None
    assert "Tổ dân phố 17" in (root.findtext(f"{SVG}title") or "")

    png = await ward.leader.RenderMap(
        gis_pb2.RenderMapRequest(unit_id=ward.city.group, format=gis_pb2.IMAGE_FORMAT_PNG)
    )
    image = Image.open(io.BytesIO(png.content))
    assert png.content_type == "image/png" and image.format == "PNG"
    assert image.size == (1200, png.height_px)
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 16) or []}
    assert (0xD7, 0x19, 0x1C) in colours  # hydrants
    # The PNG draws the same scene as the SVG: the four-storey house is where the SVG has it,
    # in its shade.
    same = await ward.leader.RenderMap(
        gis_pb2.RenderMapRequest(unit_id=ward.city.group, format=gis_pb2.IMAGE_FORMAT_SVG)
    )
    (house,) = [
        p
        for p in ElementTree.fromstring(same.content).iter(f"{SVG}polygon")
        if p.get("data-storeys") == "4"
    ]
    corners = [tuple(map(float, xy.split(","))) for xy in (house.get("points") or "").split()]
    middle = (
        round(sum(x for x, _ in corners[:4]) / 4),
        round(sum(y for _, y in corners[:4]) / 4),
    )
    red, green, blue = image.convert("RGB").getpixel(middle)  # type: ignore[misc]
    assert f"#{red:02x}{green:02x}{blue:02x}" == house.get("fill")

    for bad, field in (
        (gis_pb2.RenderMapRequest(unit_id=ward.city.group), "format"),
        (
            gis_pb2.RenderMapRequest(
                unit_id=ward.city.group, format=gis_pb2.IMAGE_FORMAT_PNG, width_px=5000
            ),
            "width_px",
        ),
        (gis_pb2.RenderMapRequest(format=gis_pb2.IMAGE_FORMAT_PNG), "unit_id"),
    ):
        details = await refused(grpc.StatusCode.INVALID_ARGUMENT, ward.leader.RenderMap(bad))
        assert details.startswith(field), details


async def test_a_group_is_pictured_at_its_own_size_though_a_street_runs_on_beyond_it(
    ward: Ward,
) -> None:
    """The street through the west group runs on across the ward: the picture is of the group,
    its outline filling the width, with the street cut at the picture's edge."""
    street = line_feature([ward.at(-600, 0), ward.at(1000, 0)], "through", width_m=8)
    assert (await ward.import_features(gis_pb2.LAYER_ALLEY, [street])).created == 1
    svg = await ward.leader.RenderMap(
        gis_pb2.RenderMapRequest(
            unit_id=ward.city.group, format=gis_pb2.IMAGE_FORMAT_SVG, width_px=1000
        )
    )
    root = ElementTree.fromstring(svg.content)
    (boundaries,) = [g for g in root.iter(f"{SVG}g") if g.get("id") == "boundaries"]
    (outline,) = list(boundaries)
    xs = [float(xy.split(",")[0]) for xy in (outline.get("points") or "").split()]
    # 5% margins either side: the group's 600 m span the 900 pixels between them.
    assert min(xs) == pytest.approx(50, abs=1) and max(xs) == pytest.approx(950, abs=1)


async def test_civic_map_writes_the_groups_picture_to_a_file(
    ward: Ward, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await draw_network(ward)
    leader = token(Role.GROUP_LEADER, ward.city.group)
    common = ["--target", ward.target, "--token", leader]

    assert await cli.run(["map", ward.city.group, str(tmp_path / "g.png"), *common]) == 0
    image = Image.open(tmp_path / "g.png")
    assert image.format == "PNG" and image.size[0] == 1200
    assert (
        await cli.run(["map", ward.city.group, str(tmp_path / "g.svg"), "--width", "600", *common])
        == 0
    )
    root = ElementTree.parse(tmp_path / "g.svg").getroot()
    assert root.tag == f"{SVG}svg" and root.get("width") == "600"
    assert "g.svg: 600 x" in capsys.readouterr().out

    # Errors are one line and write nothing: a format it cannot tell, a unit with no map.
    assert await cli.run(["map", ward.city.group, str(tmp_path / "g.gif"), *common]) == 2
    nowhere = ward.city.group + ".none"
    assert await cli.run(["map", nowhere, str(tmp_path / "none.png"), *common]) == 1
    err = capsys.readouterr().err
    assert "must end in .svg or .png" in err and "map failed: NOT_FOUND" in err
    assert "Traceback" not in err and not (tmp_path / "none.png").exists()


def small_files() -> None:
    """A full disk, as a child process meets it: a write past 2 kB fails (and only fails)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


async def test_civic_map_replaces_a_file_whole_or_not_at_all(ward: Ward, tmp_path: Path) -> None:
    """A write failing half-way leaves last week's map as it was, not a truncated picture."""
    await draw_network(ward)
    target = tmp_path / "g.png"
    target.write_bytes(b"the map printed last week")
    leader = token(Role.GROUP_LEADER, ward.city.group)
    common = ["--target", ward.target, "--token", leader]

    done = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli", "map", ward.city.group, str(target), *common),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=small_files,
    )
    out, err = await done.communicate()

    assert (done.returncode, out) == (1, b""), err
    assert err.decode() == f"error: {target}: File too large\n"
    assert target.read_bytes() == b"the map printed last week"
    assert os.listdir(tmp_path) == ["g.png"]


async def test_civic_map_onto_a_link_writes_the_file_it_names_keeping_its_permissions(
    ward: Ward, tmp_path: Path
) -> None:
    """ "latest.png" linking to this week's print: the link stays, the print is redrawn, and
    whoever could not read it before cannot now."""
    await draw_network(ward)
    printed = tmp_path / "prints" / "g.png"
    printed.parent.mkdir()
    printed.write_bytes(b"the map printed last week")
    printed.chmod(0o640)
    latest = tmp_path / "latest.png"
    latest.symlink_to(printed)
    leader = token(Role.GROUP_LEADER, ward.city.group)

    status = await cli.run(
        ["map", ward.city.group, str(latest), "--target", ward.target, "--token", leader]
    )

    assert status == 0
    assert latest.is_symlink() and printed.read_bytes().startswith(b"\x89PNG")
    assert stat.S_IMODE(printed.stat().st_mode) == 0o640
    assert sorted(os.listdir(printed.parent)) == ["g.png"]


def test_distances_along_and_beside_a_route_are_metres_on_the_ellipsoid() -> None:
    """At 16°N a degree of latitude is 110.7 km: a sphere's 111.2 km would put a hydrant at the
    end of a 2 km route 10 m beyond it, and one 99.7 m off a route more than 100 m off it."""
    start = (108.2, 16.05)
    north = GEOD.fwd(*start, 0, 2000.0)[:2]
    up = routing.Route([start, north], geometry.line_length_m([start, north]))
    (at_end,) = routing.hydrants_along(up, [hydrant(north)], 100.0)
    assert at_end.along_m == pytest.approx(2000.0, abs=0.5)
    east = GEOD.fwd(*start, 90, 1000.0)[:2]
    beside = GEOD.fwd(*GEOD.fwd(*start, 90, 500.0)[:2], 0, 99.7)[:2]
    across = routing.Route([start, east], geometry.line_length_m([start, east]))
    (off,) = routing.hydrants_along(across, [hydrant(beside)], 100.0)
    assert (round(off.along_m), round(off.offset_m, 1)) == (500, 99.7)


def hydrant(at: tuple[float, float]) -> dict[str, Any]:
    return {"geometry": {"type": "Point", "coordinates": list(at)}, "properties": {}}


async def test_a_groups_own_hydrant_across_the_street_from_it_is_on_its_picture(
    ward: Ward,
) -> None:
    """The group's leader drew the hydrant across the street along the group's north edge, 45 m
    outside its outline (a hydrant may stand so): the printed map shows it, in the picture."""
    across = point_feature(ward.at(-300, 445), "across", kind="hydrant", name="TCH Bắc")
    done = await ward.import_features(
        gis_pb2.LAYER_HYDRANT, [across], caller=ward.leader, unit_id=ward.city.group
    )
    assert (done.created, list(done.rejected)) == (1, [])
    svg = await ward.leader.RenderMap(
        gis_pb2.RenderMapRequest(unit_id=ward.city.group, format=gis_pb2.IMAGE_FORMAT_SVG)
    )
    root = ElementTree.fromstring(svg.content)
    (hydrants,) = [g for g in root.iter(f"{SVG}g") if g.get("id") == "hydrants"]
    spots = [(float(c.get("cx", -1)), float(c.get("cy", -1))) for c in hydrants]
    assert len(spots) == 1
    ((x, y),) = spots
    assert 0 < x < svg.width_px and 0 < y < svg.height_px, (x, y, svg.height_px)

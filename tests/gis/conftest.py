"""The GIS service in-process beside the registry (whose events give it units and household
points, and whose GetHousehold gives it names), and a ward mapped for each test."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pytest
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2, gis_pb2_grpc
from civic.registry.v1 import registry_pb2
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from services.common.auth import Role
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.gis.main import GisService
from services.registry.main import RegistryService
from tests.conftest import Clock, token
from tests.kafka_reader import eventually
from tests.registry_fixtures import City, next_to_registry, rid

__all__ = ["rid"]

# Each test maps its ward somewhere else, so that areas never overlap across the session.
_places = itertools.count()
METRES_PER_DEGREE = 111_320.0


@pytest.fixture(scope="session")
async def gis_service(
    settings: Settings,
    registry: RegistryService,
    session_clock: Clock,
    span_processor: SimpleSpanProcessor,
) -> AsyncIterator[GisService]:
    service = GisService(
        next_to_registry(settings, registry),
        clock=session_clock,
        span_processor=span_processor,
    )
    await service.start()
    yield service
    await service.stop()


class GisCaller:
    def __init__(self, target: str, bearer: str, purpose: str = "") -> None:
        self.channel = civic_channel(target, bearer, purpose)
        self.stub = gis_pb2_grpc.GisServiceStub(self.channel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)


@dataclass(eq=False)
class Ward:
    """A city from the registry's fixture, its ward and two groups drawn around `centre`:
    the ward is 1,200 m east-west by 800 m north-south, the group the west half, the other
    group the east half."""

    city: City
    centre: tuple[float, float]  # longitude, latitude
    target: str
    service: GisService

    async def merge_other_group(self) -> None:
        """The ward merges its other group into the group, and the GIS service hears of it."""
        await self.city.ward_officer.MergeGroups(
            registry_pb2.MergeGroupsRequest(
                request_id=rid(),
                source_unit_id=self.city.other_group,
                target_unit_id=self.city.group,
            )
        )

        async def retired() -> bool:
            unit = await self.service.store.unit(self.city.other_group)
            return unit is not None and not unit["active"]

        await eventually(retired, what="the GIS service hears of the merge")

    def at(self, east_m: float, north_m: float) -> list[float]:
        """[longitude, latitude] of the spot east_m and north_m from the centre."""
        lon0, lat0 = self.centre
        return [
            round(lon0 + east_m / (METRES_PER_DEGREE * math.cos(math.radians(lat0))), 7),
            round(lat0 + north_m / METRES_PER_DEGREE, 7),
        ]

    def point(self, east_m: float, north_m: float) -> types_pb2.GeoPoint:
        lon, lat = self.at(east_m, north_m)
        return types_pb2.GeoPoint(latitude=lat, longitude=lon)

    def box(self, west: float, south: float, east: float, north: float) -> list[list[float]]:
        corners = [(west, south), (east, south), (east, north), (west, north), (west, south)]
        return [self.at(x, y) for x, y in corners]

    def caller(
        self, role: Role, scope: str, household_id: str = "", purpose: str = ""
    ) -> GisCaller:
        return GisCaller(self.target, token(role, scope, household_id), purpose)

    @cached_property
    def officer(self) -> GisCaller:
        return self.caller(Role.WARD_OFFICER, self.city.ward, purpose="fire drill")

    @cached_property
    def leader(self) -> GisCaller:
        return self.caller(Role.GROUP_LEADER, self.city.group, purpose="evacuation list")

    @cached_property
    def other_leader(self) -> GisCaller:
        return self.caller(Role.GROUP_LEADER, self.city.other_group)

    async def import_features(
        self,
        layer: gis_pb2.Layer.ValueType,
        features: list[dict[str, Any]],
        caller: GisCaller | None = None,
        unit_id: str = "",
        **fields: Any,
    ) -> gis_pb2.ImportLayerResponse:
        content = json.dumps({"type": "FeatureCollection", "features": features}).encode()
        response: gis_pb2.ImportLayerResponse = await (caller or self.officer).ImportLayer(
            gis_pb2.ImportLayerRequest(
                request_id=rid(),
                unit_id=unit_id or self.city.ward,
                layer=layer,
                format=gis_pb2.SOURCE_FORMAT_GEOJSON,
                content=content,
                **fields,
            )
        )
        return response

    async def features(self, caller: GisCaller | None = None, **fields: Any) -> dict[str, Any]:
        """Every page of a listing, as one FeatureCollection."""
        collected: list[dict[str, Any]] = []
        token_ = ""
        while True:
            response = await (caller or self.officer).ListFeatures(
                gis_pb2.ListFeaturesRequest(
                    **fields, page=types_pb2.PageRequest(page_size=50, page_token=token_)
                )
            )
            page = json.loads(response.geojson)
            assert page["type"] == "FeatureCollection"
            assert len(page["features"]) == response.count
            collected += page["features"]
            token_ = response.next_page_token
            if not token_:
                return {"type": "FeatureCollection", "features": collected}


def polygon_feature(ring: list[list[float]], fid: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": properties,
    }


def point_feature(at: list[float], fid: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": "Point", "coordinates": at},
        "properties": properties,
    }


def line_feature(points: list[list[float]], fid: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": "LineString", "coordinates": points},
        "properties": properties,
    }


@pytest.fixture
async def ward(city: City, gis_service: GisService) -> Ward:
    """The registry's tree, known to the GIS service, with the three boundaries imported."""
    store = gis_service.store

    async def known() -> bool:
        # Unit events travel on several partitions: wait for each unit.
        for unit in (city.ward, city.group, city.other_group):
            if await store.unit(unit) is None:
                return False
        return True

    await eventually(known, what="the GIS service knows the registry's new units")
    index = next(_places)
    centre = (108.05 + 0.02 * (index % 10), 15.90 + 0.02 * (index // 10))
    ward = Ward(city, centre, f"127.0.0.1:{gis_service.port}", gis_service)
    boundaries = [
        polygon_feature(ward.box(-600, -400, 600, 400), "ward", unit_id=city.ward, name="Phường"),
        polygon_feature(ward.box(-600, -400, 0, 400), "g17", unit_id=city.group, name="Tổ 17"),
        polygon_feature(ward.box(0, -400, 600, 400), "g18", unit_id=city.other_group),
    ]
    done = await ward.import_features(gis_pb2.LAYER_BOUNDARY, boundaries)
    assert (done.created, list(done.rejected)) == (3, [])
    return ward

"""Which unit a reported place lies in, asked of the GIS service through its gRPC API
(LocateUnit). The tickets service calls as a service, with a short-lived token. The map helps
routing and is never a condition of filing: a GIS that does not answer within LOCATE_TIMEOUT_S
leaves the ticket with the group it would have had without a place, and the outage is logged.

Most reports are of a place in the reporter's own group: the outline of that group, fetched
from GIS and kept for OUTLINE_SECONDS, answers those without a call. A boundary redrawn
meanwhile takes that long to count for them."""

from __future__ import annotations

import json
import logging
import math
import time

import grpc
import shapely
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2, gis_pb2_grpc
from shapely import Point
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from services.common.auth import SERVICE_TOKEN_SECONDS, service_token
from services.common.telemetry import current_trace_headers

log = logging.getLogger(__name__)

# A resident waits on this while filing: a map that answers later than this is not waited for.
LOCATE_TIMEOUT_S = 0.4
# While GIS stays out of reach, the warning is repeated this often (with how many places went
# unlocated meanwhile), not once per ticket.
WARN_EVERY_S = 60.0
OUTLINE_SECONDS = 60.0
# A GIS back after an outage is tried again within this, not after gRPC's default two minutes.
MAX_RECONNECT_BACKOFF_MS = 5_000


class GisLocator:
    def __init__(self, target: str, auth_secret: str) -> None:
        self._target = target
        self._secret = auth_secret
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        )
        self._stub = gis_pb2_grpc.GisServiceStub(self._channel)
        self._tokens: dict[str, tuple[str, float]] = {}
        self._unanswered = 0
        self._warned_at = -math.inf
        # A group's outline (None: it has none on the map), and when it was fetched.
        self._outlines: dict[str, tuple[BaseGeometry | None, float]] = {}

    def _token(self, city: str) -> str:
        token, until = self._tokens.get(city, ("", 0.0))
        now = time.time()
        if until - now < SERVICE_TOKEN_SECONDS / 2:
            token = service_token(self._secret, "tickets", city)
            self._tokens[city] = (token, now + SERVICE_TOKEN_SECONDS)
        return token

    def _metadata(self, unit_id: str) -> list[tuple[str, str]]:
        city = unit_id.split(".")[0]
        return [("authorization", f"Bearer {self._token(city)}"), *current_trace_headers().items()]

    async def unit_at(self, point: types_pb2.GeoPoint, near: str) -> str | None:
        """The most specific unit whose boundary holds the point ("" where none does), or None
        when GIS did not answer in time; `near`, the group the ticket has without a place, when
        its outline holds the point."""
        outline = await self._outline(near)
        if outline is not None and outline.covers(Point(point.longitude, point.latitude)):
            return near
        metadata = self._metadata(near)
        try:
            response: gis_pb2.LocateUnitResponse = await self._stub.LocateUnit(
                gis_pb2.LocateUnitRequest(point=point),
                metadata=metadata,
                timeout=LOCATE_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            self._unanswered += 1
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                log.warning(
                    "GIS at %s did not locate a reported place (%s: %s); %d routed by household "
                    "or named group instead since the last warning",
                    self._target,
                    error.code().name,
                    error.details(),
                    self._unanswered,
                )
                self._warned_at, self._unanswered = now, 0
            return None
        if self._warned_at > -math.inf:
            log.info(
                "GIS at %s locates reported places again (%d more went unlocated)",
                self._target,
                self._unanswered,
            )
            self._warned_at, self._unanswered = -math.inf, 0
        return response.unit_id

    async def _outline(self, group: str) -> BaseGeometry | None:
        """The group's outline on the map, as fetched in the last OUTLINE_SECONDS."""
        now = time.monotonic()
        outline, fetched = self._outlines.get(group, (None, -math.inf))
        if now - fetched < OUTLINE_SECONDS:
            return outline
        try:
            response: gis_pb2.ListFeaturesResponse = await self._stub.ListFeatures(
                gis_pb2.ListFeaturesRequest(layers=[gis_pb2.LAYER_BOUNDARY], unit_id=group),
                metadata=self._metadata(group),
                timeout=LOCATE_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: not on the map yet
                return None  # LocateUnit is asked instead, and says what is wrong
            outline = None
        else:
            features = json.loads(response.geojson)["features"]
            drawn = [f for f in features if f["properties"].get("unit_id") == group]
            outline = shape(drawn[0]["geometry"]) if drawn else None
            if outline is not None:
                shapely.prepare(outline)  # many points are tested against one outline
        self._outlines[group] = (outline, now)
        return outline

    async def close(self) -> None:
        await self._channel.close()

"""Which group a reported place lies in, from the GIS service's map through its gRPC API. The
tickets service calls as a service, with a short-lived token.

It keeps the map of every group's outline in memory, fetched from GIS (ListFeatures) in the
background, again at once when GIS announces a boundary changed (a `FeaturesChanged` of the
boundary layer on civic.gis.v1, which every instance reads for itself) and every MAP_SECONDS
whatever it heard: a place inside a group's outline is placed without a call, so filing does
not wait on GIS, nor fail with it. A place outside every outline it holds
(a group drawn since, or none there) is asked of GIS (LocateUnit). The map helps routing and is
never a condition of filing: a GIS that does not answer within LOCATE_TIMEOUT_S leaves the ticket
with the group it would have had without a place, and the outage is logged."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import time
from dataclasses import dataclass

import grpc
import shapely
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from civic.common.v1 import types_pb2
from civic.gis.v1 import events_pb2, gis_pb2, gis_pb2_grpc
from shapely import Point, STRtree
from shapely.geometry import shape

from services.common.auth import SERVICE_TOKEN_SECONDS, service_token
from services.common.cloudevents import type_name
from services.common.paging import MAX_PAGE_SIZE
from services.common.runtime import cancel_and_wait
from services.common.telemetry import current_trace_headers
from services.tickets.domain import Level, level_of

log = logging.getLogger(__name__)

# A resident waits on this while filing: a map that answers later than this is not waited for.
LOCATE_TIMEOUT_S = 0.4
# While GIS stays out of reach, the warning is repeated this often (with how many places went
# unlocated meanwhile), not once per ticket.
WARN_EVERY_S = 60.0
# How old the map of outlines may grow: a boundary redrawn counts within this even when its
# announcement was not heard (the broker out of reach).
MAP_SECONDS = 60.0
# A map that could not be fetched is tried again after this.
MAP_RETRY_S = 5.0
MAP_PAGE_TIMEOUT_S = 10.0
# Where the map is read: Vietnam, with a margin.
VIETNAM = gis_pb2.BoundingBox(west=101.0, south=7.5, east=118.0, north=24.0)
# A GIS back after an outage is tried again within this, not after gRPC's default two minutes.
MAX_RECONNECT_BACKOFF_MS = 5_000
GIS_TOPIC = "civic.gis.v1"
FEATURES_CHANGED = type_name(events_pb2.FeaturesChanged())


@dataclass(frozen=True)
class GroupMap:
    """Groups' outlines, searchable by point."""

    groups: list[str]
    tree: STRtree
    fetched: float

    def groups_at(self, longitude: float, latitude: float) -> list[str]:
        found = self.tree.query(Point(longitude, latitude), predicate="intersects")
        return [self.groups[int(i)] for i in found]


class GisLocator:
    def __init__(self, target: str, auth_secret: str, bootstrap_servers: str = "") -> None:
        self._target = target
        self._secret = auth_secret
        self._bootstrap_servers = bootstrap_servers
        self._watching: asyncio.Task[None] | None = None
        # Cities whose boundaries changed while their map was being fetched: fetched again.
        self._redrawn: set[str] = set()
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        )
        self._stub = gis_pb2_grpc.GisServiceStub(self._channel)
        self._tokens: dict[str, tuple[str, float]] = {}
        self._unanswered = 0
        self._warned_at = -math.inf
        # Each city's map of group outlines, the fetch under way, and when one last failed.
        self._maps: dict[str, GroupMap] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, float] = {}

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
        when GIS did not answer in time. Of groups whose outlines both hold it (a sliver along
        a shared edge), `near`, the group the ticket has without a place, if it is one."""
        city = near.split(".")[0]
        groups = self._map(city)
        if groups is not None and (found := groups.groups_at(point.longitude, point.latitude)):
            return near if near in found else min(found)
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

    def _map(self, city: str) -> GroupMap | None:
        """The city's map as it is, a fresh one fetched in the background when it is old."""
        now = time.monotonic()
        groups = self._maps.get(city)
        stale = groups is None or now - groups.fetched >= MAP_SECONDS
        recently_failed = now - self._failed_at.get(city, -math.inf) < MAP_RETRY_S
        if stale and city not in self._fetching and not recently_failed:
            self._start_fetch(city)
        return groups

    def watch(self) -> None:
        """Hear GIS's boundary changes from now on (no consumer group: each instance its own)."""
        if self._bootstrap_servers and self._watching is None:
            self._watching = asyncio.create_task(
                self._watch(), name="gis-boundaries", context=contextvars.Context()
            )

    async def _watch(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(
                GIS_TOPIC,
                bootstrap_servers=self._bootstrap_servers,
                group_id=None,
                auto_offset_reset="latest",
                enable_auto_commit=False,
            )
            try:
                await consumer.start()
                async for record in consumer:
                    if (city := redrawn_city(record)) is not None:
                        self._redraw(city)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the every-minute fetch goes on meanwhile
                log.warning("GIS's boundary changes not heard (%s); listening again", error)
                await asyncio.sleep(MAP_RETRY_S)
            finally:
                await consumer.stop()

    def _redraw(self, city: str) -> None:
        """The city's map fetched again now, or after the fetch under way (it may predate the
        change)."""
        if city in self._fetching:
            self._redrawn.add(city)
        else:
            self._start_fetch(city)

    async def refresh(self, city: str) -> None:
        """The city's map fetched now (a fetch under way is waited for instead)."""
        await asyncio.shield(self._fetching.get(city) or self._start_fetch(city))

    def _start_fetch(self, city: str) -> asyncio.Task[None]:
        # In a context of its own: the filing that found the map old does not wait for the
        # fetch, and its trace does not hold it.
        fetching = asyncio.create_task(
            self._fetch(city), name=f"gis-map-{city}", context=contextvars.Context()
        )
        self._fetching[city] = fetching
        return fetching

    async def _fetch(self, city: str) -> None:
        try:
            self._maps[city] = await self._outlines(city)
            self._failed_at.pop(city, None)
        except grpc.aio.AioRpcError as error:
            self._failed_at[city] = time.monotonic()
            log.warning(
                "GIS at %s did not give the map of groups (%s: %s); the last one is used",
                self._target,
                error.code().name,
                error.details(),
            )
        finally:
            self._fetching.pop(city, None)
            if city in self._redrawn:
                self._redrawn.discard(city)
                self._start_fetch(city)

    async def _outlines(self, city: str) -> GroupMap:
        """Every group of the city on GIS's map, page by page."""
        started = time.monotonic()
        groups: list[str] = []
        outlines = []
        page_token = ""
        while True:
            response: gis_pb2.ListFeaturesResponse = await self._stub.ListFeatures(
                gis_pb2.ListFeaturesRequest(
                    layers=[gis_pb2.LAYER_BOUNDARY],
                    bbox=VIETNAM,
                    page=types_pb2.PageRequest(page_size=MAX_PAGE_SIZE, page_token=page_token),
                ),
                metadata=self._metadata(city),
                timeout=MAP_PAGE_TIMEOUT_S,
            )
            for feature in json.loads(response.geojson)["features"]:
                unit_id = str(feature["properties"].get("unit_id", ""))
                if unit_id.startswith(f"{city}.") and level_of(unit_id) is Level.GROUP:
                    groups.append(unit_id)
                    outlines.append(shape(feature["geometry"]))
            page_token = response.next_page_token
            if not page_token:
                break
        shapely.prepare(outlines)
        return GroupMap(groups, STRtree(outlines), started)

    async def close(self) -> None:
        await cancel_and_wait(self._watching)
        self._watching = None
        for fetching in list(self._fetching.values()):
            await cancel_and_wait(fetching)
        await self._channel.close()


def redrawn_city(record: ConsumerRecord[bytes, bytes]) -> str | None:
    """The city whose group outlines a GIS event changed, if it is one that does."""
    event_type = next((value for key, value in record.headers if key == "ce_type"), None)
    if event_type != FEATURES_CHANGED.encode() or record.value is None:
        return None
    changed = events_pb2.FeaturesChanged.FromString(record.value)
    if changed.layer != gis_pb2.LAYER_BOUNDARY:
        return None
    return changed.unit_id.split(".")[0]

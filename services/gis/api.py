"""The GIS service's gRPC servicer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import grpc
from civic.gis.v1 import events_pb2, gis_pb2, gis_pb2_grpc
from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure
from shapely.geometry import shape
from shapely.ops import unary_union

from services.common.auth import Principal, principal
from services.common.commands import CommandRunner
from services.common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.common.grpc_server import PURPOSE_HEADER
from services.common.mongo import Document, Session, in_transaction, in_unit
from services.common.objects import ObjectStore
from services.common.outbox import Outbox
from services.common.paging import MAX_PAGE_BYTES, PageWithin, page_size
from services.common.telemetry import current_trace_headers
from services.common.wire import local_date, point_message
from services.gis import domain, geometry, render, routing
from services.gis.domain import IMPORTABLE, PUBLIC_LAYERS, Layer
from services.gis.events import features_changed
from services.gis.records import (
    bbox_of,
    collection_text,
    feature_collection,
    feature_text,
    geojson_feature,
    hydrant_message,
    layer_of,
    position,
    required_point,
)
from services.gis.sources import RawFeature, SourceError, read_dxf, read_geojson
from services.gis.store import GeometryRefused, GisStore, refused_geometry

Context = grpc.aio.ServicerContext[Any, Any]
# Features written per transaction in an import.
IMPORT_BATCH = 1000
MAX_INLINE_BYTES = 4 * 1024 * 1024
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_FEATURES_PAGE = 10_000
MAX_RESIDENTS_PAGE = 200
MAX_HYDRANTS = 50
MAX_DISTANCE_M = 20_000.0
# Registry look-ups in flight at once for one evacuation list.
REGISTRY_CONCURRENCY = 16
# What of a file's name goes into its object's key: letters without their marks, digits, '.',
# '_' and '-' (anything else, a space say, becomes '-').
KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_FILE_NAME = 100
EXTENSIONS = (".dxf", ".geojson", ".json")


# A feature that passed the checks: where it came from in the file, and its document.
Accepted = tuple[RawFeature, Document]
# Where an import's features must lie: the unit whose boundary it is, and that boundary (None
# while no boundary is drawn there or above).
Area = tuple[str, Any] | None


@dataclass
class Tally:
    """What an import did to the layer."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0

    def __iadd__(self, other: Tally) -> Tally:
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.removed += other.removed
        return self


def _refusal(feature: RawFeature, problem: str) -> gis_pb2.FeatureError:
    return gis_pb2.FeatureError(index=feature.index, source_id=feature.source_id, message=problem)


def _ids_by_unit(docs: Iterable[Document]) -> dict[str, list[str]]:
    by_unit: dict[str, list[str]] = {}
    for doc in docs:
        by_unit.setdefault(doc["unit_id"], []).append(doc["_id"])
    return by_unit


@contextlib.contextmanager
def _geometry_given_in(field: str) -> Iterator[None]:
    """A query geometry MongoDB refuses is the caller's to mend (the checks let it through)."""
    try:
        yield
    except OperationFailure as error:
        reason = refused_geometry(error)
        if reason is None:
            raise
        raise InvalidArgument(field, f"MongoDB cannot use it ({reason})") from None


class RegistryUnavailable(Unavailable):
    """The registry did not answer: a consumer meeting it retries rather than park the event."""


class RegistryRefusedInput(DomainError):
    """The registry refused the caller's request as given (no stated purpose, say): the
    caller's to mend, as the registry put it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class RegistryReader:
    """The registry's GetHousehold with the caller's own credentials: the registry applies its
    privacy rules and writes its access log as for any official reading a household."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)

    async def household(
        self, household_id: str, credentials: list[tuple[str, str]]
    ) -> registry_pb2.GetHouseholdResponse | None:
        metadata = [*credentials, *current_trace_headers().items()]
        try:
            response: registry_pb2.GetHouseholdResponse = await self._stub.GetHousehold(
                registry_pb2.GetHouseholdRequest(household_id=household_id),
                metadata=metadata,
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                return None  # gone meanwhile, or the registry's own rules keep it from the caller
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RegistryRefusedInput(error.details() or "refused by the registry") from None
            raise RegistryUnavailable(f"the registry did not answer: {error.details()}") from None
        return response

    async def close(self) -> None:
        await self._channel.close()


def _credentials(context: Context) -> list[tuple[str, str]]:
    forwarded = []
    for key, value in context.invocation_metadata() or ():
        if key.lower() in ("authorization", PURPOSE_HEADER):
            forwarded.append((key.lower(), value.decode() if isinstance(value, bytes) else value))
    return forwarded


class GisServicer(gis_pb2_grpc.GisServiceServicer):
    def __init__(
        self,
        store: GisStore,
        client: AsyncMongoClient[Document],
        commands: CommandRunner,
        outbox: Outbox,
        uploads: ObjectStore,
        registry: RegistryReader,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.client = client
        self.commands = commands
        self.outbox = outbox
        self.uploads = uploads
        self.registry = registry
        self.clock = clock

    # ---- helpers -----------------------------------------------------------------------------

    def today(self) -> date:
        """Ages are counted on Vietnam's calendar, as the registry counts them: until 07:00
        there the UTC date is still yesterday's."""
        return local_date(self.clock())

    async def _known_unit(self, unit_id: str, may: Callable[[Principal, str], None]) -> Document:
        """The unit, once `may` lets the caller act on it: whether a unit exists is told only
        to those who may."""
        if not unit_id:
            raise InvalidArgument("unit_id", "is required")
        may(principal(), unit_id)
        unit = await self.store.unit(unit_id)
        if unit is None:
            raise NotFound(f"unit {unit_id} is not known to the GIS service")
        return unit

    async def _drawable_unit(self, unit_id: str) -> None:
        """A unit the caller may draw that still takes drawing: a group merged away is drawn
        as the group it went into, never again on its own."""
        unit = await self._known_unit(unit_id, domain.may_edit_map)
        if gone := domain.retired(unit_id, unit):
            raise FailedPrecondition(f"unit_id: {gone}")

    async def _boundary(self, unit_id: str) -> Document:
        if not unit_id:
            raise InvalidArgument("unit_id", "is required")
        boundary = await self.store.boundary(unit_id)
        if boundary is None:
            raise NotFound(f"unit {unit_id} has no boundary on the map")
        return boundary

    def _visible_layers(self, caller: Principal, requested: list[int]) -> list[Layer]:
        layers = [layer_of(f"layers[{i}]", value) for i, value in enumerate(requested)]
        if not layers:
            return [*PUBLIC_LAYERS, *([Layer.HOUSEHOLD] if domain.sees_households(caller) else [])]
        if Layer.HOUSEHOLD in layers and not domain.sees_households(caller):
            raise PermissionDenied(f"role {caller.role.value} may not see household points")
        return layers

    @staticmethod
    def _layer_filter(caller: Principal, layers: list[Layer], unit_id: str = "") -> Document:
        """Public layers everywhere; household points only inside the caller's scope; within a
        unit, the boundaries of that unit and the units in it (not its parents or neighbours,
        which its boundary touches too)."""
        public = [layer.key for layer in layers if layer not in (Layer.HOUSEHOLD, Layer.BOUNDARY)]
        parts: list[Document] = []
        if public:
            parts.append({"layer": {"$in": public}})
        if Layer.BOUNDARY in layers:
            boundaries: Document = {"layer": Layer.BOUNDARY.key}
            if unit_id:
                boundaries["unit_id"] = in_unit(unit_id)
            parts.append(boundaries)
        if Layer.HOUSEHOLD in layers:
            parts.append({"layer": Layer.HOUSEHOLD.key, "unit_id": in_unit(caller.scope)})
        return parts[0] if len(parts) == 1 else {"$or": parts}

    # ---- imports -----------------------------------------------------------------------------

    async def CreateImportUpload(
        self, request: gis_pb2.CreateImportUploadRequest, context: Context
    ) -> gis_pb2.CreateImportUploadResponse:
        await self._drawable_unit(request.unit_id)
        name = _key_name(request.file_name)
        if not name.lower().endswith(EXTENSIONS):
            raise InvalidArgument(
                "file_name",
                f"must be a plain file name of at most {MAX_FILE_NAME} characters ending in "
                f"{', '.join(EXTENSIONS)}",
            )
        if not 0 <= request.size_bytes <= MAX_UPLOAD_BYTES:
            raise InvalidArgument(
                "size_bytes", f"must be between 1 and {MAX_UPLOAD_BYTES} (0: not declared)"
            )
        key = f"{request.unit_id}/{uuid.uuid4().hex}-{name}"
        return gis_pb2.CreateImportUploadResponse(
            object_key=key, upload_url=self.uploads.upload_url(key, size_bytes=request.size_bytes)
        )

    async def ImportLayer(
        self, request: gis_pb2.ImportLayerRequest, context: Context
    ) -> gis_pb2.ImportLayerResponse:
        caller = principal()
        answered = await self.commands.answered("ImportLayer", request, gis_pb2.ImportLayerResponse)
        if answered is not None:
            return answered
        await self._drawable_unit(request.unit_id)
        layer = layer_of("layer", request.layer, IMPORTABLE)
        if request.format not in (gis_pb2.SOURCE_FORMAT_GEOJSON, gis_pb2.SOURCE_FORMAT_DXF):
            raise InvalidArgument("format", "must be SOURCE_FORMAT_GEOJSON or SOURCE_FORMAT_DXF")
        if request.format == gis_pb2.SOURCE_FORMAT_DXF and not request.source_crs.strip():
            raise InvalidArgument("source_crs", "is required for a DXF drawing (e.g. EPSG:3405)")
        try:
            transform = geometry.to_wgs84(request.source_crs)
        except ValueError as error:
            raise InvalidArgument("source_crs", str(error)) from None
        content, field = await self._content(request)
        # Reading and checking every feature of a file of up to 64 MiB is seconds of CPU work:
        # done in a worker thread, it leaves the event loop to answer other calls meanwhile
        # (NearestHydrants during a fire).
        try:
            if request.format == gis_pb2.SOURCE_FORMAT_DXF:
                raw = await asyncio.to_thread(read_dxf, content, layer, request.dxf_layer)
            else:
                raw, declared = await asyncio.to_thread(read_geojson, content)
                transform = _file_transform(request.source_crs, declared, field) or transform
        except SourceError as error:
            raise InvalidArgument(error.field or field, str(error)) from None

        area = await self._area(request.unit_id)
        # The unit's own outline drawn again lies where the units around it say, not where the
        # outline it replaces does: that may be the mistake being corrected, or the unit may
        # have grown (a group merged into it).
        own_area = area
        if layer is Layer.BOUNDARY and area is not None and area[0] == request.unit_id:
            own_area = await self._area(request.unit_id.rpartition(".")[0])
        import_id = (
            "im-"
            + hashlib.sha256(f"{caller.subject}\n{request.request_id}".encode()).hexdigest()[:20]
        )
        accepted, rejected = await asyncio.to_thread(
            self._accepted, raw, layer, request.unit_id, transform, area, own_area
        )
        if layer is Layer.BOUNDARY:
            accepted = await self._bounding_known_units(accepted, rejected)
            accepted = await self._beside_neighbours(accepted, rejected)
        now = self.clock()
        for _, doc in accepted:
            doc["import_id"] = import_id
            doc["updated_at"] = now

        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        if not await self.store.claim_import(import_id, fingerprint):
            raise FailedPrecondition(
                "request_id was already used for a different request; use a new request_id"
            )
        # Every feature was checked above, its geometry as MongoDB's index sees it too: the
        # writes take each one that passed (one MongoDB refuses all the same is refused alone),
        # so an import never fails with part of it written.
        tally = Tally()
        for start in range(0, len(accepted), IMPORT_BATCH):
            batch = accepted[start : start + IMPORT_BATCH]
            tally += await self._write_batch(batch, layer, import_id, rejected)
        # A drawing with refused features is not the whole layer (a wrong CRS refuses them all):
        # replacing would delete what they stand for. Fix the file and import it again.
        # Nor does a drawing that gave no feature at all (the wrong drawing layer, say).
        if request.replace and not rejected and accepted:
            keep = {doc["_id"] for _, doc in accepted}
            stale = await self.store.stale(layer, request.unit_id, keep)
            tally.removed += len(stale)
            # In batches like the writes: one event (a Kafka record) names a batch's ids.
            for start in range(0, len(stale), IMPORT_BATCH):
                await self._remove(stale[start : start + IMPORT_BATCH], layer, import_id)
        rejected.sort(key=lambda error: error.index)

        async def record(session: Session) -> tuple[gis_pb2.ImportLayerResponse, list[Document]]:
            response = gis_pb2.ImportLayerResponse(
                import_id=import_id,
                created=tally.created,
                updated=tally.updated,
                unchanged=tally.unchanged,
                removed=tally.removed,
                rejected=rejected,
            )
            event = self.outbox.event(
                events_pb2.LayerImported(
                    import_id=import_id,
                    unit_id=request.unit_id,
                    layer=int(layer),  # type: ignore[arg-type]
                    format=request.format,
                    source_crs=request.source_crs,
                    created=tally.created,
                    updated=tally.updated,
                    unchanged=tally.unchanged,
                    removed=tally.removed,
                    rejected=len(rejected),
                ),
                key=request.unit_id,
                subject=request.unit_id,
            )
            return response, [event]

        answer = await self.commands.run(
            "ImportLayer", request, gis_pb2.ImportLayerResponse, record
        )
        if layer is Layer.HYDRANT:
            await self.store.hydrants.reload(request.unit_id)
        return answer

    async def _content(self, request: gis_pb2.ImportLayerRequest) -> tuple[bytes, str]:
        source = request.WhichOneof("source")
        if source == "content":
            if not request.content:
                raise InvalidArgument("content", "is empty")
            return request.content, "content"
        if source == "object_key":
            if not request.object_key.startswith(f"{request.unit_id}/"):
                raise InvalidArgument("object_key", "was not handed out for this unit")
            return await self.uploads.read(request.object_key, MAX_UPLOAD_BYTES), "object_key"
        raise InvalidArgument("content", "give the file (content) or its upload (object_key)")

    async def _area(self, unit_id: str) -> Area:
        """The boundary of the unit, or failing that of its nearest ancestor, if any. A group's
        takes in the outlines of the groups merged into it: their places are its own, until
        its outline is drawn again around them."""
        found = await self.store.nearest_boundary(unit_id) if unit_id else None
        if found is None:
            return None
        outlines = [found]
        if found["unit_id"] == unit_id:
            merged = await self.store.merged_into({unit_id})
            outlines += await self.store.all(
                {"layer": Layer.BOUNDARY.key, "unit_id": {"$in": sorted(merged)}}
            )
        return found["unit_id"], unary_union([shape(doc["geometry"]) for doc in outlines])

    def _accepted(
        self,
        raw: list[RawFeature],
        layer: Layer,
        unit_id: str,
        transform: geometry.Transform,
        area: Area,
        own_area: Area,
    ) -> tuple[list[Accepted], list[gis_pb2.FeatureError]]:
        """The file's features that pass the checks, with their documents; and the others,
        each with why. A feature of the unit itself must lie within `own_area`, one of a unit
        in it (a group's boundary drawn by its ward) within `area`."""
        accepted: list[Accepted] = []
        rejected: list[gis_pb2.FeatureError] = []
        sources: set[str] = set()
        ids: dict[str, RawFeature] = {}
        for feature in raw:
            doc, problem = self._feature(feature, layer, unit_id, transform, area, own_area)
            if doc is not None and doc["source_id"] in sources:
                doc, problem = None, f"the id {feature.source_id!r} appears twice in the file"
            if doc is not None and doc["_id"] in ids:
                first = ids[doc["_id"]].index
                problem = f"properties.unit_id: {doc['unit_id']} is bounded by feature {first} too"
                doc = None
            if doc is None:
                rejected.append(_refusal(feature, problem))
                continue
            sources.add(doc["source_id"])
            ids[doc["_id"]] = feature
            accepted.append((feature, doc))
        return accepted, rejected

    def _feature(
        self,
        feature: RawFeature,
        layer: Layer,
        unit_id: str,
        transform: geometry.Transform,
        area: Area,
        own_area: Area,
    ) -> tuple[Document | None, str]:
        """The feature's document, or why it is refused."""
        if feature.error or feature.geometry is None:
            return None, feature.error or "has no geometry"
        allowed = domain.GEOMETRY_TYPES[layer]
        given = geometry.one_part(feature.geometry, allowed)
        if given["type"] not in allowed:
            return None, f"geometry: a {layer.key} must be a {' or '.join(allowed)}"
        try:
            converted = geometry.convert(given, transform)
            shaped = geometry.check(converted)
            converted = geometry.oriented(converted)
        except geometry.GeometryError as error:
            return None, f"geometry: {error}"
        local_area = (
            geometry.frame_at(shaped).project(shaped).area if layer is Layer.BUILDING else 0.0
        )
        try:
            owner, properties = domain.clean_properties(
                layer, feature.properties, unit_id, local_area
            )
        except ValueError as error:
            return None, str(error)
        within = own_area if owner == unit_id else area
        if within is not None:
            bounded, outline = within
            outside = geometry.distance_outside_m(shaped, outline)
            if outside > domain.outside_allowed_m(layer):
                return None, f"geometry: lies {outside:,.0f} m outside {bounded}'s boundary"
        elif geometry.outside_extent(shaped, geometry.VIETNAM):
            return None, "geometry: lies outside Vietnam (is the source CRS right?)"
        source_id = feature.source_id or domain.geometry_source_id(feature.geometry)
        doc: Document = {
            "_id": (
                domain.boundary_feature_id(owner)
                if layer is Layer.BOUNDARY
                else domain.feature_id(layer, unit_id, source_id, feature.drawing)
            ),
            "layer": layer.key,
            "unit_id": owner,
            "source_unit": unit_id,
            "source_id": source_id,
            "geometry": converted,
            "properties": properties,
        }
        if feature.drawing:
            doc["drawing"] = feature.drawing
        doc["hash"] = domain.content_hash(doc)
        doc["geojson"] = feature_text(doc)
        return doc, ""

    async def _bounding_known_units(
        self, accepted: list[Accepted], rejected: list[gis_pb2.FeatureError]
    ) -> list[Accepted]:
        """Boundaries of units the registry has, as the service's view of it has them: a
        mistyped unit code would otherwise draw a unit that does not exist."""
        units = await self.store.units_by_id({doc["unit_id"] for _, doc in accepted})
        kept = []
        for feature, doc in accepted:
            problem = domain.not_drawable(doc["unit_id"], units.get(doc["unit_id"]))
            if problem:
                rejected.append(_refusal(feature, problem))
            else:
                kept.append((feature, doc))
        return kept

    async def _beside_neighbours(
        self, accepted: list[Accepted], rejected: list[gis_pb2.FeatureError]
    ) -> list[Accepted]:
        """Boundaries that overlap no neighbouring unit's (one on the same level: another
        group of the ward, or of the ward next to it) by more than a sliver: the neighbour's as
        stored, or as this file draws it anew (a file's later outline gives way to its earlier
        one). Otherwise a point there would lie in both units: a ticket or a census could count
        it for either."""
        drawn = {doc["unit_id"]: doc["geometry"] for _, doc in accepted}
        # An outline of the same drawing that bounded another unit before moves with it.
        outlines_drawn = {
            (doc["source_unit"], doc["source_id"]): doc.get("drawing") for _, doc in accepted
        }

        def moves(stored: Document) -> bool:
            outline = (stored.get("source_unit"), stored.get("source_id"))
            return outline in outlines_drawn and stored.get("drawing") in (
                None,
                outlines_drawn[outline],
            )

        crossing = await self.store.boundaries_crossing(list(drawn.values()))
        stored = [doc for doc in crossing if not moves(doc)]
        around = {doc["unit_id"] for doc in stored} - drawn.keys()
        units = await self.store.units_by_id(around)
        outlines = {
            doc["unit_id"]: doc["geometry"]
            for doc in stored
            if doc["unit_id"] in around
            and not domain.retired(doc["unit_id"], units.get(doc["unit_id"], {}))
        }
        kept: list[Accepted] = []
        for feature, doc in accepted:
            others = [(u, o) for u, o in outlines.items() if domain.side_by_side(u, doc["unit_id"])]
            problem = await asyncio.to_thread(_first_overlap, doc["geometry"], others)
            if problem:
                rejected.append(_refusal(feature, problem))
                continue
            kept.append((feature, doc))
            outlines[doc["unit_id"]] = doc["geometry"]
        return kept

    async def _write_batch(
        self,
        batch: list[Accepted],
        layer: Layer,
        import_id: str,
        rejected: list[gis_pb2.FeatureError],
    ) -> Tally:
        """The batch in one transaction. A geometry MongoDB refuses despite the checks is
        refused like any other feature: the batch is written without it."""
        while True:
            try:
                return await self._write([doc for _, doc in batch], layer, import_id)
            except GeometryRefused as error:
                refused = [(f, doc) for f, doc in batch if doc["_id"] in error.reasons]
                if not refused:
                    raise
                for feature, doc in refused:
                    reason = error.reasons[doc["_id"]]
                    rejected.append(_refusal(feature, f"geometry: MongoDB refused it ({reason})"))
                batch = [(f, doc) for f, doc in batch if doc["_id"] not in error.reasons]

    async def _write(self, batch: list[Document], layer: Layer, import_id: str) -> Tally:
        async def work(session: Session) -> Tally:
            # A boundary takes the place of any other its unit had, and of what its outline
            # bounded before: those units hear of it as removed.
            # A feature of a drawing stored before features kept their drawing (under its
            # handle alone) gives way to the drawing's own: announced removed, once.
            displaced = await self.store.undrawn(layer, batch, session)
            if layer is Layer.BOUNDARY:
                displaced += await self.store.displaced(batch, session)
            await self.store.remove([doc["_id"] for doc in displaced], session)
            created, updated, unchanged = await self.store.upsert(batch, session)
            changed = set(created) | set(updated)
            upserted = _ids_by_unit(doc for doc in batch if doc["_id"] in changed)
            removed = _ids_by_unit(displaced)
            await self.outbox.stage(
                session,
                [
                    features_changed(
                        self.outbox,
                        unit,
                        layer,
                        upserted=upserted.get(unit),
                        removed=removed.get(unit),
                        import_id=import_id,
                    )
                    for unit in dict.fromkeys([*upserted, *removed])
                ],
            )
            return Tally(len(created), len(updated), len(unchanged), len(displaced))

        if not batch:
            return Tally()
        tally = await in_transaction(self.client, work)
        self.outbox.committed()
        return tally

    async def _remove(self, stale: list[Document], layer: Layer, import_id: str) -> None:
        by_unit = _ids_by_unit(stale)

        async def work(session: Session) -> None:
            await self.store.remove([doc["_id"] for doc in stale], session)
            await self.outbox.stage(
                session,
                [
                    features_changed(self.outbox, unit, layer, removed=ids, import_id=import_id)
                    for unit, ids in by_unit.items()
                ],
            )

        await in_transaction(self.client, work)
        self.outbox.committed()

    # ---- queries -----------------------------------------------------------------------------

    async def ListFeatures(
        self, request: gis_pb2.ListFeaturesRequest, context: Context
    ) -> gis_pb2.ListFeaturesResponse:
        caller = principal()
        layers = self._visible_layers(caller, list(request.layers))
        size = page_size(request.page.page_size, maximum=MAX_FEATURES_PAGE)
        if request.HasField("bbox") == bool(request.unit_id):
            raise InvalidArgument("bbox", "give exactly one of bbox and unit_id")
        if request.HasField("bbox"):
            box = geometry.bbox_polygon(*bbox_of(request.bbox))
            where: Document = {"$geoIntersects": {"$geometry": box}}
        else:
            boundary = await self._boundary(request.unit_id)
            # Inside or across the boundary: a house on the line belongs to both sides' maps.
            where = {"$geoIntersects": {"$geometry": boundary["geometry"]}}
        query = {"$and": [self._layer_filter(caller, layers, request.unit_id), {"geometry": where}]}
        with _geometry_given_in("bbox" if request.HasField("bbox") else "unit_id"):
            items, token = await self.store.page(
                query, request.page.page_token, size, {"geojson": 1}
            )
        # Within what a gRPC client takes by default (4 MiB): a page of long lines is shorter.
        kept = PageWithin[Document](MAX_PAGE_BYTES)
        for item in items:
            if not kept.add(item, len(item["geojson"].encode()) + 1):  # and its comma
                token = str(kept.items[-1]["_id"])
                break
        items = kept.items
        return gis_pb2.ListFeaturesResponse(
            geojson=collection_text(item["geojson"] for item in items),
            count=len(items),
            next_page_token=token,
        )

    async def LocateUnit(
        self, request: gis_pb2.LocateUnitRequest, context: Context
    ) -> gis_pb2.LocateUnitResponse:
        point = required_point("point", request, "point")
        found = await self.store.containing({"type": "Point", "coordinates": list(point)})
        found.sort(key=lambda doc: (-doc["unit_id"].count("."), doc["unit_id"]))
        # A merged group's outline stays drawn until the group it went into is redrawn: the
        # place is that group's now (once, though both outlines hold it).
        now = await self.store.units_now([doc["unit_id"] for doc in found])
        names: dict[str, str] = {}
        for doc in found:
            unit_id, name = now.get(doc["unit_id"], (doc["unit_id"], ""))
            if unit_id == doc["unit_id"]:
                name = name or doc["properties"].get("name", "")
            names.setdefault(unit_id, name)
        units = [gis_pb2.LocatedUnit(unit_id=u, name=name) for u, name in names.items()]
        return gis_pb2.LocateUnitResponse(unit_id=units[0].unit_id if units else "", units=units)

    async def NearestHydrants(
        self, request: gis_pb2.NearestHydrantsRequest, context: Context
    ) -> gis_pb2.NearestHydrantsResponse:
        point = required_point("point", request, "point")
        if not 0 <= request.limit <= MAX_HYDRANTS:
            raise InvalidArgument("limit", f"must be between 0 and {MAX_HYDRANTS}")
        if not 0 <= request.max_distance_m <= MAX_DISTANCE_M:
            raise InvalidArgument("max_distance_m", f"must be between 0 and {MAX_DISTANCE_M:g}")
        docs = await self.store.nearest(
            Layer.HYDRANT,
            {"type": "Point", "coordinates": list(point)},
            request.limit or 3,
            request.max_distance_m or 1000.0,
        )
        return gis_pb2.NearestHydrantsResponse(hydrants=[hydrant_message(d) for d in docs])

    async def ListResidentsInArea(
        self, request: gis_pb2.ListResidentsInAreaRequest, context: Context
    ) -> gis_pb2.ListResidentsInAreaResponse:
        caller = principal()
        domain.may_list_residents(caller)
        size = page_size(request.page.page_size, maximum=MAX_RESIDENTS_PAGE, default=50)
        ring = [list(position(f"ring[{i}]", p)) for i, p in enumerate(request.ring)]
        if ring and ring[0] != ring[-1]:
            ring.append(ring[0])
        if len(ring) < 4:
            raise InvalidArgument("ring", "needs at least three distinct points")
        polygon = {"type": "Polygon", "coordinates": [ring]}
        try:
            geometry.check(polygon)
        except geometry.GeometryError as error:
            raise InvalidArgument("ring", str(error)) from None
        # A token naming a group merged away finds none of the households that stand there
        # still: an empty list would read as nobody to evacuate.
        scope = await self.store.unit(caller.scope)
        if scope is not None and (gone := domain.retired(caller.scope, scope)):
            raise FailedPrecondition(f"your scope: {gone}")
        query = {
            "layer": Layer.HOUSEHOLD.key,
            "unit_id": in_unit(caller.scope),
            "geometry": {"$geoWithin": {"$geometry": polygon}},
        }
        with _geometry_given_in("ring"):
            items, token = await self.store.page(query, request.page.page_token, size)
        credentials = _credentials(context)
        limit = asyncio.Semaphore(REGISTRY_CONCURRENCY)
        today = self.today()

        async def entry(doc: Document) -> gis_pb2.HouseholdInArea | None:
            household_id = doc["properties"]["household_id"]
            async with limit:
                found = await self.registry.household(household_id, credentials)
            if found is None:
                # Gone, or moved out of the caller's reach, before this service heard of it:
                # the registry's word goes, for the address and place as for the people.
                return None
            residents = [
                gis_pb2.Resident(
                    person_id=member.person_id,
                    full_name=member.full_name,
                    birth_date=member.birth_date,
                    age=domain.age_on(member.birth_date, today),
                )
                for member in found.members
            ]
            return gis_pb2.HouseholdInArea(
                household_id=household_id,
                unit_id=doc["unit_id"],
                location=point_message(doc["geometry"]),
                address=doc["properties"].get("address", ""),
                residents=residents,
            )

        found = await asyncio.gather(*(entry(doc) for doc in items))
        households = [household for household in found if household is not None]
        return gis_pb2.ListResidentsInAreaResponse(households=households, next_page_token=token)

    async def CountByGroup(
        self, request: gis_pb2.CountByGroupRequest, context: Context
    ) -> gis_pb2.CountByGroupResponse:
        unit = await self._known_unit(request.unit_id, domain.may_count)
        # Its people are counted in the group it joined: none here is no answer.
        if gone := domain.retired(request.unit_id, unit):
            raise FailedPrecondition(f"unit_id: {gone}")
        today = self.today()
        born_by = domain.born_on_or_before_age(domain.ELDERLY_AGE, today)
        found = await self.store.counts(request.unit_id, born_by, today.isoformat())
        groups = sorted(
            {doc["_id"] for doc in await self.store.groups_in(request.unit_id)} | set(found)
        )
        counts = [
            gis_pb2.GroupCount(
                unit_id=group,
                households=found.get(group, {}).get("households", 0),
                population=found.get(group, {}).get("population", 0),
                elderly=found.get(group, {}).get("elderly", 0),
                renters=found.get(group, {}).get("renters", 0),
            )
            for group in groups
        ]
        boundaries = await self.store.all({"layer": Layer.BOUNDARY.key, "unit_id": {"$in": groups}})
        by_unit = {c.unit_id: c for c in counts}
        choropleth = []
        for doc in boundaries:
            feature = geojson_feature(doc)
            count = by_unit[doc["unit_id"]]
            feature["properties"] |= {
                "households": count.households,
                "population": count.population,
                "elderly": count.elderly,
                "renters": count.renters,
            }
            choropleth.append(feature)
        return gis_pb2.CountByGroupResponse(counts=counts, geojson=feature_collection(choropleth))

    # ---- fire access -------------------------------------------------------------------------

    async def _route(
        self, caller: Principal, request: gis_pb2.PlanFireRouteRequest, prefix: str = ""
    ) -> tuple[routing.Route, list[routing.RouteHydrant]]:
        entry = required_point(f"{prefix}entry", request, "entry")
        if request.household_id:
            household = await self.store.household(request.household_id)
            if household is None or not (
                domain.sees_households(caller) and caller.covers(household["unit_id"])
            ):
                raise NotFound(f"household {request.household_id} is not on your map")
            if "geometry" not in household:
                raise FailedPrecondition(f"household {request.household_id} has no location")
            lon, lat = household["geometry"]["coordinates"]
            destination = (lon, lat)
        else:
            destination = required_point(f"{prefix}destination", request, "destination")
        if not 0 <= request.min_width_m <= domain.MAX_WIDTH_M:
            raise InvalidArgument(
                f"{prefix}min_width_m", f"must be between 0 and {domain.MAX_WIDTH_M:g}"
            )
        if not 0 <= request.hydrant_radius_m <= 1000:
            raise InvalidArgument(f"{prefix}hydrant_radius_m", "must be between 0 and 1000")
        if geometry.distance_m(entry, destination) > MAX_DISTANCE_M / 4:
            raise InvalidArgument(f"{prefix}entry", "is more than 5 km from the destination")
        radius = request.hydrant_radius_m or 100.0
        area = _around([entry, destination], 1000.0)
        alleys = await self.store.all(
            {"layer": Layer.ALLEY.key, "geometry": {"$geoIntersects": {"$geometry": area}}}
        )
        try:
            route = routing.shortest_route(alleys, entry, destination, request.min_width_m)
        except routing.NoRoute as error:
            raise FailedPrecondition(str(error)) from None
        near_route = _around(route.positions, radius)
        hydrants = await self.store.all(
            {"layer": Layer.HYDRANT.key, "geometry": {"$geoWithin": {"$geometry": near_route}}}
        )
        return route, routing.hydrants_along(route, hydrants, radius)

    async def PlanFireRoute(
        self, request: gis_pb2.PlanFireRouteRequest, context: Context
    ) -> gis_pb2.PlanFireRouteResponse:
        route, hydrants = await self._route(principal(), request)
        line = {"type": "LineString", "coordinates": [list(p) for p in route.positions]}
        return gis_pb2.PlanFireRouteResponse(
            geojson=feature_collection(
                [
                    {
                        "type": "Feature",
                        "geometry": line,
                        "properties": {
                            "length_m": round(route.length_m, 1),
                            "min_width_m": request.min_width_m,
                        },
                    }
                ]
            ),
            length_m=round(route.length_m, 2),
            hydrants=[
                gis_pb2.RouteHydrant(
                    hydrant=hydrant_message(h.feature | {"distance_m": h.offset_m}),
                    along_m=round(h.along_m, 2),
                )
                for h in hydrants
            ],
        )

    async def RenderMap(
        self, request: gis_pb2.RenderMapRequest, context: Context
    ) -> gis_pb2.RenderMapResponse:
        caller = principal()
        if request.format not in (gis_pb2.IMAGE_FORMAT_SVG, gis_pb2.IMAGE_FORMAT_PNG):
            raise InvalidArgument("format", "must be IMAGE_FORMAT_SVG or IMAGE_FORMAT_PNG")
        if not 0 <= request.width_px <= render.MAX_WIDTH_PX:
            raise InvalidArgument("width_px", f"must be between 0 and {render.MAX_WIDTH_PX}")
        boundary = await self._boundary(request.unit_id)
        route: list[geometry.Position] = []
        if request.HasField("route"):
            route = (await self._route(caller, request.route, "route."))[0].positions
        drawn = [Layer.BUILDING.key, Layer.ALLEY.key, Layer.HYDRANT.key]
        inside = await self.store.all(
            {
                "layer": {"$in": drawn},
                "geometry": {"$geoIntersects": {"$geometry": boundary["geometry"]}},
            }
        )
        # The unit's own drawings too: a hydrant across the street along its edge stands
        # outside its outline (as one may), and is the one the fire brigade draws water from.
        own = await self.store.all({"layer": {"$in": drawn}, "source_unit": request.unit_id})
        features = list({doc["_id"]: doc for doc in [*inside, *own]}.values())
        standing = [doc for doc in own if doc["layer"] != Layer.ALLEY.key]
        names = await self.store.units_named([request.unit_id])
        title = names.get(request.unit_id) or boundary["properties"].get("name", request.unit_id)
        scene = render.scene(
            title,
            [boundary, *features],
            route,
            request.width_px or render.DEFAULT_WIDTH_PX,
            framed=[boundary, *standing],
        )
        if request.format == gis_pb2.IMAGE_FORMAT_SVG:
            content, content_type = render.to_svg(scene), "image/svg+xml"
        else:
            content, content_type = await asyncio.to_thread(render.to_png, scene), "image/png"
        return gis_pb2.RenderMapResponse(
            content=content,
            content_type=content_type,
            width_px=scene.width,
            height_px=scene.height,
        )


def _key_name(file_name: str) -> str:
    """The file's name as its object's key takes it: a ward's drawing is as often "Bản đồ tổ
    17.dxf" as "to17.dxf", and both are plain file names. "" for a path or a name too long."""
    name = unicodedata.normalize("NFC", file_name.strip())
    if not name or len(name) > MAX_FILE_NAME or any(c in name for c in "/\\\0"):
        return ""
    unmarked = unicodedata.normalize("NFKD", name.replace("đ", "d").replace("Đ", "D"))
    plain = "".join(c for c in unmarked if not unicodedata.combining(c))
    return KEY_UNSAFE.sub("-", plain)


def _file_transform(source_crs: str, declared: str, field: str) -> geometry.Transform | None:
    """The conversion for a GeoJSON file that declares its CRS (None: as source_crs says): the
    one it declares, which source_crs, if given, must name too. Positions read in another
    CRS than theirs would all be refused as off the map, or land kilometres away."""
    if not declared:
        return None
    try:
        if geometry.same_crs(declared, source_crs):
            return None
        if source_crs.strip():
            raise InvalidArgument("source_crs", f"is not the CRS the file declares ({declared})")
        return geometry.to_wgs84(declared)
    except ValueError as error:
        raise InvalidArgument(field, f"declares its crs as {declared!r}, which {error}") from None


def _around(positions: list[geometry.Position], metres: float) -> Document:
    """A box around the positions, `metres` wider on every side, as a GeoJSON polygon."""
    frame = geometry.LocalFrame(*positions[0])
    local = [frame.metres(p) for p in positions]
    west, south = frame.degrees(
        (min(x for x, _ in local) - metres, min(y for _, y in local) - metres)
    )
    east, north = frame.degrees(
        (max(x for x, _ in local) + metres, max(y for _, y in local) + metres)
    )
    return geometry.bbox_polygon(west, south, east, north)


def _first_overlap(outline: Document, others: list[tuple[str, Document]]) -> str:
    """Why the outline overlaps one of the others too much, or ""."""
    for unit_id, other in others:
        if problem := domain.overlap_problem(unit_id, *geometry.overlap_m2(outline, other)):
            return problem
    return ""

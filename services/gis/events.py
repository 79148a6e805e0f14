"""The GIS service's events, and its view of the registry kept from civic.registry.v1: units,
household points (a new or moved household appears on the map without anyone redrawing it) and
the persons' facts that counts need (birth date, residence kind, whether on a temporary stay;
never names). A group's merge and its households' events travel on different partitions: an
event naming a merged group is taken to mean the group it was merged into."""

from __future__ import annotations

from typing import Any

from civic.gis.v1 import events_pb2
from civic.registry.v1 import events_pb2 as registry_events
from civic.registry.v1 import registry_pb2
from google.protobuf.message import Message
from pymongo import AsyncMongoClient, ReplaceOne, UpdateMany, UpdateOne

from services.common.consumer import Delivery, TopicConsumer
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.common.telemetry import current_trace_headers
from services.common.wire import point_document
from services.gis.domain import MAX_MERGES, Layer, content_hash, household_feature_id
from services.gis.records import feature_text
from services.gis.store import GisStore

TOPIC = "civic.gis.v1"
REGISTRY_TOPIC = "civic.registry.v1"
# The persons who live as their household does, as the registry has it: all but those on a
# temporary stay, who keep their own kind wherever they stay. A person projected before `stay`
# was kept is taken to be on a stay if a temporary resident: every stay is one, and only the
# members of a household of temporary residents are too.
FOLLOWS_HOUSEHOLD: Document = {
    "$or": [
        {"stay": False},
        {
            "stay": {"$exists": False},
            "residence_kind": {"$ne": registry_pb2.RESIDENCE_KIND_TEMPORARY},
        },
    ]
}


def features_changed(
    outbox: Outbox,
    unit_id: str,
    layer: Layer,
    *,
    upserted: list[str] | None = None,
    removed: list[str] | None = None,
    import_id: str = "",
) -> Document:
    origin = events_pb2.CHANGE_ORIGIN_IMPORT if import_id else events_pb2.CHANGE_ORIGIN_REGISTRY
    return outbox.event(
        events_pb2.FeaturesChanged(
            unit_id=unit_id,
            layer=int(layer),  # type: ignore[arg-type]
            upserted_ids=upserted or [],
            removed_ids=removed or [],
            origin=origin,
            import_id=import_id,
        ),
        key=unit_id,
        subject=unit_id,
    )


def registry_consumer(
    client: AsyncMongoClient[Document],
    store: GisStore,
    outbox: Outbox,
    *,
    group_id: str,
    instance_id: str,
) -> TopicConsumer:
    return TopicConsumer(
        client,
        store.db,
        topic=REGISTRY_TOPIC,
        group_id=group_id,
        instance_id=instance_id,
        handle=RegistryProjection(store, outbox).apply,
        outbox=outbox,
    )


class RegistryProjection:
    """Applies a fetch's new registry events together: the same outcome as applying them
    one after the other in order, in a few round trips whatever their number. Household points
    are read once and changed in memory, event by event; units and persons keep each event's
    write, in order, in one bulk write per collection. The map changes are announced once per
    unit: the points now there as upserted, the points that left it as removed."""

    def __init__(self, store: GisStore, outbox: Outbox) -> None:
        self.store = store
        self.outbox = outbox

    async def apply(self, deliveries: list[Delivery], session: Session) -> list[Document]:
        batch = _Batch(self.store, session)
        await batch.read_points([d.message for d in deliveries])
        await batch.read_merges([d.message for d in deliveries])
        for delivery in deliveries:
            with delivery.span():
                await batch.project(delivery.message)
        return await batch.write(self.outbox)


class _Batch:
    """One batch's changes, gathered event by event and written at the end."""

    def __init__(self, store: GisStore, session: Session) -> None:
        self.store = store
        self.session = session
        self.units: list[Any] = []
        self.persons: list[Any] = []
        # Household points as the events so far leave them (None: not on the map).
        self.points: dict[str, Document | None] = {}
        self.changed: set[str] = set()
        self.merged: dict[str, str] = {}  # a merged group -> the group it was merged into
        # (source, target, the merge's trace), in the events' order.
        self.merges: list[tuple[str, str, dict[str, str]]] = []
        self.left: dict[str, set[str]] = {}  # point -> the units it moved out of
        # Each unit's map change carries the trace of the last event that changed it there.
        self.traces: dict[str, dict[str, str]] = {}

    async def read_points(self, messages: list[Message]) -> None:
        ids = [
            household_feature_id(m.household_id)
            for m in messages
            if isinstance(
                m,
                registry_events.HouseholdCreated
                | registry_events.HouseholdUpdated
                | registry_events.HouseholdMoved
                | registry_events.PersonRegistered,
            )
        ] + [
            household_feature_id(m.to_household_id)
            for m in messages
            if isinstance(m, registry_events.PersonMoved)
        ]
        ids += [
            household_feature_id(household_id)
            for m in messages
            if isinstance(m, registry_events.GroupsMerged)
            for household_id in m.household_ids
        ]
        if not ids:
            return
        self.points = dict.fromkeys(ids)
        async for doc in self.store.features.find({"_id": {"$in": ids}}, session=self.session):
            self.points[doc["_id"]] = doc

    async def read_merges(self, messages: list[Message]) -> None:
        """Where the groups the events place households and persons in were merged, if they
        were, and where those were merged in turn."""
        wanted = {unit for m in messages for unit in _units_named(m)}
        looked: set[str] = set()
        for _ in range(MAX_MERGES):
            wanted -= looked
            if not wanted:
                return
            looked |= wanted
            found = {
                doc["_id"]: doc["merged_into_id"]
                async for doc in self.store.units.find(
                    {"_id": {"$in": sorted(wanted)}, "merged_into_id": {"$exists": True}},
                    {"merged_into_id": 1},
                    session=self.session,
                )
            }
            self.merged |= found
            wanted = set(found.values())

    def _now(self, unit_id: str) -> str:
        """The group an event naming `unit_id` means now: a merged group's events (from before
        its merge, arriving after it on another partition) go where it was merged."""
        for _ in range(MAX_MERGES):
            if unit_id not in self.merged:
                break
            unit_id = self.merged[unit_id]
        return unit_id

    async def project(self, message: Message) -> None:
        m: Any = message
        match message:
            case registry_events.UnitCreated():
                unit = m.unit
                doc = {
                    "_id": unit.unit_id,
                    "kind": unit.kind,
                    "name": unit.name,
                    "parent_id": unit.parent_id,
                    "active": True,
                }
                self.units.append(ReplaceOne({"_id": unit.unit_id}, doc, upsert=True))
            case registry_events.UnitRenamed():
                self.units.append(UpdateOne({"_id": m.unit_id}, {"$set": {"name": m.new_name}}))
            case registry_events.GroupsMerged():
                self._merge(m.source_unit_id, m.target_unit_id, list(m.household_ids))
            case registry_events.HouseholdCreated() | registry_events.HouseholdUpdated():
                self._household(m, self._now(m.unit_id))
            case registry_events.HouseholdMoved():
                to_unit = self._now(m.to_unit_id)
                self.persons.append(
                    UpdateMany({"household_id": m.household_id}, {"$set": {"unit_id": to_unit}})
                )
                previous = self.points[household_feature_id(m.household_id)]
                if previous is not None and previous["unit_id"] != to_unit:
                    self._put(previous | {"source_unit": to_unit}, to_unit)
            case registry_events.PersonRegistered():
                # Unless on a stay, they live as their household does: as the map has it when
                # it has the household (its update may have arrived first, on another
                # partition), else as the event says.
                stay = bool(m.stay_end)
                kind = None if stay else self._kind_of(m.household_id)
                person = {
                    "_id": m.person_id,
                    "household_id": m.household_id,
                    "unit_id": self._unit_of(m.household_id, self._now(m.unit_id)),
                    "birth_date": m.birth_date,
                    "residence_kind": int(m.residence_kind) if kind is None else kind,
                    "stay": stay,
                    # A guest's first and last days: counted from the one until the other, as
                    # the registry's census counts.
                    "stay_start": m.stay_start,
                    "stay_end": m.stay_end,
                    "active": True,
                }
                self.persons.append(ReplaceOne({"_id": m.person_id}, person, upsert=True))
            case registry_events.PersonMoved():
                unit_id = self._unit_of(m.to_household_id, self._now(m.to_unit_id))
                moved = {"household_id": m.to_household_id, "unit_id": unit_id}
                self.persons.append(UpdateOne({"_id": m.person_id}, {"$set": moved}))
                # Unless on a stay, the mover lives as the household they joined: as the map has
                # it, or, while it has not got it, as its first event will say.
                kind = self._kind_of(m.to_household_id)
                if kind is not None:
                    self._live_as({"_id": m.person_id}, kind)
            case registry_events.TemporaryStayExtended():
                extended = {"stay_end": m.stay_end}
                self.persons.append(UpdateOne({"_id": m.person_id}, {"$set": extended}))
            case registry_events.PersonUpdated():  # a birth date corrected, say
                corrected = {"birth_date": m.birth_date}
                self.persons.append(UpdateOne({"_id": m.person_id}, {"$set": corrected}))
            case registry_events.PersonMovedOut() | registry_events.PersonDied():
                self.persons.append(UpdateOne({"_id": m.person_id}, {"$set": {"active": False}}))

    def _unit_of(self, household_id: str, said: str) -> str:
        """A person's unit is their household's: as the map has it when it has the household
        (its move or merge may have arrived first, on another partition), else as the event
        says."""
        point = self.points.get(household_feature_id(household_id))
        return str(point["unit_id"]) if point is not None else said

    def _kind_of(self, household_id: str) -> int | None:
        """The household's residence kind as the map has it, if it has the household."""
        point = self.points.get(household_feature_id(household_id))
        return None if point is None else int(point["properties"]["residence_kind"])

    def _live_as(self, query: Document, kind: int) -> None:
        """Those `query` finds who are not on a temporary stay live as `kind` says."""
        update = {"$set": {"residence_kind": kind}}
        self.persons.append(UpdateMany(query | FOLLOWS_HOUSEHOLD, update))

    def _household(self, m: Any, unit_id: str) -> None:
        """The household's creation or update, placing it in `unit_id`."""
        feature_id = household_feature_id(m.household_id)
        doc: Document = {
            "_id": feature_id,
            "layer": Layer.HOUSEHOLD.key,
            "unit_id": unit_id,
            "source_unit": unit_id,
            "properties": {
                "household_id": m.household_id,
                "address": m.address,
                "residence_kind": int(m.residence_kind),
            },
        }
        if m.HasField("location"):
            doc["geometry"] = point_document("location", m.location)
        previous = self.points[feature_id]
        # The registry sets the members' kind with the household's. Those registered or moved
        # in before the map had the household took the events' word: its first event sets them.
        kind_set = isinstance(m, registry_events.HouseholdUpdated) and (
            "residence_kind" in m.updated_fields
        )
        if previous is None or kind_set:
            self._live_as({"household_id": m.household_id}, int(m.residence_kind))
        if previous is None or previous.get("hash") != content_hash(doc):
            self._put(doc, unit_id)

    def _merge(self, source: str, target: str, household_ids: list[str]) -> None:
        """The registry names the households it moved to the target. Those the map has in the
        source go, with their members; one it has elsewhere has moved since (or has yet to
        reach the source), and its own move, on its partition, takes it where it goes. A target
        merged away since (that merge, keyed by the target, may be applied first) passes them,
        and the source's drawings, on to where it went: nobody draws in a merged group."""
        self.merged[source] = target
        self.units.append(
            UpdateOne({"_id": source}, {"$set": {"active": False, "merged_into_id": target}})
        )
        target = self._now(target)
        self.merges.append((source, target, current_trace_headers()))
        self.persons.append(
            UpdateMany(
                {"unit_id": source, "household_id": {"$in": household_ids}},
                {"$set": {"unit_id": target}},
            )
        )
        for household_id in household_ids:
            point = self.points[household_feature_id(household_id)]
            if point is not None and point["unit_id"] == source:
                self._put(point | {"source_unit": target}, target)

    def _put(self, doc: Document, unit_id: str) -> None:
        """The point `doc` now stands in `unit_id`."""
        previous = self.points[doc["_id"]]
        if previous is not None and previous["unit_id"] != unit_id:
            self.left.setdefault(doc["_id"], set()).add(previous["unit_id"])
        doc = doc | {"unit_id": unit_id}
        doc["hash"] = content_hash(doc)
        doc["geojson"] = feature_text(doc)
        self.points[doc["_id"]] = doc
        self.changed.add(doc["_id"])
        trace = current_trace_headers()
        self.traces[unit_id] = trace
        if previous is not None and previous["unit_id"] != unit_id:
            self.traces[previous["unit_id"]] = trace

    async def write(self, outbox: Outbox) -> list[Document]:
        if self.units:
            await self.store.units.bulk_write(self.units, ordered=True, session=self.session)
        if self.persons:
            await self.store.persons.bulk_write(self.persons, ordered=True, session=self.session)
        upserted: dict[str, list[str]] = {}
        removed: dict[str, list[str]] = {}
        writes = []
        for feature_id in sorted(self.changed):
            doc = self.points[feature_id]
            assert doc is not None, "a changed point is on the map"
            writes.append(ReplaceOne({"_id": feature_id}, doc, upsert=True))
            upserted.setdefault(doc["unit_id"], []).append(feature_id)
            for unit_id in sorted(self.left.get(feature_id, set()) - {doc["unit_id"]}):
                removed.setdefault(unit_id, []).append(feature_id)
        if writes:
            await self.store.features.bulk_write(writes, ordered=False, session=self.session)
        emitted = []
        for source, target, trace in self.merges:
            emitted += await self._carry_drawings(source, target, outbox, trace)
        for unit_id, trace in self.traces.items():
            event = features_changed(
                outbox,
                unit_id,
                Layer.HOUSEHOLD,
                upserted=upserted.get(unit_id),
                removed=removed.get(unit_id),
            )
            event["trace"] = trace
            emitted.append(event)
        return emitted

    async def _carry_drawings(
        self, source: str, target: str, outbox: Outbox, trace: dict[str, str]
    ) -> list[Document]:
        """The merged group's drawings become the target's, as if its leader had drawn them: a
        merged group takes no more imports, so otherwise nobody could ever replace or remove
        them, and the target's survey of its grown area would stand beside them twice. Its
        outline keeps bounding it (a place there is the target's) until the target's own is
        redrawn around it."""
        drawn = await self.store.features.find(
            {"source_unit": source, "layer": {"$ne": Layer.HOUSEHOLD.key}}, session=self.session
        ).to_list()
        writes = []
        moved: dict[str, list[str]] = {}
        for doc in drawn:
            doc["source_unit"] = target
            if doc["layer"] != Layer.BOUNDARY.key:
                doc["unit_id"] = target
                moved.setdefault(doc["layer"], []).append(doc["_id"])
            doc["hash"] = content_hash(doc)
            doc["geojson"] = feature_text(doc)
            writes.append(ReplaceOne({"_id": doc["_id"]}, doc))
        if writes:
            await self.store.features.bulk_write(writes, ordered=False, session=self.session)
        emitted = []
        for key, ids in moved.items():
            layer = Layer[key.upper()]
            for event in (
                features_changed(outbox, target, layer, upserted=ids),
                features_changed(outbox, source, layer, removed=ids),
            ):
                event["trace"] = trace
                emitted.append(event)
        return emitted


def _units_named(message: Message) -> list[str]:
    """The groups a household's or person's event, or a merge, places them in."""
    m: Any = message
    match message:
        case (
            registry_events.HouseholdCreated()
            | registry_events.HouseholdUpdated()
            | registry_events.PersonRegistered()
        ):
            return [m.unit_id]
        case registry_events.HouseholdMoved() | registry_events.PersonMoved():
            return [m.to_unit_id]
        case registry_events.GroupsMerged():
            return [m.target_unit_id]
    return []

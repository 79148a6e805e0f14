"""The GIS service's events, and its view of the registry kept from civic.registry.v1: units,
household points (a new or moved household appears on the map without anyone redrawing it) and
the persons' facts that counts need (birth date, residence kind; never names)."""

from __future__ import annotations

from typing import Any

from civic.gis.v1 import events_pb2
from civic.registry.v1 import events_pb2 as registry_events
from faststream.kafka import KafkaBroker
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from services.common.broker import subscribe_once
from services.common.cloudevents import CloudEvent
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.common.wire import point_document
from services.gis.domain import Layer, content_hash, household_feature_id
from services.gis.records import feature_text
from services.gis.store import GisStore

TOPIC = "civic.gis.v1"
REGISTRY_TOPIC = "civic.registry.v1"


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


def subscribe(
    broker: KafkaBroker,
    client: AsyncMongoClient[Document],
    store: GisStore,
    outbox: Outbox,
    *,
    group_id: str,
    instance_id: str,
) -> None:
    async def on_registry_event(
        event: CloudEvent, message: Message, session: Session
    ) -> list[Document]:
        return await project_registry(store, outbox, message, session)

    subscribe_once(
        broker,
        client,
        store.db,
        topic=REGISTRY_TOPIC,
        group_id=group_id,
        instance_id=instance_id,
        handle=on_registry_event,
        outbox=outbox,
    )


async def project_registry(
    store: GisStore, outbox: Outbox, message: Message, session: Session
) -> list[Document]:
    """Applies one registry event; returns the map changes it makes, as events."""
    m: Any = message
    match message:
        case registry_events.UnitCreated():
            unit = m.unit
            await store.put_unit(
                {
                    "_id": unit.unit_id,
                    "kind": unit.kind,
                    "name": unit.name,
                    "parent_id": unit.parent_id,
                    "active": True,
                },
                session,
            )
        case registry_events.UnitRenamed():
            await store.units.update_one(
                {"_id": m.unit_id}, {"$set": {"name": m.new_name}}, session=session
            )
        case registry_events.GroupsMerged():
            return await _merge(store, outbox, m.source_unit_id, m.target_unit_id, session)
        case registry_events.HouseholdCreated() | registry_events.HouseholdUpdated():
            return await _household(store, outbox, m, session)
        case registry_events.HouseholdMoved():
            return await _household_moved(store, outbox, m.household_id, m.to_unit_id, session)
        case registry_events.PersonRegistered():
            await store.persons.replace_one(
                {"_id": m.person_id},
                {
                    "_id": m.person_id,
                    "household_id": m.household_id,
                    "unit_id": m.unit_id,
                    "birth_date": m.birth_date,
                    "residence_kind": int(m.residence_kind),
                    "active": True,
                },
                upsert=True,
                session=session,
            )
        case registry_events.PersonMoved():
            await store.persons.update_one(
                {"_id": m.person_id},
                {"$set": {"household_id": m.to_household_id, "unit_id": m.to_unit_id}},
                session=session,
            )
        case registry_events.PersonMovedOut() | registry_events.PersonDied():
            await store.persons.update_one(
                {"_id": m.person_id}, {"$set": {"active": False}}, session=session
            )
    return []


async def _household(store: GisStore, outbox: Outbox, m: Any, session: Session) -> list[Document]:
    feature_id = household_feature_id(m.household_id)
    previous = await store.household(m.household_id, session)
    doc: Document = {
        "_id": feature_id,
        "layer": Layer.HOUSEHOLD.key,
        "unit_id": m.unit_id,
        "source_unit": m.unit_id,
        "properties": {
            "household_id": m.household_id,
            "address": m.address,
            "residence_kind": int(m.residence_kind),
        },
    }
    if m.HasField("location"):
        doc["geometry"] = point_document("location", m.location)
    doc["hash"] = content_hash(doc)
    doc["geojson"] = feature_text(doc)
    if previous is not None and previous.get("hash") == doc["hash"]:
        return []
    await store.features.replace_one({"_id": feature_id}, doc, upsert=True, session=session)
    emitted = [features_changed(outbox, m.unit_id, Layer.HOUSEHOLD, upserted=[feature_id])]
    if previous is not None and previous["unit_id"] != m.unit_id:
        emitted.append(
            features_changed(outbox, previous["unit_id"], Layer.HOUSEHOLD, removed=[feature_id])
        )
    return emitted


async def _household_moved(
    store: GisStore, outbox: Outbox, household_id: str, to_unit: str, session: Session
) -> list[Document]:
    await store.persons.update_many(
        {"household_id": household_id}, {"$set": {"unit_id": to_unit}}, session=session
    )
    previous = await store.household(household_id, session)
    if previous is None or previous["unit_id"] == to_unit:
        return []
    changed = previous | {"unit_id": to_unit, "source_unit": to_unit}
    changed["hash"] = content_hash(changed)
    changed["geojson"] = feature_text(changed)
    await store.features.replace_one({"_id": previous["_id"]}, changed, session=session)
    return [
        features_changed(outbox, to_unit, Layer.HOUSEHOLD, upserted=[previous["_id"]]),
        features_changed(outbox, previous["unit_id"], Layer.HOUSEHOLD, removed=[previous["_id"]]),
    ]


async def _merge(
    store: GisStore, outbox: Outbox, source: str, target: str, session: Session
) -> list[Document]:
    await store.units.update_one(
        {"_id": source}, {"$set": {"active": False, "merged_into_id": target}}, session=session
    )
    await store.persons.update_many(
        {"unit_id": source}, {"$set": {"unit_id": target}}, session=session
    )
    moved = [
        doc["_id"]
        async for doc in store.features.find(
            {"layer": Layer.HOUSEHOLD.key, "unit_id": source}, {"_id": 1}, session=session
        )
    ]
    if not moved:
        return []
    for doc in await store.features.find({"_id": {"$in": moved}}, session=session).to_list():
        changed = doc | {"unit_id": target, "source_unit": target}
        changed["hash"] = content_hash(changed)
        changed["geojson"] = feature_text(changed)
        await store.features.replace_one({"_id": doc["_id"]}, changed, session=session)
    return [
        features_changed(outbox, target, Layer.HOUSEHOLD, upserted=moved),
        features_changed(outbox, source, Layer.HOUSEHOLD, removed=moved),
    ]

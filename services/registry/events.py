"""The registry's events: built here from register documents, and the household-history
projection that consumes them back from civic.registry.v1."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from civic.registry.v1 import events_pb2, registry_pb2
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from services.common.consumer import BatchHandler, Delivery, TopicConsumer
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.common.wire import point_message
from services.registry.store import RegistryStore

TOPIC = "civic.registry.v1"


def housing(doc: Document) -> registry_pb2.Housing:
    h = doc.get("housing") or {}
    return registry_pb2.Housing(
        floor_area_m2=h.get("floor_area_m2", 0.0),
        storeys=h.get("storeys", 0),
        sub_households=h.get("sub_households", 0),
    )


def household_created(outbox: Outbox, household: Document) -> Document:
    return outbox.event(
        events_pb2.HouseholdCreated(
            household_id=household["_id"],
            unit_id=household["unit_id"],
            address=household["address"],
            housing=housing(household),
            residence_kind=household["residence_kind"],
            location=point_message(household.get("location")),
            head_person_id=household.get("head_person_id", ""),
        ),
        key=household["_id"],
    )


def household_updated(outbox: Outbox, household: Document, fields: list[str]) -> Document:
    return outbox.event(
        events_pb2.HouseholdUpdated(
            household_id=household["_id"],
            unit_id=household["unit_id"],
            updated_fields=fields,
            address=household["address"],
            housing=housing(household),
            residence_kind=household["residence_kind"],
            location=point_message(household.get("location")),
            head_person_id=household.get("head_person_id", ""),
        ),
        key=household["_id"],
    )


def person_registered(outbox: Outbox, person: Document, reason: int) -> Document:
    return outbox.event(
        events_pb2.PersonRegistered(
            person_id=person["_id"],
            household_id=person["household_id"],
            unit_id=person["unit_id"],
            reason=reason,  # type: ignore[arg-type]
            birth_date=person["birth_date"],
            sex=person["sex"],
            relationship=person["relationship"],
            residence_kind=person["residence_kind"],
            stay_end=person.get("stay_end", ""),
            stay_start=person.get("stay_start", ""),
        ),
        key=person["_id"],
    )


def person_updated(outbox: Outbox, person: Document, fields: list[str]) -> Document:
    """The person's record corrected (`fields`), as it is now."""
    return outbox.event(
        events_pb2.PersonUpdated(
            person_id=person["_id"],
            household_id=person["household_id"],
            unit_id=person["unit_id"],
            updated_fields=fields,
            birth_date=person["birth_date"],
            sex=person["sex"],
            relationship=person["relationship"],
        ),
        key=person["_id"],
    )


def person_marked_absent(outbox: Outbox, person: Document, *, absent: bool) -> Document:
    """The person's mark of absence set or cleared, where they live now."""
    return outbox.event(
        events_pb2.PersonMarkedAbsent(
            person_id=person["_id"],
            household_id=person["household_id"],
            unit_id=person["unit_id"],
            absent=absent,
        ),
        key=person["_id"],
    )


def keyed_by_person(outbox: Outbox, message: Message, person_id: str) -> Document:
    return outbox.event(message, key=person_id)


# ---- household history projection ----------------------------------------------------------


def _history_lines(message: Message) -> list[tuple[str, str, str]]:
    """(household_id, person_id, summary) for each household an event concerns."""
    m: Any = message
    match message:
        case events_pb2.HouseholdCreated():
            return [(m.household_id, m.head_person_id, f"household created at {m.address}")]
        case events_pb2.HouseholdUpdated():
            return [(m.household_id, "", "updated: " + ", ".join(m.updated_fields))]
        case events_pb2.HouseholdVerified():
            return [(m.household_id, "", f"verified by {m.verified_by}")]
        case events_pb2.HouseholdMoved() if m.by_merge:  # the household stayed where it was
            return [(m.household_id, "", f"group {m.from_unit_id} merged into {m.to_unit_id}")]
        case events_pb2.HouseholdMoved():
            return [(m.household_id, "", f"moved from {m.from_unit_id} to {m.to_unit_id}")]
        case events_pb2.PersonRegistered():
            return [(m.household_id, m.person_id, f"person registered ({_reason(m.reason)})")]
        case events_pb2.PersonMoved():
            return [
                (m.from_household_id, m.person_id, f"person moved to {m.to_household_id}"),
                (m.to_household_id, m.person_id, f"person moved in from {m.from_household_id}"),
            ]
        case events_pb2.PersonMovedOut():
            return [(m.household_id, m.person_id, "person moved out of the area")]
        case events_pb2.PersonDied():
            return [(m.household_id, m.person_id, f"person died on {m.death_date}")]
        case events_pb2.PersonUpdated():
            fields = ", ".join(m.updated_fields)
            return [(m.household_id, m.person_id, f"person's details corrected: {fields}")]
        case events_pb2.TemporaryStayExtended():
            return [(m.household_id, m.person_id, f"temporary stay extended to {m.stay_end}")]
        case events_pb2.PersonMarkedAbsent():
            state = "marked absent" if m.absent else "absence mark cleared"
            return [(m.household_id, m.person_id, f"person {state}")]
    return []


def _reason(reason: int) -> str:
    """A newer registry's reason, unknown to this build, is shown by its number, not refused."""
    names = events_pb2.RegistrationReason
    if reason not in names.values():
        return f"reason {reason}"
    return names.Name(reason).removeprefix("REGISTRATION_REASON_").lower()  # type: ignore[arg-type]


def history_projection(store: RegistryStore) -> BatchHandler:
    async def project(deliveries: list[Delivery], session: Session) -> list[Document]:
        """A fetch's new events as one write, each partition's in the order published."""
        entries: list[Document] = []
        for delivery in deliveries:
            event = delivery.event
            with delivery.span():  # each event's processing span, as traces expect
                entries += (
                    {
                        "_id": ObjectId(),
                        "household_id": household_id,
                        "event_id": event.id,
                        "event_type": event.type,
                        "occurred_at": event.time,
                        "person_id": person_id,
                        "summary": summary,
                        "actor": event.actor,
                    }
                    for household_id, person_id, summary in _history_lines(delivery.message)
                )
        await store.add_history(entries, session)
        return []

    return project


def history_consumer(
    store: RegistryStore,
    client: AsyncMongoClient[Document],
    *,
    group_id: str,
    instance_id: str,
) -> TopicConsumer:
    return TopicConsumer(
        client,
        store.db,
        topic=TOPIC,
        group_id=group_id,
        instance_id=instance_id,
        handle=history_projection(store),
    )

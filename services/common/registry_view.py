"""A service's own view of the registry, built from the events on civic.registry.v1 and never
from the registry's database: the administrative tree and each household's unit and location;
for a service that targets people (`people=True`) also each household's residence kind, address,
number of residents and the groups merged away it was in, and each resident's household, birth
date, sex and, for a guest, the first and last days of their stay. Ids and the facts other
services act on only: never names or citizen IDs.

Every event becomes a list of writes (`changes`), so a consumer's fetch of events is applied
inside its transaction (`apply_batch`, or `write` beside the service's own work) and a long run
of events outside any (`apply_all`) alike, in one bulk write per collection. Events of different
aggregates arrive on different partitions, in any order between them: every write is an upsert
that commutes with the others (a person may be counted before their household's own event
arrives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from civic.registry.v1 import events_pb2
from google.protobuf.message import Message
from pymongo import ASCENDING, ReplaceOne, UpdateMany, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from services.common.batching import Coalescer
from services.common.consumer import Delivery
from services.common.mongo import Document, Session
from services.common.wire import point_document

# What an event changes: the collection and one write there.
Change = tuple[str, UpdateOne | UpdateMany | ReplaceOne[Document]]

RESIDENT, GONE = "resident", "gone"
# How many merges in a row are followed to the group there now: a bound, should records loop.
MAX_MERGES_FOLLOWED = 10


async def group_now(
    unit_id: str, unit: Document | None, read: Callable[[str], Awaitable[Document | None]]
) -> tuple[str, Document | None]:
    """The group there now, and its record, following merges from `unit_id` (whose record,
    `active` and `merged_into_id` as the registry has them, is `unit`; `read` gives another's,
    or None for a unit not known)."""
    for _ in range(MAX_MERGES_FOLLOWED):
        if unit is None or unit.get("active", True) or not unit.get("merged_into_id"):
            break
        unit_id = unit["merged_into_id"]
        unit = await read(unit_id)
    return unit_id, unit


def living(today: str) -> Document:
    """The view's persons who live in their household on `today` (ISO), as the registry counts
    them: residents, but for a guest whose temporary stay ended before it or begins after it."""
    return {"status": RESIDENT} | staying(today)


def staying(today: str) -> Document:
    """Persons but a guest whose temporary stay's last day (`stay_end`, ISO) is before `today`
    or whose first day (`stay_start`) is after it; one projected before the view kept the days
    counts as staying."""
    return {
        "stay_end": {"$not": {"$lt": today, "$gt": ""}},
        "stay_start": {"$not": {"$gt": today}},
    }


class RegistryView:
    def __init__(self, db: AsyncDatabase[Document], *, people: bool = False) -> None:
        self.db = db
        self.people = people
        self.units = db["units"]
        self.households = db["households"]
        self.persons = db["persons"]
        # Concurrent requests (every ticket filed looks up its household) share a round trip.
        self._household_reads = Coalescer(self._households_by_id)

    async def ensure_indexes(self) -> None:
        await self.households.create_index([("unit_id", ASCENDING), ("_id", ASCENDING)])
        if self.people:
            # Who lives in a household on a day (`living`) is read from the index alone.
            await self.persons.create_index(
                [
                    ("household_id", ASCENDING),
                    ("status", ASCENDING),
                    ("stay_end", ASCENDING),
                    ("stay_start", ASCENDING),
                ]
            )
            # Its prefixes, the indexes before: dropped once (or by another instance already).
            for before in ("household_id_1_status_1", "household_id_1_status_1_stay_end_1"):
                with contextlib.suppress(OperationFailure):
                    await self.persons.drop_index(before)
            # Where groups were merged into: a notice's unit is followed through its merges.
            await self.units.create_index([("merged_into_id", ASCENDING)])

    async def unit(self, unit_id: str, session: Session | None = None) -> Document | None:
        return await self.units.find_one({"_id": unit_id}, session=session)

    async def household(self, household_id: str, session: Session | None = None) -> Document | None:
        if session is not None:
            return await self.households.find_one({"_id": household_id}, session=session)
        return await self._household_reads.submit(household_id)

    async def _households_by_id(self, household_ids: list[str]) -> list[Document | None]:
        found = self.households.find({"_id": {"$in": list(set(household_ids))}})
        by_id = {household["_id"]: household async for household in found}
        # Each caller gets its own copy, whoever else asked for the same household.
        return [dict(by_id[i]) if i in by_id else None for i in household_ids]

    async def apply_all(self, messages: Iterable[Message], session: Session | None = None) -> None:
        """Many events in order, as one bulk write per collection."""
        await self.write((change for m in messages for change in self.changes(m)), session)

    async def apply_batch(self, deliveries: list[Delivery], session: Session) -> list[Document]:
        """A `BatchHandler` for a consumer that only keeps the view: a fetch's events in order,
        in its transaction, in one bulk write per collection; it emits nothing."""
        changes: list[Change] = []
        for delivery in deliveries:
            with delivery.span():
                changes += self.changes(delivery.message)
        await self.write(changes, session)
        return []

    async def write(self, changes: Iterable[Change], session: Session | None = None) -> None:
        """Changes in order, as one ordered bulk write per collection. No write of one
        collection depends on another collection's, so only the order within each counts."""
        writes: dict[str, list[Any]] = {}
        for collection, write in changes:
            writes.setdefault(collection, []).append(write)
        for collection, batch in writes.items():
            await self.db[collection].bulk_write(batch, ordered=True, session=session)

    def changes(self, message: Message) -> list[Change]:
        m: Any = message
        match message:
            case events_pb2.UnitCreated():
                unit = m.unit
                doc = {
                    "_id": unit.unit_id,
                    "kind": unit.kind,
                    "name": unit.name,
                    "parent_id": unit.parent_id,
                    "active": True,
                    "merged_into_id": "",
                }
                return [("units", ReplaceOne({"_id": unit.unit_id}, doc, upsert=True))]
            case events_pb2.UnitRenamed():
                return [("units", UpdateOne({"_id": m.unit_id}, {"$set": {"name": m.new_name}}))]
            case events_pb2.GroupsMerged():
                changes: list[Change] = [
                    _retired(m.source_unit_id, m.target_unit_id),
                    (
                        "households",
                        UpdateMany(
                            {"unit_id": m.source_unit_id}, {"$set": {"unit_id": m.target_unit_id}}
                        ),
                    ),
                ]
                if self.people:
                    changes += [_household(h, _merged(m.source_unit_id)) for h in m.household_ids]
                return changes
            case events_pb2.HouseholdCreated() | events_pb2.HouseholdUpdated():
                fields: Document = {"unit_id": m.unit_id}
                if self.people:  # whom a notice reaches, and whose door to knock on
                    fields |= {"residence_kind": m.residence_kind, "address": m.address}
                if m.HasField("location"):
                    fields["location"] = point_document("location", m.location)
                return [_household(m.household_id, {"$set": fields})]
            case events_pb2.HouseholdMoved():
                moved: Document = {"$set": {"unit_id": m.to_unit_id}}
                if not m.by_merge:  # a move house, or a merge's from before `by_merge`
                    return [_household(m.household_id, moved)]
                # The merge itself, from the household's own partition: whichever of this and
                # GroupsMerged comes first, the household never looks as if it moved house.
                if self.people:
                    moved |= _merged(m.from_unit_id)
                return [
                    _retired(m.from_unit_id, m.to_unit_id),
                    _household(m.household_id, moved),
                ]
        if self.people:
            return _people_changes(message)
        return []


def households_touched(message: Message) -> list[str]:
    """The households whose place, kind or residents an event changes."""
    m: Any = message
    match message:
        case (
            events_pb2.HouseholdCreated()
            | events_pb2.HouseholdUpdated()
            | events_pb2.HouseholdMoved()
            | events_pb2.PersonRegistered()
            | events_pb2.PersonMovedOut()
            | events_pb2.PersonDied()
            | events_pb2.PersonMarkedAbsent()
            | events_pb2.PersonUpdated()
            | events_pb2.TemporaryStayExtended()
        ):
            return [m.household_id]
        case events_pb2.GroupsMerged():
            return list(m.household_ids)
        case events_pb2.PersonMoved():
            return [m.from_household_id, m.to_household_id]
    return []


def _household(household_id: str, update: Document) -> Change:
    return ("households", UpdateOne({"_id": household_id}, update, upsert=True))


def _retired(source_unit_id: str, target_unit_id: str) -> Change:
    retired = {"active": False, "merged_into_id": target_unit_id}
    return ("units", UpdateOne({"_id": source_unit_id}, {"$set": retired}, upsert=True))


def _merged(source_unit_id: str) -> Document:
    """A merged household's mark: it was in the group merged away. Only that, which every
    merge's events add to in any order; whether it is still among the group's households
    (not moved house since) the reader judges from where it is now and where the group's
    merges went (the units' `merged_into_id`), not from which merge's event came last."""
    return {"$addToSet": {"merged_from": source_unit_id}}


def _person(person_id: str, fields: Document) -> Change:
    return ("persons", UpdateOne({"_id": person_id}, {"$set": fields}, upsert=True))


def _residents(household_id: str, by: int) -> Change:
    return _household(household_id, {"$inc": {"residents": by}})


def _people_changes(message: Message) -> list[Change]:
    m: Any = message
    match message:
        case events_pb2.PersonRegistered():
            person = {
                "household_id": m.household_id,
                "birth_date": m.birth_date,
                "sex": m.sex,
                "residence_kind": m.residence_kind,
                "status": RESIDENT,
                "absent": False,
                # A guest's first and last days; none for a permanent resident.
                "stay_start": m.stay_start,
                "stay_end": m.stay_end,
            }
            return [_person(m.person_id, person), _residents(m.household_id, 1)]
        case events_pb2.PersonMoved():
            return [
                _person(m.person_id, {"household_id": m.to_household_id}),
                _residents(m.from_household_id, -1),
                _residents(m.to_household_id, 1),
            ]
        case events_pb2.PersonMovedOut() | events_pb2.PersonDied():
            return [_person(m.person_id, {"status": GONE}), _residents(m.household_id, -1)]
        case events_pb2.PersonMarkedAbsent():
            return [_person(m.person_id, {"absent": m.absent})]
        case events_pb2.PersonUpdated():  # a birth date or sex corrected, say
            return [_person(m.person_id, {"birth_date": m.birth_date, "sex": m.sex})]
        case events_pb2.TemporaryStayExtended():
            return [_person(m.person_id, {"stay_end": m.stay_end})]
    return []

"""A cluster: a ticket and the duplicates linked to it, handled in one place. Its open duplicates
go up with it, never alone (see escalation.escalate), and are decided with it; a duplicate its
decision leaves open, or one handled apart from it, leaves the cluster for good."""

from __future__ import annotations

from datetime import datetime

from civic.tickets.v1 import events_pb2
from pymongo import AsyncMongoClient

from services.common.cloudevents import type_name
from services.common.mongo import Document, Session, in_transaction
from services.common.outbox import Outbox
from services.tickets import domain
from services.tickets.escalation import fresh_deadlines
from services.tickets.events import ticket_event
from services.tickets.store import OPEN_STATUSES, TicketStore

# Not a decision: a duplicate resolved with its primary took the same moment as its own.
OUTCOME_NOT_SHARED = {"$ne": ["$resolved_at", {"$first": "$primary.resolved_at"}]}

UNLINKED = type_name(events_pb2.TicketUnlinked())


async def unlink(
    store: TicketStore,
    outbox: Outbox,
    duplicate: Document,
    session: Session,
    changes: Document | None = None,
) -> tuple[Document, list[Document]]:
    """The duplicate out of its cluster, a ticket of its own from now on (with `changes`): swept
    on its own deadlines, counted in the statistics, no longer among its primary's."""
    primary_id = duplicate["duplicate_of"]
    updated = await store.update(
        duplicate["_id"],
        {**(changes or {}), "duplicate_of": None, "last_change": UNLINKED},
        session,
    )
    await store.update(
        primary_id, {"last_change": UNLINKED}, session, pull={"duplicates": duplicate["_id"]}
    )
    event = events_pb2.TicketUnlinked(ticket_id=duplicate["_id"], duplicate_of=primary_id)
    return updated, [ticket_event(outbox, event, duplicate["_id"])]


async def release(
    store: TicketStore, outbox: Outbox, duplicate: Document, now: datetime, session: Session
) -> tuple[Document, list[Document]]:
    """A duplicate its primary's decision leaves open, on its own where it is. Its deadlines
    start afresh: while linked nobody was held to them (the sweep left it to its primary)."""
    deadlines = await fresh_deadlines(
        store,
        duplicate,
        domain.Level(duplicate["assigned_level"]),
        domain.Status(duplicate["status"]),
        now,
        session,
    )
    return await unlink(store, outbox, duplicate, session, deadlines)


async def release_orphans(
    client: AsyncMongoClient[Document], store: TicketStore, outbox: Outbox, now: datetime
) -> int:
    """Releases open duplicates whose primary is decided or closed: tickets linked before a
    primary's decision released its duplicates, which the sweep (leaving linked duplicates to
    their primary) would otherwise never move again. Run at start; returns how many."""
    orphans = [
        duplicate
        async for duplicate in store.tickets.find(
            {"duplicate_of": {"$ne": None}, "status": {"$in": OPEN_STATUSES}},
            {"_id": 1, "duplicate_of": 1},
        )
        if not await store.tickets.find_one(
            {"_id": duplicate["duplicate_of"], "status": {"$in": OPEN_STATUSES}}, {"_id": 1}
        )
    ]
    for orphan in orphans:

        async def work(session: Session, ticket_id: str = orphan["_id"]) -> None:
            duplicate = await store.get(ticket_id, session)
            if duplicate is None or not duplicate.get("duplicate_of"):
                return  # released meanwhile (another instance starting)
            primary = await store.get(duplicate["duplicate_of"], session)
            if primary is not None and primary["status"] in OPEN_STATUSES:
                return
            _, events = await release(store, outbox, duplicate, now, session)
            await outbox.stage(session, events)

        await in_transaction(client, work)
        outbox.committed()
    return len(orphans)


async def part_decided_orphans(
    client: AsyncMongoClient[Document], store: TicketStore, outbox: Outbox
) -> int:
    """Unlinks decided duplicates whose primary no longer has their outcome: resolved with it,
    then it was reopened (and perhaps rejected) before a reopening let its duplicates go. Left
    linked, they count through it, so their resolution counts nowhere. Run at start; returns
    how many."""
    found = await store.tickets.aggregate(
        [
            {"$match": {"duplicate_of": {"$ne": None}, "status": {"$nin": OPEN_STATUSES}}},
            {"$project": {"duplicate_of": 1, "resolved_at": 1}},
            {
                "$lookup": {
                    "from": store.tickets.name,
                    "localField": "duplicate_of",
                    "foreignField": "_id",
                    "pipeline": [{"$project": {"resolved_at": 1}}],
                    "as": "primary",
                }
            },
            {"$match": {"$expr": OUTCOME_NOT_SHARED}},
            {"$project": {"_id": 1}},
        ]
    )
    orphans = [orphan["_id"] async for orphan in found]
    for orphan_id in orphans:

        async def work(session: Session, ticket_id: str = orphan_id) -> None:
            duplicate = await store.get(ticket_id, session)
            if duplicate is None or not duplicate.get("duplicate_of"):
                return  # unlinked meanwhile (another instance starting)
            primary = await store.get(duplicate["duplicate_of"], session)
            if primary is not None and primary.get("resolved_at") == duplicate["resolved_at"]:
                return
            _, events = await unlink(store, outbox, duplicate, session)
            await outbox.stage(session, events)

        await in_transaction(client, work)
        outbox.committed()
    return len(orphans)

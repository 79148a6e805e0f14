"""The tickets service's events and subscribers: routing each submitted ticket, and keeping the
service's own view of the administrative tree from the registry's events."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime, timedelta

from civic.registry.v1 import events_pb2 as registry_events_pb2
from civic.tickets.v1 import events_pb2
from google.protobuf.message import Message
from pymongo import AsyncMongoClient, UpdateOne

from services.common.auth import current_principal
from services.common.cloudevents import type_name
from services.common.consumer import Delivery, TopicConsumer
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.tickets import domain
from services.tickets.records import rule_for
from services.tickets.store import TicketStore

TOPIC = "civic.tickets.v1"
REGISTRY_TOPIC = "civic.registry.v1"
LINKED = type_name(events_pb2.TicketLinked())
MERGED = type_name(events_pb2.TicketGroupMerged())


def ticket_event(outbox: Outbox, message: Message, ticket_id: str) -> Document:
    """Keyed by ticket, so an integrator reads each ticket's history in order.

    The event is public: it names the official who acted (ce_actor) but never a resident, and
    never the submitter, who appears only as TicketSubmitted's opaque submitter_ref."""
    event = outbox.event(message, key=ticket_id, subject=ticket_id)
    caller = current_principal.get(None)
    if isinstance(message, events_pb2.TicketSubmitted) or caller is None or not caller.is_official:
        event["actor"] = ""
    return event


class Router:
    """Routes submitted tickets by the rules in force, and links each to an open duplicate.

    A fetch's tickets are routed together, in a few round trips whatever their number, with the
    same outcome as routing them one after the other in order."""

    def __init__(
        self,
        store: TicketStore,
        outbox: Outbox,
        clock: Callable[[], datetime],
        duplicate_distance_m: float,
        duplicate_window: timedelta,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.duplicate_distance_m = duplicate_distance_m
        self.duplicate_window = duplicate_window

    async def route(self, deliveries: list[Delivery], session: Session) -> list[Document]:
        submitted = [
            (delivery, delivery.message.ticket_id)
            for delivery in deliveries
            if isinstance(delivery.message, events_pb2.TicketSubmitted)
        ]
        tickets = await self.store.many([ticket_id for _, ticket_id in submitted], session)
        waiting = [
            (delivery, ticket)
            for delivery, ticket_id in submitted
            # Gone, or routed already (a redelivery after a crash): nothing to do.
            if (ticket := tickets.get(ticket_id)) and ticket["status"] == domain.Status.SUBMITTED
        ]
        if not waiting:
            return []
        rules_doc = await self.store.recent_rules()
        assert rules_doc is not None, "rules are seeded at start-up"
        located = [ticket for _, ticket in waiting if ticket.get("location")]
        # Every open ticket near any of these, as each of them would find it: the ones routed
        # earlier in this batch included, as they are left by their routing below.
        nearby = (
            {
                ticket["_id"]: ticket
                for ticket in await self.store.open_near_any(
                    points=[ticket["location"] for ticket in located],
                    meters=self.duplicate_distance_m,
                    categories={ticket["category"] for ticket in located},
                    since=min(t["submitted_at"] for t in located) - self.duplicate_window,
                    session=session,
                )
            }
            if located
            else {}
        )
        now = self.clock()
        writes: list[UpdateOne] = []
        emitted: list[Document] = []
        # Who is linked to whom, as this batch leaves it: a ticket routed before the earlier one
        # it duplicates links to it while that one is still unrouted; when that one in turn
        # links to an older primary, its duplicates go with it, so a cluster is never a chain.
        duplicates = {ticket["_id"]: set(ticket.get("duplicates", [])) for _, ticket in waiting}
        for delivery, ticket in waiting:
            with delivery.span():
                rule = rule_for(rules_doc, ticket["category"])
                assigned = domain.unit_at_level(ticket["origin_unit_id"], rule.level)
                due = domain.deadlines(rule, rule.level, now, acknowledged=False)
                primary = (
                    domain.first_open_nearby(
                        ticket,
                        nearby.values(),
                        area=assigned,
                        meters=self.duplicate_distance_m,
                        window=self.duplicate_window,
                    )
                    if ticket.get("location")
                    else None
                )
                changes: Document = {
                    "status": int(domain.Status.ROUTED),
                    "assigned_unit_id": assigned,
                    "assigned_level": int(rule.level),
                    "department": rule.department,
                    "rule_version": rules_doc["version"],
                    "level_since": now,
                    "acknowledge_by": due.acknowledge_by,
                    "resolve_by": due.resolve_by,
                    "next_deadline": domain.next_deadline(
                        domain.Status.ROUTED, due.acknowledge_by, due.resolve_by
                    ),
                    "last_change": type_name(events_pb2.TicketRouted()),
                    "duplicate_of": primary["_id"] if primary else None,
                }
                followers = duplicates.pop(ticket["_id"], set()) if primary else set()
                if followers:
                    changes["duplicates"] = []
                writes.append(UpdateOne({"_id": ticket["_id"]}, {"$set": changes}))
                if ticket["_id"] in nearby:
                    nearby[ticket["_id"]] |= changes
                emitted.append(
                    ticket_event(
                        self.outbox,
                        events_pb2.TicketRouted(
                            ticket_id=ticket["_id"],
                            category=ticket["category"],
                            assigned_unit_id=assigned,
                            assigned_level=int(rule.level),  # type: ignore[arg-type]
                            department=rule.department,
                            rule_version=rules_doc["version"],
                        ),
                        ticket["_id"],
                    )
                )
                if primary is not None:
                    linked = [ticket["_id"], *sorted(followers)]
                    duplicates.setdefault(primary["_id"], set()).update(linked)
                    # The primary and the followers change too: a queue watcher is told why.
                    writes.append(
                        UpdateOne(
                            {"_id": primary["_id"]},
                            {
                                "$addToSet": {"duplicates": {"$each": linked}},
                                "$set": {"last_change": LINKED},
                            },
                        )
                    )
                    for follower in followers:
                        writes.append(
                            UpdateOne(
                                {"_id": follower},
                                {"$set": {"duplicate_of": primary["_id"], "last_change": LINKED}},
                            )
                        )
                        if follower in nearby:
                            nearby[follower]["duplicate_of"] = primary["_id"]
                    for linked_id in linked:
                        emitted.append(
                            ticket_event(
                                self.outbox,
                                events_pb2.TicketLinked(
                                    ticket_id=linked_id, duplicate_of=primary["_id"]
                                ),
                                linked_id,
                            )
                        )
        await self.store.tickets.bulk_write(writes, ordered=True, session=session)
        return emitted


async def follow_registry(
    store: TicketStore, outbox: Outbox, deliveries: list[Delivery], session: Session
) -> list[Document]:
    """The registry's events keep the service's view of the tree and households; a merge of
    groups also moves the tickets of the group merged away into the group it went into, as
    the registry moves its households: its leader's queue, its residents' "+1"s and the
    duplicates filed there find them, where otherwise they would wait in a retired group
    for the deadline to send them up."""
    await store.view.apply_batch(deliveries, session)
    emitted: list[Document] = []
    for delivery in deliveries:
        if isinstance(delivery.message, registry_events_pb2.GroupsMerged):
            with delivery.span():
                merge = delivery.message
                emitted += await _follow_merge(
                    store, outbox, merge.source_unit_id, merge.target_unit_id, session
                )
    return emitted


async def _follow_merge(
    store: TicketStore, outbox: Outbox, source: str, target: str, session: Session
) -> list[Document]:
    writes: list[UpdateOne] = []
    emitted: list[Document] = []
    for ticket in await store.of_group(source, session):
        moved = {
            unit: target
            for unit in ("origin_unit_id", "assigned_unit_id")
            if ticket.get(unit) == source
        }
        now = ticket | moved
        writes.append(UpdateOne({"_id": ticket["_id"]}, {"$set": moved | {"last_change": MERGED}}))
        message = events_pb2.TicketGroupMerged(
            ticket_id=ticket["_id"],
            from_unit_id=source,
            to_unit_id=target,
            origin_unit_id=now["origin_unit_id"],
            assigned_unit_id=now.get("assigned_unit_id") or "",
        )
        emitted.append(ticket_event(outbox, message, ticket["_id"]))
    if writes:
        await store.tickets.bulk_write(writes, ordered=False, session=session)
    return emitted


def consumers(
    client: AsyncMongoClient[Document],
    store: TicketStore,
    router: Router,
    outbox: Outbox,
    *,
    routing_group: str,
    registry_group: str,
    instance_id: str,
) -> list[TopicConsumer]:
    """The routing of submitted tickets, and the following of the registry's units."""
    return [
        TopicConsumer(
            client,
            store.db,
            topic=TOPIC,
            group_id=routing_group,
            instance_id=instance_id,
            handle=router.route,
            outbox=outbox,
            # Its own TicketRouted and the rest pass by without a transaction each.
            types={type_name(events_pb2.TicketSubmitted())},
        ),
        TopicConsumer(
            client,
            store.db,
            topic=REGISTRY_TOPIC,
            group_id=registry_group,
            instance_id=instance_id,
            handle=functools.partial(follow_registry, store, outbox),
            outbox=outbox,
        ),
    ]

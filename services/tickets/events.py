"""The tickets service's events and subscribers: routing each submitted ticket, and keeping the
service's own view of the administrative tree from the registry's events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from civic.tickets.v1 import events_pb2
from faststream.kafka import KafkaBroker
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from services.common.auth import current_principal
from services.common.broker import subscribe_once
from services.common.cloudevents import CloudEvent, type_name
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.tickets import domain
from services.tickets.records import rule_for
from services.tickets.store import TicketStore

TOPIC = "civic.tickets.v1"
REGISTRY_TOPIC = "civic.registry.v1"


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
    """Routes a submitted ticket by the rules in force, and links it to an open duplicate."""

    def __init__(
        self,
        store: TicketStore,
        outbox: Outbox,
        clock: Callable[[], datetime],
        duplicate_distance_m: float,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.duplicate_distance_m = duplicate_distance_m

    async def route(self, ticket_id: str, session: Session) -> list[Document]:
        ticket = await self.store.get(ticket_id, session)
        if ticket is None or ticket["status"] != domain.Status.SUBMITTED:
            return []  # already routed
        rules_doc = await self.store.recent_rules()
        assert rules_doc is not None, "rules are seeded at start-up"
        rule = rule_for(rules_doc, ticket["category"])
        now = self.clock()
        assigned = domain.unit_at_level(ticket["origin_unit_id"], rule.level)
        due = domain.deadlines(rule, rule.level, now, acknowledged=False)
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
        }
        emitted = []
        primary = None
        if ticket.get("location"):
            primary = await self.store.open_nearby(
                category=ticket["category"],
                point=ticket["location"],
                meters=self.duplicate_distance_m,
                since=ticket["submitted_at"] - domain.DUPLICATE_WINDOW,
                exclude=ticket["_id"],
                area=assigned,
                session=session,
            )
        if primary is not None:
            changes["duplicate_of"] = primary["_id"]
            await self.store.tickets.update_one(
                {"_id": primary["_id"]},
                {"$addToSet": {"duplicates": ticket["_id"]}},
                session=session,
            )
        await self.store.update(ticket["_id"], changes, session)
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
            emitted.append(
                ticket_event(
                    self.outbox,
                    events_pb2.TicketLinked(ticket_id=ticket["_id"], duplicate_of=primary["_id"]),
                    ticket["_id"],
                )
            )
        return emitted


def subscribe(
    broker: KafkaBroker,
    client: AsyncMongoClient[Document],
    store: TicketStore,
    router: Router,
    outbox: Outbox,
    *,
    routing_group: str,
    registry_group: str,
    instance_id: str,
) -> None:
    async def on_ticket_event(
        event: CloudEvent, message: Message, session: Session
    ) -> list[Document]:
        if isinstance(message, events_pb2.TicketSubmitted):
            return await router.route(message.ticket_id, session)
        return []

    async def on_registry_event(
        event: CloudEvent, message: Message, session: Session
    ) -> list[Document]:
        await store.view.apply(message, session)
        return []

    subscribe_once(
        broker,
        client,
        store.db,
        topic=TOPIC,
        group_id=routing_group,
        instance_id=instance_id,
        handle=on_ticket_event,
        outbox=outbox,
        # Its own TicketRouted and the rest pass by without a transaction each.
        types={type_name(events_pb2.TicketSubmitted())},
    )
    subscribe_once(
        broker,
        client,
        store.db,
        topic=REGISTRY_TOPIC,
        group_id=registry_group,
        instance_id=instance_id,
        handle=on_registry_event,
    )

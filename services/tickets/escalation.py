"""Automatic escalation: a ticket not acknowledged or resolved in time goes one level up.

Every instance sweeps; each escalation re-reads the ticket inside its transaction, so two
instances sweeping together escalate a ticket once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from civic.tickets.v1 import events_pb2
from pymongo import AsyncMongoClient

from services.common.cloudevents import type_name
from services.common.mongo import Document, Session, in_transaction
from services.common.outbox import Outbox
from services.common.runtime import Every
from services.tickets import domain
from services.tickets.events import ticket_event
from services.tickets.records import rule_for
from services.tickets.store import TicketStore


async def escalate(
    store: TicketStore,
    outbox: Outbox,
    ticket: Document,
    now: datetime,
    cause: events_pb2.EscalationCause.ValueType,
    session: Session,
    comment: Document | None = None,
) -> tuple[Document, list[Document]]:
    """Moves the ticket one level up with fresh deadlines; at the city it stays as it is."""
    target = domain.escalation_target(ticket["assigned_unit_id"])
    if target is None:
        # Nobody is above the city: it keeps its passed deadline, so it stays overdue in the
        # city's queue (the sweep skips city tickets; see TicketStore.due).
        return ticket, []
    rules_doc = await store.rules_version(ticket["rule_version"], session)
    assert rules_doc is not None
    rule = rule_for(rules_doc, ticket["category"])
    level = domain.level_of(target)
    due = domain.deadlines(rule, level, now, acknowledged=False)
    changes: Document = {
        "status": int(domain.Status.ROUTED),
        "assigned_unit_id": target,
        "assigned_level": int(level),
        "level_since": now,
        "acknowledge_by": due.acknowledge_by,
        "resolve_by": due.resolve_by,
        "next_deadline": domain.next_deadline(
            domain.Status.ROUTED, due.acknowledge_by, due.resolve_by
        ),
        "escalations": ticket.get("escalations", 0) + 1,
        "last_change": type_name(events_pb2.TicketEscalated()),
    }
    push = {"comments": comment} if comment else None
    updated = await store.update(ticket["_id"], changes, session, push=push)
    event = ticket_event(
        outbox,
        events_pb2.TicketEscalated(
            ticket_id=ticket["_id"],
            from_unit_id=ticket["assigned_unit_id"],
            to_unit_id=target,
            to_level=int(level),  # type: ignore[arg-type]
            cause=cause,
        ),
        ticket["_id"],
    )
    return updated, [event]


class Escalator:
    def __init__(
        self,
        client: AsyncMongoClient[Document],
        store: TicketStore,
        outbox: Outbox,
        clock: Callable[[], datetime],
        interval_seconds: float,
    ) -> None:
        self.client = client
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self._sweeping = Every("ticket escalation sweep", interval_seconds, self.sweep)

    async def sweep(self) -> int:
        """Escalates every ticket past its deadline now; returns how many moved."""
        now = self.clock()
        moved = 0
        for candidate in await self.store.due(now):

            async def work(session: Session, ticket_id: str = candidate["_id"]) -> int:
                ticket = await self.store.get(ticket_id, session)
                if ticket is None or not domain.missed(ticket.get("next_deadline"), now):
                    return 0  # handled meanwhile, or escalated by another instance
                if ticket["status"] not in domain.OPEN:
                    return 0
                cause = (
                    events_pb2.ESCALATION_CAUSE_NOT_ACKNOWLEDGED_IN_TIME
                    if ticket["status"] == domain.Status.ROUTED
                    and domain.missed(ticket.get("acknowledge_by"), now)
                    else events_pb2.ESCALATION_CAUSE_NOT_RESOLVED_IN_TIME
                )
                _, emitted = await escalate(self.store, self.outbox, ticket, now, cause, session)
                await self.outbox.stage(session, emitted)
                return len(emitted)

            moved += await in_transaction(self.client, work)
        if moved:
            self.outbox.committed()
        return moved

    def start(self) -> None:
        self._sweeping.start()

    async def stop(self) -> None:
        await self._sweeping.stop()

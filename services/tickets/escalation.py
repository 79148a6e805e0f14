"""Automatic escalation: a ticket not acknowledged or resolved in time goes one level up.

Every instance sweeps; each escalation re-reads the ticket inside its transaction, so two
instances sweeping together escalate a ticket once. Each escalation continues the trace of the
ticket's filing: its TicketEscalated reaches integrators in the trace the resident started.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from civic.tickets.v1 import events_pb2
from pymongo import AsyncMongoClient

from services.common.auth import unit_within
from services.common.cloudevents import type_name
from services.common.mongo import Document, Session, in_transaction
from services.common.outbox import Outbox
from services.common.runtime import Every
from services.common.telemetry import context_from_headers, tracer
from services.tickets import domain
from services.tickets.events import ticket_event
from services.tickets.records import rule_for
from services.tickets.store import TicketStore

_TRACER = tracer("civic.tickets.escalation")


async def escalate(
    store: TicketStore,
    outbox: Outbox,
    ticket: Document,
    now: datetime,
    cause: events_pb2.EscalationCause.ValueType,
    session: Session,
    comment: Document | None = None,
) -> tuple[Document, list[Document]]:
    """Moves the ticket one level up with fresh deadlines, and its open duplicates below that
    level with it; at the city it stays as it is."""
    target = domain.escalation_target(ticket["assigned_unit_id"])
    if target is None:
        # Nobody is above the city: it keeps its passed deadline, so it stays overdue in the
        # city's queue (the sweep skips city tickets; see TicketStore.due).
        return ticket, []
    updated, emitted = await _move(store, outbox, ticket, target, now, cause, session, comment)
    # Its duplicates go with it, as the sweep never moves them alone: a cluster is handled in
    # one place. One at that level or above already (routed by later rules) stays.
    for duplicate in await store.open_duplicates(ticket, session):
        if duplicate["assigned_unit_id"] != target and unit_within(
            duplicate["assigned_unit_id"], target
        ):
            _, moved = await _move(
                store,
                outbox,
                duplicate,
                target,
                now,
                events_pb2.ESCALATION_CAUSE_WITH_PRIMARY,
                session,
            )
            emitted += moved
    return updated, emitted


async def _move(
    store: TicketStore,
    outbox: Outbox,
    ticket: Document,
    target: str,
    now: datetime,
    cause: events_pb2.EscalationCause.ValueType,
    session: Session,
    comment: Document | None = None,
) -> tuple[Document, list[Document]]:
    """The ticket handed to `target`, to acknowledge anew by fresh deadlines there."""
    level = domain.level_of(target)
    changes: Document = {
        "status": int(domain.Status.ROUTED),
        "assigned_unit_id": target,
        "assigned_level": int(level),
        **await fresh_deadlines(store, ticket, level, domain.Status.ROUTED, now, session),
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


async def fresh_deadlines(
    store: TicketStore,
    ticket: Document,
    level: domain.Level,
    status: domain.Status,
    now: datetime,
    session: Session,
) -> Document:
    """The deadlines of a ticket in `status` at `level`, counted from now by the rules that
    routed it."""
    rules_doc = await store.rules_version(ticket["rule_version"], session)
    assert rules_doc is not None
    rule = rule_for(rules_doc, ticket["category"])
    due = domain.deadlines(rule, level, now, acknowledged=status is not domain.Status.ROUTED)
    return {
        "level_since": now,
        "acknowledge_by": due.acknowledge_by,
        "resolve_by": due.resolve_by,
        "next_deadline": domain.next_deadline(status, due.acknowledge_by, due.resolve_by),
    }


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

            with _TRACER.start_as_current_span(
                "escalate overdue ticket",
                context=context_from_headers(candidate.get("trace") or {}),
                attributes={"civic.ticket_id": candidate["_id"]},
            ):
                moved += await in_transaction(self.client, work)
        if moved:
            self.outbox.committed()
        return moved

    def start(self) -> None:
        self._sweeping.start()

    async def stop(self) -> None:
        await self._sweeping.stop()

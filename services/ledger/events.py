"""The ledger's events: each fund's history as a hash chain on civic.ledger.v1, keyed by fund;
and, from civic.registry.v1, where the households it has learned have moved, so that a fund
stops taking a household that has left its unit."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from civic.ledger.v1 import events_pb2
from civic.registry.v1 import events_pb2 as registry_events
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from services.common.cloudevents import type_name
from services.common.consumer import Delivery, TopicConsumer
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.common.wire import timestamp
from services.ledger import domain
from services.ledger.records import transaction_message
from services.ledger.store import LedgerStore, Move

TOPIC = "civic.ledger.v1"
REGISTRY_TOPIC = "civic.registry.v1"
# The registry's events that change where a household lives; the rest pass by unread.
MOVES = frozenset(
    type_name(m) for m in (registry_events.HouseholdMoved(), registry_events.GroupsMerged())
)


def fund_opened(outbox: Outbox, fund: Document) -> tuple[Document, str]:
    """The first event of a fund's chain, and its hash."""
    message = events_pb2.FundOpened(
        fund_id=fund["_id"],
        unit_id=fund["unit_id"],
        name=fund["name"],
        opened_at=timestamp(fund["opened_at"]),
    )
    head = domain.seal(message, 0, "")
    return outbox.event(message, key=fund["_id"], subject=fund["_id"]), head


def transaction_posted(
    outbox: Outbox,
    doc: Document,
    prev_hash: str,
    assessment: events_pb2.Assessment | None = None,
) -> tuple[Document, str]:
    """The event of a transaction linked after `prev_hash`, and its hash (the transaction
    document holds its sequence already); an assessment's carries its campaign's terms and the
    dues it books (`assessment`)."""
    message = events_pb2.TransactionPosted(
        fund_id=doc["fund_id"], transaction=transaction_message(doc), assessment=assessment
    )
    head = domain.seal(message, doc["sequence"], prev_hash)
    return outbox.event(message, key=doc["fund_id"], subject=doc["_id"]), head


def assessment(
    campaign: Document, part: int, parts: int, dues: Iterable[domain.Due]
) -> events_pb2.Assessment:
    """Part `part` (from 1) of a campaign's `parts` assessment transactions, as its event
    carries it: the campaign's terms as stored, and the dues it books, households by id only."""
    return events_pb2.Assessment(
        terms=events_pb2.CampaignTerms(
            name=campaign["name"],
            period=campaign["period"],
            basis=campaign["basis"],
            rate=campaign["rate"],
            exemptions=campaign["exemptions"],
            registry_read_at=timestamp(campaign["registry_read_at"]),
        ),
        part=part,
        parts=parts,
        dues=[
            events_pb2.AssessedDue(
                household_id=due.household_id,
                residents=due.residents,
                amount=due.amount,
                exempt_because=int(due.exempt_because or 0),  # type: ignore[arg-type]
            )
            for due in dues
        ],
    )


def follow_moves(
    client: AsyncMongoClient[Document],
    store: LedgerStore,
    *,
    group_id: str,
    instance_id: str,
) -> TopicConsumer:
    """Keeps the unit of each household the ledger has learned as the registry moves it, and
    which groups were merged away."""

    async def apply(deliveries: list[Delivery], session: Session) -> list[Document]:
        moves: list[Move] = []
        merges: list[tuple[str, str]] = []
        for delivery in deliveries:
            with delivery.span():
                moves += _moves(delivery.message)
                if isinstance(delivery.message, registry_events.GroupsMerged):
                    merges.append(
                        (delivery.message.source_unit_id, delivery.message.target_unit_id)
                    )
        await store.move_households(moves, session)
        await store.record_merges(merges, session)
        return []

    return TopicConsumer(
        client,
        store.db,
        topic=REGISTRY_TOPIC,
        group_id=group_id,
        instance_id=instance_id,
        handle=apply,
        types=MOVES,
    )


def _moves(message: Message) -> list[Move]:
    """A merge moves each of the source group's households (the registry also publishes each
    one's HouseholdMoved, on its own partition: whichever arrives first moves it)."""
    m: Any = message
    match message:
        case registry_events.HouseholdMoved():
            return [(m.household_id, m.from_unit_id, m.to_unit_id)]
        case registry_events.GroupsMerged():
            return [(h, m.source_unit_id, m.target_unit_id) for h in m.household_ids]
    return []

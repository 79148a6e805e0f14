"""The ledger's events: each fund's history as a hash chain on civic.ledger.v1, keyed by fund."""

from __future__ import annotations

from civic.ledger.v1 import events_pb2

from services.common.mongo import Document
from services.common.outbox import Outbox
from services.common.wire import timestamp
from services.ledger import domain
from services.ledger.records import transaction_message

TOPIC = "civic.ledger.v1"


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


def transaction_posted(outbox: Outbox, doc: Document, prev_hash: str) -> tuple[Document, str]:
    """The event of a transaction linked after `prev_hash`, and its hash (the transaction
    document holds its sequence already)."""
    message = events_pb2.TransactionPosted(
        fund_id=doc["fund_id"], transaction=transaction_message(doc)
    )
    head = domain.seal(message, doc["sequence"], prev_hash)
    return outbox.event(message, key=doc["fund_id"], subject=doc["_id"]), head

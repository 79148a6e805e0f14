"""Ledger documents to gRPC messages."""

from __future__ import annotations

from collections.abc import Callable

from civic.ledger.v1 import ledger_pb2

from services.common.mongo import Document
from services.common.wire import timestamp
from services.ledger import domain


def fund_message(doc: Document) -> ledger_pb2.Fund:
    return ledger_pb2.Fund(
        fund_id=doc["_id"],
        unit_id=doc["unit_id"],
        name=doc["name"],
        description=doc.get("description", ""),
        opened_at=timestamp(doc["opened_at"]),
        sequence=doc["sequence"],
        head_hash=doc["head_hash"],
    )


def transaction_message(
    doc: Document,
    names: dict[str, str] | None = None,
    receipt_url: Callable[[str], str] | None = None,
    reversed_by: str = "",
) -> ledger_pb2.Transaction:
    """The transaction as stored. Without `names` and `receipt_url` it is exactly what its event
    carries (no household names, no links), so its hash can be checked against the chain."""
    message = ledger_pb2.Transaction(
        transaction_id=doc["_id"],
        fund_id=doc["fund_id"],
        sequence=doc["sequence"],
        kind=doc["kind"],
        memo=doc.get("memo", ""),
        postings=[
            ledger_pb2.Posting(account=p["account"], amount=p["amount"]) for p in doc["postings"]
        ],
        posted_at=timestamp(doc["posted_at"]),
        posted_by=doc["posted_by"],
        request_id=doc["request_id"],
        campaign_id=doc.get("campaign_id", ""),
        reverses_transaction_id=doc.get("reverses") or "",
        reversed_by_transaction_id=reversed_by,
    )
    if contribution := doc.get("contribution"):
        household_id = contribution.get("household_id") or ""
        message.contribution.CopyFrom(
            ledger_pb2.Contribution(
                household_id=household_id,
                campaign_id=contribution.get("campaign_id", ""),
                method=contribution["method"],
                receipt_number=contribution["receipt_number"],
                paid_on=contribution["paid_on"],
                household_name=(names or {}).get(household_id, ""),
            )
        )
    if expense := doc.get("expense"):
        key = expense["receipt_object_key"]
        message.expense.CopyFrom(
            ledger_pb2.Expense(
                category=expense["category"],
                payee=expense["payee"],
                approved_by=expense["approved_by"],
                method=expense["method"],
                receipt_object_key=key,
                spent_on=expense["spent_on"],
                receipt_url=receipt_url(key) if receipt_url else "",
            )
        )
    return message


def campaign_message(doc: Document) -> ledger_pb2.Campaign:
    return ledger_pb2.Campaign(
        campaign_id=doc["_id"],
        fund_id=doc["fund_id"],
        unit_id=doc["unit_id"],
        name=doc["name"],
        period=doc["period"],
        basis=doc["basis"],
        rate=doc["rate"],
        exemptions=doc["exemptions"],
        registry_read_at=timestamp(doc["registry_read_at"]),
        dues=[
            ledger_pb2.HouseholdDue(
                household_id=due["household_id"],
                household_name=due["name"],
                residents=due["residents"],
                amount=due["amount"],
                exempt_because=due["exempt_because"],
            )
            for due in doc["dues"]
        ],
        total_due=doc["total_due"],
        transaction_id=doc["transaction_id"],
        # Campaigns declared before an assessment could take several transactions have one.
        transaction_ids=doc.get("transaction_ids") or [doc["transaction_id"]],
    )


def balances_message(balances: dict[str, int]) -> list[ledger_pb2.AccountBalance]:
    return [
        ledger_pb2.AccountBalance(account=account, balance=balance)
        for account, balance in sorted(balances.items())
        if balance
    ]


def receivables_message(owed: dict[str, domain.Owed]) -> list[ledger_pb2.CampaignReceivables]:
    return [
        ledger_pb2.CampaignReceivables(
            campaign_id=campaign, outstanding=o.outstanding, households_owing=o.households
        )
        for campaign, o in sorted(owed.items())
        if o.outstanding
    ]

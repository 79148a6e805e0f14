"""Statements of funds with a long history: the balances a statement opens and closes with are
the sums of everything before and through its period, read without the history before it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from civic.ledger.v1 import ledger_pb2

from services.ledger import domain
from services.ledger.main import LedgerService
from tests.conftest import Clock
from tests.indexes import examined
from tests.ledger.conftest import Books, rid
from tests.ledger.test_limits_and_reads import entry

RATE = 100_000


def statement_request(
    books: Books, start: datetime, end: datetime | None = None, **kw: Any
) -> ledger_pb2.GetStatementRequest:
    request = ledger_pb2.GetStatementRequest(fund_id=books.fund_id, **kw)
    getattr(request, "from").FromDatetime(start)
    if end is not None:
        request.to.FromDatetime(end)
    return request


async def declare(books: Books) -> ledger_pb2.Campaign:
    response = await books.leader.DeclareCampaign(
        ledger_pb2.DeclareCampaignRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            name="Phí vệ sinh",
            period="2026",
            basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
            rate=RATE,
        )
    )
    campaign: ledger_pb2.Campaign = response.campaign
    return campaign


async def reverse(books: Books, transaction_id: str) -> None:
    await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=rid(), fund_id=books.fund_id, transaction_id=transaction_id, reason="nhầm"
        )
    )


async def history(books: Books) -> None:
    """Money in, a campaign of two transactions with a payment, a reversed payment, another
    campaign cancelled whole, an expense."""
    await books.post(("cash", 1_000_000), ("equity/opening", -1_000_000))
    campaign = await declare(books)
    assert len(campaign.transaction_ids) == 2
    await books.contribute(RATE, "an", campaign.campaign_id)
    mistaken = await books.contribute(RATE, "dung", campaign.campaign_id)
    await reverse(books, mistaken.transaction_id)
    await books.contribute(RATE, "dung", campaign.campaign_id)
    cancelled = await declare(books)
    await reverse(books, cancelled.transaction_ids[-1])
    await books.post(("expense/sanitation", 30_000), ("cash", -30_000))
    await books.contribute(50_000)  # a donation


def nonzero(balances: dict[str, int]) -> dict[str, int]:
    return {account: balance for account, balance in balances.items() if balance}


async def test_a_statements_balances_are_the_sums_before_and_through_its_period(
    books: Books, ledger_service: LedgerService, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With history before the period, inside it and after it (payments and their reversals,
    campaigns of several transactions, one cancelled), the statement opens and closes with
    what every transaction before its start, and through its end, sums to."""
    monkeypatch.setattr(domain, "MAX_POSTINGS", 3)  # a campaign of the group's four: two
    await history(books)
    clock.advance(days=1)
    start = clock()
    await history(books)
    first = (await books.auditor.GetFund(ledger_pb2.GetFundRequest(fund_id=books.fund_id))).fund
    paid = await books.auditor.GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(
            fund_id=books.fund_id, household_id=books.households["an"]
        )
    )
    await reverse(books, paid.payments[0].transaction_id)  # a payment before the period
    clock.advance(days=1)
    end = clock()
    await history(books)

    store = ledger_service.store
    fund_id = books.fund_id
    _, before = await store.balances_as_of(fund_id, {"posted_at": {"$lt": start}})
    _, through = await store.balances_as_of(fund_id, {"posted_at": {"$lt": end}})
    async with store.snapshot() as session:
        head = (await store.fund(fund_id, session) or {})["sequence"]
        opening, closing = await store.statement_balances(fund_id, start, end, head, session)
    assert nonzero(opening) == nonzero(before)
    assert nonzero(closing) == nonzero(through)
    # Through an earlier transaction of the chain: as if the later ones were not posted yet.
    async with store.snapshot() as session:
        _, closing = await store.statement_balances(fund_id, start, end, first.sequence, session)
    _, upto = await store.balances_as_of(
        fund_id, {"posted_at": {"$lt": end}, "sequence": {"$lte": first.sequence}}
    )
    assert nonzero(closing) == nonzero(upto)

    statement = (await books.auditor.GetStatement(statement_request(books, start, end))).statement
    assert statement.opening_available == before["cash"] + before.get("bank", 0)
    assert {b.account: b.balance for b in statement.closing_balances} == nonzero(through)
    assert statement.closing_available == through["cash"] + through.get("bank", 0)


async def test_a_recent_periods_statement_does_not_read_the_older_transactions(
    books: Books, ledger_service: LedgerService, clock: Clock
) -> None:
    older = 300
    batch = [entry(books.fund_id, ("cash", 1_000), ("equity/x", -1_000)) for _ in range(older)]
    await books.treasurer.PostTransactions(ledger_pb2.PostTransactionsRequest(transactions=batch))
    clock.advance(days=30)
    start = clock()
    for _ in range(3):
        await books.post(("expense/y", 500), ("cash", -500))
    async with examined(ledger_service.store.db, books.fund_id) as cost:
        statement = (await books.auditor.GetStatement(statement_request(books, start))).statement
    assert len(statement.lines) == 3
    assert statement.opening_available == older * 1_000
    assert statement.closing_available == older * 1_000 - 1_500
    # The fund, its few balances and the period's three transactions; not the 300 before.
    assert cost.docs < 30, cost
    assert cost.keys < 30, cost

"""Statements of funds with a long history: the balances a statement opens and closes with are
the sums of everything before and through its period, read without the history before it."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import datetime, timedelta
from typing import Any

import grpc
import pypdf
import pytest
from civic.common.v1.types_pb2 import PageRequest
from civic.ledger.v1 import ledger_pb2

from services.ledger import domain
from services.ledger.main import LedgerService
from tests.conftest import Clock
from tests.indexes import examined
from tests.ledger.conftest import Books, rid
from tests.ledger.test_expenses_and_statements import _http
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
    campaign = await books.declare_per_household(RATE)
    assert len(campaign.transaction_ids) == 2
    await books.contribute(RATE, "an", campaign.campaign_id)
    mistaken = await books.contribute(RATE, "dung", campaign.campaign_id)
    await reverse(books, mistaken.transaction_id)
    await books.contribute(RATE, "dung", campaign.campaign_id)
    cancelled = await books.declare_per_household(RATE)
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
        opening, closing = await store.statement_balances(
            fund_id, domain.StatementPeriod(start, end, head), session
        )
    assert opening == domain.receivables_apart(before)
    assert closing == domain.receivables_apart(through)
    assert closing.owed and all(o.outstanding > 0 for o in closing.owed.values())
    # Through an earlier transaction of the chain: as if the later ones were not posted yet.
    async with store.snapshot() as session:
        _, closing = await store.statement_balances(
            fund_id, domain.StatementPeriod(start, end, first.sequence), session
        )
    _, upto = await store.balances_as_of(
        fund_id, {"posted_at": {"$lt": end}, "sequence": {"$lte": first.sequence}}
    )
    assert closing == domain.receivables_apart(upto)

    statement = (await books.auditor.GetStatement(statement_request(books, start, end))).statement
    assert statement.opening_available == before["cash"] + before.get("bank", 0)
    owed = domain.receivables_apart(through)
    assert {b.account: b.balance for b in statement.closing_balances} == owed.balances
    assert {
        r.campaign_id: domain.Owed(r.outstanding, r.households_owing)
        for r in statement.closing_receivables
    } == owed.owed
    assert statement.closing_available == through["cash"] + through.get("bank", 0)


async def cash_in(books: Books, count: int) -> None:
    """`count` transactions of 1,000 into cash, in one call."""
    batch = [entry(books.fund_id, ("cash", 1_000), ("equity/x", -1_000)) for _ in range(count)]
    await books.treasurer.PostTransactions(ledger_pb2.PostTransactionsRequest(transactions=batch))


async def test_a_recent_periods_statement_does_not_read_the_older_transactions(
    books: Books, ledger_service: LedgerService, clock: Clock
) -> None:
    older = 300
    await cash_in(books, older)
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


def header(statement: ledger_pb2.Statement) -> ledger_pb2.Statement:
    """The statement without its lines."""
    copy = ledger_pb2.Statement()
    copy.CopyFrom(statement)
    del copy.lines[:]
    return copy


async def read_pages(
    books: Books, request: ledger_pb2.GetStatementRequest, between: int = 0
) -> list[ledger_pb2.Statement]:
    """Every page of the statement, with `between` new transactions posted after each page."""
    pages = []
    while True:
        response = await books.auditor.GetStatement(request)
        pages.append(response.statement)
        for _ in range(between):
            await books.post(("cash", 7), ("income/late", -7))
        if not response.next_page_token:
            return pages
        request.page.page_token = response.next_page_token


def movements(fund_id: str, count: int) -> list[ledger_pb2.PostTransactionRequest]:
    """Money in, and every third transaction some of it out."""
    return [
        entry(fund_id, ("cash", -(i + 1)), ("expense/x", i + 1))
        if i % 3 == 2
        else entry(fund_id, ("cash", 10 * (i + 1)), ("income/x", -10 * (i + 1)))
        for i in range(count)
    ]


@pytest.mark.parametrize("until", ["now", "tomorrow"])
async def test_a_statement_read_page_by_page_gives_every_line_once_under_one_header(
    books: Books, clock: Clock, until: str
) -> None:
    """Pages of a statement longer than one, read while transactions are posted between them:
    each line of the period on exactly one page, in the chain's order, under the same header
    (over the whole period) on every page. Nor does a period ending tomorrow take in what was
    posted after its first page: the first page pinned the chain's head."""
    await books.post(("cash", 1_000), ("equity/opening", -1_000))
    clock.advance(hours=1)
    start = clock()
    batch = movements(books.fund_id, 250)
    posted = (
        await books.treasurer.PostTransactions(
            ledger_pb2.PostTransactionsRequest(transactions=batch)
        )
    ).transactions
    end = clock() + timedelta(days=1) if until == "tomorrow" else None
    request = statement_request(books, start, end, page=PageRequest(page_size=100))
    pages = await read_pages(books, request, between=2)
    assert [len(page.lines) for page in pages] == [100, 100, 50]
    lines = [line for page in pages for line in page.lines]
    assert [line.transaction_id for line in lines] == [t.transaction_id for t in posted]
    assert [line.sequence for line in lines] == sorted(line.sequence for line in lines)
    assert all(header(page) == header(pages[0]) for page in pages)
    money_in = sum(10 * (i + 1) for i in range(250) if i % 3 != 2)
    money_out = sum(i + 1 for i in range(250) if i % 3 == 2)
    first = pages[0]
    assert (first.line_count, first.total_in, first.total_out) == (250, money_in, money_out)
    assert (first.opening_available, first.closing_available) == (
        1_000,
        1_000 + money_in - money_out,
    )
    assert first.fund.sequence == posted[-1].sequence
    # Asked again from its first page, the statement takes in what was posted meanwhile.
    request.page.page_token = ""
    again = (await books.auditor.GetStatement(request)).statement
    assert again.line_count == 250 + 2 * len(pages)
    # Asked without a page, as callers from before paging ask: every line in one answer.
    request.ClearField("page")
    unpaged = await books.auditor.GetStatement(request)
    assert len(unpaged.statement.lines) == again.line_count and not unpaged.next_page_token


async def test_every_page_of_a_long_statement_fits_a_grpc_message(
    books: Books, clock: Clock
) -> None:
    """3,250 lines with the longest memos are over 5 MB, past the 4 MiB a gRPC client takes by
    default: a statement is answered a page at a time, each page well under it. The export of
    the last 250 writes each of them to its files, and answers with the first page of them
    and the token for the rest."""
    memo = "ữ" * domain.MAX_TEXT

    async def post(count: int) -> None:
        batch = [entry(books.fund_id, ("cash", 5), ("income/x", -5)) for _ in range(count)]
        for posting in batch:
            posting.memo = memo
        await books.treasurer.PostTransactions(
            ledger_pb2.PostTransactionsRequest(transactions=batch)
        )

    for _ in range(3):
        await post(1000)
    clock.advance(minutes=1)
    start = clock()
    await post(250)
    # A caller that does not page is told to, not given a first page it would take for all.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.auditor.GetStatement(ledger_pb2.GetStatementRequest(fund_id=books.fund_id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (refused.value.details() or "").startswith("page:")
    request = ledger_pb2.GetStatementRequest(
        fund_id=books.fund_id, page=PageRequest(page_size=1000)
    )
    sizes = []
    while True:
        response = await books.auditor.GetStatement(request)
        sizes.append((len(response.statement.lines), response.ByteSize()))
        if not response.next_page_token:
            break
        request.page.page_token = response.next_page_token
    assert [lines for lines, _ in sizes] == [1000, 1000, 1000, 250]
    assert all(size < 2 * 1024 * 1024 for _, size in sizes), sizes

    period = ledger_pb2.ExportStatementRequest(fund_id=books.fund_id)
    getattr(period, "from").FromDatetime(start)
    exported = await books.auditor.ExportStatement(period)
    # A hundred lines of about 1.6 kB, not 250.
    assert exported.ByteSize() < 200 * 1024, exported.ByteSize()
    assert (len(exported.statement.lines), exported.statement.line_count) == (100, 250)
    assert exported.statement.opening_available == 5 * 3000
    raw = await asyncio.to_thread(_http, "GET", exported.csv_url)
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    body = [row for row in rows if row and row[-1].startswith("tx-")]
    assert len(body) == 250
    assert [row[-1] for row in body[:100]] == [
        line.transaction_id for line in exported.statement.lines
    ]
    assert rows[-2][:2] == ["Tổng thu (đ)", str(5 * 250)]
    # The printed statement has every line of every page read, each memo whole.
    pdf = await asyncio.to_thread(_http, "GET", exported.pdf_url)
    printed = await asyncio.to_thread(
        lambda: "".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(pdf)).pages)
    )
    assert [row[-1] for row in body] == re.findall(r"tx-\w+", printed)
    assert printed.count("ữ") == 250 * domain.MAX_TEXT
    # The export's token reads on from its first page, in the statement as exported.
    rest = statement_request(books, start, page=PageRequest(page_token=exported.next_page_token))
    later = await read_pages(books, rest)
    assert [row[-1] for row in body[100:]] == [
        line.transaction_id for page in later for line in page.lines
    ]
    assert all(header(page) == header(exported.statement) for page in later)


async def test_a_page_token_no_statement_gave_is_invalid(books: Books) -> None:
    await books.post(("cash", 10), ("income/x", -10))
    for page, field in (
        (PageRequest(page_token="x"), "page.page_token"),
        (PageRequest(page_token="0.1795000000000000.7"), "page.page_token"),  # past the head
        (PageRequest(page_token="0.99999999999999999999.1"), "page.page_token"),
        (PageRequest(page_size=1001), "page.page_size"),
    ):
        request = ledger_pb2.GetStatementRequest(fund_id=books.fund_id, page=page)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await books.auditor.GetStatement(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, page
        assert (refused.value.details() or "").startswith(f"{field}: "), refused.value.details()

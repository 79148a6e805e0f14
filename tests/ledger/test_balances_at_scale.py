"""The balances of a ward's fund, whose accounts include one receivable per household and
campaign: answered a page at a time, every page as of the moment the first one read."""

from __future__ import annotations

import grpc
import pytest
from civic.common.v1.types_pb2 import PageRequest
from civic.ledger.v1 import ledger_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.ledger import domain
from services.ledger.main import LedgerService
from tests.conftest import Clock
from tests.indexes import examined
from tests.ledger.conftest import Books
from tests.ledger.test_statements_at_scale import cash_in, history, nonzero

DUE = 50_000


def receivables(campaign: str, households: list[str]) -> list[tuple[str, int]]:
    """A campaign's assessment of `households`: each owes DUE, booked against income/dues."""
    owed = [(domain.receivable(campaign, household), DUE) for household in households]
    return [*owed, ("income/dues", -DUE * len(owed))]


async def read_pages(
    books: Books, request: ledger_pb2.GetBalancesRequest
) -> list[ledger_pb2.GetBalancesResponse]:
    pages = []
    while True:
        response = await books.auditor.GetBalances(request)
        pages.append(response)
        if not response.next_page_token:
            return pages
        request.page.page_token = response.next_page_token


async def test_a_ward_funds_balances_past_what_a_grpc_message_holds_come_a_page_at_a_time(
    books: Books,
) -> None:
    """20,000 receivables with the longest ids a campaign and a household may have: their
    balances are over the 4 MiB a gRPC client takes by default. Each page is well under it,
    and the pages hold every account once, in order."""
    campaign = "c" * 100
    households = [f"{i:05d}".ljust(100, "h") for i in range(20_000)]
    parts = [households[start : start + 4000] for start in range(0, len(households), 4000)]
    for part in parts:  # a request of them all would itself be past 4 MiB
        await books.post(*receivables(campaign, part))
    expected = {domain.receivable(campaign, h): DUE for h in households}
    expected["income/dues"] = -DUE * len(households)

    # A caller that does not page is told to, not given a first page it would take for all.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.auditor.GetBalances(ledger_pb2.GetBalancesRequest(fund_id=books.fund_id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (refused.value.details() or "").startswith("page:")
    pages = await read_pages(
        books,
        ledger_pb2.GetBalancesRequest(fund_id=books.fund_id, page=PageRequest(page_size=1000)),
    )
    accounts = [b.account for page in pages for b in page.balances]
    assert accounts == sorted(expected)
    assert {b.account: b.balance for page in pages for b in page.balances} == expected
    assert sum(page.ByteSize() for page in pages) > 4 * 1024 * 1024
    assert all(page.ByteSize() < 512 * 1024 for page in pages)
    assert {page.sequence for page in pages} == {len(parts)}


async def test_pages_of_balances_show_the_moment_the_first_page_read(
    books: Books, ledger_service: LedgerService
) -> None:
    """Postings between pages (a receivable not yet read paid off, one already read paid, a
    new household's and a new campaign's receivables, cash spent) change no page: every page
    shows the balances as of the transaction the first one read, each account on one page."""
    households = [f"h{i:03d}" for i in range(300)]
    await books.post(("cash", 1_000_000), ("equity/opening", -1_000_000))
    await books.post(*receivables("c1", households))
    await books.post(*receivables("c2", households[:100]))
    between = [
        (("cash", DUE), (domain.receivable("c2", "h099"), -DUE)),
        (("cash", DUE), (domain.receivable("c1", "h000"), -DUE)),
        receivables("c1", ["h000a", "zzz"]),
        receivables("c0", ["h001"]),
        (("expense/x", 70_000), ("cash", -70_000)),
    ]
    request = ledger_pb2.GetBalancesRequest(fund_id=books.fund_id, page=PageRequest(page_size=50))
    pages = []
    while True:
        response = await books.auditor.GetBalances(request)
        pages.append(response)
        if between:
            await books.post(*between.pop(0))
        if not response.next_page_token:
            break
        request.page.page_token = response.next_page_token
    assert not between
    pinned = pages[0].sequence
    _, then = await ledger_service.store.balances_as_of(
        books.fund_id, {"sequence": {"$lte": pinned}}
    )
    accounts = [b.account for page in pages for b in page.balances]
    assert accounts == sorted(a for a, n in then.items() if n)
    assert {b.account: b.balance for page in pages for b in page.balances} == then
    assert all(
        (page.sequence, page.available, page.hash) == (pinned, 1_000_000, pages[0].hash)
        for page in pages
    )
    assert pages[-1].head_sequence == pinned + 5
    # Asked without a page, as callers from before paging ask: every account in one answer.
    unpaged = await books.auditor.GetBalances(ledger_pb2.GetBalancesRequest(fund_id=books.fund_id))
    assert len(unpaged.balances) > 300 and not unpaged.next_page_token
    # Asked again from its first page, the balances take in what was posted meanwhile.
    now = await books.balances()
    assert now["cash"] == 1_000_000 + 2 * DUE - 70_000
    assert domain.receivable("c1", "zzz") in now
    assert domain.receivable("c1", "h000") not in now


async def test_the_balances_of_one_campaigns_receivables(books: Books) -> None:
    """account_prefix "receivable/<campaign>/": who still owes that campaign, page by page; a
    page token is read with the prefix it was given for."""
    households = [f"h{i:02d}" for i in range(30)]
    await books.post(*receivables("c1", households))
    await books.post(*receivables("c2", households))
    await books.post(("cash", DUE), (domain.receivable("c1", "h07"), -DUE))
    request = ledger_pb2.GetBalancesRequest(
        fund_id=books.fund_id, account_prefix="receivable/c1/", page=PageRequest(page_size=10)
    )
    pages = await read_pages(books, request)
    assert [len(page.balances) for page in pages] == [10, 10, 9]
    owing = {b.account: b.balance for page in pages for b in page.balances}
    assert owing == {domain.receivable("c1", h): DUE for h in households if h != "h07"}
    assert all(page.available == DUE for page in pages)

    other = ledger_pb2.GetBalancesRequest(
        fund_id=books.fund_id,
        account_prefix="receivable/c2/",
        page=PageRequest(page_token=pages[0].next_page_token),
    )
    for wrong, token in [
        (other, ""),
        (request, "not a token"),
        (request, "-1|receivable/c1/h01"),
        (request, f"{pages[0].sequence + 1}|receivable/c1/h01"),
    ]:
        if token:
            wrong.page.page_token = token
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await books.auditor.GetBalances(wrong)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page.page_token" in (error.value.details() or "")


async def test_balances_at_any_point_of_the_chain_are_its_history_summed(
    books: Books, ledger_service: LedgerService, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After every transaction of a history of payments and their reversals, campaigns of
    several transactions, one cancelled, and as of the time each was posted, the balances are
    what the transactions up to it sum to: whether read from the maintained balances less what
    was posted since (a recent point) or summed from the history before it (an early one)."""
    monkeypatch.setattr(domain, "MAX_POSTINGS", 3)  # a campaign of the group's four: two
    for _ in range(3):
        await history(books)
        clock.advance(days=1)
    store, fund_id = ledger_service.store, books.fund_id
    head = (await books.auditor.GetFund(ledger_pb2.GetFundRequest(fund_id=fund_id))).fund
    for sequence in range(1, head.sequence + 2):
        _, summed = await store.balances_as_of(fund_id, {"sequence": {"$lte": sequence}})
        assert await books.balances(as_of_sequence=sequence) == nonzero(summed), sequence
        response = await books.auditor.GetBalances(
            ledger_pb2.GetBalancesRequest(fund_id=fund_id, as_of_sequence=sequence)
        )
        assert response.available == summed.get("cash", 0) + summed.get("bank", 0)
        assert response.sequence == min(sequence, head.sequence)
    transactions = await store.transactions.find({"fund_id": fund_id}).to_list()
    for posted_at in sorted({t["posted_at"] for t in transactions}):
        at = Timestamp()
        at.FromDatetime(posted_at)
        _, summed = await store.balances_as_of(fund_id, {"posted_at": {"$lte": posted_at}})
        assert await books.balances(as_of=at) == nonzero(summed), posted_at


async def test_balances_at_a_recent_moment_do_not_read_the_older_transactions(
    books: Books, ledger_service: LedgerService, clock: Clock
) -> None:
    older = 300
    await cash_in(books, older)
    clock.advance(days=30)
    spent = [await books.post(("expense/y", 500), ("cash", -500)) for _ in range(3)]
    clock.advance(minutes=1)
    await books.post(("expense/y", 500), ("cash", -500))
    for request in [
        ledger_pb2.GetBalancesRequest(fund_id=books.fund_id, as_of=spent[-1].posted_at),
        ledger_pb2.GetBalancesRequest(fund_id=books.fund_id, as_of_sequence=older + 2),
    ]:
        async with examined(ledger_service.store.db, books.fund_id) as cost:
            response = await books.auditor.GetBalances(request)
        assert {b.account: b.balance for b in response.balances}["cash"] == response.available
        assert response.available == older * 1_000 - (response.sequence - older) * 500
        # The fund, its few balances and the transactions since; not the 300 before.
        assert cost.docs < 30, cost
        assert cost.keys < 30, cost


async def test_a_statements_header_stays_small_however_many_households_owe(
    books: Books,
) -> None:
    """3,000 households owing two campaigns, with the longest ids: the statement's header holds
    each account but the receivables, and one sum per campaign of what its households still
    owe, not a balance per household (which would be over 1 MB, on every page)."""
    households = [f"{i:05d}".ljust(100, "h") for i in range(3_000)]
    campaigns = ["a" * 100, "b" * 100]
    await books.post(("cash", 1_000_000), ("equity/opening", -1_000_000))
    for campaign in campaigns:
        await books.post(*receivables(campaign, households))
    await books.post(("cash", DUE), (domain.receivable(campaigns[0], households[7]), -DUE))
    response = await books.auditor.GetStatement(
        ledger_pb2.GetStatementRequest(fund_id=books.fund_id, page=PageRequest(page_size=1))
    )
    statement = response.statement
    assert statement.ByteSize() < 2048
    assert {b.account: b.balance for b in statement.closing_balances} == {
        "cash": 1_000_000 + DUE,
        "equity/opening": -1_000_000,
        "income/dues": -2 * DUE * len(households),
    }
    assert [
        (r.campaign_id, r.outstanding, r.households_owing) for r in statement.closing_receivables
    ] == [
        (campaigns[0], DUE * (len(households) - 1), len(households) - 1),
        (campaigns[1], DUE * len(households), len(households)),
    ]


async def statement_cost(
    books: Books, ledger_service: LedgerService
) -> tuple[ledger_pb2.Statement, int]:
    """A statement's first page of one line, over the fund's whole history, and the bytes
    MongoDB answered the service with for it."""
    request = ledger_pb2.GetStatementRequest(fund_id=books.fund_id, page=PageRequest(page_size=1))
    getattr(request, "from").FromSeconds(1)
    async with examined(ledger_service.store.db, books.fund_id) as cost:
        response = await books.auditor.GetStatement(request)
    return response.statement, cost.bytes_returned


async def test_a_statements_header_is_read_summed_whatever_the_number_of_households(
    books: Books, ledger_service: LedgerService
) -> None:
    """The header's receivables come from MongoDB already summed per campaign: ten times the
    households owing moves no more data from it for a page of the statement."""
    await books.post(("cash", 1_000_000), ("equity/opening", -1_000_000))
    await books.post(*receivables("c1", [f"h{i:05d}" for i in range(300)]))
    await books.post(("cash", DUE), (domain.receivable("c1", "h00007"), -DUE))
    few, before = await statement_cost(books, ledger_service)
    for start in range(300, 3300, 1000):
        await books.post(*receivables("c1", [f"h{i:05d}" for i in range(start, start + 1000)]))
    many, after = await statement_cost(books, ledger_service)
    assert [(r.outstanding, r.households_owing) for r in few.closing_receivables] == [
        (299 * DUE, 299)
    ]
    assert [(r.outstanding, r.households_owing) for r in many.closing_receivables] == [
        (3299 * DUE, 3299)
    ]
    assert after < before + 1024, (before, after)


async def test_statement_headers_are_the_balances_summed_straightforwardly(
    books: Books, ledger_service: LedgerService, clock: Clock
) -> None:
    """Several campaigns, payments in part and in full, a payment reversed, a campaign
    cancelled, receivables paid off after a period ends: over every period between the days of
    that history, the header holds what the transactions of and before the period sum to,
    account by account, the receivables summed per campaign, and so does every later page."""
    households = [f"h{i:02d}" for i in range(12)]
    moments = [clock()]
    await books.post(("cash", 500_000), ("equity/opening", -500_000))
    await books.post(*receivables("c1", households))
    await books.post(*receivables("c2", households[:5]))
    clock.advance(days=1)
    moments.append(clock())
    for household in households[:4]:
        await books.post(("cash", DUE), (domain.receivable("c1", household), -DUE))
    mistaken = await books.post(("bank", DUE), (domain.receivable("c2", "h00"), -DUE))
    await books.post(("cash", 20_000), (domain.receivable("c2", "h01"), -20_000))
    clock.advance(days=1)
    moments.append(clock())
    await books.reverse(mistaken.transaction_id, "nhầm")
    cancelled = await books.post(*receivables("c3", households[6:]))
    await books.post(("cash", DUE), (domain.receivable("c1", "h11"), -DUE))
    await books.post(("expense/sanitation", 30_000), ("cash", -30_000))
    clock.advance(days=1)
    moments.append(clock())
    await books.reverse(cancelled.transaction_id, "hủy")
    await books.post(("cash", 30_000), (domain.receivable("c2", "h01"), -30_000))
    clock.advance(days=1)
    moments.append(clock())
    store = ledger_service.store
    for i, start in enumerate(moments):
        for end in moments[i + 1 :]:
            _, before = await store.balances_as_of(books.fund_id, {"posted_at": {"$lt": start}})
            _, through = await store.balances_as_of(books.fund_id, {"posted_at": {"$lt": end}})
            expected = domain.receivables_apart(through)
            request = ledger_pb2.GetStatementRequest(
                fund_id=books.fund_id, page=PageRequest(page_size=2)
            )
            getattr(request, "from").FromDatetime(start)
            request.to.FromDatetime(end)
            while True:
                response = await books.auditor.GetStatement(request)
                statement = response.statement
                assert statement.opening_available == domain.available(before)
                assert statement.closing_available == domain.available(through)
                assert {
                    b.account: b.balance for b in statement.closing_balances
                } == expected.balances
                assert [
                    (r.campaign_id, r.outstanding, r.households_owing)
                    for r in statement.closing_receivables
                ] == [
                    (campaign, o.outstanding, o.households)
                    for campaign, o in sorted(expected.owed.items())
                ]
                if not response.next_page_token:
                    break
                request.page.page_token = response.next_page_token
                # Paid off after the period: no page's header takes it in.
                await books.post(("cash", 1), (domain.receivable("c1", "h05"), -1))

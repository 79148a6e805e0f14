"""Who has paid a ward's campaign, which lists up to 20,000 households: answered a page of
households at a time, every page under the whole campaign's counts and sums, summed by MongoDB
and as of the moment the first page read, whatever is paid meanwhile."""

from __future__ import annotations

import grpc
import pytest
from civic.ledger.v1 import ledger_pb2

from services.ledger import domain
from services.ledger.main import LedgerService
from tests.indexes import examined
from tests.ledger.conftest import Books
from tests.ledger.test_household_dues_at_scale import with_others

RATE = 50_000


def status_request(
    books: Books, campaign_id: str, page_size: int | None = None
) -> ledger_pb2.GetCampaignStatusRequest:
    request = ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=campaign_id)
    if page_size is not None:
        request.page.page_size = page_size
    return request


def totals(status: ledger_pb2.GetCampaignStatusResponse) -> tuple[int, int, int, int]:
    return (status.paid, status.unpaid, status.collected, status.outstanding)


def summed(households: list[ledger_pb2.HouseholdPayment]) -> tuple[int, int, int, int]:
    """The totals over these households, counted one by one."""
    return (
        sum(h.status == ledger_pb2.PAYMENT_STATUS_PAID for h in households),
        sum(
            h.status in (ledger_pb2.PAYMENT_STATUS_UNPAID, ledger_pb2.PAYMENT_STATUS_PARTLY_PAID)
            for h in households
        ),
        sum(h.paid for h in households),
        sum(h.outstanding for h in households),
    )


async def declare(
    books: Books, ledger_service: LedgerService, monkeypatch: pytest.MonkeyPatch, others: int
) -> ledger_pb2.Campaign:
    """A campaign of the group's four households and `others` more, the poor one exempt."""
    with monkeypatch.context() as patched:
        with_others(ledger_service, books, patched, others)
        response = await books.leader.DeclareCampaign(
            ledger_pb2.DeclareCampaignRequest(
                request_id=f"declare-{books.fund_id}-{others}",
                fund_id=books.fund_id,
                name=f"Phí vệ sinh ({others} hộ)",
                period="2026",
                basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
                rate=RATE,
                exemptions=[ledger_pb2.EXEMPTION_POOR_HOUSEHOLD],
            )
        )
    campaign: ledger_pb2.Campaign = response.campaign
    return campaign


async def test_a_page_of_a_campaigns_status_reads_no_more_for_more_households(
    books: Books, ledger_service: LedgerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of ten households, of a campaign of 304 and of one of 3,004: MongoDB answers the
    service about as much for either; the counts and sums are the whole campaign's."""
    costs = []
    for others in (300, 3000):
        campaign = await declare(books, ledger_service, monkeypatch, others)
        await books.contribute(RATE, "an", campaign.campaign_id)
        await books.contribute(RATE // 2, "dung", campaign.campaign_id)
        async with examined(ledger_service.store.db, books.fund_id, campaign.campaign_id) as cost:
            status = await books.leader.GetCampaignStatus(
                status_request(books, campaign.campaign_id, 10)
            )
        costs.append(cost)
        assert len(status.households) == len(status.campaign.dues) == 10
        assert status.next_page_token
        owing = 4 + others - 1  # the poor household is exempt
        assert totals(status) == (1, owing - 1, RATE + RATE // 2, (owing - 1.5) * RATE)
        assert status.campaign.total_due == owing * RATE
    small, large = costs
    assert large.bytes_returned < small.bytes_returned + 2048, (small, large)


async def test_pages_of_a_campaigns_status_show_the_moment_the_first_page_read(
    books: Books, ledger_service: LedgerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Payments recorded between pages, for households on pages read and on pages not read
    yet: each household is on exactly one page, in order, as it stood when the first page was
    read, under the same counts and sums on every page, which are those households' own."""
    campaign = await declare(books, ledger_service, monkeypatch, 246)
    cid = campaign.campaign_id
    households = [d.household_id for d in campaign.dues]
    await books.contribute(RATE, "an", cid)
    paid_before = await books.contribute(RATE // 5, "dung", cid)
    await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=f"undo-{paid_before.transaction_id}",
            fund_id=books.fund_id,
            transaction_id=paid_before.transaction_id,
            reason="nhầm",
        )
    )
    await books.contribute(RATE // 2, "dung", cid)
    first = await books.leader.GetCampaignStatus(status_request(books, cid))
    others = [h for h in households if h.startswith("hh-other-")]
    meanwhile = [others[0], others[-1], others[120], others[60]]
    request = status_request(books, cid, 50)
    pages = []
    while True:
        page = await books.leader.GetCampaignStatus(request)
        pages.append(page)
        if meanwhile:
            await books.contribute(RATE, household_id=meanwhile.pop(), campaign_id=cid)
        if not page.next_page_token:
            break
        request.page.page_token = page.next_page_token
    assert not meanwhile
    rows = [h for page in pages for h in page.households]
    assert [h.household_id for h in rows] == households
    assert [d.household_id for page in pages for d in page.campaign.dues] == households
    assert list(rows) == list(first.households)
    assert all(totals(page) == totals(first) for page in pages)
    assert totals(first) == summed(list(first.households))
    assert all(page.campaign.total_due == campaign.total_due for page in pages)
    # Asked again, the status takes in what was paid meanwhile.
    now = await books.leader.GetCampaignStatus(status_request(books, cid))
    assert now.paid == first.paid + 4
    assert totals(now) == summed(list(now.households))


async def test_a_campaigns_status_without_a_page_is_whole_up_to_its_limit(
    books: Books, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller from before paging gets every household in one answer, up to the stated
    limit; past it, FAILED_PRECONDITION naming `page`, never a first page it would take for
    the whole campaign."""
    campaign = await books.declare_per_household(RATE)
    monkeypatch.setattr(domain, "MAX_UNPAGED_HOUSEHOLDS", 4)
    whole = await books.leader.GetCampaignStatus(status_request(books, campaign.campaign_id))
    assert len(whole.households) == 4 and not whole.next_page_token
    assert whole.campaign == campaign
    monkeypatch.setattr(domain, "MAX_UNPAGED_HOUSEHOLDS", 3)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.leader.GetCampaignStatus(status_request(books, campaign.campaign_id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (refused.value.details() or "").startswith("page:")
    paged = await books.leader.GetCampaignStatus(status_request(books, campaign.campaign_id, 3))
    assert len(paged.households) == 3 and paged.next_page_token
    for token in ("x", "-1|a", f"{10**6}|{campaign.dues[0].household_id}"):
        wrong = status_request(books, campaign.campaign_id, 3)
        wrong.page.page_token = token
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await books.leader.GetCampaignStatus(wrong)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token
        assert (invalid.value.details() or "").startswith("page.page_token"), token

"""A campaign over more households than one transaction may post (MAX_POSTINGS, lowered here so a
handful of households stand for a ward of thousands): its assessment is booked in several
transactions, all at once, assessed once however often it is retried, cancelled whole, and the
auditors' replay agrees with the live books."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from civic.ledger.v1 import ledger_pb2
from civic.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.auth import Role
from services.common.config import Settings
from services.ledger import domain
from services.ledger import registry as registry_module
from services.ledger.main import LedgerService
from services.registry.main import RegistryService
from tests.ledger.conftest import Books, open_fund, rid
from tests.ledger.test_replay import audit, published
from tests.registry_fixtures import new_household, outlive_the_first_page

RATE = 100_000


@pytest.fixture
async def ward(books: Books, monkeypatch: pytest.MonkeyPatch) -> Books:
    """Five paying households (the group's four and "em"), at most three postings to a
    transaction: two receivables and the income they balance."""
    em = await new_household(books.city.leader, books.city.group, head_name="Võ Thị Em")
    books.households["em"] = em.household.household_id
    monkeypatch.setattr(domain, "MAX_POSTINGS", 3)
    return books


async def transaction(books: Books, transaction_id: str) -> ledger_pb2.Transaction:
    response = await books.auditor.GetTransaction(
        ledger_pb2.GetTransactionRequest(fund_id=books.fund_id, transaction_id=transaction_id)
    )
    found: ledger_pb2.Transaction = response.transaction
    return found


async def head(books: Books) -> int:
    response = await books.auditor.GetFund(ledger_pb2.GetFundRequest(fund_id=books.fund_id))
    return int(response.fund.sequence)


async def cancel(books: Books, transaction_id: str, request_id: str = "") -> ledger_pb2.Transaction:
    response = await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=request_id or rid(),
            fund_id=books.fund_id,
            transaction_id=transaction_id,
            reason="hủy đợt thu",
        )
    )
    reversal: ledger_pb2.Transaction = response.transaction
    return reversal


def receivables(books: Books, campaign: ledger_pb2.Campaign) -> dict[str, int]:
    return {
        f"receivable/{campaign.campaign_id}/{household_id}": RATE
        for household_id in books.households.values()
    }


async def test_a_campaign_past_one_transaction_is_booked_in_several(ward: Books) -> None:
    before = await head(ward)
    campaign = await ward.declare_per_household(RATE)
    assert campaign.total_due == 5 * RATE
    assert len(campaign.transaction_ids) == 3
    assert campaign.transaction_id == campaign.transaction_ids[0]
    parts = [await transaction(ward, t) for t in campaign.transaction_ids]
    # Consecutive in the fund's chain, each balanced, each under the limit.
    assert [p.sequence for p in parts] == [before + 1, before + 2, before + 3]
    booked: dict[str, int] = {}
    for part in parts:
        assert part.kind == ledger_pb2.TRANSACTION_KIND_ASSESSMENT
        assert part.campaign_id == campaign.campaign_id
        assert len(part.postings) <= 3
        assert sum(p.amount for p in part.postings) == 0
        for posting in part.postings:
            booked[posting.account] = booked.get(posting.account, 0) + posting.amount
    assert booked == receivables(ward, campaign) | {"income/dues": -5 * RATE}
    assert await ward.balances() == booked
    # Every household owes its due, whichever transaction booked it.
    status = await ward.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=ward.fund_id, campaign_id=campaign.campaign_id)
    )
    assert (status.unpaid, status.outstanding) == (5, 5 * RATE)
    await ward.contribute(RATE, "em", campaign.campaign_id)
    dues = await ward.resident("em").GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(fund_id=ward.fund_id, household_id=ward.households["em"])
    )
    assert [(d.due, d.paid, d.outstanding, d.status) for d in dues.dues] == [
        (RATE, RATE, 0, ledger_pb2.PAYMENT_STATUS_PAID)
    ]
    statement = (
        await ward.auditor.GetStatement(ledger_pb2.GetStatementRequest(fund_id=ward.fund_id))
    ).statement
    assert [line.transaction_id for line in statement.lines][-4:-1] == list(
        campaign.transaction_ids
    )
    assert (statement.closing_available, statement.total_in) == (RATE, RATE)


async def test_a_retried_declaration_assesses_once(ward: Books) -> None:
    key = rid()
    first = await ward.declare_per_household(RATE, key)
    assert len(first.transaction_ids) == 3
    # A retry after the register changed answers what was declared, and books nothing.
    await new_household(ward.city.leader, ward.city.group, head_name="Lý Văn Sáu")
    assert await ward.declare_per_household(RATE, key) == first
    assert await ward.balances() == receivables(ward, first) | {"income/dues": -5 * RATE}
    assert await head(ward) == 3  # opened, then the three parts


async def test_a_retry_racing_the_original_over_a_changed_register_assesses_once(
    ward: Books, ledger_service: LedgerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry finds nothing posted yet, but reads the register after the original has
    booked it and two households have been added: its dues take a fourth transaction, whose
    key the original never used. It must answer the original, and book none of it."""
    registry = ledger_service.servicer.registry
    read = registry.households
    original_reading, retry_reading, original_done = (asyncio.Event() for _ in range(3))

    async def slow_register(unit_id: str, only: Sequence[str] = ()) -> list[domain.HouseholdFacts]:
        if not original_reading.is_set():
            original_reading.set()
            await retry_reading.wait()
        else:
            retry_reading.set()
            await original_done.wait()
        return await read(unit_id, only)

    monkeypatch.setattr(registry, "households", slow_register)
    key = rid()
    original = asyncio.create_task(ward.declare_per_household(RATE, key))
    await original_reading.wait()
    retry = asyncio.create_task(ward.declare_per_household(RATE, key))
    declared = await original
    for name in ("Lý Văn Sáu", "Đặng Thị Bảy"):
        await new_household(ward.city.leader, ward.city.group, head_name=name)
    original_done.set()
    assert await retry == declared
    assert len(declared.transaction_ids) == 3
    assert await head(ward) == 3
    assert await ward.balances() == receivables(ward, declared) | {"income/dues": -5 * RATE}


async def test_cancelling_reverses_every_part_or_none(ward: Books) -> None:
    campaign = await ward.declare_per_household(RATE)
    # A household has paid: undoing its receivable would overdraw it, so nothing is reversed.
    paid = await ward.contribute(RATE, "em", campaign.campaign_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cancel(ward, campaign.transaction_ids[0])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (refused.value.details() or "").startswith("transaction_id: would overdraw receivable/")
    assert [
        (await transaction(ward, t)).reversed_by_transaction_id for t in campaign.transaction_ids
    ] == [
        "",
        "",
        "",
    ]
    await cancel(ward, paid.transaction_id)
    # Naming any part cancels the campaign: every part is reversed, at once.
    key = rid()
    reversal = await cancel(ward, campaign.transaction_ids[1], key)
    assert reversal.reverses_transaction_id == campaign.transaction_ids[1]
    parts = [await transaction(ward, t) for t in campaign.transaction_ids]
    reversals = [await transaction(ward, p.reversed_by_transaction_id) for p in parts]
    assert [r.reverses_transaction_id for r in reversals] == list(campaign.transaction_ids)
    assert all(r.kind == ledger_pb2.TRANSACTION_KIND_REVERSAL for r in reversals)
    assert await ward.balances() == {}
    status = await ward.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=ward.fund_id, campaign_id=campaign.campaign_id)
    )
    assert {h.status for h in status.households} == {ledger_pb2.PAYMENT_STATUS_CANCELLED}
    # A retry answers the same reversal and posts nothing; another part is reversed already.
    sequence = await head(ward)
    assert await cancel(ward, campaign.transaction_ids[1], key) == reversal
    assert await head(ward) == sequence
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await cancel(ward, campaign.transaction_ids[2])
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "was already reversed" in (again.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await ward.contribute(RATE, "an", campaign.campaign_id)
    assert "was cancelled" in (late.value.details() or "")


async def test_the_replay_of_a_campaign_in_several_parts_matches(
    ward: Books,
    settings: Settings,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kept = await ward.declare_per_household(RATE)
    await ward.contribute(RATE, "an", kept.campaign_id)
    cancelled = await ward.declare_per_household(RATE)
    await cancel(ward, cancelled.transaction_ids[2])
    # The auditors check every event of the topic against the ledger's own limit.
    monkeypatch.undo()
    await published(ledger_service)
    report = await audit(settings, ward, ledger_service)
    assert report.ok, report.text()


async def test_a_unit_too_large_for_one_campaign_names_the_fund(
    ward: Books, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(domain, "MAX_CAMPAIGN_HOUSEHOLDS", 4)
    before = await head(ward)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ward.declare_per_household(RATE)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (refused.value.details() or "").startswith(
        f"fund_id: {ward.city.group} has 5 households to list; a campaign lists at most 4"
    )
    assert await head(ward) == before


async def test_a_household_moved_while_the_register_is_read_is_charged_once(
    ward: Books, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ward's households come from the registry a page at a time, in (group, id) order. The
    ward merges its group 17 into group 18 after the first page: group 17's first household,
    read there already, would be met again in group 18 (its second due made the refusal blame
    `rate`). The registry reads every page as the register was at the first: each household
    is listed once and owes the ward one due."""
    city = ward.city
    ward_fund = await open_fund(ward.caller(Role.WARD_OFFICER, city.ward), city.ward, "Quỹ phường")
    other = await new_household(city.other_leader, city.other_group, head_name="Đỗ Thị Tám")
    monkeypatch.setattr(registry_module, "PAGE", 1)
    merged = asyncio.Event()

    def merging_stub(channel: grpc.aio.Channel) -> Any:
        """The registry's own stub; the merge is made between its first and second pages."""
        stub: Any = registry_pb2_grpc.RegistryServiceStub(channel)
        read = stub.ListHouseholdSummaries

        async def list_page(request: registry_pb2.ListHouseholdSummariesRequest, **kw: Any) -> Any:
            if request.page.page_token and not merged.is_set():
                merged.set()
                await city.ward_officer.MergeGroups(
                    registry_pb2.MergeGroupsRequest(
                        request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
                    )
                )
            return await read(request, **kw)

        stub.ListHouseholdSummaries = list_page
        return stub

    monkeypatch.setattr(
        registry_module, "registry_pb2_grpc", SimpleNamespace(RegistryServiceStub=merging_stub)
    )
    response = await ward.caller(Role.WARD_OFFICER, city.ward).DeclareCampaign(
        ledger_pb2.DeclareCampaignRequest(
            request_id=rid(),
            fund_id=ward_fund,
            name="Phí vệ sinh",
            period="2026",
            basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
            rate=RATE,
        )
    )
    assert merged.is_set()
    campaign = response.campaign
    households = {*ward.households.values(), other.household.household_id}
    assert sorted(d.household_id for d in campaign.dues) == sorted(households)
    assert campaign.total_due == len(households) * RATE
    assert await ward.balances(ward_fund) == {
        f"receivable/{campaign.campaign_id}/{h}": RATE for h in households
    } | {"income/dues": -len(households) * RATE}


async def test_a_read_of_the_register_that_outlived_its_moment_starts_again_once(
    ward: Books, registry: RegistryService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry reads every page of a listing as the register was at its first page, and
    keeps that moment for 5 minutes: a later page asked for after that is refused, naming
    `page.page_token`. The ledger reads the register again from the first page, once, and the
    campaign lists the households of that read, each once."""
    city = ward.city
    monkeypatch.setattr(registry_module, "PAGE", 1)
    late: list[str] = []

    async def move_in() -> None:
        late.append((await new_household(city.leader, city.group)).household.household_id)

    def forgetting_stub(channel: grpc.aio.Channel) -> Any:
        """The registry's own stub; the first read's moment is forgotten before its second
        page."""
        stub: Any = registry_pb2_grpc.RegistryServiceStub(channel)
        read = stub.ListHouseholdSummaries

        async def list_page(request: registry_pb2.ListHouseholdSummariesRequest, **kw: Any) -> Any:
            if request.page.page_token and not late:
                await outlive_the_first_page(registry, move_in, lambda: read(request, **kw))
            return await read(request, **kw)

        stub.ListHouseholdSummaries = list_page
        return stub

    monkeypatch.setattr(
        registry_module, "registry_pb2_grpc", SimpleNamespace(RegistryServiceStub=forgetting_stub)
    )
    campaign = await ward.declare_per_household(RATE)
    assert late
    households = [*ward.households.values(), *late]
    assert sorted(d.household_id for d in campaign.dues) == sorted(households)
    assert campaign.total_due == len(households) * RATE

"""Dues campaigns computed from the register, with exemptions; contributions with receipts; who
has paid and who has not; a household's dues and payments."""

from __future__ import annotations

import unicodedata
from collections.abc import Awaitable
from datetime import date, timedelta
from typing import Any

import grpc
import pytest
from civic.ledger.v1 import ledger_pb2
from civic.registry.v1 import registry_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.auth import Role
from services.ledger.main import LedgerService
from services.ledger.store import RECEIPT_NUMBERS, LedgerStore
from tests.indexes import index_uses, used_since
from tests.kafka_reader import eventually
from tests.ledger.conftest import Books, LedgerCaller, campaign_name, open_fund, rid
from tests.registry_fixtures import create_unit, new_household


async def declare(
    books: Books,
    basis: ledger_pb2.DuesBasis.ValueType = ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
    rate: int = 200_000,
    exemptions: tuple[ledger_pb2.Exemption.ValueType, ...] = (
        ledger_pb2.EXEMPTION_POOR_HOUSEHOLD,
        ledger_pb2.EXEMPTION_WAR_INVALID_MEMBER,
    ),
    request_id: str = "",
) -> ledger_pb2.Campaign:
    request_id = request_id or rid()
    response = await books.leader.DeclareCampaign(
        ledger_pb2.DeclareCampaignRequest(
            request_id=request_id,
            fund_id=books.fund_id,
            name=campaign_name("Quỹ vệ sinh môi trường", request_id),
            period="2026",
            basis=basis,
            rate=rate,
            exemptions=exemptions,
        )
    )
    campaign: ledger_pb2.Campaign = response.campaign
    return campaign


async def test_dues_per_household_with_exemptions_from_the_register(books: Books) -> None:
    campaign = await declare(books)
    dues = {d.household_id: d for d in campaign.dues}
    h = books.households
    assert {hid: dues[hid].amount for hid in h.values()} == {
        h["an"]: 200_000,
        h["binh"]: 0,
        h["cuong"]: 0,
        h["dung"]: 200_000,
    }
    assert dues[h["binh"]].exempt_because == ledger_pb2.EXEMPTION_POOR_HOUSEHOLD
    assert dues[h["cuong"]].exempt_because == ledger_pb2.EXEMPTION_WAR_INVALID_MEMBER
    assert dues[h["an"]].household_name == "Trần Văn An"
    assert dues[h["an"]].residents == 2
    assert campaign.total_due == 400_000
    assert campaign.registry_read_at.seconds > 0
    # The assessment booked what each household owes as a receivable of the fund.
    balances = await books.balances()
    assert balances == {
        f"receivable/{campaign.campaign_id}/{h['an']}": 200_000,
        f"receivable/{campaign.campaign_id}/{h['dung']}": 200_000,
        "income/dues": -400_000,
    }


async def test_dues_per_person_and_without_exemptions(books: Books) -> None:
    campaign = await declare(books, ledger_pb2.DUES_BASIS_PER_PERSON, 50_000, exemptions=())
    dues = {d.household_id: d.amount for d in campaign.dues}
    h = books.households
    # an: head and spouse; cuong: head and the war invalid; no exemption asked for.
    assert dues == {h["an"]: 100_000, h["binh"]: 50_000, h["cuong"]: 100_000, h["dung"]: 50_000}


async def test_a_campaign_follows_the_register_as_it_was_read(books: Books) -> None:
    first = await declare(books)
    # The register changes: Dũng's household is certified poor.
    await books.city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=books.households["dung"],
            update_fields=["poor"],
            poor=True,
        )
    )
    second = await declare(books)
    amount = {d.household_id: d.amount for d in first.dues}
    assert amount[books.households["dung"]] == 200_000
    assert {d.household_id: d.amount for d in second.dues}[books.households["dung"]] == 0
    # The first campaign keeps what it computed then.
    status = await books.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=first.campaign_id)
    )
    assert status.campaign == first


async def test_declaring_is_idempotent(books: Books) -> None:
    key = rid()
    campaign = await declare(books, request_id=key)
    assert await declare(books, request_id=key) == campaign
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await declare(books, rate=300_000, request_id=key)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    balances = await books.balances()
    assert balances["income/dues"] == -400_000


async def test_who_has_paid_and_who_has_not(books: Books) -> None:
    campaign = await declare(books)
    cid = campaign.campaign_id
    # Paid on a paper receipt before the fund was in the ledger: entered as dated.
    paid_on = (await books.opened_on()).replace(month=1, day=1).isoformat()
    paid = await books.contribute(200_000, "an", cid, receipt_number="BL-0001", paid_on=paid_on)
    assert paid.kind == ledger_pb2.TRANSACTION_KIND_CONTRIBUTION
    assert paid.contribution.household_name == "Trần Văn An"
    assert paid.contribution.receipt_number == "BL-0001"
    assert paid.contribution.paid_on == paid_on
    await books.contribute(
        50_000, "dung", cid, method=ledger_pb2.PAYMENT_METHOD_TRANSFER, receipt_number="BL-0002"
    )
    status = await books.resident("binh").GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=cid)
    )
    rows = {p.household_name: (p.due, p.paid, p.outstanding, p.status) for p in status.households}
    assert rows == {
        "Trần Văn An": (200_000, 200_000, 0, ledger_pb2.PAYMENT_STATUS_PAID),
        "Hoàng Văn Dũng": (200_000, 50_000, 150_000, ledger_pb2.PAYMENT_STATUS_PARTLY_PAID),
        "Phạm Thị Bình": (0, 0, 0, ledger_pb2.PAYMENT_STATUS_EXEMPT),
        "Lê Văn Cường": (0, 0, 0, ledger_pb2.PAYMENT_STATUS_EXEMPT),
    }
    assert (status.paid, status.unpaid, status.collected, status.outstanding) == (
        1,
        1,
        250_000,
        150_000,
    )
    balances = await books.balances()
    assert balances["cash"] == 200_000 and balances["bank"] == 50_000
    # Why a neighbour is exempt (a poor household, a war invalid) is theirs: a resident sees
    # their own household's reason, and the others only as exempt.
    why = {p.household_name: p.exempt_because for p in status.households}
    assert why["Phạm Thị Bình"] == ledger_pb2.EXEMPTION_POOR_HOUSEHOLD  # binh's own
    assert why["Lê Văn Cường"] == ledger_pb2.EXEMPTION_UNSPECIFIED
    listed = {d.household_name: d for d in status.campaign.dues}
    assert listed["Lê Văn Cường"].exempt_because == ledger_pb2.EXEMPTION_UNSPECIFIED
    assert listed["Lê Văn Cường"].residents == 0
    assert listed["Phạm Thị Bình"].exempt_because == ledger_pb2.EXEMPTION_POOR_HOUSEHOLD
    leader = await books.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=cid)
    )
    assert {p.household_name: p.exempt_because for p in leader.households}["Lê Văn Cường"] == (
        ledger_pb2.EXEMPTION_WAR_INVALID_MEMBER
    )
    # An integrator reads the board as residents do: who is exempt, never why, nor a
    # household's own dues and payments.
    integrator = books.caller(Role.INTEGRATOR, books.city.ward)
    board = await integrator.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=cid)
    )
    assert {p.exempt_because for p in board.households} == {ledger_pb2.EXEMPTION_UNSPECIFIED}
    assert {(d.exempt_because, d.residents) for d in board.campaign.dues} == {
        (ledger_pb2.EXEMPTION_UNSPECIFIED, 0)
    }
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await integrator.GetHouseholdDues(
            ledger_pb2.GetHouseholdDuesRequest(
                fund_id=books.fund_id, household_id=books.households["an"]
            )
        )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def paying_while(
    monkeypatch: pytest.MonkeyPatch, store: LedgerStore, method: str, pay: Awaitable[object]
) -> None:
    """The next call of the store's `method` first waits for `pay` to be recorded."""
    read = getattr(store, method)

    async def paid_meanwhile(*args: Any, **kw: Any) -> Any:
        monkeypatch.setattr(store, method, read)
        await pay
        return await read(*args, **kw)

    monkeypatch.setattr(store, method, paid_meanwhile)


async def test_the_board_and_a_households_dues_are_read_at_one_moment(
    books: Books, ledger_service: LedgerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payment the treasurer records while a board is being read shows there wholly or not at
    all: it was counted as paid but still owed, the household shown as partly paid, and the
    money collected and outstanding more than the campaign asked for."""
    campaign = await declare(books)
    store, cid = ledger_service.store, campaign.campaign_id
    paying_while(monkeypatch, store, "campaign_totals", books.contribute(200_000, "an", cid))
    status = await books.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=cid)
    )
    assert all(h.paid + h.outstanding == h.due for h in status.households)
    assert status.collected + status.outstanding == campaign.total_due
    paying_while(monkeypatch, store, "contributions_of", books.contribute(200_000, "dung", cid))
    dues = await books.leader.GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(
            fund_id=books.fund_id, household_id=books.households["dung"]
        )
    )
    assert [(d.paid + d.outstanding, d.due) for d in dues.dues] == [(200_000, 200_000)]
    assert sum(p.postings[0].amount for p in dues.payments) == dues.dues[0].paid


async def test_paying_more_than_owed_or_for_an_exempt_household_is_refused(books: Books) -> None:
    campaign = await declare(books)
    cid = campaign.campaign_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.contribute(250_000, "an", cid)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # RecordContributionRequest has no `postings`: the amount is what is more than owed.
    assert (refused.value.details() or "").startswith("amount: would overdraw receivable/")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.contribute(10_000, "binh", cid)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is exempt" in (refused.value.details() or "")


async def test_receipt_numbers_are_unique_and_retries_are_safe(books: Books) -> None:
    campaign = await declare(books)
    key = rid()
    first = await books.contribute(
        100_000, "an", campaign.campaign_id, request_id=key, receipt_number="BL-77"
    )
    again = await books.contribute(
        100_000, "an", campaign.campaign_id, request_id=key, receipt_number="BL-77"
    )
    assert again == first
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.contribute(100_000, "dung", campaign.campaign_id, receipt_number="BL-77")
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (refused.value.details() or "").startswith("receipt_number: ")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.contribute(100_000, "an", campaign.campaign_id, receipt_number="")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("receipt_number: ")


async def test_a_receipt_number_typed_in_other_capitals_is_the_same_receipt(
    books: Books, ledger_service: LedgerService
) -> None:
    """A phone's keyboard capitalises the first letter, a treasurer types small letters: "Bl-77"
    and "bl-77" are the paper receipt "BL-77", which backs one payment. It is looked up by
    index, whatever the fund's history."""
    campaign = await declare(books)
    first = await books.contribute(100_000, "an", campaign.campaign_id, receipt_number="BL-77")
    for typed in ("Bl-77", "bl-77"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await books.contribute(100_000, "dung", campaign.campaign_id, receipt_number=typed)
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert first.transaction_id in (refused.value.details() or "")
    assert (await books.balances())["cash"] == 100_000
    transactions = ledger_service.store.transactions
    before = await index_uses(transactions)
    await books.contribute(100_000, "dung", campaign.campaign_id, receipt_number="bl-78")
    assert RECEIPT_NUMBERS in await used_since(transactions, before)


async def test_a_reversed_payment_frees_its_receipt_number(books: Books) -> None:
    """A payment entered wrongly (20,000 typed for the 200,000 on the paper receipt) is
    reversed, and entered again under the number of the receipt the household holds."""
    campaign = await declare(books)
    cid = campaign.campaign_id
    wrong = await books.contribute(20_000, "an", cid, receipt_number="BL-0042")
    await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            transaction_id=wrong.transaction_id,
            reason="ghi nhầm số tiền",
        )
    )
    right = await books.contribute(200_000, "an", cid, receipt_number="BL-0042")
    assert right.contribution.receipt_number == "BL-0042"
    # While that payment stands, the number is its own.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.contribute(200_000, "dung", cid, receipt_number="BL-0042")
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (refused.value.details() or "").startswith("receipt_number: ")
    assert right.transaction_id in (refused.value.details() or "")
    own = await books.resident("an").GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(
            fund_id=books.fund_id, household_id=books.households["an"]
        )
    )
    assert [(d.paid, d.outstanding, d.status) for d in own.dues] == [
        (200_000, 0, ledger_pb2.PAYMENT_STATUS_PAID)
    ]


async def test_a_store_built_when_receipt_numbers_were_unique_is_migrated(
    ledger_service: LedgerService,
) -> None:
    """The index that made a receipt number unique for ever gives way, as the service starts,
    to one that finds it (the rule is now checked with the posting)."""
    db = ledger_service.store.db.client[f"ledger-migration-{rid()[:8]}"]
    store = LedgerStore(db)
    name = "fund_id_1_contribution.receipt_number_1"
    await store.transactions.create_index(
        [("fund_id", 1), ("contribution.receipt_number", 1)],
        name=name,
        unique=True,
        partialFilterExpression={"contribution.receipt_number": {"$gt": ""}},
    )
    try:
        await store.ensure_indexes()
        indexes = await store.transactions.index_information()
        assert name not in indexes  # given way to one comparing whatever the capitals
        assert RECEIPT_NUMBERS in indexes
    finally:
        await db.client.drop_database(db.name)


async def test_donations_and_a_households_dues_and_payments(books: Books) -> None:
    campaign = await declare(books)
    await books.contribute(120_000, "an", campaign.campaign_id, receipt_number="BL-1")
    gift = await books.contribute(500_000, "an", receipt_number="BL-2", memo="Ủng hộ lũ lụt")
    anonymous = await books.contribute(80_000, receipt_number="BL-3")
    assert gift.contribution.household_name == "Trần Văn An"
    assert anonymous.contribution.household_id == ""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.contribute(1_000, household_id="hh-not-here", receipt_number="BL-4")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    own = await books.resident("an").GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(
            fund_id=books.fund_id, household_id=books.households["an"]
        )
    )
    assert own.household_name == "Trần Văn An"
    assert [(d.due, d.paid, d.outstanding, d.status) for d in own.dues] == [
        (200_000, 120_000, 80_000, ledger_pb2.PAYMENT_STATUS_PARTLY_PAID)
    ]
    assert [p.contribution.receipt_number for p in own.payments] == ["BL-1", "BL-2"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.resident("an").GetHouseholdDues(
            ledger_pb2.GetHouseholdDuesRequest(
                fund_id=books.fund_id, household_id=books.households["dung"]
            )
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    balances = await books.balances()
    assert balances["income/donations"] == -580_000
    assert balances["cash"] == 700_000


async def test_bad_campaigns_name_the_field(books: Books) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rate": 0}, "rate"),
        ({"basis": ledger_pb2.DUES_BASIS_UNSPECIFIED}, "basis"),
        ({"period": ""}, "period"),
        ({"name": " "}, "name"),
        ({"exemptions": [9]}, "exemptions[0]"),
        # A rate the ledger takes, times a household's two residents, would be a posting over
        # the largest amount, which the auditors' replay refuses.
        ({"basis": ledger_pb2.DUES_BASIS_PER_PERSON, "rate": 10**15}, "rate"),
    ]
    for fields, field in cases:
        request = ledger_pb2.DeclareCampaignRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            name="Quỹ khuyến học",
            period="2026",
            basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
            rate=10_000,
        )
        for key, value in fields.items():
            if key == "exemptions":
                request.exemptions.extend(value)
            else:
                setattr(request, key, value)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await books.leader.DeclareCampaign(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert (refused.value.details() or "").startswith(f"{field}: ")


async def test_a_campaign_nobody_would_owe_anything_to_names_the_field(books: Books) -> None:
    """In a group where nobody lives the fund's unit is at fault; where every household is
    exempt, the exemptions asked for."""
    city = books.city
    leader = books.caller(Role.GROUP_LEADER, city.other_group)
    fund_id = await open_fund(leader, city.other_group)
    request = ledger_pb2.DeclareCampaignRequest(
        fund_id=fund_id,
        name="Quỹ khuyến học",
        period="2026",
        basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
        rate=10_000,
        exemptions=[ledger_pb2.EXEMPTION_POOR_HOUSEHOLD],
    )
    for field in ("fund_id", "exemptions"):
        request.request_id = rid()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await leader.DeclareCampaign(request)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, field
        assert (refused.value.details() or "").startswith(f"{field}: "), field
        assert city.other_group in (refused.value.details() or "")
        await new_household(city.other_leader, city.other_group, poor=True)


async def test_a_moment_out_of_the_calendar_is_invalid_not_internal(books: Books) -> None:
    far = Timestamp(seconds=2**40)
    for request, field in (
        (ledger_pb2.GetBalancesRequest(fund_id=books.fund_id, as_of=far), "as_of"),
        (ledger_pb2.GetStatementRequest(fund_id=books.fund_id, to=far), "to"),
    ):
        method = (
            books.leader.GetBalances
            if isinstance(request, ledger_pb2.GetBalancesRequest)
            else books.leader.GetStatement
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await method(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert (refused.value.details() or "").startswith(f"{field}: ")


async def cancel(books: Books, campaign: ledger_pb2.Campaign) -> None:
    """The campaign called off: its assessment reversed."""
    await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            transaction_id=campaign.transaction_id,
            reason="hủy đợt thu",
        )
    )


async def test_a_cancelled_campaign_shows_nobody_as_having_paid(books: Books) -> None:
    """Reversing the assessment settles every receivable; the board must not then show every
    household as paid, nor money collected that never came in."""
    campaign = await declare(books, exemptions=())
    await cancel(books, campaign)
    status = await books.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=campaign.campaign_id)
    )
    assert {(p.paid, p.outstanding, p.status) for p in status.households} == {
        (0, 0, ledger_pb2.PAYMENT_STATUS_CANCELLED)
    }
    assert (status.paid, status.unpaid, status.collected) == (0, 0, 0)
    h = books.households
    dues = await books.resident("dung").GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(fund_id=books.fund_id, household_id=h["dung"])
    )
    assert [(d.paid, d.status) for d in dues.dues] == [(0, ledger_pb2.PAYMENT_STATUS_CANCELLED)]


async def test_a_payment_into_a_cancelled_campaign_names_the_campaign(books: Books) -> None:
    campaign = await declare(books)
    await cancel(books, campaign)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.contribute(200_000, "an", campaign.campaign_id)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == (
        f"campaign_id: campaign {campaign.campaign_id} was cancelled (its assessment was "
        "reversed); nothing is owed to it"
    )


async def give(caller: LedgerCaller, fund_id: str, household_id: str) -> None:
    """A household's donation of 10,000 đồng in cash."""
    await caller.RecordContribution(
        ledger_pb2.RecordContributionRequest(
            request_id=rid(),
            fund_id=fund_id,
            household_id=household_id,
            amount=10_000,
            method=ledger_pb2.PAYMENT_METHOD_CASH,
            receipt_number=f"BL-{rid()[:8]}",
        )
    )


async def test_after_a_merge_a_household_gives_to_its_new_groups_fund_not_its_old_ones(
    books: Books, ledger_service: LedgerService
) -> None:
    """The ledger learns a household of the other group (a gift to that group's fund); the
    registry then merges that group into this one. The registry's event of the move reaches the
    ledger, and the old group's fund no longer takes the household; this group's fund does."""
    city = books.city
    moving = await new_household(city.other_leader, city.other_group, head_name="Võ Văn Chuyển")
    household_id = moving.household.household_id
    other_leader = books.caller(Role.GROUP_LEADER, city.other_group)
    other_fund = await open_fund(other_leader, city.other_group)
    await give(other_leader, other_fund, household_id)
    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.other_group, target_unit_id=city.group
        )
    )

    async def moved() -> bool:
        known = await ledger_service.store.household(household_id)
        return known is not None and known["unit_id"] == city.group

    await eventually(moved, what="the ledger follows the registry's merge")
    # The group it joined keeps the old fund's books, but not for a household gone from it.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await give(books.treasurer, other_fund, household_id)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    await give(books.treasurer, books.fund_id, household_id)


async def test_a_merged_groups_funds_are_kept_and_read_by_the_group_it_joined(
    books: Books, ledger_service: LedgerService
) -> None:
    """A merge retires a group, and with it its leader and treasurer: the group it joined keeps
    its funds. What the old group's campaign charged stays payable there, recorded by the new
    group's treasurer, and a household that moved with the merge reads its dues there."""
    city = books.city
    moving = await new_household(city.other_leader, city.other_group, head_name="Võ Văn Nợ")
    household_id = moving.household.household_id
    other_leader = books.caller(Role.GROUP_LEADER, city.other_group)
    other_fund = await open_fund(other_leader, city.other_group, "Quỹ tổ cũ")
    declared = await other_leader.DeclareCampaign(
        ledger_pb2.DeclareCampaignRequest(
            request_id=rid(),
            fund_id=other_fund,
            name="Quỹ khuyến học tổ cũ",
            period="2026",
            basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
            rate=50_000,
        )
    )
    campaign_id = declared.campaign.campaign_id
    # Before the merge, this group's treasurer has nothing to do with that fund.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await give(books.treasurer, other_fund, household_id)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.other_group, target_unit_id=city.group
        )
    )

    resident = books.caller(Role.RESIDENT, city.group, household_id)
    request = ledger_pb2.GetHouseholdDuesRequest(fund_id=other_fund, household_id=household_id)
    [due] = (await resident.GetHouseholdDues(request)).dues
    assert (due.campaign_id, due.outstanding) == (campaign_id, 50_000)
    await books.treasurer.RecordContribution(
        ledger_pb2.RecordContributionRequest(
            request_id=rid(),
            fund_id=other_fund,
            household_id=household_id,
            amount=50_000,
            method=ledger_pb2.PAYMENT_METHOD_CASH,
            receipt_number="BL-CU-1",
            campaign_id=campaign_id,
        )
    )
    [due] = (await resident.GetHouseholdDues(request)).dues
    assert due.outstanding == 0
    listed = await books.leader.ListFunds(ledger_pb2.ListFundsRequest(unit_id=city.other_group))
    assert [f.fund_id for f in listed.funds] == [other_fund]
    # Another group's officials still have nothing to do with it.
    third = books.caller(Role.TREASURER, city.ward + ".t99")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await give(third, other_fund, household_id)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_merged_away_groups_own_leader_and_treasurer_no_longer_keep_its_books(
    books: Books, ledger_service: LedgerService
) -> None:
    """Their tokens, scoped to the retired group, last until they expire; from the moment the
    ledger hears of the merge (and a few seconds of what it remembers), they change nothing."""
    city = books.city
    household = await new_household(city.other_leader, city.other_group, head_name="Võ Thị Cũ")
    old_leader = books.caller(Role.GROUP_LEADER, city.other_group)
    old_treasurer = books.caller(Role.TREASURER, city.other_group)
    old_fund = await open_fund(old_leader, city.other_group, "Quỹ tổ sắp nhập")
    await give(old_treasurer, old_fund, household.household.household_id)
    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.other_group, target_unit_id=city.group
        )
    )

    async def refused_to(caller: LedgerCaller) -> bool:
        # A household nobody knows: NOT_FOUND while the caller may still post to the fund.
        try:
            await give(caller, old_fund, "hh-nobody")
        except grpc.aio.AioRpcError as error:
            assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
            return error.code() == grpc.StatusCode.PERMISSION_DENIED
        raise AssertionError("a contribution of an unknown household was recorded")

    await eventually(lambda: refused_to(old_treasurer), what="the old treasurer is refused")
    assert await refused_to(old_leader)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await give(old_treasurer, old_fund, household.household.household_id)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == (
        f"{city.other_group} was merged into {city.group}: the leader or treasurer of "
        f"{city.group} keeps its funds now"
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await open_fund(old_leader, city.other_group, "Quỹ mới của tổ cũ")
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_household_the_ledger_places_elsewhere_is_asked_of_the_registry_again(
    books: Books, ledger_service: LedgerService
) -> None:
    """Until the registry's event of a move arrives, the ledger places the household where it
    was: a fund of its new unit asks the registry again rather than refuse it."""
    await books.contribute(10_000, "an")
    household_id = books.households["an"]
    # As the ledger has it when the household has just moved here from the other group.
    await ledger_service.store.households.update_one(
        {"_id": household_id}, {"$set": {"unit_id": books.city.other_group}}
    )
    await books.contribute(10_000, "an")
    known = await ledger_service.store.household(household_id)
    assert known is not None and known["unit_id"] == books.city.group


async def test_a_campaigns_payments_and_a_households_are_found_by_index(
    books: Books, ledger_service: LedgerService
) -> None:
    """A fund keeps every transaction for ever: a campaign's board and a reversal's check read by
    index, not the fund's whole history."""
    transactions = ledger_service.store.db["transactions"]
    campaign = await declare(books)
    payment = await books.contribute(200_000, "an", campaign.campaign_id)
    before = await index_uses(transactions)
    await books.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=campaign.campaign_id)
    )
    await books.resident("an").GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(
            fund_id=books.fund_id, household_id=books.households["an"]
        )
    )
    await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            transaction_id=payment.transaction_id,
            reason="nhập nhầm",
        )
    )
    assert {
        "fund_id_1_contribution.campaign_id_1",
        "fund_id_1_reverses_1",
    } <= await used_since(transactions, before)


async def declaring(books: Books, name: str, period: str = "2026") -> ledger_pb2.Campaign:
    """A campaign of 100,000 đồng a household, declared by the group's leader."""
    response = await books.leader.DeclareCampaign(
        ledger_pb2.DeclareCampaignRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            name=name,
            period=period,
            basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
            rate=100_000,
        )
    )
    campaign: ledger_pb2.Campaign = response.campaign
    return campaign


async def test_the_same_campaign_is_not_declared_twice_until_cancelled(books: Books) -> None:
    """Two officers (or a form sent twice, each with its own request_id) declaring one campaign
    would charge every household twice."""

    first = await declaring(books, "Quỹ khuyến học")
    before = await books.balances()
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await declaring(books, "quỹ khuyến học")  # however it is capitalised
    assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (twice.value.details() or "").startswith("name: ")
    assert first.campaign_id in (twice.value.details() or "")
    assert await books.balances() == before  # nothing booked

    # Next year's is another campaign; and once this one is cancelled, it may be declared anew.
    await declaring(books, "Quỹ khuyến học", period="2027")
    await cancel(books, first)
    again = await declaring(books, "Quỹ khuyến học")
    assert again.campaign_id != first.campaign_id


async def test_the_same_campaign_typed_another_way_is_not_declared_again(books: Books) -> None:
    """Vietnamese keyboards send a letter with its marks either as one character or as the
    letter followed by the marks, and a period is typed in capitals or not: "Quỹ khuyến học"
    for 2026-H1, typed so on a second officer's phone, is the same campaign, and would charge
    every household twice."""

    name = unicodedata.normalize("NFC", "Quỹ khuyến học")
    first = await declaring(books, name, "2026-H1")
    before = await books.balances()
    for again, period in (
        (unicodedata.normalize("NFD", name), "2026-H1"),
        (name, "2026-h1"),
        (unicodedata.normalize("NFD", name.upper()), "2026-h1"),
    ):
        assert again != name or period != "2026-H1"
        with pytest.raises(grpc.aio.AioRpcError) as twice:
            await declaring(books, again, period)
        assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert first.campaign_id in (twice.value.details() or "")
    assert await books.balances() == before  # nothing booked
    await declaring(books, name, "2026-H2")  # another half-year's is another campaign


async def test_a_payment_dated_before_the_funds_books_is_refused(books: Books) -> None:
    """The receipts of the year before the fund was opened are entered as dated; a day before
    that (a year mistyped: 1900, or 2016 for 2026) is refused, naming paid_on, and nothing is
    written: neither the payment nor its receipt number."""
    campaign = await declare(books)
    cid = campaign.campaign_id
    first = date((await books.opened_on()).year - 1, 1, 1)
    before = await books.balances()
    for day in ("1900-01-01", (first - timedelta(days=1)).isoformat()):
        for towards, label in ((cid, "an"), ("", "an"), ("", "")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await books.contribute(
                    100_000, label, towards, receipt_number="BL-0100", paid_on=day
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = refused.value.details() or ""
            assert details.startswith(f"paid_on: must not be before {first.isoformat()}"), details
    assert await books.balances() == before
    dues = await books.treasurer.GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(
            fund_id=books.fund_id, household_id=books.households["an"]
        )
    )
    assert list(dues.payments) == []
    fund = (await books.auditor.GetFund(ledger_pb2.GetFundRequest(fund_id=books.fund_id))).fund
    assert fund.sequence == 1  # opened, then the campaign's assessment: no more events

    key = rid()
    paid = await books.contribute(
        100_000, "an", cid, request_id=key, receipt_number="BL-0100", paid_on=first.isoformat()
    )
    assert paid.contribution.paid_on == first.isoformat()
    again = await books.contribute(
        100_000, "an", cid, request_id=key, receipt_number="BL-0100", paid_on=first.isoformat()
    )
    assert again == paid


async def test_a_group_lists_the_funds_of_the_groups_merged_into_it(
    books: Books, ledger_service: LedgerService
) -> None:
    """Once the ledger hears of a merge, the group that was joined lists the old group's funds
    as its own: its leader, who keeps their books now, and the households that moved with the
    merge, who still owe the old campaigns, find them where they find their group's funds."""
    city = books.city
    moving = await new_household(city.other_leader, city.other_group, head_name="Võ Văn Tìm")
    other_leader = books.caller(Role.GROUP_LEADER, city.other_group)
    old_fund = await open_fund(other_leader, city.other_group, "Quỹ tổ sắp nhập")
    resident = books.caller(Role.RESIDENT, city.group, moving.household.household_id)

    async def listed(caller: LedgerCaller) -> list[str]:
        answer = await caller.ListFunds(ledger_pb2.ListFundsRequest())
        return [f.fund_id for f in answer.funds]

    assert old_fund not in await listed(books.leader)
    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.other_group, target_unit_id=city.group
        )
    )

    async def merge_heard() -> bool:
        return await ledger_service.store.merged_into(city.other_group) == city.group

    await eventually(merge_heard, what="the ledger hears of the merge")
    for caller in (books.leader, books.treasurer, resident):
        assert {books.fund_id, old_fund} <= set(await listed(caller))
    # Another group of the ward still lists neither.
    neighbour = books.caller(Role.GROUP_LEADER, city.ward + ".t98")
    assert old_fund not in await listed(neighbour)


async def test_a_household_moved_to_another_ward_reads_what_it_still_owes_its_old_ward(
    books: Books,
) -> None:
    """A district merges a group into a group of the next ward. What the old ward's campaign
    charged the group's households stays payable there: each of them reads its own dues and
    payments in that fund, as before the move, and no other household's."""
    city = books.city
    ward_officer = books.caller(Role.WARD_OFFICER, city.ward)
    ward_fund = await open_fund(ward_officer, city.ward, "Quỹ khuyến học phường")
    declared = await ward_officer.DeclareCampaign(
        ledger_pb2.DeclareCampaignRequest(
            request_id=rid(),
            fund_id=ward_fund,
            name="Quỹ khuyến học phường",
            period="2026",
            basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
            rate=30_000,
        )
    )
    campaign_id = declared.campaign.campaign_id
    an, dung = books.households["an"], books.households["dung"]
    await ward_officer.RecordContribution(
        ledger_pb2.RecordContributionRequest(
            request_id=rid(),
            fund_id=ward_fund,
            household_id=an,
            campaign_id=campaign_id,
            amount=10_000,
            method=ledger_pb2.PAYMENT_METHOD_CASH,
            receipt_number="BL-P-1",
        )
    )
    admin = city.as_role(Role.CITY_ADMIN, city.city)
    next_ward = await create_unit(
        admin, city.district, "hc2", "Hải Châu 2", registry_pb2.UNIT_KIND_WARD
    )
    joined = await create_unit(admin, next_ward, "g3", "Tổ dân phố 3", registry_pb2.UNIT_KIND_GROUP)
    await admin.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.group, target_unit_id=joined
        )
    )

    # Their tokens now name the group they joined, in the other ward.
    resident = books.caller(Role.RESIDENT, joined, an)
    request = ledger_pb2.GetHouseholdDuesRequest(fund_id=ward_fund, household_id=an)
    answer = await resident.GetHouseholdDues(request)
    [due] = answer.dues
    assert (due.campaign_id, due.paid, due.outstanding) == (campaign_id, 10_000, 20_000)
    assert [p.contribution.receipt_number for p in answer.payments] == ["BL-P-1"]
    assert answer.household_name == "Trần Văn An"
    # Another household's dues stay its own; a household the fund never charged reads nothing.
    for caller, household_id in (
        (resident, dung),
        (books.caller(Role.RESIDENT, joined, "hh-charged-nothing"), "hh-charged-nothing"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await caller.GetHouseholdDues(
                ledger_pb2.GetHouseholdDuesRequest(fund_id=ward_fund, household_id=household_id)
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

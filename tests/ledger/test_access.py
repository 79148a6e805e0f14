"""Transparency and control: residents read their unit's funds; only the unit's own leader or
treasurer changes them."""

from __future__ import annotations

import grpc
import pytest
from bson import ObjectId
from civic.ledger.v1 import ledger_pb2

from services.common.auth import Role
from services.registry.main import RegistryService
from tests.ledger.conftest import Books, LedgerCaller, open_fund, rid
from tests.registry_fixtures import new_household


def transfer(books: Books) -> ledger_pb2.PostTransactionRequest:
    return ledger_pb2.PostTransactionRequest(
        request_id=rid(),
        fund_id=books.fund_id,
        postings=[
            ledger_pb2.Posting(account="cash", amount=10_000),
            ledger_pb2.Posting(account="income/donations", amount=-10_000),
        ],
    )


async def refused(call: object, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    assert error.value.code() == code
    return error.value.details() or ""


async def test_writes_need_the_units_leader_or_treasurer(books: Books) -> None:
    city = books.city
    assert (await books.leader.PostTransaction(transfer(books))).transaction.sequence == 1
    assert (await books.treasurer.PostTransaction(transfer(books))).transaction.sequence == 2
    outsiders: list[LedgerCaller] = [
        books.resident("an"),
        books.caller(Role.TREASURER, city.other_group),
        books.caller(Role.GROUP_LEADER, city.other_group),
        books.caller(Role.WARD_OFFICER, city.ward),  # above the group: reads, does not keep
        books.auditor,
        books.caller(Role.INTEGRATOR, city.city),
    ]
    for caller in outsiders:
        await refused(caller.PostTransaction(transfer(books)))
    await refused(
        books.resident("an").OpenFund(
            ledger_pb2.OpenFundRequest(request_id=rid(), unit_id=city.group, name="Quỹ riêng")
        )
    )
    message = await refused(
        books.caller(Role.TREASURER, city.other_group).DeclareCampaign(
            ledger_pb2.DeclareCampaignRequest(
                request_id=rid(),
                fund_id=books.fund_id,
                name="x",
                period="2026",
                basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
                rate=1,
            )
        )
    )
    assert city.group in message
    assert (
        await books.auditor.GetBalances(ledger_pb2.GetBalancesRequest(fund_id=books.fund_id))
    ).available == 20_000


async def test_residents_read_their_units_funds_and_only_those(books: Books) -> None:
    city = books.city
    ward_fund = await open_fund(
        books.caller(Role.WARD_OFFICER, city.ward), city.ward, "Quỹ khuyến học phường"
    )
    other_fund = await open_fund(
        books.caller(Role.GROUP_LEADER, city.other_group), city.other_group
    )
    resident = books.resident("an")
    listed = await resident.ListFunds(ledger_pb2.ListFundsRequest())
    assert {f.fund_id for f in listed.funds} == {books.fund_id, ward_fund}
    for fund_id in (books.fund_id, ward_fund):
        await resident.GetStatement(ledger_pb2.GetStatementRequest(fund_id=fund_id))
    await refused(resident.GetStatement(ledger_pb2.GetStatementRequest(fund_id=other_fund)))
    await refused(resident.GetBalances(ledger_pb2.GetBalancesRequest(fund_id=other_fund)))
    # The ward officer sees the ward's funds and its groups'.
    ward_view = await books.caller(Role.WARD_OFFICER, city.ward).ListFunds(
        ledger_pb2.ListFundsRequest()
    )
    assert {books.fund_id, ward_fund, other_fund} <= {f.fund_id for f in ward_view.funds}
    # A neighbour's leader does not read this group's funds.
    await refused(
        books.caller(Role.GROUP_LEADER, city.other_group).GetBalances(
            ledger_pb2.GetBalancesRequest(fund_id=books.fund_id)
        )
    )


async def test_statements_show_household_names_and_no_other_personal_data(books: Books) -> None:
    await books.contribute(50_000, "an", receipt_number="BL-9")
    statement = (
        await books.resident("dung").GetStatement(
            ledger_pb2.GetStatementRequest(fund_id=books.fund_id)
        )
    ).statement
    (line,) = statement.lines
    assert line.description == "Trần Văn An — ủng hộ"
    text = str(statement)
    for private in ("citizen", "address", "Kiệt", "birth", "phone"):
        assert private not in text


async def test_a_households_dues_name_no_household_outside_the_funds_unit(books: Books) -> None:
    """The ledger knows a household of this group (a gift of theirs taught it). The
    neighbouring group's leader, asking his own fund about it, is told no name, which the
    registry would not show him either, and gets the answer given for a household that does
    not exist."""
    await books.contribute(10_000, "dung")
    city = books.city
    other_leader = books.caller(Role.GROUP_LEADER, city.other_group)
    other_fund = await open_fund(other_leader, city.other_group)

    async def dues(household_id: str) -> ledger_pb2.GetHouseholdDuesResponse:
        request = ledger_pb2.GetHouseholdDuesRequest(fund_id=other_fund, household_id=household_id)
        response: ledger_pb2.GetHouseholdDuesResponse = await other_leader.GetHouseholdDues(request)
        return response

    for household_id in (books.households["dung"], "hh-nowhere"):
        assert await dues(household_id) == ledger_pb2.GetHouseholdDuesResponse(
            household_id=household_id
        )
    # In the fund's own unit a household is named, dues or none.
    own = await books.leader.GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(
            fund_id=books.fund_id, household_id=books.households["dung"]
        )
    )
    assert own.household_name == "Hoàng Văn Dũng"


async def test_missing_credentials(books: Books) -> None:
    from grpc import aio

    async with aio.insecure_channel(books.target) as channel:
        from civic.ledger.v1 import ledger_pb2_grpc

        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        await refused(
            stub.GetFund(ledger_pb2.GetFundRequest(fund_id=books.fund_id)),
            grpc.StatusCode.UNAUTHENTICATED,
        )


async def test_a_household_new_to_the_ledger_is_asked_of_the_registry_alone(
    books: Books, registry: RegistryService
) -> None:
    """A donation from a household the ledger has not seen: it asks the registry for that
    household, not the whole unit (whose every head's name the registry would log as read),
    and a household id that is not in the unit reads nothing of it either."""
    newcomer = await new_household(books.city.leader, books.city.group, head_name="Ngô Văn Mới")
    household_id = newcomer.household.household_id
    log = registry.db["access_log"]

    async def read_since(mark: ObjectId) -> list[str]:
        found = log.find({"_id": {"$gt": mark}, "action": "ListHouseholdSummaries"})
        return [entry["household_id"] async for entry in found]

    mark = ObjectId()
    given = await books.contribute(50_000, household_id=household_id)
    assert given.contribution.household_name == "Ngô Văn Mới"
    assert await read_since(mark) == [household_id]

    mark = ObjectId()
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await books.contribute(50_000, household_id="hh-" + "0" * 24)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert await read_since(mark) == []

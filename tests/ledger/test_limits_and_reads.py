"""What the books refuse and how they read: no account past the limit, income and expense
lines included; a reversed payment shows as reversed; a statement's CSV cannot run formulas;
nobody is shown as having paid a due that nobody owed, nor as owing one."""

from __future__ import annotations

import asyncio
import csv
import io
import unicodedata
from datetime import date

import grpc
import pytest
from civic.ledger.v1 import ledger_pb2
from civic.registry.v1 import registry_pb2

from services.common.config import Settings
from services.ledger import statements
from services.ledger.domain import MAX_BALANCE
from services.ledger.main import LedgerService
from services.ledger.replay import Replayer, read_topic
from tests.ledger.conftest import Books, rid
from tests.ledger.test_replay import published
from tests.registry_fixtures import new_household


def entry(fund_id: str, *postings: tuple[str, int]) -> ledger_pb2.PostTransactionRequest:
    return ledger_pb2.PostTransactionRequest(
        request_id=rid(),
        fund_id=fund_id,
        postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in postings],
    )


async def test_no_account_goes_past_the_limit_across_calls(books: Books) -> None:
    """Each call alone is within it; their sum on an expense line is not (the replay, which
    checks the sum, would otherwise refuse a history the service accepted)."""
    big = 10**15
    batch = [entry(books.fund_id, ("expense/big", big), ("equity/x", -big)) for _ in range(100)]
    await books.treasurer.PostTransactions(ledger_pb2.PostTransactionsRequest(transactions=batch))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await books.post(("expense/big", big), ("equity/x", -big))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expense/big past" in (error.value.details() or "")
    assert (await books.balances())["expense/big"] == 100 * big


async def test_a_campaign_past_the_limit_names_the_rate(books: Books) -> None:
    """DeclareCampaignRequest has no `postings`: its rate is what makes the dues too much."""
    big = 10**15
    batch = [entry(books.fund_id, ("equity/x", big), ("income/dues", -big)) for _ in range(100)]
    await books.treasurer.PostTransactions(ledger_pb2.PostTransactionsRequest(transactions=batch))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await books.leader.DeclareCampaign(
            ledger_pb2.DeclareCampaignRequest(
                request_id=rid(),
                fund_id=books.fund_id,
                name="Khuyến học",
                period="2026",
                basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
                rate=20_000,
            )
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.value.details() or "").startswith("rate: would take income/dues past")


async def test_a_reversed_payment_shows_its_reversal_in_the_households_dues(books: Books) -> None:
    paid = await books.contribute(50_000, "an")
    reversal = await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            transaction_id=paid.transaction_id,
            reason="trả lại",
        )
    )
    own = await books.resident("an").GetHouseholdDues(
        ledger_pb2.GetHouseholdDuesRequest(
            fund_id=books.fund_id, household_id=books.households["an"]
        )
    )
    assert [(p.transaction_id, p.reversed_by_transaction_id) for p in own.payments] == [
        (paid.transaction_id, reversal.transaction.transaction_id)
    ]


def test_a_statement_csv_shows_formula_like_names_as_text() -> None:
    statement = ledger_pb2.Statement(
        fund=ledger_pb2.Fund(name='=HYPERLINK("http://x.example/","Xem")', unit_id="dn.hc"),
        lines=[ledger_pb2.StatementLine(sequence=1, description="=1+2 — Quỹ khuyến học")],
    )
    rows = list(csv.reader(io.StringIO(statements.csv_bytes(statement).decode("utf-8-sig"))))
    assert rows[0][1] == '\'=HYPERLINK("http://x.example/","Xem")'
    assert rows[4][3] == "'=1+2 — Quỹ khuyến học"


@pytest.mark.parametrize(
    "basis",
    [ledger_pb2.DUES_BASIS_PER_PERSON, ledger_pb2.DUES_BASIS_PER_HOUSEHOLD],
    ids=["per_person", "per_household"],
)
async def test_a_household_nobody_lives_in_owes_nothing_and_has_not_paid(
    books: Books,
    basis: ledger_pb2.DuesBasis.ValueType,
    settings: Settings,
    ledger_service: LedgerService,
) -> None:
    """On either basis: the board would otherwise show the household as not having paid for
    ever, and the fund carry a receivable nobody can pay. The auditors' replay agrees."""
    gone = await new_household(books.city.leader, books.city.group, head_name="Đỗ Văn Mất")
    await books.city.leader.RegisterDeath(
        registry_pb2.RegisterDeathRequest(
            request_id=rid(), person_id=gone.head.person_id, death_date=date.today().isoformat()
        )
    )
    declared = await books.leader.DeclareCampaign(
        ledger_pb2.DeclareCampaignRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            name="Khuyến học",
            period="2026",
            basis=basis,
            rate=20_000,
        )
    )
    assert gone.household.household_id not in {d.household_id for d in declared.campaign.dues}
    status = await books.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(
            fund_id=books.fund_id, campaign_id=declared.campaign.campaign_id
        )
    )
    assert gone.household.household_id not in {h.household_id for h in status.households}
    assert status.paid == 0
    live = await books.balances()
    assert not any(account.endswith(gone.household.household_id) for account in live)
    await published(ledger_service)
    replayer = Replayer(None, "")
    await read_topic(settings.kafka_bootstrap_servers, "civic.ledger.v1", replayer.apply)
    assert replayer.report.first_bad is None, replayer.report.text()
    replayed = replayer.books.funds[books.fund_id].balances
    assert {a: n for a, n in replayed.items() if n} == live


async def test_a_statement_whose_totals_would_pass_the_limit_names_the_period(
    books: Books,
) -> None:
    """Every posting and every balance is within the limits, but money that comes in and goes
    out again adds up over a period: a statement's total past MAX_BALANCE (and, further on,
    past what its int64 field holds) is refused naming `from`, and a shorter period is
    answered."""
    big = 10**15
    into = [("cash", big), ("bank", big), ("equity/a", -big), ("equity/b", -big)]
    back = [(account, -amount) for account, amount in into]
    pairs = MAX_BALANCE // (2 * big)  # money in and out, each up to the limit exactly
    batch = [entry(books.fund_id, *(into if i % 2 == 0 else back)) for i in range(2 * pairs)]
    await books.treasurer.PostTransactions(ledger_pb2.PostTransactionsRequest(transactions=batch))
    within = await books.auditor.GetStatement(ledger_pb2.GetStatementRequest(fund_id=books.fund_id))
    assert (within.statement.total_in, within.statement.total_out) == (MAX_BALANCE, MAX_BALANCE)
    await asyncio.sleep(0.01)
    (late, _) = (
        await books.treasurer.PostTransactions(
            ledger_pb2.PostTransactionsRequest(
                transactions=[entry(books.fund_id, *into), entry(books.fund_id, *back)]
            )
        )
    ).transactions
    for call, request in (
        (books.auditor.GetStatement, ledger_pb2.GetStatementRequest(fund_id=books.fund_id)),
        (books.auditor.ExportStatement, ledger_pb2.ExportStatementRequest(fund_id=books.fund_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(request)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (refused.value.details() or "").startswith(
            f"from: the money in over the period comes to {MAX_BALANCE + 2 * big:,} đồng"
        ), refused.value.details()
    shorter = ledger_pb2.GetStatementRequest(fund_id=books.fund_id)
    getattr(shorter, "from").CopyFrom(late.posted_at)
    answered = (await books.auditor.GetStatement(shorter)).statement
    assert (answered.total_in, answered.total_out) == (2 * big, 2 * big)
    assert answered.opening_available == answered.closing_available == 0


async def test_text_typed_with_separate_tone_marks_is_kept_composed_and_measured_by_letters(
    books: Books,
) -> None:
    """Some Vietnamese keyboards send a letter and its marks apart ("ế" as e, ˆ, ´): the fund's
    name and a memo within their limits in letters are taken, and kept composed as on any
    other keyboard, not refused for the marks they were typed with."""
    name = "Quỹ khuyến học tổ dân phố số mười một phường Hòa Cường Bắc quận Hải Châu năm 2026"
    name = (name + " " + name)[:120].strip()
    typed = unicodedata.normalize("NFD", name)
    assert len(typed) > 120
    opened = await books.leader.OpenFund(
        ledger_pb2.OpenFundRequest(request_id=rid(), unit_id=books.city.group, name=typed)
    )
    assert opened.fund.name == name
    memo = ("Tiền điện chiếu sáng kiệt 45 tháng mười một " * 12)[:500]
    posted = await books.post(
        ("cash", 10_000),
        ("income/donations", -10_000),
        memo=unicodedata.normalize("NFD", memo),
    )
    assert posted.memo == memo.strip()

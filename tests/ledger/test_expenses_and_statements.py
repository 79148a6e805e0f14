"""Expenses with a receipt image uploaded straight to object storage, and statements for a period
read back from object storage as CSV and PDF."""

from __future__ import annotations

import asyncio
import csv
import io
import urllib.request
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from civic.ledger.v1 import ledger_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.objects import checked
from services.common.wire import local_date
from tests.conftest import Clock
from tests.ledger.conftest import Books, rid

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


def _http(method: str, url: str, data: bytes | None = None, content_type: str = "") -> bytes:
    request = urllib.request.Request(url, data=data, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=10) as response:
        body: bytes = response.read()
        return body


async def upload_receipt(books: Books, body: bytes = PNG, content_type: str = "image/png") -> str:
    ticket = await books.treasurer.CreateReceiptUpload(
        ledger_pb2.CreateReceiptUploadRequest(
            fund_id=books.fund_id, content_type=content_type, size_bytes=len(body)
        )
    )
    await asyncio.to_thread(_http, "PUT", ticket.upload_url, body, content_type)
    return str(ticket.object_key)


def expense(books: Books, key: str, **kw: Any) -> ledger_pb2.RecordExpenseRequest:
    fields: dict[str, Any] = {
        "request_id": rid(),
        "fund_id": books.fund_id,
        "amount": 350_000,
        "category": "sanitation",
        "payee": "Tổ vệ sinh kiệt 45",
        "approved_by": "Nguyễn Văn Tổ trưởng (tổ trưởng)",
        "method": ledger_pb2.PAYMENT_METHOD_CASH,
        "receipt_object_key": key,
        # This year's first day: past, and within the fund's books.
        "spent_on": f"{local_date(datetime.now(UTC)).year}-01-01",
    } | kw
    return ledger_pb2.RecordExpenseRequest(**fields)


async def test_an_expense_with_its_receipt_image(books: Books) -> None:
    await books.post(("cash", 1_000_000), ("equity/opening", -1_000_000))
    key = await upload_receipt(books)
    request = expense(books, key)
    spent = (await books.treasurer.RecordExpense(request)).transaction
    assert spent.kind == ledger_pb2.TRANSACTION_KIND_EXPENSE
    assert spent.expense.receipt_object_key == checked(key)
    assert spent.expense.approved_by.startswith("Nguyễn Văn")
    assert await asyncio.to_thread(_http, "GET", spent.expense.receipt_url) == PNG
    # A retry answers the same transaction; its receipt link is signed anew, for the same image.
    again = (await books.treasurer.RecordExpense(request)).transaction
    assert urlsplit(again.expense.receipt_url).path == urlsplit(spent.expense.receipt_url).path
    again.expense.receipt_url = spent.expense.receipt_url
    assert again == spent
    assert await books.balances() == {
        "cash": 650_000,
        "expense/sanitation": 350_000,
        "equity/opening": -1_000_000,
    }


async def test_a_receipt_backs_one_expense_until_that_one_is_reversed(books: Books) -> None:
    await books.post(("cash", 1_000_000), ("equity/opening", -1_000_000))
    key = await upload_receipt(books)
    first = (await books.treasurer.RecordExpense(expense(books, key))).transaction
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.RecordExpense(expense(books, key, amount=100_000))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (refused.value.details() or "").startswith("receipt_object_key: ")
    assert first.transaction_id in (refused.value.details() or "")
    await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            transaction_id=first.transaction_id,
            reason="ghi nhầm số tiền",
        )
    )
    again = (await books.treasurer.RecordExpense(expense(books, key, amount=300_000))).transaction
    assert again.expense.receipt_object_key == checked(key)
    assert (await books.balances())["cash"] == 700_000


async def test_an_expense_needs_a_real_image_and_the_money(books: Books) -> None:
    await books.post(("cash", 100_000), ("equity/opening", -100_000))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.RecordExpense(expense(books, ""))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("receipt_object_key: ")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.RecordExpense(
            expense(books, "receipts/fd-other/" + "a" * 32 + ".png")
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fake = await upload_receipt(books, b"MZ not an image at all" * 10)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.RecordExpense(expense(books, fake, amount=50_000))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Named as the request names it, not as the object store does.
    assert (refused.value.details() or "").startswith(
        "receipt_object_key: the uploaded file is not a image/png"
    )
    # A key of this fund's form that nothing was uploaded to.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.RecordExpense(
            expense(books, f"receipts/{books.fund_id}/" + "b" * 32 + ".png")
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert (refused.value.details() or "").startswith("receipt_object_key: nothing was uploaded")
    key = await upload_receipt(books)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.RecordExpense(expense(books, key, amount=150_000))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # RecordExpenseRequest has no `postings`: the amount is what the cash cannot cover.
    assert (refused.value.details() or "").startswith("amount: would overdraw cash")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.CreateReceiptUpload(
            ledger_pb2.CreateReceiptUploadRequest(
                fund_id=books.fund_id, content_type="application/pdf", size_bytes=10
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await books.balances() == {"cash": 100_000, "equity/opening": -100_000}


async def test_an_expense_dated_before_the_funds_books_is_refused(books: Books) -> None:
    """A bill of the year before the fund was opened is entered as dated; one before that (a
    year mistyped) is refused, naming spent_on, and nothing is written: its receipt is still
    there to back the expense entered with the right day."""
    await books.post(("cash", 1_000_000), ("equity/opening", -1_000_000))
    key = await upload_receipt(books)
    first = date((await books.opened_on()).year - 1, 1, 1)
    before = await books.balances()
    for day in ("1900-01-01", (first - timedelta(days=1)).isoformat()):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await books.treasurer.RecordExpense(expense(books, key, spent_on=day))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = refused.value.details() or ""
        assert details.startswith(f"spent_on: must not be before {first.isoformat()}"), details
    assert await books.balances() == before
    fund = (await books.auditor.GetFund(ledger_pb2.GetFundRequest(fund_id=books.fund_id))).fund
    assert fund.sequence == 1  # opened, then the opening balance: no more events

    request = expense(books, key, spent_on=first.isoformat())
    spent = (await books.treasurer.RecordExpense(request)).transaction
    assert spent.expense.spent_on == first.isoformat()
    assert spent.expense.receipt_object_key == checked(key)
    assert (await books.balances())["cash"] == 650_000


async def test_a_statement_for_a_period_exported_to_object_storage(books: Books) -> None:
    campaign = (
        await books.leader.DeclareCampaign(
            ledger_pb2.DeclareCampaignRequest(
                request_id=rid(),
                fund_id=books.fund_id,
                name="Quỹ an ninh trật tự",
                period="2026",
                basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
                rate=100_000,
            )
        )
    ).campaign
    earlier = await books.contribute(100_000, "an", campaign.campaign_id, receipt_number="BL-01")
    await asyncio.sleep(0.01)
    paid = await books.contribute(100_000, "dung", campaign.campaign_id, receipt_number="BL-02")
    key = await upload_receipt(books)
    await books.treasurer.RecordExpense(
        expense(books, key, amount=60_000, payee="Đèn đường kiệt 45")
    )

    period = ledger_pb2.ExportStatementRequest(fund_id=books.fund_id)
    getattr(period, "from").CopyFrom(paid.posted_at)
    exported = await books.resident("binh").ExportStatement(period)
    statement = exported.statement
    assert statement.opening_available == 100_000  # Trần Văn An's payment came before
    assert [line.description for line in statement.lines] == [
        "Hoàng Văn Dũng — Quỹ an ninh trật tự",
        "sanitation — Đèn đường kiệt 45 (duyệt: Nguyễn Văn Tổ trưởng (tổ trưởng))",
    ]
    assert (statement.total_in, statement.total_out, statement.closing_available) == (
        100_000,
        60_000,
        140_000,
    )
    assert earlier.transaction_id not in {line.transaction_id for line in statement.lines}

    raw_csv = await asyncio.to_thread(_http, "GET", exported.csv_url)
    rows = list(csv.reader(io.StringIO(raw_csv.decode("utf-8-sig"))))
    assert rows[0][:2] == ["Quỹ", "Quỹ vì người nghèo"]
    body = [row for row in rows if row and row[-1].startswith("tx-")]
    assert [(row[3], row[4], row[5], row[6]) for row in body] == [
        ("Hoàng Văn Dũng — Quỹ an ninh trật tự", "BL-02", "100000", "0"),
        (
            "sanitation — Đèn đường kiệt 45 (duyệt: Nguyễn Văn Tổ trưởng (tổ trưởng))",
            "",
            "0",
            "60000",
        ),
    ]
    assert rows[-1] == ["Tồn cuối kỳ (đ)", "140000"]
    pdf = await asyncio.to_thread(_http, "GET", exported.pdf_url)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert len(pdf) > 2000
    assert exported.pdf_object_key.startswith(f"statements/{books.fund_id}/")

    whole = await books.resident("an").GetStatement(
        ledger_pb2.GetStatementRequest(fund_id=books.fund_id)
    )
    assert whole.statement.opening_available == 0
    assert len(whole.statement.lines) == 4  # the assessment, two payments, the expense
    assert whole.statement.lines[0].description == "Lập sổ thu: Quỹ an ninh trật tự"


async def test_a_receivable_named_like_an_account_is_not_summed_with_that_account(
    books: Books,
) -> None:
    """A receivable posted by hand under a "campaign" called bank stays a receivable: the
    fund's money in the bank is still on the statement, and it adds up."""
    campaign = await books.declare_per_household(100_000)
    await books.contribute(
        100_000, "an", campaign.campaign_id, method=ledger_pb2.PAYMENT_METHOD_TRANSFER
    )
    await books.post(("receivable/bank/hh-x", 5_000), ("income/adjustment", -5_000))
    statement = (
        await books.leader.GetStatement(ledger_pb2.GetStatementRequest(fund_id=books.fund_id))
    ).statement
    assert statement.closing_available == 100_000
    assert statement.opening_available + statement.total_in - statement.total_out == (
        statement.closing_available
    )
    assert {b.account: b.balance for b in statement.closing_balances}["bank"] == 100_000
    owed = {r.campaign_id: r.outstanding for r in statement.closing_receivables}
    assert owed["bank"] == 5_000


async def test_a_statement_from_a_moment_to_come_names_from(books: Books, clock: Clock) -> None:
    """Without `to` a statement runs up to now, so a `from` after now is the field at fault;
    with both given, `to` must come after `from`."""
    tomorrow = Timestamp()
    tomorrow.FromDatetime(clock() + timedelta(days=1))
    request = ledger_pb2.GetStatementRequest(fund_id=books.fund_id)
    getattr(request, "from").CopyFrom(tomorrow)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.leader.GetStatement(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "from: must not be in the future"
    request.to.CopyFrom(tomorrow)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.leader.GetStatement(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "to: must be after from"

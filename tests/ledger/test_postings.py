"""Double entry over gRPC: balanced transactions only, no overdrafts, nothing half-written,
idempotent retries, reversals, balances at any past moment."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from civic.ledger.v1 import ledger_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import FailedPrecondition
from services.ledger.domain import MAX_BALANCE, apply_postings
from services.ledger.main import LedgerService
from services.ledger.store import LedgerStore
from tests.conftest import Clock
from tests.ledger.conftest import Books, open_fund, rid


async def snapshot(service: LedgerService, fund_id: str) -> tuple[int, int, int, int]:
    """Transactions, balance rows, the fund's chain head and pending outbox entries."""
    store = service.store
    fund = await store.fund(fund_id)
    assert fund is not None
    return (
        await store.transactions.count_documents({"fund_id": fund_id}),
        await store.balances.count_documents({"fund_id": fund_id, "balance": {"$ne": 0}}),
        fund["sequence"],
        await store.db["outbox"].count_documents({}),
    )


async def test_a_balanced_transaction_moves_money(books: Books) -> None:
    posted = await books.post(("cash", 5_000_000), ("equity/opening", -5_000_000), memo="Tồn quỹ")
    assert posted.sequence == 1
    assert posted.kind == ledger_pb2.TRANSACTION_KIND_GENERAL
    assert posted.posted_by.startswith("treasurer@")
    assert await books.balances() == {"cash": 5_000_000, "equity/opening": -5_000_000}
    fund = await books.auditor.GetFund(ledger_pb2.GetFundRequest(fund_id=books.fund_id))
    assert fund.fund.sequence == 1 and len(fund.fund.head_hash) == 64


async def test_unbalanced_is_refused_and_nothing_is_written(
    books: Books, ledger_service: LedgerService
) -> None:
    before = await snapshot(ledger_service, books.fund_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.post(("cash", 100_000), ("equity/opening", -90_000))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        "postings: do not balance: debits 100000 đồng, credits 90000 đồng"
    )
    assert await snapshot(ledger_service, books.fund_id) == before


async def test_overdrawing_is_refused_whole(books: Books, ledger_service: LedgerService) -> None:
    await books.post(("cash", 300_000), ("equity/opening", -300_000))
    before = await snapshot(ledger_service, books.fund_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.post(("expense/sanitation", 500_000), ("cash", -500_000))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "would overdraw cash: balance 300000 đồng, posting -500000 đồng" in (
        refused.value.details() or ""
    )
    # A batch whose third transaction overdraws writes none of the three.
    batch = [
        ledger_pb2.PostTransactionRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            postings=[
                ledger_pb2.Posting(account="expense/sanitation", amount=100_000),
                ledger_pb2.Posting(account="cash", amount=-100_000),
            ],
        )
        for _ in range(3)
    ]
    batch[2].postings[0].amount = 250_000
    batch[2].postings[1].amount = -250_000
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.PostTransactions(
            ledger_pb2.PostTransactionsRequest(transactions=batch)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (refused.value.details() or "").startswith("transactions[2].postings: would overdraw")
    assert await snapshot(ledger_service, books.fund_id) == before
    assert await books.balances() == {"cash": 300_000, "equity/opening": -300_000}


@pytest.mark.parametrize(
    ("postings", "field"),
    [
        ([("cash", 100)], "postings"),
        ([("cash", 100), ("cash", -100)], "postings[1].account"),
        ([("till", 100), ("equity/opening", -100)], "postings[0].account"),
        ([("cash", 0), ("equity/opening", 0)], "postings[0].amount"),
        ([("cash", 10**16), ("equity/opening", -(10**16))], "postings[0].amount"),
        ([("cash", 100), ("receivable/x", -100)], "postings[1].account"),
        ([("cash", 100), ("income/Dues Money", -100)], "postings[1].account"),
    ],
)
async def test_bad_postings_name_the_field(
    books: Books, postings: list[tuple[str, int]], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.post(*postings)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(f"{field}: ")


async def test_a_retry_returns_the_original_and_a_reused_key_is_refused(
    books: Books, ledger_service: LedgerService
) -> None:
    key = rid()
    first = await books.post(("cash", 200_000), ("equity/opening", -200_000), request_id=key)
    before = await snapshot(ledger_service, books.fund_id)
    again = await books.post(("cash", 200_000), ("equity/opening", -200_000), request_id=key)
    assert again == first
    # Two retries at once, as a flaky network sends them: still one transaction.
    both = await asyncio.gather(
        *(books.post(("cash", 200_000), ("equity/opening", -200_000), request_id=key) for _ in "ab")
    )
    assert all(t == first for t in both)
    assert await snapshot(ledger_service, books.fund_id) == before
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.post(("cash", 300_000), ("equity/opening", -300_000), request_id=key)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "was already used for a different transaction" in (refused.value.details() or "")
    assert await snapshot(ledger_service, books.fund_id) == before
    # A batch that repeats an entry gets the original for it and posts the rest once.
    repeat = ledger_pb2.PostTransactionRequest(
        request_id=key,
        fund_id=books.fund_id,
        postings=[
            ledger_pb2.Posting(account="cash", amount=200_000),
            ledger_pb2.Posting(account="equity/opening", amount=-200_000),
        ],
    )
    fresh = ledger_pb2.PostTransactionRequest()
    fresh.CopyFrom(repeat)
    fresh.request_id = rid()
    batch = ledger_pb2.PostTransactionsRequest(transactions=[repeat, fresh])
    answer = await books.treasurer.PostTransactions(batch)
    assert answer.transactions[0] == first
    assert answer.transactions[1].sequence == first.sequence + 1
    assert await books.treasurer.PostTransactions(batch) == answer
    assert await books.balances() == {"cash": 400_000, "equity/opening": -400_000}


async def test_a_key_used_in_one_fund_is_refused_in_another(
    books: Books, ledger_service: LedgerService
) -> None:
    """A key is one user action's: a payment sent to the poor-relief fund, its answer lost, then
    sent again under the same key to the study fund (the form's fund changed meanwhile) is a
    different request, refused, not the money counted in both funds."""
    study = await open_fund(books.leader, books.city.group, "Quỹ khuyến học")
    key = rid()
    await books.contribute(100_000, "an", request_id=key, receipt_number="BL-501")
    before = await snapshot(ledger_service, study)
    for sent in (
        books.contribute(100_000, "an", fund_id=study, request_id=key, receipt_number="BL-501"),
        books.post(
            ("cash", 100_000), ("income/donations", -100_000), fund_id=study, request_id=key
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sent
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "was already used for a different transaction" in (refused.value.details() or "")
    assert await snapshot(ledger_service, study) == before
    assert await books.balances(study) == {}
    # Nor two funds' entries of one batch under one key.
    entry = ledger_pb2.PostTransactionRequest(
        request_id=rid(),
        fund_id=books.fund_id,
        postings=[
            ledger_pb2.Posting(account="cash", amount=5_000),
            ledger_pb2.Posting(account="equity/opening", amount=-5_000),
        ],
    )
    other = ledger_pb2.PostTransactionRequest()
    other.CopyFrom(entry)
    other.fund_id = study
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.PostTransactions(
            ledger_pb2.PostTransactionsRequest(transactions=[entry, other])
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await books.balances(study) == {}


async def test_one_key_sent_to_two_funds_at_once_is_posted_in_one_of_them(
    books: Books, ledger_service: LedgerService
) -> None:
    """The same payment sent at the same moment to two funds (two tabs of the treasurer's app,
    say): one of them posts it; the other is refused as a key used in another fund."""
    study = await open_fund(books.leader, books.city.group, "Quỹ khuyến học cùng lúc")
    for number in range(10):
        key = rid()
        answers = await asyncio.gather(
            *(
                books.contribute(
                    10_000, "an", fund_id=fund, request_id=key, receipt_number=f"BL-9{number}"
                )
                for fund in (books.fund_id, study)
            ),
            return_exceptions=True,
        )
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert len(refused) == 1, answers
        assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already used for a different transaction in another fund" in (
            refused[0].details() or ""
        )
        assert await ledger_service.store.transactions.count_documents({"request_id": key}) == 1


async def test_a_store_holding_a_key_in_two_funds_keeps_keys_unique_within_a_fund(
    ledger_service: LedgerService,
) -> None:
    """A store written before a key was refused in a second fund may hold one: the service still
    starts, with the key unique within its fund as before; a clean store's key is unique."""
    for held_twice in (True, False):
        db = ledger_service.store.db.client[f"ledger-keys-{rid()[:8]}"]
        store = LedgerStore(db)
        await store.transactions.create_index([("request_id", 1), ("fund_id", 1)], unique=True)
        if held_twice:
            await store.transactions.insert_many(
                [{"request_id": "k-1", "fund_id": "fd-a"}, {"request_id": "k-1", "fund_id": "fd-b"}]
            )
        try:
            await store.ensure_indexes()
            indexes = await store.transactions.index_information()
            kept = "request_id_1_fund_id_1" if held_twice else "request_id_1"
            gone = "request_id_1" if held_twice else "request_id_1_fund_id_1"
            assert indexes[kept]["unique"]
            assert gone not in indexes
        finally:
            await db.client.drop_database(db.name)


async def test_a_reversal_undoes_a_transaction_which_stays_as_it_was(books: Books) -> None:
    await books.post(("cash", 1_000_000), ("equity/opening", -1_000_000))
    mistake = await books.post(("expense/events", 400_000), ("cash", -400_000), memo="Trung thu")
    key = rid()
    request = ledger_pb2.ReverseTransactionRequest(
        request_id=key,
        fund_id=books.fund_id,
        transaction_id=mistake.transaction_id,
        reason="nhập nhầm số tiền",
    )
    reversal = (await books.treasurer.ReverseTransaction(request)).transaction
    assert reversal.kind == ledger_pb2.TRANSACTION_KIND_REVERSAL
    assert reversal.reverses_transaction_id == mistake.transaction_id
    assert sorted((p.account, p.amount) for p in reversal.postings) == [
        ("cash", 400_000),
        ("expense/events", -400_000),
    ]
    assert (await books.treasurer.ReverseTransaction(request)).transaction == reversal
    assert await books.balances() == {"cash": 1_000_000, "equity/opening": -1_000_000}
    original = await books.auditor.GetTransaction(
        ledger_pb2.GetTransactionRequest(
            fund_id=books.fund_id, transaction_id=mistake.transaction_id
        )
    )
    expected = ledger_pb2.Transaction()
    expected.CopyFrom(mistake)
    expected.reversed_by_transaction_id = reversal.transaction_id
    assert original.transaction == expected

    for target, problem in [
        (mistake.transaction_id, f"transaction {mistake.transaction_id} was already reversed"),
        (reversal.transaction_id, "a reversal is not reversed"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await books.treasurer.ReverseTransaction(
                ledger_pb2.ReverseTransactionRequest(
                    request_id=rid(), fund_id=books.fund_id, transaction_id=target, reason="x"
                )
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (refused.value.details() or "").startswith(f"transaction_id: {problem}")


async def test_a_reversal_that_would_overdraw_is_refused(books: Books) -> None:
    income = await books.post(("cash", 500_000), ("income/donations", -500_000))
    await books.post(("expense/relief", 400_000), ("cash", -400_000))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.treasurer.ReverseTransaction(
            ledger_pb2.ReverseTransactionRequest(
                request_id=rid(),
                fund_id=books.fund_id,
                transaction_id=income.transaction_id,
                reason="trả lại",
            )
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The request names no postings: the transaction it would undo is what cannot be undone.
    assert (refused.value.details() or "").startswith("transaction_id: would overdraw cash")


async def test_balances_at_a_past_moment(books: Books) -> None:
    first = await books.post(("cash", 700_000), ("equity/opening", -700_000))
    await asyncio.sleep(0.01)
    second = await books.post(("bank", 300_000), ("cash", -300_000))
    await asyncio.sleep(0.01)
    await books.post(("expense/relief", 100_000), ("bank", -100_000))

    at_first = await books.balances(as_of=first.posted_at)
    assert at_first == {"cash": 700_000, "equity/opening": -700_000}
    at_second = await books.balances(as_of=second.posted_at)
    assert at_second == {"cash": 400_000, "bank": 300_000, "equity/opening": -700_000}
    by_sequence = await books.balances(as_of_sequence=second.sequence)
    assert by_sequence == at_second
    now = await books.auditor.GetBalances(ledger_pb2.GetBalancesRequest(fund_id=books.fund_id))
    assert now.sequence == 3 and now.available == 600_000
    assert {b.account: b.balance for b in now.balances} == {
        "cash": 400_000,
        "bank": 200_000,
        "expense/relief": 100_000,
        "equity/opening": -700_000,
    }
    before_anything = ledger_pb2.GetBalancesRequest(fund_id=books.fund_id)
    before_anything.as_of.FromSeconds(first.posted_at.seconds - 60)
    assert not (await books.auditor.GetBalances(before_anything)).balances


async def test_unknown_fund_and_missing_key(books: Books) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.post(("cash", 1), ("equity/opening", -1), request_id="")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("request_id: ")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await books.post(("cash", 1), ("equity/opening", -1), fund_id="fd-nope")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_clock_set_back_never_posts_before_the_chains_last_posting(
    books: Books, clock: Clock
) -> None:
    """An instance whose clock is behind (an NTP step, a slow host) would date a transaction
    before the one it follows: balances as of a moment would then show a state that never was,
    the expense without the money it spent."""
    first = await books.post(("cash", 100_000), ("equity/opening", -100_000))
    clock.offset -= timedelta(minutes=10)
    second = await books.post(("expense/relief", 100_000), ("cash", -100_000))
    assert second.posted_at.ToDatetime() >= first.posted_at.ToDatetime()
    moment = Timestamp()
    moment.FromDatetime(first.posted_at.ToDatetime() + timedelta(minutes=1))
    assert (await books.balances(as_of=moment)).get("cash", 0) >= 0


def test_no_balance_grows_past_what_int64_sums_hold() -> None:
    with pytest.raises(FailedPrecondition, match="past"):
        apply_postings({"cash": MAX_BALANCE}, [("cash", 1), ("equity/opening", -1)])

"""Property-based: random sequences of valid and invalid operations, through the live service and
through the pure rules; the sum of all postings stays zero and the live balances equal those
replayed from the events."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from civic.ledger.v1 import events_pb2, ledger_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.config import Settings
from services.common.errors import FailedPrecondition, InvalidArgument
from services.ledger import domain
from services.ledger.main import LedgerService
from services.ledger.replay import Replayer, read_topic
from tests.ledger.conftest import Books, open_fund, rid
from tests.ledger.test_replay import published

ACCOUNTS = ("cash", "bank", "income/donations", "expense/relief", "equity/opening")
amounts = st.integers(min_value=1, max_value=2_000_000)


@st.composite
def postings(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Mostly balanced; sometimes not, sometimes malformed."""
    accounts = draw(st.lists(st.sampled_from(ACCOUNTS), min_size=1, max_size=4, unique=True))
    values = [draw(amounts) * draw(st.sampled_from((1, -1))) for _ in accounts]
    if draw(st.booleans()) and len(accounts) > 1:
        values[-1] = -sum(values[:-1]) or values[-1]
    elif draw(st.booleans()):
        accounts.append(draw(st.sampled_from([a for a in ACCOUNTS if a not in accounts] or ["x"])))
        values.append(-sum(values))
    return list(zip(accounts, values, strict=True))


operation = st.one_of(
    st.tuples(st.just("post"), postings()),
    st.tuples(st.just("reverse"), st.integers(min_value=0, max_value=20)),
    st.tuples(st.just("retry"), st.integers(min_value=0, max_value=20)),
)


@dataclass
class Model:
    """What the books should be, by the plain rules, independent of the service's code."""

    balances: dict[str, int] = field(default_factory=dict)
    posted: list[tuple[str, list[tuple[str, int]], bool]] = field(default_factory=list)

    def accepts(self, entries: list[tuple[str, int]]) -> bool:
        accounts = [a for a, _ in entries]
        if len(entries) < 2 or len(set(accounts)) < len(accounts) or "x" in accounts:
            return False
        if any(n == 0 for _, n in entries) or sum(n for _, n in entries) != 0:
            return False
        return all(self.balances.get(a, 0) + n >= 0 for a, n in entries if a in ("cash", "bank"))

    def apply(self, entries: list[tuple[str, int]]) -> None:
        for a, n in entries:
            self.balances[a] = self.balances.get(a, 0) + n


def request(
    fund_id: str, key: str, entries: list[tuple[str, int]]
) -> ledger_pb2.PostTransactionRequest:
    return ledger_pb2.PostTransactionRequest(
        request_id=key,
        fund_id=fund_id,
        postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in entries],
    )


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=st.lists(operation, min_size=1, max_size=12))
async def test_random_operations_keep_the_books_balanced_and_replayable(
    operations: list[tuple[str, object]],
    books: Books,
    ledger_service: LedgerService,
    settings: Settings,
) -> None:
    fund_id = await open_fund(books.leader, books.city.group, "Quỹ thử nghiệm")
    model = Model()
    keys: list[tuple[str, ledger_pb2.PostTransactionRequest, ledger_pb2.Transaction]] = []
    for kind, argument in operations:
        if kind == "post":
            entries = list(argument)  # type: ignore[call-overload]
            key = rid()
            try:
                answer = await books.treasurer.PostTransaction(request(fund_id, key, entries))
            except grpc.aio.AioRpcError as error:
                assert not model.accepts(entries), (entries, error.details())
                assert error.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
                continue
            assert model.accepts(entries), entries
            model.apply(entries)
            keys.append((key, request(fund_id, key, entries), answer.transaction))
            model.posted.append((answer.transaction.transaction_id, entries, False))
        elif kind == "retry" and keys:
            key, again, original = keys[int(argument) % len(keys)]  # type: ignore[call-overload]
            answer = (await books.treasurer.PostTransaction(again)).transaction
            answer.ClearField("reversed_by_transaction_id")  # a later reversal shows on reads
            assert answer == original
        elif kind == "reverse" and model.posted:
            index = int(argument) % len(model.posted)  # type: ignore[call-overload]
            transaction_id, entries, reversed_already = model.posted[index]
            undo = domain.reversal_of(entries)
            should = not reversed_already and model.accepts(undo)
            try:
                await books.treasurer.ReverseTransaction(
                    ledger_pb2.ReverseTransactionRequest(
                        request_id=rid(),
                        fund_id=fund_id,
                        transaction_id=transaction_id,
                        reason="thử",
                    )
                )
            except grpc.aio.AioRpcError as error:
                assert not should, error.details()
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                continue
            assert should
            model.apply(undo)
            model.posted[index] = (transaction_id, entries, True)

    live = await books.auditor.GetBalances(ledger_pb2.GetBalancesRequest(fund_id=fund_id))
    live_balances = {b.account: b.balance for b in live.balances}
    assert sum(live_balances.values()) == 0
    assert live_balances == {a: n for a, n in model.balances.items() if n}

    await published(ledger_service)
    replayer = Replayer(None, "")
    await read_topic(settings.kafka_bootstrap_servers, "civic.ledger.v1", replayer.apply)
    assert replayer.report.first_bad is None, replayer.report.first_bad
    assert replayer.books.total() == 0
    replayed = replayer.books.funds[fund_id]
    assert replayed.sequence == live.sequence
    assert {a: n for a, n in replayed.balances.items() if n} == live_balances


# ---- the pure rules, many more sequences ---------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(batches=st.lists(postings(), min_size=1, max_size=30), tamper=st.integers(min_value=0))
def test_the_rules_alone_sum_to_zero_and_a_changed_event_breaks_the_chain(
    batches: list[list[tuple[str, int]]], tamper: int
) -> None:
    books = domain.Books()
    opened = events_pb2.FundOpened(fund_id="fd-1", unit_id="dn.x")
    head = domain.seal(opened, 0, "")
    books.open_fund("fd-1", "dn.x", 0, "", head)
    chain: list[events_pb2.TransactionPosted] = []
    for i, entries in enumerate(batches):
        try:
            checked = domain.check_postings("postings", entries)
            domain.apply_postings(books.funds["fd-1"].balances, checked)
        except (InvalidArgument, FailedPrecondition):
            continue
        event = events_pb2.TransactionPosted(
            fund_id="fd-1",
            transaction=ledger_pb2.Transaction(
                transaction_id=f"tx-{i}",
                fund_id="fd-1",
                sequence=len(chain) + 1,
                postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in entries],
            ),
        )
        head = domain.seal(event, len(chain) + 1, head)
        fund = books.link("fd-1", event.sequence, event.prev_hash, event.hash)
        assert fund is not None
        books.post(fund, event.sequence, event.hash, f"tx-{i}", entries)
        chain.append(event)
        assert books.total() == 0
        assert all(books.funds["fd-1"].balances.get(a, 0) >= 0 for a in ("cash", "bank"))

    # Replayed from the events alone, the books are the same.
    again = domain.Books()
    again.open_fund("fd-1", "dn.x", 0, "", opened.hash)
    for event in chain:
        assert domain.chain_hash(event) == event.hash
        fund = again.link("fd-1", event.sequence, event.prev_hash, event.hash)
        assert fund is not None
        again.post(
            fund,
            event.sequence,
            event.hash,
            event.transaction.transaction_id,
            [(p.account, p.amount) for p in event.transaction.postings],
        )
    assert again.funds["fd-1"].balances == books.funds["fd-1"].balances
    if chain:
        changed = chain[tamper % len(chain)]
        changed.transaction.postings[0].amount += 1
        assert domain.chain_hash(changed) != changed.hash

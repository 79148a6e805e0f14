"""The ledger's pure rules: dues, accounts, and the books rebuilt from a chain of events."""

from __future__ import annotations

import pytest
from civic.ledger.v1 import events_pb2, ledger_pb2

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.outbox import MAX_EVENT_BYTES
from services.ledger import domain
from services.ledger.domain import BadEvent, Basis, Exemption, HouseholdFacts


def facts(
    household_id: str, residents: int, poor: bool = False, war: bool = False
) -> HouseholdFacts:
    return HouseholdFacts(household_id, "dn.g", f"Hộ {household_id}", residents, poor, war)


def test_dues_per_household_and_per_person_with_exemptions() -> None:
    households = [facts("a", 4), facts("b", 2, poor=True), facts("c", 3, war=True)]
    both = [Exemption.POOR_HOUSEHOLD, Exemption.WAR_INVALID_MEMBER]
    dues = domain.compute_dues(households, Basis.PER_PERSON, 10_000, both)
    assert [(d.household_id, d.amount, d.exempt_because) for d in dues] == [
        ("a", 40_000, None),
        ("b", 0, Exemption.POOR_HOUSEHOLD),
        ("c", 0, Exemption.WAR_INVALID_MEMBER),
    ]
    only_poor = domain.compute_dues(households, Basis.PER_HOUSEHOLD, 50_000, [both[0]])
    assert [d.amount for d in only_poor] == [50_000, 0, 50_000]


@pytest.mark.parametrize("basis", list(Basis), ids=lambda basis: basis.name.lower())
def test_a_household_nobody_lives_in_owes_nothing_on_either_basis(basis: Basis) -> None:
    households = [facts("a", 2), facts("empty", 0), facts("empty-poor", 0, poor=True)]
    dues = domain.compute_dues(households, basis, 10_000, [Exemption.POOR_HOUSEHOLD])
    # Left off the list; one exempt stays on it as exempt, as any exempt household does.
    assert [(d.household_id, d.exempt_because) for d in dues] == [
        ("a", None),
        ("empty-poor", Exemption.POOR_HOUSEHOLD),
    ]
    assert [d.amount for d in dues] == [10_000 if basis is Basis.PER_HOUSEHOLD else 20_000, 0]


def test_an_assessment_past_the_posting_limit_is_split_into_balanced_transactions() -> None:
    households = [facts(f"h{i:05d}", 1, poor=i % 7 == 0) for i in range(12_000)]
    dues = domain.compute_dues(households, Basis.PER_HOUSEHOLD, 30_000, [Exemption.POOR_HOUSEHOLD])
    parts = domain.assessment("cp-1", dues)
    assert [len(part) for part in parts] == [domain.MAX_POSTINGS, domain.MAX_POSTINGS, 288]
    for part in parts:
        domain.check_postings("postings", part)  # as the auditors' replay checks each
        assert part[-1][0] == "income/dues"
    receivables = [account for part in parts for account, _ in part[:-1]]
    paying = [d for d in dues if d.amount]
    assert receivables == [domain.receivable("cp-1", d.household_id) for d in paying]
    assert -sum(part[-1][1] for part in parts) == 30_000 * len(paying)
    assert len(domain.assessment("cp-1", dues[:10])) == 1


def test_an_assessment_of_the_longest_ids_fits_in_one_kafka_record() -> None:
    campaign_id = "cp-" + "f" * 24
    dues = [
        domain.Due(f"{i:05d}" + "h" * 95, "", 1, domain.MAX_AMOUNT, None)
        for i in range(domain.MAX_POSTINGS)
    ]
    part = domain.assessment(campaign_id, dues)[0]
    assert len(part) == domain.MAX_POSTINGS
    event = events_pb2.TransactionPosted(
        fund_id="fd-" + "f" * 24,
        sequence=2**62,
        prev_hash="0" * 64,
        hash="0" * 64,
        transaction=ledger_pb2.Transaction(
            transaction_id="tx-" + "f" * 24,
            fund_id="fd-" + "f" * 24,
            sequence=2**62,
            kind=ledger_pb2.TRANSACTION_KIND_ASSESSMENT,
            memo="Đ" * 120,
            postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in part],
            posted_by="x" * 200,
            request_id=domain.part_request_id("r" * domain.MAX_REQUEST_ID, 99_999),
            campaign_id=campaign_id,
        ),
    )
    assert event.ByteSize() < 800_000 < MAX_EVENT_BYTES


def test_a_parts_key_is_never_a_clients_nor_another_parts() -> None:
    keys = {
        domain.part_request_id(request_id, part)
        for request_id in ("a", "a ", "a-", "part 2 of a", "-" * 100)
        for part in (2, 3, 12)
    }
    assert len(keys) == 15
    assert all(len(key) > domain.MAX_REQUEST_ID for key in keys)


def test_payment_status() -> None:
    # (due, paid, outstanding, exempt)
    assert domain.payment_status(100, 100, 0, False) is domain.PaymentStatus.PAID
    assert domain.payment_status(100, 60, 40, False) is domain.PaymentStatus.PARTLY_PAID
    assert domain.payment_status(100, 0, 100, False) is domain.PaymentStatus.UNPAID
    assert domain.payment_status(0, 0, 0, True) is domain.PaymentStatus.EXEMPT
    # Cancelled (the assessment reversed) or written off: nothing owed, not all of it paid.
    assert domain.payment_status(100, 0, 0, False) is domain.PaymentStatus.CANCELLED
    assert domain.payment_status(100, 30, 0, False) is domain.PaymentStatus.CANCELLED


@pytest.mark.parametrize(
    "account",
    ["cash/x", "bank/a/b", "receivable/cp-1", "income/Dues", "expense/", "equity", "wallet"],
)
def test_bad_account_names(account: str) -> None:
    with pytest.raises(InvalidArgument):
        domain.check_account("account", account)


def test_overdraft_names_the_account() -> None:
    with pytest.raises(FailedPrecondition, match="would overdraw bank"):
        domain.apply_postings({"bank": 10}, [("bank", -11), ("expense/x", 11)])
    assert domain.apply_postings({}, [("income/x", -5), ("cash", 5)]) == {
        "income/x": -5,
        "cash": 5,
    }


class Chain:
    """One fund's events, sealed as the service seals them."""

    def __init__(self) -> None:
        opened = events_pb2.FundOpened(fund_id="fd-1", unit_id="dn.g")
        self.head = domain.seal(opened, 0, "")
        self.opened = opened
        self.events: list[events_pb2.TransactionPosted] = []

    def post(self, *postings: tuple[str, int], reverses: str = "") -> events_pb2.TransactionPosted:
        number = len(self.events) + 1
        event = events_pb2.TransactionPosted(
            fund_id="fd-1",
            transaction=ledger_pb2.Transaction(
                transaction_id=f"tx-{number}",
                fund_id="fd-1",
                sequence=number,
                reverses_transaction_id=reverses,
                postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in postings],
            ),
        )
        self.head = domain.seal(event, number, self.head)
        self.events.append(event)
        return event


def replay(chain: Chain, events: list[events_pb2.TransactionPosted]) -> domain.Books:
    books = domain.Books()
    opened = chain.opened
    books.open_fund("fd-1", "dn.g", 0, opened.prev_hash, opened.hash)
    for event in events:
        assert domain.seals_bytes(event.SerializeToString(), event.prev_hash, event.hash)
        fund = books.link("fd-1", event.sequence, event.prev_hash, event.hash)
        if fund is not None:
            books.post(
                fund,
                event.sequence,
                event.hash,
                event.transaction.transaction_id,
                [(p.account, p.amount) for p in event.transaction.postings],
                event.transaction.reverses_transaction_id,
            )
    return books


def test_a_statements_totals_are_held_to_the_balance_limit() -> None:
    """Each line within the limits; lines enough to pass int64 are refused, not summed past
    what the proto field holds."""
    lines = [2 * domain.MAX_AMOUNT] * 50
    assert domain.statement_total("in", sum(lines)) == domain.MAX_BALANCE
    for many in ([*lines, 1], [2 * domain.MAX_AMOUNT] * 5000):
        with pytest.raises(FailedPrecondition) as refused:
            domain.statement_total("out", sum(many))
        assert refused.value.message.startswith(
            f"from: the money out over the period comes to {sum(many):,} đồng"
        )
    assert 5000 * 2 * domain.MAX_AMOUNT > 2**63 - 1


def test_books_from_events_repeats_reversals_and_breaks() -> None:
    chain = Chain()
    chain.post(("cash", 100), ("income/x", -100))
    second = chain.post(("expense/y", 30), ("cash", -30))
    chain.post(("cash", 30), ("expense/y", -30), reverses="tx-2")
    # The relay published the first two again after a crash: repeats, not forks.
    books = replay(chain, [*chain.events[:2], *chain.events[:2], chain.events[2]])
    assert books.duplicates == 2
    assert books.funds["fd-1"].balances == {"cash": 100, "income/x": -100, "expense/y": 0}
    assert books.total() == 0

    with pytest.raises(BadEvent, match="an event is missing"):
        replay(chain, [chain.events[0], chain.events[2]])
    again = chain.post(("cash", 30), ("expense/y", -30), reverses="tx-2")
    with pytest.raises(BadEvent, match="reversed or is a reversal"):
        replay(chain, chain.events)
    chain.events.remove(again)

    forked = events_pb2.TransactionPosted()
    forked.CopyFrom(second)
    forked.transaction.memo = "khác"
    domain.seal(forked, second.sequence, second.prev_hash)
    with pytest.raises(BadEvent, match="replayed or forked"):
        replay(chain, [*chain.events, forked])


def test_an_overdraft_on_the_topic_is_a_bad_event() -> None:
    chain = Chain()
    chain.post(("expense/y", 30), ("cash", -30))
    with pytest.raises(BadEvent, match="would overdraw cash"):
        replay(chain, chain.events)


def test_postings_too_large_for_one_event_are_refused_as_bad_input() -> None:
    """As many postings as allowed, each of the longest accounts, would make an event over the
    outbox's largest: refused naming the postings, not failed at publishing."""
    count = domain.MAX_POSTINGS
    longest = [(f"receivable/{'c' * 100}/{i:0100d}", 1) for i in range(count - 1)]
    postings = [*longest, ("income/dues", -(count - 1))]
    domain.check_postings("postings", postings)  # as the replay checks: well formed
    with pytest.raises(InvalidArgument) as refused:
        domain.check_postings_fit("postings", postings)
    assert refused.value.field == "postings"
    message = events_pb2.TransactionPosted(
        transaction=ledger_pb2.Transaction(
            postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in postings]
        )
    )
    assert message.ByteSize() > MAX_EVENT_BYTES  # what it guards against
    # The assessment's parts, with ids as long as the service makes, pass.
    part = [(domain.receivable("cp-" + "a" * 24, f"hh-{i:024d}"), 1) for i in range(count - 1)]
    domain.check_postings_fit("postings", [*part, ("income/dues", -(count - 1))])
    # Postings that fit one event pass, with amounts as long as they come.
    fitting = [(f"expense/{'e' * 70}{i:05d}", -1_000_000_000) for i in range(count - 1)]
    fitting.append(("cash", (count - 1) * 1_000_000_000))
    domain.check_postings_fit("postings", fitting)
    posted = events_pb2.TransactionPosted(
        transaction=ledger_pb2.Transaction(
            postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in fitting]
        )
    )
    assert posted.ByteSize() < MAX_EVENT_BYTES

"""The ledger's pure rules: dues, accounts, and the books rebuilt from a chain of events."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from civic.ledger.v1 import events_pb2, ledger_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.outbox import MAX_EVENT_BYTES
from services.ledger import domain, events
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
    sizes = [len(part.postings) for part in parts]
    assert sizes == [domain.MAX_POSTINGS, domain.MAX_POSTINGS, 288]
    for part in parts:
        domain.check_postings("postings", part.postings)  # as the auditors' replay checks each
        assert part.postings[-1][0] == "income/dues"
    receivables = [account for part in parts for account, _ in part.postings[:-1]]
    paying = [d for d in dues if d.amount]
    assert receivables == [domain.receivable("cp-1", d.household_id) for d in paying]
    assert -sum(part.postings[-1][1] for part in parts) == 30_000 * len(paying)
    assert len(domain.assessment("cp-1", dues[:10])) == 1
    # Each part's event lists the dues it books, the exempt households with the first only.
    exempt = [d for d in dues if not d.amount]
    assert parts[0].dues == sorted([*exempt, *paying[: sizes[0] - 1]], key=lambda d: d.household_id)
    assert [part.dues for part in parts[1:]] == [paying[4999:9998], paying[9998:]]


# A campaign's terms at their longest: a name of 120 four-byte characters, the longest period.
LONGEST_TERMS = {
    "name": "😀" * 120,
    "period": "2" * 20,
    "basis": ledger_pb2.DUES_BASIS_PER_PERSON,
    "rate": domain.MAX_AMOUNT,
    "exemptions": list(Exemption),
    "registry_read_at": datetime.max.replace(tzinfo=UTC),
}


def largest_event(campaign_id: str, part: domain.AssessmentPart) -> events_pb2.TransactionPosted:
    """An assessment part's event with every other field as long as it can be: ids of the
    service's length, a memo and terms name of 120 four-byte characters, the longest part key,
    a token subject filling gRPC's 8 KiB of metadata, the latest time and sequence."""
    latest = Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    return events_pb2.TransactionPosted(
        fund_id="fd-" + "f" * 24,
        sequence=2**63 - 1,
        prev_hash="0" * 64,
        hash="0" * 64,
        transaction=ledger_pb2.Transaction(
            transaction_id="tx-" + "f" * 24,
            fund_id="fd-" + "f" * 24,
            sequence=2**63 - 1,
            kind=ledger_pb2.TRANSACTION_KIND_ASSESSMENT,
            memo="😀" * 120,
            postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in part.postings],
            posted_at=latest,
            posted_by="x" * 8192,
            request_id=domain.part_request_id("r" * domain.MAX_REQUEST_ID, 2**31 - 1),
            campaign_id=campaign_id,
        ),
        assessment=events.assessment(LONGEST_TERMS, 2**31 - 1, 2**31 - 1, part.dues),
    )


def test_the_largest_campaign_fits_its_events_in_kafka_records() -> None:
    """The largest campaign the ledger lists (MAX_CAMPAIGN_HOUSEHOLDS), at the longest household
    ids an account takes (100 characters; the registry's have 27), the highest dues and the most
    residents: each part's event, with every other field at its longest, is under the outbox's
    largest. Measured: 969,543 bytes at most (the parts fill MAX_ASSESSMENT_BYTES, 960,000, with
    postings and dues; the rest is the 8 KiB subject and the names). And with the registry's
    ids, the most exempt households a campaign may have all go in its first event."""
    campaign_id = "cp-" + "f" * 24
    most = domain.MAX_CAMPAIGN_HOUSEHOLDS
    # The highest due a full part can book: its receivables' sum, income/dues, is an amount too.
    highest = domain.MAX_AMOUNT // (domain.MAX_POSTINGS - 1)

    def due(i: int, exempt: bool, length: int = 100) -> domain.Due:
        household_id = f"{i:05d}".ljust(length, "h")
        reason = Exemption.WAR_INVALID_MEMBER if exempt else None
        return domain.Due(household_id, "", 2**31 - 1, 0 if exempt else highest, reason)

    largest = 0
    for dues in (
        [due(i, exempt=False) for i in range(most)],  # every household pays
        [due(i, exempt=i % 3 == 0) for i in range(most)],  # a third exempt, in the first part
    ):
        parts = domain.assessment(campaign_id, dues)
        assert sorted(d.household_id for p in parts for d in p.dues) == [
            d.household_id for d in dues
        ]
        for part in parts:
            domain.check_postings("postings", part.postings)
            size = largest_event(campaign_id, part).ByteSize()
            used = sum(domain.posting_bytes(a, n) for a, n in part.postings)
            used += sum(domain.due_bytes(d) for d in part.dues)
            assert used <= domain.MAX_ASSESSMENT_BYTES
            largest = max(largest, size)
    assert domain.MAX_ASSESSMENT_BYTES < largest < MAX_EVENT_BYTES

    # The registry's ids: all but one household exempt, every one of them in the first event
    # (measured: 789,832 bytes).
    registry_ids = [due(i, exempt=i > 0, length=27) for i in range(most)]
    (only,) = domain.assessment(campaign_id, registry_ids)
    assert len(only.dues) == most
    assert largest_event(campaign_id, only).ByteSize() < MAX_EVENT_BYTES
    # Ids so long that the exempt households alone would not fit one event: refused.
    with pytest.raises(FailedPrecondition, match=r"^exemptions: 19,999 households are exempt"):
        domain.assessment(campaign_id, [due(i, exempt=i > 0) for i in range(most)])


def test_the_sizes_reckoned_are_the_wire_sizes() -> None:
    for account, amount in [("cash", 1), ("income/dues", -5), ("r" * 139, domain.MAX_AMOUNT)]:
        posting = ledger_pb2.Transaction(
            postings=[ledger_pb2.Posting(account=account, amount=amount)]
        )
        assert domain.posting_bytes(account, amount) == posting.ByteSize()
    for due in [
        domain.Due("hh-1", "Tên", 0, 0, Exemption.POOR_HOUSEHOLD),
        domain.Due("h" * 200, "", 2**31 - 1, domain.MAX_AMOUNT, None),
    ]:
        listed = events.assessment(LONGEST_TERMS, 1, 1, [due])
        listed.ClearField("terms")
        assert domain.due_bytes(due) == listed.ByteSize() - 4  # part and parts


def test_a_parts_key_is_never_a_clients_nor_another_parts() -> None:
    keys = {
        domain.part_request_id(request_id, part)
        for request_id in ("a", "a ", "a-", "part 2 of a", "-" * 100)
        for part in (2, 3, 12)
    }
    assert len(keys) == 15
    assert all(len(key) > domain.MAX_REQUEST_ID for key in keys)


def test_a_funds_books_begin_with_the_year_before_it_was_opened_in_vietnam() -> None:
    # 18:00 on 31 December UTC is already 1 January in Vietnam.
    first = domain.first_day_of_books(datetime(2026, 12, 31, 18, 0, tzinfo=UTC))
    assert first == date(2026, 1, 1)
    assert domain.first_day_of_books(datetime(2026, 12, 31, 16, 0, tzinfo=UTC)) == date(2025, 1, 1)
    domain.check_in_books("paid_on", "2026-01-01", first)
    with pytest.raises(InvalidArgument) as refused:
        domain.check_in_books("paid_on", "2025-12-31", first)
    assert refused.value.field == "paid_on"


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


def test_a_receipt_number_copied_with_spaces_around_it_is_the_number_printed() -> None:
    assert domain.check_receipt_number("receipt_number", " BL-0077 ") == "BL-0077"
    with pytest.raises(InvalidArgument, match=r"^receipt_number: is required"):
        domain.check_receipt_number("receipt_number", "  ")
    with pytest.raises(InvalidArgument, match=r"^receipt_number: 'BL 77' is not a receipt"):
        domain.check_receipt_number("receipt_number", "BL 77")

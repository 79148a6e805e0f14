"""One household's dues at city scale: a fund whose campaigns list thousands of households
answers one household's dues, and takes its payment, by reading that household's dues alone."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from civic.ledger.v1 import ledger_pb2

from services.common.mongo import MIGRATIONS
from services.ledger import domain
from services.ledger.main import LedgerService
from services.ledger.store import DUES_APART
from tests.indexes import Examined, examined
from tests.ledger.conftest import Books

RATE = 50_000
# Other households a large unit's campaign lists besides the group's four.
OTHERS = 3000


def with_others(
    ledger_service: LedgerService,
    books: Books,
    monkeypatch: pytest.MonkeyPatch,
    count: int = OTHERS,
) -> None:
    """The register, as the ledger reads it, lists `count` more households in the group."""
    registry = ledger_service.servicer.registry
    read = registry.households

    async def larger(unit_id: str, only: Sequence[str] = ()) -> list[domain.HouseholdFacts]:
        others = [
            domain.HouseholdFacts(
                f"hh-other-{books.fund_id}-{i:05}", unit_id, f"Hộ {i}", 1, False, False
            )
            for i in range(count)
        ]
        found = [*await read(unit_id, only), *others]
        return [h for h in found if h.household_id in only] if only else found

    monkeypatch.setattr(registry, "households", larger)


async def read_dues(
    books: Books, ledger_service: LedgerService
) -> tuple[ledger_pb2.GetHouseholdDuesResponse, Examined]:
    household_id = books.households["an"]
    async with examined(ledger_service.store.db, household_id, books.fund_id) as cost:
        dues = await books.resident("an").GetHouseholdDues(
            ledger_pb2.GetHouseholdDuesRequest(fund_id=books.fund_id, household_id=household_id)
        )
    return dues, cost


async def test_a_households_dues_are_read_without_the_other_households_dues(
    books: Books, ledger_service: LedgerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read of one due, then of two with a campaign of 3,000 more households between: what
    MongoDB examines and answers grows by the household's second due, not by the others'."""
    first = await books.declare_per_household(RATE)
    one, small = await read_dues(books, ledger_service)
    assert [d.campaign_id for d in one.dues] == [first.campaign_id]
    with_others(ledger_service, books, monkeypatch)
    second = await books.declare_per_household(RATE)
    assert len(second.dues) == 4 + OTHERS
    paid = await books.contribute(RATE, "an", second.campaign_id)
    two, large = await read_dues(books, ledger_service)
    assert [(d.campaign_id, d.due, d.paid, d.outstanding) for d in two.dues] == [
        (first.campaign_id, RATE, 0, RATE),
        (second.campaign_id, RATE, RATE, 0),
    ]
    assert two.household_name == "Trần Văn An"
    assert [p.transaction_id for p in two.payments] == [paid.transaction_id]
    # A second due and a payment: a few more keys and documents, not thousands.
    assert large.keys <= small.keys + 10, (small, large)
    assert large.docs <= small.docs + 10, (small, large)
    assert large.bytes_returned <= 3 * small.bytes_returned, (small, large)
    # The household's dues are found by an index leading with the household: two keys, two
    # documents, whatever else the fund's campaigns list.
    explained = await ledger_service.store.db.command(
        "explain",
        {
            "find": ledger_service.store.dues.name,
            "filter": {"household_id": books.households["an"], "fund_id": books.fund_id},
            "sort": {"campaign_id": 1},
        },
        verbosity="executionStats",
    )
    stats = explained["executionStats"]
    assert (stats["nReturned"], stats["totalKeysExamined"], stats["totalDocsExamined"]) == (
        2,
        2,
        2,
    )


async def test_a_households_payment_reads_its_own_due_alone(
    books: Books, ledger_service: LedgerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_others(ledger_service, books, monkeypatch)
    campaign = await books.declare_per_household(RATE)
    async with examined(ledger_service.store.db, campaign.campaign_id) as cost:
        await books.contribute(RATE, "an", campaign.campaign_id)
    # Not the campaign's 3,004 dues (about 100 bytes each).
    assert cost.bytes_returned < 20_000, cost


async def test_campaigns_stored_before_their_dues_were_kept_apart_stay_readable(
    books: Books, ledger_service: LedgerService
) -> None:
    """A campaign as stored before: its list of dues alone. The store's start gives it the
    household's dues once, and they read and take payments as a new campaign's do."""
    store = ledger_service.store
    campaign = await books.declare_per_household(RATE)
    await store.dues.delete_many({"campaign_id": campaign.campaign_id})
    await store.db[MIGRATIONS].delete_one({"_id": DUES_APART})
    await store.ensure_indexes()
    assert await store.db[MIGRATIONS].find_one({"_id": DUES_APART})
    paid = await books.contribute(RATE, "an", campaign.campaign_id)
    dues, _ = await read_dues(books, ledger_service)
    assert [(d.campaign_id, d.campaign_name, d.period, d.due, d.paid) for d in dues.dues] == [
        (campaign.campaign_id, campaign.name, "2026", RATE, RATE)
    ]
    assert [p.transaction_id for p in dues.payments] == [paid.transaction_id]
    assert await store.dues.count_documents({"campaign_id": campaign.campaign_id}) == 4

"""A dues campaign's assessment carries its terms and the dues it books on civic.ledger.v1
(households by id, never by name): the auditors' replay checks every due against the terms and
the receivables against the dues, lists each campaign, and still replays the assessments of
before, which carried no terms."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from civic.ledger.v1 import events_pb2, ledger_pb2

from services.common.config import Settings
from services.ledger import domain, events
from services.ledger.domain import Basis, Exemption, chain_hash
from services.ledger.main import LedgerService
from services.ledger.replay import Replayer, Report, replay
from tests.kafka_reader import Record, TopicReader, with_key
from tests.ledger.conftest import Books, rid
from tests.ledger.test_replay import (
    OPENED,
    POSTED,
    audit,
    busy_fund,
    copy_topic,
    published,
    resealed,
)
from tests.registry_fixtures import new_household

ASSESSMENT = ledger_pb2.TRANSACTION_KIND_ASSESSMENT
BOTH = [ledger_pb2.EXEMPTION_POOR_HOUSEHOLD, ledger_pb2.EXEMPTION_WAR_INVALID_MEMBER]


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most three postings to a transaction (two receivables and the income they balance),
    so a handful of households take several assessment transactions, as a ward's thousands do."""
    monkeypatch.setattr(domain, "MAX_POSTINGS", 3)


@pytest.fixture
async def ward(books: Books, small_parts: None) -> Books:
    """The group's four households and "em" (head only): three of them pay when the poor and
    those with a war invalid are exempt, in two assessment transactions."""
    em = await new_household(books.city.leader, books.city.group, head_name="Võ Thị Em")
    books.households["em"] = em.household.household_id
    return books


async def declare(
    books: Books, basis: ledger_pb2.DuesBasis.ValueType, rate: int, name: str
) -> ledger_pb2.Campaign:
    response = await books.leader.DeclareCampaign(
        ledger_pb2.DeclareCampaignRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            name=name,
            period="2026",
            basis=basis,
            rate=rate,
            exemptions=BOTH,
        )
    )
    campaign: ledger_pb2.Campaign = response.campaign
    return campaign


async def fund_events(settings: Settings, books: Books) -> list[Record]:
    async with TopicReader(settings.kafka_bootstrap_servers, "civic.ledger.v1") as reader:
        return with_key(await reader.read_to_end(), books.fund_id)


def posted(record: Record) -> events_pb2.TransactionPosted:
    return events_pb2.TransactionPosted.FromString(record.value)


def assessments(records: list[Record]) -> list[tuple[Record, events_pb2.TransactionPosted]]:
    found = [(r, posted(r)) for r in records if r.event_type == POSTED]
    return [(r, event) for r, event in found if event.transaction.kind == ASSESSMENT]


def line_of(campaign: ledger_pb2.Campaign, cancelled: bool = False) -> str:
    """The replay's line for a campaign, from what DeclareCampaign answered."""
    exempt = sum(1 for due in campaign.dues if due.exempt_because)
    basis = "per person" if campaign.basis == ledger_pb2.DUES_BASIS_PER_PERSON else "per household"
    return (
        f"campaign {campaign.campaign_id} of fund {campaign.fund_id}: {campaign.name!r} "
        f"{campaign.period}, {basis} at {campaign.rate} đồng: {len(campaign.dues) - exempt} "
        f"households charged, {exempt} exempt, {campaign.total_due} đồng due"
        + (", cancelled" if cancelled else "")
    )


async def test_a_campaigns_events_carry_its_terms_and_dues_without_names(
    settings: Settings, ward: Books, ledger_service: LedgerService
) -> None:
    books = ward
    campaign = await declare(books, ledger_pb2.DUES_BASIS_PER_PERSON, 20_000, "Quỹ khuyến học")
    await published(ledger_service)
    parts = assessments(await fund_events(settings, books))
    assert [event.transaction.transaction_id for _, event in parts] == list(
        campaign.transaction_ids
    )
    assert len(parts) == 2  # "an" and "dung" in the first, "em" in the second
    carried: list[events_pb2.AssessedDue] = []
    for number, (record, event) in enumerate(parts, start=1):
        assessment = event.assessment
        assert assessment.terms == events_pb2.CampaignTerms(
            name=campaign.name,
            period=campaign.period,
            basis=campaign.basis,
            rate=campaign.rate,
            exemptions=campaign.exemptions,
            registry_read_at=campaign.registry_read_at,
        )
        assert (assessment.part, assessment.parts) == (number, 2)
        # The dues it books are its receivables, household by household.
        receivables = {
            p.account.rsplit("/", 1)[1]: p.amount
            for p in event.transaction.postings
            if p.account.startswith("receivable/")
        }
        assert {d.household_id: d.amount for d in assessment.dues if d.amount} == receivables
        carried += assessment.dues
        # By id only: no household's name anywhere in the event.
        for due in campaign.dues:
            assert due.household_name and due.household_name.encode() not in record.value
    # Every due of the campaign, once; the exempt ones with the first part.
    assert sorted(carried, key=lambda d: d.household_id) == [
        events_pb2.AssessedDue(
            household_id=d.household_id,
            residents=d.residents,
            amount=d.amount,
            exempt_because=d.exempt_because,
        )
        for d in campaign.dues
    ]
    exempt = {d.household_id for d in campaign.dues if d.exempt_because}
    assert exempt == {books.households["binh"], books.households["cuong"]}
    assert exempt <= {d.household_id for d in parts[0][1].assessment.dues}


async def test_the_replay_of_an_honest_fund_passes_and_lists_its_campaigns(
    settings: Settings,
    ward: Books,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    books = ward
    await busy_fund(books)
    cancelled = await declare(books, ledger_pb2.DUES_BASIS_PER_HOUSEHOLD, 50_000, "Phí vệ sinh")
    await books.reverse(cancelled.transaction_ids[1], "khai nhầm")
    kept = await declare(books, ledger_pb2.DUES_BASIS_PER_HOUSEHOLD, 30_000, "Phí vệ sinh")
    await published(ledger_service)
    first = assessments(await fund_events(settings, books))[0][1].transaction.campaign_id
    status = await books.leader.GetCampaignStatus(
        ledger_pb2.GetCampaignStatusRequest(fund_id=books.fund_id, campaign_id=first)
    )
    # The auditors check every event of the topic against the ledger's own limit.
    monkeypatch.undo()
    report = await audit(settings, books, ledger_service)
    assert report.ok, report.text()
    assert report.campaigns == [
        line_of(status.campaign),
        line_of(cancelled, cancelled=True),
        line_of(kept),
    ]
    text = report.text()
    assert "dues campaigns: 3" in text
    charged = "per household at 30000 đồng: 3 households charged, 2 exempt, 90000 đồng due"
    assert f"{kept.name!r} 2026, {charged}\n" in text
    assert text.endswith("result: OK")


def forged_after(
    last: Record, template: events_pb2.TransactionPosted, change: Callable[[Forgery], None]
) -> Record:
    """A new assessment event after the fund's last one, copied from a real one under a new
    campaign and changed by `change`, sealed in the chain: it checks out but for its dues."""
    head = posted(last) if last.event_type == POSTED else None
    event = events_pb2.TransactionPosted()
    event.CopyFrom(template)
    transaction = event.transaction
    old, new = transaction.campaign_id, f"cp-{uuid.uuid4().hex[:24]}"
    transaction.campaign_id = new
    transaction.transaction_id = f"tx-{uuid.uuid4().hex[:24]}"
    transaction.request_id = rid()
    for posting in transaction.postings:
        posting.account = posting.account.replace(f"/{old}/", f"/{new}/")
    assert head is not None
    event.sequence = transaction.sequence = head.sequence + 1
    change(Forgery(event))
    event.prev_hash = head.hash
    event.hash = chain_hash(event)
    headers = tuple(
        (name, uuid.uuid4().hex[:24].encode() if name == "ce_id" else value)
        for name, value in last.headers
    )
    return Record(last.partition, last.offset, last.key, event.SerializeToString(), headers)


class Forgery:
    """An assessment event being forged: its dues and postings by household."""

    def __init__(self, event: events_pb2.TransactionPosted) -> None:
        self.event = event

    def due(self, exempt: bool) -> events_pb2.AssessedDue:
        return next(d for d in self.event.assessment.dues if bool(d.exempt_because) == exempt)

    def move(self, household_id: str, amount: int) -> None:
        """Books `amount` more on the household's receivable, balanced on income/dues."""
        for posting in self.event.transaction.postings:
            if posting.account.endswith(f"/{household_id}"):
                posting.amount += amount
            elif posting.account == "income/dues":
                posting.amount -= amount


def overcharged(forgery: Forgery) -> None:
    due = forgery.due(exempt=False)
    due.amount += 10_000
    forgery.move(due.household_id, 10_000)


def exempt_without_grant(forgery: Forgery) -> None:
    forgery.due(exempt=True).exempt_because = ledger_pb2.EXEMPTION_WAR_INVALID_MEMBER


def receivable_off_its_due(forgery: Forgery) -> None:
    forgery.move(forgery.due(exempt=False).household_id, -5_000)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            overcharged,
            r"household (\S+) is charged 30000 đồng; its terms \(per person at 20000 đồng, "
            r"1 resident counted\) make it 20000$",
        ),
        (
            exempt_without_grant,
            "is exempt as WAR_INVALID_MEMBER, an exemption its terms do not grant$",
        ),
        (
            receivable_off_its_due,
            r"household (\S+)'s receivable is booked at 15000 đồng, its due "
            "is 20000$",
        ),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
async def test_a_due_contradicting_its_terms_is_found(
    settings: Settings,
    books: Books,
    ledger_service: LedgerService,
    change: Callable[[Forgery], None],
    reason: str,
) -> None:
    """Appended to the fund's chain with valid hashes, balanced, no account overdrawn: only the
    check of its dues against its own terms finds it."""
    await busy_fund(books)
    await published(ledger_service)
    mine = await fund_events(settings, books)
    (_, template), last = assessments(mine)[0], mine[-1]
    # The one household paying for one resident ("dung") first, so the figures are known.
    dues = sorted(template.assessment.dues, key=lambda d: (d.exempt_because, d.residents))
    del template.assessment.dues[:]
    template.assessment.dues.extend(dues)
    forged = forged_after(last, template, change)
    topic, _ = await copy_topic(
        settings, lambda r: [r, forged] if r.event_id == last.event_id else [r]
    )
    report = await audit(settings, books, ledger_service, topic)
    assert report.first_bad is not None, report.text()
    assert report.first_bad.event_id == forged.event_id
    assert report.first_bad.fund_id == books.fund_id
    assert re.search(reason, report.first_bad.reason), report.first_bad.reason
    assert report.text().endswith("result: DIFFERENCES FOUND")


async def test_an_assessment_from_before_terms_still_replays(
    settings: Settings, books: Books, ledger_service: LedgerService
) -> None:
    """A fund's history as the topic holds it from before the events carried terms: its first
    campaign's assessment without them, and a later one with them. It replays clean, the old
    campaign listed from its receivables."""
    await busy_fund(books)
    later = await declare(books, ledger_pb2.DUES_BASIS_PER_HOUSEHOLD, 30_000, "Phí vệ sinh")
    await published(ledger_service)
    mine = await fund_events(settings, books)
    (first, old), _ = assessments(mine)

    def without_terms(event: events_pb2.TransactionPosted) -> None:
        event.ClearField("assessment")

    topic, _ = await copy_topic(settings, resealed(books.fund_id, first.event_id, without_terms))
    # Not against the live service, whose chain has the terms (its hashes differ from here on).
    report = await replay(settings, topic=topic, unit=books.city.city)
    assert report.ok, report.text()
    owed = [p.amount for p in old.transaction.postings if p.account.startswith("receivable/")]
    assert report.campaigns == [
        f"campaign {old.transaction.campaign_id} of fund {books.fund_id}: terms not on the topic "
        f"(declared before events carried them), {len(owed)} households charged, {sum(owed)} "
        "đồng due",
        line_of(later),
    ]


# ---- the checks across an assessment's parts, on events made here ------------------------------


Change = Callable[[int, events_pb2.TransactionPosted], None]


class Chain:
    """One fund's events as the service would publish them, as Kafka records."""

    def __init__(self) -> None:
        opened = events_pb2.FundOpened(fund_id="fd-1", unit_id="dn.g")
        self.head = domain.seal(opened, 0, "")
        self.records: list[Record] = []
        self.add(opened)
        self.sequence = 0

    def add(self, event: events_pb2.FundOpened | events_pb2.TransactionPosted) -> None:
        kind = OPENED if isinstance(event, events_pb2.FundOpened) else POSTED
        headers = (("ce_id", uuid.uuid4().hex[:24].encode()), ("ce_type", kind.encode()))
        value = event.SerializeToString()
        self.records.append(Record(0, len(self.records), b"fd-1", value, headers))

    def assess(
        self, campaign_id: str, dues: list[domain.Due], change: Change | None = None
    ) -> None:
        terms = {
            "name": "Phí vệ sinh",
            "period": "2026",
            "basis": Basis.PER_HOUSEHOLD,
            "rate": 50_000,
            "exemptions": [Exemption.POOR_HOUSEHOLD],
            "registry_read_at": datetime(2026, 1, 5, tzinfo=UTC),
        }
        parts = domain.assessment(campaign_id, dues)
        for number, part in enumerate(parts, start=1):
            self.sequence += 1
            event = events_pb2.TransactionPosted(
                fund_id="fd-1",
                transaction=ledger_pb2.Transaction(
                    transaction_id=f"tx-{self.sequence}",
                    fund_id="fd-1",
                    sequence=self.sequence,
                    kind=ASSESSMENT,
                    campaign_id=campaign_id,
                    postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in part.postings],
                ),
                assessment=events.assessment(terms, number, len(parts), part.dues),
            )
            if change is not None:
                change(number, event)
            self.head = domain.seal(event, self.sequence, self.head)
            self.add(event)

    def replayed(self) -> Report:
        replayer = Replayer(None, "")
        for record in self.records:
            replayer.apply(record)
        replayer.finish()
        return replayer.report


def campaign_dues(count: int) -> list[domain.Due]:
    """`count` households paying 50,000 each, and one poor household exempt."""
    paying = [domain.Due(f"hh-{i}", "", 1, 50_000, None) for i in range(1, count + 1)]
    return [domain.Due("hh-0", "", 3, 0, Exemption.POOR_HOUSEHOLD), *paying]


def test_an_assessments_parts_check_out_together(small_parts: None) -> None:
    chain = Chain()
    chain.assess("cp-1", campaign_dues(3))
    report = chain.replayed()
    assert report.first_bad is None, report.text()

    def other_rate(number: int, event: events_pb2.TransactionPosted) -> None:
        if number == 2:  # the second part's own dues agree with its own (changed) terms
            event.assessment.terms.rate = 40_000
            for due in event.assessment.dues:
                due.amount = 40_000
            for posting in event.transaction.postings:
                posting.amount = 40_000 if posting.amount > 0 else -40_000

    chain = Chain()
    chain.assess("cp-1", campaign_dues(3), other_rate)
    assert report_reason(chain) == "campaign cp-1: part 2 states other terms"

    def numbered_again(number: int, event: events_pb2.TransactionPosted) -> None:
        event.assessment.part = 1

    chain = Chain()
    chain.assess("cp-1", campaign_dues(3), numbered_again)
    assert report_reason(chain) == "campaign cp-1: part 1 follows part 1"

    # One instance posts a campaign's parts together: with terms all or none.
    def without_terms(number: int, event: events_pb2.TransactionPosted) -> None:
        if number == 2:
            event.ClearField("assessment")

    chain = Chain()
    chain.assess("cp-1", campaign_dues(3), without_terms)
    assert report_reason(chain) == "campaign cp-1: a part carries no terms, though its first did"
    # Another campaign without terms after one with them: an instance of the build before,
    # still posting during a rolling deploy: unverified, not a forgery.
    chain = Chain()
    chain.assess("cp-1", campaign_dues(1))
    chain.assess("cp-2", campaign_dues(1), lambda number, event: event.ClearField("assessment"))
    report = chain.replayed()
    assert report.first_bad is None, report.text()


def report_reason(chain: Chain) -> str:
    report = chain.replayed()
    assert report.first_bad is not None, report.text()
    assert "result: DIFFERENCES FOUND" in report.text()
    return report.first_bad.reason

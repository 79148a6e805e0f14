"""Auditors replay civic.ledger.v1 into a fresh store: every fund's chain and balances check out
and match the live service; an event altered on the topic is named."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from civic.ledger.v1 import events_pb2, ledger_pb2, ledger_pb2_grpc

from infra.local import free_port
from services import cli
from services.common.auth import Role
from services.common.cloudevents import type_name
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.mongo import mongo_client
from services.ledger import replay as replay_module
from services.ledger.domain import seal
from services.ledger.events import TOPIC
from services.ledger.main import LedgerService
from services.ledger.replay import Replayer, Report, grpc_balances, grpc_funds, replay
from tests.conftest import token
from tests.kafka_reader import Record, TopicReader, eventually, with_key
from tests.ledger.conftest import Books, rid

POSTED = type_name(events_pb2.TransactionPosted())
OPENED = type_name(events_pb2.FundOpened())


async def busy_fund(books: Books) -> None:
    """A fund with every kind of transaction."""
    await books.post(("cash", 2_000_000), ("equity/opening", -2_000_000))
    campaign = (
        await books.leader.DeclareCampaign(
            ledger_pb2.DeclareCampaignRequest(
                request_id=rid(),
                fund_id=books.fund_id,
                name="Quỹ khuyến học",
                period="2026",
                basis=ledger_pb2.DUES_BASIS_PER_PERSON,
                rate=20_000,
                exemptions=[ledger_pb2.EXEMPTION_POOR_HOUSEHOLD],
            )
        )
    ).campaign
    await books.contribute(40_000, "an", campaign.campaign_id)
    mistake = await books.post(("expense/relief", 300_000), ("cash", -300_000))
    await books.treasurer.ReverseTransaction(
        ledger_pb2.ReverseTransactionRequest(
            request_id=rid(),
            fund_id=books.fund_id,
            transaction_id=mistake.transaction_id,
            reason="sai quỹ",
        )
    )
    await books.post(("bank", 500_000), ("cash", -500_000))


async def published(service: LedgerService) -> None:
    async def relayed() -> bool:
        return await service.store.db["outbox"].count_documents({"pending": True}) == 0

    await eventually(relayed, what="the ledger's outbox is relayed")


async def audit(
    settings: Settings, books: Books, ledger_service: LedgerService, topic: str = TOPIC
) -> Report:
    async with civic_channel(
        f"127.0.0.1:{ledger_service.port}", token(Role.AUDITOR, books.city.city)
    ) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        return await replay(
            settings,
            live=grpc_balances(stub),
            unit=books.city.city,
            topic=topic,
            live_funds=grpc_funds(stub),
        )


async def test_replay_matches_the_live_books_and_twice_the_same(
    settings: Settings, books: Books, ledger_service: LedgerService
) -> None:
    await busy_fund(books)
    await published(ledger_service)
    first = await audit(settings, books, ledger_service)
    assert first.ok, first.text()
    assert first.first_bad is None and first.postings_total == 0
    assert first.compared == 1  # this city's one fund
    second = await audit(settings, books, ledger_service)
    assert second.text() == first.text()
    assert "result: OK" in first.text()


async def test_the_cli_reports_shows_how_far_it_has_come_and_exits_zero(
    settings: Settings,
    books: Books,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await cli_ready(settings, books, ledger_service, monkeypatch)
    monkeypatch.setattr(replay_module, "PROGRESS_EVERY", 0.0)  # a line after every fetch
    status = await cli.run(
        [
            "replay-ledger",
            "--token",
            token(Role.AUDITOR, books.city.city),
            "--target",
            f"127.0.0.1:{ledger_service.port}",
            "--unit",
            books.city.city,
        ]
    )
    out, err = capsys.readouterr()
    assert status == 0, out + err
    assert "live balances: 1 funds compared, 0 differ" in out
    assert out.strip().endswith("result: OK")
    # Progress goes to stderr: each step, and the events read after each fetch.
    counted = re.search(r": (\d+) events .*, (\d+) funds", out)
    assert counted is not None, out
    events, funds = int(counted.group(1)), int(counted.group(2))
    steps = [line.split(": ", 1)[1] for line in err.splitlines()]
    assert steps[0].startswith(f"reading {events:,} events of civic.ledger.v1 ("), steps
    assert steps[-3].startswith(f"{events:,}/{events:,} events read (100%)"), steps
    assert steps[-2].startswith(f"all read and checked; storing {funds} funds"), steps
    assert steps[-1].startswith("comparing with the live service"), steps


def use_servers(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("CIVIC_MONGO_URI", settings.mongo_uri)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)
    monkeypatch.setenv("CIVIC_DATABASE_PREFIX", settings.database_prefix)


async def cli_ready(
    settings: Settings,
    books: Books,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """A busy fund's events published, and the command line pointed at these servers: the
    ledger's address for --target."""
    await busy_fund(books)
    await published(ledger_service)
    use_servers(monkeypatch, settings)
    return f"127.0.0.1:{ledger_service.port}"


def resealed(
    fund_id: str, victim_id: str, alter: Callable[[events_pb2.TransactionPosted], None]
) -> Callable[[Record], list[Record]]:
    """A change for `copy_topic`: the fund's event `victim_id` altered, and it and every later
    event of the fund given a hash chain that holds again, as a forger with the topic would."""
    from services.ledger.domain import chain_hash

    hashes: list[str] = []  # the hash each rewritten event of the fund now carries

    def change(record: Record) -> list[Record]:
        if record.event_type != POSTED or record.key != fund_id.encode():
            return [record]
        event = events_pb2.TransactionPosted.FromString(record.value)
        if record.event_id == victim_id:
            alter(event)
        elif hashes:
            event.prev_hash = hashes[-1]
        else:
            return [record]
        event.hash = chain_hash(event)
        hashes.append(event.hash)
        value = event.SerializeToString()
        return [Record(record.partition, record.offset, record.key, value, record.headers)]

    return change


async def copy_topic(
    settings: Settings, change: Callable[[Record], list[Record]], *, partitions_added: int = 0
) -> tuple[str, list[Record]]:
    """The ledger topic copied to a new topic, each record passed through `change` (which may
    alter, drop or add records, or move them to one of `partitions_added` new partitions),
    partitions kept."""
    async with TopicReader(settings.kafka_bootstrap_servers, "civic.ledger.v1") as reader:
        records = await reader.read_to_end()
    partitions = 1 + max(r.partition for r in records) + partitions_added
    topic = f"audit-copy-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        ordered = sorted(records, key=lambda r: (r.partition, r.offset))
        for original in ordered:
            for record in change(original):
                await producer.send_and_wait(
                    topic,
                    record.value,
                    key=record.key,
                    partition=record.partition,
                    headers=list(record.headers),
                )
    finally:
        await producer.stop()
    return topic, records


async def test_a_fund_spread_over_partitions_replays_whole(
    settings: Settings, books: Books, ledger_service: LedgerService
) -> None:
    """Partitions added to the topic move a fund's later events to another partition, which the
    replay may read before the fund's earlier events: they wait for them. A repeat of a waiting
    event counts as a repeat, and an event whose predecessor never comes is still named."""
    await busy_fund(books)
    await published(ledger_service)
    key = books.fund_id.encode()
    async with TopicReader(settings.kafka_bootstrap_servers, "civic.ledger.v1") as reader:
        partitions = 1 + max(r.partition for r in await reader.read_to_end())
    mine: list[Record] = []

    def later_events_on_a_new_partition(record: Record) -> list[Record]:
        if record.key != key:
            return [record]
        mine.append(record)
        if len(mine) <= 3:  # the fund's earlier events stay where they were
            return [record]
        moved = Record(partitions, record.offset, record.key, record.value, record.headers)
        return [moved, moved] if len(mine) == 5 else [moved]

    topic, _ = await copy_topic(settings, later_events_on_a_new_partition, partitions_added=1)
    report = await audit(settings, books, ledger_service, topic)
    assert report.ok, report.text()
    assert report.duplicates == 1
    assert report.compared == 1
    # Which partition a fetch hands over first is the broker's choice: the worst order, for sure.
    in_order, backwards = Replayer(None, ""), Replayer(None, "")
    for record in mine:
        in_order.apply(record)
    for record in [*mine[3:][::-1], *mine[3:], *mine[:3]]:
        backwards.apply(record)
    backwards.finish()
    assert backwards.report.first_bad is None, backwards.report.text()
    assert backwards.books.funds == in_order.books.funds
    assert backwards.books.duplicates == len(mine) - 3

    # The same, without the fund's second event: the events after it are named as missing it.
    dropped: list[Record] = []

    def second_dropped(record: Record) -> list[Record]:
        if record.key == key:
            dropped.append(record)
            if len(dropped) == 2:
                return []
        return later_events_on_a_new_partition(record)

    mine.clear()
    topic, _ = await copy_topic(settings, second_dropped, partitions_added=1)
    report = await audit(settings, books, ledger_service, topic)
    assert report.first_bad is not None
    assert report.first_bad.event_id == dropped[2].event_id
    assert "sequence 2 skips after 0: an event is missing" in report.first_bad.reason


def altered_opening(fund_id: str, partition: int) -> Record:
    """A fund's first event, its name changed after it was sealed, at the start of a
    partition."""
    event = events_pb2.FundOpened(fund_id=fund_id, unit_id="dn.hc.hc1", name="Quỹ khuyến học")
    seal(event, 0, "")
    event.name = "Quỹ khác"
    headers = (("ce_id", f"ev-{fund_id}".encode()), ("ce_type", OPENED.encode()))
    return Record(partition, 0, fund_id.encode(), event.SerializeToString(), headers)


def test_the_first_bad_event_named_is_the_same_whichever_partition_is_read_first() -> None:
    """Partitions are read side by side, each fetch in the order the broker hands them over:
    with bad events on two partitions, every run names the same one first."""
    events = [altered_opening("fd-a", 0), altered_opening("fd-b", 1)]
    named = set()
    for order in (events, events[::-1]):
        replayer = Replayer(None, "")
        for record in order:
            replayer.apply(record)
        replayer.finish()
        assert replayer.report.bad_events == 2
        assert replayer.report.first_bad is not None
        named.add(replayer.report.text())
    assert len(named) == 1, named
    assert "first bad event: ev-fd-a (fund fd-a" in named.pop()


def rewrite(
    event_id: str, change: Callable[[events_pb2.TransactionPosted], None]
) -> Callable[[Record], list[Record]]:
    """For copy_topic: the one event changed in place, every other record as it was."""

    def each(record: Record) -> list[Record]:
        if record.event_id != event_id:
            return [record]
        event = events_pb2.TransactionPosted.FromString(record.value)
        change(event)
        value = event.SerializeToString()
        return [Record(record.partition, record.offset, record.key, value, record.headers)]

    return each


async def test_an_altered_event_is_named(
    settings: Settings,
    books: Books,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await busy_fund(books)
    await published(ledger_service)
    async with TopicReader(settings.kafka_bootstrap_servers, "civic.ledger.v1") as reader:
        mine = with_key(await reader.read_to_end(), books.fund_id)
    # The contribution: someone makes it 10 times smaller and keeps it balanced.
    victim = next(
        r
        for r in mine
        if r.event_type == POSTED
        and events_pb2.TransactionPosted.FromString(r.value).transaction.kind
        == ledger_pb2.TRANSACTION_KIND_CONTRIBUTION
    )

    def smaller(event: events_pb2.TransactionPosted) -> None:
        for posting in event.transaction.postings:
            posting.amount //= 10

    topic, _ = await copy_topic(settings, rewrite(victim.event_id, smaller))
    report = await audit(settings, books, ledger_service, topic)
    assert not report.ok
    assert report.first_bad is not None
    assert report.first_bad.event_id == victim.event_id
    assert report.first_bad.fund_id == books.fund_id
    assert "hash does not match its content" in report.first_bad.reason

    use_servers(monkeypatch, settings)
    status = await cli.run(
        [
            "replay-ledger",
            "--token",
            token(Role.AUDITOR, books.city.city),
            "--target",
            f"127.0.0.1:{ledger_service.port}",
            "--topic",
            topic,
            "--unit",
            books.city.city,
        ]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert f"first bad event: {victim.event_id}" in out
    assert "result: DIFFERENCES FOUND" in out


async def test_a_header_without_a_value_or_a_record_without_one_is_named_not_a_crash(
    settings: Settings, books: Books, ledger_service: LedgerService
) -> None:
    """Kafka lets a header, or a record's value, be null: a forger's record like that is a bad
    event like any other, not the end of the audit."""
    await busy_fund(books)
    await published(ledger_service)
    async with TopicReader(settings.kafka_bootstrap_servers, "civic.ledger.v1") as reader:
        victim = with_key(await reader.read_to_end(), books.fund_id)[1]
    nothing: Any = None
    headers = tuple((name, nothing if name == "ce_id" else value) for name, value in victim.headers)
    odd_header = Record(victim.partition, victim.offset, victim.key, victim.value, headers)
    tombstone = Record(victim.partition, victim.offset, b"", nothing, victim.headers)
    for odd, reason in (
        (odd_header, "not a CloudEvent: no ce_id or ce_type header"),
        (tombstone, "its hash does not match its content (altered after it was sealed)"),
    ):

        def swapped(record: Record, odd: Record = odd) -> list[Record]:
            return [odd] if record.event_id == victim.event_id else [record]

        topic, _ = await copy_topic(settings, swapped)
        report = await audit(settings, books, ledger_service, topic)
        assert report.first_bad is not None, report.text()
        assert report.first_bad.reason == reason
        assert "result: DIFFERENCES FOUND" in report.text()


async def test_a_missing_event_and_a_resealed_forgery_are_found(
    settings: Settings, books: Books, ledger_service: LedgerService
) -> None:
    await busy_fund(books)
    await published(ledger_service)
    async with TopicReader(settings.kafka_bootstrap_servers, "civic.ledger.v1") as reader:
        mine = [
            r for r in with_key(await reader.read_to_end(), books.fund_id) if r.event_type == POSTED
        ]
    dropped, after = mine[1], mine[2]
    topic, _ = await copy_topic(settings, lambda r: [] if r.event_id == dropped.event_id else [r])
    report = await audit(settings, books, ledger_service, topic)
    assert report.first_bad is not None
    assert report.first_bad.event_id == after.event_id
    assert "an event is missing" in report.first_bad.reason

    # A forger who also recomputes the altered event's hash breaks the link to the next one.
    from services.ledger.domain import chain_hash

    victim, successor = mine[2], mine[3]

    def reseal(event: events_pb2.TransactionPosted) -> None:
        event.transaction.memo = "sửa lại"
        event.hash = chain_hash(event)

    topic, _ = await copy_topic(settings, rewrite(victim.event_id, reseal))
    report = await audit(settings, books, ledger_service, topic)
    assert report.first_bad is not None
    assert report.first_bad.event_id == successor.event_id
    assert "prev_hash" in report.first_bad.reason


async def test_a_history_resealed_to_its_end_and_a_missing_tail_are_found(
    settings: Settings, books: Books, ledger_service: LedgerService
) -> None:
    """A forger who reseals every later event too leaves a chain that checks out on its own,
    with the same balances (a memo and who paid changed): only the live chain's hash shows it.
    A topic missing the fund's last events shows as the live chain running past it."""

    await busy_fund(books)
    await published(ledger_service)
    async with TopicReader(settings.kafka_bootstrap_servers, "civic.ledger.v1") as reader:
        mine = [
            r for r in with_key(await reader.read_to_end(), books.fund_id) if r.event_type == POSTED
        ]
    victim = mine[1]

    def rewrite_memo(event: events_pb2.TransactionPosted) -> None:
        event.transaction.memo = "đã sửa"

    topic, _ = await copy_topic(settings, resealed(books.fund_id, victim.event_id, rewrite_memo))
    report = await audit(settings, books, ledger_service, topic)
    assert report.first_bad is None  # the topic's own chain checks out
    assert not report.ok
    assert any("history was altered" in m for m in report.mismatches), report.text()

    last = mine[-1]
    topic, _ = await copy_topic(settings, lambda r: [] if r.event_id == last.event_id else [r])
    report = await audit(settings, books, ledger_service, topic)
    assert report.first_bad is None
    assert not report.ok
    assert any(f"the topic only to {len(mine) - 1}" in m for m in report.mismatches), report.text()

    # A fund kept off the topic altogether: every event of it dropped.
    fund_key = books.fund_id.encode()
    topic, _ = await copy_topic(settings, lambda r: [] if r.key == fund_key else [r])
    report = await audit(settings, books, ledger_service, topic)
    assert f"fund {books.fund_id}: in the live service, not on the topic" in report.mismatches


async def test_a_fund_given_another_unit_on_the_topic_is_still_compared(
    settings: Settings, books: Books, ledger_service: LedgerService
) -> None:
    """A forger rewrites the fund's FundOpened to another unit and reseals its chain to the end,
    halving a contribution on the way. The audit of the fund's unit still compares the fund (the
    live service lists it there, whatever the topic says), names the unit the topic gives it
    and finds the history altered; and reads the same twice."""
    from services.ledger.domain import chain_hash

    await busy_fund(books)
    await published(ledger_service)
    fund_key = books.fund_id.encode()
    resealed: list[str] = []  # the hash each rewritten event of the fund now carries

    def moved_and_halved(record: Record) -> list[Record]:
        if record.key != fund_key:
            return [record]
        event: events_pb2.FundOpened | events_pb2.TransactionPosted
        if record.event_type == OPENED:
            event = events_pb2.FundOpened.FromString(record.value)
            event.unit_id = "dn.elsewhere"
        else:
            event = events_pb2.TransactionPosted.FromString(record.value)
            event.prev_hash = resealed[-1]
            if event.transaction.kind == ledger_pb2.TRANSACTION_KIND_CONTRIBUTION:
                for posting in event.transaction.postings:
                    posting.amount //= 2
        event.hash = chain_hash(event)
        resealed.append(event.hash)
        value = event.SerializeToString()
        return [Record(record.partition, record.offset, record.key, value, record.headers)]

    topic, _ = await copy_topic(settings, moved_and_halved)
    report = await audit(settings, books, ledger_service, topic)
    assert report.first_bad is None  # the forged chain checks out on its own
    assert not report.ok
    assert report.compared == 1
    assert report.mismatches[0] == (
        f"fund {books.fund_id}: of {books.city.group} in the live service, of dn.elsewhere on "
        "the topic"
    )
    assert "the topic's history was altered" in report.mismatches[1], report.text()
    assert (await audit(settings, books, ledger_service, topic)).text() == report.text()


async def test_the_cli_compares_the_tokens_own_funds_and_refuses_an_empty_topic(
    settings: Settings,
    books: Books,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A group leader checks their own group's books without naming the unit (the topic holds
    every city's funds, most of which the leader may not read); a topic without ledger events
    is no evidence that all is well."""
    target = await cli_ready(settings, books, ledger_service, monkeypatch)
    leader = token(Role.GROUP_LEADER, books.city.group)
    status = await cli.run(["replay-ledger", "--token", leader, "--target", target])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "live balances: 1 funds compared, 0 differ" in out

    topic, _ = await copy_topic(settings, lambda record: [])
    status = await cli.run(
        ["replay-ledger", "--token", leader, "--target", target, "--topic", topic]
    )
    captured = capsys.readouterr()
    assert status == 2
    # After the progress lines, which are not errors.
    assert captured.err.splitlines()[-1].startswith(f"error: {topic} holds no events")

    # A topic the broker does not have: one line, not a wait or a traceback.
    missing = f"audit-missing-{uuid.uuid4().hex[:8]}"
    status = await cli.run(
        ["replay-ledger", "--token", leader, "--target", target, "--topic", missing]
    )
    captured = capsys.readouterr()
    assert status == 2
    assert (
        captured.err == f"error: {missing} does not exist on {settings.kafka_bootstrap_servers}\n"
    )


async def test_the_cli_stops_before_reading_when_it_cannot_compare_or_store(
    settings: Settings,
    books: Books,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A refused token, or a MongoDB out of reach, is one line before the topic is read, not
    after a long read (and not the driver's whole view of the topology)."""
    target = await cli_ready(settings, books, ledger_service, monkeypatch)
    forged = token(
        Role.AUDITOR, books.city.city, secret="not the secret this city signs its tokens with"
    )
    status = await cli.run(["replay-ledger", "--token", forged, "--target", target])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: the live service refused: UNAUTHENTICATED"), err
    assert "reading" not in err
    status = await cli.run(["replay-ledger", "--token", "not-a-token", "--target", target])
    assert status == 2
    assert capsys.readouterr().err == "error: --token is not a Civic token (it names no unit)\n"
    auditor = token(Role.AUDITOR, books.city.city)
    misspelt = ["--unit", "DN HC", "--target", target]
    status = await cli.run(["replay-ledger", "--token", auditor, *misspelt])
    assert status == 2
    assert capsys.readouterr().err == "error: --unit 'DN HC' is not a unit id (e.g. dn.hc.hc1)\n"

    nowhere = (
        f"mongodb://127.0.0.1:{free_port()}/?directConnection=true&serverSelectionTimeoutMS=300"
    )
    monkeypatch.setenv("CIVIC_MONGO_URI", nowhere)
    status = await cli.run(["replay-ledger", "--token", auditor, "--target", target])
    err = capsys.readouterr().err
    assert status == 2
    assert err == "error: the replay's own MongoDB store is out of reach (see CIVIC_MONGO_URI)\n"


async def test_the_cli_names_the_store_it_keeps(
    settings: Settings,
    books: Books,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--keep-store keeps a database whose name the run chose: the auditor is told which."""
    target = await cli_ready(settings, books, ledger_service, monkeypatch)
    auditor = token(Role.AUDITOR, books.city.city)

    status = await cli.run(
        ["replay-ledger", "--token", auditor, "--target", target, "--keep-store"]
    )

    out, err = capsys.readouterr()
    assert status == 0, out + err
    kept = re.search(r"^replay-ledger: the replay's store is kept: database (\S+) \(", err, re.M)
    assert kept is not None, err
    client = mongo_client(settings.mongo_uri)
    try:
        assert await client[kept.group(1)].list_collection_names()
    finally:
        await client.drop_database(kept.group(1))
        await client.close()


async def test_the_cli_says_soon_that_its_store_is_away_under_the_drivers_own_timeouts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator's URI carries no short server selection timeout: the driver's own 30 s,
    retried once, would keep the auditor waiting a silent minute for the same one line."""
    monkeypatch.setenv("CIVIC_MONGO_URI", f"mongodb://127.0.0.1:{free_port()}/")
    auditor = token(Role.AUDITOR, "dn")
    started = time.monotonic()
    args = ["replay-ledger", "--token", auditor, "--target", f"127.0.0.1:{free_port()}"]

    status = await cli.run(args)

    assert status == 2
    assert capsys.readouterr().err == (
        "error: the replay's own MongoDB store is out of reach (see CIVIC_MONGO_URI)\n"
    )
    assert time.monotonic() - started < replay_module.STORE_PING_S + 5


async def test_the_cli_refuses_a_unit_with_no_fund_to_compare(
    settings: Settings,
    books: Books,
    ledger_service: LedgerService,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A unit without funds, or a misspelt one, compares nothing: no evidence that all is well,
    so not "result: OK"."""
    target = await cli_ready(settings, books, ledger_service, monkeypatch)
    auditor = token(Role.AUDITOR, books.city.city)
    for unit in (books.city.other_group, f"{books.city.group}9"):
        status = await cli.run(
            ["replay-ledger", "--token", auditor, "--target", target, "--unit", unit]
        )
        captured = capsys.readouterr()
        assert status == 2, captured.out
        assert "result: OK" not in captured.out
        assert captured.err.splitlines()[-1] == (
            f"error: no fund of {unit} on the topic or in the live service: nothing was compared"
        )

"""The auditors' replay: rebuild every fund from civic.ledger.v1 alone and check it.

    civic replay-ledger --token "$AUDITOR_TOKEN" [--unit dn.hc.hc1] [--topic civic.ledger.v1]

Reads the topic from its beginning to its end as it stands when the replay starts (a plain Kafka
consumer in no group, so nothing of the service's own reading is used or moved), into a fresh,
separate MongoDB database that is dropped afterwards (kept with --keep-store). For each event it
checks the fund's hash chain (sequence, the previous event's hash, its own hash recomputed from
its content), double entry (postings sum to zero), that no cash, bank or receivable account goes
below zero, that a reversal undoes exactly the postings of a transaction not undone before, and,
for a dues campaign's assessment that carries the campaign's terms, that every household's due
is what the terms make it and the receivables book exactly those dues. The report lists the
campaigns of the funds under --unit: their terms, households charged and exempt, and total due.
It then compares every fund's recomputed balances with what the live service answers through
gRPC (GetBalances at the same place in the chain), for the funds under --unit: those the topic
places there and every fund the live service lists there, whatever unit the topic gives it (a
fund whose unit differs between the two is itself a difference).

The report is short and the same on every run over the same events. Exit status: 0 when
everything matches, 1 on any difference (the first bad event is named), 2 when it cannot run
or has nothing to check: a topic without events, a unit without funds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import grpc
import jwt
import pymongo
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from civic.common.v1.types_pb2 import PageRequest
from civic.ledger.v1 import events_pb2, ledger_pb2, ledger_pb2_grpc
from google.protobuf.message import DecodeError
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, PyMongoError
from pymongo.write_concern import WriteConcern

from services.common.auth import unit_within
from services.common.cloudevents import type_name
from services.common.config import GRPC_PORTS, Settings, env_name
from services.common.grpc_client import civic_channel
from services.common.mongo import UNIT_ID, Document, mongo_client
from services.common.paging import MAX_PAGE_SIZE
from services.ledger.domain import (
    Assessed,
    BadEvent,
    Books,
    CampaignBooks,
    FundBooks,
    Terms,
    assessed_due,
    basis_text,
    chain_hash,
    seals_bytes,
)
from services.ledger.events import TOPIC

FUND_OPENED = type_name(events_pb2.FundOpened())
TRANSACTION_POSTED = type_name(events_pb2.TransactionPosted())
FETCH_RECORDS = 5000
LIVE_CALLS = 16
PROGRESS_EVERY = 5.0  # seconds between progress lines while the topic is read
STORE_PING_S = 5.0  # how long the replay waits for its store before it says it is out of reach
# The replay's store is scratch, rebuilt from the topic on every run: no need to wait for disk.
SCRATCH = WriteConcern(w=1, j=False)


class CannotReplay(Exception):
    """The replay cannot run (as opposed to finding differences)."""


@dataclass(frozen=True)
class Finding:
    """The first event on the topic that does not check out (see Replayer._found), and where
    it is."""

    event_id: str
    fund_id: str
    sequence: int
    partition: int
    offset: int
    reason: str

    def line(self) -> str:
        return (
            f"first bad event: {self.event_id} (fund {self.fund_id}, sequence {self.sequence}, "
            f"partition {self.partition} offset {self.offset}): {self.reason}"
        )


@dataclass
class Report:
    topic: str
    events: int = 0
    duplicates: int = 0
    funds: int = 0
    transactions: int = 0
    postings_total: int = 0
    bad_events: int = 0
    first_bad: Finding | None = None
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    live_asked: bool = False  # whether the funds were to be compared with the live service
    # One line per dues campaign of the funds under the unit, in the funds' and chain's order.
    campaigns: list[str] = field(default_factory=list)
    # Where the time went (seconds), for benchmarks; not part of the report's text.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.first_bad is None and not self.mismatches and self.postings_total == 0

    @property
    def nothing_compared(self) -> bool:
        """Asked to compare with the live service, found no fund to compare, and nothing else
        wrong: no evidence either way (a unit without funds, or a misspelt one)."""
        return self.live_asked and self.ok and self.compared == 0

    def text(self) -> str:
        lines = [
            f"ledger replay of {self.topic}: {self.events} events ({self.duplicates} repeated), "
            f"{self.funds} funds, {self.transactions} transactions",
            "hash chains, double entry and dues against their terms: "
            + ("ok" if self.first_bad is None else f"{self.bad_events} bad events"),
            f"sum of all postings: {self.postings_total} đồng",
            f"live balances: {self.compared} funds compared, {len(self.mismatches)} differ",
            f"dues campaigns: {len(self.campaigns)}",
            *self.campaigns,
        ]
        if self.first_bad is not None:
            lines.append(self.first_bad.line())
        lines += [f"differs: {m}" for m in self.mismatches[:20]]
        if self.nothing_compared:
            lines.append("result: NOTHING COMPARED")
        else:
            lines.append("result: " + ("OK" if self.ok else "DIFFERENCES FOUND"))
        return "\n".join(lines)


class Progress:
    """Lines on stderr, so a long replay shows it is alive: each step as it begins and, while
    the topic is read, how far it has come every PROGRESS_EVERY seconds."""

    def __init__(self) -> None:
        self.every = PROGRESS_EVERY
        self.started = time.monotonic()
        self.next_line = self.started + self.every

    def step(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"replay-ledger: {message} ({elapsed:.0f} s)", file=sys.stderr)

    def read(self, done: int, total: int) -> None:
        if time.monotonic() >= self.next_line:
            self.next_line = time.monotonic() + self.every
            self.step(f"{done:,}/{total:,} events read ({100 * done / max(total, 1):.0f}%)")


@dataclass(frozen=True)
class LiveFund:
    """What the live service says of a fund at a sequence of its chain."""

    sequence: int
    balances: dict[str, int]
    hash: str  # of the event at `sequence`; "" when the service cannot tell
    head_sequence: int  # where its chain is now


# The live fund at a sequence, or None when the service does not know the fund.
LiveBalances = Callable[[str, int], Awaitable[LiveFund | None]]
# The live funds of a unit and the units below it: fund id -> the fund's unit.
LiveFunds = Callable[[str], Awaitable[dict[str, str]]]


class Replayer:
    """Applies events in topic order; any event that fails a check is a finding, and its fund's
    later events are not applied (its chain is broken there).

    An event that comes before its fund's chain reaches it (its fund not opened yet, or an
    earlier sequence still to come) waits for it: a fund's events lie in one partition only
    while the topic's partition count stays the same, and partitions are read side by side.
    What still waits when the topic ends is missing its predecessor (see `finish`)."""

    def __init__(self, store: AsyncMongoClient[Document] | None, database: str) -> None:
        self.books = Books()
        self.report = Report(topic="")
        self.broken: set[str] = set()
        self.waiting: dict[str, dict[int, list[Any]]] = {}
        self._db = store[database] if store is not None else None

    def apply(self, record: Any) -> None:
        self.report.events += 1
        fund_id = self._apply(record)
        if self.waiting and fund_id in self.waiting:
            self._apply_waiting(fund_id)

    def _apply_waiting(self, fund_id: str) -> None:
        """The events that waited for the fund's chain to reach them, as far as it now does."""
        while fund_id not in self.broken:
            fund, waiting = self.books.funds.get(fund_id), self.waiting.get(fund_id)
            if fund is None or not waiting or fund.sequence + 1 not in waiting:
                break
            successors = waiting.pop(fund.sequence + 1)
            if not waiting:
                del self.waiting[fund_id]
            for successor in successors:  # a repeat or a fork of it is checked as it comes
                self._apply(successor)

    def finish(self) -> None:
        """Names the events still waiting for a predecessor the topic does not hold."""
        for fund_id in sorted(self.waiting):
            waiting = self.waiting.pop(fund_id)
            self.report.bad_events += sum(len(records) for records in waiting.values())
            self.broken.add(fund_id)
            first = min(waiting)
            record = waiting[first][0]
            fund = self.books.funds.get(fund_id)
            reason = (
                f"fund {fund_id} has no FundOpened before it"
                if fund is None
                else f"sequence {first} skips after {fund.sequence}: an event is missing"
            )
            self._found(record, _id_and_type(record.headers)[0], fund_id, first, reason)

    def _apply(self, record: Any) -> str:
        """Applies one event, or sets it to wait; returns its fund ("" when unreadable)."""
        event_id, sequence = "?", -1
        fund_id: str = ""
        try:
            event_id, event_type = _id_and_type(record.headers or ())
            message: Any
            raw: bytes = record.value or b""  # a record may have no value (a tombstone)
            if event_type == TRANSACTION_POSTED:
                message = events_pb2.TransactionPosted.FromString(raw)
            elif event_type == FUND_OPENED:
                message = events_pb2.FundOpened.FromString(raw)
            else:
                raise BadEvent(f"unknown event type {event_type!r}")
            fund_id, sequence = message.fund_id, message.sequence
            if fund_id in self.broken:
                self.report.bad_events += 1
                return fund_id
            if record.key != fund_id.encode():
                raise BadEvent("its Kafka key is not its fund")
            if not seals_bytes(raw, message.prev_hash, message.hash) and (
                chain_hash(message) != message.hash
            ):
                raise BadEvent("its hash does not match its content (altered after it was sealed)")
            if event_type == FUND_OPENED:
                self.books.open_fund(
                    fund_id, message.unit_id, sequence, message.prev_hash, message.hash
                )
                return fund_id
            fund = self.books.funds.get(fund_id)
            if fund is None or sequence > fund.sequence + 1:
                self.waiting.setdefault(fund_id, {}).setdefault(sequence, []).append(record)
                return ""
            fund = self.books.link(fund_id, sequence, message.prev_hash, message.hash)
            if fund is None:
                return fund_id  # the same event published twice
            transaction = message.transaction
            if transaction.fund_id != fund_id or transaction.sequence != sequence:
                raise BadEvent("its transaction names another fund or place in the chain")
            self.books.post(
                fund,
                sequence,
                message.hash,
                transaction.transaction_id,
                [(p.account, p.amount) for p in transaction.postings],
                transaction.reverses_transaction_id,
                _assessed(message),
            )
            return fund_id
        except (BadEvent, ValueError, DecodeError) as error:
            reason = error.reason if isinstance(error, BadEvent) else f"unreadable: {error}"
            self.report.bad_events += 1
            if fund_id:
                self.broken.add(fund_id)
                waiting = self.waiting.pop(fund_id, {})
                self.report.bad_events += sum(len(records) for records in waiting.values())
            self._found(record, event_id, fund_id, sequence, reason)
            return fund_id

    def _found(self, record: Any, event_id: str, fund_id: str, sequence: int, reason: str) -> None:
        """Keeps the bad event first on the topic: the lowest partition's, the earliest there.
        Partitions are read side by side, in the order each fetch hands them over, which
        differs from run to run; the bad events found do not."""
        first = self.report.first_bad
        if first is None or (record.partition, record.offset) < (first.partition, first.offset):
            self.report.first_bad = Finding(
                event_id, fund_id, sequence, record.partition, record.offset, reason
            )

    async def store_books(self) -> dict[str, dict[str, int]]:
        """The rebuilt books written to the replay's own database, each fund's chain head and
        balances, and read back from it: what is compared is what the separate store holds."""
        funds = self.books.funds
        if self._db is None:
            return {f: dict(books.balances) for f, books in funds.items()}
        heads = [
            {
                "_id": fund_id,
                "unit_id": books.unit_id,
                "sequence": books.sequence,
                "head_hash": books.head_hash,
                "transactions": books.transaction_count,
            }
            for fund_id, books in funds.items()
        ]
        rows = [
            {"_id": f"{fund_id}|{account}", "fund_id": fund_id, "account": account, "balance": n}
            for fund_id, books in funds.items()
            for account, n in books.balances.items()
        ]
        for name, docs in (("funds", heads), ("balances", rows)):
            if docs:
                await self._db.get_collection(name, write_concern=SCRATCH).insert_many(docs)
        stored: dict[str, dict[str, int]] = {fund_id: {} for fund_id in funds}
        async for doc in self._db["balances"].find({}):
            stored[doc["fund_id"]][doc["account"]] = doc["balance"]
        return stored


def _assessed(message: events_pb2.TransactionPosted) -> Assessed | None:
    """What an assessment's event says of its campaign (None for other transactions): its terms
    and dues when it carries them, its campaign alone when it is from before they were."""
    transaction, carried = message.transaction, message.HasField("assessment")
    if transaction.kind != ledger_pb2.TRANSACTION_KIND_ASSESSMENT:
        if carried:
            raise BadEvent("it carries a campaign's terms but is not an assessment")
        return None
    if not carried:
        return Assessed(transaction.campaign_id)
    assessment, terms = message.assessment, message.assessment.terms
    read_at = terms.registry_read_at
    return Assessed(
        transaction.campaign_id,
        Terms(
            terms.name,
            terms.period,
            terms.basis,
            terms.rate,
            tuple(terms.exemptions),
            read_at.ToDatetime(UTC) if terms.HasField("registry_read_at") else None,
        ),
        assessment.part,
        assessment.parts,
        tuple(
            assessed_due(d.household_id, d.residents, d.amount, d.exempt_because)
            for d in assessment.dues
        ),
    )


def campaign_lines(books: Books, unit: str = "") -> list[str]:
    """The report's line for each dues campaign of the funds under `unit` (all if empty), in
    the funds' order and then the chain's."""
    return [
        _campaign_line(fund, campaign)
        for fund_id, fund in sorted(books.funds.items())
        if not unit or unit_within(fund.unit_id, unit)
        for campaign in fund.campaigns.values()
    ]


def _campaign_line(fund: FundBooks, campaign: CampaignBooks) -> str:
    where = f"campaign {campaign.campaign_id} of fund {fund.fund_id}"
    terms = campaign.terms
    if terms is None:
        text = (
            f"{where}: terms not on the topic (declared before events carried them), "
            f"{campaign.charged} households charged, {campaign.total_due} đồng due"
        )
    else:
        text = (
            f"{where}: {terms.name!r} {terms.period}, {basis_text(terms.basis)} at "
            f"{terms.rate} đồng: {campaign.charged} households charged, {campaign.exempt} "
            f"exempt, {campaign.total_due} đồng due"
        )
        if not campaign.complete:
            text += f", {campaign.parts_seen} of its {campaign.parts} parts on the topic"
    if campaign.transaction_id in fund.reversals:
        text += ", cancelled"
    return text


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The replay makes no reference cycles, but its books grow by an object or two per event:
    the cyclic collector would scan them again and again (a third of the time, measured)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _id_and_type(headers: Any) -> tuple[str, str]:
    """The CloudEvents id and type of a record (the rest of its headers are not needed). Kafka
    lets a header have no value: such a header is as good as missing."""
    event_id = event_type = ""
    for name, value in headers:
        if name == "ce_id":
            event_id = (value or b"").decode()
        elif name == "ce_type":
            event_type = (value or b"").decode()
    if not event_id or not event_type:
        raise BadEvent("not a CloudEvent: no ce_id or ce_type header")
    return event_id, event_type


async def read_topic(
    bootstrap_servers: str,
    topic: str,
    handle: Callable[[Any], None],
    progress: Progress | None = None,
) -> int:
    """Every record of `topic` from the beginning to the end offsets at the start, in order per
    partition; returns how many were read."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    try:
        await consumer.start()
    except KafkaError:
        await consumer.stop()  # what start() set up before it failed
        raise
    count = 0
    try:
        await consumer.topics()  # fetches the cluster's metadata
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            raise CannotReplay(f"{topic} does not exist on {bootstrap_servers}")
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        starts = {tp: await consumer.position(tp) for tp in assigned}
        remaining = {tp for tp in assigned if starts[tp] < ends[tp]}
        total = sum(ends[tp] - starts[tp] for tp in remaining)
        if progress is not None:
            progress.step(f"reading {total:,} events of {topic}")
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=500, max_records=FETCH_RECORDS)
            for tp, records in fetched.items():
                for record in records:
                    if record.offset < ends[tp]:
                        handle(record)
                        count += 1
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            if progress is not None:
                progress.read(count, total)
    finally:
        await consumer.stop()
    return count


async def replay(
    settings: Settings,
    *,
    topic: str = TOPIC,
    live: LiveBalances | None = None,
    unit: str = "",
    keep_store: bool = False,
    live_funds: LiveFunds | None = None,
    progress: Progress | None = None,
) -> Report:
    """Replays `topic` into a fresh database and, with `live`, compares the funds under `unit`
    (all if empty) with the live service; with `live_funds` and a unit, also names any live
    fund of the unit that the topic lacks."""
    client = mongo_client(settings.mongo_uri)
    database = f"{settings.database_prefix}_ledger_replay_{uuid.uuid4().hex[:12]}"
    replayer = Replayer(client, database)
    report = replayer.report
    clock = time.perf_counter()
    reached = False  # the store: one out of reach holds no database to drop
    try:
        # Before the long read: a refused token, or a service or store out of reach, ends the
        # replay at once. The funds are listed as the topic's end is taken, so a fund opened
        # while the topic is read is not named as missing from it.
        with pymongo.timeout(STORE_PING_S):  # not the driver's 30 s of server selection, in silence
            await client.admin.command("ping")
        reached = True
        listed = await live_funds(unit) if live is not None and live_funds and unit else None
        with _no_cyclic_gc():
            await read_topic(settings.kafka_bootstrap_servers, topic, replayer.apply, progress)
        replayer.finish()
        report.timings["read_and_check"] = time.perf_counter() - clock
        if progress is not None:
            progress.step(f"all read and checked; storing {len(replayer.books.funds):,} funds")
        balances = await replayer.store_books()
        if keep_store and progress is not None:  # a name of its own: say which, to look at it
            progress.step(f"the replay's store is kept: database {database}")
        report.timings["store"] = time.perf_counter() - clock - report.timings["read_and_check"]
        report.topic = topic
        report.duplicates = replayer.books.duplicates
        report.funds = len(replayer.books.funds)
        report.transactions = sum(f.transaction_count for f in replayer.books.funds.values())
        report.postings_total = sum(sum(b.values()) for b in balances.values())
        report.campaigns = campaign_lines(replayer.books, unit)
        if live is not None:
            report.live_asked = True
            started = time.perf_counter()
            if progress is not None:
                progress.step("comparing with the live service")
            await _compare(replayer, balances, live, unit, report, listed)
            report.timings["compare"] = time.perf_counter() - started
        return report
    finally:
        if reached and not keep_store:
            with contextlib.suppress(Exception):
                await client.drop_database(database)
        await client.close()


async def _compare(
    replayer: Replayer,
    balances: dict[str, dict[str, int]],
    live: LiveBalances,
    unit: str,
    report: Report,
    listed: dict[str, str] | None = None,
) -> None:
    """Compares with the live service the funds the topic places under `unit` (all if empty)
    and, when `listed`, every live fund of the unit, whatever unit the topic gives it: a
    forger who rewrote a fund's unit on the topic would otherwise take it out of the audit."""
    books = replayer.books.funds
    placed = {f for f, fund in books.items() if not unit or unit_within(fund.unit_id, unit)}
    chosen = sorted(placed | set(listed or {}))
    # A broken chain is compared no further: its first bad event is named.
    funds = [books[f] for f in chosen if f in books and f not in replayer.broken]
    # Asked a few at a time; reported in the funds' order, so every run reads the same.
    limit = asyncio.Semaphore(LIVE_CALLS)

    async def ask(fund: FundBooks) -> LiveFund | None:
        async with limit:
            return await live(fund.fund_id, fund.sequence)

    answers = await asyncio.gather(*(ask(fund) for fund in funds))
    answered = {fund.fund_id: answer for fund, answer in zip(funds, answers, strict=True)}
    for fund_id in chosen:
        if fund_id not in books:
            # A fund kept off the topic altogether would escape the audit.
            report.mismatches.append(f"fund {fund_id}: in the live service, not on the topic")
            continue
        if fund_id not in answered:
            continue
        fund = books[fund_id]
        live_unit = (listed or {}).get(fund_id, fund.unit_id)
        if live_unit != fund.unit_id:
            report.mismatches.append(
                f"fund {fund_id}: of {live_unit} in the live service, of {fund.unit_id} on the "
                "topic"
            )
        report.compared += 1
        if difference := _difference(fund, balances[fund_id], answered[fund_id]):
            report.mismatches.append(f"fund {fund_id}: {difference}")


def _difference(fund: FundBooks, replayed: dict[str, int], answer: LiveFund | None) -> str:
    """How the live fund differs from the replayed one, first thing first ("" if it does not)."""
    if answer is None:
        return "unknown to the live service"
    expected = {a: n for a, n in replayed.items() if n}
    actual = {a: n for a, n in answer.balances.items() if n}
    if answer.sequence != fund.sequence:
        return f"live chain at {answer.sequence}, topic at {fund.sequence}"
    if answer.hash and answer.hash != fund.head_hash:
        # Balances can match while what was paid, by whom and for what was rewritten.
        return (
            f"the live chain's hash at {fund.sequence} is not the topic's: the topic's history "
            "was altered"
        )
    if answer.head_sequence > fund.sequence:
        return (
            f"the live chain runs to {answer.head_sequence}, the topic only to {fund.sequence} "
            "(events missing, or not published yet)"
        )
    if actual != expected:
        accounts = sorted(
            a for a in set(actual) | set(expected) if actual.get(a) != expected.get(a)
        )
        first = accounts[0]
        return (
            f"{first} live {actual.get(first, 0)}, replayed {expected.get(first, 0)} "
            f"({len(accounts)} accounts differ)"
        )
    return ""


def grpc_funds(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> LiveFunds:
    async def funds(unit: str) -> dict[str, str]:
        answer = await stub.ListFunds(ledger_pb2.ListFundsRequest(unit_id=unit))
        return {f.fund_id: f.unit_id for f in answer.funds if unit_within(f.unit_id, unit)}

    return funds


def grpc_balances(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> LiveBalances:
    async def live(fund_id: str, sequence: int) -> LiveFund | None:
        try:
            if sequence == 0:
                # Only opened, as far as the topic shows: nothing posted yet at that point.
                fund = (await stub.GetFund(ledger_pb2.GetFundRequest(fund_id=fund_id))).fund
                opened_only = fund.sequence == 0
                return LiveFund(0, {}, fund.head_hash if opened_only else "", fund.sequence)
            # Every page, each as of the moment the first one pinned.
            request = ledger_pb2.GetBalancesRequest(
                fund_id=fund_id, as_of_sequence=sequence, page=PageRequest(page_size=MAX_PAGE_SIZE)
            )
            balances: dict[str, int] = {}
            while True:
                answer = await stub.GetBalances(request)
                balances |= {b.account: b.balance for b in answer.balances}
                if not answer.next_page_token:
                    break
                request.page.page_token = answer.next_page_token
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return LiveFund(answer.sequence, balances, answer.hash, answer.head_sequence)

    return live


# ---- the command ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, token_default: str) -> None:
    parser.add_argument("--token", default=token_default, help="an auditor's bearer token")
    parser.add_argument(
        "--target",
        default=f"127.0.0.1:{GRPC_PORTS['ledger']}",
        help="the live ledger service's host:port",
    )
    parser.add_argument(
        "--topic", default=TOPIC, help=f"the topic to replay (default: {TOPIC}, or a copy of it)"
    )
    parser.add_argument("--unit", default="", help="compare the funds of this unit and below")
    parser.add_argument(
        "--keep-store", action="store_true", help="keep the replay's database afterwards"
    )


async def command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    if not args.token:
        print("error: --token is required (or set $CIVIC_TOKEN)", file=sys.stderr)
        return 2
    if args.unit and not UNIT_ID.fullmatch(args.unit):
        # Not asked of the service, which would refuse it as out of the token's scope.
        print(f"error: --unit {args.unit!r} is not a unit id (e.g. dn.hc.hc1)", file=sys.stderr)
        return 2
    unit = args.unit or _scope_of(args.token)
    if not unit:
        print("error: --token is not a Civic token (it names no unit)", file=sys.stderr)
        return 2
    settings = settings or Settings()
    async with civic_channel(args.target, args.token, purpose="audit replay") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        try:
            report = await replay(
                settings,
                topic=args.topic,
                live=grpc_balances(stub),
                unit=unit,
                keep_store=args.keep_store,
                live_funds=grpc_funds(stub),
                progress=Progress(),
            )
        except grpc.aio.AioRpcError as error:
            return _cannot(f"the live service refused: {error.code().name}: {error.details()}")
        except CannotReplay as error:
            return _cannot(str(error))
        except KafkaError as error:
            return _cannot(f"the broker at {settings.kafka_bootstrap_servers}: {error}")
        except ConnectionFailure:
            # Not the error's text: it lists the whole topology the driver saw.
            where = env_name("mongo_uri")
            return _cannot(f"the replay's own MongoDB store is out of reach (see {where})")
        except PyMongoError as error:
            return _cannot(f"the replay's own MongoDB store: {error}")
    print(report.text())
    if not report.events:
        print(f"error: {args.topic} holds no events: nothing was checked", file=sys.stderr)
        return 2
    if report.nothing_compared:
        print(
            f"error: no fund of {unit} on the topic or in the live service: nothing was compared",
            file=sys.stderr,
        )
        return 2
    return 0 if report.ok else 1


def _cannot(why: str) -> int:
    print(f"error: {why}", file=sys.stderr)
    return 2


def _scope_of(token: str) -> str:
    """The unit the caller's own token is for (the service checks the token; this only reads
    which funds to compare by default)."""
    try:
        return str(jwt.decode(token, options={"verify_signature": False}).get("scope", ""))
    except jwt.InvalidTokenError:
        return ""

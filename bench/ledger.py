"""Ledger benchmark: postings/s through gRPC with idempotency keys, and the auditors' replay next
to raw consumption of the same topic.

    .venv/bin/python bench/ledger.py [--seconds 15] [--concurrency 8] [--batch 50] [--funds 16]

Starts its own servers (LocalStack in a temporary directory on free ports; an external server
named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS / CIVIC_S3_ENDPOINT is used instead) and, in
this process, the ledger service as in production (gRPC server, outbox relay). It opens --funds
funds, each in its own group with its treasurer, and gives each an opening balance. Then, from a
separate process:

  single   closed loop: --concurrency callers, each PostTransaction one contribution (two
           postings: cash and income/donations) with its own idempotency key.
  batched  closed loop: --concurrency treasurers, each posting pages of --batch contributions of
           its own fund with PostTransactions; every transaction carries its own idempotency key
           (a retry of any of them returns the original). postings/s counts the postings of the
           acknowledged transactions over the whole phase; every 20th page is sent twice, and
           the retry must return exactly the original transactions.
  relay    the time until the outbox has published every transaction's event.
  raw      a plain aiokafka consumer reads civic.ledger.v1 from its beginning to its end.
  replay   the auditors' replay (services/ledger/replay.py) of the same topic: read, check every
           hash chain and posting, write the rebuilt books into a fresh database, compare every
           fund with the live service through gRPC.

raw and replay run twice each, alternately, in the child process; the best of each counts. The
last line of output is one JSON object; "targets_met" is true when the batched path sustains at
least 5,000 postings/s and the replay reaches at least half the raw consumption rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from civic.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from pymongo import AsyncMongoClient

from infra.benchmark import run_on_own_servers, say
from infra.local import Endpoints, isolated_settings
from services.common.auth import Role, mint_token
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.mongo import Document
from services.common.runtime import run_async
from services.ledger.events import TOPIC
from services.ledger.main import LedgerService
from services.ledger.replay import grpc_balances, read_topic, replay

TARGET_POSTINGS = 5000.0
TARGET_REPLAY_RATIO = 0.5
CITY = "bench"
T = TypeVar("T")


@dataclass(frozen=True)
class Treasurer:
    token: str
    fund_id: str


@dataclass(frozen=True)
class Load:
    target: str
    treasurers: list[Treasurer]
    concurrency: int
    seconds: float
    batch: int  # 0: one PostTransaction per call


@dataclass
class LoadResult:
    transactions: int
    postings: int
    calls: int
    seconds: float
    retries_checked: int = 0
    errors: int = 0
    first_error: str = ""

    @property
    def postings_per_second(self) -> float:
        return self.postings / self.seconds if self.seconds else 0.0


def contribution(fund_id: str, amount: int) -> ledger_pb2.PostTransactionRequest:
    return ledger_pb2.PostTransactionRequest(
        request_id=str(uuid.uuid4()),
        fund_id=fund_id,
        memo="bench",
        postings=[
            ledger_pb2.Posting(account="cash", amount=amount),
            ledger_pb2.Posting(account="income/donations", amount=-amount),
        ],
    )


def run_load(load: Load) -> LoadResult:
    return run_async(_load(load))


async def _load(load: Load) -> LoadResult:
    result = LoadResult(0, 0, 0, 0.0)
    channels = {t.fund_id: civic_channel(load.target, t.token) for t in load.treasurers}
    stubs = {f: ledger_pb2_grpc.LedgerServiceStub(c) for f, c in channels.items()}
    deadline = time.monotonic() + load.seconds

    async def caller(index: int) -> None:
        treasurer = load.treasurers[index % len(load.treasurers)]
        stub = stubs[treasurer.fund_id]
        amount = 1000 + index
        while time.monotonic() < deadline:
            try:
                if load.batch:
                    page = ledger_pb2.PostTransactionsRequest(
                        transactions=[
                            contribution(treasurer.fund_id, amount) for _ in range(load.batch)
                        ]
                    )
                    answer = await stub.PostTransactions(page)
                    done = len(answer.transactions)
                    if result.calls % 20 == 0:
                        again = await stub.PostTransactions(page)
                        assert list(again.transactions) == list(answer.transactions)
                        result.retries_checked += done
                else:
                    await stub.PostTransaction(contribution(treasurer.fund_id, amount))
                    done = 1
            except Exception as error:  # counted and shown; the run goes on
                result.errors += 1
                result.first_error = result.first_error or repr(error)[:300]
                continue
            result.calls += 1
            result.transactions += done
            result.postings += 2 * done

    started = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(load.concurrency)))
    result.seconds = time.monotonic() - started
    for channel in channels.values():
        await channel.close()
    return result


@dataclass(frozen=True)
class ReadJob:
    settings_json: str
    target: str
    token: str
    raw: bool


@dataclass
class ReadResult:
    events: int
    seconds: float
    ok: bool = True
    report: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def run_read(job: ReadJob) -> ReadResult:
    return run_async(_read(job))


async def _read(job: ReadJob) -> ReadResult:
    settings = Settings.model_validate_json(job.settings_json)
    started = time.monotonic()
    if job.raw:
        count = 0

        def note(record: Any) -> None:
            nonlocal count
            count += 1

        await read_topic(settings.kafka_bootstrap_servers, TOPIC, note)
        return ReadResult(count, time.monotonic() - started)
    async with civic_channel(job.target, job.token, "audit replay") as channel:
        report = await replay(
            settings, live=grpc_balances(ledger_pb2_grpc.LedgerServiceStub(channel)), unit=CITY
        )
    seconds = time.monotonic() - started
    return ReadResult(report.events, seconds, report.ok, report.text(), report.timings)


def warm_up_child() -> None:
    """Import the child's modules before anything is timed."""


@dataclass(frozen=True)
class Options:
    seconds: float
    single_seconds: float
    concurrency: int
    batch: int
    funds: int


@dataclass
class Figures:
    single: LoadResult | None = None
    batched: LoadResult | None = None
    relay_seconds: float = 0.0
    stored_transactions: int = 0
    raw: ReadResult | None = None
    replay: ReadResult | None = None


async def open_funds(service: LedgerService, settings: Settings, funds: int) -> list[Treasurer]:
    treasurers = []
    target = f"127.0.0.1:{service.port}"
    for i in range(funds):
        unit = f"{CITY}.d.w.g{i}"
        token = mint_token(
            settings.auth_secret, subject=f"treasurer-{i}", role=Role.TREASURER, scope=unit
        )
        async with civic_channel(target, token) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            fund = await stub.OpenFund(
                ledger_pb2.OpenFundRequest(
                    request_id=str(uuid.uuid4()), unit_id=unit, name=f"Quỹ tổ {i}"
                )
            )
            fund_id = fund.fund.fund_id
            await stub.PostTransaction(
                ledger_pb2.PostTransactionRequest(
                    request_id=str(uuid.uuid4()),
                    fund_id=fund_id,
                    postings=[
                        ledger_pb2.Posting(account="cash", amount=10**9),
                        ledger_pb2.Posting(account="equity/opening", amount=-(10**9)),
                    ],
                )
            )
        treasurers.append(Treasurer(token, fund_id))
    return treasurers


async def until_relayed(service: LedgerService, within: float = 300.0) -> float:
    started = time.monotonic()
    outbox = service.store.db["outbox"]
    while await outbox.count_documents({"pending": True}):
        if time.monotonic() - started > within:
            raise RuntimeError(f"the outbox was not relayed within {within:.0f} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def run_benchmark(
    endpoints: Endpoints, options: Options, pool: ProcessPoolExecutor
) -> Figures:
    settings = isolated_settings(endpoints, "bench")
    service = LedgerService(settings)
    figures = Figures()

    async def in_child(function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    async with contextlib.AsyncExitStack() as running:
        running.push_async_callback(drop_databases, settings)
        await service.start()
        running.push_async_callback(service.stop)
        logging.getLogger("faststream.access.kafka").setLevel(logging.WARNING)
        target = f"127.0.0.1:{service.port}"
        treasurers = await open_funds(service, settings, options.funds)
        o = options
        say(f"single: {o.concurrency} callers, one PostTransaction each, {o.single_seconds:g} s")
        figures.single = await in_child(
            run_load, Load(target, treasurers, o.concurrency, o.single_seconds, 0)
        )
        await until_relayed(service)
        say(f"batched: {o.concurrency} treasurers, pages of {o.batch}, {o.seconds:g} s")
        figures.batched = await in_child(
            run_load, Load(target, treasurers, o.concurrency, o.seconds, o.batch)
        )
        figures.relay_seconds = await until_relayed(service)
        figures.stored_transactions = await service.store.transactions.count_documents({})
        auditor = mint_token(settings.auth_secret, subject="auditor", role=Role.AUDITOR, scope=CITY)
        raws, replays = [], []
        for _ in range(2):
            say("raw: aiokafka reads the topic to its end")
            raws.append(
                await in_child(run_read, ReadJob(settings.model_dump_json(), target, auditor, True))
            )
            say("replay: the auditors' replay of the same topic")
            replays.append(
                await in_child(
                    run_read, ReadJob(settings.model_dump_json(), target, auditor, False)
                )
            )
        figures.raw = max(raws, key=lambda r: r.rate)
        figures.replay = max(replays, key=lambda r: r.rate)
        if not all(r.ok for r in replays):
            say("the replay found differences:\n" + next(r.report for r in replays if not r.ok))
    return figures


async def drop_databases(settings: Settings) -> None:
    client: AsyncMongoClient[Document] = AsyncMongoClient(settings.mongo_uri)
    try:
        await client.drop_database(settings.database_for("ledger"))
    finally:
        await client.close()


def summary(options: Options, figures: Figures) -> dict[str, Any]:
    single, batched, raw, replayed = figures.single, figures.batched, figures.raw, figures.replay
    assert single and batched and raw and replayed
    ratio = replayed.rate / raw.rate if raw.rate else 0.0
    # Every acknowledged transaction is stored once, beside each fund's opening balance.
    expected = single.transactions + batched.transactions + options.funds
    return {
        "bench": "ledger",
        "postings_per_s": round(batched.postings_per_second),
        "postings_per_s_single_calls": round(single.postings_per_second),
        "transactions_per_batch": options.batch,
        "concurrency": options.concurrency,
        "funds": options.funds,
        "transactions_posted": batched.transactions + single.transactions,
        "retried_transactions_checked": batched.retries_checked,
        "errors": batched.errors + single.errors,
        "first_error": batched.first_error or single.first_error,
        "stored_as_acknowledged": figures.stored_transactions == expected,
        "relay_drain_s": round(figures.relay_seconds, 1),
        "topic_events": raw.events,
        "raw_consume_events_per_s": round(raw.rate),
        "replay_events_per_s": round(replayed.rate),
        "replay_to_raw": round(ratio, 2),
        "replay_ok": replayed.ok,
        "replay_seconds": round(replayed.seconds, 2),
        "raw_seconds": round(raw.seconds, 2),
        "replay_phases_s": {k: round(v, 2) for k, v in replayed.timings.items()},
        "targets": {"postings_per_s": TARGET_POSTINGS, "replay_to_raw": TARGET_REPLAY_RATIO},
        "targets_met": batched.postings_per_second >= TARGET_POSTINGS
        and ratio >= TARGET_REPLAY_RATIO
        and replayed.ok
        and batched.errors == 0,
    }


def print_report(f: dict[str, Any]) -> None:
    rows = [
        ("postings/s, PostTransactions pages", f"{f['postings_per_s']:,}", "≥ 5,000"),
        ("postings/s, one PostTransaction per call", f"{f['postings_per_s_single_calls']:,}", ""),
        (
            "transactions posted / errors",
            f"{f['transactions_posted']:,} / {f['errors']}",
            "0 errors",
        ),
        ("outbox relayed the rest within", f"{f['relay_drain_s']} s", ""),
        ("raw aiokafka consumption, events/s", f"{f['raw_consume_events_per_s']:,}", ""),
        ("auditors' replay, events/s", f"{f['replay_events_per_s']:,}", ""),
        ("replay / raw", f"{f['replay_to_raw']}", "≥ 0.5"),
        ("replay matches live books", str(f["replay_ok"]), "True"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'measured':>16}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>16}  {target}")
    print(f"topic events: {f['topic_events']:,}")
    print(json.dumps(f, ensure_ascii=False))


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="of the batched load")
    parser.add_argument("--single-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=50, help="transactions per page")
    parser.add_argument("--funds", type=int, default=16)
    return Options(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)

    async def measure(endpoints: Endpoints, pool: ProcessPoolExecutor, _: Path) -> Figures:
        return await run_benchmark(endpoints, options, pool)

    print_report(summary(options, run_on_own_servers(measure, warm_up_child)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""City benchmark: a synthetic city loaded through the services' bulk APIs, then a mixed load of
lookups, tickets, notices and payments for a fixed time.

    .venv/bin/python bench/city.py [--residents 1200000] [--seconds 60] [--streams 4]
        [--lookup-rate 50] [--ticket-rate 10] [--notice-rate 0.2] [--payment-rate 10]

Starts its own servers (LocalStack in a temporary directory on free ports; an external server
named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS / CIVIC_S3_ENDPOINT is used instead) and all
five services, each as its own process on a free port, as `make run` starts them. The city
(services/synthetic_city.py: 50 wards, 1,000 groups, about 350,000 households by default) is
made in a separate process before any clock starts: each ward's rows as ImportPersons messages,
ready to send. Then:

  units     the city > district > ward > group tree through the registry's CreateUnit.
  load      each ward's file through its own ImportPersons client stream, --streams of them at a
            time. Two times: until every stream has returned (the registry has the city), and
            until the registry's outbox has published every event and every consumer of
            civic.registry.v1 (tickets, notices, GIS, the household history) has committed all of
            them (every service has the city; GIS has each household's point).
  mixed     from a separate process, open loop (sent on schedule, whatever the answers), all at
            once for --seconds: GetHousehold by ward officers, SubmitTicket by residents about
            their own household, PublishNotice to a whole ward by its officer, RecordContribution
            of a household to its group's fund by the treasurer. Latency is from each call's
            scheduled time to its answer; a ward notice's delivery to the ward's households
            goes on after the answer, in the notices service's worker.

Then each service process's peak memory (VmHWM) and the disk used by MongoDB's and the broker's
data directories. The last line of output is one JSON object with the figures; "targets_met" is
true when the full city (1,200,000 residents or more) was loaded everywhere in under 3 minutes,
and every operation of the mixed load answered without errors with p99 under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import grpc
from civic.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from civic.tickets.v1 import tickets_pb2
from pymongo import AsyncMongoClient

from infra.benchmark import disk_used, ms, open_loop, percentile, run_on_own_servers, say
from infra.local import Endpoints, free_port, isolated_settings
from services.common.auth import Role, mint_token
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.grpc_server import PURPOSE_HEADER
from services.common.mongo import Document
from services.common.runtime import run_async
from services.demo_day import consumers_caught_up
from services.platform import SERVICES, create_units, service_env, start_services, wait_healthy
from services.registry import csv_rows
from services.registry.events import TOPIC as REGISTRY_TOPIC
from services.synthetic_city import DEFAULT_GROUPS, DEFAULT_RESIDENTS, SyntheticCity, Unit
from services.tickets.domain import DEFAULT_RULES

TARGET_LOAD_S = 180.0
TARGET_P99_MS = 100.0
CHUNK_ROWS = 500  # rows per ImportPersons message, as `civic import-csv` sends them
IMPORT = "/civic.registry.v1.RegistryService/ImportPersons"
# The consumer groups that read civic.registry.v1, by service and purpose.
REGISTRY_READERS = [
    ("registry", "household-history"),
    ("tickets", "registry-view"),
    ("notices", "registry-view"),
    ("gis", "registry-view"),
]
OPERATIONS = {
    "lookup": "/civic.registry.v1.RegistryService/GetHousehold",
    "ticket": "/civic.tickets.v1.TicketsService/SubmitTicket",
    "notice": "/civic.notices.v1.NoticesService/PublishNotice",
    "payment": "/civic.ledger.v1.LedgerService/RecordContribution",
}
LENGTH = struct.Struct(">I")
STALL_S = 60.0
UNIT_STREAMS = 8  # CreateUnit calls at a time
T = TypeVar("T")


# ---- the city, made ready to send (in the child process, before any clock) ---------------------


@dataclass(frozen=True)
class WardFile:
    ward_id: str
    path: str
    rows: int


def prepare_city(
    residents: int, groups: int, seed: int, directory: str
) -> tuple[list[WardFile], float]:
    """Each ward's rows as serialized ImportPersons messages in a file of its own (each message
    after its length), so the load sends bytes and spends no time making rows."""
    started = time.perf_counter()
    city = SyntheticCity(residents, groups=groups, seed=seed)
    files = []
    for number, ward in enumerate(city.wards):
        path = Path(directory) / f"ward-{number:02d}.bin"
        rows = 0
        with path.open("wb") as out:
            chunk: list[registry_pb2.ImportRow] = []
            # Line numbers as in the ward's import file: the header is line 1.
            for line, record in enumerate(city.ward_records(ward.unit_id), start=2):
                chunk.append(csv_rows.import_row(line, record))
                rows += 1
                if len(chunk) == CHUNK_ROWS:
                    write_message(out, registry_pb2.ImportPersonsRequest(rows=chunk))
                    chunk = []
            if chunk:
                write_message(out, registry_pb2.ImportPersonsRequest(rows=chunk))
        files.append(WardFile(ward.unit_id, str(path), rows))
    return files, time.perf_counter() - started


def write_message(out: Any, message: registry_pb2.ImportPersonsRequest) -> None:
    data = message.SerializeToString()
    out.write(LENGTH.pack(len(data)) + data)


async def each(messages: list[bytes]) -> AsyncIterator[bytes]:
    for message in messages:
        yield message


def read_messages(path: str) -> list[bytes]:
    data = Path(path).read_bytes()
    messages, at = [], 0
    while at < len(data):
        (size,) = LENGTH.unpack_from(data, at)
        messages.append(data[at + LENGTH.size : at + LENGTH.size + size])
        at += LENGTH.size + size
    return messages


# ---- the load: one ImportPersons stream per ward, --streams at a time (child process) ----------


@dataclass
class LoadResult:
    seconds: float = 0.0
    rows: int = 0
    households_created: int = 0
    persons_created: int = 0
    persons_unchanged: int = 0
    row_errors: int = 0
    row_error_samples: list[str] = field(default_factory=list)
    stream_errors: list[str] = field(default_factory=list)


def run_import(target: str, token: str, files: list[WardFile], streams: int) -> LoadResult:
    return run_async(_run_import(target, token, files, streams))


async def _run_import(target: str, token: str, files: list[WardFile], streams: int) -> LoadResult:
    result = LoadResult()
    waiting = list(reversed(files))
    async with civic_channel(target, token, "bulk import") as channel:
        # Bytes in (the messages are serialized already), the report out.
        call: grpc.aio.StreamUnaryMultiCallable[bytes, registry_pb2.ImportPersonsResponse]
        call = channel.stream_unary(
            IMPORT, response_deserializer=registry_pb2.ImportPersonsResponse.FromString
        )

        async def stream() -> None:
            while waiting:
                ward = waiting.pop()
                try:
                    report: registry_pb2.ImportPersonsResponse = await call(
                        each(read_messages(ward.path))
                    )
                except grpc.aio.AioRpcError as error:
                    why = f"{ward.ward_id}: {error.code().name} {error.details()}"
                    result.stream_errors.append(why)
                    continue
                result.rows += report.rows
                result.households_created += report.households_created
                result.persons_created += report.persons_created
                result.persons_unchanged += report.persons_unchanged
                result.row_errors += report.rows - report.persons_created - report.persons_unchanged
                result.row_error_samples += [
                    f"{ward.ward_id} row {e.row_number} {e.field}: {e.message}"
                    for e in report.errors[: 5 - min(5, len(result.row_error_samples))]
                ]

        started = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(streams)))
        result.seconds = time.perf_counter() - started
    return result


# ---- the mixed load (child process) --------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request, serialized, with the token of who makes it."""

    request: bytes
    token: str


@dataclass(frozen=True)
class Operation:
    name: str
    target: str
    rate: float
    calls: list[Call]


@dataclass
class OperationResult:
    name: str
    rate: float
    sent: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    late_sends: int = 0
    errors: int = 0
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


def run_mixed(operations: list[Operation], seconds: float) -> list[OperationResult]:
    return run_async(_run_mixed(operations, seconds))


async def _run_mixed(operations: list[Operation], seconds: float) -> list[OperationResult]:
    # Each call carries its caller's token, so one channel per service serves every caller.
    channels = {op.target: grpc.aio.insecure_channel(op.target) for op in operations}
    for channel in channels.values():
        await asyncio.wait_for(channel.channel_ready(), 30)
    results = [OperationResult(op.name, op.rate) for op in operations]

    async def run(op: Operation, result: OperationResult) -> None:
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channels[op.target].unary_unary(
            OPERATIONS[op.name]
        )

        async def send(index: int, scheduled: float) -> None:
            call = op.calls[index]
            metadata = (("authorization", f"Bearer {call.token}"), (PURPOSE_HEADER, PURPOSE))
            try:
                await method(call.request, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                result.errors += 1
                result.first_error = result.first_error or f"{error.code().name}: {error.details()}"
                return
            result.latencies_ms.append((time.perf_counter() - scheduled) * 1000)

        if op.rate > 0:
            result.sent, result.seconds, result.late_sends = await open_loop(op.rate, seconds, send)

    await asyncio.gather(*(run(op, result) for op, result in zip(operations, results, strict=True)))
    for channel in channels.values():
        await channel.close()
    return results


PURPOSE = quote("đo tải (load test)")


def warm_up_child() -> None:
    """Import the child's modules before anything is timed."""


# ---- the services as processes ---------------------------------------------------------------


class Services:
    """Every service as its own process, on free ports, in one deployment of the run."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        targets = {
            "CIVIC_REGISTRY_TARGET": f"127.0.0.1:{self.ports['registry']}",
            "CIVIC_GIS_TARGET": f"127.0.0.1:{self.ports['gis']}",
        }
        envs = {
            name: service_env(settings, settings.database_prefix, port, **targets)
            for name, port in self.ports.items()
        }
        self.logs = logs
        self.processes = dict(zip(SERVICES, start_services(envs, logs, logs / "pids"), strict=True))

    async def wait_healthy(self) -> None:
        for name, process in self.processes.items():
            await wait_healthy(name, self.ports[name], process, self.logs, seconds=60)

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def peak_memory_mb(self) -> dict[str, float]:
        """Each process's high-water mark of resident memory (VmHWM), in MB."""
        peaks = {}
        for name, process in self.processes.items():
            status = Path(f"/proc/{process.pid}/status").read_text()
            kb = next(int(line.split()[1]) for line in status.splitlines() if "VmHWM" in line)
            peaks[name] = round(kb / 1024, 1)
        return peaks

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait(timeout=30)


# ---- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    residents: int
    groups: int
    seed: int
    streams: int
    seconds: float
    lookup_rate: float
    ticket_rate: float
    notice_rate: float
    payment_rate: float
    funds: int
    catch_up_limit: float
    sample: int


@dataclass
class Figures:
    households: int = 0
    wards: int = 0
    load_average: float = 0.0
    prepare_s: float = 0.0
    units: int = 0
    units_s: float = 0.0
    load: LoadResult | None = None
    relayed_s: float = 0.0  # load start -> the registry's outbox empty
    # Load start -> every registry consumer at the topic's end (None: not within the limit).
    caught_up_s: float | None = None
    consumer_s: dict[str, float | None] = field(default_factory=dict)  # the same, each one
    mixed: list[OperationResult] = field(default_factory=list)
    mixed_load_average: float = 0.0
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    disk_bytes: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Household:
    household_id: str
    group_id: str

    @property
    def ward_id(self) -> str:
        return self.group_id.rsplit(".", 1)[0]


class Bench:
    def __init__(
        self,
        options: Options,
        settings: Settings,
        services: Services,
        pool: ProcessPoolExecutor,
        workdir: Path,
    ) -> None:
        self.options = options
        self.settings = settings
        self.services = services
        self.pool = pool
        self.workdir = workdir
        self.city = SyntheticCity(options.residents, groups=options.groups, seed=options.seed)
        self.figures = Figures(households=self.city.households, wards=len(self.city.wards))
        self.secret = settings.auth_secret
        self.admin = self.token("bench-admin", Role.CITY_ADMIN, self.city.city.unit_id)
        self.rng = random.Random(options.seed)

    def token(self, subject: str, role: Role, scope: str, household_id: str = "") -> str:
        return mint_token(
            self.secret, subject=subject, role=role, scope=scope, household_id=household_id
        )

    async def in_child(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def create_units(self) -> None:
        """The city, its districts and wards one after the other, then the groups, whose
        parents are all there by then, UNIT_STREAMS at a time."""
        city = self.city
        above = [city.city, *city.districts, *city.wards]
        groups = [group.unit for group in city.groups]
        started = time.perf_counter()
        async with civic_channel(self.services.target("registry"), self.admin) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)

            async def create(units: list[Unit]) -> None:
                await create_units(registry, ((u.parent_id, u.code, u.name, u.kind) for u in units))

            await create(above)
            await asyncio.gather(*(create(groups[i::UNIT_STREAMS]) for i in range(UNIT_STREAMS)))
        self.figures.units = len(above) + len(groups)
        self.figures.units_s = time.perf_counter() - started

    async def load(self, files: list[WardFile]) -> None:
        started = time.perf_counter()
        load = await self.in_child(
            run_import, self.services.target("registry"), self.admin, files, self.options.streams
        )
        self.figures.load = load
        say(f"ImportPersons returned after {load.seconds:.1f} s; waiting for the consumers")
        await self.until_relayed()
        self.figures.relayed_s = time.perf_counter() - started

        async def caught_up(service: str, purpose: str) -> None:
            group = self.settings.consumer_group(service, purpose)
            left = self.options.catch_up_limit - (time.perf_counter() - started)
            try:
                await asyncio.wait_for(
                    consumers_caught_up(self.settings, REGISTRY_TOPIC, [group]), max(left, 1)
                )
            except TimeoutError:
                say(f"{service} {purpose}: not caught up; the mixed load starts beside it")
                self.figures.consumer_s[f"{service} {purpose}"] = None
                return
            self.figures.consumer_s[f"{service} {purpose}"] = time.perf_counter() - started

        await asyncio.gather(*(caught_up(*reader) for reader in REGISTRY_READERS))
        if None not in self.figures.consumer_s.values():
            self.figures.caught_up_s = time.perf_counter() - started

    async def until_relayed(self) -> None:
        """Until the registry's outbox has published every event; an error when it makes no
        progress for a minute."""
        client: AsyncMongoClient[Document] = AsyncMongoClient(self.settings.mongo_uri)
        try:
            outbox = client[self.settings.database_for("registry")]["outbox"]
            pending = await outbox.count_documents({"pending": True})
            progress = time.monotonic()
            while pending:
                if time.monotonic() - progress > STALL_S:
                    raise SystemExit(f"the registry's relay stopped with {pending} batches left")
                await asyncio.sleep(0.2)
                left = await outbox.count_documents({"pending": True})
                progress = time.monotonic() if left < pending else progress
                pending = left
        finally:
            await client.close()

    async def sample_households(self) -> list[Household]:
        client: AsyncMongoClient[Document] = AsyncMongoClient(self.settings.mongo_uri)
        try:
            households = client[self.settings.database_for("registry")]["households"]
            pipeline = [{"$sample": {"size": self.options.sample}}, {"$project": {"unit_id": 1}}]
            found = await (await households.aggregate(pipeline)).to_list()
        finally:
            await client.close()
        return [Household(doc["_id"], doc["unit_id"]) for doc in found]

    async def open_funds(self, payers: list[Household]) -> dict[str, tuple[str, str]]:
        """A fund in each payer's group (at most --funds groups): group -> (fund, treasurer's
        token). Each fund takes one contribution first, so the ledger has learnt the group's
        households from the registry before the clock starts."""
        funds: dict[str, tuple[str, str]] = {}
        # Each call carries its treasurer's token.
        async with grpc.aio.insecure_channel(self.services.target("ledger")) as channel:
            ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
            for payer in payers:
                group = payer.group_id
                if group in funds or len(funds) >= self.options.funds:
                    continue
                token = self.token(f"treasurer-{group}", Role.TREASURER, group)
                auth = (("authorization", f"Bearer {token}"),)
                opened = await ledger.OpenFund(
                    ledger_pb2.OpenFundRequest(
                        request_id=str(uuid.uuid4()), unit_id=group, name="Quỹ vì người nghèo"
                    ),
                    metadata=auth,
                )
                fund_id = opened.fund.fund_id
                await ledger.RecordContribution(
                    self.contribution(fund_id, payer.household_id), metadata=auth
                )
                funds[group] = (fund_id, token)
        return funds

    def contribution(self, fund_id: str, household_id: str) -> ledger_pb2.RecordContributionRequest:
        return ledger_pb2.RecordContributionRequest(
            request_id=str(uuid.uuid4()),
            fund_id=fund_id,
            household_id=household_id,
            amount=self.rng.choice((50_000, 100_000, 200_000, 500_000)),
            method=ledger_pb2.PAYMENT_METHOD_CASH,
            receipt_number=f"PT-{uuid.uuid4().hex[:12]}",
            paid_on=date.today().isoformat(),
            memo="Ủng hộ quỹ vì người nghèo",
        )

    async def operations(self) -> list[Operation]:
        """Every call of the mixed load, made before the clock starts."""
        o, rng = self.options, self.rng
        households = await self.sample_households()
        funds = await self.open_funds(households)
        payers = [h for h in households if h.group_id in funds]

        def officer(ward: str) -> str:
            return self.token(f"officer-{ward}", Role.WARD_OFFICER, ward)

        officers = {ward.unit_id: officer(ward.unit_id) for ward in self.city.wards}
        residents = {
            h.household_id: self.token(
                f"resident-{h.household_id}", Role.RESIDENT, h.group_id, h.household_id
            )
            for h in households
        }
        categories = [rule.category for rule in DEFAULT_RULES]

        def count(rate: float) -> int:
            return int(rate * o.seconds) + 1

        def lookup() -> Call:
            h = rng.choice(households)
            request = registry_pb2.GetHouseholdRequest(household_id=h.household_id)
            return Call(request.SerializeToString(), officers[h.ward_id])

        def ticket() -> Call:
            h = rng.choice(households)
            request = tickets_pb2.SubmitTicketRequest(
                request_id=str(uuid.uuid4()),
                category=rng.choice(categories),
                description=f"Phản ánh số {rng.randrange(10**6)}: cần kiểm tra và xử lý",
            )
            return Call(request.SerializeToString(), residents[h.household_id])

        def notice() -> Call:
            ward = rng.choice(self.city.wards).unit_id
            request = notices_pb2.PublishNoticeRequest(
                request_id=str(uuid.uuid4()),
                title="Thông báo họp tổ dân phố",
                body="Mời đại diện các hộ gia đình dự họp lúc 19 giờ tại nhà văn hóa.",
                priority=notices_pb2.PRIORITY_NORMAL,
                unit_id=ward,
            )
            return Call(request.SerializeToString(), officers[ward])

        def payment() -> Call:
            h = rng.choice(payers)
            fund_id, token = funds[h.group_id]
            return Call(self.contribution(fund_id, h.household_id).SerializeToString(), token)

        makers = {"lookup": lookup, "ticket": ticket, "notice": notice, "payment": payment}
        rates = {
            "lookup": (o.lookup_rate, "registry"),
            "ticket": (o.ticket_rate, "tickets"),
            "notice": (o.notice_rate, "notices"),
            "payment": (o.payment_rate, "ledger"),
        }
        return [
            Operation(
                name,
                self.services.target(service),
                rate,
                [makers[name]() for _ in range(count(rate))],
            )
            for name, (rate, service) in rates.items()
        ]

    async def mixed(self) -> None:
        operations = await self.operations()
        self.figures.mixed_load_average = os.getloadavg()[0]
        self.figures.mixed = await self.in_child(run_mixed, operations, self.options.seconds)


async def run_benchmark(
    endpoints: Endpoints, options: Options, pool: ProcessPoolExecutor, workdir: Path
) -> Figures:
    settings = isolated_settings(endpoints, "city")
    load_average = os.getloadavg()[0]
    ready = workdir / "city"
    ready.mkdir()
    say(f"making a city of {options.residents:,} residents, ready to send")
    future = asyncio.get_running_loop().run_in_executor(
        pool, prepare_city, options.residents, options.groups, options.seed, str(ready)
    )
    files, prepare_s = await future
    say(f"made in {prepare_s:.1f} s; starting the services")
    services = Services(settings, workdir / "logs")
    try:
        await services.wait_healthy()
        bench = Bench(options, settings, services, pool, workdir)
        bench.figures.load_average, bench.figures.prepare_s = load_average, prepare_s
        say(f"creating {sum(1 for _ in bench.city.units()):,} units")
        await bench.create_units()
        say(f"loading {sum(f.rows for f in files):,} persons, {options.streams} wards at a time")
        await bench.load(files)
        say(f"mixed load for {options.seconds:g} s")
        await bench.mixed()
        bench.figures.peak_memory_mb = services.peak_memory_mb()
        bench.figures.disk_bytes = {
            server: disk_used(workdir, server) for server in ("mongo", "kafka")
        }
        return bench.figures
    finally:
        services.stop()


# ---- report ------------------------------------------------------------------------------------


def summary(options: Options, figures: Figures) -> dict[str, Any]:
    load = figures.load
    assert load is not None
    operations: dict[str, Any] = {}
    for result in figures.mixed:
        operations[result.name] = {
            "rate_per_s": result.rate,
            "sent": result.sent,
            "answered": len(result.latencies_ms),
            "throughput_per_s": round(result.throughput, 1),
            "p50_ms": ms(percentile(result.latencies_ms, 0.5)),
            "p99_ms": ms(percentile(result.latencies_ms, 0.99)),
            "max_ms": ms(max(result.latencies_ms, default=0.0)),
            "errors": result.errors,
            "late_sends": result.late_sends,
        }
    measured = [op for op in operations.values() if op["sent"]]
    p99_ok = all(
        op["errors"] == 0 and op["p99_ms"] is not None and op["p99_ms"] < TARGET_P99_MS
        for op in measured
    )
    full = options.residents >= DEFAULT_RESIDENTS
    loaded_ok = full and load.row_errors == 0 and not load.stream_errors
    caught_up = figures.caught_up_s
    loaded_ok = loaded_ok and caught_up is not None and caught_up < TARGET_LOAD_S
    mb = {k: round(v / 2**20, 1) if v is not None else None for k, v in figures.disk_bytes.items()}
    return {
        "residents": options.residents,
        "households": figures.households,
        "wards": figures.wards,
        "groups": options.groups,
        "cpus": os.cpu_count(),
        "load_average_1m": round(figures.load_average, 2),
        "prepare_s": round(figures.prepare_s, 1),
        "units": figures.units,
        "units_s": round(figures.units_s, 1),
        "streams": options.streams,
        "import_s": round(load.seconds, 1),
        "import_persons_per_s": round(load.persons_created / load.seconds) if load.seconds else 0,
        "persons_created": load.persons_created,
        "households_created": load.households_created,
        "import_row_errors": load.row_errors,
        "import_stream_errors": len(load.stream_errors),
        "relayed_s": round(figures.relayed_s, 1),
        "caught_up_s": ms(figures.caught_up_s or math.inf),
        "consumer_caught_up_s": {k: ms(v or math.inf) for k, v in figures.consumer_s.items()},
        "catch_up_limit_s": options.catch_up_limit,
        "mixed_seconds": options.seconds,
        "mixed_load_average_1m": round(figures.mixed_load_average, 2),
        "operations": operations,
        "peak_memory_mb": figures.peak_memory_mb,
        "disk_mb": mb,
        "targets": {
            "residents": DEFAULT_RESIDENTS,
            "loaded_everywhere_s": TARGET_LOAD_S,
            "p99_ms": TARGET_P99_MS,
        },
        "targets_met": loaded_ok and p99_ok and len(measured) == len(OPERATIONS),
    }


def print_report(f: dict[str, Any], figures: Figures) -> None:
    load = figures.load
    assert load is not None
    print(
        f"\nCity benchmark: {f['residents']:,} residents in {f['households']:,} households, "
        f"{f['wards']} wards, {f['groups']:,} groups; {f['cpus']} CPUs, load average "
        f"{f['load_average_1m']:.1f} at the start\n"
    )
    print(f"{'loading the city':<58}{'seconds':>9}")
    rows = [
        ("rows made ready to send (before the clock)", f["prepare_s"]),
        (f"unit tree: {f['units']:,} CreateUnit calls", f["units_s"]),
        (
            f"ImportPersons, {f['streams']} ward streams at a time: "
            f"{f['import_persons_per_s']:,} persons/s",
            f["import_s"],
        ),
        ("  ... the registry's outbox has published every event", f["relayed_s"]),
        ("  ... every consumer of civic.registry.v1 has caught up", f["caught_up_s"]),
        *((f"      {reader}", s) for reader, s in f["consumer_caught_up_s"].items()),
    ]
    for label, seconds in rows:
        print(f"  {label:<56}" + (f"{seconds:>9.1f}" if seconds is not None else "      n/a"))
    if f["caught_up_s"] is None:
        print(f"  (n/a: not caught up within {f['catch_up_limit_s']:g} s of the load's start)")
    print(
        f"  {f['persons_created']:,} persons and {f['households_created']:,} households created, "
        f"{f['import_row_errors']} row errors"
    )
    for line in [*load.stream_errors, *load.row_error_samples][:5]:
        print(f"  error: {line}")
    print(
        f"\n{'mixed load, open loop, ' + format(f['mixed_seconds'], 'g') + ' s':<26}"
        f"{'rate/s':>8}{'sent':>8}{'done/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'errors':>8}"
    )

    def cell(value: float | None) -> str:
        return f"{value:>9.1f}" if value is not None else f"{'-':>9}"

    for name, op in f["operations"].items():
        print(
            f"  {name + ' (' + OPERATIONS[name].rsplit('/', 1)[1] + ')':<24}{op['rate_per_s']:>8g}"
            f"{op['sent']:>8,}{op['throughput_per_s']:>9.1f}{cell(op['p50_ms'])}"
            f"{cell(op['p99_ms'])}{cell(op['max_ms'])}{op['errors']:>8}"
        )
    for result in figures.mixed:
        if result.first_error:
            print(f"  {result.name}: first error {result.first_error}")
    print(f"  (load average {f['mixed_load_average_1m']:.1f} as it started)")
    print(f"\n{'peak memory (VmHWM)':<26}" + "".join(f"{n:>10}" for n in f["peak_memory_mb"]))
    print(f"{'  MB':<26}" + "".join(f"{v:>10.0f}" for v in f["peak_memory_mb"].values()))
    disk = ", ".join(
        f"{server} {value:,.0f} MB" if value is not None else f"{server} external"
        for server, value in f["disk_mb"].items()
    )
    print(f"disk used: {disk}")
    met = "met" if f["targets_met"] else "NOT met"
    print(
        f"\ntargets: the full city ({DEFAULT_RESIDENTS:,} residents) loaded everywhere in < "
        f"{TARGET_LOAD_S:g} s, every p99 < {TARGET_P99_MS:g} ms without errors: {met}"
    )
    print(json.dumps(f))


# ---- main --------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--residents", type=int, default=DEFAULT_RESIDENTS)
    parser.add_argument("--groups", type=int, default=DEFAULT_GROUPS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--streams", type=int, default=4, help="ImportPersons streams at a time")
    parser.add_argument("--seconds", type=float, default=60.0, help="of the mixed load")
    parser.add_argument("--lookup-rate", type=float, default=50.0, help="GetHousehold/s")
    parser.add_argument("--ticket-rate", type=float, default=10.0, help="SubmitTicket/s")
    parser.add_argument("--notice-rate", type=float, default=0.2, help="ward PublishNotice/s")
    parser.add_argument("--payment-rate", type=float, default=10.0, help="RecordContribution/s")
    parser.add_argument("--funds", type=int, default=50, help="groups with a fund to pay into")
    parser.add_argument(
        "--catch-up-limit",
        type=float,
        default=900.0,
        help="seconds from the load's start to wait for the consumers; the mixed load follows",
    )
    parser.add_argument("--sample", type=int, default=2_000, help="households the load uses")
    return Options(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)

    async def measure(endpoints: Endpoints, pool: ProcessPoolExecutor, workdir: Path) -> Figures:
        return await run_benchmark(endpoints, options, pool, workdir)

    figures = run_on_own_servers(measure, warm_up_child)
    print_report(summary(options, figures), figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())

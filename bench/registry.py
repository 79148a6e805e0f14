"""Registry benchmark: bulk import and household lookups, each next to the floor under it.

    .venv/bin/python bench/registry.py [--persons 100000] [--households 30000] [--seconds 5]

Starts its own servers (LocalStack in a temporary directory on free ports; an external server
named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS is used instead) and the registry service
in this process, builds a city > district > ward > groups tree, then measures:

  import   persons/s through the ImportPersons client stream, for a synthetic CSV file read by
           the same code as `civic import-csv`; next to raw pymongo insert_many of documents
           shaped like the registry's person documents, on the same MongoDB.
  lookup   GetHousehold requests/s and latency with a fixed number of concurrent callers; next to
           a bare grpc.aio echo service in this same process, called the same way.

The callers (and the raw inserts) run in a separate process, so the service's event loop, which
also runs its outbox relay and history consumer as in production, is measured without the
client's work on it. Everything they send is built before the clock starts. Two diagnostics
come with the figures: the service process's CPU while it has nothing to do (a Kafka consumer
that spins shows here), and the events still waiting for the relay and for the history
projection when the import returns. The last line of output is one JSON
object with the figures; "targets_met" is true when import >= 20,000 persons/s and lookups reach
at least half the echo rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from bson import ObjectId
from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.write_concern import WriteConcern

from infra.benchmark import run_on_own_servers, say
from infra.local import Endpoints, isolated_settings
from services.common.auth import Role, mint_token
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.mongo import Document
from services.common.runtime import run_async
from services.registry import csv_rows, domain
from services.registry.importer import BATCH_ROWS
from services.registry.main import RegistryService
from services.synthetic_city import synthetic_records, write_csv

IMPORT_TARGET = 20_000  # persons/s
LOOKUP_TARGET = 0.5  # of the echo rate
CHUNK_ROWS = 500  # rows per ImportPersons message, as `civic import-csv` sends them
ECHO_METHOD = "/civic.bench.Echo/Echo"
GET_HOUSEHOLD = "/civic.registry.v1.RegistryService/GetHousehold"
QUIET_TIMEOUT_S = 60.0

T = TypeVar("T")


# ---- the file to import ---------------------------------------------------------------------


def chunks(path: Path) -> list[registry_pb2.ImportPersonsRequest]:
    """The file's rows as `civic import-csv` streams them."""
    rows = list(csv_rows.rows_from_csv(path))
    return [
        registry_pb2.ImportPersonsRequest(rows=rows[start : start + CHUNK_ROWS])
        for start in range(0, len(rows), CHUNK_ROWS)
    ]


# ---- the callers (run in a child process) ----------------------------------------------------


@dataclass(frozen=True)
class Load:
    target: str
    token: str
    method: str
    requests: list[bytes]
    concurrency: int
    channels: int
    seconds: float
    warmup_seconds: float = 1.0


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def run_load(load: Load) -> LoadResult:
    return run_async(_run_load(load))


async def _run_load(load: Load) -> LoadResult:
    """`concurrency` callers, each sending one request after the other, round robin over the
    channels; only calls that start and end inside the measured window count."""
    channels = [civic_channel(load.target, load.token, "benchmark") for _ in range(load.channels)]
    # No serializers: requests and responses stay bytes, so the client's work is the same for
    # every service measured.
    calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
        channel.unary_unary(load.method) for channel in channels
    ]
    result = LoadResult(requests=0, seconds=load.seconds, latencies_ms=[])
    begin = time.perf_counter() + load.warmup_seconds
    end = begin + load.seconds

    async def caller(index: int) -> None:
        call, position = calls[index % len(calls)], index
        while (started := time.perf_counter()) < end:
            request = load.requests[position % len(load.requests)]
            position += load.concurrency
            try:
                await call(request)
            except grpc.aio.AioRpcError as error:
                result.errors += 1
                result.first_error = result.first_error or f"{error.code().name}: {error.details()}"
                continue
            finished = time.perf_counter()
            if started >= begin and finished <= end:
                result.requests += 1
                result.latencies_ms.append((finished - started) * 1000)

    await asyncio.gather(*(caller(index) for index in range(load.concurrency)))
    for channel in channels:
        await channel.close()
    return result


@dataclass
class ImportResult:
    seconds: float
    rows: int
    households_created: int
    persons_created: int
    persons_unchanged: int
    errors: list[str] = field(default_factory=list)


def run_import(target: str, token: str, path: str) -> ImportResult:
    return run_async(_run_import(target, token, Path(path)))


async def _run_import(target: str, token: str, path: Path) -> ImportResult:
    messages = chunks(path)  # before the clock starts
    async with civic_channel(target, token) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        started = time.perf_counter()
        response = await stub.ImportPersons(iter(messages))
        seconds = time.perf_counter() - started
    return ImportResult(
        seconds=seconds,
        rows=response.rows,
        households_created=response.households_created,
        persons_created=response.persons_created,
        persons_unchanged=response.persons_unchanged,
        errors=[f"row {e.row_number} {e.field}: {e.message}" for e in response.errors[:5]],
    )


def warm_up_child() -> None:
    """Import the child's modules before anything is timed."""


# ---- the bare gRPC service to compare with ---------------------------------------------------


async def start_echo_server() -> tuple[grpc.aio.Server, int]:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    server = grpc.aio.server()
    service, method = ECHO_METHOD.strip("/").split("/")
    # No serializers: bytes in, bytes out.
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {method: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


# ---- the benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    persons: int
    households: int
    groups: int
    lookup_households: int
    concurrency: int
    channels: int
    seconds: float


@dataclass
class Figures:
    import_result: ImportResult | None = None
    raw_seconds: float = 0.0
    raw_docs: int = 0
    lookup: LoadResult | None = None
    echo: LoadResult | None = None
    load_average: float = 0.0  # of the machine, 1 minute, when the run starts
    idle_cpu_percent: float = 0.0
    relay_backlog: int = 0  # events committed but not yet published when the import returned
    history_backlog: int = 0  # events published but not yet projected into household history


def bench_settings(endpoints: Endpoints) -> Settings:
    return isolated_settings(endpoints, "bench")


async def create_city(target: str, secret: str, groups: int) -> tuple[str, list[str]]:
    """dn > dn.hc > dn.hc.hc1 > g1..gN: the ward and its groups."""
    admin = mint_token(secret, subject="bench", role=Role.CITY_ADMIN, scope="dn")
    async with civic_channel(target, admin) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)

        async def unit(
            parent: str, code: str, name: str, kind: registry_pb2.UnitKind.ValueType
        ) -> str:
            request = registry_pb2.CreateUnitRequest(
                request_id=str(uuid.uuid4()), parent_id=parent, code=code, name=name, kind=kind
            )
            return str((await stub.CreateUnit(request)).unit.unit_id)

        city = await unit("", "dn", "Đà Nẵng", registry_pb2.UNIT_KIND_CITY)
        district = await unit(city, "hc", "Hải Châu", registry_pb2.UNIT_KIND_DISTRICT)
        ward = await unit(district, "hc1", "Hải Châu 1", registry_pb2.UNIT_KIND_WARD)
        names = [(f"g{n}", f"Tổ dân phố {n}") for n in range(1, groups + 1)]
        group_ids = [
            await unit(ward, code, name, registry_pb2.UNIT_KIND_GROUP) for code, name in names
        ]
    return ward, group_ids


async def backlogs(service: RegistryService) -> tuple[int, int]:
    """(events not yet relayed, events relayed but not yet projected into history)."""
    outbox = service.db["outbox"]

    async def events(match: Document) -> int:
        pipeline = [
            {"$match": match},
            {"$group": {"_id": None, "n": {"$sum": {"$size": "$events"}}}},
        ]
        totals = await (await outbox.aggregate(pipeline)).to_list()
        return int(totals[0]["n"]) if totals else 0

    pending = await events({"pending": True})
    processed = await service.db["processed_events"].count_documents({})
    return pending, await events({}) - pending - processed


async def wait_until_quiet(service: RegistryService) -> float:
    """Until every committed event is relayed and projected, so nothing runs in the background
    of the next measurement. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_TIMEOUT_S:
        if await backlogs(service) == (0, 0):
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    say(f"background work still running after {QUIET_TIMEOUT_S:.0f} s; measuring anyway")
    return time.monotonic() - started


async def idle_cpu_percent(seconds: float = 1.0) -> float:
    """This process's CPU use while the service has no requests and no backlog."""
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    return 100 * (time.process_time() - cpu) / (time.monotonic() - wall)


def run_raw_insert(uri: str, database: str, path: str, data_key: str) -> tuple[int, float]:
    return run_async(_raw_insert(uri, database, Path(path), domain.CitizenIdVault(data_key)))


async def _raw_insert(
    uri: str, database: str, path: Path, vault: domain.CitizenIdVault
) -> tuple[int, float]:
    """insert_many of person-shaped documents (same indexes, batch size and write concern as the
    importer; no transaction, no households, no events): the floor under ImportPersons."""
    docs = [person_document(record, vault) for record in csv_rows_records(path)]
    client: AsyncMongoClient[Document] = AsyncMongoClient(uri)
    try:
        db = client[database]
        raw = db.get_collection("bench_raw_persons", write_concern=WriteConcern("majority"))
        await copy_indexes(db["persons"], raw)
        started = time.perf_counter()
        for start in range(0, len(docs), BATCH_ROWS):
            await raw.insert_many(docs[start : start + BATCH_ROWS], ordered=False)
        return len(docs), time.perf_counter() - started
    finally:
        await client.close()


def csv_rows_records(path: Path) -> Iterator[dict[str, str]]:
    for _, record in csv_rows.records(path):
        if isinstance(record, dict):
            yield record


def person_document(record: dict[str, str], vault: domain.CitizenIdVault) -> Document:
    """A document shaped like the importer's (services/registry/records.py PersonCodec)."""
    cid, kind = record["citizen_id"], csv_rows.RESIDENCE_KINDS[record["residence_kind"]]
    return {
        "_id": f"p-{ObjectId()}",
        "household_id": f"hh-{record['household_ref']}",
        "unit_id": record["unit_id"],
        "full_name": record["full_name"],
        "name_folded": domain.fold(record["full_name"]),
        "birth_date": record["birth_date"],
        "sex": csv_rows.SEXES[record["sex"]],
        "relationship": csv_rows.RELATIONSHIPS[record["relationship"]],
        "education": csv_rows.EDUCATION_LEVELS[record["education"]],
        "occupation": record["occupation"],
        "contact": {"phone": record["phone"], "email": record["email"]},
        "status": 1,
        "residence_kind": kind,
        "renter": kind == registry_pb2.RESIDENCE_KIND_RENTER,
        "marked_absent": False,
        "cid_hash": vault.lookup_hash(cid) if cid else None,
        **({"cid_sealed": vault.seal(cid)} if cid else {}),
    }


async def copy_indexes(
    source: AsyncCollection[Document], target: AsyncCollection[Document]
) -> None:
    models = []
    for name, spec in (await source.index_information()).items():
        if name == "_id_":
            continue
        options = {k: v for k, v in spec.items() if k in ("unique", "partialFilterExpression")}
        models.append(IndexModel(spec["key"], name=name, **options))
    if models:
        await target.create_indexes(models)


class Bench:
    """One run's phases against one registry service; each fills in its part of `figures`."""

    def __init__(
        self,
        options: Options,
        settings: Settings,
        workdir: Path,
        pool: ProcessPoolExecutor,
        service: RegistryService,
    ) -> None:
        self.options = options
        self.settings = settings
        self.workdir = workdir
        self.pool = pool
        self.service = service
        self.target = f"127.0.0.1:{service.port}"
        self.figures = Figures(load_average=os.getloadavg()[0])
        self.groups: list[str] = []
        self.officer = ""

    async def in_child(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def create_city(self) -> None:
        ward, self.groups = await create_city(
            self.target, self.settings.auth_secret, self.options.groups
        )
        self.officer = mint_token(
            self.settings.auth_secret, subject="bench", role=Role.WARD_OFFICER, scope=ward
        )

    async def lookups(self, echo_port: int) -> None:
        """A small import to look up, quiet, then the echo service and GetHousehold in turn."""
        count = self.options.lookup_households
        say(f"importing {count:,} households to look up")
        path = self.workdir / "lookup.csv"
        # Serials after the big import's, so the two never share a citizen ID.
        records = synthetic_records(
            self.groups, count, count * 10 // 3, seed=2, first_serial=self.options.persons
        )
        write_csv(path, records)
        await self.in_child(run_import, self.target, self.officer, str(path))
        waited = await wait_until_quiet(self.service)
        say(f"waited {waited:.1f} s for the outbox and history to catch up")
        self.figures.idle_cpu_percent = await idle_cpu_percent()

        households = self.service.store.households.find({}, {"_id": 1}).limit(count)
        ids = [doc["_id"] async for doc in households]
        await check_lookup(self.target, self.officer, ids[0])
        requests = [
            registry_pb2.GetHouseholdRequest(household_id=i).SerializeToString() for i in ids
        ]
        o = self.options

        def load(at: str, method: str) -> Load:
            return Load(at, self.officer, method, requests, o.concurrency, o.channels, o.seconds)

        say(f"lookups: bare echo, then GetHousehold, {o.seconds:g} s each")
        echo = load(f"127.0.0.1:{echo_port}", ECHO_METHOD)
        self.figures.echo = await self.in_child(run_load, echo)
        self.figures.lookup = await self.in_child(run_load, load(self.target, GET_HOUSEHOLD))

    async def imports(self) -> None:
        """Raw insert_many, then ImportPersons, of the same synthetic persons."""
        o = self.options
        say(f"writing {o.persons:,} synthetic persons in {o.households:,} households")
        path = self.workdir / "people.csv"
        write_csv(path, synthetic_records(self.groups, o.households, o.persons, seed=1))
        say("raw insert_many")
        database = self.settings.database_for("registry")
        self.figures.raw_docs, self.figures.raw_seconds = await self.in_child(
            run_raw_insert, self.settings.mongo_uri, database, str(path), self.settings.data_key
        )
        say("ImportPersons")
        self.figures.import_result = await self.in_child(
            run_import, self.target, self.officer, str(path)
        )
        self.figures.relay_backlog, self.figures.history_backlog = await backlogs(self.service)


async def run_benchmark(
    endpoints: Endpoints, options: Options, workdir: Path, pool: ProcessPoolExecutor
) -> Figures:
    settings = bench_settings(endpoints)
    service = RegistryService(settings)
    echo_server: grpc.aio.Server | None = None
    try:
        await service.start()
        # One line per consumer rebalance and callback otherwise.
        logging.getLogger("faststream.access.kafka").setLevel(logging.WARNING)
        echo_server, echo_port = await start_echo_server()
        bench = Bench(options, settings, workdir, pool, service)
        await bench.create_city()
        await bench.lookups(echo_port)
        await bench.imports()
        return bench.figures
    finally:
        if echo_server is not None:
            await echo_server.stop(None)
        await service.stop()
        await drop_database(settings)


async def check_lookup(target: str, token: str, household_id: str) -> None:
    """One real GetHousehold first: a benchmark of errors would measure nothing."""
    async with civic_channel(target, token, "benchmark") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        got = await stub.GetHousehold(registry_pb2.GetHouseholdRequest(household_id=household_id))
    if not got.members:
        raise SystemExit(f"GetHousehold({household_id}) returned no members")


async def drop_database(settings: Settings) -> None:
    """An external MongoDB keeps nothing of the run; a LocalStack's goes with its directory."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(settings.mongo_uri)
    try:
        await client.drop_database(settings.database_for("registry"))
    finally:
        await client.close()


# ---- report ----------------------------------------------------------------------------------


def summary(options: Options, figures: Figures) -> dict[str, Any]:
    result, lookup, echo = figures.import_result, figures.lookup, figures.echo
    assert result is not None and lookup is not None and echo is not None
    import_rate = result.persons_created / result.seconds
    ratio = lookup.rate / echo.rate if echo.rate else 0.0
    return {
        "persons": options.persons,
        "households": options.households,
        "load_average": round(figures.load_average, 2),
        "import_persons_per_s": round(import_rate),
        "import_seconds": round(result.seconds, 2),
        "import_persons_created": result.persons_created,
        "import_households_created": result.households_created,
        "import_row_errors": result.rows - result.persons_created - result.persons_unchanged,
        "relay_backlog_after_import": figures.relay_backlog,
        "history_backlog_after_import": figures.history_backlog,
        "service_idle_cpu_percent": round(figures.idle_cpu_percent),
        "raw_insert_docs_per_s": round(figures.raw_docs / figures.raw_seconds),
        "concurrency": options.concurrency,
        "lookup_rps": round(lookup.rate),
        "lookup_p50_ms": round(lookup.percentile(0.50), 2),
        "lookup_p99_ms": round(lookup.percentile(0.99), 2),
        "lookup_errors": lookup.errors,
        "echo_rps": round(echo.rate),
        "echo_p50_ms": round(echo.percentile(0.50), 2),
        "echo_p99_ms": round(echo.percentile(0.99), 2),
        "lookup_to_echo": round(ratio, 3),
        "targets": {"import_persons_per_s": IMPORT_TARGET, "lookup_to_echo": LOOKUP_TARGET},
        "targets_met": import_rate >= IMPORT_TARGET and ratio >= LOOKUP_TARGET,
    }


def print_report(options: Options, figures: Figures, f: dict[str, Any]) -> None:
    result = figures.import_result
    assert result is not None
    print(
        f"\nRegistry benchmark: {f['persons']:,} persons in {f['households']:,} households, "
        f"{options.groups} groups; {os.cpu_count()} CPUs, load average {f['load_average']:.1f} "
        "at the start (other work on the machine skews every figure)\n"
    )
    print(f"{'bulk import':<34}{'rate':>9}")
    print(
        f"  {'ImportPersons (gRPC stream)':<32}{f['import_persons_per_s']:>9,} persons/s  "
        f"{f['import_seconds']:.1f} s, {f['import_row_errors']} row errors"
    )
    print(
        f"  {'raw insert_many (pymongo)':<32}{f['raw_insert_docs_per_s']:>9,} docs/s     "
        f"{figures.raw_seconds:.1f} s, batches of {BATCH_ROWS}, w=majority"
    )
    for line in result.errors:
        print(f"  import error: {line}")
    print(
        f"  when the import returned: {f['relay_backlog_after_import']:,} events not yet relayed, "
        f"{f['history_backlog_after_import']:,} not yet in household history"
    )
    print(f"\n{'lookups, ' + str(f['concurrency']) + ' concurrent callers':<34}", end="")
    print(f"{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}")
    for label, key in (("GetHousehold", "lookup"), ("bare grpc.aio echo", "echo")):
        rate, p50, p99 = f[f"{key}_rps"], f[f"{key}_p50_ms"], f[f"{key}_p99_ms"]
        print(f"  {label:<32}{rate:>9,}{p50:>10.2f}{p99:>10.2f}")
    print(f"  (service process CPU while idle: {f['service_idle_cpu_percent']}%)")
    if figures.lookup and figures.lookup.errors:
        print(f"  GetHousehold errors: {figures.lookup.errors} ({figures.lookup.first_error})")
    met = {True: "met", False: "NOT met"}
    import_ok = f["import_persons_per_s"] >= IMPORT_TARGET
    lookup_ok = f["lookup_to_echo"] >= LOOKUP_TARGET
    print(f"\ntargets: import >= {IMPORT_TARGET:,} persons/s {met[import_ok]}; ", end="")
    print(f"lookup >= {LOOKUP_TARGET} x echo {met[lookup_ok]} ({f['lookup_to_echo']:.2f})")
    print(json.dumps(f))


# ---- main ------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--households", type=int, default=30_000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--lookup-households", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="per lookup measurement")
    args = parser.parse_args(argv)
    return Options(**vars(args))


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)

    async def measure(endpoints: Endpoints, pool: ProcessPoolExecutor, workdir: Path) -> Figures:
        return await run_benchmark(endpoints, options, workdir, pool)

    figures = run_on_own_servers(measure, warm_up_child)
    print_report(options, figures, summary(options, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tickets benchmark: submit-to-routed latency and throughput, next to the broker's own floor.

    .venv/bin/python bench/tickets.py [--rate 200] [--seconds 20] [--concurrency 16]

Starts its own servers (LocalStack in a temporary directory on free ports; an external server
named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS / CIVIC_S3_ENDPOINT is used instead) and, in
this process, the registry service and the tickets service, as in production: each with its
gRPC server, outbox relay and consumers. Through the registry it builds a city > district >
ward > groups tree with households (located, each with a head) and waits until the tickets
service has projected them from civic.registry.v1; the registry then stops, so the process
measured runs the tickets service alone. The GIS service runs in a process of its own, with the
ward and its groups drawn side by side (each group a strip of the ward, its households in it):
each ticket names the place it reports, in the reporter's own group or, one in five, anywhere in
the ward, and the tickets service places it as in production (by the reporter's group's outline,
else by asking GIS's LocateUnit). Then, from a separate process, in turn:

  floor    a plain aiokafka producer and consumer on the same broker, at the same open-loop rate:
           produce -> consume latency of one record (the producer configured like the services');
           then plain PyMongo on the same MongoDB: one transaction of two inserts (a document and
           its outbox entry) per send, committed as the services commit, scheduled send -> commit.
           A ticket's path holds two such commits and two broker hops, so their tails bound its.
  capacity closed loop: a fixed number of concurrent submitters for a fixed time; tickets/s is
           the tickets they submitted divided by the time until the last one's TicketRouted was
           received, so a pipeline that falls behind the submitters is charged for its backlog.
  latency  SubmitTicket at a fixed rate (open loop: sent on schedule whatever the answers), by
           several residents of different households, categories and places; each ticket's
           latency is from its scheduled send to the moment an outside aiokafka consumer (its
           own group, subscribed before the load) receives the TicketRouted record for it. The
           path: gRPC -> (GIS LocateUnit) -> transaction with outbox -> relay -> TicketSubmitted
           -> the routing consumer -> transaction with outbox -> relay -> TicketRouted -> the
           outside consumer.
           A ticket not routed within 30 s of the end counts as infinitely late ("never").

Each phase starts once the previous one's tickets are all routed. The last line of output is one
JSON object with the figures; "targets_met" is true when the p99 submit-to-routed latency at
200 tickets/s is under 100 ms.

Against an external broker, the service's new consumer groups start from the earliest offset:
they go through the topics' history first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2, gis_pb2_grpc
from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from civic.tickets.v1 import events_pb2, tickets_pb2
from pymongo import AsyncMongoClient

from infra.benchmark import ms, open_loop, percentile, run_on_own_servers, say
from infra.local import Endpoints, free_port, isolated_settings
from services.common import kafka_fetch
from services.common.auth import Role, mint_token
from services.common.broker import FETCH_WAIT_MS
from services.common.cloudevents import type_name
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.mongo import Document, Session, in_transaction
from services.common.runtime import run_async
from services.platform import service_env, start_services, wait_healthy
from services.registry.main import RegistryService
from services.tickets import domain
from services.tickets.events import TOPIC
from services.tickets.main import TicketsService

TARGET_RATE = 200.0  # tickets/s, open loop
TARGET_P99_MS = 100.0
SUBMIT = "/civic.tickets.v1.TicketsService/SubmitTicket"
ROUTED = type_name(events_pb2.TicketRouted())
SUBMITTED = type_name(events_pb2.TicketSubmitted())
CATEGORIES = [rule.category for rule in domain.DEFAULT_RULES]
# Where the pilot's tickets are: central Đà Nẵng.
LATITUDES, LONGITUDES = (16.03, 16.09), (108.19, 108.24)
WARD = "dn.hc.hc1"
# Reports of a place outside the reporter's own group.
NEIGHBOURS_SHARE = 0.2
DRAIN_TIMEOUT_S = 30.0  # for the last tickets of a phase to come out routed
READY_TIMEOUT_S = 60.0

T = TypeVar("T")


# ---- the load (runs in a child process) ------------------------------------------------------


@dataclass(frozen=True)
class Resident:
    token: str
    household_id: str
    # The west and east edges of the resident's group (a strip of the ward): where most of
    # their reports are.
    strip: tuple[float, float]


@dataclass(frozen=True)
class OpenLoad:
    kafka: str
    target: str
    residents: list[Resident]
    rate: float
    seconds: float
    seed: int


@dataclass(frozen=True)
class ClosedLoad:
    kafka: str
    target: str
    residents: list[Resident]
    concurrency: int
    seconds: float
    seed: int


@dataclass
class Latencies:
    """One open-loop run: per-record latencies from the scheduled send."""

    sent: int
    seconds: float
    latencies_ms: list[float]
    missing: int = 0  # sent, never seen within the drain timeout
    # Also, for the tickets: the gRPC answer, and TicketSubmitted reaching the outside consumer.
    answer_ms: list[float] = field(default_factory=list)
    submitted_ms: list[float] = field(default_factory=list)
    late_sends: int = 0  # sent more than 5 ms after their schedule (the load process fell behind)
    errors: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


@dataclass
class Capacity:
    """One closed-loop run."""

    concurrency: int
    submitted: int
    submit_seconds: float  # first send to last answer
    routed_seconds: float  # first send to the last TicketRouted received
    routed_in_window: int  # TicketRouted received while the submitters ran
    missing: int
    latencies_ms: list[float]
    errors: int = 0
    first_error: str = ""

    @property
    def submit_rate(self) -> float:
        return self.submitted / self.submit_seconds if self.submit_seconds else 0.0

    @property
    def sustained(self) -> float:
        done = self.submitted - self.missing
        return done / self.routed_seconds if self.routed_seconds else 0.0


class Watcher:
    """An outside reader of a topic: a plain aiokafka consumer in its own group, which notes when
    each record arrives, by the record's key, per CloudEvents type (or "" for plain records)."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.topic = topic
        # As the services' own consumers: a local broker answers empty fetches at once, and an
        # unpatched consumer would spin on them, taking CPU from the service being measured.
        kafka_fetch.install()
        self.consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap_servers,
            group_id=f"bench-outside-{uuid.uuid4().hex}",
            auto_offset_reset="latest",
            enable_auto_commit=False,
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        self.seen: dict[str, dict[str, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._news = asyncio.Event()

    async def start(self) -> None:
        """Returns once the consumer holds its partitions and knows where it reads from, so
        every record produced afterwards is seen."""
        await self.consumer.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.consumer.assignment():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no partitions of {self.topic} assigned")
            await self.consumer.getmany(timeout_ms=100)
        for partition in self.consumer.assignment():
            await self.consumer.position(partition)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=1000)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    kind = next((v for k, v in record.headers or () if k == "ce_type"), b"")
                    key = (record.key or b"").decode()
                    self.seen.setdefault(kind.decode(), {}).setdefault(key, now)
            if batches:
                self._news.set()

    def at(self, kind: str, key: str) -> float | None:
        return self.seen.get(kind, {}).get(key)

    async def wait_for(self, kind: str, keys: set[str], within: float) -> bool:
        deadline = time.monotonic() + within
        while not keys <= self.seen.get(kind, {}).keys():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._news.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), left)
        return True


class Submitters:
    """One channel per resident; requests built ahead, round robin over the residents."""

    def __init__(self, target: str, residents: list[Resident], seed: int) -> None:
        self.rng = random.Random(seed)
        self.residents = residents
        self.channels = [civic_channel(target, r.token, "benchmark") for r in residents]
        self.calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            channel.unary_unary(SUBMIT) for channel in self.channels
        ]
        self.errors = 0
        self.first_error = ""

    def requests(self, count: int) -> list[bytes]:
        """Request i is for the resident that `submit(i, ...)` sends it as."""
        return [self.request(i) for i in range(count)]

    def request(self, index: int) -> bytes:
        """A report by the index's resident: of a place in their own group, mostly, or
        elsewhere in the ward (NEIGHBOURS_SHARE), which the tickets service asks GIS about."""
        rng = self.rng
        west, east = self.residents[index % len(self.residents)].strip
        if rng.random() < NEIGHBOURS_SHARE:
            west, east = LONGITUDES
        return tickets_pb2.SubmitTicketRequest(
            request_id=str(uuid.uuid4()),
            category=rng.choice(CATEGORIES),
            description=f"Phản ánh số {rng.randrange(10**6)}: cần kiểm tra và xử lý",
            location=types_pb2.GeoPoint(
                latitude=rng.uniform(*LATITUDES), longitude=rng.uniform(west, east)
            ),
        ).SerializeToString()

    async def submit(self, index: int, request: bytes) -> str | None:
        """The new ticket's id, or None on an error (counted)."""
        try:
            answer = await self.calls[index % len(self.calls)](request)
        except grpc.aio.AioRpcError as error:
            self.errors += 1
            self.first_error = self.first_error or f"{error.code().name}: {error.details()}"
            return None
        return str(tickets_pb2.SubmitTicketResponse.FromString(answer).ticket.ticket_id)

    async def warm_up(self, watcher: Watcher) -> None:
        """Connect every channel and see one ticket each come out routed: the whole pipeline is
        up (consumer groups joined) before the clock starts."""
        for channel in self.channels:
            await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT_S)
        ids = await asyncio.gather(
            *(self.submit(i, self.request(i)) for i in range(len(self.calls)))
        )
        if None in ids:
            raise RuntimeError(f"warm-up SubmitTicket failed: {self.first_error}")
        if not await watcher.wait_for(ROUTED, {i for i in ids if i}, READY_TIMEOUT_S):
            raise RuntimeError("warm-up tickets were not routed")
        self.errors, self.first_error = 0, ""

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def run_tickets_open(load: OpenLoad) -> Latencies:
    return run_async(_tickets_open(load))


async def _tickets_open(load: OpenLoad) -> Latencies:
    watcher = Watcher(load.kafka, TOPIC)
    await watcher.start()
    submitters = Submitters(load.target, load.residents, load.seed)
    try:
        await submitters.warm_up(watcher)
        requests = submitters.requests(int(load.rate * load.seconds))
        scheduled_at: dict[str, float] = {}
        answer_ms: list[float] = []

        async def send(index: int, scheduled: float) -> None:
            ticket_id = await submitters.submit(index, requests[index])
            if ticket_id:
                scheduled_at[ticket_id] = scheduled
                answer_ms.append((time.perf_counter() - scheduled) * 1000)

        sent, seconds, late = await open_loop(load.rate, load.seconds, send)
        await watcher.wait_for(ROUTED, set(scheduled_at), DRAIN_TIMEOUT_S)
    finally:
        await submitters.close()
        await watcher.stop()

    def since_scheduled(kind: str) -> list[float]:
        return [
            (seen - at) * 1000
            for ticket_id, at in scheduled_at.items()
            if (seen := watcher.at(kind, ticket_id)) is not None
        ]

    routed = since_scheduled(ROUTED)
    return Latencies(
        sent=sent,
        seconds=seconds,
        latencies_ms=routed,
        missing=len(scheduled_at) - len(routed),
        answer_ms=answer_ms,
        submitted_ms=since_scheduled(SUBMITTED),
        late_sends=late,
        errors=submitters.errors,
        first_error=submitters.first_error,
    )


def run_tickets_closed(load: ClosedLoad) -> Capacity:
    return run_async(_tickets_closed(load))


async def _tickets_closed(load: ClosedLoad) -> Capacity:
    watcher = Watcher(load.kafka, TOPIC)
    await watcher.start()
    submitters = Submitters(load.target, load.residents, load.seed)
    try:
        await submitters.warm_up(watcher)
        # More than any 2-core machine submits; running out would show as a short window.
        requests = submitters.requests(int(2_000 * load.seconds))
        started_at: dict[str, float] = {}
        next_request = iter(range(len(requests)))
        begin = time.perf_counter()
        end = begin + load.seconds
        last_answer = begin

        async def submitter() -> None:
            nonlocal last_answer
            while time.perf_counter() < end and (index := next(next_request, None)) is not None:
                started = time.perf_counter()
                ticket_id = await submitters.submit(index, requests[index])
                last_answer = max(last_answer, time.perf_counter())
                if ticket_id:
                    started_at[ticket_id] = started

        await asyncio.gather(*(submitter() for _ in range(load.concurrency)))
        await watcher.wait_for(ROUTED, set(started_at), DRAIN_TIMEOUT_S)
    finally:
        await submitters.close()
        await watcher.stop()
    routed = {i: seen for i in started_at if (seen := watcher.at(ROUTED, i)) is not None}
    return Capacity(
        concurrency=load.concurrency,
        submitted=len(started_at),
        submit_seconds=last_answer - begin,
        routed_seconds=max(routed.values(), default=begin) - begin,
        routed_in_window=sum(1 for seen in routed.values() if seen <= end),
        missing=len(started_at) - len(routed),
        latencies_ms=[(seen - started_at[i]) * 1000 for i, seen in routed.items()],
        errors=submitters.errors,
        first_error=submitters.first_error,
    )


@dataclass(frozen=True)
class RawLoad:
    kafka: str
    rate: float
    seconds: float
    partitions: int


def run_raw(load: RawLoad) -> Latencies:
    return run_async(_raw(load))


async def _raw(load: RawLoad) -> Latencies:
    """Produce -> consume of one record at a time, at the rate, on a topic of its own."""
    topic = f"bench.roundtrip.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=load.kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, load.partitions, 1)])
        # Configured like the services' producer (services/common/broker.py).
        producer = AIOKafkaProducer(
            bootstrap_servers=load.kafka, acks="all", enable_idempotence=True, linger_ms=2
        )
        await producer.start()
        watcher = Watcher(load.kafka, topic)
        await watcher.start()
        try:
            await (await producer.send(topic, b"warm-up", key=b"warm-up"))
            await watcher.wait_for("", {"warm-up"}, READY_TIMEOUT_S)
            scheduled_at: dict[str, float] = {}
            deliveries: list[asyncio.Future[Any]] = []
            payload = os.urandom(200)  # about a TicketRouted event's size

            async def send(index: int, scheduled: float) -> None:
                key = f"r{index}"
                scheduled_at[key] = scheduled
                deliveries.append(await producer.send(topic, payload, key=key.encode()))

            sent, seconds, late = await open_loop(load.rate, load.seconds, send)
            await asyncio.gather(*deliveries)
            await watcher.wait_for("", set(scheduled_at), DRAIN_TIMEOUT_S)
        finally:
            await watcher.stop()
            await producer.stop()
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    latencies = [
        (seen - at) * 1000
        for key, at in scheduled_at.items()
        if (seen := watcher.at("", key)) is not None
    ]
    return Latencies(
        sent=sent,
        seconds=seconds,
        latencies_ms=latencies,
        missing=sent - len(latencies),
        late_sends=late,
    )


@dataclass(frozen=True)
class CommitLoad:
    mongo_uri: str
    database: str
    rate: float
    seconds: float


def run_commits(load: CommitLoad) -> Latencies:
    return run_async(_commits(load))


async def _commits(load: CommitLoad) -> Latencies:
    """One transaction per send, at the rate, shaped like a submitted ticket's: a document and
    its outbox entry, committed with majority write concern as the services commit."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(load.mongo_uri)
    try:
        records, outbox = (
            client[load.database]["bench_records"],
            client[load.database]["bench_outbox"],
        )
        payload = os.urandom(600)  # about a ticket document's size
        latencies: list[float] = []

        async def send(index: int, scheduled: float) -> None:
            async def work(session: Session) -> None:
                await records.insert_one({"n": index, "payload": payload}, session=session)
                await outbox.insert_one({"n": index, "pending": True}, session=session)

            await in_transaction(client, work)
            latencies.append((time.perf_counter() - scheduled) * 1000)

        await in_transaction(client, lambda session: records.insert_one({}, session=session))
        sent, seconds, late = await open_loop(load.rate, load.seconds, send)
        await client.drop_database(load.database)
    finally:
        await client.close()
    return Latencies(sent=sent, seconds=seconds, latencies_ms=latencies, late_sends=late)


def warm_up_child() -> None:
    """Import the child's modules before anything is timed."""


# ---- the services and their city -------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    rate: float
    seconds: float
    floor_seconds: float
    concurrency: int
    capacity_seconds: float
    groups: int
    households_per_group: int


@dataclass
class Figures:
    floor: Latencies | None = None
    commit_floor: Latencies | None = None
    latency: Latencies | None = None
    capacity: Capacity | None = None
    # The service process (both services) during the open-loop load: CPU, of one core.
    service_cpu_percent: float = 0.0
    load_average: float = 0.0  # the machine's, 1 min, just before the open-loop load
    quiet_waits: list[float] = field(default_factory=list)


def bench_settings(endpoints: Endpoints) -> Settings:
    return isolated_settings(endpoints, "bench")


def head_of_household(serial: int) -> registry_pb2.PersonDetails:
    born = f"{1960 + serial % 30}-0{1 + serial % 9}-1{serial % 10}"
    # Province 048 (Đà Nẵng), century-and-sex digit 0 (male, 1900s), year, serial.
    citizen_id = f"0480{born[2:4]}{900_000 + serial:06d}"
    return registry_pb2.PersonDetails(
        full_name=f"Nguyễn Văn {['An', 'Bình', 'Cường', 'Dũng', 'Hùng'][serial % 5]}",
        birth_date=born,
        sex=registry_pb2.SEX_MALE,
        citizen_id=citizen_id,
        relationship=registry_pb2.RELATIONSHIP_HEAD,
        education=registry_pb2.EDUCATION_LEVEL_UNIVERSITY,
        occupation="kỹ sư",
    )


async def create_city(target: str, secret: str, options: Options) -> list[Resident]:
    """dn > dn.hc > dn.hc.hc1 > groups, households in each group through the registry, and a
    resident of each household."""
    rng = random.Random(7)
    admin = mint_token(secret, subject="bench", role=Role.CITY_ADMIN, scope="dn")
    residents: list[Resident] = []
    async with civic_channel(target, admin, "benchmark") as channel:
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
        for number in range(1, options.groups + 1):
            strip = strip_of(options, number)
            group = await unit(
                ward, f"g{number}", f"Tổ dân phố {number}", registry_pb2.UNIT_KIND_GROUP
            )
            for _ in range(options.households_per_group):
                serial = len(residents)
                created = await stub.CreateHousehold(
                    registry_pb2.CreateHouseholdRequest(
                        request_id=str(uuid.uuid4()),
                        unit_id=group,
                        address=f"{rng.randint(1, 300)} Kiệt {rng.randint(1, 120)} Trần Phú",
                        housing=registry_pb2.Housing(floor_area_m2=62.5, storeys=2),
                        residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
                        location=types_pb2.GeoPoint(
                            latitude=rng.uniform(*LATITUDES), longitude=rng.uniform(*strip)
                        ),
                        head=head_of_household(serial),
                    )
                )
                household = created.household.household_id
                token = mint_token(
                    secret,
                    subject=f"resident-{serial}",
                    role=Role.RESIDENT,
                    scope=group,
                    household_id=household,
                )
                residents.append(Resident(token, household, strip))
    return residents


@contextlib.asynccontextmanager
async def gis_process(settings: Settings, port: int, registry: str) -> AsyncIterator[None]:
    """The GIS service in a process of its own, as deployed: its work is not the tickets
    service's."""
    env = service_env(settings, settings.database_prefix, port, CIVIC_REGISTRY_TARGET=registry)
    with tempfile.TemporaryDirectory(prefix="civic-bench-gis-") as scratch:
        logs, pids = Path(scratch) / "logs", Path(scratch) / "pids"
        [process] = start_services({"gis": env}, logs, pids)
        try:
            await wait_healthy("gis", port, process, logs)
            yield
        finally:
            process.terminate()
            await asyncio.to_thread(process.wait)


def strip_of(options: Options, number: int) -> tuple[float, float]:
    """The west and east edges of group `number`: the ward cut into strips from west to east."""
    west, east = LONGITUDES
    width = (east - west) / options.groups
    return west + (number - 1) * width, west + number * width


def group_strips(options: Options) -> list[tuple[str, list[list[float]]]]:
    """The ward's box, and each group's strip of it: (unit, ring)."""
    south, north = LATITUDES

    def box(w: float, e: float) -> list[list[float]]:
        return [[w, south], [e, south], [e, north], [w, north], [w, south]]

    return [(WARD, box(*LONGITUDES))] + [
        (f"{WARD}.g{n}", box(*strip_of(options, n))) for n in range(1, options.groups + 1)
    ]


async def draw_groups(target: str, secret: str, options: Options) -> None:
    """The ward's and its groups' boundaries, once the GIS service knows the units from the
    registry's events."""
    admin = mint_token(secret, subject="bench", role=Role.CITY_ADMIN, scope="dn")
    features = [
        {
            "type": "Feature",
            "id": unit,
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"unit_id": unit},
        }
        for unit, ring in group_strips(options)
    ]
    content = json.dumps({"type": "FeatureCollection", "features": features}).encode()
    started = time.monotonic()
    async with civic_channel(target, admin, "benchmark") as channel:
        stub = gis_pb2_grpc.GisServiceStub(channel)
        while True:
            done = await stub.ImportLayer(
                gis_pb2.ImportLayerRequest(
                    request_id=str(uuid.uuid4()),
                    unit_id=WARD,
                    layer=gis_pb2.LAYER_BOUNDARY,
                    format=gis_pb2.SOURCE_FORMAT_GEOJSON,
                    content=content,
                )
            )
            if not done.rejected:
                return
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise SystemExit(f"GIS refused the groups' boundaries: {done.rejected[0]}")
            await asyncio.sleep(0.2)  # the units' events are still on their way to GIS


async def until_known(tickets: TicketsService, residents: list[Resident]) -> float:
    """Until the tickets service has projected every household (and so its group) from the
    registry's events. Returns the seconds waited."""
    started = time.monotonic()
    for resident in residents:
        while (household := await tickets.store.household(resident.household_id)) is None or (
            await tickets.store.unit(household["unit_id"]) is None
        ):
            if time.monotonic() - started > READY_TIMEOUT_S:
                raise SystemExit("the tickets service never saw the registry's households")
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def until_quiet(tickets: TicketsService) -> float:
    """Until every ticket is routed and every event relayed, so nothing left over from one
    phase runs in the background of the next. Returns the seconds waited."""
    started = time.monotonic()
    outbox = tickets.db["outbox"]
    submitted = {"status": int(domain.Status.SUBMITTED)}
    while await tickets.store.tickets.count_documents(submitted, limit=1) or (
        await outbox.count_documents({"pending": True}, limit=1)
    ):
        if time.monotonic() - started > DRAIN_TIMEOUT_S:
            say(f"backlog still there after {DRAIN_TIMEOUT_S:.0f} s; measuring anyway")
            break
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def run_benchmark(
    endpoints: Endpoints, options: Options, pool: ProcessPoolExecutor
) -> Figures:
    settings = bench_settings(endpoints)
    registry = RegistryService(settings)
    gis_port = free_port()
    tickets = TicketsService(
        settings.model_copy(
            update={"grpc_port": free_port(), "gis_target": f"127.0.0.1:{gis_port}"}
        )
    )
    figures = Figures()
    kafka = settings.kafka_bootstrap_servers

    async def in_child(function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    async with contextlib.AsyncExitStack() as running:
        running.push_async_callback(drop_databases, settings)
        await registry.start()
        await running.enter_async_context(
            gis_process(settings, gis_port, f"127.0.0.1:{registry.port}")
        )
        registry_stopped = False

        async def stop_registry() -> None:
            nonlocal registry_stopped
            if not registry_stopped:
                registry_stopped = True
                await registry.stop()

        running.push_async_callback(stop_registry)
        await tickets.start()
        running.push_async_callback(tickets.stop)
        # One line per consumer rebalance and callback otherwise.
        logging.getLogger("faststream.access.kafka").setLevel(logging.WARNING)
        say("creating the city and its households through the registry")
        residents = await create_city(f"127.0.0.1:{registry.port}", settings.auth_secret, options)
        say("drawing the ward and its groups on the map")
        await draw_groups(f"127.0.0.1:{gis_port}", settings.auth_secret, options)
        waited = await until_known(tickets, residents)
        say(f"the tickets service knew all {len(residents)} households after {waited:.1f} s")
        # Its part is done: its consumer and relay leave the tickets service the process.
        await stop_registry()
        target = f"127.0.0.1:{tickets.port}"
        o = options

        say(f"floor: raw aiokafka produce -> consume, {o.rate:g}/s for {o.floor_seconds:g} s")
        figures.floor = await in_child(
            run_raw, RawLoad(kafka, o.rate, o.floor_seconds, settings.kafka_partitions)
        )
        say(f"floor: raw MongoDB transaction (two inserts), {o.rate:g}/s for {o.floor_seconds:g} s")
        figures.commit_floor = await in_child(
            run_commits,
            CommitLoad(settings.mongo_uri, settings.database_for("floor"), o.rate, o.floor_seconds),
        )
        say(
            f"capacity: {o.concurrency} concurrent submitters for {o.capacity_seconds:g} s, "
            "closed loop"
        )
        figures.capacity = await in_child(
            run_tickets_closed,
            ClosedLoad(kafka, target, residents, o.concurrency, o.capacity_seconds, seed=2),
        )
        figures.quiet_waits.append(await until_quiet(tickets))
        say(f"latency: SubmitTicket at {o.rate:g}/s for {o.seconds:g} s, open loop")
        figures.load_average = os.getloadavg()[0]
        cpu, wall = time.process_time(), time.monotonic()
        figures.latency = await in_child(
            run_tickets_open, OpenLoad(kafka, target, residents, o.rate, o.seconds, seed=1)
        )
        wall = time.monotonic() - wall
        figures.service_cpu_percent = 100 * (time.process_time() - cpu) / wall
    return figures


async def drop_databases(settings: Settings) -> None:
    """An external MongoDB keeps nothing of the run; a LocalStack's goes with its directory."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(settings.mongo_uri)
    try:
        for service in ("registry", "tickets", "gis"):
            await client.drop_database(settings.database_for(service))
    finally:
        await client.close()


# ---- report ----------------------------------------------------------------------------------


def summary(options: Options, figures: Figures) -> dict[str, Any]:
    floor, latency, capacity = figures.floor, figures.latency, figures.capacity
    commits = figures.commit_floor
    assert floor is not None and latency is not None and capacity is not None
    assert commits is not None

    def pct(samples: list[float], fraction: float, missing: int = 0) -> float:
        return percentile(samples, fraction, missing)

    p50, p99 = (
        pct(latency.latencies_ms, 0.5, latency.missing),
        pct(latency.latencies_ms, 0.99, latency.missing),
    )
    floor_p50 = pct(floor.latencies_ms, 0.5, floor.missing)
    floor_p99 = pct(floor.latencies_ms, 0.99, floor.missing)
    met = p99 < TARGET_P99_MS and latency.errors == 0 and latency.rate >= TARGET_RATE

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 1) if b and math.isfinite(a) and math.isfinite(b) else None

    return {
        "rate_per_s": round(latency.rate, 1),
        "seconds": latency.seconds,
        "tickets": latency.sent,
        "households": options.groups * options.households_per_group,
        "routed_p50_ms": ms(p50),
        "routed_p99_ms": ms(p99),
        "routed_max_ms": ms(
            math.inf if latency.missing else max(latency.latencies_ms, default=0.0)
        ),
        "routed_missing": latency.missing,
        "submitted_visible_p50_ms": ms(pct(latency.submitted_ms, 0.5)),
        "submitted_visible_p99_ms": ms(pct(latency.submitted_ms, 0.99)),
        "submit_answer_p50_ms": ms(pct(latency.answer_ms, 0.5)),
        "submit_answer_p99_ms": ms(pct(latency.answer_ms, 0.99)),
        "submit_errors": latency.errors,
        "late_sends": latency.late_sends,
        "kafka_floor_p50_ms": ms(floor_p50, 2),
        "kafka_floor_p99_ms": ms(floor_p99, 2),
        "kafka_floor_missing": floor.missing,
        "commit_floor_p50_ms": ms(pct(commits.latencies_ms, 0.5), 2),
        "commit_floor_p99_ms": ms(pct(commits.latencies_ms, 0.99), 2),
        "commit_floor_max_ms": ms(max(commits.latencies_ms, default=0.0), 2),
        "routed_p50_to_floor": ratio(p50, floor_p50),
        "routed_p99_to_floor": ratio(p99, floor_p99),
        "concurrency": capacity.concurrency,
        "sustained_tickets_per_s": round(capacity.sustained, 1),
        "closed_loop_submit_per_s": round(capacity.submit_rate, 1),
        "closed_loop_tickets": capacity.submitted,
        "closed_loop_routed_in_window": capacity.routed_in_window,
        "closed_loop_last_routed_s": round(capacity.routed_seconds, 1),
        "closed_loop_routed_p50_ms": ms(pct(capacity.latencies_ms, 0.5, capacity.missing)),
        "closed_loop_routed_p99_ms": ms(pct(capacity.latencies_ms, 0.99, capacity.missing)),
        "closed_loop_missing": capacity.missing,
        "closed_loop_errors": capacity.errors,
        "service_cpu_percent": round(figures.service_cpu_percent),
        "backlog_wait_s": round(sum(figures.quiet_waits), 1),
        "load_average_1m": round(figures.load_average, 2),
        "cpus": os.cpu_count(),
        "targets": {"rate_per_s": TARGET_RATE, "routed_p99_ms": TARGET_P99_MS},
        "targets_met": met,
    }


def print_report(options: Options, figures: Figures, f: dict[str, Any]) -> None:
    latency, capacity = figures.latency, figures.capacity
    assert latency is not None and capacity is not None

    def cell(value: float | None) -> str:
        return f"{value:>9.1f}" if value is not None else f"{'never':>9}"

    def times(ratio: float | None) -> str:
        return f"{ratio:g}x" if ratio is not None else "n/a"

    print(
        f"\nTickets benchmark: {f['tickets']:,} tickets at {options.rate:g}/s (open loop) from "
        f"{f['households']} households in {options.groups} groups; {f['cpus']} CPUs, load "
        f"average {f['load_average_1m']:.1f} before the load\n"
    )
    print(f"{'latency at ' + format(f['rate_per_s'], 'g') + '/s, open loop':<54}", end="")
    print(f"{'p50 ms':>9}{'p99 ms':>9}")
    rows = [
        ("submit -> TicketRouted at an outside consumer", "routed"),
        ("  submit -> TicketSubmitted at an outside consumer", "submitted_visible"),
        ("  submit -> SubmitTicket answer", "submit_answer"),
        ("raw aiokafka produce -> consume (floor)", "kafka_floor"),
        ("raw MongoDB transaction, two inserts (floor)", "commit_floor"),
    ]
    for label, key in rows:
        print(f"  {label:<52}{cell(f[key + '_p50_ms'])}{cell(f[key + '_p99_ms'])}")
    print(
        f"  routed / floor: {times(f['routed_p50_to_floor'])} at p50, "
        f"{times(f['routed_p99_to_floor'])} at p99; {f['routed_missing']} not routed within "
        f"{DRAIN_TIMEOUT_S:g} s of the end, "
        f"{f['submit_errors']} errors, {f['late_sends']} sends >5 ms late; service process CPU "
        f"{f['service_cpu_percent']}% of a core"
    )
    print(
        f"  the path holds two commits and two broker hops; the slowest floor commit of "
        f"{options.floor_seconds:g} s took {cell(f['commit_floor_max_ms']).strip()} ms"
    )
    if latency.first_error:
        print(f"  first error: {latency.first_error}")
    print(f"\n{'capacity, ' + str(capacity.concurrency) + ' submitters, closed loop':<54}", end="")
    print(f"{'per s':>9}")
    print(f"  {'tickets submitted and routed (sustained)':<52}{f['sustained_tickets_per_s']:>9.1f}")
    print(f"  {'SubmitTicket answers':<52}{f['closed_loop_submit_per_s']:>9.1f}")
    print(
        f"  {f['closed_loop_tickets']:,} tickets in {options.capacity_seconds:g} s, "
        f"{f['closed_loop_routed_in_window']:,} routed within them, the last after "
        f"{f['closed_loop_last_routed_s']:.1f} s; submit -> routed p50 "
        f"{f['closed_loop_routed_p50_ms']} ms, p99 {f['closed_loop_routed_p99_ms']} ms; "
        f"{f['closed_loop_missing']} not routed, {f['closed_loop_errors']} errors"
    )
    if capacity.first_error:
        print(f"  first error: {capacity.first_error}")
    met = "met" if f["targets_met"] else "NOT met"
    print(f"\ntarget: p99 submit -> routed < {TARGET_P99_MS:g} ms at {TARGET_RATE:g}/s: {met}")
    print(json.dumps(f))


# ---- main ------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="tickets/s, open loop")
    parser.add_argument("--seconds", type=float, default=20.0, help="of the open-loop load")
    parser.add_argument("--floor-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop submitters")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--households-per-group", type=int, default=4)
    args = parser.parse_args(argv)
    return Options(**vars(args))


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)

    async def measure(endpoints: Endpoints, pool: ProcessPoolExecutor, workdir: Path) -> Figures:
        return await run_benchmark(endpoints, options, pool)

    figures = run_on_own_servers(measure, warm_up_child)
    print_report(options, figures, summary(options, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

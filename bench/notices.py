"""Notices benchmark: a city-wide notice's first delivery to 300,000 households, and the read
receipts the service sustains afterwards.

    .venv/bin/python bench/notices.py [--households 300000] [--readers 32] [--read-seconds 10]

Starts its own servers (LocalStack in a temporary directory on free ports; an external server
named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS / CIVIC_S3_ENDPOINT is used instead) and, in
this process, the notices service as in production: gRPC server, outbox relay, registry
consumer and the delivery worker.

Seeding: the service's view of the registry is built from registry events, but not through
Kafka: the benchmark makes the civic.registry.v1 messages the registry would publish for the
city (UnitCreated for a city of 5 districts, 50 wards and 1,000 groups; HouseholdCreated and the
head's PersonRegistered for each household) and applies them with the same projection code the
service's registry consumer runs (RegistryView.apply_all), in bulk. The consumer path itself is
covered by the integration tests; going through the broker would only make the set-up longer.

Measured:
  fan-out  from the PublishNotice call (a city admin, the whole city) until GetReach answers
           with every household delivered and the first delivery complete: the delivery
           records written, the batches' events staged, and the reach queryable.
  reach    one GetReach over the whole city afterwards (an aggregation over the records).
  receipts closed loop, from a separate process: --readers residents of different households
           each OpenNotice one after another for --read-seconds; receipts/s is the receipts
           answered divided by the time.

The last line of output is one JSON object with the figures; "targets_met" is true when the
fan-out took under 30 s and every household was delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from civic.notices.v1 import notices_pb2, notices_pb2_grpc
from civic.registry.v1 import events_pb2 as registry_events
from civic.registry.v1 import registry_pb2
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from infra.benchmark import run_on_own_servers, say
from infra.local import Endpoints, isolated_settings
from services.common.auth import Role, mint_token
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.mongo import Document
from services.common.runtime import run_async
from services.notices.main import NoticesService

TARGET_FANOUT_S = 30.0
CITY = "dn"
SEED_CHUNK = 20_000
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Options:
    households: int
    readers: int
    read_seconds: float
    groups: int


@dataclass
class Figures:
    households: int
    seed_s: float
    publish_answer_ms: float
    fanout_s: float
    delivered: int
    reach_ms: float
    receipts: int
    receipt_errors: int
    read_seconds: float
    first_error: str
    load_average: float


# ---- the city, as registry events ---------------------------------------------------------------


def unit(unit_id: str, kind: registry_pb2.UnitKind.ValueType, parent: str) -> Message:
    return registry_events.UnitCreated(
        unit=registry_pb2.Unit(
            unit_id=unit_id, kind=kind, name=unit_id, parent_id=parent, active=True
        )
    )


def city_groups(groups: int) -> tuple[list[Message], list[str]]:
    """5 districts of 10 wards each, the groups shared out among the wards."""
    events: list[Message] = [unit(CITY, registry_pb2.UNIT_KIND_CITY, "")]
    wards = []
    for d in range(5):
        district = f"{CITY}.d{d}"
        events.append(unit(district, registry_pb2.UNIT_KIND_DISTRICT, CITY))
        for w in range(10):
            ward = f"{district}.w{w}"
            events.append(unit(ward, registry_pb2.UNIT_KIND_WARD, district))
            wards.append(ward)
    group_ids = []
    for g in range(groups):
        ward = wards[g % len(wards)]
        group = f"{ward}.g{g}"
        events.append(unit(group, registry_pb2.UNIT_KIND_GROUP, ward))
        group_ids.append(group)
    return events, group_ids


def household_events(index: int, group: str) -> list[Message]:
    household_id = f"hh-{index:07d}"
    return [
        registry_events.HouseholdCreated(
            household_id=household_id,
            unit_id=group,
            address=f"{index % 200 + 1} Kiệt {index % 97 + 1}",
            residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
            head_person_id=f"ps-{index:07d}",
        ),
        registry_events.PersonRegistered(
            person_id=f"ps-{index:07d}",
            household_id=household_id,
            unit_id=group,
            reason=registry_events.REGISTRATION_REASON_IMPORT,
            birth_date=f"{1940 + index % 60}-0{1 + index % 9}-1{index % 9}",
            sex=registry_pb2.SEX_MALE if index % 2 else registry_pb2.SEX_FEMALE,
            relationship=registry_pb2.RELATIONSHIP_HEAD,
            residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
        ),
    ]


async def seed(service: NoticesService, options: Options) -> float:
    started = time.perf_counter()
    units, groups = city_groups(options.groups)
    await service.store.view.apply_all(units)
    chunk: list[Message] = []
    for index in range(options.households):
        chunk += household_events(index, groups[index % len(groups)])
        if len(chunk) >= SEED_CHUNK:
            await service.store.view.apply_all(chunk)
            chunk = []
    await service.store.view.apply_all(chunk)
    return time.perf_counter() - started


# ---- read receipts, from a separate process -----------------------------------------------------


@dataclass(frozen=True)
class ReadLoad:
    target: str
    notice_id: str
    tokens: list[str]
    seconds: float


@dataclass(frozen=True)
class ReadResult:
    receipts: int
    errors: int
    seconds: float
    first_error: str


def run_reads(load: ReadLoad) -> ReadResult:
    return run_async(_reads(load))


async def _reads(load: ReadLoad) -> ReadResult:
    channels = [civic_channel(load.target, bearer) for bearer in load.tokens]
    stubs = [notices_pb2_grpc.NoticesServiceStub(c) for c in channels]
    done, errors, first_error = 0, 0, ""
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), READY_TIMEOUT_S)
    started = time.perf_counter()
    stop_at = started + load.seconds

    async def reader(stub: Any) -> None:
        nonlocal done, errors, first_error
        while time.perf_counter() < stop_at:
            try:
                await stub.OpenNotice(
                    notices_pb2.OpenNoticeRequest(
                        request_id=str(uuid.uuid4()), notice_id=load.notice_id
                    )
                )
                done += 1
            except grpc.aio.AioRpcError as error:
                errors += 1
                first_error = first_error or f"{error.code().name}: {error.details()}"

    await asyncio.gather(*(reader(stub) for stub in stubs))
    seconds = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return ReadResult(done, errors, seconds, first_error)


def warm_up_child() -> None:
    """Imports the child's modules before anything is measured."""


# ---- the run ------------------------------------------------------------------------------------


async def run_benchmark(
    endpoints: Endpoints, options: Options, pool: ProcessPoolExecutor
) -> Figures:
    settings = isolated_settings(endpoints, "bench")
    service = NoticesService(settings, sweep_interval_seconds=1.0)
    await service.start()
    try:
        say(f"seeding the registry view with {options.households:,} households")
        seed_s = await seed(service, options)
        say(f"seeded in {seed_s:.1f} s")
        secret = settings.auth_secret
        target = f"127.0.0.1:{service.port}"
        admin = notices_pb2_grpc.NoticesServiceStub(
            civic_channel(
                target, mint_token(secret, subject="bench-admin", role=Role.CITY_ADMIN, scope=CITY)
            )
        )
        load_average = os.getloadavg()[0]
        say("publishing the city-wide notice")
        started = time.perf_counter()
        published = await admin.PublishNotice(
            notices_pb2.PublishNoticeRequest(
                request_id=str(uuid.uuid4()),
                title="Cảnh báo bão: chuẩn bị ứng phó",
                body="Bão số 6 dự kiến đổ bộ đêm nay.\n- Gia cố nhà cửa\n- Chuẩn bị nước uống",
                priority=notices_pb2.PRIORITY_IMPORTANT,
                unit_id=CITY,
                requires_acknowledgement=True,
            )
        )
        answered = time.perf_counter()
        notice_id = published.notice.notice_id
        while True:
            got = await admin.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice_id))
            if got.notice.delivery_complete:
                reach = await admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice_id))
                break
            if time.perf_counter() - started > 600:
                raise RuntimeError("the first delivery did not complete within 10 minutes")
            await asyncio.sleep(0.25)
        fanout_s = time.perf_counter() - started
        say(f"delivered to {reach.total.delivered:,} households in {fanout_s:.1f} s")
        reach_started = time.perf_counter()
        reach = await admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice_id))
        reach_ms = (time.perf_counter() - reach_started) * 1000
        # Let the relay publish the delivery's events before the read load starts.
        while True:
            pending = await service.db["outbox"].count_documents({"pending": True})
            if not pending:
                break
            await asyncio.sleep(0.25)

        tokens = [
            mint_token(
                secret,
                subject=f"resident-{i}",
                role=Role.RESIDENT,
                scope=f"{CITY}",
                household_id=f"hh-{i * (options.households // options.readers):07d}",
            )
            for i in range(options.readers)
        ]
        say(f"read receipts: {options.readers} residents for {options.read_seconds:g} s")
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            pool, run_reads, ReadLoad(target, notice_id, tokens, options.read_seconds)
        )
        return Figures(
            households=options.households,
            seed_s=seed_s,
            publish_answer_ms=(answered - started) * 1000,
            fanout_s=fanout_s,
            delivered=reach.total.delivered,
            reach_ms=reach_ms,
            receipts=result.receipts,
            receipt_errors=result.errors,
            read_seconds=result.seconds,
            first_error=result.first_error,
            load_average=load_average,
        )
    finally:
        await service.stop()
        await drop_database(settings)


async def drop_database(settings: Settings) -> None:
    """An external MongoDB keeps nothing of the run; a LocalStack's goes with its directory."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(settings.mongo_uri)
    try:
        await client.drop_database(settings.database_for("notices"))
    finally:
        await client.close()


# ---- report -------------------------------------------------------------------------------------


def summary(f: Figures) -> dict[str, Any]:
    met = f.fanout_s < TARGET_FANOUT_S and f.delivered == f.households
    rate = f.receipts / f.read_seconds if f.read_seconds else 0.0
    return {
        "households": f.households,
        "fanout_s": round(f.fanout_s, 2),
        "fanout_households_per_s": round(f.delivered / f.fanout_s) if f.fanout_s else None,
        "delivered": f.delivered,
        "publish_answer_ms": round(f.publish_answer_ms, 1),
        "reach_query_ms": round(f.reach_ms, 1),
        "receipts_per_s": round(rate, 1),
        "receipts": f.receipts,
        "receipt_errors": f.receipt_errors,
        "seed_s": round(f.seed_s, 1),
        "load_average_1m": round(f.load_average, 2),
        "cpus": os.cpu_count(),
        "targets": {"fanout_s": TARGET_FANOUT_S},
        "targets_met": met,
    }


def print_report(options: Options, f: dict[str, Any], first_error: str) -> None:
    print(
        f"\nNotices benchmark: one city-wide notice to {f['households']:,} households in "
        f"{options.groups:,} groups; {f['cpus']} CPUs, load average "
        f"{f['load_average_1m']:.1f} before publishing\n"
    )
    rows = [
        ("fan-out: PublishNotice -> every record written, reach complete", f"{f['fanout_s']} s"),
        ("  households delivered", f"{f['delivered']:,}"),
        ("  households per second", f"{f['fanout_households_per_s']:,}"),
        ("  PublishNotice answer", f"{f['publish_answer_ms']} ms"),
        ("GetReach over the whole city, afterwards", f"{f['reach_query_ms']} ms"),
        (
            f"read receipts sustained ({options.readers} residents, closed loop)",
            f"{f['receipts_per_s']}/s",
        ),
        ("  receipts, errors", f"{f['receipts']:,}, {f['receipt_errors']}"),
        ("seeding the registry view (not measured)", f"{f['seed_s']} s"),
    ]
    for label, value in rows:
        print(f"  {label:<66}{value:>14}")
    if first_error:
        print(f"  first error: {first_error}")
    met = "met" if f["targets_met"] else "NOT met"
    print(f"\ntarget: fan-out to every household < {TARGET_FANOUT_S:g} s: {met}")
    print(json.dumps(f))


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--households", type=int, default=300_000)
    parser.add_argument("--groups", type=int, default=1_000)
    parser.add_argument("--readers", type=int, default=32, help="concurrent residents")
    parser.add_argument("--read-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    return Options(**vars(args))


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)

    async def measure(endpoints: Endpoints, pool: ProcessPoolExecutor, workdir: Path) -> Figures:
        return await run_benchmark(endpoints, options, pool)

    figures = run_on_own_servers(measure, warm_up_child)
    print_report(options, summary(figures), figures.first_error)
    return 0


if __name__ == "__main__":
    sys.exit(main())

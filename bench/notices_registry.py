"""Notices' registry-view consumer: how many civic.registry.v1 events a second the notices
service takes in, the way a city's onboarding brings them.

    .venv/bin/python -m bench.notices_registry [--households 2000] [--groups 100] [--live]

Starts its own servers (as bench/notices.py; an external server named by CIVIC_MONGO_URI /
KAFKA_BOOTSTRAP_SERVERS / CIVIC_S3_ENDPOINT is used instead) and the notices service in this
process. The city's units go through the topic first; with --live a city-wide notice is then
published, so every household arriving afterwards is delivered to late. Then each household's
HouseholdCreated and its head's PersonRegistered are produced, as the registry's relay would
(CloudEvents keyed by household), and timed from the first one sent until the service's
registry-view group has committed the topic's end.

The last line of output is one JSON object with the figures; this diagnostic has no target
of its own (the city benchmark's load time is the target it serves).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer
from civic.notices.v1 import notices_pb2, notices_pb2_grpc
from google.protobuf.message import Message

from bench.notices import CITY, city_groups, household_events
from infra.benchmark import run_on_own_servers, say
from infra.local import Endpoints, isolated_settings
from services.common.auth import Role, mint_token
from services.common.cloudevents import CloudEvent, type_name
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.outbox import new_event_id
from services.demo_day import consumers_caught_up
from services.notices.events import REGISTRY_TOPIC
from services.notices.main import NAME, NoticesService


@dataclass(frozen=True)
class Options:
    households: int
    groups: int
    live: bool


@dataclass
class Figures:
    events: int
    seconds: float
    events_per_s: float
    live_notice: bool
    delivered: int


def record(message: Message, key: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    event = CloudEvent(
        id=new_event_id(),
        type=type_name(message),
        source="civic.registry",
        time=datetime.now(UTC),
        data=message.SerializeToString(),
        subject=key,
    )
    return event.data, [(k, v.encode()) for k, v in event.kafka_headers().items()]


async def produce(settings: Settings, keyed: list[tuple[str, Message]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=5, acks="all"
    )
    await producer.start()
    try:
        sent = []
        for key, message in keyed:
            value, headers = record(message, key)
            sent.append(
                await producer.send(REGISTRY_TOPIC, value, key=key.encode(), headers=headers)
            )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def run_benchmark(endpoints: Endpoints, options: Options) -> Figures:
    settings = isolated_settings(endpoints, "bench")
    group = settings.consumer_group(NAME, "registry-view")
    service = NoticesService(settings, sweep_interval_seconds=1.0)
    await service.start()
    try:
        units, groups = city_groups(options.groups)
        await produce(settings, [(CITY, u) for u in units])
        await consumers_caught_up(settings, REGISTRY_TOPIC, [group])
        notice_id = ""
        if options.live:
            bearer = mint_token(
                settings.auth_secret, subject="bench-admin", role=Role.CITY_ADMIN, scope=CITY
            )
            async with civic_channel(f"127.0.0.1:{service.port}", bearer) as channel:
                published = await notices_pb2_grpc.NoticesServiceStub(channel).PublishNotice(
                    notices_pb2.PublishNoticeRequest(
                        request_id=str(uuid.uuid4()),
                        title="Lịch cắt nước",
                        body="Thứ Năm, 8 giờ đến 16 giờ.",
                        priority=notices_pb2.PRIORITY_NORMAL,
                        unit_id=CITY,
                    )
                )
            notice_id = published.notice.notice_id
        keyed = [
            (f"hh-{index:07d}", message)
            for index in range(options.households)
            for message in household_events(index, groups[index % len(groups)])
        ]
        say(f"{len(keyed):,} registry events for {options.households:,} households")
        started = time.perf_counter()
        await produce(settings, keyed)
        await consumers_caught_up(settings, REGISTRY_TOPIC, [group])
        seconds = time.perf_counter() - started
        delivered = (
            await service.store.deliveries.count_documents({"notice_id": notice_id, "late": True})
            if notice_id
            else 0
        )
        return Figures(
            len(keyed),
            round(seconds, 2),
            round(len(keyed) / seconds, 1),
            bool(notice_id),
            delivered,
        )
    finally:
        await service.stop()


def warm_up_child() -> None:
    """Nothing runs in the child; the pool is the harness's."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--households", type=int, default=2_000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--live", action="store_true", help="a city-wide notice is live")
    options = Options(**vars(parser.parse_args(argv)))

    async def measure(endpoints: Endpoints, pool: ProcessPoolExecutor, workdir: Path) -> Figures:
        return await run_benchmark(endpoints, options)

    figures = run_on_own_servers(measure, warm_up_child)
    print("\nNotices' registry-view consumer, catching up with the registry's events\n")
    print(f"{'events':>10}{'seconds':>10}{'events/s':>10}  notice live")
    print(f"{figures.events:>10,}{figures.seconds:>10}{figures.events_per_s:>10,}  {options.live}")
    # A diagnostic behind the city benchmark's catch-up time: no target of its own.
    print(json.dumps(asdict(figures) | {"targets": {}, "targets_met": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

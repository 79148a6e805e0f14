"""The process-kill test of the first delivery: the notices service runs as a real process that
dies after writing a batch of delivery records and before moving the notice's marker past them;
started again, it completes the delivery with one record and one announcement per household."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from civic.notices.v1 import events_pb2, notices_pb2
from civic.registry.v1 import events_pb2 as registry_events
from civic.registry.v1 import registry_pb2
from google.protobuf.message import Message
from pymongo.asynchronous.database import AsyncDatabase

from infra.local import free_port
from services.common.auth import Role
from services.common.config import Settings
from services.common.mongo import Document, mongo_client
from services.common.runtime import FAULT_EXIT_CODE
from services.notices.delivery import FANOUT_BATCH
from services.notices.main import NAME
from services.notices.store import NoticeStore
from tests.conftest import token
from tests.kafka_reader import eventually
from tests.notices.conftest import NoticeCaller, rid
from tests.service_process import ServiceProcess, service_env

CRASH_MID_DELIVERY = "CIVIC_FAULT_CRASH_MID_DELIVERY"
# More than one batch: the crash comes after the first.
HOUSEHOLDS = FANOUT_BATCH + 700


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[tuple[str, AsyncDatabase[Document]]]:
    prefix = f"crash{uuid.uuid4().hex[:8]}"
    own = settings.model_copy(update={"database_prefix": prefix})
    client = mongo_client(settings.mongo_uri)
    database = client[own.database_for(NAME)]
    try:
        yield prefix, database
    finally:
        await client.drop_database(database.name)
        await client.close()


def the_city(city: str) -> list[Message]:
    """What the registry would have published about a city with one group of households."""
    group = f"{city}.hc.hc1.g17"
    units: list[Message] = [
        registry_events.UnitCreated(
            unit=registry_pb2.Unit(unit_id=unit_id, kind=kind, parent_id=parent, active=True)
        )
        for unit_id, kind, parent in (
            (city, registry_pb2.UNIT_KIND_CITY, ""),
            (f"{city}.hc", registry_pb2.UNIT_KIND_DISTRICT, city),
            (f"{city}.hc.hc1", registry_pb2.UNIT_KIND_WARD, f"{city}.hc"),
            (group, registry_pb2.UNIT_KIND_GROUP, f"{city}.hc.hc1"),
        )
    ]
    households: list[Message] = []
    for i in range(HOUSEHOLDS):
        household_id = f"hh-{city}-{i:05d}"
        households += [
            registry_events.HouseholdCreated(household_id=household_id, unit_id=group),
            registry_events.PersonRegistered(
                person_id=f"ps-{city}-{i:05d}", household_id=household_id, unit_id=group
            ),
        ]
    return units + households


async def test_a_crash_mid_delivery_completes_on_restart_without_duplicates(
    settings: Settings, tmp_path: Path, db: tuple[str, AsyncDatabase[Document]]
) -> None:
    prefix, database = db
    store = NoticeStore(database)
    city = "c" + uuid.uuid4().hex[:8]
    await store.view.apply_all(the_city(city))
    port = free_port()

    def process(*faults: str) -> ServiceProcess:
        env = service_env(settings, prefix, port, **dict.fromkeys(faults, "1"))
        return ServiceProcess("notices", env, tmp_path / f"notices{faults}.log")

    async with process(CRASH_MID_DELIVERY) as crashing:
        admin = NoticeCaller(crashing.target, token(Role.CITY_ADMIN, city))
        published = await admin.PublishNotice(
            notices_pb2.PublishNoticeRequest(
                request_id=rid(),
                title="Cảnh báo ngập lụt",
                body="Di dời đồ đạc lên cao.",
                priority=notices_pb2.PRIORITY_EMERGENCY,
                unit_id=city,
            )
        )
        notice_id = published.notice.notice_id
        assert await crashing.exited() == FAULT_EXIT_CODE, crashing.describe()

    # The first batch's records are there; the marker and the events are not.
    assert await store.deliveries.count_documents({"notice_id": notice_id}) == FANOUT_BATCH
    notice = await store.get(notice_id)
    assert notice is not None and notice["fanout"]["delivered"] == 0
    assert notice["fanout_pending"]

    async with process() as restarted:
        admin = NoticeCaller(restarted.target, token(Role.CITY_ADMIN, city))

        async def complete() -> bool:
            got = await admin.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice_id))
            return bool(got.notice.delivery_complete)

        await eventually(complete, what="the first delivery completed after the restart")
        reach = await admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice_id))
        assert reach.total.delivered == HOUSEHOLDS
        assert await restarted.stop() == 0, restarted.describe()

    records = await store.deliveries.find({"notice_id": notice_id}, {"household_id": 1}).to_list()
    assert len(records) == HOUSEHOLDS
    assert len({r["household_id"] for r in records}) == HOUSEHOLDS
    named: Counter[str] = Counter()
    async for entry in database["outbox"].find({"events.key": notice_id}):
        for event in entry["events"]:
            if event["type"] == events_pb2.NoticeDelivered.DESCRIPTOR.full_name:
                named.update(
                    events_pb2.NoticeDelivered.FromString(bytes(event["data"])).household_ids
                )
    assert len(named) == HOUSEHOLDS and set(named.values()) == {1}

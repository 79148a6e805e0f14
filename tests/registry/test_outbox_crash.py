"""The process-kill tests of the transactional outbox: the registry runs as a real process that
dies at an injected fault point in the relay, then restarts; nothing committed is lost, and the
de-duplicating consumer records each event once however often it was published."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from civic.registry.v1 import registry_pb2
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from infra.local import free_port
from services.common.auth import Role
from services.common.config import Settings
from services.common.consumer import PROCESSED
from services.common.mongo import Document, mongo_client
from services.common.outbox import LEASE, OUTBOX
from services.common.runtime import FAULT_EXIT_CODE
from services.registry.events import TOPIC
from services.registry.main import NAME
from tests.conftest import token
from tests.kafka_reader import Record, TopicReader, eventually, wait_consumed
from tests.registry_fixtures import Caller, citizen_id, create_unit, person, rid
from tests.service_process import ServiceProcess, service_env

CRASH_BEFORE_PUBLISH = "CIVIC_FAULT_CRASH_BEFORE_PUBLISH"
CRASH_AFTER_PUBLISH = "CIVIC_FAULT_CRASH_AFTER_PUBLISH"
HOUSEHOLD_CREATED = "civic.registry.v1.HouseholdCreated"
PERSON_REGISTERED = "civic.registry.v1.PersonRegistered"


class Deployment:
    """One registry deployment of its own: a fresh database prefix and a fixed gRPC port, so a
    restarted process is the same instance (and takes over its own relay lease)."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.prefix = f"crash{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.starts = 0
        # What the process derives from its environment, for the test to look at.
        own = settings.model_copy(update={"database_prefix": self.prefix})
        self.history_group = own.consumer_group(NAME, "household-history")
        self.client: AsyncMongoClient[Document] = mongo_client(settings.mongo_uri)
        self.db: AsyncDatabase[Document] = self.client[own.database_for(NAME)]

    def env(self, *faults: str) -> dict[str, str]:
        return service_env(self.settings, self.prefix, self.port, **dict.fromkeys(faults, "1"))

    def process(self, *faults: str) -> ServiceProcess:
        self.starts += 1
        name = "-".join(["registry", str(self.starts), *(f.rsplit("_", 2)[-2] for f in faults)])
        return ServiceProcess(NAME, self.env(*faults), self.tmp_path / f"{name}.log")

    async def group(self) -> str:
        """A city down to one residential group, built by a healthy process whose events are all
        relayed before it stops (a pending one would trip the next process's fault at once)."""
        async with self.process() as registry:
            code = "c" + uuid.uuid4().hex[:8]
            admin = Caller(registry.target, token(Role.CITY_ADMIN, code))
            city = await create_unit(admin, "", code, "Đà Nẵng", registry_pb2.UNIT_KIND_CITY)
            district = await create_unit(
                admin, city, "hc", "Hải Châu", registry_pb2.UNIT_KIND_DISTRICT
            )
            ward = await create_unit(
                admin, district, "hc1", "Hải Châu 1", registry_pb2.UNIT_KIND_WARD
            )
            group = await create_unit(
                admin, ward, "g17", "Tổ dân phố 17", registry_pb2.UNIT_KIND_GROUP
            )
            await admin.channel.close()
            await self.wait_no_pending()
            assert await registry.stop() == 0, registry.describe()
        return group

    async def wait_no_pending(self) -> None:
        async def none_pending() -> bool:
            return not await self.db[OUTBOX].count_documents({"pending": True})

        await eventually(none_pending, what="every outbox entry relayed")

    async def close(self) -> None:
        await self.client.drop_database(self.db.name)
        await self.client.close()


@pytest.fixture
async def deployment(settings: Settings, tmp_path: Path) -> AsyncIterator[Deployment]:
    found = Deployment(settings, tmp_path)
    try:
        yield found
    finally:
        await found.close()


def create_household(group: str) -> registry_pb2.CreateHouseholdRequest:
    born = "1972-08-19"
    return registry_pb2.CreateHouseholdRequest(
        request_id=rid(),
        unit_id=group,
        address="21 Kiệt 9 Nguyễn Chí Thanh",
        housing=registry_pb2.Housing(floor_area_m2=70.0, storeys=2, sub_households=1),
        residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
        head=person(
            "Đặng Văn Hùng",
            born,
            registry_pb2.SEX_MALE,
            citizen_id(born, registry_pb2.SEX_MALE),
            registry_pb2.RELATIONSHIP_HEAD,
        ),
    )


async def create_and_crash(deployment: Deployment, group: str, fault: str) -> tuple[str, Document]:
    """CreateHousehold on a process that dies at `fault` right after committing it.

    Returns the household id and its outbox entry, as committed in MongoDB.
    """
    request = create_household(group)
    async with deployment.process(fault) as registry:
        leader = Caller(registry.target, token(Role.GROUP_LEADER, group))
        try:
            response: registry_pb2.CreateHouseholdResponse | None = await leader.CreateHousehold(
                request, timeout=15
            )
        except grpc.aio.AioRpcError as error:
            # The relay runs right after the commit: the process may die before it answers.
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            response = None
        finally:
            await leader.channel.close()
        assert await registry.exited() == FAULT_EXIT_CODE, registry.describe()
        assert "fault injection" in registry.describe()

    # The command was committed either way.
    households = await deployment.db["households"].find({"unit_id": group}).to_list()
    assert len(households) == 1
    household = households[0]
    if response is not None:
        assert response.household.household_id == household["_id"]
    entries = await deployment.db[OUTBOX].find({"events.key": household["_id"]}).to_list()
    assert len(entries) == 1
    [entry] = entries
    assert [(e["type"], e["key"]) for e in entry["events"]] == [
        (HOUSEHOLD_CREATED, household["_id"]),
        (PERSON_REGISTERED, household["head_person_id"]),
    ]
    # Committed, and not marked sent: the relay never got that far.
    assert entry.get("pending") is True
    assert "sent_at" not in entry
    return household["_id"], entry


async def relay_owner(deployment: Deployment) -> str:
    lease = await deployment.db[LEASE].find_one({"_id": "relay"})
    assert lease is not None
    return str(lease["owner"])


def copies(records: list[Record], event_ids: list[str]) -> Counter[str]:
    return Counter(r.event_id for r in records if r.event_id in event_ids)


def expected_records(entry: Document) -> dict[str, tuple[str, str]]:
    """Each staged event's (ce_type, record key), by event id."""
    return {e["_id"]: (e["type"], e["key"]) for e in entry["events"]}


async def assert_history_once(
    deployment: Deployment,
    registry: ServiceProcess,
    group: str,
    household_id: str,
    entry: Document,
) -> None:
    """The registry's own projection holds exactly one line per event, through the API and in
    its database, and has a processed marker for each."""
    event_ids = [e["_id"] for e in entry["events"]]
    leader = Caller(registry.target, token(Role.GROUP_LEADER, group))
    try:
        history = await leader.GetHouseholdHistory(
            registry_pb2.GetHouseholdHistoryRequest(household_id=household_id)
        )
    finally:
        await leader.channel.close()
    assert Counter(e.event_id for e in history.entries) == Counter(event_ids)
    stored = await deployment.db["household_history"].find({"household_id": household_id}).to_list()
    assert Counter(h["event_id"] for h in stored) == Counter(event_ids)
    markers = [f"{deployment.history_group}:{event_id}" for event_id in event_ids]
    assert await deployment.db[PROCESSED].count_documents({"_id": {"$in": markers}}) == len(markers)


async def wait_sent(deployment: Deployment, entry: Document) -> None:
    await eventually(
        lambda: deployment.db[OUTBOX].find_one(
            {"_id": entry["_id"], "pending": {"$exists": False}, "sent_at": {"$exists": True}}
        ),
        what=f"outbox entry {entry['_id']} marked sent",
        within=30,
    )


async def test_crash_before_publish_then_restart_publishes_exactly_once(
    deployment: Deployment, settings: Settings
) -> None:
    group = await deployment.group()
    household_id, entry = await create_and_crash(deployment, group, CRASH_BEFORE_PUBLISH)
    crashed_owner = await relay_owner(deployment)
    event_ids = [e["_id"] for e in entry["events"]]
    keys = [e["key"] for e in entry["events"]]

    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        # Nothing reached Kafka: the process died before publishing.
        before = await reader.read_to_end()
        assert not copies(before, event_ids)
        assert not [r for r in before if r.key_text in keys]

        # Restarted without the fault, the same instance relays the committed events: it holds
        # the lease under the same name, so it need not wait for the dead one's lease to expire.
        async with deployment.process() as registry:
            await wait_sent(deployment, entry)
            assert await relay_owner(deployment) == crashed_owner
            after = await reader.read_to_end()
            assert copies(after, event_ids) == Counter(event_ids)  # once each
            ours = [r for r in after if r.event_id in event_ids]
            assert {r.event_id: (r.event_type, r.key_text) for r in ours} == expected_records(entry)

            await wait_consumed(
                settings.kafka_bootstrap_servers,
                deployment.history_group,
                ours,
                topic=TOPIC,
                within=45,
            )
            await assert_history_once(deployment, registry, group, household_id, entry)
            assert await registry.stop() == 0, registry.describe()


async def test_crash_after_publish_republishes_and_the_consumer_records_once(
    deployment: Deployment, settings: Settings
) -> None:
    group = await deployment.group()
    household_id, entry = await create_and_crash(deployment, group, CRASH_AFTER_PUBLISH)
    event_ids = [e["_id"] for e in entry["events"]]

    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        # Published (the relay waited for the broker's acks) but never marked sent.
        before = await reader.read_to_end()
        assert copies(before, event_ids) == Counter(event_ids)

        async with deployment.process() as registry:
            await wait_sent(deployment, entry)
            after = await reader.read_to_end()
            # At least once: the restarted relay published the same events again, same ce_id.
            assert copies(after, event_ids) == Counter(event_ids * 2)
            ours = [r for r in after if r.event_id in event_ids]
            for event_id in event_ids:
                first, second = [r for r in ours if r.event_id == event_id]
                assert first.key == second.key
                assert first.value == second.value
                ce = {k: v for k, v in first.headers if k.startswith("ce_")}
                assert ce == {k: v for k, v in second.headers if k.startswith("ce_")}
                assert (first.partition, first.offset) != (second.partition, second.offset)

            # Once the group has consumed both copies, the projection still has one line each.
            await wait_consumed(
                settings.kafka_bootstrap_servers,
                deployment.history_group,
                ours,
                topic=TOPIC,
                within=45,
            )
            await assert_history_once(deployment, registry, group, household_id, entry)
            assert await registry.stop() == 0, registry.describe()

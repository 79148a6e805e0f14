"""Scale-out: two registry instances side by side in one consumer group split the household-history
work between them; one is killed mid-load and restarted as the same instance, and every event is
still handled exactly once — nothing twice, nothing lost."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

from civic.registry.v1 import registry_pb2

from infra.local import free_port
from services.common.auth import Role
from services.common.broker import PROCESSED
from services.common.config import Settings
from services.common.mongo import mongo_client
from services.common.outbox import OUTBOX
from services.registry.main import NAME
from tests.conftest import token
from tests.kafka_reader import eventually
from tests.registry_fixtures import Caller, create_unit, new_household
from tests.service_process import ServiceProcess, service_env

HOUSEHOLDS = 60
SUBMITTERS = 4
UNIT_CREATED = "civic.registry.v1.UnitCreated"


async def test_two_instances_split_the_work_and_a_killed_one_repeats_and_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    prefix = f"scale{uuid.uuid4().hex[:8]}"
    own = settings.model_copy(update={"database_prefix": prefix})
    history_group = own.consumer_group(NAME, "household-history")
    ports = (free_port(), free_port())
    starts = Counter[int]()

    def instance(number: int) -> ServiceProcess:
        starts[number] += 1
        # A fixed instance id per place: the restarted one takes its own place in the group back.
        env = service_env(settings, prefix, ports[number], CIVIC_INSTANCE_ID=f"registry-{number}")
        return ServiceProcess(NAME, env, tmp_path / f"registry-{number}-{starts[number]}.log")

    client = mongo_client(settings.mongo_uri)
    db = client[own.database_for(NAME)]
    first, second = instance(0), instance(1)
    try:
        await first.__aenter__()
        await second.__aenter__()
        code = "c" + uuid.uuid4().hex[:8]
        admin = Caller(first.target, token(Role.CITY_ADMIN, code))
        unit = ""
        for parent_code, name, kind in (
            (code, "Đà Nẵng", registry_pb2.UNIT_KIND_CITY),
            ("hc", "Hải Châu", registry_pb2.UNIT_KIND_DISTRICT),
            ("hc1", "Hải Châu 1", registry_pb2.UNIT_KIND_WARD),
            ("g17", "Tổ dân phố 17", registry_pb2.UNIT_KIND_GROUP),
        ):
            unit = await create_unit(admin, unit, parent_code, name, kind)
        leader = Caller(first.target, token(Role.GROUP_LEADER, unit))

        created = 0
        a_third, two_thirds = asyncio.Event(), asyncio.Event()

        async def submitter() -> None:
            nonlocal created
            while created < HOUSEHOLDS:
                created += 1
                await new_household(leader, unit, head_name=f"Nguyễn Văn Số {created}")
                if created >= HOUSEHOLDS // 3:
                    a_third.set()
                if created >= 2 * HOUSEHOLDS // 3:
                    two_thirds.set()

        async def kill_and_restart() -> None:
            nonlocal second
            await a_third.wait()
            second.kill()  # mid-load, whatever it was doing
            await second.end()
            await two_thirds.wait()
            second = instance(1)
            await second.__aenter__()

        await asyncio.gather(kill_and_restart(), *(submitter() for _ in range(SUBMITTERS)))
        await admin.channel.close()
        await leader.channel.close()

        committed = [
            (event["_id"], event["type"])
            async for entry in db[OUTBOX].find()
            for event in entry["events"]
        ]
        # Each household: HouseholdCreated and its head's PersonRegistered.
        of_households = [event_id for event_id, kind in committed if kind != UNIT_CREATED]
        assert len(of_households) == 2 * HOUSEHOLDS

        # The topic is shared with every other deployment on this broker: look at ours.
        ours = {"_id": {"$in": [f"{history_group}:{event_id}" for event_id, _ in committed]}}

        async def all_handled() -> bool:
            return await db[PROCESSED].count_documents(ours) == len(committed)

        # A transaction the killed instance left open holds its documents until MongoDB ends it.
        await eventually(all_handled, what="every event in the household history", within=120)

        households = await db["households"].distinct("_id", {"unit_id": unit})
        lines = db["household_history"].find({"household_id": {"$in": households}})
        history = Counter([line["event_id"] async for line in lines])
        assert history == Counter(of_households), "an event handled twice or not at all"
        by_instance = Counter([marker["by"] async for marker in db[PROCESSED].find(ours)])
        assert set(by_instance) == {"registry-0", "registry-1"}, by_instance
    finally:
        await second.end()
        await first.end()
        await client.drop_database(db.name)
        await client.close()

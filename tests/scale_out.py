"""Scale-out under load: two instances of one service side by side in a deployment of their own
(its databases and consumer groups are nobody else's); the second is killed mid-load and started
again as itself, and the processed-event markers tell which instance handled each event."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from types import TracebackType

from pymongo.asynchronous.database import AsyncDatabase

from infra.local import free_port
from services.common.config import Settings
from services.common.consumer import PROCESSED
from services.common.mongo import Document, mongo_client
from services.common.outbox import OUTBOX
from tests.kafka_reader import eventually
from tests.registry_fixtures import City, new_household
from tests.service_process import ServiceProcess, service_env

CALLERS = 4
# A transaction the killed instance left open holds its documents until MongoDB ends it.
HANDLED_WITHIN = 120.0
# A new deployment's consumer groups read their topics from the beginning first.
CAUGHT_UP_WITHIN = 60.0


class Deployment:
    """Service processes on the test servers under a database prefix of their own; everything
    they leave in MongoDB goes when the deployment ends."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.prefix = f"scale{uuid.uuid4().hex[:8]}"
        self.settings = settings
        self.own = settings.model_copy(update={"database_prefix": self.prefix})
        self.client = mongo_client(settings.mongo_uri)
        self._logs = logs
        self._ports: dict[str, int] = {}
        self._starts = Counter[str]()
        self._services: set[str] = set()
        self._running: list[ServiceProcess] = []

    async def __aenter__(self) -> Deployment:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for process in reversed(self._running):
            await process.end()
        for service in self._services:
            await self.client.drop_database(self.own.database_for(service))
        await self.client.close()

    def db(self, service: str) -> AsyncDatabase[Document]:
        return self.client[self.own.database_for(service)]

    def group(self, service: str, purpose: str) -> str:
        return self.own.consumer_group(service, purpose)

    async def start(self, service: str, instance: str, **env: str) -> ServiceProcess:
        """`instance` of `service`, serving; started again, it keeps its id and its port."""
        self._services.add(service)
        self._starts[instance] += 1
        port = self._ports.setdefault(instance, free_port())
        log = self._logs / f"{instance}-{self._starts[instance]}.log"
        process = ServiceProcess(
            service,
            # A fixed instance id: a restarted instance takes its own place in the group back.
            service_env(self.settings, self.prefix, port, CIVIC_INSTANCE_ID=instance, **env),
            log,
        )
        await process.__aenter__()
        self._running.append(process)
        return process

    async def knows_units(self, service: str, *unit_ids: str) -> None:
        """Once `service`'s view of the registry has these units (each on its own partition)."""
        units = self.db(service)["units"]

        async def known() -> bool:
            return await units.count_documents({"_id": {"$in": unit_ids}}) == len(unit_ids)

        await eventually(
            known, what=f"units {unit_ids} in the {service} view", within=CAUGHT_UP_WITHIN
        )

    async def side_by_side(self, service: str, **env: str) -> SideBySide:
        pair = SideBySide(self, service, env)
        pair.first = await self.start(service, pair.instances[0], **env)
        pair.second = await self.start(service, pair.instances[1], **env)
        return pair


class SideBySide:
    """Two instances of one service in the same consumer groups. Load goes through the first;
    the second is the one killed."""

    first: ServiceProcess
    second: ServiceProcess

    def __init__(self, deployment: Deployment, service: str, env: dict[str, str]) -> None:
        self.deployment = deployment
        self.service = service
        self.instances = (f"{service}-0", f"{service}-1")
        self._env = env

    async def under_load(self, count: int, make: Callable[[int], Awaitable[object]]) -> None:
        """`make(0)` … `make(count - 1)` from concurrent callers; the second instance is killed
        (SIGKILL, whatever it is doing) once a third are made, and started again as itself once
        two thirds are."""
        made = 0
        a_third, two_thirds = asyncio.Event(), asyncio.Event()
        numbers = iter(range(count))

        async def caller() -> None:
            nonlocal made
            for number in numbers:
                await make(number)
                made += 1
                if made >= count // 3:
                    a_third.set()
                if made >= 2 * count // 3:
                    two_thirds.set()

        async def kill_and_restart() -> None:
            await a_third.wait()
            self.second.kill()
            await self.second.end()
            await two_thirds.wait()
            self.second = await self.deployment.start(self.service, self.instances[1], **self._env)

        # A failing call ends the others too, and the restart waiting for its turn.
        async with asyncio.TaskGroup() as load:
            load.create_task(kill_and_restart())
            for _ in range(CALLERS):
                load.create_task(caller())

    async def handled(self, group: str, event_ids: Collection[str]) -> Counter[str]:
        """How many of `event_ids` each instance handled in `group`, once every one has been.
        Other deployments' events share the topics: only these are counted."""
        processed = self.deployment.db(self.service)[PROCESSED]
        ours = {"_id": {"$in": [f"{group}:{event_id}" for event_id in event_ids]}}

        async def all_handled() -> bool:
            return await processed.count_documents(ours) == len(event_ids)

        await eventually(all_handled, what=f"every event handled in {group}", within=HANDLED_WITHIN)
        return Counter([marker["by"] async for marker in processed.find(ours)])


async def households_through_the_registry_view(
    pair: SideBySide, city: City, count: int, place: Callable[[int], object]
) -> list[str]:
    """`count` households filed in `city`'s group (household n at `place(n)`) while `pair`
    follows the registry; once its registry-view group has handled every registry event of the
    deployment, the households' ids. Both instances must have handled some."""
    leader = city.leader
    await pair.under_load(
        count, lambda number: new_household(leader, city.group, location=place(number))
    )
    await leader.channel.close()
    deployment = pair.deployment
    from_registry = await committed_events(deployment.db("registry"))
    group = deployment.group(pair.service, "registry-view")
    by_instance = await pair.handled(group, [event["_id"] for event in from_registry])
    assert set(by_instance) == set(pair.instances), by_instance
    households: list[str] = await deployment.db("registry")["households"].distinct("_id")
    assert len(households) == count
    return households


async def committed_events(db: AsyncDatabase[Document]) -> list[Document]:
    """Every event a service's transactions committed, in commit order."""
    return [event async for entry in db[OUTBOX].find().sort("_id") for event in entry["events"]]

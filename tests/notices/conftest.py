"""The notices service in-process beside the registry, whose events build its view of units,
households and residents; a small town of households to send notices to."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import grpc
import pytest
from civic.notices.v1 import events_pb2, notices_pb2, notices_pb2_grpc
from civic.registry.v1 import registry_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from infra.local import free_port
from services.common.auth import Role
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.notices.main import NoticesService
from tests.conftest import Clock, token
from tests.kafka_reader import eventually
from tests.registry_fixtures import City, new_household, rid

__all__ = ["eventually", "rid"]

# A small fan-out batch, so even a test's few households take several batches.
FANOUT_BATCH = 3


@pytest.fixture(scope="session")
async def notices_service(
    settings: Settings, session_clock: Clock, span_processor: SimpleSpanProcessor
) -> AsyncIterator[NoticesService]:
    service = NoticesService(
        settings.model_copy(update={"grpc_port": free_port()}),
        clock=session_clock,
        span_processor=span_processor,
        sweep_interval_seconds=0.2,
        fanout_batch=FANOUT_BATCH,
    )
    await service.start()
    yield service
    await service.stop()


class NoticeCaller:
    def __init__(self, target: str, bearer: str) -> None:
        self.channel = civic_channel(target, bearer)
        self.stub = notices_pb2_grpc.NoticesServiceStub(self.channel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)


async def refused(code: grpc.StatusCode, call: Awaitable[Any], field: str = "") -> str:
    """The call fails with `code` (and, for bad input, a message starting with the field)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = caught.value.details() or ""
    assert caught.value.code() == code, details
    if field:
        assert details.startswith(f"{field}:"), details
    return details


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


@dataclass(eq=False)
class Town:
    """The registry's city, households in its two groups, and notices callers."""

    city: City
    service: NoticesService
    target: str
    # Group -> its households, in creation order.
    households: dict[str, list[str]] = field(default_factory=dict)
    residents: dict[str, NoticeCaller] = field(default_factory=dict)

    def caller(self, role: Role, scope: str, household_id: str = "") -> NoticeCaller:
        return NoticeCaller(self.target, token(role, scope, household_id))

    def resident(self, household_id: str) -> NoticeCaller:
        """The household's resident (kept: a channel closes once nothing holds it)."""
        if household_id not in self.residents:
            group = next(g for g, hs in self.households.items() if household_id in hs)
            self.residents[household_id] = self.caller(Role.RESIDENT, group, household_id)
        return self.residents[household_id]

    @cached_property
    def leader(self) -> NoticeCaller:
        return self.caller(Role.GROUP_LEADER, self.city.group)

    @cached_property
    def other_leader(self) -> NoticeCaller:
        return self.caller(Role.GROUP_LEADER, self.city.other_group)

    @cached_property
    def ward_officer(self) -> NoticeCaller:
        return self.caller(Role.WARD_OFFICER, self.city.ward)

    @cached_property
    def admin(self) -> NoticeCaller:
        return self.caller(Role.CITY_ADMIN, self.city.city)

    @property
    def everyone(self) -> list[str]:
        return [h for hs in self.households.values() for h in hs]

    async def add_household(self, group: str, **fields: Any) -> str:
        """A household (with its head) through the registry, once this service has it."""
        created = await new_household(
            self.city.leader if group == self.city.group else self.city.ward_officer,
            group,
            **fields,
        )
        household_id = created.household.household_id
        self.households.setdefault(group, []).append(household_id)
        await self.known(household_id, residents=1)
        return household_id

    async def add_member(self, household_id: str, born: str, sex: int) -> None:
        details = registry_pb2.PersonDetails(
            full_name="Lê Văn Cường",
            birth_date=born,
            sex=sex,  # type: ignore[arg-type]
            relationship=registry_pb2.RELATIONSHIP_CHILD,
        )
        await self.city.ward_officer.RegisterPerson(
            registry_pb2.RegisterPersonRequest(
                request_id=rid(), household_id=household_id, person=details
            )
        )
        view = self.service.store.view
        count = await view.persons.count_documents({"household_id": household_id})
        await self.known(household_id, residents=count + 1)

    async def empty(self, household_id: str) -> None:
        """Its only resident moves out of the area, and the household's notices go with them."""
        head = await self.service.store.view.persons.find_one({"household_id": household_id})
        assert head is not None
        await self.city.ward_officer.MoveOut(
            registry_pb2.MoveOutRequest(request_id=rid(), person_id=head["_id"], destination="Huế")
        )

        async def gone() -> bool:
            return await self.inbox(household_id) == []

        await eventually(gone, what=f"the notices of the emptied household {household_id}")

    async def empty_of_head(self, household_id: str) -> None:
        """The head moves out of the area; whoever else lives there stays."""
        view = self.service.store.view
        before = await view.persons.count_documents({"household_id": household_id})
        head = await view.persons.find_one(
            {"household_id": household_id, "stay_end": {"$in": ["", None]}}
        )
        assert head is not None
        await self.city.ward_officer.MoveOut(
            registry_pb2.MoveOutRequest(request_id=rid(), person_id=head["_id"], destination="Huế")
        )

        async def left() -> bool:
            household = await view.household(household_id)
            return household is not None and household.get("residents") == before - 1

        await eventually(left, what=f"the head of {household_id} gone from the notices view")

    async def known(self, household_id: str, residents: int) -> None:
        view = self.service.store.view

        async def projected() -> bool:
            household = await view.household(household_id)
            return (
                household is not None
                and "unit_id" in household
                and household.get("residents", 0) >= residents
            )

        await eventually(projected, what=f"household {household_id} in the notices view")

    async def publish(
        self, caller: NoticeCaller | None = None, unit_id: str = "", **fields: Any
    ) -> notices_pb2.Notice:
        request = notices_pb2.PublishNoticeRequest(
            request_id=rid(),
            title=fields.pop("title", "Ngày tiêm chủng tại phường"),
            body=fields.pop("body", "Thứ Bảy này, 7 giờ sáng, tại nhà văn hoá tổ.\n- Mang sổ tiêm"),
            priority=fields.pop("priority", notices_pb2.PRIORITY_NORMAL),
            unit_id=unit_id or self.city.ward,
            **fields,
        )
        response = await (caller or self.ward_officer).PublishNotice(request)
        notice: notices_pb2.Notice = response.notice
        return notice

    async def delivered(self, notice_id: str) -> notices_pb2.GetReachResponse:
        """The notice's reach once its first delivery is complete."""

        async def complete() -> Any:
            reach = await self.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice_id))
            return reach if reach.delivery_complete else None

        reach: notices_pb2.GetReachResponse = await eventually(
            complete, what=f"first delivery of {notice_id}"
        )
        return reach

    async def inbox(self, household_id: str, **fields: Any) -> list[notices_pb2.HouseholdNotice]:
        response = await self.resident(household_id).ListMyNotices(
            notices_pb2.ListMyNoticesRequest(**fields)
        )
        return list(response.notices)

    async def open(self, household_id: str, notice_id: str) -> notices_pb2.HouseholdNotice:
        response = await self.resident(household_id).OpenNotice(
            notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id=notice_id)
        )
        opened: notices_pb2.HouseholdNotice = response.notice
        return opened

    async def events(self, notice_id: str, kind: type[Message]) -> list[Any]:
        """The events of one type staged for a notice, in order (the outbox, as committed)."""
        name = kind.DESCRIPTOR.full_name
        found = []
        async for entry in self.service.db["outbox"].find({"events.key": notice_id}).sort("_id"):
            for event in entry["events"]:
                if event["key"] == notice_id and event["type"] == name:
                    found.append(kind.FromString(bytes(event["data"])))
        return found


@pytest.fixture
async def town(city: City, notices_service: NoticesService) -> Town:
    """Three households in the city's group and two in the other, as the service sees them."""
    town = Town(city, notices_service, f"127.0.0.1:{notices_service.port}")

    async def units_known() -> bool:
        view = notices_service.store.view
        return all(
            [await view.unit(u) is not None for u in (city.ward, city.group, city.other_group)]
        )

    await eventually(units_known, what="the city's units in the notices view")
    for group, count in ((city.group, 3), (city.other_group, 2)):
        for _ in range(count):
            await town.add_household(group)
    return town


def unique_title() -> str:
    return f"Thông báo {uuid.uuid4().hex[:6]}"


__all__ += ["NoticeCaller", "Town", "events_pb2", "refused", "stamp", "unique_title"]


async def deliver_by_hand(
    town: Town,
    monkeypatch: pytest.MonkeyPatch,
    first_write: Callable[[list[Any]], Awaitable[int]],
    **fields: Any,
) -> notices_pb2.Notice:
    """A notice to the town's group (or `unit_id`, with other fields of the request), delivered
    here with the background deliverer stopped; its first batch's records are written by
    `first_write`, which may change the registry around the real write
    (`town.service.store.insert_deliveries` as it was)."""
    deliverer, store = town.service.deliverer, town.service.store
    write = store.insert_deliveries
    await deliverer.stop()
    try:
        caller = town.leader if fields.get("unit_id", town.city.group) == town.city.group else None
        fields.setdefault("unit_id", town.city.group)
        notice = await town.publish(caller, **fields)
        monkeypatch.setattr(store, "insert_deliveries", first_write)
        await deliverer.fan_out_batch()
        monkeypatch.setattr(store, "insert_deliveries", write)
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.start()
    return notice


async def merge_group_away(town: Town) -> list[str]:
    """The town's group merged into the other one, once the service's view has it; returns the
    households that moved."""
    city, store = town.city, town.service.store
    leaving = list(town.households[city.group])
    await city.admin.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
        )
    )

    async def merged() -> bool:
        in_target = {"_id": {"$in": leaving}, "unit_id": city.other_group}
        return await store.view.households.count_documents(in_target) == len(leaving)

    await eventually(merged, what="the merge in the service's view")
    return leaving

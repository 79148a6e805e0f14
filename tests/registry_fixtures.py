"""A registry service running in-process against the real servers, and a city tree to use
(a pytest plugin: every test package can ask for `registry` and `city`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import grpc
import pytest
from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from infra.local import free_port
from services.common.auth import Role
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.registry.main import RegistryService
from tests.conftest import Clock, token


@pytest.fixture(scope="session")
async def registry(
    settings: Settings, session_clock: Clock, span_processor: SimpleSpanProcessor
) -> AsyncIterator[RegistryService]:
    service = RegistryService(settings, clock=session_clock, span_processor=span_processor)
    await service.start()
    yield service
    await service.stop()


def next_to_registry(settings: Settings, registry: RegistryService) -> Settings:
    """Settings of one more service in the test session: a port of its own, and the session's
    registry for the calls it makes to it."""
    return settings.model_copy(
        update={"grpc_port": free_port(), "registry_target": f"127.0.0.1:{registry.port}"}
    )


class Caller:
    """A registry stub acting as one role in one scope."""

    def __init__(self, target: str, bearer: str, purpose: str = "census work") -> None:
        self.channel = civic_channel(target, bearer, purpose)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)


def rid() -> str:
    return str(uuid.uuid4())


@dataclass(eq=False)
class City:
    """dn (city) > dn.hc (district) > dn.hc.<ward> > two groups, with officials for each."""

    city: str
    district: str
    ward: str
    group: str
    other_group: str
    target: str

    def as_role(self, role: Role, scope: str, household_id: str = "") -> Caller:
        return Caller(self.target, token(role, scope, household_id))

    @cached_property
    def admin(self) -> Caller:
        return self.as_role(Role.CITY_ADMIN, self.city)

    @cached_property
    def ward_officer(self) -> Caller:
        return self.as_role(Role.WARD_OFFICER, self.ward)

    @cached_property
    def leader(self) -> Caller:
        return self.as_role(Role.GROUP_LEADER, self.group)

    @cached_property
    def other_leader(self) -> Caller:
        return self.as_role(Role.GROUP_LEADER, self.other_group)


async def create_unit(
    caller: Caller, parent: str, code: str, name: str, kind: registry_pb2.UnitKind.ValueType
) -> str:
    response = await caller.CreateUnit(
        registry_pb2.CreateUnitRequest(
            request_id=rid(), parent_id=parent, code=code, name=name, kind=kind
        )
    )
    return str(response.unit.unit_id)


async def new_city(target: str, code: str) -> City:
    """The city `code` and its tree, created through the registry at `target`."""
    admin = Caller(target, token(Role.CITY_ADMIN, code))
    city_id = await create_unit(admin, "", code, "Đà Nẵng", registry_pb2.UNIT_KIND_CITY)
    district = await create_unit(admin, city_id, "hc", "Hải Châu", registry_pb2.UNIT_KIND_DISTRICT)
    ward = await create_unit(admin, district, "hc1", "Hải Châu 1", registry_pb2.UNIT_KIND_WARD)
    group = await create_unit(admin, ward, "g17", "Tổ dân phố 17", registry_pb2.UNIT_KIND_GROUP)
    other = await create_unit(admin, ward, "g18", "Tổ dân phố 18", registry_pb2.UNIT_KIND_GROUP)
    await admin.channel.close()
    return City(city_id, district, ward, group, other, target)


@pytest.fixture
async def city(registry: RegistryService, unique: str) -> City:
    """A fresh city per test keeps tests independent on the shared servers."""
    return await new_city(f"127.0.0.1:{registry.port}", unique)


# Digits spelt out: a name is written in letters, and tests number many people.
DIGIT_WORDS = ("Không", "Một", "Hai", "Ba", "Bốn", "Năm", "Sáu", "Bảy", "Tám", "Chín")


def numbered(name: str, number: int, width: int = 0) -> str:
    """`name` followed by `number` spelt digit by digit ("Số" 12 is "Số Một Hai")."""
    return " ".join([name, *(DIGIT_WORDS[int(d)] for d in f"{number:0{width}d}")])


def person(
    name: str = "Nguyễn Thị Bê",
    born: str = "1990-05-17",
    sex: registry_pb2.Sex.ValueType = registry_pb2.SEX_FEMALE,
    citizen_id: str = "",
    relationship: registry_pb2.Relationship.ValueType = registry_pb2.RELATIONSHIP_SPOUSE,
) -> registry_pb2.PersonDetails:
    return registry_pb2.PersonDetails(
        full_name=name,
        birth_date=born,
        sex=sex,
        citizen_id=citizen_id,
        relationship=relationship,
        education=registry_pb2.EDUCATION_LEVEL_UNIVERSITY,
        occupation="giáo viên",
    )


_serial = iter(range(10_000_000))
_FIRST_SERIAL = uuid.uuid4().int % 1_000_000


def citizen_id(born: str, sex: int, province: str = "048") -> str:
    """A valid ID for this birth year and sex, unique in the test run."""
    year = int(born[:4])
    century_sex = 2 * ((year - 1900) // 100) + (0 if sex == registry_pb2.SEX_MALE else 1)
    # Consecutive from a random start: unique across the run (random serials would collide,
    # by the birthday paradox, among the thousand heads born on the same default day).
    serial = (_FIRST_SERIAL + next(_serial)) % 1_000_000
    return f"{province}{century_sex}{year % 100:02d}{serial:06d}"


async def new_household(
    caller: Caller,
    group: str,
    head_name: str = "Trần Văn An",
    born: str = "1975-02-03",
    **kw: object,
) -> registry_pb2.CreateHouseholdResponse:
    head = person(
        head_name,
        born,
        registry_pb2.SEX_MALE,
        citizen_id(born, registry_pb2.SEX_MALE),
        registry_pb2.RELATIONSHIP_HEAD,
    )
    fields: dict[str, Any] = {
        "request_id": rid(),
        "unit_id": group,
        "address": "12 Kiệt 45 Trần Phú",
        "housing": registry_pb2.Housing(floor_area_m2=62.5, storeys=3, sub_households=1),
        "residence_kind": registry_pb2.RESIDENCE_KIND_PERMANENT,
        "head": head,
    }
    request = registry_pb2.CreateHouseholdRequest(**(fields | kw))
    response: registry_pb2.CreateHouseholdResponse = await caller.CreateHousehold(request)
    return response


async def outlive_the_first_page(
    registry: RegistryService,
    write: Callable[[], Awaitable[object]],
    later_page: Callable[[], Awaitable[object]],
    within: float = 30,
) -> grpc.aio.AioRpcError:
    """Waits until the moment a paged listing's first page read the register at is no longer
    kept, and returns the registry's refusal of `later_page`. MongoDB keeps that past for
    minSnapshotHistoryWindowInSeconds (300 s), lowered to 1 s meanwhile; it is trimmed as later
    writes (`write`, one a try) are committed."""
    admin = registry.db.client.admin
    await admin.command("setParameter", 1, minSnapshotHistoryWindowInSeconds=1)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            await write()
            try:
                await later_page()
            except grpc.aio.AioRpcError as error:
                return error
            await asyncio.sleep(0.5)
    finally:
        await admin.command("setParameter", 1, minSnapshotHistoryWindowInSeconds=300)
    raise AssertionError(f"not within {within:.0f} s: the first page's moment forgotten")

"""The tickets service in-process beside the registry (whose events build its view of the tree)
and the GIS service (which it asks where a reported place lies, over a link a test can stall)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pytest
from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2
from civic.tickets.v1 import tickets_pb2, tickets_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from infra.local import free_port
from services.common.auth import Role
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.gis.main import GisService
from services.tickets.main import TicketsService
from tests.conftest import Clock, token

# The GIS service tickets ask where a reported place lies: the one the GIS tests run.
from tests.gis.conftest import gis_service as gis_service
from tests.registry_fixtures import City, new_household, rid

__all__ = ["rid"]


class Link:
    """A TCP link to a server that a test can stall: while it is stalled, bytes wait in both
    directions, as on a network gone quiet (the caller's deadline passes, nothing is refused),
    and then flow on in order, so that connections over it stay whole."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    @contextlib.asynccontextmanager
    async def stalled(self) -> AsyncIterator[None]:
        self._flowing.clear()
        try:
            yield
        finally:
            self._flowing.set()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()


@pytest.fixture(scope="session")
async def gis_link(gis_service: GisService) -> AsyncIterator[Link]:
    """How the tickets service reaches GIS."""
    link = Link(gis_service.port)
    await link.start()
    yield link
    await link.stop()


@pytest.fixture(scope="session")
async def tickets_service(
    settings: Settings, session_clock: Clock, span_processor: SimpleSpanProcessor, gis_link: Link
) -> AsyncIterator[TicketsService]:
    service = TicketsService(
        settings.model_copy(
            update={"grpc_port": free_port(), "gis_target": f"127.0.0.1:{gis_link.port}"}
        ),
        clock=session_clock,
        span_processor=span_processor,
        escalation_interval_seconds=0.2,
    )
    await service.start()
    yield service
    await service.stop()


class TicketCaller:
    def __init__(self, target: str, bearer: str) -> None:
        self.channel = civic_channel(target, bearer)
        self.stub = tickets_pb2_grpc.TicketsServiceStub(self.channel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)


async def eventually(probe: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """The probe's first truthy answer, polling until `within` seconds pass."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        answer = await probe()
        if answer:
            return answer
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {within} s")
        await asyncio.sleep(0.05)


@dataclass(eq=False)
class Pilot:
    """A city from the registry's fixture, a household in its group, and tickets callers."""

    city: City
    household_id: str
    target: str

    def caller(
        self, role: Role, scope: str, household_id: str = "", subject: str = ""
    ) -> TicketCaller:
        return TicketCaller(self.target, token(role, scope, household_id, subject))

    @cached_property
    def resident(self) -> TicketCaller:
        return self.caller(Role.RESIDENT, self.city.group, self.household_id, "resident-1")

    @cached_property
    def neighbour(self) -> TicketCaller:
        return self.caller(Role.RESIDENT, self.city.group, self.household_id, "resident-2")

    @cached_property
    def leader(self) -> TicketCaller:
        return self.caller(Role.GROUP_LEADER, self.city.group)

    @cached_property
    def ward_officer(self) -> TicketCaller:
        return self.caller(Role.WARD_OFFICER, self.city.ward)

    @cached_property
    def district_officer(self) -> TicketCaller:
        return self.caller(Role.DISTRICT_OFFICER, self.city.district)

    @cached_property
    def admin(self) -> TicketCaller:
        return self.caller(Role.CITY_ADMIN, self.city.city)

    async def submit(
        self, category: str = "street-light", caller: TicketCaller | None = None, **fields: Any
    ) -> tickets_pb2.Ticket:
        response = await (caller or self.resident).SubmitTicket(
            tickets_pb2.SubmitTicketRequest(
                request_id=rid(),
                category=category,
                description="Đèn đường hỏng ở kiệt 45",
                **fields,
            )
        )
        ticket: tickets_pb2.Ticket = response.ticket
        return ticket

    async def routed(
        self, ticket_id: str, caller: TicketCaller | None = None
    ) -> tickets_pb2.Ticket:
        async def probe() -> tickets_pb2.Ticket | None:
            got = await (caller or self.resident).GetTicket(
                tickets_pb2.GetTicketRequest(ticket_id=ticket_id)
            )
            routed = got.ticket.status != tickets_pb2.TICKET_STATUS_SUBMITTED
            return got.ticket if routed else None

        ticket: tickets_pb2.Ticket = await eventually(probe)
        return ticket


HOME = types_pb2.GeoPoint(latitude=16.0747, longitude=108.2230)


@pytest.fixture
async def pilot(city: City, tickets_service: TicketsService) -> Pilot:
    """The registry's tree and a household, once the tickets service has seen them."""
    home = await new_household(city.leader, city.group, location=HOME)
    household_id = home.household.household_id

    async def known() -> bool:
        # Unit and household events travel on different partitions: wait for all of them.
        store = tickets_service.store
        return (
            await store.household(household_id) is not None
            and await store.unit(city.group) is not None
            and await store.unit(city.other_group) is not None
        )

    await eventually(known)
    return Pilot(city, household_id, f"127.0.0.1:{tickets_service.port}")


def point_near(meters_north: float) -> types_pb2.GeoPoint:
    return types_pb2.GeoPoint(
        latitude=HOME.latitude + meters_north / 111_320, longitude=HOME.longitude
    )


__all__ += ["HOME", "Link", "Pilot", "eventually", "point_near", "registry_pb2"]

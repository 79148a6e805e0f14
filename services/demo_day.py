"""`civic demo`: a day in the pilot, played through the public gRPC APIs and printed in plain words.

A birth is registered and the household's point appears on the map; the district warns the
households with a member over 70 of a storm; a resident reports flooding in an alley with a
photo, the ticket goes to the ward, nobody acknowledges it and it escalates to the district when
its deadline passes; the ward finds the water point nearest the flooded alley and a fire
engine's way to the new family's home on the pilot's map; the group opens a study-promotion
campaign, some households pay and the statement is exported; an auditor replays the ledger; an
outside integrator reads the ticket's events from Kafka.

The clock: a ticket's deadline is hours away, so the day cannot pass in real time. The demo runs
every service in this process (as the tests and benchmarks do), each with its gRPC server, outbox
relay and Kafka consumers, all reading one simulated clock, and moves that clock forward when the
story says so ("the clock moves 13 hours on"). Every call still goes through gRPC; the services
find out about each other only through Kafka, as in production. `civic demo` starts its own
local servers (MongoDB, broker, S3) on free ports in a temporary directory, or uses the external
servers named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS / CIVIC_S3_ENDPOINT, in databases and
consumer groups of its own.

Traces: the day is one trace. Each step is a span under the day's span and every gRPC call, relay
and consumer it sets off joins that trace (set OTEL_EXPORTER_OTLP_ENDPOINT to export it); the
escalation, the tickets service's own deadline sweep, continues the trace of the ticket's filing.
Loading the pilot's data before the day is a trace of its own: its thousands of imports would
bury the day's few dozen calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2, gis_pb2_grpc
from civic.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from civic.notices.v1 import notices_pb2, notices_pb2_grpc
from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from civic.tickets.v1 import tickets_pb2, tickets_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from PIL import Image

from infra.local import LocalStack, Ports, free_port, isolated_settings
from services import topic_tail
from services.common.auth import Role, mint_token
from services.common.broker import faststream_warnings_only
from services.common.clock import Clock
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.telemetry import setup_telemetry, tracer
from services.common.topology import TOPICS
from services.common.wire import VIETNAM, local_date, timestamp
from services.demo import CITY, PILOT
from services.demo_map import street_entry
from services.gis.main import GisService
from services.ledger import replay
from services.ledger.main import LedgerService
from services.notices.main import NoticesService
from services.platform import load_demo, load_map_demo
from services.registry.main import RegistryService
from services.tickets.main import TicketsService

_TRACER = tracer("civic.demo")
T = TypeVar("T")
WAIT_SECONDS = 60.0
GROUP = PILOT[0]  # Tổ dân phố 17, Hải Châu 1 ward, Hải Châu district
WARD = GROUP.unit_id.rsplit(".", 1)[0]
DISTRICT = WARD.rsplit(".", 1)[0]
ELDERLY_AGE = 71  # "over 70": 71 or older in whole years
DUES_RATE = 50_000  # đồng per household
PAYERS = 5
# The alley that floods: a little north-east of the group's centre.
ALLEY = types_pb2.GeoPoint(latitude=GROUP.centre[0] + 0.0008, longitude=GROUP.centre[1] + 0.0006)
HOME = types_pb2.GeoPoint(latitude=GROUP.centre[0] + 0.0005, longitude=GROUP.centre[1] + 0.00065)
UNIT_NAMES = {WARD: GROUP.ward[1], DISTRICT: GROUP.district[1]}


def unit_named(unit_id: str) -> str:
    """A unit as an official says it, its id beside: "Quận Hải Châu (dn.hc)"."""
    return f"{UNIT_NAMES[unit_id]} ({unit_id})" if unit_id in UNIT_NAMES else unit_id


# The consumers that keep a view of the registry: the demo waits for them to catch up.
REGISTRY_VIEWS = ("tickets", "notices", "gis")


# ---- the services, in this process ---------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """Where each service listens (host:port)."""

    registry: str
    tickets: str
    notices: str
    ledger: str
    gis: str


@contextlib.asynccontextmanager
async def pilot_services(
    settings: Settings, clock: Clock, span_processor: SpanProcessor | None = None
) -> AsyncIterator[Targets]:
    """Every service on its own free port, sharing `clock`; the registry first, since the
    ledger and GIS read it through gRPC, and GIS before tickets, which asks it where a
    reported place lies."""

    def own(**update: Any) -> Settings:
        return settings.model_copy(update={"grpc_port": free_port(), **update})

    common: dict[str, Any] = {"clock": clock, "span_processor": span_processor}
    async with contextlib.AsyncExitStack() as stack:
        registry = RegistryService(own(), **common)
        await registry.start()
        stack.push_async_callback(registry.stop)
        readers = {"registry_target": f"127.0.0.1:{registry.port}"}
        gis = GisService(own(**readers), **common)
        await gis.start()
        stack.push_async_callback(gis.stop)
        others = (
            TicketsService(
                own(gis_target=f"127.0.0.1:{gis.port}"), escalation_interval_seconds=0.2, **common
            ),
            NoticesService(own(), sweep_interval_seconds=0.5, **common),
            LedgerService(own(**readers), **common),
        )
        for service in others:
            await service.start()
            stack.push_async_callback(service.stop)
        tickets, notices, ledger = (f"127.0.0.1:{s.port}" for s in others)
        yield Targets(
            f"127.0.0.1:{registry.port}", tickets, notices, ledger, f"127.0.0.1:{gis.port}"
        )


# ---- what the day leaves behind, for the report and the test ------------------------------------


@dataclass
class Step:
    title: str
    trace_id: str
    span_id: str


@dataclass
class Day:
    steps: list[Step] = field(default_factory=list)
    household_id: str = ""
    baby_id: str = ""
    members: list[str] = field(default_factory=list)  # the household's, after the birth
    map_point: list[float] = field(default_factory=list)  # [longitude, latitude]
    notice_id: str = ""
    elderly_households: set[str] = field(default_factory=set)
    warned_households: set[str] = field(default_factory=set)
    delivered: int = 0
    ticket_id: str = ""
    photo_key: str = ""
    routed_to: str = ""
    escalated_to: str = ""
    clock_moved: timedelta = timedelta()
    fund_id: str = ""
    campaign_id: str = ""
    payers: list[str] = field(default_factory=list)
    collected: int = 0
    statement_csv_key: str = ""
    statement_pdf_key: str = ""
    replay_report: replay.Report | None = None
    integrator_lines: list[str] = field(default_factory=list)
    flood_hydrant: gis_pb2.Hydrant | None = None
    fire_route: gis_pb2.PlanFireRouteResponse | None = None
    map_png: bytes = b""

    @property
    def trace_id(self) -> str:
        return self.steps[0].trace_id if self.steps else ""

    def problems(self) -> list[str]:
        """What did not happen as the day says it should; empty when all did."""
        expected = {
            "the baby is a member of the new household": self.baby_id in self.members,
            "the new household is on the map": bool(self.map_point),
            "the district has elderly people to warn": bool(self.elderly_households),
            "the warning reached exactly the households with someone over 70": (
                self.warned_households == self.elderly_households
                and self.delivered == len(self.elderly_households)
            ),
            "the ticket went to the ward": self.routed_to == WARD,
            "the ticket escalated to the district": self.escalated_to == DISTRICT,
            "the photo was accepted": bool(self.photo_key),
            "the fire route reaches the home": bool(
                self.fire_route and self.fire_route.length_m > 0
            ),
            f"{PAYERS} households paid their dues": (
                len(set(self.payers)) == PAYERS and self.collected == PAYERS * DUES_RATE
            ),
            "the statement was exported": bool(self.statement_csv_key and self.statement_pdf_key),
            "the auditor's replay matches": bool(self.replay_report and self.replay_report.ok),
            "the integrator read the ticket's four events": len(self.integrator_lines) == 4,
        }
        return [what for what, happened in expected.items() if not happened]


# ---- helpers -------------------------------------------------------------------------------------


async def until(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """The probe's first answer that is not None (or false), polled; an error after a minute."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not (answer := await probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"not within {WAIT_SECONDS:.0f} s: {what}")
        await asyncio.sleep(0.1)
    return answer


async def consumers_caught_up(settings: Settings, topic: str, groups: list[str]) -> None:
    """Until each consumer group has committed every record on `topic` as it ends now; an error
    when they make no progress for a minute."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    await admin.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)

        async def behind() -> int:
            lag = 0
            for group in groups:
                offsets = await admin.list_consumer_group_offsets(group)
                done = {tp: meta.offset for tp, meta in offsets.items()}
                lag += sum(max(0, end - done.get(tp, 0)) for tp, end in ends.items())
            return lag

        # A topic with a long history takes a while to read: give up only when it stalls.
        lag = await behind()
        stalled_since = asyncio.get_running_loop().time()
        while lag:
            await asyncio.sleep(0.2)
            now_behind = await behind()
            if now_behind < lag:
                stalled_since = asyncio.get_running_loop().time()
            elif asyncio.get_running_loop().time() - stalled_since > WAIT_SECONDS:
                raise TimeoutError(
                    f"{', '.join(groups)} stopped reading {topic} {now_behind} records short"
                )
            lag = now_behind
    finally:
        await admin.close()
        await consumer.stop()


def photo_of_flooding() -> bytes:
    """A small PNG, as a phone would upload it: brown water under a grey sky."""
    picture = Image.new("RGB", (64, 48), (120, 120, 130))
    picture.paste((110, 85, 50), (0, 28, 64, 48))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def http_put(url: str, body: bytes, content_type: str) -> None:
    request = urllib.request.Request(url, data=body, method="PUT")
    request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def rid() -> str:
    return str(uuid.uuid4())


# ---- the day -------------------------------------------------------------------------------------


class PilotDay:
    """Plays the day against the services at `targets`, saying each step with `say`."""

    def __init__(
        self,
        settings: Settings,
        targets: Targets,
        clock: Clock,
        say: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.targets = targets
        self.clock = clock
        self.say = say
        self.day = Day()
        self._channels = contextlib.AsyncExitStack()

    def _stub(
        self, stub: Callable[[Any], object], target: str, role: Role, scope: str, **kw: str
    ) -> Any:
        """An async stub (the generated stubs are typed for sync channels) acting as `role`
        over `scope` (kw: household, purpose)."""
        bearer = mint_token(
            self.settings.auth_secret,
            subject=f"demo-{role.value}@{scope}",
            role=role,
            scope=scope,
            household_id=kw.get("household", ""),
        )
        channel = civic_channel(target, bearer, kw.get("purpose", ""))
        self._channels.push_async_callback(channel.close)
        return stub(channel)

    @contextlib.contextmanager
    def _step(self, title: str) -> Iterator[None]:
        with _TRACER.start_as_current_span(title) as span:
            context = span.get_span_context()
            step = Step(title, format(context.trace_id, "032x"), format(context.span_id, "016x"))
            self.day.steps.append(step)
            self.say(f"\n{len(self.day.steps)}. {title}  [trace {step.trace_id[:12]}…]")
            yield

    def _tell(self, line: str) -> None:
        self.say(f"   {line}")

    async def play(self) -> Day:
        async with self._channels:
            await self._morning()
            with _TRACER.start_as_current_span("a day in the pilot"):
                await self._birth()
                await self._storm_warning()
                await self._flooding()
                await self._fire_access()
                await self._dues()
                await self._audit()
                await self._integrator()
        self.say(f"\nThe whole day is one trace: {self.day.trace_id}")
        return self.day

    async def _morning(self) -> None:
        with _TRACER.start_as_current_span("loading the pilot's data"):
            self.say("\nBefore the day: the pilot's four units and their households are loaded")
            loaded = await load_demo(
                self.settings.model_copy(update={"registry_target": self.targets.registry})
            )
            self._tell(loaded)
            groups = [self.settings.consumer_group(s, "registry-view") for s in REGISTRY_VIEWS]
            await consumers_caught_up(self.settings, "civic.registry.v1", groups)
            self._tell("tickets, notices and the map have read the registry's events")
            self._tell(await load_map_demo(self.settings, self.targets.gis))

    async def _birth(self) -> None:
        registry = self._stub(
            registry_pb2_grpc.RegistryServiceStub,
            self.targets.registry,
            Role.GROUP_LEADER,
            GROUP.unit_id,
            purpose="đăng ký khai sinh",
        )
        with self._step(f"A birth in {GROUP.group[1]}"):
            household = await registry.CreateHousehold(
                registry_pb2.CreateHouseholdRequest(
                    request_id=rid(),
                    unit_id=GROUP.unit_id,
                    address="27/4 Kiệt 45 Trần Phú",
                    housing=registry_pb2.Housing(floor_area_m2=48.0, storeys=2, sub_households=1),
                    residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
                    location=HOME,
                    head=registry_pb2.PersonDetails(
                        full_name="Võ Minh Khang",
                        birth_date="1996-03-14",
                        sex=registry_pb2.SEX_MALE,
                        citizen_id="048096771201",
                        relationship=registry_pb2.RELATIONSHIP_HEAD,
                        education=registry_pb2.EDUCATION_LEVEL_UNIVERSITY,
                        occupation="kỹ sư",
                    ),
                )
            )
            self.day.household_id = household.household.household_id
            self._tell(
                f"the group leader registers the young family of Võ Minh Khang at 27/4 Kiệt 45 "
                f"Trần Phú (household {self.day.household_id})"
            )
            born = await registry.RegisterBirth(
                registry_pb2.RegisterBirthRequest(
                    request_id=rid(),
                    household_id=self.day.household_id,
                    child=registry_pb2.PersonDetails(
                        full_name="Võ Ngọc Hân",
                        birth_date=local_date(self.clock()).isoformat(),
                        sex=registry_pb2.SEX_FEMALE,
                        relationship=registry_pb2.RELATIONSHIP_CHILD,
                    ),
                )
            )
            self.day.baby_id = born.person.person_id
            self._tell(f"and their daughter Võ Ngọc Hân, born today ({self.day.baby_id})")
            family = await registry.GetHousehold(
                registry_pb2.GetHouseholdRequest(household_id=self.day.household_id)
            )
            self.day.members = [m.person_id for m in family.members]
            self._tell("the household now has " + ", ".join(m.full_name for m in family.members))
            gis = self._stub(gis_pb2_grpc.GisServiceStub, self.targets.gis, Role.WARD_OFFICER, WARD)
            box = gis_pb2.BoundingBox(
                west=HOME.longitude - 0.0005,
                south=HOME.latitude - 0.0005,
                east=HOME.longitude + 0.0005,
                north=HOME.latitude + 0.0005,
            )

            async def on_the_map() -> list[float] | None:
                page = await gis.ListFeatures(
                    gis_pb2.ListFeaturesRequest(layers=[gis_pb2.LAYER_HOUSEHOLD], bbox=box)
                )
                for feature in json.loads(page.geojson)["features"]:
                    if feature["properties"].get("household_id") == self.day.household_id:
                        point: list[float] = feature["geometry"]["coordinates"]
                        return point
                return None

            self.day.map_point = await until(on_the_map, "the new household on the map")
            lon, lat = self.day.map_point
            self._tell(f"the household's point appears on the ward's map at {lat:.5f}, {lon:.5f}")

    async def _storm_warning(self) -> None:
        notices = self._stub(
            notices_pb2_grpc.NoticesServiceStub,
            self.targets.notices,
            Role.DISTRICT_OFFICER,
            DISTRICT,
        )
        registry = self._stub(
            registry_pb2_grpc.RegistryServiceStub,
            self.targets.registry,
            Role.DISTRICT_OFFICER,
            DISTRICT,
            purpose="danh sách người cao tuổi khi có bão",
        )
        with self._step("The district warns its elderly of a storm"):
            published = await notices.PublishNotice(
                notices_pb2.PublishNoticeRequest(
                    request_id=rid(),
                    title="Cảnh báo bão số 5",
                    body=(
                        "Bão số 5 dự kiến đổ bộ vào Đà Nẵng đêm nay.\n"
                        "- Ở trong nhà, tránh xa cửa kính\n"
                        "- Gọi tổ trưởng nếu cần di dời đến nơi an toàn"
                    ),
                    priority=notices_pb2.PRIORITY_EMERGENCY,
                    unit_id=DISTRICT,
                    audience=notices_pb2.Audience(
                        member=notices_pb2.MemberFilter(min_age=ELDERLY_AGE)
                    ),
                )
            )
            self.day.notice_id = published.notice.notice_id
            self._tell(
                f"the district publishes an emergency to households of {unit_named(DISTRICT)} "
                f"with a member aged {ELDERLY_AGE} or more ({self.day.notice_id})"
            )

            async def complete() -> notices_pb2.GetReachResponse | None:
                reach = await notices.GetReach(
                    notices_pb2.GetReachRequest(notice_id=self.day.notice_id)
                )
                return reach if reach.delivery_complete else None

            reach = await until(complete, "the storm warning's delivery")
            self.day.delivered = reach.total.delivered
            self.day.warned_households = {
                h.household_id
                async for h in _pages(
                    lambda page: notices.ListNotReached(
                        notices_pb2.ListNotReachedRequest(notice_id=self.day.notice_id, page=page)
                    ),
                    "households",
                )
            }
            self.day.elderly_households = {
                p.household_id
                async for p in _pages(
                    lambda page: registry.SearchPersons(
                        registry_pb2.SearchPersonsRequest(
                            unit_id=DISTRICT,
                            min_age=ELDERLY_AGE,
                            as_of=local_date(self.clock()).isoformat(),
                            page=page,
                        )
                    ),
                    "persons",
                )
            }
            self._tell(
                f"delivered to {reach.total.delivered} households; the registry counts "
                f"{len(self.day.elderly_households)} households of the district with someone over "
                f"70 — "
                + (
                    "the same ones"
                    if self.day.warned_households == self.day.elderly_households
                    else "NOT the same ones"
                )
            )

    async def _flooding(self) -> None:
        resident = self._stub(
            tickets_pb2_grpc.TicketsServiceStub,
            self.targets.tickets,
            Role.RESIDENT,
            GROUP.unit_id,
            household=self.day.household_id,
        )
        ward = self._stub(
            tickets_pb2_grpc.TicketsServiceStub, self.targets.tickets, Role.WARD_OFFICER, WARD
        )
        with self._step("A resident reports flooding in the alley, with a photo"):
            submitted = await resident.SubmitTicket(
                tickets_pb2.SubmitTicketRequest(
                    request_id=rid(),
                    category="flooding",
                    description="Kiệt 45 Trần Phú ngập sâu 40 cm, nước tràn vào nhà",
                    location=ALLEY,
                )
            )
            self.day.ticket_id = ticket_id = submitted.ticket.ticket_id
            self._tell(f"Võ Minh Khang reports flooding in Kiệt 45 ({ticket_id})")
            photo = photo_of_flooding()
            slot = await resident.CreatePhotoUpload(
                tickets_pb2.CreatePhotoUploadRequest(
                    ticket_id=ticket_id, content_type="image/png", size_bytes=len(photo)
                )
            )
            await asyncio.to_thread(http_put, slot.upload_url, photo, "image/png")
            attached = await resident.AttachPhoto(
                tickets_pb2.AttachPhotoRequest(
                    request_id=rid(), ticket_id=ticket_id, object_key=slot.object_key
                )
            )
            self.day.photo_key = attached.ticket.photos[-1].object_key
            self._tell(
                f"the phone uploads the photo straight to object storage ({len(photo)} bytes) "
                "and attaches it"
            )

            async def routed() -> tickets_pb2.Ticket | None:
                got = (
                    await ward.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket_id))
                ).ticket
                return got if got.assigned_level == tickets_pb2.LEVEL_WARD else None

            ticket = await until(routed, "the ticket routed to the ward")
            self.day.routed_to = ticket.assigned_unit_id
            deadline = ticket.acknowledge_by.ToDatetime().replace(tzinfo=self.clock().tzinfo)
            self._tell(
                f"it is routed to the ward, {unit_named(ticket.assigned_unit_id)}, department "
                f"{ticket.department}, to "
                f"be acknowledged by {_local(deadline)}"
            )

        with self._step("Nobody at the ward acknowledges it; it escalates to the district"):
            self.day.clock_moved = deadline - self.clock() + timedelta(hours=1)
            hours = self.day.clock_moved.total_seconds() / 3600
            self.clock.advance(seconds=self.day.clock_moved.total_seconds())
            self._tell(
                f"the simulated clock moves {hours:.0f} hours on, to {_local(self.clock())}, "
                "past the ward's deadline"
            )

            async def escalated() -> tickets_pb2.Ticket | None:
                got = (
                    await ward.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket_id))
                ).ticket
                return got if got.assigned_level == tickets_pb2.LEVEL_DISTRICT else None

            ticket = await until(escalated, "the ticket escalated to the district")
            self.day.escalated_to = ticket.assigned_unit_id
            self._tell(
                f"the tickets service's deadline sweep escalates it to the district, "
                f"{unit_named(ticket.assigned_unit_id)} (escalations: {ticket.escalations})"
            )

    async def _fire_access(self) -> None:
        gis = self._stub(gis_pb2_grpc.GisServiceStub, self.targets.gis, Role.WARD_OFFICER, WARD)
        with self._step("The ward checks water and a fire engine's way in"):
            nearest = await gis.NearestHydrants(gis_pb2.NearestHydrantsRequest(point=ALLEY))
            self.day.flood_hydrant = hydrant = nearest.hydrants[0]
            self._tell(
                f"the water point nearest the flooded alley: {hydrant.name} "
                f"({hydrant.kind}), {hydrant.distance_m:.0f} m away"
            )
            lon, lat = street_entry(GROUP)
            route = gis_pb2.PlanFireRouteRequest(
                entry=types_pb2.GeoPoint(latitude=lat, longitude=lon),
                household_id=self.day.household_id,
                min_width_m=3.5,
            )
            self.day.fire_route = await gis.PlanFireRoute(route)
            self._tell(
                f"a fire engine (3.5 m) reaches the new family's home by alleys wide enough in "
                f"{self.day.fire_route.length_m:.0f} m, past "
                f"{len(self.day.fire_route.hydrants)} hydrants"
            )
            picture = await gis.RenderMap(
                gis_pb2.RenderMapRequest(
                    unit_id=GROUP.unit_id, format=gis_pb2.IMAGE_FORMAT_PNG, route=route
                )
            )
            self.day.map_png = picture.content
            self._tell(
                f"the group's map with that route drawn on it: a {picture.width_px}×"
                f"{picture.height_px} PNG ({len(picture.content):,} bytes)"
            )

    async def _dues(self) -> None:
        def ledger(role: Role) -> Any:
            return self._stub(
                ledger_pb2_grpc.LedgerServiceStub, self.targets.ledger, role, GROUP.unit_id
            )

        leader, treasurer = ledger(Role.GROUP_LEADER), ledger(Role.TREASURER)
        with self._step("The group collects for study promotion"):
            opened_at = self.clock()
            fund = await leader.OpenFund(
                ledger_pb2.OpenFundRequest(
                    request_id=rid(), unit_id=GROUP.unit_id, name="Quỹ khuyến học"
                )
            )
            self.day.fund_id = fund_id = fund.fund.fund_id
            campaign = await leader.DeclareCampaign(
                ledger_pb2.DeclareCampaignRequest(
                    request_id=rid(),
                    fund_id=fund_id,
                    name="Đóng góp quỹ khuyến học năm học 2026-2027",
                    period="2026-2027",
                    basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
                    rate=DUES_RATE,
                    exemptions=[ledger_pb2.EXEMPTION_POOR_HOUSEHOLD],
                )
            )
            self.day.campaign_id = campaign.campaign.campaign_id
            status = await leader.GetCampaignStatus(
                ledger_pb2.GetCampaignStatusRequest(
                    fund_id=fund_id, campaign_id=self.day.campaign_id
                )
            )
            self._tell(
                f"the group leader opens the study-promotion fund ({fund_id}) and asks "
                f"{DUES_RATE:,} đồng of each household: {status.unpaid} households owe "
                f"{status.outstanding:,} đồng"
            )
            payers = [h for h in status.households if h.status == ledger_pb2.PAYMENT_STATUS_UNPAID][
                :PAYERS
            ]
            for number, household in enumerate(payers, start=1):
                await treasurer.RecordContribution(
                    ledger_pb2.RecordContributionRequest(
                        request_id=rid(),
                        fund_id=fund_id,
                        household_id=household.household_id,
                        campaign_id=self.day.campaign_id,
                        amount=household.due,
                        method=ledger_pb2.PAYMENT_METHOD_CASH,
                        receipt_number=f"KH-{number:03d}",
                    )
                )
                self.day.payers.append(household.household_id)
                self._tell(f"{household.household_name} pays {household.due:,} đồng in cash")
            status = await leader.GetCampaignStatus(
                ledger_pb2.GetCampaignStatusRequest(
                    fund_id=fund_id, campaign_id=self.day.campaign_id
                )
            )
            self.day.collected = status.collected
            exported = await treasurer.ExportStatement(
                ledger_pb2.ExportStatementRequest(
                    fund_id=fund_id,
                    to=timestamp(self.clock() + timedelta(minutes=1)),
                    **{"from": timestamp(opened_at - timedelta(minutes=1))},
                )
            )
            self.day.statement_csv_key = exported.csv_object_key
            self.day.statement_pdf_key = exported.pdf_object_key
            self._tell(
                f"{status.paid} households have paid, {status.collected:,} đồng collected; the "
                f"statement is exported for the notice board: {exported.csv_object_key} and "
                f"{exported.pdf_object_key}"
            )

    async def _audit(self) -> None:
        with self._step("An auditor replays the ledger"):
            # The fund's events are on the topic: opened, the dues, each payment.
            await _tail(
                self.settings, "civic.ledger.v1", self.day.fund_id, 2 + len(self.day.payers)
            )
            auditor = self._stub(
                ledger_pb2_grpc.LedgerServiceStub,
                self.targets.ledger,
                Role.AUDITOR,
                CITY[0],
                purpose="audit replay",
            )
            report = await replay.replay(
                self.settings, live=replay.grpc_balances(auditor), unit=GROUP.unit_id
            )
            self.day.replay_report = report
            for line in report.text().splitlines():
                self._tell(line)

    async def _integrator(self) -> None:
        with self._step("An outside integrator's consumer prints the ticket's events"):
            # Submitted, photo attached, routed, escalated.
            self.day.integrator_lines = await _tail(
                self.settings, "civic.tickets.v1", self.day.ticket_id, 4
            )
            for line in self.day.integrator_lines:
                self._tell(line)


async def _tail(settings: Settings, topic: str, key: str, count: int) -> list[str]:
    """The first `count` events of one aggregate, as `civic tail` prints them."""
    out = io.StringIO()
    async with asyncio.timeout(WAIT_SECONDS):
        await topic_tail.tail(
            settings.kafka_bootstrap_servers, topic, out, from_beginning=True, key=key, count=count
        )
    return out.getvalue().splitlines()


async def _pages(
    call: Callable[[types_pb2.PageRequest], Awaitable[Any]], items: str
) -> AsyncIterator[Any]:
    page_token = ""
    while True:
        response = await call(types_pb2.PageRequest(page_size=1000, page_token=page_token))
        for item in getattr(response, items):
            yield item
        page_token = response.next_page_token
        if not page_token:
            return


def _local(moment: datetime) -> str:
    return moment.astimezone(VIETNAM).strftime("%H:%M on %d/%m")


# ---- civic demo ----------------------------------------------------------------------------------


async def command() -> int:
    """Play the day on servers of its own; 0 when every step did what it should. The story goes
    to stdout; the servers' and consumers' own logging to stderr, warnings only."""
    story = sys.stdout

    def say(line: str) -> None:
        print(line, file=story, flush=True)

    faststream_warnings_only()
    # faststream's loggers write to the stdout of when they are made: keep stdout for the story.
    with contextlib.redirect_stdout(sys.stderr):
        return await _on_own_servers(say)


SERVER_NAMES = {"mongo": "MongoDB", "kafka": "Kafka-protocol broker", "s3": "S3"}


def _starting(own_servers: list[str]) -> str:
    """What the demo starts: the servers no variable points elsewhere, and the services."""
    if not own_servers:
        return "Starting the five services on the external servers…"
    names = ", ".join(SERVER_NAMES[server] for server in own_servers)
    return f"Starting local servers ({names}) and the five services…"


async def civic_events_on(bootstrap_servers: str) -> list[str]:
    """The Civic topics on a broker that already hold events."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers)
    try:
        await consumer.start()
        known = await consumer.topics()
        partitions = [
            TopicPartition(topic.name, p)
            for topic in TOPICS
            if topic.name in known
            for p in consumer.partitions_for_topic(topic.name) or ()
        ]
        ends = await consumer.end_offsets(partitions)
        return sorted({tp.topic for tp, end in ends.items() if end > 0})
    finally:
        await consumer.stop()


async def _on_own_servers(say: Callable[[str], None]) -> int:
    outside = Settings()
    with tempfile.TemporaryDirectory(prefix="civic-demo-") as tmp:
        stack = LocalStack(Path(tmp) / "servers", Ports.free())
        # Its databases are its own, but topics are the broker's: the demo's consumers would
        # read another platform's registry and count its households as the pilot's.
        if "kafka" not in stack.own_servers() and (
            used := await civic_events_on(outside.kafka_bootstrap_servers)
        ):
            print(
                f"error: the broker at {outside.kafka_bootstrap_servers} already holds Civic "
                f"events ({', '.join(used)}); the demo needs a broker of its own "
                "(unset KAFKA_BOOTSTRAP_SERVERS to have it start one)",
                file=sys.stderr,
            )
            return 2
        say(_starting(stack.own_servers()))
        # Ctrl-C while the servers start cannot stop the thread starting them: the finally
        # waits for it, then stops what it started, before their directory is removed.
        starting = asyncio.ensure_future(asyncio.to_thread(stack.up))
        try:
            endpoints = await asyncio.shield(starting)
            stack.stop_with(os.getpid())
            settings = isolated_settings(
                endpoints,
                "demo",
                otel_exporter_otlp_endpoint=outside.otel_exporter_otlp_endpoint,
                outbox_poll_seconds=0.2,
            )
            # Its spans are recorded, exported or not: the story shows their trace ids.
            setup_telemetry("civic-demo", settings, record=True)
            clock = Clock()
            async with pilot_services(settings, clock) as targets:
                day = await PilotDay(settings, targets, clock, say).play()
                provider = trace.get_tracer_provider()
                if isinstance(provider, TracerProvider):
                    provider.force_flush()
        finally:
            with contextlib.suppress(Exception):  # a start that failed stopped what it started
                await starting
            await asyncio.to_thread(stack.down)
    problems = day.problems()
    if not problems:
        say("\nThe day went as it should.")
        return 0
    say("\nSomething went differently: not so that " + "; ".join(problems) + ".")
    return 1

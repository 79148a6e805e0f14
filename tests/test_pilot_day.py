"""The pilot's day, as `civic demo` plays it, against the session's servers: every step is
checked from what the services answer, what object storage holds, what is on the topics and
which spans were made."""

from __future__ import annotations

import json

import pytest
from civic.tickets.v1 import events_pb2
from minio import Minio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services import demo_day
from services.common.cloudevents import type_name
from services.common.config import Settings
from services.demo_day import (
    ALLEY,
    DISTRICT,
    GROUP,
    HOME,
    PAYERS,
    WARD,
    Day,
    PilotDay,
    civic_events_on,
    pilot_services,
    until,
)
from services.demo_map import pilot_maps, street_entry
from services.gis.geometry import distance_m
from services.tickets.main import PHOTO_BUCKET
from tests.conftest import Clock
from tests.registry_fixtures import City

STATEMENTS = "civic-statements"


async def play(settings: Settings, span_processor: SimpleSpanProcessor) -> tuple[Day, list[str]]:
    # Databases and consumer groups of its own: the day's services are not the other tests'.
    own = settings.model_copy(update={"database_prefix": settings.database_prefix + "day"})
    clock = Clock()
    said: list[str] = []
    async with pilot_services(own, clock, span_processor) as targets:
        day = await PilotDay(own, targets, clock, said.append).play()
    return day, said


def read_object(bucket: Minio, key: str, name: str = STATEMENTS) -> bytes:
    response = bucket.get_object(name, key)
    try:
        data: bytes = response.read()
        return data
    finally:
        response.close()
        response.release_conn()


async def test_a_day_in_the_pilot(
    settings: Settings,
    span_processor: SimpleSpanProcessor,
    spans: InMemorySpanExporter,
    bucket: Minio,
) -> None:
    day, said = await play(settings, span_processor)
    text = "\n".join(said)
    assert day.problems() == []

    # A birth: the baby is a member of the new household, whose point is where the registry
    # put it.
    assert day.household_id and day.baby_id
    assert day.baby_id in day.members and len(day.members) == 2
    assert day.map_point == [HOME.longitude, HOME.latitude]
    assert "appears on the ward's map" in text

    # The map: the water point nearest the flooded alley is the one the pilot map has nearest
    # to it, and a fire engine's way to the new family's home runs from the street to its door.
    pilot_map = next(m for m in pilot_maps() if m.group == GROUP)
    flooded = (ALLEY.longitude, ALLEY.latitude)
    metres, name = min(
        (distance_m(flooded, tuple(h["geometry"]["coordinates"])), h["properties"]["name"])
        for h in pilot_map.hydrants
    )
    assert day.flood_hydrant is not None and day.flood_hydrant.name == name
    assert day.flood_hydrant.distance_m == pytest.approx(metres, abs=0.05)
    route = day.fire_route
    assert route is not None and route.hydrants
    line = json.loads(route.geojson)["features"][0]["geometry"]["coordinates"]
    assert line[-1] == day.map_point
    assert route.length_m >= distance_m(street_entry(GROUP), (HOME.longitude, HOME.latitude))
    assert day.map_png.startswith(b"\x89PNG")
    assert "nearest the flooded alley" in text

    # The storm warning reached exactly the district's households with someone over 70.
    assert day.elderly_households, "the pilot data has elderly people in the district"
    assert day.warned_households == day.elderly_households
    assert day.delivered == len(day.elderly_households)
    assert day.household_id not in day.warned_households  # a young family and a newborn

    # The flooding ticket went to the ward, then, unacknowledged past its deadline, the district.
    assert day.routed_to == WARD
    assert day.escalated_to == DISTRICT
    assert day.clock_moved.total_seconds() > 12 * 3600  # flooding: 12 hours to acknowledge
    photo = read_object(bucket, day.photo_key, PHOTO_BUCKET)
    assert photo.startswith(b"\x89PNG")

    # Dues: some households paid, and the exported statement is in object storage.
    assert len(day.payers) == PAYERS and len(set(day.payers)) == PAYERS
    assert day.collected == PAYERS * 50_000
    csv = read_object(bucket, day.statement_csv_key).decode("utf-8-sig")
    assert str(day.collected) in csv.replace(",", "").replace(".", "")
    assert read_object(bucket, day.statement_pdf_key).startswith(b"%PDF")

    # The auditor's replay matches the live books, this fund included.
    report = day.replay_report
    assert report is not None and report.ok, report.text() if report else ""
    assert report.compared >= 1 and report.transactions >= 1 + PAYERS

    # The integrator saw the ticket's events, in the order they happened.
    types = [line.split()[1] for line in day.integrator_lines]
    name = "civic.tickets.v1."
    assert types[0] == type_name(events_pb2.TicketSubmitted())
    assert types[-1] == type_name(events_pb2.TicketEscalated())
    assert sorted(types) == sorted(
        name + kind
        for kind in ("TicketSubmitted", "PhotoAttached", "TicketRouted", "TicketEscalated")
    )
    assert all(f"key={day.ticket_id}" in line for line in day.integrator_lines)
    escalated = json.loads(day.integrator_lines[-1].split(" ", 4)[4])
    assert (escalated["from_unit_id"], escalated["to_unit_id"]) == (WARD, DISTRICT)

    # Traces: the day is one trace; each step is a span under the day's span, and the calls,
    # relays and consumers each step set off continue it.
    finished = spans.get_finished_spans()
    ours = [s for s in finished if format(s.context.trace_id, "032x") == day.trace_id]
    root = next(s for s in ours if s.name == "a day in the pilot")
    assert root.parent is None
    steps = {
        s.name: s for s in ours if s.parent is not None and s.parent.span_id == root.context.span_id
    }
    assert [step.title for step in day.steps] == list(steps)
    assert {step.trace_id for step in day.steps} == {day.trace_id}
    names = {s.name for s in ours}
    for rpc in (
        "civic.registry.v1.RegistryService/RegisterBirth",
        "civic.notices.v1.NoticesService/PublishNotice",
        "civic.tickets.v1.TicketsService/SubmitTicket",
        "civic.ledger.v1.LedgerService/ExportStatement",
        "civic.gis.v1.GisService/ListFeatures",
        "civic.gis.v1.GisService/PlanFireRoute",
    ):
        assert rpc in names, rpc
    consumed = {(s.name, (s.attributes or {}).get("cloudevents.event_type")) for s in ours}
    # The map learnt of the new household, and the ticket was routed, within the day's trace;
    # hours later the deadline sweep's escalation continues it.
    assert ("civic.registry.v1 process", "civic.registry.v1.HouseholdCreated") in consumed
    assert ("civic.tickets.v1 process", type_name(events_pb2.TicketSubmitted())) in consumed
    assert ("civic.tickets.v1 publish", type_name(events_pb2.TicketEscalated())) in consumed
    assert "escalate overdue ticket" in names
    # The load before the day is a trace of its own, not thousands of spans in the day's.
    assert "civic.registry.v1.RegistryService/ImportPersons" not in names
    assert len(ours) < 1_000
    assert GROUP.unit_id in text and "one trace" in text


async def test_the_demo_refuses_a_broker_already_holding_civic_events(
    settings: Settings,
    city: City,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its databases would be its own but not the topics: its consumers would count another
    platform's households as the pilot's. It says so in one line, and starts nothing."""
    await until(
        lambda: civic_events_on(settings.kafka_bootstrap_servers), "the city's events on the broker"
    )
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)
    assert await demo_day.command() == 2
    captured = capsys.readouterr()
    assert not captured.out
    [said] = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert "already holds Civic events (" in said and "civic.registry.v1" in said

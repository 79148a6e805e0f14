"""What another team's system sees: the ticket events on civic.tickets.v1, read by a plain aiokafka
consumer in its own consumer group (as docs/integrators.md tells integrators to), free of the
submitter's personal data; more detail through GetTicket with an integrator token in scope; and
one trace from a submission through the routing consumer."""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import uuid
from asyncio.subprocess import PIPE
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from civic.common.v1 import types_pb2
from civic.tickets.v1 import events_pb2, tickets_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind

from services import cli
from services.common.auth import Role
from services.common.config import Settings
from services.tickets.events import TOPIC
from services.tickets.main import NAME, SERVICE_NAME
from tests.conftest import TEST_SECRET, Clock
from tests.kafka_reader import Record, eventually, with_key
from tests.registry.test_tracing import parent_id, span_id
from tests.tickets.conftest import Pilot, TicketCaller, rid

DECODER = Path(__file__).resolve().parents[2] / "docs" / "decode_ticket_event.py"
# What kcat prints per record with the format docs/integrators.md uses (see the decoder).
KCAT_FORMAT = "{key}\t{partition}\t{offset}\t{length}\t{headers}\n"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
DESCRIPTION = "Đèn đường trước nhà số 12 hỏng ba hôm, con tôi đi học về tối rất sợ"
COMMENT = "Tối nay vẫn chưa sáng, số điện thoại của tôi 0905 123 456"


def ce(name: str) -> str:
    return f"civic.tickets.v1.{name}"


class Integrator:
    """An outside system's consumer: its own group, from the earliest offset, committing what it
    has read, so that a restart of the same group continues where it stopped."""

    def __init__(self, bootstrap_servers: str, group_id: str) -> None:
        self.consumer = AIOKafkaConsumer(
            TOPIC,
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        self.records: list[Record] = []

    async def read_until(self, ticket_id: str, last_type: str, within: float = 20.0) -> None:
        """Read (and commit) until the ticket's event of `last_type` has been read."""
        await self.read_until_all({ticket_id: last_type}, within)

    async def read_until_all(self, wanted: dict[str, str], within: float = 20.0) -> None:
        """Read (and commit) until, for each ticket id in `wanted`, its event of that type."""

        def missing() -> list[str]:
            return [
                ticket_id
                for ticket_id, last_type in wanted.items()
                if last_type not in types(with_key(self.records, ticket_id))
            ]

        await self.consumer.start()
        try:
            deadline = datetime.now(UTC) + timedelta(seconds=within)
            while missing():
                assert datetime.now(UTC) < deadline, f"not read in {within} s: {wanted}"
                batches = await self.consumer.getmany(timeout_ms=500)
                for batch in batches.values():
                    self.records.extend(Record.of(raw) for raw in batch)
                await self.consumer.commit()
        finally:
            await self.consumer.stop()


def types(records: list[Record]) -> list[str]:
    return [record.event_type for record in records]


async def submit(caller: TicketCaller, category: str = "street-light") -> tickets_pb2.Ticket:
    response = await caller.SubmitTicket(
        tickets_pb2.SubmitTicketRequest(
            request_id=rid(), category=category, description=DESCRIPTION
        )
    )
    ticket: tickets_pb2.Ticket = response.ticket
    return ticket


async def lifecycle_until_acknowledged(pilot: Pilot, resident: TicketCaller) -> str:
    ticket = await submit(resident)
    await pilot.routed(ticket.ticket_id, resident)
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket.ticket_id)
    )
    return str(ticket.ticket_id)


async def lifecycle_to_the_end(pilot: Pilot, resident: TicketCaller, ticket_id: str) -> None:
    officer = pilot.ward_officer
    await officer.StartWork(tickets_pb2.StartWorkRequest(request_id=rid(), ticket_id=ticket_id))
    await resident.AddComment(
        tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text=COMMENT)
    )
    await officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=ticket_id, resolution="Đã thay bóng đèn"
        )
    )
    await resident.CloseTicket(
        tickets_pb2.CloseTicketRequest(request_id=rid(), ticket_id=ticket_id)
    )
    await resident.RateResolution(
        tickets_pb2.RateResolutionRequest(request_id=rid(), ticket_id=ticket_id, rating=5)
    )


async def test_an_outside_consumer_group_reads_a_tickets_history_in_order(
    pilot: Pilot, settings: Settings
) -> None:
    started = datetime.now(UTC)
    subject = f"vneid-{uuid.uuid4().hex[:12]}"
    resident = pilot.caller(Role.RESIDENT, pilot.city.group, pilot.household_id, subject)
    group_id = f"integrator-{uuid.uuid4().hex[:8]}"

    ticket_id = await lifecycle_until_acknowledged(pilot, resident)
    first = Integrator(settings.kafka_bootstrap_servers, group_id)
    await first.read_until(ticket_id, ce("TicketAcknowledged"))
    await lifecycle_to_the_end(pilot, resident, ticket_id)
    # The same group, restarted: it goes on from its committed offsets, not from the start.
    second = Integrator(settings.kafka_bootstrap_servers, group_id)
    await second.read_until(ticket_id, ce("TicketRated"))

    before = with_key(first.records, ticket_id)
    after = with_key(second.records, ticket_id)
    assert types(before) == [ce("TicketSubmitted"), ce("TicketRouted"), ce("TicketAcknowledged")]
    assert types(after) == [
        ce("TicketWorkStarted"),
        ce("TicketCommented"),
        ce("TicketResolved"),
        ce("TicketClosed"),
        ce("TicketRated"),
    ]
    history = before + after
    # One partition (the key's), in offset order: the ticket's history as it happened.
    assert {record.partition for record in history} == {history[0].partition}
    offsets = [record.offset for record in history]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert len({record.event_id for record in history}) == len(history)
    for record in history:
        assert record.key == ticket_id.encode()
        headers = record.header_map
        assert headers["ce_specversion"] == "1.0"
        assert headers["ce_source"] == "/civic/tickets"
        assert headers["ce_subject"] == ticket_id
        assert headers["content-type"] == "application/protobuf"
        assert RFC3339.match(headers["ce_time"]), headers["ce_time"]
        occurred = datetime.fromisoformat(headers["ce_time"].replace("Z", "+00:00"))
        assert started - timedelta(seconds=5) <= occurred <= datetime.now(UTC)
        assert TRACEPARENT.match(headers["traceparent"]), headers["traceparent"]
        # Decodable by its ce_type with nothing but the published protos.
        assert getattr(record.event().message(), "ticket_id", None) == ticket_id

    submitted = events_pb2.TicketSubmitted.FromString(history[0].value)
    assert submitted.category == "street-light"
    assert submitted.origin_unit_id == pilot.city.group
    routed = events_pb2.TicketRouted.FromString(history[1].value)
    assert routed.assigned_unit_id == pilot.city.ward
    assert routed.assigned_level == tickets_pb2.LEVEL_WARD
    assert routed.department == "urban-order"
    resolved = events_pb2.TicketResolved.FromString(history[5].value)
    assert resolved.resolved_by_unit_id == pilot.city.ward
    assert events_pb2.TicketRated.FromString(history[7].value).rating == 5

    # No personal data of the submitter anywhere on the wire: neither what they wrote nor who
    # they are (their token subject) is in any value or header; an official's acts name them.
    for record in history:
        wire = record.value + b"".join(value for _, value in record.headers)
        for secret in (DESCRIPTION, COMMENT, subject):
            assert secret.encode() not in wire, f"{secret!r} leaked into {record.event_type}"
    assert history[2].header("ce_actor") == f"{Role.WARD_OFFICER.value}@{pilot.city.ward}"

    # The documented decoder turns the records, framed as kcat prints them, into JSON lines.
    framed = b"".join(
        KCAT_FORMAT.format(
            key=record.key_text,
            partition=record.partition,
            offset=record.offset,
            length=len(record.value),
            headers=",".join(f"{name}={value.decode()}" for name, value in record.headers),
        ).encode()
        + record.value
        + b"\n"
        for record in history
    )
    decoder = await asyncio.create_subprocess_exec(
        sys.executable, str(DECODER), stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(decoder.communicate(framed), 30)
    assert decoder.returncode == 0, err.decode()
    decoded = out.decode()
    lines = decoded.splitlines()
    assert len(lines) == len(history), decoded
    assert lines[1].startswith(f"{ticket_id} {history[1].partition}:{history[1].offset} ")
    assert ce("TicketRouted") in lines[1]
    assert f'"assignedUnitId": "{pilot.city.ward}"' in lines[1]
    assert '"department": "urban-order"' in lines[1]


async def test_submitter_ref_is_an_opaque_pseudonym_stable_per_submitter(
    pilot: Pilot, settings: Settings
) -> None:
    subject = f"vneid-{uuid.uuid4().hex[:12]}"
    resident = pilot.caller(Role.RESIDENT, pilot.city.group, pilot.household_id, subject)
    neighbour = pilot.caller(
        Role.RESIDENT, pilot.city.group, pilot.household_id, f"vneid-{uuid.uuid4().hex[:12]}"
    )
    tickets = [
        await pilot.submit("street-light", caller=resident),
        await pilot.submit("noise", caller=resident),
        await pilot.submit("flooding", caller=neighbour),
    ]
    ids = [ticket.ticket_id for ticket in tickets]
    reader = Integrator(settings.kafka_bootstrap_servers, f"integrator-{uuid.uuid4().hex[:8]}")
    await reader.read_until_all(dict.fromkeys(ids, ce("TicketSubmitted")))
    refs = []
    for ticket_id in ids:
        [record] = [
            r for r in with_key(reader.records, ticket_id) if r.event_type == ce("TicketSubmitted")
        ]
        refs.append(events_pb2.TicketSubmitted.FromString(record.value).submitter_ref)
    mine, mine_again, theirs = refs
    assert re.fullmatch(r"[0-9a-f]{24}", mine), mine
    assert mine == mine_again
    assert theirs != mine
    # Not the subject, nor a plain (unkeyed) hash of it that anyone could recompute.
    assert subject not in mine
    assert mine != hashlib.sha256(subject.encode()).hexdigest()[:24]


async def test_integrator_in_scope_gets_more_detail_and_outside_scope_nothing(
    pilot: Pilot,
) -> None:
    ticket = await submit(pilot.resident)
    await pilot.routed(ticket.ticket_id)
    in_scope = pilot.caller(Role.INTEGRATOR, pilot.city.ward, subject="integrator-water-co")
    elsewhere = pilot.caller(
        Role.INTEGRATOR, f"{pilot.city.district}.other", subject="integrator-elsewhere"
    )

    got = await in_scope.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket.ticket_id))
    assert got.ticket.ticket_id == ticket.ticket_id
    assert got.ticket.description == DESCRIPTION  # more than the event carries
    assert got.ticket.origin_unit_id == pilot.city.group
    assert got.ticket.submitted_at.seconds > 0
    # Who filed it is shown only to the submitter and officials in scope (tickets.proto); nor
    # the household, nor its place, which the ticket took for want of a place of its own.
    assert got.ticket.submitter == ""
    assert got.ticket.household_id == ""
    assert not got.ticket.HasField("location")
    official = await pilot.ward_officer.GetTicket(
        tickets_pb2.GetTicketRequest(ticket_id=ticket.ticket_id)
    )
    assert official.ticket.submitter == "resident-1"
    assert official.ticket.household_id == pilot.household_id
    assert official.ticket.HasField("location")
    # A place the resident gave is the problem's, not the home's: shown.
    placed = await pilot.submit(location=types_pb2.GeoPoint(latitude=16.07, longitude=108.22))
    got = await in_scope.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=placed.ticket_id))
    assert got.ticket.household_id == ""
    assert got.ticket.location.latitude == 16.07
    # Nor does a comment name its author, unless an official wrote it.
    for caller, text in ((pilot.resident, "vẫn còn hỏng"), (pilot.ward_officer, "đã báo điện lực")):
        await caller.AddComment(
            tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket.ticket_id, text=text)
        )
    got = await in_scope.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket.ticket_id))
    assert [(c.author, c.text) for c in got.ticket.comments] == [
        ("", "vẫn còn hỏng"),
        (f"ward_officer@{pilot.city.ward}", "đã báo điện lực"),
    ]
    official = await pilot.ward_officer.GetTicket(
        tickets_pb2.GetTicketRequest(ticket_id=ticket.ticket_id)
    )
    assert official.ticket.comments[0].author == "resident-1"

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await elsewhere.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket.ticket_id))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    # An integrator reads; it does not handle tickets.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await in_scope.AcknowledgeTicket(
            tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket.ticket_id)
        )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_tokens_the_civic_command_mints_keep_the_submitter_from_an_integrator(
    pilot: Pilot, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As docs/integrators.md has it in development: one operator mints a resident's token and an
    integrator's with `civic token`; the integrator is not taken for the ticket's submitter."""
    monkeypatch.setenv("CIVIC_AUTH_SECRET", TEST_SECRET)

    async def minted(*args: str) -> TicketCaller:
        assert await cli.run(["token", *args]) == 0
        return TicketCaller(pilot.target, capsys.readouterr().out.strip())

    resident = await minted(
        *("--role", "resident", "--scope", pilot.city.group, "--household", pilot.household_id)
    )
    integrator = await minted("--role", "integrator", "--scope", pilot.city.ward)
    ticket = await submit(resident)
    await pilot.routed(ticket.ticket_id, resident)

    got = await integrator.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket.ticket_id))
    assert (got.ticket.submitter, got.ticket.household_id) == ("", "")
    assert not got.ticket.HasField("location")
    # Nor does another household's resident, minted by the same operator, see it as theirs.
    neighbour = await minted(
        *("--role", "resident", "--scope", pilot.city.group, "--household", "hh-neighbour")
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await neighbour.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket.ticket_id))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def wait_for_span(
    spans: InMemorySpanExporter, match: Callable[[ReadableSpan], bool], what: str
) -> ReadableSpan:
    """The one span that `match`es, once exported. The registry and the tickets service share
    this process and both add the test's span processor, so each span is exported twice."""

    async def matching() -> dict[int, ReadableSpan]:
        return {span_id(span): span for span in spans.get_finished_spans() if match(span)}

    found = await eventually(matching, what=what)
    assert len(found) == 1, f"{len(found)} spans for {what}"
    return next(iter(found.values()))


async def test_the_trace_of_a_submission_continues_into_the_routing_consumer(
    pilot: Pilot, spans: InMemorySpanExporter, settings: Settings
) -> None:
    """Tickets filed at once commit in one transaction and are routed in one batch: each one's
    trace still runs unbroken from its client to the publish of its TicketRouted."""

    async def traced_submission(category: str) -> tuple[SpanContext, str]:
        with trace.get_tracer(__name__).start_as_current_span(
            "test client", kind=SpanKind.CLIENT
        ) as client:
            ticket = await pilot.submit(category)
        return client.get_span_context(), ticket.ticket_id

    # Of different categories, so none is linked to another as its duplicate.
    categories = ("street-light", "flooding", "noise")
    submissions = await asyncio.gather(*(traced_submission(c) for c in categories))
    for client_ctx, ticket_id in submissions:
        await pilot.routed(ticket_id)
        await check_one_chain(spans, settings, client_ctx)


async def check_one_chain(
    spans: InMemorySpanExporter, settings: Settings, client_ctx: SpanContext
) -> None:
    assert client_ctx.is_valid

    def in_trace(span: ReadableSpan, name: str, event_type: str = "") -> bool:
        attributes = span.attributes or {}
        return (
            span.context is not None
            and span.context.trace_id == client_ctx.trace_id
            and span.name == name
            and (not event_type or attributes.get("cloudevents.event_type") == event_type)
        )

    server = await wait_for_span(
        spans, lambda s: in_trace(s, f"{SERVICE_NAME}/SubmitTicket"), "the SubmitTicket span"
    )
    submitted = await wait_for_span(
        spans,
        lambda s: in_trace(s, f"{TOPIC} publish", ce("TicketSubmitted")),
        "the publish span of TicketSubmitted",
    )
    routing = await wait_for_span(
        spans,
        lambda s: in_trace(s, f"{TOPIC} process", ce("TicketSubmitted")),
        "the routing consumer's span",
    )
    routed = await wait_for_span(
        spans,
        lambda s: in_trace(s, f"{TOPIC} publish", ce("TicketRouted")),
        "the publish span of TicketRouted",
    )

    assert server.kind is SpanKind.SERVER
    assert submitted.kind is SpanKind.PRODUCER
    assert routing.kind is SpanKind.CONSUMER
    assert routed.kind is SpanKind.PRODUCER
    routing_group = settings.consumer_group(NAME, "routing")
    assert (routing.attributes or {}).get("messaging.consumer.group.name") == routing_group
    assert not (routing.attributes or {}).get("civic.duplicate")
    # One chain: client -> server -> publish -> routing consumer -> publish of its event.
    assert parent_id(server) == client_ctx.span_id
    assert server.parent is not None and server.parent.is_remote
    assert parent_id(submitted) == span_id(server)
    assert parent_id(routing) == span_id(submitted)
    assert routing.parent is not None and routing.parent.is_remote
    assert parent_id(routed) == span_id(routing)


async def test_an_automatic_escalation_continues_the_trace_of_the_tickets_filing(
    pilot: Pilot, spans: InMemorySpanExporter, clock: Clock
) -> None:
    """Hours later nobody's call starts the escalation, yet integrators and operators find its
    TicketEscalated in the trace the resident's filing began, not in a trace of its own."""
    with trace.get_tracer(__name__).start_as_current_span("test client") as client:
        ticket_id = (await pilot.submit("street-light")).ticket_id
    await pilot.routed(ticket_id)
    trace_id = client.get_span_context().trace_id

    def in_trace(span: ReadableSpan, name: str) -> bool:
        return span.context is not None and span.context.trace_id == trace_id and span.name == name

    server = await wait_for_span(
        spans, lambda s: in_trace(s, f"{SERVICE_NAME}/SubmitTicket"), "the SubmitTicket span"
    )
    clock.advance(hours=25)  # past the ward's 24 h to acknowledge
    published = await wait_for_span(
        spans,
        lambda s: (
            in_trace(s, f"{TOPIC} publish")
            and (s.attributes or {}).get("cloudevents.event_type") == ce("TicketEscalated")
        ),
        "the publish span of TicketEscalated",
    )
    sweep = next(s for s in spans.get_finished_spans() if span_id(s) == parent_id(published))
    assert sweep.name == "escalate overdue ticket"
    assert (sweep.attributes or {}).get("civic.ticket_id") == ticket_id
    assert parent_id(sweep) == span_id(server)

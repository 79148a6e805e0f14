"""One trace from a caller's span through the gRPC server, the outbox relay and Kafka into the
household-history consumer, as a chain of parent spans."""

from __future__ import annotations

from collections.abc import Callable

from civic.registry.v1 import registry_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common.config import Settings
from services.registry.events import TOPIC
from services.registry.main import NAME
from tests.kafka_reader import eventually
from tests.registry_fixtures import City, new_household

HOUSEHOLD_CREATED = "civic.registry.v1.HouseholdCreated"
SERVER_SPAN = "civic.registry.v1.RegistryService/CreateHousehold"


async def wait_for_span(
    spans: InMemorySpanExporter, match: Callable[[ReadableSpan], bool], what: str
) -> ReadableSpan:
    """The one finished span that `match`es, once it has been exported."""

    async def matching() -> list[ReadableSpan]:
        return [span for span in spans.get_finished_spans() if match(span)]

    found = await eventually(matching, what=what)
    assert len(found) == 1, f"{len(found)} spans for {what}"
    return found[0]


def parent_id(span: ReadableSpan) -> int | None:
    return int(span.parent.span_id) if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


async def test_one_trace_from_grpc_call_through_outbox_and_kafka_to_consumer(
    city: City, spans: InMemorySpanExporter, settings: Settings
) -> None:
    # The global provider is the SDK one the registry installed, exporting to `spans`.
    with trace.get_tracer(__name__).start_as_current_span(
        "test client", kind=SpanKind.CLIENT
    ) as client:
        created = await new_household(city.leader, city.group)
    household_id = created.household.household_id
    client_ctx = client.get_span_context()
    trace_id = client_ctx.trace_id
    assert client_ctx.is_valid

    # The household-history consumer has handled the event once the history shows it.
    async def created_in_history() -> list[registry_pb2.HouseholdHistoryEntry]:
        history = await city.leader.GetHouseholdHistory(
            registry_pb2.GetHouseholdHistoryRequest(household_id=household_id)
        )
        return [e for e in history.entries if e.event_type == HOUSEHOLD_CREATED]

    [entry] = await eventually(created_in_history, what="HouseholdCreated in the history")

    def in_trace(span: ReadableSpan) -> bool:
        return span.context is not None and span.context.trace_id == trace_id

    server = await wait_for_span(
        spans, lambda s: in_trace(s) and s.name == SERVER_SPAN, "the server span in the trace"
    )
    # The command's transaction (HouseholdCreated and the head's PersonRegistered) is published
    # under one span.
    publish = await wait_for_span(
        spans,
        lambda s: in_trace(s) and s.name == f"{TOPIC} publish",
        "the publish span of the command's events in the client's trace",
    )
    history_group = settings.consumer_group(NAME, "household-history")
    # Other services' consumers (tickets' view of the tree) handle the same event in the trace.
    process = await wait_for_span(
        spans,
        lambda s: (
            in_trace(s)
            and s.name == f"{TOPIC} process"
            and (s.attributes or {}).get("messaging.message.id") == entry.event_id
            and (s.attributes or {}).get("messaging.consumer.group.name") == history_group
        ),
        "the process span of HouseholdCreated in the client's trace",
    )

    assert server.kind is SpanKind.SERVER
    assert publish.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert (publish.attributes or {}).get("messaging.batch.message_count") == 2
    assert (process.attributes or {}).get("messaging.consumer.group.name") == history_group
    assert not (process.attributes or {}).get("civic.duplicate")

    # One chain: client -> server -> publish -> process.
    assert parent_id(server) == client_ctx.span_id
    assert server.parent is not None and server.parent.is_remote
    assert parent_id(publish) == span_id(server)
    assert parent_id(process) == span_id(publish)
    assert process.parent is not None and process.parent.is_remote

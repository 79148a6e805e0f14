"""OpenTelemetry tracing: one trace from a gRPC call through the outbox and Kafka to a consumer.

Context travels as W3C `traceparent` in gRPC metadata and in Kafka headers; the outbox stores it
with the event so the relay, possibly after a restart, continues the same trace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from services.common.config import Settings

_added: set[SpanProcessor] = set()


def setup_telemetry(
    service_name: str,
    settings: Settings,
    processor: SpanProcessor | None = None,
    *,
    record: bool = False,
) -> None:
    """Install the global tracer provider once per process; later calls only add a processor.

    With no exporter configured, no processor given and no `record` (a caller that shows its
    trace ids), none is installed: spans nobody could see are not recorded (a few percent of a
    busy service's CPU), and the API's default tracer passes an incoming trace context through
    unchanged, so a trace still runs across services that do export."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        # Several services in one process (tests, benchmarks) share the provider: add a given
        # processor once, or every span would be exported once per service.
        if processor is not None and processor not in _added:
            _added.add(processor)
            current.add_span_processor(processor)
        return
    if not (settings.otel_exporter_otlp_endpoint or processor or record):
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otel_exporter_otlp_endpoint, insecure=True)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if processor is not None:
        _added.add(processor)
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_trace_headers() -> dict[str, str]:
    """The active context as W3C headers (`traceparent`, `tracestate`)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from_headers(headers: Mapping[str, str]) -> otel_context.Context:
    return propagate.extract(dict(headers))


def context_from_pairs(pairs: Iterable[tuple[str, str | bytes]]) -> otel_context.Context:
    carrier = {
        key.lower(): value.decode() if isinstance(value, bytes) else value for key, value in pairs
    }
    return propagate.extract(carrier)

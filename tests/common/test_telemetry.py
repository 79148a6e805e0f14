"""Tracing set-up: spans are recorded only when something can see them, and a trace context
passes through a service either way. Each case runs in a fresh interpreter, since a process
installs its tracer provider once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

CASE = textwrap.dedent(
    """
    import json, os, sys
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from services.common.config import Settings
    from services.common.telemetry import (
        context_from_headers, current_trace_headers, setup_telemetry, tracer,
    )

    endpoint, record = sys.argv[1], sys.argv[2] == "record"
    settings = Settings(otel_exporter_otlp_endpoint=endpoint or None)
    setup_telemetry("civic-test", settings, record=record)
    parent = context_from_headers({"traceparent": sys.argv[3]})
    with tracer("test").start_as_current_span("handle", context=parent) as span:
        headers = current_trace_headers()
        recording = span.is_recording()
    print(json.dumps({
        "sdk": isinstance(trace.get_tracer_provider(), TracerProvider),
        "recording": recording,
        "traceparent": headers.get("traceparent", ""),
    }), flush=True)
    os._exit(0)  # no export of the batch at exit: nothing listens
    """
)


def run_case(endpoint: str = "", record: bool = False) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CASE, endpoint, "record" if record else "-", PARENT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_with_nothing_to_export_spans_are_not_recorded_and_the_trace_passes_through() -> None:
    result = run_case()
    assert result == {"sdk": False, "recording": False, "traceparent": PARENT}


def test_a_caller_that_shows_trace_ids_records_them_in_the_incoming_trace() -> None:
    result = run_case(record=True)
    assert result["sdk"] is True and result["recording"] is True
    traceparent = str(result["traceparent"])
    # The same trace, under a span of its own.
    assert traceparent.split("-")[1] == PARENT.split("-")[1]
    assert traceparent.split("-")[2] != PARENT.split("-")[2]


def test_with_an_exporter_configured_spans_are_recorded() -> None:
    # Nothing listens there: the exporter is only built.
    result = run_case(endpoint="http://127.0.0.1:9")
    assert result["sdk"] is True and result["recording"] is True

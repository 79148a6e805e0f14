"""A service process's life: start-up, serving, and stopping, also when start-up fails."""

from __future__ import annotations

import socket
from uuid import uuid4

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from services.common.config import Settings
from services.common.runtime import serve_until_signalled
from services.registry.main import NAME, RegistryService


async def test_a_service_that_cannot_listen_stops_what_it_had_started(
    settings: Settings, span_processor: SimpleSpanProcessor
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # Consumer groups of its own: a static member it leaves in the session's groups would
        # hold up the session's registry when it joins them.
        busy = settings.model_copy(
            update={"grpc_port": taken.getsockname()[1], "database_prefix": f"rt{uuid4().hex[:8]}"}
        )
        service = RegistryService(busy, span_processor=span_processor)
        with pytest.raises(OSError, match="cannot listen"):
            await serve_until_signalled(NAME, lambda: service)
    # Kafka was up before the port was tried: its producer and consumers are stopped again.
    relay = service.host.relay
    assert relay is not None and relay.producer is not None and relay.producer._closed
    assert not service.host.broker.running

"""A service process's life: start-up, serving, and stopping, also when start-up fails."""

from __future__ import annotations

import asyncio
import socket
from uuid import uuid4

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from services.common.config import Settings
from services.common.runtime import cancel_and_wait, serve_until_signalled, woken_or_after
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


async def test_a_sweep_stopped_as_it_is_woken_stops() -> None:
    """Work arrives (the wake is set) in the very moment the service stops the sweep: the
    sweep must stop, or stopping the service waits for it forever."""
    wake = asyncio.Event()
    sleeping = asyncio.create_task(woken_or_after(wake, 60))
    await asyncio.sleep(0)  # asleep on the wake
    wake.set()
    sleeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(sleeping, 5)


async def test_a_sweep_sleeps_until_woken_or_its_time_is_up() -> None:
    wake = asyncio.Event()
    woken = asyncio.create_task(woken_or_after(wake, 60))
    await asyncio.sleep(0)
    assert not woken.done()
    wake.set()
    await asyncio.wait_for(woken, 5)
    assert not wake.is_set(), "the wake is cleared for the next sleep"
    await asyncio.wait_for(woken_or_after(wake, 0.01), 5)  # nobody wakes it: its time is up


async def test_a_task_that_drops_a_cancellation_is_cancelled_again_until_it_ends() -> None:
    """As PyMongo now and then does mid-operation: the sweep's loop would run on, and stopping
    the service would wait for it forever."""
    dropped = 0

    async def sweep() -> None:
        nonlocal dropped
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if dropped == 2:
                    raise
                dropped += 1

    task = asyncio.create_task(sweep())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), 10)
    assert task.cancelled() and dropped == 2


async def test_stopping_a_task_raises_what_it_failed_with() -> None:
    async def fails() -> None:
        raise ValueError("the sweep's own error")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="own error"):
        await cancel_and_wait(task)
    await cancel_and_wait(None)  # nothing started: nothing to stop

"""Wiring of the registry service: `python -m services.registry.main`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor

from services.common.config import Settings, get_settings
from services.common.runtime import run_async, serve_until_signalled
from services.common.service import ServiceHost
from services.registry.api import RegistryServicer
from services.registry.domain import CitizenIdVault
from services.registry.events import TOPIC, history_consumer
from services.registry.store import RegistryStore

NAME = "registry"
SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


class RegistryService:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        span_processor: SpanProcessor | None = None,
    ) -> None:
        self.host = host = ServiceHost(
            NAME, settings, topic=TOPIC, span_processor=span_processor, clock=clock
        )
        self.client, self.db = host.client, host.db
        self.store = RegistryStore(self.db)
        host.consume(
            history_consumer(
                self.store,
                host.client,
                group_id=host.consumer_group("household-history"),
                instance_id=host.instance,
            )
        )
        self.servicer = RegistryServicer(
            self.store,
            host.client,
            host.commands,
            host.outbox,
            CitizenIdVault(settings.data_key),
            clock,
        )
        host.serve(
            SERVICE_NAME,
            lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(
                self.servicer, server
            ),
        )

    @property
    def port(self) -> int:
        return self.host.port

    async def start(self) -> int:
        await self.store.ensure_indexes()
        return await self.host.start()

    async def stop(self) -> None:
        await self.host.stop()


if __name__ == "__main__":
    run_async(serve_until_signalled(NAME, lambda: RegistryService(get_settings())))

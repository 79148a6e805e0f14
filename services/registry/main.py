"""Wiring of the registry service: `python -m services.registry.main`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor

from services.common.broker import kafka_broker
from services.common.commands import CommandRunner
from services.common.config import Settings, get_settings
from services.common.grpc_server import GrpcServer
from services.common.mongo import mongo_client
from services.common.outbox import Outbox, OutboxRelay
from services.common.runtime import serve_until_signalled, stop_within
from services.common.telemetry import setup_telemetry
from services.registry.api import RegistryServicer
from services.registry.domain import CitizenIdVault
from services.registry.events import SOURCE, TOPIC, subscribe_history
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
        setup_telemetry(f"civic-{NAME}", settings, span_processor)
        self.settings = settings
        self.client = mongo_client(settings.mongo_uri)
        self.db = self.client[settings.database_for(NAME)]
        self.store = RegistryStore(self.db)
        self.outbox = Outbox(self.db, source=SOURCE, topic=TOPIC)
        self.broker = kafka_broker(settings.kafka_bootstrap_servers, f"civic-{NAME}")
        self.instance = settings.instance_for(NAME)
        subscribe_history(
            self.store,
            self.broker,
            self.client,
            group_id=settings.consumer_group(NAME, "household-history"),
            instance_id=self.instance,
        )
        self.servicer = RegistryServicer(
            self.store,
            self.client,
            CommandRunner(self.client, self.db, self.outbox),
            self.outbox,
            CitizenIdVault(settings.data_key),
            clock,
        )
        self.server = GrpcServer(
            host=settings.grpc_host,
            port=settings.port_for(NAME),
            auth_secret=settings.auth_secret,
            service_names=[SERVICE_NAME],
            register=lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(
                self.servicer, server
            ),
        )
        self.relay: OutboxRelay | None = None
        self.port = 0

    async def start(self) -> int:
        await self.store.ensure_indexes()
        await self.broker.start()
        self.port = port = await self.server.start()
        self.relay = OutboxRelay(
            self.db,
            self.outbox,
            self.broker,
            owner=self.instance,
            poll_seconds=self.settings.outbox_poll_seconds,
        )
        self.relay.start()
        return port

    async def stop(self) -> None:
        await stop_within(10, "gRPC server", self.server.stop())
        if self.relay is not None:
            await stop_within(10, "outbox relay", self.relay.stop())
        await stop_within(15, "Kafka clients", self.broker.stop())
        await self.client.close()


if __name__ == "__main__":
    asyncio.run(serve_until_signalled(NAME, lambda: RegistryService(get_settings())))

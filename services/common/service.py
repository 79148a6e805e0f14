"""What every Civic service process runs around its own domain: MongoDB, commands with the
transactional outbox and its relay to Kafka, consumers, and the gRPC server."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime

import grpc
from opentelemetry.sdk.trace import SpanProcessor

from services.common.broker import kafka_broker, outbox_producer, subscribe_once
from services.common.commands import CommandRunner
from services.common.config import Settings
from services.common.consumer import TopicConsumer
from services.common.grpc_server import GrpcServer
from services.common.mongo import mongo_client
from services.common.outbox import Outbox, OutboxRelay
from services.common.parking import RETRY_PARKED_S
from services.common.runtime import Every, stop_within
from services.common.telemetry import setup_telemetry


class ServiceHost:
    def __init__(
        self,
        name: str,
        settings: Settings,
        *,
        topic: str,
        span_processor: SpanProcessor | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        setup_telemetry(f"civic-{name}", settings, span_processor)
        self.name = name
        self.settings = settings
        self.client = mongo_client(settings.mongo_uri)
        self.db = self.client[settings.database_for(name)]
        self.instance = settings.instance_for(name)
        self.outbox = Outbox(
            self.db, source=f"/civic/{name}", topic=topic, instance=self.instance, clock=clock
        )
        self.commands = CommandRunner(self.client, self.db, self.outbox)
        self.broker = kafka_broker(settings.kafka_bootstrap_servers, f"civic-{name}")
        # Each consumer's parked events, tried again while no event comes to prompt it.
        self.parked_retries: list[Every] = []
        self.server: GrpcServer | None = None
        # Made at start: its producer, made but never stopped, would warn when collected.
        self.relay: OutboxRelay | None = None
        self.port = 0

    def consumer_group(self, purpose: str) -> str:
        return self.settings.consumer_group(self.name, purpose)

    def consume(self, *consumers: TopicConsumer) -> None:
        """Run the consumers on the service's broker, from start to stop."""
        for consumer in consumers:
            subscribe_once(self.broker, consumer)
            self.parked_retries.append(
                Every(
                    f"parked events of {consumer.group_id}",
                    RETRY_PARKED_S,
                    consumer.retry_parked_when_due,
                )
            )

    def serve(self, service_name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        self.server = GrpcServer(
            host=self.settings.grpc_host,
            port=self.settings.port_for(self.name),
            auth_secret=self.settings.auth_secret,
            service_names=[service_name],
            register=register,
        )

    async def start(self) -> int:
        """Kafka first (consumers join their groups), then gRPC, then the relay."""
        assert self.server is not None, "call serve() before start()"
        await self.broker.start()
        for retries in self.parked_retries:
            retries.start()
        self.relay = OutboxRelay(
            self.db,
            self.outbox,
            functools.partial(
                outbox_producer, self.settings.kafka_bootstrap_servers, f"civic-{self.name}"
            ),
            owner=self.instance,
            poll_seconds=self.settings.outbox_poll_seconds,
        )
        await self.relay.connect()
        self.port = await self.server.start()
        self.relay.start()
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            await stop_within(10, "gRPC server", self.server.stop())
        for retries in self.parked_retries:
            await stop_within(5, "parked events' retries", retries.stop())
        await stop_within(15, "Kafka consumers", self.broker.stop())
        if self.relay is not None:
            # Last, when nothing commits events any more: it publishes what the calls and the
            # consumers committed, then hands its lease over and stops its Kafka producer.
            await stop_within(25, "outbox relay", self.relay.stop())
        # Closing ends the client's sessions on the server, and waits out server selection when
        # MongoDB is already gone.
        await stop_within(5, "MongoDB client", self.client.close())

"""Wiring of the tickets service: `python -m services.tickets.main`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime

from civic.tickets.v1 import tickets_pb2, tickets_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor
from pymongo.errors import DuplicateKeyError

from services.common.broker import kafka_broker
from services.common.commands import CommandRunner
from services.common.config import Settings, get_settings
from services.common.grpc_server import GrpcServer
from services.common.mongo import mongo_client
from services.common.objects import ObjectStore
from services.common.outbox import Outbox, OutboxRelay
from services.common.runtime import serve_until_signalled, stop_within
from services.common.telemetry import setup_telemetry
from services.tickets import domain
from services.tickets.api import TicketsServicer
from services.tickets.escalation import Escalator
from services.tickets.events import SOURCE, TOPIC, Router, subscribe
from services.tickets.records import rules_document
from services.tickets.store import TicketStore

NAME = "tickets"
SERVICE_NAME = tickets_pb2.DESCRIPTOR.services_by_name["TicketsService"].full_name
PHOTO_BUCKET = "civic-photos"


class TicketsService:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        span_processor: SpanProcessor | None = None,
        escalation_interval_seconds: float = 30.0,
    ) -> None:
        setup_telemetry(f"civic-{NAME}", settings, span_processor)
        self.settings = settings
        self.clock = clock
        self.client = mongo_client(settings.mongo_uri)
        self.db = self.client[settings.database_for(NAME)]
        self.store = TicketStore(self.db)
        self.outbox = Outbox(self.db, source=SOURCE, topic=TOPIC)
        self.broker = kafka_broker(settings.kafka_bootstrap_servers, f"civic-{NAME}")
        self.instance = settings.instance_for(NAME)
        self.router = Router(self.store, self.outbox, clock, domain.DUPLICATE_DISTANCE_M)
        subscribe(
            self.broker,
            self.client,
            self.store,
            self.router,
            self.outbox,
            group_prefix=f"{settings.database_prefix}.{NAME}",
            instance_id=self.instance,
        )
        self.escalator = Escalator(
            self.client, self.store, self.outbox, clock, escalation_interval_seconds
        )
        self.servicer = TicketsServicer(
            self.store,
            self.client,
            CommandRunner(self.client, self.db, self.outbox),
            self.outbox,
            ObjectStore(settings, PHOTO_BUCKET),
            hashlib.sha256(("submitter:" + settings.data_key).encode()).digest(),
            clock,
        )
        self.server = GrpcServer(
            host=settings.grpc_host,
            port=settings.port_for(NAME),
            auth_secret=settings.auth_secret,
            service_names=[SERVICE_NAME],
            register=lambda server: tickets_pb2_grpc.add_TicketsServiceServicer_to_server(
                self.servicer, server
            ),
        )
        self.relay: OutboxRelay | None = None
        self.port = 0

    async def seed_rules(self) -> None:
        """The pilots' categories, unless a city admin has set rules already."""
        if await self.store.current_rules() is None:
            doc = rules_document(
                1, domain.DEFAULT_RULES, domain.DEFAULT_REOPEN_WITHIN, self.clock(), "civic"
            )
            with contextlib.suppress(DuplicateKeyError):  # another instance seeded them first
                await self.store.rules.insert_one(doc)

    async def start(self) -> int:
        await self.store.ensure_indexes()
        await self.seed_rules()
        await self.broker.start()
        self.port = await self.server.start()
        self.relay = OutboxRelay(
            self.db,
            self.outbox,
            self.broker,
            owner=self.instance,
            poll_seconds=self.settings.outbox_poll_seconds,
        )
        self.relay.start()
        self.escalator.start()
        return self.port

    async def stop(self) -> None:
        await stop_within(10, "gRPC server", self.server.stop())
        await self.escalator.stop()
        if self.relay is not None:
            await stop_within(10, "outbox relay", self.relay.stop())
        await stop_within(15, "Kafka clients", self.broker.stop())
        await self.client.close()


if __name__ == "__main__":
    asyncio.run(serve_until_signalled(NAME, lambda: TicketsService(get_settings())))

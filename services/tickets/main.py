"""Wiring of the tickets service: `python -m services.tickets.main`."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from civic.tickets.v1 import tickets_pb2, tickets_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor
from pymongo.errors import DuplicateKeyError

from services.common.config import Settings, get_settings
from services.common.objects import ObjectStore
from services.common.runtime import run_async, serve_until_signalled
from services.common.service import ServiceHost
from services.common.uploads import UploadSweeper, attached_files
from services.tickets import domain
from services.tickets.api import TicketsServicer
from services.tickets.clusters import part_decided_orphans, release_orphans
from services.tickets.escalation import Escalator
from services.tickets.events import TOPIC, Router, consumers
from services.tickets.gis import GisLocator
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
        self.host = host = ServiceHost(
            NAME, settings, topic=TOPIC, span_processor=span_processor, clock=clock
        )
        self.clock = clock
        self.client, self.db = host.client, host.db
        self.store = TicketStore(self.db)
        self.router = Router(
            self.store,
            host.outbox,
            clock,
            settings.tickets_duplicate_meters,
            timedelta(hours=settings.tickets_duplicate_hours),
        )
        host.consume(
            *consumers(
                host.client,
                self.store,
                self.router,
                host.outbox,
                routing_group=host.consumer_group("routing"),
                registry_group=host.consumer_group("registry-view"),
                instance_id=host.instance,
            )
        )
        self.escalator = Escalator(
            host.client, self.store, host.outbox, clock, escalation_interval_seconds
        )
        photos = ObjectStore(settings, PHOTO_BUCKET)
        self.locator = GisLocator(
            settings.gis(), settings.auth_secret, settings.kafka_bootstrap_servers
        )
        self.uploads = UploadSweeper(
            photos,
            attached_files("tickets/", self.store.photos_named),
        )
        self.servicer = TicketsServicer(
            self.store,
            host.client,
            host.commands,
            host.outbox,
            photos,
            hashlib.sha256(("submitter:" + settings.data_key).encode()).digest(),
            clock,
            settings.tickets_duplicate_meters,
            self.locator,
        )
        host.serve(
            SERVICE_NAME,
            lambda server: tickets_pb2_grpc.add_TicketsServiceServicer_to_server(
                self.servicer, server
            ),
        )

    @property
    def port(self) -> int:
        return self.host.port

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
        await release_orphans(self.client, self.store, self.host.outbox, self.clock())
        await part_decided_orphans(self.client, self.store, self.host.outbox)
        port = await self.host.start()
        self.locator.watch()
        self.escalator.start()
        self.uploads.start()
        return port

    async def stop(self) -> None:
        await self.uploads.stop()
        await self.escalator.stop()
        await self.host.stop()
        await self.locator.close()


if __name__ == "__main__":
    run_async(serve_until_signalled(NAME, lambda: TicketsService(get_settings())))

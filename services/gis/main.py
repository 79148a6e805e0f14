"""Wiring of the GIS service: `python -m services.gis.main`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from civic.gis.v1 import gis_pb2, gis_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor

from services.common.config import Settings, get_settings
from services.common.objects import ObjectStore
from services.common.runtime import run_async, serve_until_signalled
from services.common.service import ServiceHost
from services.common.uploads import Sweep, UploadSweeper
from services.gis.api import GisServicer, RegistryReader
from services.gis.events import TOPIC, registry_consumer
from services.gis.store import GisStore

NAME = "gis"
SERVICE_NAME = gis_pb2.DESCRIPTOR.services_by_name["GisService"].full_name
UPLOAD_BUCKET = "civic-maps"


class GisService:
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
        self.store = GisStore(self.db)
        host.consume(
            registry_consumer(
                host.client,
                self.store,
                host.outbox,
                group_id=host.consumer_group("registry-view"),
                instance_id=host.instance,
            )
        )
        self.registry = RegistryReader(settings.registry())
        uploads = ObjectStore(settings, UPLOAD_BUCKET)
        # A drawing is read once, by its import; a retried import is answered from its record.
        self.uploads = UploadSweeper(uploads, [Sweep("")])
        self.servicer = GisServicer(
            self.store,
            host.client,
            host.commands,
            host.outbox,
            uploads,
            self.registry,
            clock,
        )
        host.serve(
            SERVICE_NAME,
            lambda server: gis_pb2_grpc.add_GisServiceServicer_to_server(self.servicer, server),
        )

    @property
    def port(self) -> int:
        return self.host.port

    async def start(self) -> int:
        await self.store.ensure_indexes()
        await self.store.hydrants.start()
        port = await self.host.start()
        self.uploads.start()
        return port

    async def stop(self) -> None:
        await self.uploads.stop()
        await self.host.stop()
        await self.store.hydrants.stop()
        await self.registry.close()


if __name__ == "__main__":
    run_async(serve_until_signalled(NAME, lambda: GisService(get_settings())))

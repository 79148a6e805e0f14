"""Wiring of the notices service: `python -m services.notices.main`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from civic.notices.v1 import notices_pb2, notices_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor

from services.common.config import Settings, get_settings
from services.common.objects import ObjectStore
from services.common.runtime import run_async, serve_until_signalled
from services.common.service import ServiceHost
from services.common.uploads import UploadSweeper, attached_files
from services.notices.api import NoticesServicer
from services.notices.delivery import FANOUT_BATCH, Deliverer
from services.notices.events import TOPIC, Reconciler, registry_consumer
from services.notices.store import NoticeStore

NAME = "notices"
SERVICE_NAME = notices_pb2.DESCRIPTOR.services_by_name["NoticesService"].full_name
ATTACHMENT_BUCKET = "civic-attachments"


class NoticesService:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        span_processor: SpanProcessor | None = None,
        sweep_interval_seconds: float = 5.0,
        fanout_batch: int = FANOUT_BATCH,
    ) -> None:
        self.host = host = ServiceHost(
            NAME, settings, topic=TOPIC, span_processor=span_processor, clock=clock
        )
        self.clock = clock
        self.client, self.db = host.client, host.db
        self.store = NoticeStore(self.db)
        reconciler = Reconciler(self.store, host.outbox, clock)
        self.deliverer = Deliverer(
            host.client,
            self.store,
            host.outbox,
            clock,
            reconciler,
            sweep_interval_seconds,
            fanout_batch,
        )
        host.consume(
            registry_consumer(
                host.client,
                self.store,
                reconciler,
                host.outbox,
                registry_group=host.consumer_group("registry-view"),
                instance_id=host.instance,
            )
        )
        files = ObjectStore(settings, ATTACHMENT_BUCKET)
        self.uploads = UploadSweeper(
            files, attached_files("notices/", self.store.attachments_named)
        )
        self.servicer = NoticesServicer(
            self.store,
            host.commands,
            host.outbox,
            files,
            self.deliverer,
            clock,
        )
        host.serve(
            SERVICE_NAME,
            lambda server: notices_pb2_grpc.add_NoticesServiceServicer_to_server(
                self.servicer, server
            ),
        )

    @property
    def port(self) -> int:
        return self.host.port

    async def start(self) -> int:
        await self.store.ensure_indexes()
        port = await self.host.start()
        self.deliverer.start()
        self.uploads.start()
        return port

    async def stop(self) -> None:
        await self.uploads.stop()
        await self.deliverer.stop()
        await self.servicer.hub.stop()
        await self.host.stop()


if __name__ == "__main__":
    run_async(serve_until_signalled(NAME, lambda: NoticesService(get_settings())))

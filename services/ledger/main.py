"""Wiring of the ledger service: `python -m services.ledger.main`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from civic.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor

from services.common.config import Settings, get_settings
from services.common.objects import ObjectStore
from services.common.runtime import run_async, serve_until_signalled
from services.common.service import ServiceHost
from services.common.uploads import Sweep, UploadSweeper, attached_files
from services.ledger.api import LedgerServicer
from services.ledger.events import TOPIC, follow_moves
from services.ledger.registry import RegistryReader
from services.ledger.store import LedgerStore

NAME = "ledger"
SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name
# Exported statements and expense receipt images.
BUCKET = "civic-statements"


class LedgerService:
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
        self.store = LedgerStore(host.db)
        host.consume(
            follow_moves(
                host.client,
                self.store,
                group_id=host.consumer_group("household-moves"),
                instance_id=host.instance,
            )
        )
        files = ObjectStore(settings, BUCKET)
        # Receipts never recorded as expenses; statements exported (their links last an hour).
        self.uploads = UploadSweeper(
            files,
            [*attached_files("receipts/", self.store.receipts_named), Sweep("statements/")],
        )
        self.servicer = LedgerServicer(
            self.store,
            host.client,
            host.commands,
            host.outbox,
            files,
            RegistryReader(settings.registry(), settings.auth_secret),
            clock,
        )
        host.serve(
            SERVICE_NAME,
            lambda server: ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
                self.servicer, server
            ),
        )

    @property
    def port(self) -> int:
        return self.host.port

    async def start(self) -> int:
        await self.store.ensure_indexes()
        port = await self.host.start()
        self.uploads.start()
        return port

    async def stop(self) -> None:
        await self.uploads.stop()
        await self.host.stop()


if __name__ == "__main__":
    run_async(serve_until_signalled(NAME, lambda: LedgerService(get_settings())))

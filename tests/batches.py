"""Feeding a batch handler a run of events directly, inside a transaction of a real MongoDB:
to compare a run handled as one batch with the same run handled one event at a time."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from google.protobuf.message import Message
from opentelemetry.trace import INVALID_SPAN
from pymongo.asynchronous.database import AsyncDatabase

from services.common.cloudevents import CloudEvent, type_name
from services.common.config import Settings
from services.common.consumer import BatchHandler, Delivery
from services.common.mongo import Document, in_transaction, mongo_client
from services.common.outbox import new_event_id

START = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def deliveries(messages: list[Message], source: str = "registry") -> list[Delivery]:
    """The messages as consecutive events, a second apart."""
    return [
        Delivery(
            CloudEvent(
                id=new_event_id(),
                type=type_name(message),
                source=source,
                time=START + timedelta(seconds=n),
                data=message.SerializeToString(),
                actor="official-1",
            ),
            message,
            lambda: contextlib.nullcontext(INVALID_SPAN),
        )
        for n, message in enumerate(messages)
    ]


@contextlib.asynccontextmanager
async def scratch_databases(
    settings: Settings, count: int
) -> AsyncIterator[list[AsyncDatabase[Document]]]:
    """Fresh databases, dropped afterwards."""
    client = mongo_client(settings.mongo_uri)
    names = [f"batch-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    try:
        yield [client[name] for name in names]
    finally:
        for name in names:
            await client.drop_database(name)
        await client.close()


async def handle(
    db: AsyncDatabase[Document], handler: BatchHandler, batch: list[Delivery]
) -> list[Document]:
    """One batch in one transaction, as the consumer hands it over."""
    return await in_transaction(db.client, lambda session: handler(batch, session))

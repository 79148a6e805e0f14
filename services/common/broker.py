"""Kafka through faststream: the producer the outbox relay uses, and consumers that handle each
event exactly once by recording its id in the same transaction as the handler's changes."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from google.protobuf.message import DecodeError, Message
from opentelemetry.trace import Span, SpanKind
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.common import kafka_fetch
from services.common.cloudevents import CloudEvent
from services.common.mongo import Document, Session, in_transaction
from services.common.outbox import Outbox
from services.common.telemetry import context_from_pairs, tracer

# A proxy until the provider is installed; fetched once, not per message or call.
_TRACER = tracer("civic.consumer")
# Every event each consumer group handled, kept for good (no TTL): topics keep their history
# and a group whose offsets the broker has forgotten starts again from the earliest event, so a
# marker must outlive any offset. (Partition the collection by month to archive it, if ever.)
PROCESSED = "processed_events"
FETCH_WAIT_MS = 10
# A consumer takes what it has fetched, up to this many events, as one batch.
MAX_BATCH = 100
# A fetch whose events were partly handled already is handled again without them; twice, since
# a rebalance can hand the rest to another member meanwhile.
RETRIES_ON_DUPLICATE = 2
# An idle consumer looks for new events this often (faststream waits this long for a batch,
# then as long again before the next look).
BATCH_WAIT_MS = 5
# The longest wait before a fetch whose handling failed is tried again.
MAX_RETRY_WAIT_S = 5.0
_LOG = logging.getLogger("civic.consumer")
# faststream's per-message logger for Kafka brokers.
ACCESS_LOGGER = "faststream.access.kafka"


@dataclass(frozen=True)
class Delivery:
    """One event of a batch handed to a `BatchHandler`; `span()` is its processing span, under
    which the handler builds what it emits for this event, so the trace goes on through it."""

    event: CloudEvent
    message: Message
    span: Callable[[], AbstractContextManager[Span]]


# What a consumer does with the new events of a fetch, each partition's in order, inside the
# transaction that records them as processed: reading and writing for all of them in a few
# round trips, not a few per event. It returns the events it emits in turn (staged in the same
# transaction), often none.
BatchHandler = Callable[[list[Delivery], Session], Awaitable[list[Document]]]


def faststream_warnings_only() -> None:
    """faststream logs only warnings and errors in this process: for commands that run
    consumers in-process (`civic demo`), whose own lines are the story. Its access logger sets
    its own level (INFO) whenever a broker starts, and does not propagate, so a level set
    beforehand would not hold; a filter on that logger does."""
    logging.getLogger("faststream").setLevel(logging.WARNING)
    access = logging.getLogger(ACCESS_LOGGER)
    if _warning_or_worse not in access.filters:
        access.addFilter(_warning_or_worse)


def _warning_or_worse(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def kafka_broker(bootstrap_servers: str, client_id: str) -> KafkaBroker:
    """The consumers' side of Kafka."""
    kafka_fetch.install()
    return KafkaBroker(
        bootstrap_servers,
        client_id=client_id,
        log_level=logging.DEBUG,  # the level of per-message access logs
    )


def outbox_producer(bootstrap_servers: str, client_id: str) -> AIOKafkaProducer:
    """The relay's producer: idempotent, acknowledged by every in-sync replica. Plain aiokafka,
    since the relay sends ready-made batches and a framework's per-message work would cost
    more CPU than the sending.

    Its own retries keep a partition's order: aiokafka has one request in flight per broker and
    none for a partition while its last batch is unanswered, puts a batch it retries back at the
    head of the partition's queue, and with idempotence retries a batch until the broker takes it
    (under its sequence number, so a retry the broker had taken already is not stored twice)
    rather than giving up after a time. A batch fails only when the broker refuses it for good;
    what then goes after it the relay decides (see `OutboxRelay`)."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        enable_idempotence=True,
        acks="all",
    )


def subscribe_once(
    broker: KafkaBroker,
    client: AsyncMongoClient[Document],
    db: AsyncDatabase[Document],
    *,
    topic: str,
    group_id: str,
    instance_id: str,
    handle: BatchHandler,
    outbox: Outbox | None = None,
    types: Collection[str] | None = None,
) -> None:
    """Run `handle` on every event on `topic`, once per event id, in the consumer group.

    The offset is committed only after the transaction, so a crash redelivers the event; the
    processed-id record then makes the redelivery a no-op. The events a fetch brings for one
    partition are handled in one transaction, in order. `types`, if given, names the event
    types `handle` acts on: any other is passed over without a transaction (handling it would
    change nothing, so there is nothing to record as done).
    """
    processed = db[PROCESSED]

    def process_span(headers: list[tuple[str, Any]], event: CloudEvent) -> Any:
        return _TRACER.start_as_current_span(
            f"{topic} process",
            context=context_from_pairs(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic,
                "messaging.consumer.group.name": group_id,
                "messaging.message.id": event.id,
                "cloudevents.event_type": event.type,
            },
        )

    def delivery(record: ConsumerRecord[Any, Any]) -> Delivery | None:
        """The record as an event to handle; None for one of a type not wanted, or one that
        cannot be read (not a CloudEvent, a type this build does not know, a damaged payload):
        logged and passed over, since no retry could ever read it and holding the partition
        for it would stop every event behind it."""
        headers = list(record.headers or ())
        try:
            event = CloudEvent.from_kafka(headers, record.value or b"")
            if types is not None and event.type not in types:
                return None
            message = event.message()
        except (ValueError, KeyError, DecodeError) as error:
            _LOG.warning(
                "%s: passing over record %s[%d]@%d that is not a readable event: %s",
                group_id,
                record.topic,
                record.partition,
                record.offset,
                error,
            )
            return None
        return Delivery(event, message, functools.partial(process_span, headers, event))

    async def unseen(wanted: list[Delivery]) -> list[Delivery]:
        """`wanted` without the events already processed (each traced as a duplicate)."""
        done = {
            doc["_id"]
            async for doc in processed.find(
                {"_id": {"$in": [f"{group_id}:{d.event.id}" for d in wanted]}}, {"_id": 1}
            )
        }
        todo = []
        for each in wanted:
            marker = f"{group_id}:{each.event.id}"
            # A relay that crashed before marking its events sent publishes them again, and
            # both copies can arrive in one fetch: the second is a duplicate too.
            if marker in done:
                with each.span() as span:
                    span.set_attribute("civic.duplicate", True)
                continue
            done.add(marker)
            todo.append(each)
        return todo

    async def handle_fetch(records: list[ConsumerRecord[Any, Any]]) -> None:
        """A fetch's new events in one transaction, each partition's in order, with their
        processed-id markers; events already processed are skipped."""
        todo = [d for record in records if (d := delivery(record)) is not None]

        async def work(session: Session) -> None:
            now = datetime.now(UTC)
            # Which instance handled it: how the work splits across a group shows in the data.
            # A marker already there fails the insert before anything else is written.
            await processed.insert_many(
                [{"_id": f"{group_id}:{d.event.id}", "at": now, "by": instance_id} for d in todo],
                session=session,
            )
            emitted = await handle(todo, session)
            if emitted:
                assert outbox is not None, "a consumer that emits events needs the outbox"
                await outbox.stage(session, emitted)

        # Almost every event is new, so the markers are written without looking first. One
        # that is there already (a redelivery after a crash, or another member of the group
        # handled it during a rebalance) fails the transaction, which wrote nothing: then look
        # up what was done and go again without it.
        for attempt in range(RETRIES_ON_DUPLICATE + 1):
            if attempt:
                todo = await unseen(todo)
            if not todo:
                return
            try:
                await in_transaction(client, work)
                break
            except (DuplicateKeyError, BulkWriteError):
                if attempt == RETRIES_ON_DUPLICATE:
                    raise
        if outbox is not None:
            outbox.committed()

    failures = 0

    @broker.subscriber(
        topic,
        group_id=group_id,
        # Static membership: a restarted instance takes its partitions back at once instead of
        # waiting for the group to notice its old session is gone.
        group_instance_id=instance_id,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        # How long an empty fetch waits (see kafka_fetch): the most a new event waits when idle.
        fetch_max_wait_ms=FETCH_WAIT_MS,
        # Whatever has been fetched, as one batch in one transaction (each partition's events in
        # order); its offsets are committed once, after it. An error rewinds every partition to
        # the batch's first event there.
        batch=True,
        max_records=MAX_BATCH,
        batch_timeout_ms=BATCH_WAIT_MS,
        parser=_parse_fetch,
    )
    async def on_events(msg: KafkaMessage) -> None:
        nonlocal failures
        try:
            await handle_fetch(list(msg.raw_message))
        except Exception:
            # The fetch comes back at once; a fault that outlasts a retry (MongoDB away, a bug
            # in a handler) is retried less and less often rather than in a tight loop.
            failures += 1
            await asyncio.sleep(min(MAX_RETRY_WAIT_S, 0.05 * 2**failures))
            raise
        failures = 0


async def _parse_fetch(
    records: tuple[ConsumerRecord[Any, Any], ...], parse: Callable[[Any], Awaitable[Any]]
) -> Any:
    """faststream's own parsing of a fetch. It decodes every header as UTF-8, so one producer's
    binary header, or one without a value (Kafka allows null), would fail the whole fetch for
    good: then it is shown only those it can read."""
    try:
        return await parse(records)
    except (UnicodeDecodeError, AttributeError):  # AttributeError: None.decode()
        return await parse(tuple(_readable_headers(record) for record in records))


def _readable_headers(record: ConsumerRecord[Any, Any]) -> ConsumerRecord[Any, Any]:
    readable = [(key, value) for key, value in record.headers or () if _is_utf8(value)]
    if len(readable) == len(record.headers or ()):
        return record
    return dataclasses.replace(record, headers=readable)


def _is_utf8(value: bytes | None) -> bool:
    if value is None:
        return False
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True

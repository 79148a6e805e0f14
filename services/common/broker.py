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

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from google.protobuf.message import DecodeError, Message
from opentelemetry.trace import Span, SpanKind
from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.common import kafka_fetch
from services.common.cloudevents import CloudEvent
from services.common.mongo import Document, Session, in_transaction
from services.common.outbox import Outbox
from services.common.parking import (
    PARK_AFTER_ATTEMPTS,
    PARKED,
    RETRY_PARKED_S,
    describe,
    held_key,
    is_the_events_fault,
    parked_record,
    record_of,
)
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
    parked = db[PARKED]
    # The partitions this instance has, and the keys held on them by parked events (None: to be
    # looked up before the next fetch); one fetch or retry of parked events at a time.
    assigned: set[int] = set()
    held: dict[tuple[int, bytes], str] | None = None
    turn = asyncio.Lock()
    retry_at = 0.0

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

    def work(
        todo: list[Delivery], parking: list[Document], released: str | None = None
    ) -> Callable[[Session], Awaitable[None]]:
        """One transaction: `todo` handled with their processed-id markers, `parking` parked
        (again: a parked event redelivered stays parked as it was), `released` no longer
        parked."""

        async def transaction(session: Session) -> None:
            if todo:
                now = datetime.now(UTC)
                # Which instance handled it: how the work splits across a group shows in the
                # data. A marker already there fails the insert before anything else is written.
                await processed.insert_many(
                    [
                        {"_id": f"{group_id}:{d.event.id}", "at": now, "by": instance_id}
                        for d in todo
                    ],
                    session=session,
                )
                emitted = await handle(todo, session)
                if emitted:
                    assert outbox is not None, "a consumer that emits events needs the outbox"
                    await outbox.stage(session, emitted)
            if parking:
                await parked.bulk_write(
                    [
                        UpdateOne({"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True)
                        for doc in parking
                    ],
                    session=session,
                )
            if released is not None:
                await parked.delete_one({"_id": released}, session=session)

        return transaction

    async def commit(todo: list[Delivery], parking: list[Document]) -> None:
        """A fetch's new events in one transaction, each partition's in order, with their
        processed-id markers; events already processed are skipped."""
        # Almost every event is new, so the markers are written without looking first. One
        # that is there already (a redelivery after a crash, or another member of the group
        # handled it during a rebalance) fails the transaction, which wrote nothing: then look
        # up what was done and go again without it.
        for attempt in range(RETRIES_ON_DUPLICATE + 1):
            if attempt:
                todo = await unseen(todo)
            if not todo and not parking:
                return
            try:
                await in_transaction(client, work(todo, parking))
                break
            except (DuplicateKeyError, BulkWriteError):
                if attempt == RETRIES_ON_DUPLICATE:
                    raise
        if outbox is not None:
            outbox.committed()

    async def handle_alone(each: Delivery, released: str | None = None) -> BaseException | None:
        """Handles one event in a transaction of its own, trying a few times; the error it
        failed with each time, if it did. A server's error is raised: that is no reason to
        park the event."""
        marker = f"{group_id}:{each.event.id}"
        failed: BaseException | None = None
        for attempt in range(PARK_AFTER_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.05 * 2**attempt)
            try:
                await in_transaction(client, work([each], [], released))
            except Exception as error:
                if not is_the_events_fault(error):
                    raise
                if isinstance(error, DuplicateKeyError | BulkWriteError) and (
                    await processed.find_one({"_id": marker}, {"_id": 1})
                ):
                    # Handled already (a redelivery, or a parked copy of one handled since).
                    if released is not None:
                        await parked.delete_one({"_id": released})
                    return None
                failed = error
                continue
            if outbox is not None:
                outbox.committed()
            return None
        return failed

    def parking_record(
        record: ConsumerRecord[Any, Any], each: Delivery, *, error: str | None, behind: str | None
    ) -> Document:
        return parked_record(
            group_id,
            each.event.id,
            each.event.type,
            record,
            error=error,
            behind=behind,
            now=datetime.now(UTC),
        )

    def waits_behind(record: ConsumerRecord[Any, Any]) -> str | None:
        """The parked event that holds this record's key, if one does."""
        key = held_key(record)
        return None if key is None or held is None else held.get(key)

    async def handle_fetch(records: list[ConsumerRecord[Any, Any]]) -> None:
        """A fetch's new events in one transaction, each partition's in order, with their
        processed-id markers; the events of a key held by a parked event parked behind it.
        When the transaction fails with an error that could be an event's own, each event is
        handled alone, in order, and one that fails every time is parked."""
        nonlocal held
        if held is None:
            held = await held_keys(assigned)
        todo: list[tuple[ConsumerRecord[Any, Any], Delivery]] = []
        parking: list[Document] = []
        for record in records:
            if (each := delivery(record)) is None:
                continue
            if (behind := waits_behind(record)) is not None:
                parking.append(parking_record(record, each, error=None, behind=behind))
            else:
                todo.append((record, each))
        try:
            await commit([each for _, each in todo], parking)
            return
        except Exception as error:
            if not is_the_events_fault(error):
                raise
        for record, each in todo:
            if (behind := waits_behind(record)) is not None:
                parking.append(parking_record(record, each, error=None, behind=behind))
                continue
            if (failed := await handle_alone(each)) is None:
                continue
            _LOG.error(
                "%s: parking event %s (%s, key %r, %s[%d]@%d), which fails every time: %s",
                group_id,
                each.event.id,
                each.event.type,
                record.key,
                record.topic,
                record.partition,
                record.offset,
                describe(failed),
            )
            # Parked before anything behind it is handled: its key's later events wait for it.
            await in_transaction(
                client,
                work([], [parking_record(record, each, error=describe(failed), behind=None)]),
            )
            if (key := held_key(record)) is not None:
                held[key] = each.event.id
        if parking:
            await in_transaction(client, work([], parking))

    async def held_keys(partitions: Collection[int]) -> dict[tuple[int, bytes], str]:
        """Each key with parked events on `partitions` (on any while none are known), and the
        first of them: what holds the key's later events back."""
        await parked.create_index([("group", 1), ("partition", 1), ("offset", 1)])
        query: Document = {"group": group_id, "key": {"$ne": None}}
        if partitions:
            query["partition"] = {"$in": sorted(partitions)}
        found: dict[tuple[int, bytes], str] = {}
        async for doc in parked.find(query, {"partition": 1, "key": 1, "event_id": 1}).sort(
            [("partition", 1), ("offset", 1)]
        ):
            found.setdefault((doc["partition"], doc["key"]), doc["event_id"])
        return found

    async def retry_parked(partitions: Collection[int]) -> None:
        """The parked events on `partitions`, handled again in order; a key stays held from the
        first of its events that fails again."""
        nonlocal held
        failing: set[tuple[int, bytes] | None] = set()
        query: Document = {"group": group_id, "partition": {"$in": sorted(partitions)}}
        async for doc in parked.find(query).sort([("partition", 1), ("offset", 1)]):
            record = record_of(doc)
            key = held_key(record)
            if key is not None and key in failing:
                continue
            if (each := delivery(record)) is None:  # a type this build no longer handles
                await parked.delete_one({"_id": doc["_id"]})
                continue
            if (failed := await handle_alone(each, released=doc["_id"])) is None:
                _LOG.warning("%s: parked event %s handled at last", group_id, each.event.id)
                continue
            _LOG.error(
                "%s: parked event %s (%s, key %r) still fails: %s",
                group_id,
                each.event.id,
                each.event.type,
                record.key,
                describe(failed),
            )
            await parked.update_one(
                {"_id": doc["_id"]},
                {
                    "$set": {
                        "error": describe(failed),
                        "behind": None,
                        "tried_at": datetime.now(UTC),
                    },
                    "$inc": {"attempts": PARK_AFTER_ATTEMPTS},
                },
            )
            failing.add(key)
        held = await held_keys(partitions)

    class Assignment(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            pass

        async def on_partitions_assigned(self, partitions: set[TopicPartition]) -> None:
            """A new assignment (a start, or a rebalance): the parked events on it are tried
            again, so a release that fixed their handler handles them as it starts."""
            nonlocal held, retry_at
            async with turn:
                assigned.clear()
                assigned.update(p.partition for p in partitions if p.topic == topic)
                held = None
                try:
                    await retry_parked(assigned)
                except Exception:
                    _LOG.exception("%s: parked events not tried again", group_id)
                retry_at = asyncio.get_running_loop().time() + RETRY_PARKED_S

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
        listener=Assignment(),
    )
    async def on_events(msg: KafkaMessage) -> None:
        nonlocal failures, retry_at
        try:
            async with turn:
                if held and asyncio.get_running_loop().time() >= retry_at:
                    retry_at = asyncio.get_running_loop().time() + RETRY_PARKED_S
                    await retry_parked(assigned)
                await handle_fetch(list(msg.raw_message))
        except Exception:
            # The fetch comes back at once; a fault that outlasts a retry (MongoDB away) is
            # retried less and less often rather than in a tight loop.
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

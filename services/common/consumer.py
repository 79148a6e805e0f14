"""One consumer group's handling of one topic: each event once, by recording its id in the same
transaction as the handler's changes; a fetch's events in one transaction; an event the handler
fails on every time parked with its key's later events behind it (services/common/parking.py).
`broker.subscribe_once` wires it to Kafka."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

from aiokafka import ConsumerRecord
from google.protobuf.message import DecodeError, Message
from opentelemetry.trace import Span, SpanKind
from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

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
# A fetch whose events were partly handled already is handled again without them; twice, since
# a rebalance can hand the rest to another member meanwhile.
RETRIES_ON_DUPLICATE = 2
# The longest wait before a fetch whose handling failed is tried again.
MAX_RETRY_WAIT_S = 5.0
_LOG = logging.getLogger("civic.consumer")

Record: TypeAlias = ConsumerRecord[Any, Any]


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


class TopicConsumer:
    """Runs `handle` on every event on `topic`, once per event id, in the consumer group.

    The offset is committed only after the transaction, so a crash redelivers the event; the
    processed-id record then makes the redelivery a no-op. The events a fetch brings for one
    partition are handled in one transaction, in order. `types`, if given, names the event
    types `handle` acts on: any other is passed over without a transaction (handling it would
    change nothing, so there is nothing to record as done).
    """

    def __init__(
        self,
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
        self.client = client
        self.topic = topic
        self.group_id = group_id
        self.instance_id = instance_id
        self.handle = handle
        self.outbox = outbox
        self.types = types
        self.processed = db[PROCESSED]
        self.parked = db[PARKED]
        # The partitions this instance has, and the keys held on them by parked events (None:
        # to be looked up before the next fetch); one fetch or retry of parked events at a time.
        self.assigned: set[int] = set()
        self.held: dict[tuple[int, bytes], str] | None = None
        # Whether any event is parked on them, with a key or without: worth trying again.
        self.parked_here = False
        self.turn = asyncio.Lock()
        self.retry_at = 0.0
        self.failures = 0
        self._parked_indexed = False

    # ---- what faststream calls -----------------------------------------------------------------

    async def on_fetch(self, records: list[Record]) -> None:
        """A fetch's records; raising rewinds every partition to the fetch's first event there."""
        try:
            async with self.turn:
                await self._retry_parked_if_due()
                await self.handle_fetch(records)
        except Exception:
            # The fetch comes back at once; a fault that outlasts a retry (MongoDB away) is
            # retried less and less often rather than in a tight loop.
            self.failures += 1
            await asyncio.sleep(min(MAX_RETRY_WAIT_S, 0.05 * 2**self.failures))
            raise
        self.failures = 0

    async def on_assigned(self, partitions: Collection[int]) -> None:
        """A new assignment (a start, or a rebalance): the parked events on it are tried again,
        so a release that fixed their handler handles them as it starts."""
        async with self.turn:
            self.assigned = set(partitions)
            self.held = None
            self.parked_here = True  # until the retry has looked
            try:
                await self.retry_parked(self.assigned)
            except Exception:
                _LOG.exception("%s: parked events not tried again", self.group_id)
            self.retry_at = asyncio.get_running_loop().time() + RETRY_PARKED_S

    async def on_revoked(self, partitions: Collection[int]) -> None:
        """Partitions going to another member: their parked events are its to try now."""
        async with self.turn:
            self.assigned -= set(partitions)

    # ---- what the service runs beside it -----------------------------------------------------

    async def retry_parked_when_due(self) -> None:
        """The parked events tried again once their retry time has come, though no event
        arrives: what failed may pass later (the data a handler missed has come), and a quiet
        partition must not keep it waiting for the next event or restart."""
        async with self.turn:
            await self._retry_parked_if_due()

    async def _retry_parked_if_due(self) -> None:
        now = asyncio.get_running_loop().time()
        if self.parked_here and self.assigned and now >= self.retry_at:
            self.retry_at = now + RETRY_PARKED_S
            await self.retry_parked(self.assigned)

    # ---- reading records -------------------------------------------------------------------------

    def _process_span(self, headers: list[tuple[str, Any]], event: CloudEvent) -> Any:
        return _TRACER.start_as_current_span(
            f"{self.topic} process",
            context=context_from_pairs(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": self.topic,
                "messaging.consumer.group.name": self.group_id,
                "messaging.message.id": event.id,
                "cloudevents.event_type": event.type,
            },
        )

    def delivery(self, record: Record) -> Delivery | None:
        """The record as an event to handle; None for one of a type not wanted, or one that
        cannot be read (not a CloudEvent, a type this build does not know, a damaged payload):
        logged and passed over, since no retry could ever read it and holding the partition
        for it would stop every event behind it."""
        headers = list(record.headers or ())
        try:
            event = CloudEvent.from_kafka(headers, record.value or b"")
            if self.types is not None and event.type not in self.types:
                return None
            message = event.message()
        except (ValueError, KeyError, DecodeError) as error:
            _LOG.warning(
                "%s: passing over record %s[%d]@%d that is not a readable event: %s",
                self.group_id,
                record.topic,
                record.partition,
                record.offset,
                error,
            )
            return None
        return Delivery(event, message, functools.partial(self._process_span, headers, event))

    def _marker(self, each: Delivery) -> str:
        return f"{self.group_id}:{each.event.id}"

    async def _unseen(self, wanted: list[Delivery]) -> list[Delivery]:
        """`wanted` without the events already processed (each traced as a duplicate)."""
        done = {
            doc["_id"]
            async for doc in self.processed.find(
                {"_id": {"$in": [self._marker(d) for d in wanted]}}, {"_id": 1}
            )
        }
        todo = []
        for each in wanted:
            marker = self._marker(each)
            # A relay that crashed before marking its events sent publishes them again, and
            # both copies can arrive in one fetch: the second is a duplicate too.
            if marker in done:
                with each.span() as span:
                    span.set_attribute("civic.duplicate", True)
                continue
            done.add(marker)
            todo.append(each)
        return todo

    # ---- handling ------------------------------------------------------------------------------

    def _work(
        self, todo: list[Delivery], parking: list[Document], released: str | None = None
    ) -> Callable[[Session], Awaitable[None]]:
        """One transaction: `todo` handled with their processed-id markers, `parking` parked
        (again: a parked event redelivered stays parked as it was), `released` no longer
        parked."""

        async def transaction(session: Session) -> None:
            if todo:
                now = datetime.now(UTC)
                # Which instance handled it: how the work splits across a group shows in the
                # data. A marker already there fails the insert before anything else is written.
                await self.processed.insert_many(
                    [{"_id": self._marker(d), "at": now, "by": self.instance_id} for d in todo],
                    session=session,
                )
                emitted = await self.handle(todo, session)
                if emitted:
                    assert self.outbox is not None, "a consumer that emits events needs the outbox"
                    await self.outbox.stage(session, emitted)
            if parking:
                await self.parked.bulk_write(
                    [
                        UpdateOne({"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True)
                        for doc in parking
                    ],
                    session=session,
                )
            if released is not None:
                await self.parked.delete_one({"_id": released}, session=session)

        return transaction

    def _committed(self) -> None:
        if self.outbox is not None:
            self.outbox.committed()

    async def _commit(self, todo: list[Delivery], parking: list[Document]) -> None:
        """A fetch's new events in one transaction, each partition's in order, with their
        processed-id markers; events already processed are skipped."""
        # Almost every event is new, so the markers are written without looking first. One
        # that is there already (a redelivery after a crash, or another member of the group
        # handled it during a rebalance) fails the transaction, which wrote nothing: then look
        # up what was done and go again without it.
        for attempt in range(RETRIES_ON_DUPLICATE + 1):
            if attempt:
                todo = await self._unseen(todo)
            if not todo and not parking:
                return
            try:
                await in_transaction(self.client, self._work(todo, parking))
                break
            except (DuplicateKeyError, BulkWriteError):
                if attempt == RETRIES_ON_DUPLICATE:
                    raise
        self._committed()

    async def _handle_alone(
        self, each: Delivery, released: str | None = None
    ) -> BaseException | None:
        """Handles one event in a transaction of its own, trying a few times; the error it
        failed with each time, if it did. A server's error is raised: that is no reason to
        park the event."""
        failed: BaseException | None = None
        for attempt in range(PARK_AFTER_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.05 * 2**attempt)
            try:
                await in_transaction(self.client, self._work([each], [], released))
            except Exception as error:
                if not is_the_events_fault(error):
                    raise
                if isinstance(error, DuplicateKeyError | BulkWriteError) and (
                    await self.processed.find_one({"_id": self._marker(each)}, {"_id": 1})
                ):
                    # Handled already (a redelivery, or a parked copy of one handled since).
                    if released is not None:
                        await self.parked.delete_one({"_id": released})
                    return None
                failed = error
                continue
            self._committed()
            return None
        return failed

    def _parking(
        self, record: Record, each: Delivery, *, error: str | None, behind: str | None
    ) -> Document:
        return parked_record(
            self.group_id,
            each.event.id,
            each.event.type,
            record,
            error=error,
            behind=behind,
            now=datetime.now(UTC),
        )

    def _waits_behind(self, record: Record) -> str | None:
        """The parked event that holds this record's key, if one does."""
        key = held_key(record)
        return None if key is None or self.held is None else self.held.get(key)

    async def handle_fetch(self, records: list[Record]) -> None:
        """A fetch's new events in one transaction, each partition's in order, with their
        processed-id markers; the events of a key held by a parked event parked behind it.
        When the transaction fails with an error that could be an event's own, each event is
        handled alone, in order, and one that fails every time is parked."""
        if self.held is None:
            self.held = await self._held_keys(self.assigned)
        todo: list[tuple[Record, Delivery]] = []
        parking: list[Document] = []
        for record in records:
            if (each := self.delivery(record)) is None:
                continue
            if (behind := self._waits_behind(record)) is not None:
                parking.append(self._parking(record, each, error=None, behind=behind))
            else:
                todo.append((record, each))
        try:
            await self._commit([each for _, each in todo], parking)
            return
        except Exception as error:
            if not is_the_events_fault(error):
                raise
        for record, each in todo:
            if (behind := self._waits_behind(record)) is not None:
                parking.append(self._parking(record, each, error=None, behind=behind))
                continue
            if (failed := await self._handle_alone(each)) is None:
                continue
            _LOG.error(
                "%s: parking event %s (%s, key %r, %s[%d]@%d), which fails every time: %s",
                self.group_id,
                each.event.id,
                each.event.type,
                record.key,
                record.topic,
                record.partition,
                record.offset,
                describe(failed),
            )
            # Parked before anything behind it is handled: its key's later events wait for it.
            parked = self._parking(record, each, error=describe(failed), behind=None)
            await in_transaction(self.client, self._work([], [parked]))
            self.parked_here = True
            if (key := held_key(record)) is not None:
                self.held[key] = each.event.id
        if parking:
            await in_transaction(self.client, self._work([], parking))

    # ---- parked events ---------------------------------------------------------------------------

    async def _held_keys(self, partitions: Collection[int]) -> dict[tuple[int, bytes], str]:
        """Each key with parked events on `partitions` (on any while none are known), and the
        first of them: what holds the key's later events back."""
        if not self._parked_indexed:  # once per process, not on every rebalance
            await self.parked.create_index([("group", 1), ("partition", 1), ("offset", 1)])
            self._parked_indexed = True
        query: Document = {"group": self.group_id, "key": {"$ne": None}}
        if partitions:
            query["partition"] = {"$in": sorted(partitions)}
        found: dict[tuple[int, bytes], str] = {}
        async for doc in self.parked.find(query, {"partition": 1, "key": 1, "event_id": 1}).sort(
            [("partition", 1), ("offset", 1)]
        ):
            found.setdefault((doc["partition"], doc["key"]), doc["event_id"])
        return found

    async def retry_parked(self, partitions: Collection[int]) -> None:
        """The parked events on `partitions`, handled again in order; a key stays held from the
        first of its events that fails again."""
        failing: set[tuple[int, bytes] | None] = set()
        query: Document = {"group": self.group_id, "partition": {"$in": sorted(partitions)}}
        async for doc in self.parked.find(query).sort([("partition", 1), ("offset", 1)]):
            record = record_of(doc)
            key = held_key(record)
            if key is not None and key in failing:
                continue
            if (each := self.delivery(record)) is None:  # a type this build no longer handles
                await self.parked.delete_one({"_id": doc["_id"]})
                continue
            if (failed := await self._handle_alone(each, released=doc["_id"])) is None:
                _LOG.warning("%s: parked event %s handled at last", self.group_id, each.event.id)
                continue
            _LOG.error(
                "%s: parked event %s (%s, key %r) still fails: %s",
                self.group_id,
                each.event.id,
                each.event.type,
                record.key,
                describe(failed),
            )
            await self.parked.update_one(
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
        self.held = await self._held_keys(partitions)
        self.parked_here = await self.parked.find_one(query, {"_id": 1}) is not None

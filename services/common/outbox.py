"""Transactional outbox: an event is written in the same MongoDB transaction as the state change
it describes, and a relay publishes it to Kafka afterwards.

Nothing is published that was not committed; nothing committed goes unpublished: a crash before
the relay marks an event sent only means it is published again, and consumers skip repeats by
event id. One relay per service holds a lease at a time, so events leave in commit order. It
learns of its own instance's commits in memory and of the other instances' through a change
stream, so an event waits for no sweep whichever instance committed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from bson import Binary, ObjectId
from google.protobuf.message import Message
from opentelemetry.trace import SpanKind
from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError
from pymongo.read_concern import ReadConcern

from services.common.auth import current_principal
from services.common.cloudevents import CloudEvent, type_name
from services.common.mongo import Document, Session
from services.common.runtime import fault
from services.common.telemetry import context_from_headers, current_trace_headers, tracer

log = logging.getLogger(__name__)
# A proxy until the provider is installed; fetched once, not per message or call.
_TRACER = tracer("civic.outbox")

OUTBOX = "outbox"
LEASE = "outbox_lease"
SENT_RETENTION = timedelta(days=3)
# Under the producer's largest record (1 MiB, with key and headers): an event the broker would
# refuse must fail its transaction, not stop the relay at it for good.
MAX_EVENT_BYTES = 1_000_000


def new_event_id() -> str:
    # Time-ordered within a process: among entries of one snapshot time, the tie-break.
    return str(ObjectId())


class Outbox:
    """Builds a service's outgoing events and stages them inside the caller's transaction."""

    def __init__(
        self, db: AsyncDatabase[Document], *, source: str, topic: str, instance: str = ""
    ) -> None:
        self._collection = db[OUTBOX]
        self.source = source
        self.topic = topic
        # Which instance staged an entry: the relay hears of its own instance's in memory.
        self.instance = instance
        self._committed = asyncio.Event()

    def event(self, message: Message, *, key: str, subject: str = "") -> Document:
        """One outbox entry for `message`, keyed by its aggregate id; carries the trace."""
        data = message.SerializeToString()
        if len(data) > MAX_EVENT_BYTES:
            raise ValueError(
                f"{type_name(message)} of {len(data):,} bytes is over {MAX_EVENT_BYTES:,}: "
                "split it into several events"
            )
        return {
            "_id": new_event_id(),
            "topic": self.topic,
            "key": key,
            "type": type_name(message),
            "source": self.source,
            "subject": subject,
            "actor": _actor(),
            "time": datetime.now(UTC),
            "data": Binary(data),
            "trace": current_trace_headers(),
        }

    async def stage(self, session: Session, events: list[Document]) -> None:
        """Stage a transaction's events as one outbox entry (one write, however many events)."""
        if not events:
            return
        entry = {"_id": events[0]["_id"], "pending": True, "by": self.instance, "events": events}
        # The relay publishes in `order`: the server's time of this transaction's snapshot, as
        # its earlier statements reported it. A later transaction on the same aggregate had to
        # wait for this one to commit, so it reads, and sorts, after it, whichever instance ran
        # it. (Event ids follow commit order within one process only.)
        if session.operation_time is not None:
            await self._collection.insert_one(
                entry | {"order": session.operation_time}, session=session
            )
        else:  # nothing before it in the transaction: its own write tells the time
            await self._collection.insert_one(entry, session=session)
            await self._collection.update_one(
                {"_id": entry["_id"]}, {"$set": {"order": session.operation_time}}, session=session
            )

    def committed(self) -> None:
        """Tell the relay new events are committed, so it publishes now rather than next sweep."""
        self._committed.set()

    async def wait_committed(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._committed.wait(), seconds)
        self._committed.clear()


async def ensure_outbox_indexes(db: AsyncDatabase[Document]) -> None:
    outbox = db[OUTBOX]
    await outbox.create_index(
        [("pending", ASCENDING), ("order", ASCENDING), ("_id", ASCENDING)], sparse=True
    )
    await outbox.create_index(
        "sent_at", expireAfterSeconds=int(SENT_RETENTION.total_seconds()), sparse=True
    )


def _actor() -> str:
    caller = current_principal.get(None)
    return caller.subject if caller else ""


def _as_cloud_event(entry: Mapping[str, Any]) -> CloudEvent:
    return CloudEvent(
        id=entry["_id"],
        type=entry["type"],
        source=entry["source"],
        time=entry["time"],
        data=bytes(entry["data"]),
        subject=entry.get("subject", ""),
        actor=entry.get("actor", ""),
    )


class OutboxRelay:
    """Publishes committed events in order with an idempotent producer, then marks them sent."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        outbox: Outbox,
        producer: AIOKafkaProducer,
        *,
        owner: str,
        poll_seconds: float,
        batch_size: int = 100,
        lease_seconds: float = 10.0,
    ) -> None:
        # Only entries the majority has: a transaction is visible on the primary before it is
        # durable, and an event of one that a failover or crash then undoes must not go out.
        self._collection = db[OUTBOX].with_options(read_concern=ReadConcern("majority"))
        self._lease = db[LEASE]
        self._outbox = outbox
        self._producer = producer
        self._owner = owner
        self._poll_seconds = poll_seconds
        self._batch_size = batch_size
        self._lease_seconds = lease_seconds
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._held_until: datetime | None = None
        self.published = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        for task in (self._stop_watching(), self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        if self._held_until is not None:
            # Hand over at once: another instance relays now, not when the lease runs out.
            self._held_until = None
            try:
                # Briefly: with the database gone, the lease runs out by itself.
                await asyncio.wait_for(
                    self._lease.delete_one({"_id": "relay", "owner": self._owner}), 2
                )
            except Exception:
                log.warning("could not release the outbox relay lease", exc_info=True)

    async def _run(self) -> None:
        while True:
            try:
                if await self._hold_lease():
                    self._start_watching()
                    # A long backlog renews the lease as it goes: no second relay joins in.
                    while await self.relay_once() == self._batch_size:
                        if not await self._hold_lease():
                            break
                else:
                    self._stop_watching()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Broker or database unavailable: keep the events and try again next sweep.
                log.exception("outbox relay failed; retrying")
            await self._outbox.wait_committed(self._poll_seconds)

    def _start_watching(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_others(), name="outbox-watch")

    def _stop_watching(self) -> asyncio.Task[None] | None:
        """Cancels the change stream's task, if any, and returns it."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        return watch

    async def _watch_others(self) -> None:
        """While this relay holds the lease: wake it when another instance commits events.
        The database filters out this instance's own entries, which wake it in memory."""
        pipeline: list[Document] = [
            {
                "$match": {
                    "operationType": "insert",
                    "fullDocument.by": {"$ne": self._outbox.instance},
                }
            },
            {"$project": {"_id": 1}},  # the resume token alone
        ]
        while True:
            try:
                async with await self._collection.watch(pipeline) as stream:
                    # Entries committed before the stream opened are the next sweep's.
                    self._outbox.committed()
                    async for _ in stream:
                        self._outbox.committed()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox change stream failed; sweeps go on meanwhile")
                await asyncio.sleep(self._poll_seconds)

    async def _hold_lease(self) -> bool:
        now = datetime.now(UTC)
        # Renewed once half of it has run out, not on every wake-up: nobody else takes it before
        # it expires.
        half = timedelta(seconds=self._lease_seconds / 2)
        if self._held_until is not None and now < self._held_until - half:
            return True
        expires_at = now + timedelta(seconds=self._lease_seconds)
        self._held_until = None
        try:
            await self._lease.find_one_and_update(
                {"_id": "relay", "$or": [{"owner": self._owner}, {"expires_at": {"$lt": now}}]},
                {"$set": {"owner": self._owner, "expires_at": expires_at}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False  # another instance relays
        self._held_until = expires_at
        return True

    async def relay_once(self) -> int:
        """Publish one batch of pending events; returns how many were published."""
        entries = (
            await self._collection.find({"pending": True})
            .sort([("order", ASCENDING), ("_id", ASCENDING)])
            .limit(self._batch_size)
            .to_list()
        )
        if not entries:
            return 0
        fault("CIVIC_FAULT_CRASH_BEFORE_PUBLISH")
        futures = [future for entry in entries for future in await self._publish(entry)]
        await asyncio.gather(*futures)
        # Counted once the broker has them, so whoever sees them marked sent sees them counted.
        self.published += len(futures)
        fault("CIVIC_FAULT_CRASH_AFTER_PUBLISH")
        await self._collection.update_many(
            {"_id": {"$in": [entry["_id"] for entry in entries]}},
            {"$unset": {"pending": ""}, "$set": {"sent_at": datetime.now(UTC)}},
        )
        return len(entries)

    async def _publish(self, entry: Document) -> list[asyncio.Future[Any]]:
        """Send one transaction's events (without waiting for the broker): each run of events
        that carries one trace goes out under one span that continues it. A bulk import's
        thousands of events are one step of its trace; a consumer's batch of events, each from
        the trace of the event that caused it, continues each of those traces."""
        futures: list[asyncio.Future[Any]] = []
        for _, run in itertools.groupby(entry["events"], key=_trace_of):
            futures += await self._publish_run(list(run))
        return futures

    async def _publish_run(self, events: list[Document]) -> list[asyncio.Future[Any]]:
        first = events[0]
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.destination.name": first["topic"],
            "messaging.batch.message_count": len(events),
        }
        if len(events) == 1:
            attributes["messaging.message.id"] = first["_id"]
            attributes["cloudevents.event_type"] = first["type"]
        with _TRACER.start_as_current_span(
            f"{first['topic']} publish",
            context=context_from_headers(first.get("trace", {})),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        ):
            trace_headers = [(k, v.encode()) for k, v in current_trace_headers().items()]
            return [
                await self._producer.send(
                    stored["topic"],
                    bytes(stored["data"]),
                    key=stored["key"].encode(),
                    headers=[(k, v.encode()) for k, v in event.kafka_headers().items()]
                    + trace_headers,
                )
                for stored in events
                for event in (_as_cloud_event(stored),)
            ]


def _trace_of(event: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(event.get("trace", {}).items()))

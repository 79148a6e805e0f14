"""Transactional outbox: an event is written in the same MongoDB transaction as the state change
it describes, and a relay publishes it to Kafka afterwards.

Nothing is published that was not committed; nothing committed goes unpublished: a crash before
the relay marks an event sent only means it is published again, and consumers skip repeats by
event id. One relay per service holds a lease at a time, so events leave in commit order. It
learns of its own instance's commits in memory and of the other instances' through a change
stream, so an event waits for no sweep whichever instance committed it.

Events are keyed by their aggregate, and consumers rely on one aggregate's events arriving in
order. An event the broker refuses (a record over the topic's size limit, say) holds back only
the later events of its key: they wait behind it while it is tried again, alone and less and
less often, and the other keys' events go on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
)
from aiokafka.partitioner import DefaultPartitioner
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
from services.common.runtime import cancel_and_wait, fault, woken_or_after
from services.common.telemetry import context_from_headers, current_trace_headers, tracer

log = logging.getLogger(__name__)
# A proxy until the provider is installed; fetched once, not per message or call.
_TRACER = tracer("civic.outbox")
# The producer's own: records go where it would put them by their keys.
_PARTITIONER = DefaultPartitioner()

OUTBOX = "outbox"
LEASE = "outbox_lease"
SENT_RETENTION = timedelta(days=3)
# Under the producer's largest record (1 MiB, with key and headers): an event the broker would
# refuse must fail its transaction, not hold its aggregate's later events back for good.
MAX_EVENT_BYTES = 1_000_000
# An event the broker refused is tried again after this many seconds, twice as long after each
# refusal, up to the most: it stays visible in the log without flooding it.
FIRST_RETRY_SECONDS = 1.0
MOST_RETRY_SECONDS = 60.0
# How long a stopping relay goes on publishing what was committed before it stopped: a broker
# out of reach must not hold the stop up for long.
LAST_SWEEP_SECONDS = 5.0


def new_event_id() -> str:
    # Time-ordered within a process: among entries of one snapshot time, the tie-break.
    return str(ObjectId())


class Outbox:
    """Builds a service's outgoing events and stages them inside the caller's transaction."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        source: str,
        topic: str,
        instance: str = "",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._collection = db[OUTBOX]
        self.source = source
        self.topic = topic
        # An event's time (ce_time) is the service's time, as its records' are: a run on a
        # moved clock (a demo, a test of deadlines) does not publish events that contradict them.
        self.clock = clock
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
            "time": self.clock(),
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
        await woken_or_after(self._committed, seconds)


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


@dataclass
class _Refusal:
    """An event the broker refused: its key's later events wait behind it until it goes out."""

    key: str
    # How often it was refused alone in its batch (a batch refused with several in it does not
    # say which one the broker would not take).
    alone: int
    retry_at: float  # time.monotonic()


@dataclass
class _Record:
    """An event as the Kafka record that carries it."""

    event: Document
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    # A retry of a refused event, which goes in a batch of its own.
    alone: bool


# What a send fails with when the broker is not there to answer, rather than refusing a batch.
OUT_OF_REACH = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError)


class OutboxRelay:
    """Publishes committed events in order with an idempotent producer, then marks them sent."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        outbox: Outbox,
        producer: Callable[[], AIOKafkaProducer],
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
        # A refused batch leaves a gap in the idempotent producer's sequence numbers for its
        # partition, and the broker refuses every later batch there for it: the relay then goes
        # on with a new producer.
        self._new_producer = producer
        self.producer: AIOKafkaProducer | None = None
        self._owner = owner
        self._poll_seconds = poll_seconds
        self._batch_size = batch_size
        self._lease_seconds = lease_seconds
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._held_until: datetime | None = None
        # Since when (monotonic) every sweep has failed, and until when this relay stands aside
        # after failing for a whole lease: an instance that reaches MongoDB but not Kafka must
        # not keep the lease, and with it every other instance from publishing.
        self._failing_since: float | None = None
        self._aside_until = 0.0
        # Events the broker has that are not marked sent yet, their entry waiting for another of
        # its events: not sent again, so that no later event of their key is followed by a copy.
        self._delivered: set[str] = set()
        self._refused: dict[str, _Refusal] = {}
        self.published = 0
        self.refusals = 0

    @property
    def refused(self) -> dict[str, str]:
        """The events the broker refused on their own, which wait to be tried again, with
        their keys."""
        return {
            event_id: refusal.key for event_id, refusal in self._refused.items() if refusal.alone
        }

    async def connect(self) -> None:
        """Start the producer now: at start-up, Kafka out of reach stops the service from
        starting rather than its relay from publishing."""
        await self._started_producer()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        # The sweep first: left running while the change stream closes, it would open another.
        sweep, self._task = self._task, None
        await cancel_and_wait(sweep)
        await self._stop_watching()
        await self._last_sweep()
        # Hand over at once: another instance relays now, not when the lease runs out.
        await self._release_lease()
        if self.producer is not None:
            await self.producer.stop()

    async def _last_sweep(self) -> None:
        """What was committed before the stop, published by the relay that holds the lease: a
        stop cut short the sweep under way, and events committed since it began (a consumer's,
        as the service stopped) would otherwise wait for the next start of a service that may
        have no other instance."""
        if self._held_until is None:
            return
        try:
            async with asyncio.timeout(LAST_SWEEP_SECONDS):
                while await self._hold_lease() and await self.relay_once() == self._batch_size:
                    pass
        except Exception:  # TimeoutError among them
            log.warning("outbox events left for the next relay at stop", exc_info=True)

    async def _started_producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            producer = self._new_producer()
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self.producer = producer
        return self.producer

    async def _renew_producer(self) -> None:
        # Kept until stopped: a relay stopped meanwhile (its task cancelled inside the stop)
        # stops it then, rather than leave it open.
        if self.producer is not None:
            await self.producer.stop()
        self.producer = None

    async def _release_lease(self) -> None:
        if self._held_until is None:
            return
        self._held_until = None
        try:
            # Briefly: with the database gone, the lease runs out by itself.
            async with asyncio.timeout(2):
                await self._lease.delete_one({"_id": "relay", "owner": self._owner})
        except Exception:
            log.warning("could not release the outbox relay lease", exc_info=True)

    async def _failed(self) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self._lease_seconds and self._held_until is not None:
            log.warning(
                "outbox relay failing for %.0f s: handing the lease to another instance",
                now - self._failing_since,
            )
            await self._release_lease()
            self._aside_until = now + self._lease_seconds
            self._failing_since = None

    async def _run(self) -> None:
        while True:
            try:
                # Standing aside, another instance may take the lease meanwhile.
                if time.monotonic() >= self._aside_until and await self._hold_lease():
                    self._start_watching()
                    # A long backlog renews the lease as it goes: no second relay joins in.
                    while await self.relay_once() == self._batch_size:
                        if not await self._hold_lease():
                            break
                else:
                    await self._stop_watching()
                    # Another instance relays, and learns for itself what the broker refuses.
                    self._delivered.clear()
                    self._refused.clear()
                self._failing_since = None
            except asyncio.CancelledError:
                raise
            except Exception:
                # Broker or database unavailable: keep the events and try again next sweep.
                log.exception("outbox relay failed; retrying")
                await self._failed()
            await self._outbox.wait_committed(self._poll_seconds)

    def _start_watching(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_others(), name="outbox-watch")

    async def _stop_watching(self) -> None:
        # Forgotten only once it has ended: a stop that cuts this one short ends it still.
        await cancel_and_wait(self._watch)
        self._watch = None

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
        """Publish the next pending entries, at most `batch_size`; returns how many were
        published and marked sent."""
        entries, records = await self._next()
        if not entries:
            return 0
        fault("CIVIC_FAULT_CRASH_BEFORE_PUBLISH")
        if records:
            await self._publish(records)
        fault("CIVIC_FAULT_CRASH_AFTER_PUBLISH")
        sent = [
            entry
            for entry in entries
            if all(event["_id"] in self._delivered for event in entry["events"])
        ]
        if sent:
            await self._collection.update_many(
                {"_id": {"$in": [entry["_id"] for entry in sent]}},
                {"$unset": {"pending": ""}, "$set": {"sent_at": datetime.now(UTC)}},
            )
            self._delivered.difference_update(
                event["_id"] for entry in sent for event in entry["events"]
            )
        return len(sent)

    async def _next(self) -> tuple[list[Document], list[_Record]]:
        """The next pending entries in commit order that have events to publish (or only need
        marking sent), and those events: all but the ones the broker has already and the ones
        that wait, a refused event until its next try and every later event of a key that has
        an earlier one waiting."""
        now = time.monotonic()
        waiting: set[str] = set()
        entries: list[Document] = []
        records: list[_Record] = []
        cursor = (
            self._collection.find({"pending": True})
            .sort([("order", ASCENDING), ("_id", ASCENDING)])
            .batch_size(self._batch_size)
        )
        if not self._refused:
            cursor = cursor.limit(self._batch_size)  # nothing waits: the first ones will do
        pending_refused: set[str] = set()
        try:
            async for entry in cursor:
                due: list[Document] = []
                held = False
                for event in entry["events"]:
                    if event["_id"] in self._delivered:
                        continue
                    refusal = self._refused.get(event["_id"])
                    if refusal is not None:
                        pending_refused.add(event["_id"])
                    if event["key"] in waiting or (refusal is not None and refusal.retry_at > now):
                        waiting.add(event["key"])
                        held = True
                    else:
                        due.append(event)
                if due or not held:
                    entries.append(entry)
                    records += self._records(due)
                    if len(entries) == self._batch_size:
                        break
            else:
                # Every pending entry seen: a refused event not among them is no longer
                # pending (an operator removed its entry, say), nor anything to report.
                for event_id in self._refused.keys() - pending_refused:
                    del self._refused[event_id]
        finally:
            await cursor.close()
        return entries, records

    def _records(self, events: list[Document]) -> list[_Record]:
        """One transaction's events as records: each run of events that carries one trace goes
        out under one span that continues it. A bulk import's thousands of events are one step
        of its trace; a consumer's batch of events, each from the trace of the event that
        caused it, continues each of those traces."""
        records: list[_Record] = []
        for _, run in itertools.groupby(events, key=_trace_of):
            records += self._traced(list(run))
        return records

    def _traced(self, events: list[Document]) -> list[_Record]:
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
                _Record(
                    event=stored,
                    key=stored["key"].encode(),
                    value=bytes(stored["data"]),
                    headers=[(k, v.encode()) for k, v in event.kafka_headers().items()]
                    + trace_headers,
                    alone=stored["_id"] in self._refused,
                )
                for stored in events
                for event in (_as_cloud_event(stored),)
            ]

    async def _publish(self, records: list[_Record]) -> None:
        """Each partition's records in order, the partitions side by side. A refused batch
        stops its partition's records for this time; the producer is renewed after it."""
        producer = await self._started_producer()
        partitions: dict[str, list[int]] = {}
        lanes: dict[TopicPartition, list[_Record]] = {}
        for record in records:
            topic = record.event["topic"]
            if topic not in partitions:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            partition = _PARTITIONER(record.key, partitions[topic], partitions[topic])
            lanes.setdefault(TopicPartition(topic, partition), []).append(record)
        refused = await asyncio.gather(
            *(self._publish_lane(producer, tp, lane) for tp, lane in lanes.items())
        )
        if any(refused):
            await self._renew_producer()

    async def _publish_lane(
        self, producer: AIOKafkaProducer, tp: TopicPartition, lane: list[_Record]
    ) -> bool:
        """One partition's records, batch after batch, each once the broker has the one before
        (the producer would not send it sooner either): after a refused batch nothing more goes
        to the partition, so no later event of a key overtakes the refused one. Returns whether
        a batch was refused."""
        for members, batch in _batches(producer, lane):
            try:
                await (await producer.send_batch(batch, tp.topic, partition=tp.partition))
            except OUT_OF_REACH:
                raise  # not the broker refusing these events: the sweep failed (see _failed)
            except KafkaError as error:
                self._refuse(members, error)
                return True
            for record in members:
                self._delivered.add(record.event["_id"])
                refusal = self._refused.pop(record.event["_id"], None)
                if refusal is not None and refusal.alone:
                    log.warning(
                        "outbox event %s published after %d refusals",
                        record.event["_id"],
                        refusal.alone,
                    )
            # Counted once the broker has them, so whoever sees them marked sent sees them counted.
            self.published += len(members)
        return False

    def _refuse(self, members: list[_Record], error: KafkaError) -> None:
        self.refusals += len(members)
        now = time.monotonic()
        if len(members) > 1:
            # Which of them the broker would not take, their batches of one will tell.
            for record in members:
                event = record.event
                before = self._refused.get(event["_id"])
                self._refused[event["_id"]] = _Refusal(
                    event["key"], before.alone if before else 0, now
                )
            log.error(
                "the broker refused a batch of %d outbox events (%s … %s): %r; each is tried "
                "again in a batch of its own",
                len(members),
                members[0].event["_id"],
                members[-1].event["_id"],
                error,
            )
            return
        event = members[0].event
        before = self._refused.get(event["_id"])
        alone = (before.alone if before else 0) + 1
        wait = min(MOST_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (alone - 1))
        self._refused[event["_id"]] = _Refusal(event["key"], alone, now + wait)
        log.error(
            "the broker refused outbox event %s (%s, key %s, %d bytes) %d time(s): %r; the "
            "key's later events wait behind it; tried again in %.0f s",
            event["_id"],
            event["type"],
            event["key"],
            len(members[0].value),
            alone,
            error,
            wait,
        )


def _batches(
    producer: AIOKafkaProducer, lane: list[_Record]
) -> Iterator[tuple[list[_Record], Any]]:
    """A partition's records in order, in batches as full as the producer makes them; a refused
    event's retry in one of its own, so that it is refused (or not) alone."""
    batch = producer.create_batch()
    members: list[_Record] = []
    for record in lane:
        if members and (record.alone or members[-1].alone or not _append(batch, record)):
            batch.close()
            yield members, batch
            batch, members = producer.create_batch(), []
        if not members:
            _append(batch, record)  # an empty batch takes any one record
        members.append(record)
    if members:
        batch.close()  # sent as it is, without lingering for more
        yield members, batch


def _append(batch: Any, record: _Record) -> bool:
    appended = batch.append(
        key=record.key, value=record.value, timestamp=None, headers=record.headers
    )
    return appended is not None


def _trace_of(event: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(event.get("trace", {}).items()))

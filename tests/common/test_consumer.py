"""A consumer handles each event once, over the real broker and MongoDB: a fetch's events in one
transaction, and a redelivered event skipped while the new ones beside it are still handled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer
from civic.tickets.v1 import events_pb2
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect

from services.common import consumer as consumer_module
from services.common.broker import kafka_broker, subscribe_once
from services.common.cloudevents import CloudEvent, type_name
from services.common.config import Settings
from services.common.consumer import PROCESSED, Delivery, TopicConsumer
from services.common.kafka_fetch import wait_after_empty
from services.common.mongo import Document, Session, mongo_client
from services.common.parking import PARK_AFTER_ATTEMPTS, PARKED
from services.common.runtime import Every


def submitted(ticket_id: str, event_id: str | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    message = events_pb2.TicketSubmitted(ticket_id=ticket_id, category="noise")
    event = CloudEvent(
        id=event_id or uuid.uuid4().hex,
        type=type_name(message),
        source="/civic/test",
        time=datetime.now(UTC),
        data=message.SerializeToString(),
    )
    return event.data, [(k, v.encode()) for k, v in event.kafka_headers().items()]


class Consumer:
    """A subscribe_once consumer whose handler writes one document per event it handles."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        *,
        fails_on: Collection[str] = (),
        outage: int = 0,
        database: str | None = None,
        group_id: str | None = None,
    ) -> None:
        self.settings, self.topic = settings, topic
        self.client: AsyncMongoClient[Document] = mongo_client(settings.mongo_uri)
        self.db = self.client[
            database or f"{settings.database_prefix}_consumer_{uuid.uuid4().hex[:6]}"
        ]
        self.group_id = group_id or f"test-{uuid.uuid4().hex[:8]}"
        self.broker = kafka_broker(settings.kafka_bootstrap_servers, "test-consumer")
        self.fetches: list[int] = []
        # Tickets whose handling fails, as a bug would, with the error below.
        self.fails_on = set(fails_on)
        # Calls that fail as when MongoDB is away, before any succeeds.
        self.outage = outage
        self.failures: list[BaseException] = []
        self.topic_consumer = TopicConsumer(
            self.client,
            self.db,
            topic=topic,
            group_id=self.group_id,
            instance_id="test-0",
            handle=self.handle,
        )
        subscribe_once(self.broker, self.topic_consumer)

    def released(self) -> Consumer:
        """This consumer's next release: the same group and database, and no bug."""
        return Consumer(self.settings, self.topic, database=self.db.name, group_id=self.group_id)

    async def handle(self, deliveries: list[Delivery], session: Session) -> list[Document]:
        self.fetches.append(len(deliveries))
        if self.outage:
            self.outage -= 1
            raise AutoReconnect("connection refused")
        for each in deliveries:
            if isinstance(each.message, events_pb2.TicketSubmitted) and (
                each.message.ticket_id in self.fails_on
            ):
                self.failures.append(error := KeyError(each.message.ticket_id))
                raise error
        handled = [
            {"ticket_id": d.message.ticket_id, "event_id": d.event.id}
            for d in deliveries
            if isinstance(d.message, events_pb2.TicketSubmitted)
        ]
        await self.db.handled.insert_many(handled, session=session)
        return []

    async def handled(self) -> list[str]:
        return sorted(await self.handled_in_order())

    async def handled_in_order(self) -> list[str]:
        return [doc["ticket_id"] async for doc in self.db.handled.find().sort("_id", 1)]

    async def close(self, *, keep_data: bool = False) -> None:
        await self.broker.stop()
        if not keep_data:
            await self.client.drop_database(self.db.name)
        await self.client.close()

    async def until_handled(self, count: int) -> list[str]:
        for _ in range(300):
            if len(found := await self.handled()) >= count:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"only {await self.handled()} handled")


@pytest.fixture
async def consumer(settings: Settings, topic: str) -> AsyncIterator[Consumer]:
    consumer = Consumer(settings, topic)
    yield consumer
    await consumer.close()


async def test_a_redelivered_event_is_skipped_and_the_new_ones_with_it_are_handled(
    settings: Settings, topic: str, consumer: Consumer
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    await consumer.broker.start()
    try:

        async def send(*events: tuple[str, tuple[bytes, list[tuple[str, bytes]]]]) -> None:
            sent = [
                await producer.send(topic, value, key=key.encode(), headers=headers)
                for key, (value, headers) in events
            ]
            await asyncio.gather(*sent)

        first_id = uuid.uuid4().hex
        # Keys spread over the partitions.
        await send(*((f"t{i}", submitted(f"t{i}", first_id if i == 0 else None)) for i in range(6)))
        assert await consumer.until_handled(6) == [f"t{i}" for i in range(6)]

        # t0's event again (a relay that crashed before marking it sent), sent together with new
        # events and a second copy of one of them: each new event once, the old one not again.
        again = uuid.uuid4().hex
        await send(
            ("t0", submitted("t0", first_id)),
            ("t6", submitted("t6", again)),
            ("t7", submitted("t7")),
            ("t6", submitted("t6", again)),
        )
        assert await consumer.until_handled(8) == [f"t{i}" for i in range(8)]
        await asyncio.sleep(0.5)  # anything handled twice would show by now
        assert await consumer.handled() == [f"t{i}" for i in range(8)]
        assert await consumer.db[PROCESSED].count_documents({}) == 8
    finally:
        await producer.stop()


async def test_a_fetch_over_several_partitions_is_handled_in_one_batch(
    settings: Settings, topic: str, consumer: Consumer
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=50)
    await producer.start()
    try:
        # Waiting before the consumer starts, so its first fetch finds them all.
        sent = [
            await producer.send(topic, value, key=f"t{i}".encode(), headers=headers)
            for i in range(12)
            for value, headers in [submitted(f"t{i}")]
        ]
        partitions = {(await delivered).partition for delivered in sent}
        assert len(partitions) > 1
        await consumer.broker.start()
        await consumer.until_handled(12)
        # More events in one batch than any one partition holds (one broker serves them all).
        assert max(consumer.fetches) > max(
            sum(1 for d in sent if d.result().partition == p) for p in partitions
        )
    finally:
        await producer.stop()


async def test_a_record_no_build_can_read_is_passed_over_and_the_rest_are_handled(
    settings: Settings, topic: str, consumer: Consumer
) -> None:
    """A type from a newer producer, a record that is no CloudEvent, a damaged payload, another
    producer's binary header: none may hold up the events behind it, on its partition or any."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    await consumer.broker.start()
    try:
        newer_value, newer = submitted("unknown")
        newer = [
            (k, b"civic.tickets.v1.TicketTeleported" if k == "ce_type" else v) for k, v in newer
        ]
        _, no_id = submitted("no-id")
        damaged_headers = submitted("damaged")[1]
        good_value, good_headers = submitted("t1")
        records = [
            ("t0", *submitted("t0")),
            ("t0", newer_value, newer),
            ("t0", b"x", [(k, v) for k, v in no_id if k != "ce_id"]),
            ("t0", b"\xff\xff\xff", damaged_headers),
            ("t0", good_value, [*good_headers, ("x-origin", b"\xfe\xff")]),
            *((f"k{i}", *submitted(f"k{i}")) for i in range(6)),  # other partitions
        ]
        sent = [
            await producer.send(topic, value, key=key.encode(), headers=headers)
            for key, value, headers in records
        ]
        await asyncio.gather(*sent)
        expected = sorted(["t0", "t1", *(f"k{i}" for i in range(6))])
        assert await consumer.until_handled(len(expected)) == expected
        await asyncio.sleep(0.3)
        assert await consumer.handled() == expected
    finally:
        await producer.stop()


def test_an_idle_consumer_waits_longer_after_each_empty_fetch_up_to_the_fetch_wait() -> None:
    waits = [wait_after_empty(empty, 0.010) for empty in range(1, 8)]
    assert waits == [0.001, 0.002, 0.004, 0.008, 0.010, 0.010, 0.010]
    assert wait_after_empty(10_000, 0.010) == 0.010


async def test_a_record_with_a_header_without_a_value_is_handled_or_passed_over(
    settings: Settings, topic: str, consumer: Consumer
) -> None:
    """Kafka lets a header have no value at all (null, not empty): another producer's such
    header must not stop the fetch it came in, and a CloudEvent header without a value makes
    the record one no build can read."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    await consumer.broker.start()
    try:
        (t0, t0_headers), (t1, t1_headers), (t2, t2_headers), (t3, t3_headers) = (
            submitted(f"t{i}") for i in range(4)
        )
        records: list[tuple[str, bytes, list[tuple[str, bytes | None]]]] = [
            ("t0", t0, [*t0_headers]),
            ("t0", t1, [*t1_headers, ("x-origin", None)]),
            ("t0", t2, [(k, None if k == "ce_time" else v) for k, v in t2_headers]),
            ("t0", t3, [*t3_headers]),
        ]
        sent = [
            await producer.send(topic, value, key=key.encode(), headers=headers)
            for key, value, headers in records
        ]
        await asyncio.gather(*sent)
        assert await consumer.until_handled(3) == ["t0", "t1", "t3"]
        await asyncio.sleep(0.3)
        assert await consumer.handled() == ["t0", "t1", "t3"]
    finally:
        await producer.stop()


async def send(settings: Settings, topic: str, *tickets: tuple[str | None, str]) -> None:
    """A TicketSubmitted for each (key, ticket id), in order; a key of None sends none."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, value, key=key and key.encode(), headers=headers)
            for key, ticket_id in tickets
            for value, headers in [submitted(ticket_id)]
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def test_an_event_its_handler_always_fails_on_is_parked_and_holds_back_only_its_key(
    settings: Settings, topic: str
) -> None:
    """A bug that fails on one event must not stop its partition for good: the event is set
    aside with its error, its key's later events wait behind it (their order holds), every
    other key goes on, and the release that fixes the bug handles them, in order, as it
    starts."""
    consumer = Consumer(settings, topic, fails_on={"bad"})
    await consumer.broker.start()
    others = [f"o{i}" for i in range(6)]  # keys spread over the partitions
    try:
        await send(settings, topic, ("k", "before"), ("k", "bad"), ("k", "after"))
        await send(settings, topic, *((other, other) for other in others))
        assert await consumer.until_handled(7) == sorted(["before", *others])
        await send(settings, topic, ("k", "later"), ("o0", "o0-later"))
        assert await consumer.until_handled(8) == sorted(["before", *others, "o0-later"])
        await asyncio.sleep(0.5)
        assert await consumer.handled() == sorted(["before", *others, "o0-later"])
        assert len(consumer.failures) >= PARK_AFTER_ATTEMPTS

        parked = await consumer.db[PARKED].find().sort("offset", 1).to_list()
        assert [doc["type"] for doc in parked] == ["civic.tickets.v1.TicketSubmitted"] * 3
        bad, after, later = parked
        assert bad["error"] == "KeyError: 'bad'" and bad["behind"] is None
        assert bad["key"] == b"k" and bad["group"] == consumer.group_id
        assert after["behind"] == later["behind"] == bad["event_id"]
        assert after["error"] is None and later["error"] is None
        assert await consumer.db[PROCESSED].count_documents({}) == 8
    finally:
        await consumer.close(keep_data=True)

    fixed = consumer.released()
    await fixed.broker.start()
    try:
        assert len(await fixed.until_handled(11)) == 11
        in_order = await fixed.handled_in_order()
        assert [t for t in in_order if t in {"before", "bad", "after", "later"}] == [
            "before",
            "bad",
            "after",
            "later",
        ]
        assert await fixed.db[PARKED].count_documents({}) == 0
        assert await fixed.db[PROCESSED].count_documents({}) == 11
    finally:
        await fixed.close()


async def test_an_event_that_fails_while_mongodb_is_away_is_retried_not_parked(
    settings: Settings, topic: str
) -> None:
    """A server's error is no fault of the event: the fetch is tried again until it passes,
    however many times that takes, and nothing is parked."""
    consumer = Consumer(settings, topic, outage=PARK_AFTER_ATTEMPTS + 2)
    await consumer.broker.start()
    try:
        await send(settings, topic, ("k", "first"), ("k", "second"))
        await consumer.until_handled(2)
        assert consumer.outage == 0
        assert await consumer.handled_in_order() == ["first", "second"]
        assert await consumer.db[PARKED].count_documents({}) == 0
    finally:
        await consumer.close()


async def test_parked_events_are_tried_again_as_new_events_arrive(
    settings: Settings, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What failed may pass later (the data a handler missed has come): a running consumer
    tries its parked events again, in order, once their retry time has come and events arrive."""
    monkeypatch.setattr(consumer_module, "RETRY_PARKED_S", 0.3)
    consumer = Consumer(settings, topic, fails_on={"bad"})
    await consumer.broker.start()
    try:
        await send(settings, topic, ("k", "bad"), ("k", "after"), ("o", "other"))
        assert await consumer.until_handled(1) == ["other"]
        assert await consumer.db[PARKED].count_documents({}) == 2
        consumer.fails_on.clear()
        await asyncio.sleep(0.5)
        await send(settings, topic, ("o", "next"))
        assert await consumer.until_handled(4) == ["after", "bad", "next", "other"]
        in_order = await consumer.handled_in_order()
        assert in_order.index("bad") < in_order.index("after")
        assert await consumer.db[PARKED].count_documents({}) == 0
    finally:
        await consumer.close()


async def test_parked_events_are_tried_again_while_no_events_arrive(
    settings: Settings, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet partition does not keep a parked event waiting for its next event or a restart:
    the service tries it again once its retry time has come, keyed or not."""
    monkeypatch.setattr(consumer_module, "RETRY_PARKED_S", 0.3)
    consumer = Consumer(settings, topic, fails_on={"bad"})
    # What the service host runs beside each consumer (services/common/service.py).
    retries = Every("parked events", 0.1, consumer.topic_consumer.retry_parked_when_due)

    async def parked(count: int) -> None:
        for _ in range(100):
            if await consumer.db[PARKED].count_documents({}) == count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{await consumer.db[PARKED].count_documents({})} parked")

    await consumer.broker.start()
    retries.start()
    try:
        await send(settings, topic, ("k", "bad"), ("k", "after"), ("o", "other"))
        assert await consumer.until_handled(1) == ["other"]
        await parked(2)
        consumer.fails_on.clear()
        # No event is sent meanwhile.
        assert await consumer.until_handled(3) == ["after", "bad", "other"]
        in_order = await consumer.handled_in_order()
        assert in_order.index("bad") < in_order.index("after")
        await parked(0)

        # An event without a key holds nothing back, and is tried again all the same.
        consumer.fails_on.add("lone")
        await send(settings, topic, (None, "lone"))
        await parked(1)
        consumer.fails_on.clear()
        assert await consumer.until_handled(4) == ["after", "bad", "lone", "other"]
        await parked(0)
    finally:
        await retries.stop()
        await consumer.close()

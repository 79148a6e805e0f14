"""The outbox relay: it publishes what another instance of the service commits at once rather
than at its next sweep (one relay holds the lease, and a change stream tells it of the others'
commits), and it reads only what a majority has committed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from bson import ObjectId
from civic.tickets.v1 import events_pb2
from google.protobuf.message import Message
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
)

from infra.local import free_port
from services.common.broker import outbox_producer
from services.common.config import Settings
from services.common.mongo import Document, Session, in_transaction, mongo_client
from services.common.outbox import (
    LEASE,
    MAX_EVENT_BYTES,
    OUTBOX,
    Outbox,
    OutboxRelay,
    ensure_outbox_indexes,
)
from tests.kafka_reader import Record, TopicReader, eventually, with_key

# Longer than the test may take: an event seen on time was not brought by a sweep.
SWEEP_SECONDS = 60.0
# A topic's max.message.bytes small enough for a test's event to be over it.
REFUSED_OVER = 10_000


@dataclass
class Instances:
    """Two instances, "a" and "b", of one service: one database, an outbox and a relay each (its
    producer started, the relay not)."""

    client: AsyncMongoClient[Document]
    db: AsyncDatabase[Document]
    outboxes: dict[str, Outbox]
    relays: dict[str, OutboxRelay]


@contextlib.asynccontextmanager
async def two_instances(
    settings: Settings, topic: str, **relay_options: Any
) -> AsyncIterator[Instances]:
    client = mongo_client(settings.mongo_uri)
    db = client[f"{settings.database_prefix}_relay_{uuid.uuid4().hex[:6]}"]
    await ensure_outbox_indexes(db)
    outboxes = {name: Outbox(db, source="/civic/test", topic=topic, instance=name) for name in "ab"}
    relays = {
        name: OutboxRelay(
            db,
            outboxes[name],
            functools.partial(outbox_producer, settings.kafka_bootstrap_servers, name),
            owner=name,
            **relay_options,
        )
        for name in "ab"
    }
    try:
        for relay in relays.values():
            await relay.connect()
        yield Instances(client, db, outboxes, relays)
    finally:
        for relay in relays.values():
            await relay.stop()
        await client.drop_database(db.name)
        await client.close()


def holds_lease(db: AsyncDatabase[Document], name: str) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return bool(await db[LEASE].find_one({"_id": "relay", "owner": name}))

    return probe


async def test_events_another_instance_commits_are_relayed_without_waiting_for_a_sweep(
    settings: Settings, topic: str
) -> None:
    # A long lease: on a loaded machine a late renewal must not hand the relay to b, which
    # this test is not about.
    async with two_instances(
        settings, topic, poll_seconds=SWEEP_SECONDS, lease_seconds=SWEEP_SECONDS
    ) as two:
        for name in "ab":
            two.relays[name].start()
            await eventually(
                holds_lease(two.db, "a"), what="the first instance's relay holds the lease"
            )

        async def commit(outbox: Outbox, ticket_id: str) -> Document:
            event = outbox.event(events_pb2.TicketSubmitted(ticket_id=ticket_id), key=ticket_id)

            async def stage(session: Session) -> None:
                await outbox.stage(session, [event])

            await in_transaction(two.client, stage)
            outbox.committed()
            return event

        async with TopicReader(settings.kafka_bootstrap_servers, topic) as reader:
            # b commits; a, holding the lease, relays it. Then a's own, which it hears of in
            # memory.
            for outbox, ticket_id in ((two.outboxes["b"], "t-b"), (two.outboxes["a"], "t-a")):
                event_id: str = (await commit(outbox, ticket_id))["_id"]

                def published(records: list[Record], event_id: str = event_id) -> bool:
                    return event_id in {record.event_id for record in records}

                await reader.collect(published, within=10, what=f"the event {ticket_id}")

            async def marked_sent() -> bool:
                return not await two.db[OUTBOX].count_documents({"pending": True})

            await eventually(marked_sent, what="both entries marked sent", within=10)
        assert two.relays["a"].published == 2
        assert two.relays["b"].published == 0


async def test_relay_asks_only_for_entries_the_majority_has_committed(
    settings: Settings, topic: str
) -> None:
    """A transaction is visible on the primary before it is durable on a majority: read there,
    an event could go out whose change a failover then undoes."""
    finds: list[Document] = []

    class Finds(CommandListener):
        def started(self, event: CommandStartedEvent) -> None:
            if event.command_name == "find" and event.command["find"] == OUTBOX:
                finds.append(dict(event.command))

        def succeeded(self, event: CommandSucceededEvent) -> None:
            pass

        def failed(self, event: CommandFailedEvent) -> None:
            pass

    client: AsyncMongoClient[Document] = AsyncMongoClient(
        settings.mongo_uri, event_listeners=[Finds()]
    )
    db = client[f"{settings.database_prefix}_relay_{uuid.uuid4().hex[:6]}"]
    outbox = Outbox(db, source="/civic/test", topic=topic)
    relay = OutboxRelay(
        db,
        outbox,
        functools.partial(outbox_producer, settings.kafka_bootstrap_servers, "a"),
        owner="a",
        poll_seconds=SWEEP_SECONDS,
    )
    try:
        assert await relay.relay_once() == 0
        assert finds, "the relay looked for pending entries"
        assert all(find.get("readConcern") == {"level": "majority"} for find in finds)
    finally:
        await relay.stop()
        await client.drop_database(db.name)
        await client.close()


def test_an_event_the_broker_would_refuse_fails_its_transaction_instead() -> None:
    """Staged, it would stop the relay at it for good: every sweep would fail on it again."""
    client: AsyncMongoClient[Document] = AsyncMongoClient("mongodb://127.0.0.1:1", connect=False)
    outbox = Outbox(client["unused"], source="/civic/test", topic="t")
    fits = events_pb2.TicketSubmitted(ticket_id="t", category="x" * (MAX_EVENT_BYTES - 100))
    assert outbox.event(fits, key="t")["key"] == "t"
    too_large = events_pb2.TicketSubmitted(ticket_id="t", category="x" * MAX_EVENT_BYTES)
    with pytest.raises(ValueError, match="split it"):
        outbox.event(too_large, key="t")


async def test_a_relay_draining_a_backlog_keeps_its_lease(settings: Settings, topic: str) -> None:
    """The drain outlasts the lease: without renewing it as it goes, the other instance's relay
    would take the lease midway and publish the same entries a second time."""
    # One entry per batch, a lease of two seconds, and a drain of several.
    options = {"poll_seconds": 0.05, "batch_size": 1, "lease_seconds": 2.0}
    async with two_instances(settings, topic, **options) as two:
        backlog = 1200
        await two.db[OUTBOX].insert_many(
            [
                {"_id": event["_id"], "pending": True, "by": "a", "events": [event]}
                for event in (
                    two.outboxes["a"].event(
                        events_pb2.TicketSubmitted(ticket_id=f"t{n}"), key=f"t{n}"
                    )
                    for n in range(backlog)
                )
            ]
        )
        two.relays["a"].start()

        async def draining() -> bool:
            return two.relays["a"].published > 0

        await eventually(draining, what="the first relay draining the backlog")
        two.relays["b"].start()

        async def drained() -> bool:
            return not await two.db[OUTBOX].count_documents({"pending": True})

        await eventually(drained, what="the backlog published", within=60)
        assert (two.relays["a"].published, two.relays["b"].published) == (backlog, 0)


async def test_two_instances_changes_to_one_aggregate_are_published_in_commit_order(
    settings: Settings, topic: str
) -> None:
    """Instance b changes ticket T, then instance a changes it again within the same second.
    Event ids from two processes in one second sort by each process's random bytes, not by
    time: sorted by id, a's event could be published before b's."""
    async with two_instances(settings, topic, poll_seconds=SWEEP_SECONDS) as two:
        tickets = two.db["tickets"]
        await tickets.insert_one({"_id": "T", "changes": 0})

        async def change(name: str, event: Document) -> str:
            async def work(session: Session) -> None:
                await tickets.update_one({"_id": "T"}, {"$inc": {"changes": 1}}, session=session)
                await two.outboxes[name].stage(session, [event])

            await in_transaction(two.client, work)
            return str(event["_id"])

        later = two.outboxes["a"].event(events_pb2.TicketWorkStarted(ticket_id="T"), key="T")
        earlier = two.outboxes["b"].event(events_pb2.TicketAcknowledged(ticket_id="T"), key="T")
        # What b's ObjectId() gives in the same second, its process's random bytes sorting later.
        ours = ObjectId(later["_id"])
        earlier["_id"] = str(ObjectId(ours.binary[:4] + b"\xff" * 5 + ours.binary[9:]))
        first = await change("b", earlier)
        second = await change("a", later)
        assert second < first  # by id alone, the later change would go first
        async with TopicReader(settings.kafka_bootstrap_servers, topic) as reader:
            while await two.relays["a"].relay_once():
                pass
            records = await reader.collect(lambda rs: len(rs) >= 2, what="both events")
        assert [r.event_id for r in records] == [first, second]


async def test_a_relay_that_stops_hands_its_lease_over_at_once(
    settings: Settings, topic: str
) -> None:
    """A graceful stop (scaling down, a deploy) must not leave the service's events waiting for
    the stopped instance's lease to run out."""
    async with two_instances(settings, topic, poll_seconds=0.05, lease_seconds=60) as two:
        for name in "ab":
            two.relays[name].start()
            await eventually(holds_lease(two.db, "a"), what="the first relay holds the lease")
        await two.relays["a"].stop()
        await eventually(
            holds_lease(two.db, "b"), what="the second relay took the lease over", within=5
        )


async def test_a_relay_that_stops_publishes_what_was_committed_before_it_stopped(
    settings: Settings, topic: str
) -> None:
    """A stop cuts the sweep under way short, and a consumer of the stopping service may commit
    an event after it began: the relay publishes those before it stops, rather than leave them
    for the next start of a service that may have no other instance."""
    async with two_instances(settings, topic, poll_seconds=SWEEP_SECONDS) as two:
        relay, outbox = two.relays["a"], two.outboxes["a"]
        relay.start()
        await eventually(holds_lease(two.db, "a"), what="the relay holds the lease")
        event = outbox.event(events_pb2.TicketSubmitted(ticket_id="t-last"), key="t-last")

        async def stage(session: Session) -> None:
            await outbox.stage(session, [event])

        async with TopicReader(settings.kafka_bootstrap_servers, topic) as reader:
            await in_transaction(two.client, stage)  # the relay not told: its sweep was cut short
            await relay.stop()
            records = await reader.collect(
                lambda rs: any(r.event_id == event["_id"] for r in rs),
                within=10,
                what="the event committed before the stop",
            )
        assert [r.event_id for r in records] == [event["_id"]]
        assert not await two.db[OUTBOX].count_documents({"pending": True})
        assert not await holds_lease(two.db, "a")()


async def test_a_relay_that_cannot_publish_hands_its_lease_to_one_that_can(
    settings: Settings, topic: str
) -> None:
    """An instance that reaches MongoDB but not Kafka must not hold the lease, and with it every
    event of the service, for as long as it runs: after failing for a lease's length it stands
    aside and another instance publishes."""
    async with two_instances(settings, topic, poll_seconds=0.05, lease_seconds=1.0) as two:
        # Instance a's broker is an address where nothing answers.
        await two.relays["a"].stop()
        cut_off = two.relays["a"] = OutboxRelay(
            two.db,
            two.outboxes["a"],
            functools.partial(outbox_producer, f"127.0.0.1:{free_port()}", "a"),
            owner="a",
            poll_seconds=0.05,
            lease_seconds=1.0,
        )
        cut_off.start()
        await eventually(holds_lease(two.db, "a"), what="the cut-off relay holds the lease")
        two.relays["b"].start()
        event = two.outboxes["a"].event(events_pb2.TicketSubmitted(ticket_id="t-1"), key="t-1")

        async def stage(session: Session) -> None:
            await two.outboxes["a"].stage(session, [event])

        async with TopicReader(settings.kafka_bootstrap_servers, topic) as reader:
            await in_transaction(two.client, stage)
            two.outboxes["a"].committed()
            records = await reader.collect(
                lambda rs: any(r.event_id == event["_id"] for r in rs),
                within=15,
                what="the event, published by the relay that can",
            )
        assert [r.event_id for r in records] == [event["_id"]]
        assert (cut_off.published, two.relays["b"].published) == (0, 1)


async def test_a_stopped_relay_leaves_no_change_stream_open(settings: Settings, topic: str) -> None:
    """Events committed as the relay stops wake its sweep while the change stream closes: the
    sweep must not open another one that nothing stops."""
    async with two_instances(settings, topic, poll_seconds=SWEEP_SECONDS) as two:
        relay = two.relays["a"]

        def watching() -> set[asyncio.Task[Any]]:
            # Not the relays of services other tests left running in this event loop.
            named = {t for t in asyncio.all_tasks() if t.get_name() == "outbox-watch"}
            return named - others

        others: set[asyncio.Task[Any]] = set()
        others = watching()
        relay.start()
        await eventually(holds_lease(two.db, "a"), what="the relay holds the lease")

        async def watch_started() -> bool:
            return bool(watching())

        await eventually(watch_started, what="the relay watching for other instances' events")
        two.outboxes["a"].committed()
        await relay.stop()
        assert not {t for t in watching() if not t.done()}


async def test_an_event_the_broker_refuses_holds_back_only_the_later_events_of_its_key(
    settings: Settings,
) -> None:
    """A ticket's event the topic refuses for good (over its max.message.bytes): the ticket's
    later events wait behind it rather than overtake it, while another ticket's events, even in
    the same partition and the same batch, go on; once the topic takes it, the ticket's events
    follow in order."""
    topic = f"test.runtime.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    # One partition: the two tickets' events share it, and their first batch too.
    await admin.create_topics(
        [NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": str(REFUSED_OVER)})]
    )
    try:
        async with (
            two_instances(settings, topic, poll_seconds=0.1, lease_seconds=SWEEP_SECONDS) as two,
            TopicReader(settings.kafka_bootstrap_servers, topic) as reader,
        ):
            relay, outbox = two.relays["a"], two.outboxes["a"]

            async def commit(message: Message, ticket_id: str) -> str:
                event = outbox.event(message, key=ticket_id)

                async def stage(session: Session) -> None:
                    await outbox.stage(session, [event])

                await in_transaction(two.client, stage)
                outbox.committed()
                return str(event["_id"])

            async def on_topic(ticket_id: str) -> list[str]:
                """The ticket's events on the topic now, in the order a consumer reads them."""
                records = await reader.read_to_end()
                return [record.event_id for record in with_key(records, ticket_id)]

            async def published(event_id: str, ticket_id: str, what: str) -> None:
                async def there() -> bool:
                    return event_id in await on_topic(ticket_id)

                await eventually(there, what=what, within=30)

            a1 = await commit(events_pb2.TicketSubmitted(ticket_id="A"), "A")
            # Under the producer's batch size, over the topic's limit.
            refused = await commit(
                events_pb2.TicketSubmitted(ticket_id="A", category="x" * (REFUSED_OVER + 2000)),
                "A",
            )
            a3 = await commit(events_pb2.TicketAcknowledged(ticket_id="A"), "A")
            b1 = await commit(events_pb2.TicketSubmitted(ticket_id="B"), "B")
            relay.start()

            await published(b1, "B", "the other ticket's event")
            assert await on_topic("A") == [a1], "a later event overtook the refused one"
            assert relay.refused == {refused: "A"}
            assert relay.refusals >= 1
            pending = {doc["_id"] async for doc in two.db[OUTBOX].find({"pending": True})}
            assert pending == {refused, a3}

            # While the refused event waits to be tried again, the other ticket's go on.
            b2 = await commit(events_pb2.TicketAcknowledged(ticket_id="B"), "B")
            await published(b2, "B", "the other ticket's next event")
            assert await on_topic("B") == [b1, b2]
            assert await on_topic("A") == [a1]

            # The operator raises the topic's limit: the ticket's events follow, in order.
            await admin.alter_configs(
                [
                    ConfigResource(
                        ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": "1000000"}
                    )
                ]
            )
            await published(a3, "A", "the ticket's held-back events")
            assert await on_topic("A") == [a1, refused, a3]
            assert relay.refused == {}

            async def all_sent() -> bool:
                return not await two.db[OUTBOX].count_documents({"pending": True})

            await eventually(all_sent, what="every entry marked sent")
    finally:
        await admin.delete_topics([topic])
        await admin.close()

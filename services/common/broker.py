"""Kafka through faststream: the producer the outbox relay uses, and the subscriptions that run
each consumer group's `TopicConsumer` (services/common/consumer.py)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage

from services.common import kafka_fetch
from services.common.consumer import TopicConsumer

FETCH_WAIT_MS = 10
# A consumer takes what it has fetched, up to this many events, as one batch.
MAX_BATCH = 100
# An idle consumer looks for new events this often (faststream waits this long for a batch,
# then as long again before the next look).
BATCH_WAIT_MS = 5
# faststream's per-message logger for Kafka brokers.
ACCESS_LOGGER = "faststream.access.kafka"


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


def subscribe_once(broker: KafkaBroker, consumer: TopicConsumer) -> None:
    """Run the consumer on its topic in its consumer group."""
    topic = consumer.topic

    class Assignment(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
            await consumer.on_revoked({p.partition for p in revoked if p.topic == topic})

        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            await consumer.on_assigned({p.partition for p in assigned if p.topic == topic})

    @broker.subscriber(
        topic,
        group_id=consumer.group_id,
        # Static membership: a restarted instance takes its partitions back at once instead of
        # waiting for the group to notice its old session is gone.
        group_instance_id=consumer.instance_id,
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
        await consumer.on_fetch(list(msg.raw_message))


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

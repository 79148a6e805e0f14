"""`civic tail`: the events of a topic as they arrive, decoded with the published protos.

One line per event: time, type, key, partition@offset and the message as JSON. The topic's name
is its proto package (`civic.tickets.v1`), so its events decode with `<topic>.events_pb2`. An
event type this build does not know (published by a newer service) is shown by type and size.
It reads without a consumer group: it commits nothing and disturbs no consumer.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Collection
from types import ModuleType
from typing import TextIO

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from services.common import kafka_fetch
from services.common.cloudevents import CloudEvent
from services.common.topology import TOPICS

TOPIC_NAMES = tuple(topic.name for topic in TOPICS)


class UnknownTopic(ValueError):
    pass


class MissingTopic(LookupError):
    """The broker has no such topic (not provisioned there)."""


def load_event_types(topic: str) -> ModuleType:
    """Import the topic's event messages, so their type names decode."""
    if topic not in TOPIC_NAMES:
        raise UnknownTopic(f"unknown topic {topic!r}; the topics are {', '.join(TOPIC_NAMES)}")
    return importlib.import_module(f"{topic}.events_pb2")


def event_types(topic: str) -> tuple[str, ...]:
    """The ce_types the topic carries, as this build's protos define them: every message of the
    topic's events.proto is one of its events."""
    messages = load_event_types(topic).DESCRIPTOR.message_types_by_name.values()
    return tuple(message.full_name for message in messages)


def describe(record: ConsumerRecord[bytes, bytes], event: CloudEvent) -> str:
    key = (record.key or b"").decode(errors="replace")
    where = f"{event.time.isoformat(timespec='seconds')} {event.type} key={key} "
    where += f"{record.partition}@{record.offset}"
    try:
        message = event.message()
    except KeyError:
        return f"{where} (a type this build does not know, {len(event.data)} bytes)"
    except DecodeError:
        return f"{where} (a damaged payload, {len(event.data)} bytes)"
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return f"{where} {json.dumps(data, ensure_ascii=False, sort_keys=True)}"


def line_for(record: ConsumerRecord[bytes, bytes], types: Collection[str]) -> str | None:
    """The record's line, or None when `types` leaves it out."""
    try:
        event = CloudEvent.from_kafka(record.headers or (), record.value or b"")
    except ValueError as error:  # another producer's record on the topic
        where = f"{record.partition}@{record.offset}"
        return None if types else f"{where} (not a readable CloudEvent: {error})"
    return None if types and event.type not in types else describe(record, event)


async def tail(
    bootstrap_servers: str,
    topic: str,
    out: TextIO,
    *,
    from_beginning: bool = False,
    types: Collection[str] = (),
    key: str = "",
    count: int = 0,
) -> int:
    """Print the topic's events (only `types`, only `key`, if given) until `count` are shown,
    or forever when `count` is 0. Returns how many were shown."""
    load_event_types(topic)
    kafka_fetch.install()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        fetch_max_wait_ms=200,
    )
    try:
        await consumer.start()
        # Asked for before subscribing: a broker without the topic would leave the tail waiting
        # in silence, or create it on the subscription's request (noida-db does) with one
        # partition, which provisioning never changes afterwards.
        if topic not in await consumer.topics():
            raise MissingTopic(
                f"topic {topic} does not exist on {bootstrap_servers}; provision it "
                f"(python -m infra.provision, or civic stack up)"
            )
        consumer.subscribe([topic])
    except BaseException:
        await consumer.stop()  # a consumer that could not start still holds its client
        raise
    shown = 0
    try:
        async for record in consumer:
            if key and (record.key or b"").decode(errors="replace") != key:
                continue
            line = line_for(record, types)
            if line is None:
                continue
            print(line, file=out, flush=True)
            shown += 1
            if shown == count:
                break
    finally:
        await consumer.stop()
    return shown

"""`civic tail`: the events of a topic as they arrive, decoded with the published protos.

One line per event: time, type, key, partition@offset and the message as JSON. The topic's name
is its proto package (`civic.tickets.v1`), so its events decode with `<topic>.events_pb2`. An
event type this build does not know (published by a newer service) is shown by type and size.
It reads without a consumer group: it commits nothing and disturbs no consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import time
from collections.abc import Collection
from types import ModuleType
from typing import TextIO

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from services.common import kafka_fetch
from services.common.cloudevents import CloudEvent
from services.common.topology import TOPICS

TOPIC_NAMES = tuple(topic.name for topic in TOPICS)
PROBE_EVERY = 1.0  # seconds between checks that the broker is there
LOST_AFTER = 5.0  # seconds out of reach before saying so: a broker restarting takes about that


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
    """The ce_types the topic carries, as this build's protos define them: the messages of the
    topic's events.proto but those another of them holds, which are parts of an event (the
    ledger's Assessment of a TransactionPosted), never sent on their own: a tail of such a
    type would wait for ever."""
    messages = load_event_types(topic).DESCRIPTOR.message_types_by_name.values()
    parts = {
        field.message_type.full_name
        for message in messages
        for field in message.fields
        if field.message_type is not None
    }
    return tuple(message.full_name for message in messages if message.full_name not in parts)


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
    notes: TextIO | None = None,
) -> int:
    """Print the topic's events (only `types`, only `key`, if given) until `count` are shown,
    or forever when `count` is 0. Returns how many were shown. With `notes`, say there when
    the tail has started, and when the broker is out of reach and back: the consumer retries
    in silence, and a tail that shows nothing would look like a quiet topic."""
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
        # Assigned, and each partition's position found, before saying the tail has started:
        # an event sent from then on is shown (a subscription finds its partitions, and their
        # ends, only once it first fetches, after what was sent meanwhile).
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        for partition in partitions:
            await consumer.position(partition)
    except BaseException:
        await consumer.stop()  # a consumer that could not start still holds its client
        raise
    watch = None
    if notes is not None:
        print(f"tailing {topic} on {bootstrap_servers} (Ctrl-C stops)", file=notes, flush=True)
        watch = asyncio.create_task(BrokerWatch(bootstrap_servers, notes).run())
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
        if watch is not None:
            watch.cancel()
        await consumer.stop()
    return shown


class BrokerWatch:
    """Says once when the broker has been out of reach for LOST_AFTER seconds, and when it is
    back."""

    def __init__(self, bootstrap_servers: str, notes: TextIO) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.notes = notes
        self.lost_since: float | None = None
        self.said_lost = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY)
            self.seen(await reachable(self.bootstrap_servers), time.monotonic())

    def seen(self, there: bool, now: float) -> None:
        if there:
            if self.said_lost:
                self._say(f"the broker at {self.bootstrap_servers} is back")
            self.lost_since, self.said_lost = None, False
        elif self.lost_since is None:
            self.lost_since = now
        elif not self.said_lost and now - self.lost_since >= LOST_AFTER:
            self._say(f"lost the broker at {self.bootstrap_servers}, retrying")
            self.said_lost = True

    def _say(self, line: str) -> None:
        print(line, file=self.notes, flush=True)


DEFAULT_PORT = 9092  # what aiokafka connects to when an address names no port


def host_and_port(address: str) -> tuple[str, int]:
    """ "host:port", "[v6]:port", or an address without a port, which the client takes as
    Kafka's own. ValueError for a port that is not a number."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, colon, port = address.rpartition(":")
        if not colon:
            host, port = address, ""
    return host, int(port) if port else DEFAULT_PORT


async def reachable(bootstrap_servers: str) -> bool:
    """Whether any of the brokers takes a connection."""
    for address in bootstrap_servers.split(","):
        try:
            connecting = asyncio.open_connection(*host_and_port(address.strip()))
            _, writer = await asyncio.wait_for(connecting, PROBE_EVERY)
        except (OSError, TimeoutError, ValueError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False

"""An outside reader of a Kafka topic, as another team's service would read it: a plain aiokafka
consumer in its own fresh consumer group, from the earliest offset, knowing nothing of Civic's
broker code. Tests share the topic with every other test of the session, so they filter what they
collect by the ids they created themselves. Also: `eventually`, for waiting on any asynchronous
effect (a consumer's projection, the relay marking an event sent) without guessing at sleeps.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.common.cloudevents import CloudEvent

DEFAULT_TIMEOUT = 15.0
T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, what: str, within: float = DEFAULT_TIMEOUT
) -> T:
    """The first truthy result of `probe`, polled every 0.1 s; fails the test after `within` s."""
    deadline = time.monotonic() + within
    while not (result := await probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f} s: {what}")
        await asyncio.sleep(0.1)
    return result


@dataclass(frozen=True)
class Record:
    """One Kafka record as it is on the wire."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, raw: Any) -> Record:
        return cls(
            partition=int(raw.partition),
            offset=int(raw.offset),
            key=raw.key,
            value=raw.value or b"",
            headers=tuple((str(name), bytes(value)) for name, value in raw.headers or ()),
        )

    @property
    def header_map(self) -> dict[str, str]:
        return {name: value.decode() for name, value in self.headers}

    def header(self, name: str) -> str:
        return self.header_map.get(name, "")

    @property
    def event_id(self) -> str:
        return self.header("ce_id")

    @property
    def event_type(self) -> str:
        return self.header("ce_type")

    @property
    def key_text(self) -> str:
        return (self.key or b"").decode()

    def event(self) -> CloudEvent:
        return CloudEvent.from_kafka(self.headers, self.value)


Predicate = Callable[[list["Record"]], bool]


class TopicReader:
    """Collects every record of one topic, from the beginning, in a fresh consumer group."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.topic = topic
        self.group_id = f"test-reader-{uuid.uuid4().hex}"
        self.records: list[Record] = []
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap_servers,
            group_id=self.group_id,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._consumer.stop()

    async def _poll(self, seconds: float) -> None:
        batches = await self._consumer.getmany(timeout_ms=max(1, int(seconds * 1000)))
        for batch in batches.values():
            self.records.extend(Record.of(raw) for raw in batch)

    async def collect(
        self, predicate: Predicate, *, within: float = DEFAULT_TIMEOUT, what: str = ""
    ) -> list[Record]:
        """Read until `predicate(records so far)` holds; fail the test after `within` seconds."""
        deadline = time.monotonic() + within
        while not predicate(self.records):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"not seen on {self.topic} within {within:.0f} s: {what or predicate!r} "
                    f"({len(self.records)} records read)"
                )
            await self._poll(min(left, 0.5))
        return self.records

    async def read_to_end(self, *, within: float = DEFAULT_TIMEOUT) -> list[Record]:
        """Read everything on the topic now, up to each partition's current end offset.

        What this returns is complete: a record that is not in it was not on the topic when the
        call started, which lets a test prove that something was *not* published.
        """
        deadline = time.monotonic() + within
        partitions = await self._partitions(deadline)
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(partitions)
        while True:
            if self._consumer.assignment() >= set(partitions):
                positions = {tp: await self._consumer.position(tp) for tp in ends}
                if all(positions[tp] >= end for tp, end in ends.items()):
                    return self.records
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"could not read {self.topic} to its end in {within:.0f} s")
            await self._poll(min(left, 0.2))

    async def _partitions(self, deadline: float) -> list[TopicPartition]:
        while not (ids := self._consumer.partitions_for_topic(self.topic)):
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {self.topic} has no partitions")
            await self._poll(0.2)
        return [TopicPartition(self.topic, partition) for partition in sorted(ids)]


def with_key(records: Iterable[Record], *keys: str) -> list[Record]:
    wanted = set(keys)
    return [record for record in records if record.key_text in wanted]


def of_type(records: Iterable[Record], type_name: str) -> list[Record]:
    return [record for record in records if record.event_type == type_name]


async def committed_offsets(bootstrap_servers: str, group_id: str, topic: str) -> dict[int, int]:
    """The offsets a consumer group has committed on `topic`, by partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def wait_consumed(
    bootstrap_servers: str,
    group_id: str,
    records: Iterable[Record],
    *,
    topic: str,
    within: float = 30.0,
) -> None:
    """Wait until `group_id` has committed past every one of `records` (it handled them all)."""
    needed: dict[int, int] = {}
    for record in records:
        needed[record.partition] = max(needed.get(record.partition, 0), record.offset + 1)

    async def caught_up() -> bool:
        committed = await committed_offsets(bootstrap_servers, group_id, topic)
        return all(committed.get(partition, -1) >= end for partition, end in needed.items())

    await eventually(
        caught_up, what=f"consumer group {group_id} commits past {needed}", within=within
    )

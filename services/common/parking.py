"""Events a consumer's handler fails on every time, set aside ("parked") so that the events
behind them go on.

An event is parked only when the failure is its own: the same error each time it is handled
alone, and not one of a server away or busy (those are retried until the server is back, as
they always were). Parking keeps order where it matters: the later events of a parked event's
key (its aggregate) are parked behind it, not handled before it, while every other key goes on.
The consumer tries a key's parked events again, in order, whenever it is assigned their
partition (a new release of the service, which fixes the bug, starts so) and, while it has
any, every `RETRY_PARKED_S`, as new events arrive or, on a quiet partition, from the service's
own timer; the first that succeeds releases the ones behind it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from pymongo.errors import (
    ConfigurationError,
    ConnectionFailure,
    CursorNotFound,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from services.common.errors import Unavailable
from services.common.mongo import Document

PARKED = "parked_events"
# Times an event is handled alone, failing each time, before it is parked.
PARK_AFTER_ATTEMPTS = 3
RETRY_PARKED_S = 60.0

# Errors of a server, not of the event: the driver's labels for what a retry can cure, and the
# codes of a server shutting down, stepping down, interrupted or out of time.
_TRANSIENT_LABELS = (
    "TransientTransactionError",
    "UnknownTransactionCommitResult",
    "RetryableWriteError",
    "NoWritesPerformed",
)
_PEER_AWAY = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
_SERVER_CODES = frozenset(
    {6, 7, 50, 89, 91, 112, 189, 246, 251, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)


def is_the_events_fault(error: BaseException) -> bool:
    """Whether a handler's error could be the event's own (a bug it meets, data it cannot
    take), as opposed to MongoDB or the broker being away, busy or failing over. When in doubt
    it says yes: a parked event is not lost, only tried again later in its key's order."""
    if isinstance(
        error,
        ConnectionFailure
        | ConfigurationError
        | ExecutionTimeout
        | WriteConcernError
        | CursorNotFound
        | OSError  # TimeoutError among them
        | KafkaError,
    ):
        return False
    if isinstance(error, PyMongoError) and any(map(error.has_error_label, _TRANSIENT_LABELS)):
        return False
    if isinstance(error, Unavailable) or (
        isinstance(error, grpc.aio.AioRpcError) and error.code() in _PEER_AWAY
    ):
        return False  # another service a handler asked did not answer
    return not (isinstance(error, OperationFailure) and error.code in _SERVER_CODES)


def held_key(record: ConsumerRecord[Any, Any]) -> tuple[int, bytes] | None:
    """What a parked record holds back: its key's later records on its partition. A record
    without a key holds back nothing."""
    return None if record.key is None else (record.partition, record.key)


def parked_record(
    group_id: str,
    event_id: str,
    event_type: str,
    record: ConsumerRecord[Any, Any],
    *,
    error: str | None,
    behind: str | None,
    now: datetime,
) -> Document:
    """A parked event as stored: the record whole (to be handled again as it came), where it
    came from, and why it waits: its own error, or the parked event of its key it waits
    behind."""
    return {
        "_id": f"{group_id}:{event_id}",
        "group": group_id,
        "event_id": event_id,
        "type": event_type,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": record.key,
        "timestamp": record.timestamp,
        "headers": [[name, value] for name, value in record.headers or ()],
        "value": record.value,
        "error": error,
        "behind": behind,
        "parked_at": now,
        "tried_at": now,
        "attempts": PARK_AFTER_ATTEMPTS if error else 0,
    }


def record_of(parked: Document) -> ConsumerRecord[Any, Any]:
    """The record a parked event came as."""
    value: bytes | None = parked["value"]
    key: bytes | None = parked["key"]
    return ConsumerRecord(
        topic=parked["topic"],
        partition=parked["partition"],
        offset=parked["offset"],
        timestamp=parked["timestamp"],
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1 if key is None else len(key),
        serialized_value_size=-1 if value is None else len(value),
        headers=[(name, value) for name, value in parked["headers"]],
    )


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"

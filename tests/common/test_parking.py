"""Which errors of a consumer's handler park an event: only those that could be the event's
own. A server away, failing over or out of time is retried until it is back."""

from __future__ import annotations

import grpc
import pytest
from aiokafka.errors import KafkaConnectionError
from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteConcernError,
)

from services.common.errors import InvalidArgument, Unavailable
from services.common.parking import is_the_events_fault


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "details")


def labelled(label: str) -> OperationFailure:
    return OperationFailure("write conflict", 999, {"errorLabels": [label]})


@pytest.mark.parametrize(
    "error",
    [
        AutoReconnect("connection refused"),
        NotPrimaryError("not primary"),
        ServerSelectionTimeoutError("no primary"),
        WriteConcernError("waiting for replication timed out", 64),
        OperationFailure("interrupted at shutdown", 11600),
        OperationFailure("primary stepped down", 189),
        labelled("TransientTransactionError"),
        labelled("UnknownTransactionCommitResult"),
        ConnectionResetError(),
        TimeoutError(),
        KafkaConnectionError(),
        Unavailable("the registry did not answer; try again"),
        rpc_error(grpc.StatusCode.UNAVAILABLE),
        rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
    ids=repr,
)
def test_a_server_away_or_busy_is_no_fault_of_the_event(error: BaseException) -> None:
    assert not is_the_events_fault(error)


@pytest.mark.parametrize(
    "error",
    [
        KeyError("household"),
        ValueError("not a date"),
        AttributeError("'NoneType' object has no attribute 'unit_id'"),
        DuplicateKeyError("E11000 duplicate key", 11000),
        OperationFailure("BadValue", 2),
        InvalidArgument("unit_id", "is empty"),
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=repr,
)
def test_a_bug_or_data_a_handler_cannot_take_may_be_the_events_fault(
    error: BaseException,
) -> None:
    assert is_the_events_fault(error)

"""The shared gRPC server: health and reflection without credentials, errors mapped to status
codes, and never a stack trace to the client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pymongo.errors import ServerSelectionTimeoutError

from infra.local import free_port
from services.common.auth import Role, principal
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.grpc_client import civic_channel
from services.common.grpc_server import GrpcServer
from tests.conftest import TEST_SECRET, token

SERVICE = "civic.test.v1.ProbeService"


async def probe(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    """Behaves as the request says, so each test can pick an outcome."""
    match request:
        case b"who":
            return principal().role.value.encode()
        case b"invalid":
            raise InvalidArgument("household_id", "is required")
        case b"long":  # a refusal that echoes a long input (a pasted page, in Vietnamese)
            raise InvalidArgument("full_name", f"holds {'Nguyễn Thị Bê ' * 1000!r}")
        case b"missing":
            raise NotFound("household hh-1 not found")
        case b"precondition":
            raise FailedPrecondition("person is deceased")
        case b"crash":
            raise RuntimeError("secret internal detail: /srv/civic/db password=hunter2")
        case b"database away":
            raise ServerSelectionTimeoutError("mongo-0.internal:27017: connection refused")
    return request


async def probe_stream(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    yield principal().role.value.encode()
    if request == b"slow dependency":
        await asyncio.wait_for(asyncio.sleep(10), 0.01)  # the servicer's own time limit
    yield request


async def typed(
    request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    """A method with messages (the probes above take bytes as they come)."""
    if request.service == "wrong answer":
        return "not a HealthCheckResponse"  # a servicer's bug
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Probe": grpc.unary_unary_rpc_method_handler(probe),
            "ProbeStream": grpc.unary_stream_rpc_method_handler(probe_stream),
            "Typed": grpc.unary_unary_rpc_method_handler(
                typed,
                health_pb2.HealthCheckRequest.FromString,
                health_pb2.HealthCheckResponse.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture(scope="module")
async def target() -> AsyncIterator[str]:
    server = GrpcServer(
        host="127.0.0.1",
        port=free_port(),
        auth_secret=TEST_SECRET,
        service_names=[SERVICE],
        register=register,
    )
    port = await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(grace=0.1)


async def call(target: str, body: bytes, bearer: str | None = None, rpc: str = "Probe") -> bytes:
    """`body` as it comes, to `rpc` (Probe takes bytes; Typed, messages)."""
    bearer = token(Role.WARD_OFFICER, "dn.hc.hc1") if bearer is None else bearer
    async with civic_channel(target, bearer) as channel:
        method: Any = channel.unary_unary(f"/{SERVICE}/{rpc}")
        reply: bytes = await method(body)
        return reply


async def test_caller_is_known_to_the_servicer(target: str) -> None:
    assert await call(target, b"who") == b"ward_officer"


@pytest.mark.parametrize(
    ("body", "code", "details"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "household_id: is required"),
        (b"missing", grpc.StatusCode.NOT_FOUND, "household hh-1 not found"),
        (b"precondition", grpc.StatusCode.FAILED_PRECONDITION, "person is deceased"),
    ],
)
async def test_domain_errors_map_to_status_codes(
    target: str, body: bytes, code: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(target, body)
    assert (error.value.code(), error.value.details()) == (code, details)


async def test_a_refusal_that_echoes_a_long_input_keeps_its_code_and_field(target: str) -> None:
    """Its message is cut to fit the status trailer, rather than the client refusing the whole
    answer as RESOURCE_EXHAUSTED."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(target, b"long")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details() or ""
    assert details.startswith("full_name: holds 'Nguyễn Thị Bê") and details.endswith("…")


async def test_unexpected_error_reveals_nothing(target: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(target, b"crash")
    assert error.value.code() == grpc.StatusCode.INTERNAL
    details = error.value.details() or ""
    assert details.startswith("internal error (trace ")
    assert "hunter2" not in details and "Traceback" not in details and "RuntimeError" not in details


async def test_a_malformed_request_is_invalid_argument_and_only_once_the_caller_is_known(
    target: str,
) -> None:
    """Parsing is the server's work, not the caller's secret: a request that is not a message
    of the method is INVALID_ARGUMENT naming the request, without the parser's words; and it
    tells nothing before the token is checked."""
    assert await call(target, health_pb2.HealthCheckRequest().SerializeToString(), rpc="Typed") == (
        health_pb2.HealthCheckResponse(status=1).SerializeToString()
    )
    truncated = b"\xff\xff\xff"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(target, truncated, rpc="Typed")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("request: ")
    assert "Error parsing" not in (error.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(target, truncated, bearer="", rpc="Typed")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_answer_the_servicer_got_wrong_reveals_nothing(target: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        request = health_pb2.HealthCheckRequest(service="wrong answer")
        await call(target, request.SerializeToString(), rpc="Typed")
    assert error.value.code() == grpc.StatusCode.INTERNAL
    details = error.value.details() or ""
    assert details.startswith("internal error (trace ") and "SerializeToString" not in details


async def test_a_streams_own_time_limit_is_a_fault_not_an_expired_token(target: str) -> None:
    """The stream ends when the caller's token expires; a servicer's own timeout meanwhile is
    the server's fault (INTERNAL, logged), not a reason for the caller to sign in again."""
    async with civic_channel(target, token(Role.WARD_OFFICER, "dn.hc.hc1")) as channel:
        method: Any = channel.unary_stream(f"/{SERVICE}/ProbeStream")
        assert [item async for item in method(b"fine")] == [b"ward_officer", b"fine"]
        received: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for item in method(b"slow dependency"):
                received.append(item)
    assert received == [b"ward_officer"]
    assert error.value.code() == grpc.StatusCode.INTERNAL


async def test_a_database_out_of_reach_is_unavailable_to_retry_and_names_no_host(
    target: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(target, b"database away")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "mongo-0" not in (error.value.details() or "")


async def test_credentials_are_required(target: str) -> None:
    expired = token(Role.CITY_ADMIN, "dn", secret="another-signing-key-entirely-0123456789")
    for bearer in ("", "garbage", expired):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(target, b"who", bearer)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_need_no_credentials(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        async for response in responses:
            names = {s.name for s in response.list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names
            break

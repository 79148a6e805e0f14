"""The asyncio gRPC server every service runs: health, reflection, graceful shutdown, and one
interceptor for tracing, error mapping and authentication (outermost first)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import unquote

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pymongo.errors import ConnectionFailure

from services.common import auth
from services.common.errors import DomainError, InvalidArgument, Unauthenticated
from services.common.telemetry import context_from_headers, tracer

log = logging.getLogger(__name__)
# A proxy until the provider is installed; fetched once, not per message or call.
_TRACER = tracer("civic.grpc")

# Answer these without credentials: load balancers and tooling call them.
PUBLIC_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
PURPOSE_HEADER = "x-civic-purpose"
# The most a refusal's message takes in the status trailer, as sent: percent-encoded, so a
# Vietnamese letter takes up to nine bytes. A client refuses the whole answer, with
# RESOURCE_EXHAUSTED instead of the refusal's own code, once its metadata passes 8-16 KiB.
MAX_DETAILS_BYTES = 4096

Around = Callable[[str, grpc.aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]


def _decode(des: Callable[[bytes], Any] | None, data: Any) -> Any:
    if des is None:
        return data
    try:
        return des(data)
    except Exception:  # a DecodeError, or whatever a generated parser raises on garbage
        raise InvalidArgument("request", "is not a well-formed message for this method") from None


async def _decoded(
    des: Callable[[bytes], Any] | None, stream: AsyncIterator[Any]
) -> AsyncIterator[Any]:
    async for data in stream:
        yield _decode(des, data)


def _encode(ser: Callable[[Any], bytes] | None, message: Any) -> Any:
    return message if ser is None else ser(message)


def _wrap(handler: Any, method: str, around: Around) -> Any:
    """The same handler, with `around` entered for the whole call (streams included). Requests
    are parsed and answers serialized inside it too: grpc's own parsing would answer a
    malformed request, before any token is checked, with UNKNOWN and the parser's exception
    text."""
    des, ser = handler.request_deserializer, handler.response_serializer

    def parsed(request: Any) -> Any:
        return _decoded(des, request) if handler.request_streaming else _decode(des, request)

    if handler.response_streaming:
        inner_stream = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with around(method, context):
                # A stream outlives the check at its start: it ends when the token expires,
                # whether or not there is anything more to send.
                expires_at = auth.principal().expires_at
                stream = aiter(inner_stream(parsed(request), context))
                try:
                    while True:
                        left = expires_at - time.time()
                        # In this task, so the servicer's context (its span) holds across items.
                        token_lifetime = asyncio.timeout(None if math.isinf(left) else left)
                        try:
                            async with token_lifetime:
                                item = await anext(stream)
                        except StopAsyncIteration:
                            return
                        except TimeoutError:
                            if token_lifetime.expired():
                                raise Unauthenticated("token expired") from None
                            raise  # the servicer's own: a fault, not the caller's
                        auth.principal().require_unexpired()
                        yield _encode(ser, item)
                finally:
                    await stream.aclose()

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming)
        return grpc.unary_stream_rpc_method_handler(streaming)

    inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with around(method, context):
            return _encode(ser, await inner(parsed(request), context))

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)


def _details(message: str) -> str:
    """A refusal's message as far as it fits the trailer (MAX_DETAILS_BYTES as sent): one that
    echoes a long input still reaches the caller, with its code and the field it names."""
    size = 0
    for at, char in enumerate(message):
        encoded = char.encode()
        # grpc-message keeps printable ASCII but '%' as it is, and percent-encodes each other byte.
        size += 1 if len(encoded) == 1 and " " <= char <= "~" and char != "%" else 3 * len(encoded)
        if size > MAX_DETAILS_BYTES - 9:  # room for the ellipsis
            return message[:at] + "…"
    return message


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Around every call but health and reflection, outermost first: a server span continuing
    the caller's trace from `traceparent` metadata, domain errors mapped to their status code
    (anything else is INTERNAL with no details), and the bearer token verified, making the
    caller known to the servicer. One interceptor rather than a chain, and each method's
    wrapped handler built once, keep the per-call work to what these three need."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None or method.startswith(PUBLIC_PREFIXES):
                return handler
            wrapped = self._handlers[method] = _wrap(handler, method, self.around)
        return wrapped

    @asynccontextmanager
    async def around(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        # Binary ("-bin") values carry nothing read here and need not be text.
        metadata = {
            key.lower(): value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        service, _, rpc = method.lstrip("/").partition("/")
        with _TRACER.start_as_current_span(
            method.lstrip("/"),
            context=context_from_headers(metadata),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
        ) as span:
            try:
                with self._caller(metadata, span):
                    yield
            except grpc.aio.AbortError:
                raise
            except DomainError as error:
                span.set_attribute("rpc.grpc.status_code", error.code.value[0])
                await context.abort(error.code, _details(error.message))
            except ConnectionFailure as error:
                # MongoDB out of reach (a failover, a restart): the caller may try again; every
                # write path is idempotent under retries.
                log.warning("%s: the database did not answer: %s", method, error)
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR))
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "the database did not answer; try again"
                )
            except Exception as error:
                trace_id = format(span.get_span_context().trace_id, "032x")
                log.exception("unhandled error in %s (trace %s)", method, trace_id)
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR))
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (trace {trace_id})")

    @contextmanager
    def _caller(self, metadata: dict[str, str], span: trace.Span) -> Iterator[None]:
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing bearer token in authorization metadata")
        caller = auth.verify_token(self._secret, token.strip())
        principal_token = auth.current_principal.set(caller)
        purpose_token = auth.current_purpose.set(unquote(metadata.get(PURPOSE_HEADER, ""))[:200])
        span.set_attributes({"enduser.id": caller.subject, "enduser.role": caller.role.value})
        try:
            yield
        finally:
            auth.current_purpose.reset(purpose_token)
            auth.current_principal.reset(principal_token)


class GrpcServer:
    """One service's server. `register` adds the servicers; `service_names` feeds reflection."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        auth_secret: str,
        service_names: Iterable[str],
        register: Callable[[grpc.aio.Server], None],
    ) -> None:
        self._address = f"{host}:{port}"
        self._service_names = tuple(service_names)
        self._health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[CallInterceptor(auth_secret)],
            options=[("grpc.so_reuseport", 0)],
        )
        register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        reflection.enable_server_reflection(
            (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self) -> int:
        try:
            self.port = self.server.add_insecure_port(self._address)
        except RuntimeError as error:  # what grpcio raises when the bind fails
            raise OSError(f"cannot listen on {self._address}: the port is in use") from error
        if self.port == 0:
            raise OSError(f"cannot listen on {self._address}")
        await self.server.start()
        for name in (*self._service_names, ""):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let calls in flight finish, then close."""
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace)

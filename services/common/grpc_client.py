"""Channels for calling Civic services: the bearer token, the caller's stated purpose and the
current trace context ride along as metadata on every call."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import grpc

from services.common.telemetry import current_trace_headers


class _Metadata:
    def __init__(self, token: str, purpose: str) -> None:
        self._fixed = [("authorization", f"Bearer {token}")]
        if purpose:
            # Metadata is ASCII; a purpose is often Vietnamese, so it travels percent-encoded.
            self._fixed.append(("x-civic-purpose", quote(purpose)))

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in [*self._fixed, *current_trace_headers().items()]:
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under one call kind only, so each kind gets its own class.
class _UnaryUnary(_Metadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Metadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_Metadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_Metadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def civic_channel(target: str, token: str, purpose: str = "") -> grpc.aio.Channel:
    kinds = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
    return grpc.aio.insecure_channel(target, interceptors=[kind(token, purpose) for kind in kinds])

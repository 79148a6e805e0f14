"""Channels for calling Civic services: the bearer token, the caller's stated purpose and the
current trace context ride along as metadata on every call."""

from __future__ import annotations

from typing import Any

from urllib.parse import quote

import grpc

from services.common.telemetry import current_trace_headers


class _Metadata(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    def __init__(self, token: str, purpose: str) -> None:
        self._fixed = [("authorization", f"Bearer {token}")]
        if purpose:
            # Metadata must be ASCII; the purpose is often Vietnamese, so it travels percent-encoded.
            self._fixed.append(("x-civic-purpose", quote(purpose)))

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in [*self._fixed, *current_trace_headers().items()]:
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def civic_channel(target: str, token: str, purpose: str = "") -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, interceptors=[_Metadata(token, purpose)])

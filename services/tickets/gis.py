"""Which unit a reported place lies in, asked of the GIS service through its gRPC API
(LocateUnit). The tickets service calls as a service, with a short-lived token. The map helps
routing and is never a condition of filing: a GIS that does not answer within LOCATE_TIMEOUT_S
leaves the ticket with the group it would have had without a place, and the outage is logged."""

from __future__ import annotations

import logging
import math
import time

import grpc
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2, gis_pb2_grpc

from services.common.auth import SERVICE_TOKEN_SECONDS, service_token
from services.common.telemetry import current_trace_headers

log = logging.getLogger(__name__)

# A resident waits on this while filing: a map that answers later than this is not waited for.
LOCATE_TIMEOUT_S = 0.4
# While GIS stays out of reach, the warning is repeated this often (with how many places went
# unlocated meanwhile), not once per ticket.
WARN_EVERY_S = 60.0
# A GIS back after an outage is tried again within this, not after gRPC's default two minutes.
MAX_RECONNECT_BACKOFF_MS = 5_000


class GisLocator:
    def __init__(self, target: str, auth_secret: str) -> None:
        self._target = target
        self._secret = auth_secret
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        )
        self._stub = gis_pb2_grpc.GisServiceStub(self._channel)
        self._tokens: dict[str, tuple[str, float]] = {}
        self._unanswered = 0
        self._warned_at = -math.inf

    def _token(self, city: str) -> str:
        token, until = self._tokens.get(city, ("", 0.0))
        now = time.time()
        if until - now < SERVICE_TOKEN_SECONDS / 2:
            token = service_token(self._secret, "tickets", city)
            self._tokens[city] = (token, now + SERVICE_TOKEN_SECONDS)
        return token

    async def unit_at(self, point: types_pb2.GeoPoint, city: str) -> str | None:
        """The most specific unit whose boundary holds the point ("" where none does), or None
        when GIS did not answer in time."""
        metadata = [
            ("authorization", f"Bearer {self._token(city)}"),
            *current_trace_headers().items(),
        ]
        try:
            response: gis_pb2.LocateUnitResponse = await self._stub.LocateUnit(
                gis_pb2.LocateUnitRequest(point=point),
                metadata=metadata,
                timeout=LOCATE_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            self._unanswered += 1
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                log.warning(
                    "GIS at %s did not locate a reported place (%s: %s); %d routed by household "
                    "or named group instead since the last warning",
                    self._target,
                    error.code().name,
                    error.details(),
                    self._unanswered,
                )
                self._warned_at, self._unanswered = now, 0
            return None
        if self._warned_at > -math.inf:
            log.info(
                "GIS at %s locates reported places again (%d more went unlocated)",
                self._target,
                self._unanswered,
            )
            self._warned_at, self._unanswered = -math.inf, 0
        return response.unit_id

    async def close(self) -> None:
        await self._channel.close()

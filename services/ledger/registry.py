"""What the ledger reads from the registry, through its gRPC API: the households of a unit with
the facts dues depend on. The ledger calls as a service, with a short-lived token scoped to the
unit it levies, and says why (the registry logs the read of heads' names). The registry reads
every page of one read as the register was at the first. Where those households move later
comes from the registry's events (`events.follow_moves`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import grpc
from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.auth import service_token
from services.common.errors import FailedPrecondition, Unavailable
from services.common.grpc_client import civic_channel
from services.common.mongo import Document
from services.common.registry_view import group_now
from services.ledger.domain import HouseholdFacts

PURPOSE = "lập danh sách thu quỹ (dues list)"
PAGE = 1000


class RegistryReader:
    def __init__(self, target: str, auth_secret: str) -> None:
        self._target = target
        self._secret = auth_secret

    async def households(self, unit_id: str, only: Sequence[str] = ()) -> list[HouseholdFacts]:
        """The unit's households, or `only` those of them."""
        token = service_token(self._secret, "ledger", unit_id)
        async with civic_channel(self._target, token, PURPOSE) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            with contextlib.suppress(_MomentLost):
                return await self._read(stub, unit_id, only)
            # The read took longer than the registry keeps the moment of its first page (about
            # 5 minutes): read again from the first page, once; one as slow again is refused.
            try:
                return await self._read(stub, unit_id, only)
            except _MomentLost as lost:
                raise FailedPrecondition(
                    f"the registry refused to list households: {lost}"
                ) from None

    async def unit_now(self, unit_id: str) -> str:
        """The unit itself, or, for a group merged away, the group it went into (following
        merges): whose officials keep its books now, and whose residents its households are."""
        now, _ = await group_now(unit_id, await self._unit(unit_id), self._unit)
        return now

    async def _unit(self, unit_id: str) -> Document | None:
        """The unit's record as `group_now` reads it; None for one the registry does not know."""
        token = service_token(self._secret, "ledger", unit_id)
        async with civic_channel(self._target, token) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            try:
                response = await stub.GetUnit(
                    registry_pb2.GetUnitRequest(unit_id=unit_id), timeout=10
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise Unavailable("the registry did not answer; try again") from None
        return {"active": response.unit.active, "merged_into_id": response.unit.merged_into_id}

    async def _read(
        self, stub: registry_pb2_grpc.RegistryServiceAsyncStub, unit_id: str, only: Sequence[str]
    ) -> list[HouseholdFacts]:
        """Every page of one read of the unit's households."""
        found: list[HouseholdFacts] = []
        page_token = ""
        while True:
            try:
                response = await stub.ListHouseholdSummaries(
                    registry_pb2.ListHouseholdSummariesRequest(
                        unit_id=unit_id,
                        page=types_pb2.PageRequest(page_size=PAGE, page_token=page_token),
                        household_ids=only,
                    ),
                    timeout=30,
                )
            except grpc.aio.AioRpcError as error:
                details = error.details() or ""
                if error.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise Unavailable("the registry did not answer; try again") from None
                if (
                    error.code() == grpc.StatusCode.FAILED_PRECONDITION
                    and page_token
                    and details.startswith("page.page_token: ")
                ):
                    raise _MomentLost(details) from None
                raise FailedPrecondition(
                    f"the registry refused to list households: {details}"
                ) from None
            found += [
                HouseholdFacts(
                    household_id=h.household_id,
                    unit_id=h.unit_id,
                    name=h.head_name,
                    residents=h.residents,
                    poor=h.poor,
                    war_invalid_member=h.war_invalid_member,
                )
                for h in response.households
            ]
            page_token = response.next_page_token
            if not page_token:
                return found


class _MomentLost(Exception):
    """The registry no longer keeps the register as it was at the read's first page."""

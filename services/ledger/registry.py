"""What the ledger reads from the registry. Through its gRPC API: the households of a unit with
the facts dues depend on. The ledger calls as a service, with a short-lived token scoped to the
unit it levies, and says why (the registry logs the read of heads' names). From its events on
civic.registry.v1: where the households it has learned have moved, so that a fund stops taking
a household that has left its unit."""

from __future__ import annotations

from typing import Any

import grpc
from civic.common.v1 import types_pb2
from civic.registry.v1 import events_pb2, registry_pb2, registry_pb2_grpc
from faststream.kafka import KafkaBroker
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from services.common.auth import Role, mint_token
from services.common.broker import Delivery, subscribe_once
from services.common.cloudevents import type_name
from services.common.errors import FailedPrecondition, Unavailable
from services.common.grpc_client import civic_channel
from services.common.mongo import Document, Session
from services.ledger.domain import HouseholdFacts
from services.ledger.store import LedgerStore, Move

PURPOSE = "lập danh sách thu quỹ (dues list)"
PAGE = 1000
TOKEN_SECONDS = 300
TOPIC = "civic.registry.v1"
# The registry's events that change where a household lives; the rest pass by unread.
MOVES = frozenset(type_name(m) for m in (events_pb2.HouseholdMoved(), events_pb2.GroupsMerged()))


def follow_moves(
    broker: KafkaBroker,
    client: AsyncMongoClient[Document],
    store: LedgerStore,
    *,
    group_id: str,
    instance_id: str,
) -> None:
    """Keeps the unit of each household the ledger has learned as the registry moves it."""

    async def apply(deliveries: list[Delivery], session: Session) -> list[Document]:
        moves: list[Move] = []
        for delivery in deliveries:
            with delivery.span():
                moves += _moves(delivery.message)
        await store.move_households(moves, session)
        return []

    subscribe_once(
        broker,
        client,
        store.db,
        topic=TOPIC,
        group_id=group_id,
        instance_id=instance_id,
        handle=apply,
        types=MOVES,
    )


def _moves(message: Message) -> list[Move]:
    """A merge moves each of the source group's households (the registry also publishes each
    one's HouseholdMoved, on its own partition: whichever arrives first moves it)."""
    m: Any = message
    match message:
        case events_pb2.HouseholdMoved():
            return [(m.household_id, m.from_unit_id, m.to_unit_id)]
        case events_pb2.GroupsMerged():
            return [(h, m.source_unit_id, m.target_unit_id) for h in m.household_ids]
    return []


class RegistryReader:
    def __init__(self, target: str, auth_secret: str) -> None:
        self._target = target
        self._secret = auth_secret

    async def households(self, unit_id: str) -> list[HouseholdFacts]:
        token = mint_token(
            self._secret,
            subject="service:ledger",
            role=Role.SERVICE,
            scope=unit_id,
            ttl_seconds=TOKEN_SECONDS,
        )
        found: list[HouseholdFacts] = []
        async with civic_channel(self._target, token, PURPOSE) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            page_token = ""
            while True:
                try:
                    response = await stub.ListHouseholdSummaries(
                        registry_pb2.ListHouseholdSummariesRequest(
                            unit_id=unit_id,
                            page=types_pb2.PageRequest(page_size=PAGE, page_token=page_token),
                        ),
                        timeout=30,
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise Unavailable("the registry did not answer; try again") from None
                    raise FailedPrecondition(
                        f"the registry refused to list households: {error.details()}"
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

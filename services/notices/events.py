"""The notices service's events, and its subscriber to civic.registry.v1: the service's own view
of units, households and residents, and the delivery records that follow households moving into
or out of a live notice's unit after it was published."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from civic.notices.v1 import events_pb2, notices_pb2
from faststream.kafka import KafkaBroker
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from services.common.auth import current_principal, unit_within
from services.common.broker import subscribe_once
from services.common.cloudevents import CloudEvent
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.common.registry_view import households_touched
from services.notices import domain
from services.notices.records import audience_of, delivery_document
from services.notices.store import NoticeStore

TOPIC = "civic.notices.v1"
REGISTRY_TOPIC = "civic.registry.v1"


def notice_event(outbox: Outbox, message: Message, notice_id: str) -> Document:
    """Keyed by notice, so a reader sees each notice's history in order. The actor is named when
    an official acted; a resident opening a notice stays a household id in the event."""
    event = outbox.event(message, key=notice_id, subject=notice_id)
    caller = current_principal.get(None)
    if caller is None or not caller.is_official:
        event["actor"] = ""
    return event


class Reconciler:
    """Keeps live notices' delivery records in step with households that change place or
    residents after publication: one moving into a notice's unit (and in its audience) gets the
    notice; one moving out, or left without residents, has its record marked withdrawn."""

    def __init__(self, store: NoticeStore, outbox: Outbox, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.outbox = outbox
        self.clock = clock

    async def households_changed(
        self, household_ids: list[str], session: Session
    ) -> list[Document]:
        now = self.clock()
        store = self.store
        households = {
            h["_id"]: h
            for h in await store.view.households.find(
                {"_id": {"$in": household_ids}}, session=session
            ).to_list()
        }
        current = await store.deliveries.find(
            {
                "household_id": {"$in": household_ids},
                "withdrawn_at": None,
                "$or": [{"expires_at": None}, {"expires_at": {"$gt": now}}],
            },
            {"notice_id": 1, "household_id": 1, "unit_id": 1, "read": 1, "acked": 1},
            session=session,
        ).to_list()
        held = {(d["notice_id"], d["household_id"]): d for d in current}
        places = {h["unit_id"] for h in households.values() if h.get("unit_id")}
        live = await store.live_over(places | {d["unit_id"] for d in current}, now, session)
        emitted: list[Document] = []
        for notice in live:
            for household_id in household_ids:
                household = households.get(household_id) or {}
                unit_id = household.get("unit_id", "")
                inside = (
                    bool(unit_id)
                    and unit_within(unit_id, notice["unit_id"])
                    and household.get("residents", 0) > 0
                )
                record = held.get((notice["_id"], household_id))
                if record is None and inside:
                    if await self._in_audience(notice, household, now, session):
                        emitted += await self._deliver(notice, household_id, unit_id, now, session)
                elif record is not None and inside and record["unit_id"] != unit_id:
                    # Moved between groups of the notice's unit: it counts in its new group.
                    await store.deliveries.update_one(
                        {"_id": record["_id"]}, {"$set": {"unit_id": unit_id}}, session=session
                    )
                    await store.count(
                        notice["_id"],
                        {record["unit_id"]: _counts(record, -1), unit_id: _counts(record, 1)},
                        session,
                    )
                elif record is not None and not inside:
                    emitted += await self._withdraw(notice, record, now, session)
        return emitted

    async def _in_audience(
        self, notice: Document, household: Document, now: datetime, session: Session
    ) -> bool:
        audience = audience_of(notice)
        if audience.residence_kinds and household.get("residence_kind") not in (
            audience.residence_kinds
        ):
            return False
        if not audience.filters_members:
            return True
        day = domain.local_day(now)
        return bool(await self.store.with_members([household["_id"]], audience, day, session))

    async def _deliver(
        self, notice: Document, household_id: str, unit_id: str, now: datetime, session: Session
    ) -> list[Document]:
        doc = delivery_document(notice, household_id, unit_id, now)
        # Marked late: the first delivery, if still running, leaves it out of its own events.
        doc["late"] = True
        created, _ = doc.pop("_id"), doc.pop("unit_id")
        # A household moving back in gets its old record back, as it was when withdrawn.
        record = await self.store.deliveries.find_one_and_update(
            {"_id": created},
            {"$setOnInsert": doc, "$set": {"unit_id": unit_id, "withdrawn_at": None}},
            upsert=True,
            session=session,
            return_document=True,
        )
        assert record is not None
        await self.store.count(notice["_id"], {unit_id: _counts(record, 1)}, session)
        await self.store.notices.update_one(
            {"_id": notice["_id"]}, {"$inc": {"fanout.delivered": 1}}, session=session
        )
        await self.store.announce(
            notices_pb2.NOTICE_CHANGE_DELIVERED, notice["_id"], [household_id], now, session
        )
        message = events_pb2.NoticeDelivered(
            notice_id=notice["_id"], household_ids=[household_id], late=True
        )
        return [notice_event(self.outbox, message, notice["_id"])]

    async def _withdraw(
        self, notice: Document, record: Document, now: datetime, session: Session
    ) -> list[Document]:
        household_id = record["household_id"]
        await self.store.deliveries.update_one(
            {"_id": record["_id"]},
            {"$set": {"withdrawn_at": now}, "$unset": {"resend_due": ""}},
            session=session,
        )
        await self.store.count(notice["_id"], {record["unit_id"]: _counts(record, -1)}, session)
        await self.store.notices.update_one(
            {"_id": notice["_id"]}, {"$inc": {"fanout.delivered": -1}}, session=session
        )
        await self.store.announce(
            notices_pb2.NOTICE_CHANGE_WITHDRAWN, notice["_id"], [household_id], now, session
        )
        message = events_pb2.NoticeWithdrawn(notice_id=notice["_id"], household_id=household_id)
        return [notice_event(self.outbox, message, notice["_id"])]


def _counts(record: Document, sign: int) -> Document:
    """What a delivery record adds to (or, leaving, takes from) its group's reach."""
    return {
        "delivered": sign,
        "opened": sign * int(record["read"]),
        "acknowledged": sign * int(record["acked"]),
    }


def subscribe(
    broker: KafkaBroker,
    client: AsyncMongoClient[Document],
    store: NoticeStore,
    reconciler: Reconciler,
    outbox: Outbox,
    *,
    registry_group: str,
    instance_id: str,
) -> None:
    async def on_registry_event(
        event: CloudEvent, message: Message, session: Session
    ) -> list[Document]:
        await store.view.apply(message, session)
        touched = [h for h in households_touched(message) if h]
        if not touched:
            return []
        return await reconciler.households_changed(touched, session)

    subscribe_once(
        broker,
        client,
        store.db,
        topic=REGISTRY_TOPIC,
        group_id=registry_group,
        instance_id=instance_id,
        handle=on_registry_event,
        outbox=outbox,
    )

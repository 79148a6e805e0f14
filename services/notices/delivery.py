"""Delivery: scheduled notices are published when their time comes, published ones are fanned
out to their households, unopened emergencies are sent again, and notices expire.

The first delivery of a notice writes its households' records in large unordered batches, each
outside any transaction; then one small transaction moves the notice's progress marker past the
batch and stages the batch's event. Record ids are "<notice>:<household>", so a batch written
again after a crash, by a second instance, or over a record a household moving in already has,
adds nothing: a restart continues from the marker and the batch's event is staged exactly once
(the marker moves only from where the batch began). Every instance runs a Deliverer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from civic.notices.v1 import events_pb2, notices_pb2
from pymongo import AsyncMongoClient

from services.common.mongo import Document, Session, in_transaction, in_unit
from services.common.outbox import Outbox
from services.common.runtime import BackgroundTask, fault
from services.common.wire import timestamp
from services.notices import domain
from services.notices.domain import Priority, State
from services.notices.events import notice_event
from services.notices.records import audience_message, audience_of, delivery_document
from services.notices.store import NoticeStore

log = logging.getLogger(__name__)

FANOUT_BATCH = 5_000
RESEND_BATCH = 2_000


def publication(notice: Document, now: datetime) -> tuple[Document, events_pb2.NoticePublished]:
    """What publishing changes in a notice, and its event; the first delivery is then due."""
    changes: Document = {
        "state": int(State.PUBLISHED),
        "published_at": now,
        "fanout_pending": True,
    }
    event = events_pb2.NoticePublished(
        notice_id=notice["_id"],
        unit_id=notice["unit_id"],
        priority=notice["priority"],
        publisher_unit_id=notice["publisher"]["unit_id"],
        publisher_role=notice["publisher"]["role"],
        audience=audience_message(notice),
        expires_at=timestamp(notice.get("expires_at")),
        requires_acknowledgement=notice["requires_ack"],
    )
    return changes, event


class Deliverer:
    def __init__(
        self,
        client: AsyncMongoClient[Document],
        store: NoticeStore,
        outbox: Outbox,
        clock: Callable[[], datetime],
        interval_seconds: float,
        batch_size: int = FANOUT_BATCH,
    ) -> None:
        self.client = client
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.interval_seconds = interval_seconds
        self.batch_size = batch_size
        self._working = BackgroundTask("notice-delivery", self._run)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something is due now (a notice was published): don't wait for the next sweep."""
        self._wake.set()

    def start(self) -> None:
        self._working.start()

    async def stop(self) -> None:
        await self._working.stop()

    async def _run(self) -> None:
        while True:
            busy = False
            try:
                busy = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("notice delivery failed; retrying")
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_seconds)
                self._wake.clear()

    async def run_once(self) -> bool:
        """One round: publish what is due, expire what is over, one batch of first delivery
        (emergencies first), one batch of re-sends. True when there may be more to do at once."""
        published = await self.publish_due()
        expired = await self.expire_due()
        fanned = await self.fan_out_batch()
        resent = await self.resend_due()
        return bool(published or expired or fanned or resent)

    async def _commit(self, work: Callable[[Session], Awaitable[list[Document]]]) -> None:
        """`work` in one transaction with the events it returns."""

        async def transaction(session: Session) -> None:
            await self.outbox.stage(session, await work(session))

        await in_transaction(self.client, transaction)
        self.outbox.committed()

    # ---- scheduled publication and expiry -------------------------------------------------------

    async def publish_due(self) -> int:
        now = self.clock()

        async def publish(notice: Document, session: Session) -> list[Document]:
            changes, event = publication(notice, now)
            await self.store.update(notice["_id"], {"$set": changes}, session)
            return [notice_event(self.outbox, event, notice["_id"])]

        return await self._each(await self.store.due_to_publish(now), State.SCHEDULED, publish)

    async def expire_due(self) -> int:
        now = self.clock()

        async def expire(notice: Document, session: Session) -> list[Document]:
            update = {"$set": {"state": int(State.EXPIRED)}, "$unset": {"fanout_pending": ""}}
            await self.store.update(notice["_id"], update, session)
            message = events_pb2.NoticeExpired(notice_id=notice["_id"])
            return [notice_event(self.outbox, message, notice["_id"])]

        return await self._each(await self.store.due_to_expire(now), State.PUBLISHED, expire)

    async def _each(
        self,
        due: list[Document],
        state: State,
        change: Callable[[Document, Session], Awaitable[list[Document]]],
    ) -> int:
        """`change` for each notice, in a transaction of its own, if it is still in `state`
        (it may have been retracted meanwhile, or changed by another instance)."""
        for candidate in due:

            async def work(session: Session, notice_id: str = candidate["_id"]) -> list[Document]:
                notice = await self.store.get(notice_id, session)
                if notice is None or notice["state"] != state:
                    return []
                return await change(notice, session)

            await self._commit(work)
        return len(due)

    # ---- the first delivery ---------------------------------------------------------------------

    async def fan_out_batch(self) -> bool:
        """Delivers the next batch of the most urgent notice still being delivered."""
        notice = await self.store.next_fanout()
        if notice is None:
            return False
        notice_id = notice["_id"]
        if notice["state"] != State.PUBLISHED:
            await self.store.notices.update_one(
                {"_id": notice_id}, {"$unset": {"fanout_pending": ""}}
            )
            return True
        now = self.clock()
        after = notice["fanout"]["after"]
        audience = audience_of(notice)
        batch = await self.store.households_after(
            notice["unit_id"], audience, after, self.batch_size
        )
        targets = batch
        if audience.filters_members and batch:
            day = domain.local_day(notice["published_at"])
            keep = await self.store.with_members([h["_id"] for h in batch], audience, day)
            targets = [h for h in batch if h["_id"] in keep]
        # Each record names the batch that wrote it (by where the batch starts). Until the
        # marker's transaction below moves past the batch, its records are pending: the registry
        # consumer, which may see them first, neither counts nor announces their leaving.
        batch_key = domain.batch_of(after)
        docs = [
            delivery_document(notice, h["_id"], h["unit_id"], now) | {"batch": batch_key}
            for h in targets
        ]
        delivered = [h["_id"] for h in targets]
        await self.store.insert_deliveries(docs)
        fault("CIVIC_FAULT_CRASH_MID_DELIVERY")  # records written, the marker not yet moved
        complete = len(batch) < self.batch_size
        last = {"unit": batch[-1]["unit_id"], "household": batch[-1]["_id"]} if batch else after

        async def work(session: Session) -> list[Document]:
            # The batch's records as they are now. Some may have been there before it: only an
            # interrupted run of this very batch wrote ones that are its to announce; the others
            # were announced already, by an earlier batch (their group merged into one later in
            # the order) or on their own (households that moved in: late). The registry consumer
            # keeps a pending record's group current, withdraws it (silently) when its household
            # leaves, and announces it itself, late, when the household comes back.
            records = {
                d["household_id"]: d
                for d in await self.store.deliveries.find(
                    {
                        "_id": {"$in": [domain.delivery_id(notice_id, h) for h in delivered]},
                        "withdrawn_at": None,
                        "$or": [
                            {"batch": batch_key},
                            # Written before records named their batch: all but late ones.
                            {"batch": {"$exists": False}, "late": {"$ne": True}},
                        ],
                    },
                    {"household_id": 1, "unit_id": 1},
                    session=session,
                ).to_list()
            }
            # A household that left the notice's unit, or was left without residents (or of
            # another kind), while the batch was written: withdrawn here, unannounced.
            still: Document = {
                "_id": {"$in": list(records)},
                "unit_id": in_unit(notice["unit_id"]),
                "residents": {"$gt": 0},
            }
            if audience.residence_kinds:
                still["residence_kind"] = {"$in": list(audience.residence_kinds)}
            staying = (
                set(await self.store.view.households.distinct("_id", still, session=session))
                if records
                else set()
            )
            announced = [h for h in delivered if h in records and h in staying]
            update: Document = {
                "$set": {"fanout.after": last},
                "$inc": {"fanout.delivered": len(announced)},
            }
            if complete:
                update["$set"]["fanout.complete"] = True
                update["$unset"] = {"fanout_pending": ""}
            moved = await self.store.notices.find_one_and_update(
                {"_id": notice_id, "fanout_pending": True, "fanout.after": after},
                update,
                session=session,
                return_document=True,
            )
            if moved is None:
                return []  # another instance delivered this batch
            if left := [h for h in records if h not in staying]:
                await self.store.deliveries.update_many(
                    {"_id": {"$in": [domain.delivery_id(notice_id, h) for h in left]}},
                    {"$set": {"withdrawn_at": now}, "$unset": {"resend_due": ""}},
                    session=session,
                )
            per_group: dict[str, Document] = {}
            for household_id in announced:
                group = records[household_id]["unit_id"]
                per_group.setdefault(group, {"delivered": 0})["delivered"] += 1
            await self.store.count(notice_id, per_group, session)
            events = []
            if announced:
                await self.store.announce(
                    notices_pb2.NOTICE_CHANGE_DELIVERED, notice_id, announced, now, session
                )
                message = events_pb2.NoticeDelivered(notice_id=notice_id, household_ids=announced)
                events.append(notice_event(self.outbox, message, notice_id))
            if complete:
                done = events_pb2.NoticeDeliveryCompleted(
                    notice_id=notice_id, households=moved["fanout"]["delivered"]
                )
                events.append(notice_event(self.outbox, done, notice_id))
            return events

        await self._commit(work)
        return True

    # ---- re-sending unopened emergencies --------------------------------------------------------

    async def resend_due(self) -> int:
        now = self.clock()
        due = await self.store.due_resends(now, RESEND_BATCH)
        by_notice: dict[str, list[str]] = {}
        for record in due:
            by_notice.setdefault(record["notice_id"], []).append(record["_id"])
        for notice_id, record_ids in by_notice.items():
            await self._commit(functools.partial(self._resend, notice_id, record_ids, now))
        return len(due)

    async def _resend(
        self, notice_id: str, record_ids: list[str], now: datetime, session: Session
    ) -> list[Document]:
        """Sends an emergency again to those of the households that have still not opened it."""
        deliveries = self.store.deliveries
        notice = await self.store.get(notice_id, session)
        live = (
            notice is not None
            and notice["priority"] == Priority.EMERGENCY
            and domain.state_at(State(notice["state"]), notice.get("expires_at"), now)
            is State.PUBLISHED
        )
        if not live:
            # Retracted or expired: nothing is sent again.
            await deliveries.update_many(
                {"_id": {"$in": record_ids}}, {"$unset": {"resend_due": ""}}, session=session
            )
            return []
        assert notice is not None
        due = await deliveries.find(
            {"_id": {"$in": record_ids}, "read": False, "resend_due": {"$lte": now}},
            {"household_id": 1, "resent": 1},
            session=session,
        ).to_list()
        last_time = [d["_id"] for d in due if d.get("resent", 0) + 1 >= domain.MAX_RESENDS]
        again = [d["_id"] for d in due if d.get("resent", 0) + 1 < domain.MAX_RESENDS]
        sent = {"$inc": {"resent": 1}, "$set": {"resent_at": now}}
        if again:
            next_due = now + timedelta(seconds=notice["resend_after_s"])
            await deliveries.update_many(
                {"_id": {"$in": again}},
                sent | {"$set": {"resent_at": now, "resend_due": next_due}},
                session=session,
            )
        if last_time:
            await deliveries.update_many(
                {"_id": {"$in": last_time}}, sent | {"$unset": {"resend_due": ""}}, session=session
            )
        households = [d["household_id"] for d in due]
        if not households:
            return []
        await self.store.announce(
            notices_pb2.NOTICE_CHANGE_RESENT, notice_id, households, now, session
        )
        message = events_pb2.NoticeResent(notice_id=notice_id, household_ids=households)
        return [notice_event(self.outbox, message, notice_id)]

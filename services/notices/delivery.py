"""Delivery: scheduled notices are published when their time comes, published ones are fanned
out to their households, unopened emergencies are sent again, and notices expire.

The first delivery of a notice writes its households' records in large unordered batches, each
outside any transaction and marked pending; then one transaction counts and announces the
batch's pending records as they are then, clearing their mark, stages the batch's event and
moves the notice's progress marker past the batch. Residents see a record only once it is
announced. Record ids are "<notice>:<household>", so a batch written again after a crash, by a
second instance, or over a record a household moving in already has, adds nothing; a restart
continues from the marker, and a record is announced once, by the transaction that clears its
mark. A notice retracted or expired meanwhile has its pending records withdrawn unannounced and
its delivery ended, however far the batch had got. Every instance runs a Deliverer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta

from civic.notices.v1 import events_pb2, notices_pb2
from pymongo import AsyncMongoClient

from services.common.mongo import Document, Session, in_transaction
from services.common.outbox import Outbox
from services.common.runtime import BackgroundTask, fault, woken_or_after
from services.common.wire import timestamp
from services.notices import domain
from services.notices.domain import Priority, State
from services.notices.events import Reconciler, notice_event
from services.notices.records import (
    audience_message,
    audience_of,
    delivery_document,
    next_resend,
)
from services.notices.store import MergedAway, NoticeStore

log = logging.getLogger(__name__)

FANOUT_BATCH = 5_000
START = {"unit": "", "household": ""}  # the first delivery's marker before its first batch
RESEND_BATCH = 2_000


def publication(
    notice: Document, merged: MergedAway, now: datetime
) -> tuple[Document, events_pb2.NoticePublished]:
    """What publishing changes in a notice, and its event; the first delivery is then due. The
    event names where households of groups merged away from the notice's unit are reached."""
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
        merged_into_unit_ids=merged.into,
    )
    return changes, event


class Deliverer:
    def __init__(
        self,
        client: AsyncMongoClient[Document],
        store: NoticeStore,
        outbox: Outbox,
        clock: Callable[[], datetime],
        reconciler: Reconciler,
        interval_seconds: float,
        batch_size: int = FANOUT_BATCH,
    ) -> None:
        self.client = client
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.reconciler = reconciler
        self.interval_seconds = interval_seconds
        self.batch_size = batch_size
        # Known here, so a round asks MongoDB only once the local day has changed.
        self._birthdays_swept: date | None = None
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
                await woken_or_after(self._wake, self.interval_seconds)

    async def run_once(self) -> bool:
        """One round: publish what is due, expire what is over, one batch of first delivery
        (emergencies first), one batch of re-sends, once a day the birthdays and guests' stays
        that began or ended.
        True when there may be more to do at once."""
        published = await self.publish_due()
        expired = await self.expire_due()
        fanned = await self.fan_out_batch()
        resent = await self.resend_due()
        try:
            await self.birthdays_due()
        except Exception:
            # Tried again next round; deliveries go on meanwhile.
            log.exception("the birthday sweep failed; retrying")
        return bool(published or expired or fanned or resent)

    async def _commit(self, work: Callable[[Session], Awaitable[list[Document]]]) -> None:
        """`work` in one transaction with the events it returns."""

        async def transaction(session: Session) -> None:
            await self.outbox.stage(session, await work(session))

        await in_transaction(self.client, transaction)
        self.outbox.committed()

    # ---- birthdays ------------------------------------------------------------------------------

    async def birthdays_due(self) -> int:
        """Once a local day: the households where, since the last sweep, a birthday took someone
        into or out of a live notice's age range, or a guest's stay began or ended (they live
        there from then, or no longer, and may be the house's only resident or the member a
        notice asks for), are reconciled, as a registry event touching them would have them (no
        such event comes). Returns how many were looked at."""
        now = self.clock()
        today = domain.local_day(now)
        if self._birthdays_swept is not None and today <= self._birthdays_swept:
            return 0
        swept = await self.store.birthdays_swept()
        if swept is None:
            await self.store.begin_birthdays(today)
            swept = today
        if swept >= today:
            self._birthdays_swept = swept
            return 0
        audiences = await self.store.live_age_audiences(now)
        households = await self.store.households_the_days_changed(
            domain.birthdays_between(audiences, after=swept, on=today), swept, today
        )

        async def sweep(session: Session) -> list[Document]:
            if not await self.store.claim_birthdays(swept, today, session):
                return []  # another instance swept them
            outcomes = (
                await self.reconciler.households_changed(households, session) if households else {}
            )
            return [
                notice_event(self.outbox, message, notice_id)
                for changes in outcomes.values()
                for message, notice_id in changes
            ]

        await self._commit(sweep)
        self._birthdays_swept = today
        return len(households)

    # ---- scheduled publication and expiry -------------------------------------------------------

    async def publish_due(self) -> int:
        now = self.clock()

        async def publish(notice: Document, session: Session) -> list[Document]:
            if domain.state_at(State.SCHEDULED, notice["expires_at"], now) is State.EXPIRED:
                # Its time up passed before it could go out (the service was down then): it
                # expires unseen, not announced as published to anyone acting on that.
                return await self._expire(notice, session)
            merged = await self.store.merged_away(notice["unit_id"], session)
            changes, event = publication(notice, merged, now)
            await self.store.update(notice["_id"], {"$set": changes}, session)
            return [notice_event(self.outbox, event, notice["_id"])]

        return await self._each(await self.store.due_to_publish(now), State.SCHEDULED, publish)

    async def expire_due(self) -> int:
        due = await self.store.due_to_expire(self.clock())
        return await self._each(due, State.PUBLISHED, self._expire)

    async def _expire(self, notice: Document, session: Session) -> list[Document]:
        # A first delivery still running is ended by the deliverer (`_settle`).
        await self.store.update(notice["_id"], {"$set": {"state": int(State.EXPIRED)}}, session)
        message = events_pb2.NoticeExpired(notice_id=notice["_id"])
        return [notice_event(self.outbox, message, notice["_id"])]

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
        """Delivers the next batch of the most urgent notice still being delivered; once that
        notice is retracted or expired, ends its delivery instead."""
        notice = await self.store.next_fanout()
        if notice is None:
            return False
        now = self.clock()
        last: Document | None = None  # to the end of the notice's households
        if _live(notice, now):
            batch = await self._write_batch(notice, now)
            if len(batch) == self.batch_size:
                last = {"unit": batch[-1]["unit_id"], "household": batch[-1]["_id"]}
        after = notice["fanout"]["after"]
        await self._commit(functools.partial(self._settle, notice["_id"], after, last, now))
        return True

    async def _write_batch(self, notice: Document, now: datetime) -> list[Document]:
        """The pending records of the next households after the notice's marker; returns those
        households (the ones its member filter leaves out too, as they count for the order)."""
        audience = audience_of(notice)
        # A group merged away still has the notice's households (they did not move house): the
        # notice follows them into the group they are in now, but not to that group's own, whom
        # its publisher neither addressed nor, a group leader, could have.
        merged = await self.store.merged_away(notice["unit_id"])
        batch = await self.store.households_after(
            notice["unit_id"], merged, audience, notice["fanout"]["after"], self.batch_size
        )
        targets = batch
        if batch:
            # Ages and who lives there on the day this batch delivers, which a first delivery
            # running past midnight (or resumed after a crash) is not the day of publication:
            # that day's sweep of birthdays and ended stays found no record here to reconcile.
            day = domain.local_day(now)
            keep = await self.store.reached_on([h["_id"] for h in batch], audience, day)
            targets = [h for h in batch if h["_id"] in keep]
        await self.store.insert_deliveries(
            [delivery_document(notice, h["_id"], h["unit_id"], now, pending=True) for h in targets]
        )
        fault("CIVIC_FAULT_CRASH_MID_DELIVERY")  # records written, the marker not yet moved
        return batch

    async def _settle(
        self,
        notice_id: str,
        after: Document,
        last: Document | None,
        now: datetime,
        session: Session,
    ) -> list[Document]:
        """The batch's transaction: counts and announces the notice's pending records from the
        marker `after` up to `last` (None: to the end) as they are now, and moves the marker.

        They are this batch's, an interrupted run's, and those the registry consumer wrote for
        households arriving ahead of the marker; the consumer also keeps their groups current
        and withdraws them when their households leave. Both write the records they decide on
        (and the consumer, ahead of the marker, the notice), so when they meet one transaction
        retries and sees what the other did. Once the notice is no longer live, the pending
        records are withdrawn unannounced instead and the delivery ends, whichever run of the
        batch gets here first."""
        notice = await self.store.get(notice_id, session)
        assert notice is not None
        live = _live(notice, now)
        marker_here = notice.get("fanout_pending") and notice["fanout"]["after"] == after
        # The last batch, or the end of a notice no longer live, takes every pending record of
        # the notice: one an instance that fell behind wrote behind the marker and then died
        # with would otherwise stay pending, unseen, for ever.
        ending = not live or (marker_here and last is None)
        records = await self.store.pending_between(
            notice_id, START if ending else after, last if live else None, session
        )
        staying = await self._staying(notice, records, now, session) if live else set()
        announced = [r for r in records if r["household_id"] in staying]
        per_group: dict[str, Document] = {}
        for record in announced:
            per_group.setdefault(record["unit_id"], {"delivered": 0})["delivered"] += 1
        await self.store.count(notice_id, per_group, session)
        households = [r["household_id"] for r in announced]
        if households:
            await self.store.announce(
                notices_pb2.NOTICE_CHANGE_DELIVERED, notice_id, households, now, session
            )
        update: Document = {"$inc": {"fanout.delivered": len(announced)}}
        if live and marker_here:
            update["$set"] = {"fanout.after": last} if last else {"fanout.complete": True}
        if not live or (marker_here and last is None):
            update["$unset"] = {"fanout_pending": ""}
        updated = await self.store.update(notice_id, update, session)
        await self._mark(notice, records, announced, now, session)
        events = []
        if households:
            message = events_pb2.NoticeDelivered(notice_id=notice_id, household_ids=households)
            events.append(notice_event(self.outbox, message, notice_id))
        if live and marker_here and last is None:
            done = events_pb2.NoticeDeliveryCompleted(
                notice_id=notice_id, households=updated["fanout"]["delivered"]
            )
            events.append(notice_event(self.outbox, done, notice_id))
        return events

    async def _staying(
        self, notice: Document, records: list[Document], now: datetime, session: Session
    ) -> set[str]:
        """Those of the records' households the notice still reaches (of its residence kinds,
        with someone living there it asks for): one that left, or whose member the notice asks
        for left or died, while its record was written is not announced. The registry's change
        found no record to withdraw then."""
        if not records:
            return set()
        audience = audience_of(notice)
        merged = await self.store.merged_away(notice["unit_id"], session)
        still: Document = {
            "_id": {"$in": [r["household_id"] for r in records]},
            "residents": {"$gt": 0},
        } | merged.households(notice["unit_id"])
        if audience.residence_kinds:
            still["residence_kind"] = {"$in": list(audience.residence_kinds)}
        placed = await self.store.view.households.distinct("_id", still, session=session)
        if not placed:
            return set()
        return await self.store.reached_on(placed, audience, domain.local_day(now), session)

    async def _mark(
        self,
        notice: Document,
        records: list[Document],
        announced: list[Document],
        now: datetime,
        session: Session,
    ) -> None:
        """Announced records are delivered now (an emergency is sent again from now); the others
        are withdrawn, never having been seen."""
        deliveries = self.store.deliveries
        delivered = {r["_id"] for r in announced}
        if delivered:
            await deliveries.update_many(
                {"_id": {"$in": list(delivered)}},
                {
                    "$set": {"delivered_at": now} | next_resend(notice, now),
                    "$unset": {"pending": ""},
                },
                session=session,
            )
        if left := [r["_id"] for r in records if r["_id"] not in delivered]:
            await deliveries.update_many(
                {"_id": {"$in": left}},
                {"$set": {"withdrawn_at": now}, "$unset": {"pending": "", "resend_due": ""}},
                session=session,
            )

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
        if notice is None or notice["priority"] != Priority.EMERGENCY or not _live(notice, now):
            # Retracted or expired: nothing is sent again.
            await deliveries.update_many(
                {"_id": {"$in": record_ids}}, {"$unset": {"resend_due": ""}}, session=session
            )
            return []
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


def _live(notice: Document, now: datetime) -> bool:
    """Published and not expired: still delivered."""
    state = domain.state_at(State(notice["state"]), notice.get("expires_at"), now)
    return state is State.PUBLISHED

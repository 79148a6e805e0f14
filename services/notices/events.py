"""The notices service's events, and its subscriber to civic.registry.v1: the service's own view
of units, households and residents, and the delivery records that follow households moving into
or out of a live notice's unit after it was published."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from civic.notices.v1 import events_pb2, notices_pb2
from google.protobuf.message import Message
from pymongo import AsyncMongoClient, UpdateOne

from services.common.auth import current_principal, unit_within
from services.common.consumer import Delivery, TopicConsumer
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.common.registry_view import households_touched
from services.notices import domain
from services.notices.records import audience_of, delivery_document, next_resend
from services.notices.store import NoticeStore, still_merged

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
    """Keeps live notices' delivery records in step with households that change place, kind or
    residents after publication: one moving into a notice's unit, or coming to match its
    audience there, gets the notice; one moving out, left without residents, or no longer
    matching its audience (its residence kind changed; the member it asks for died, moved out
    or was marked absent) has its record marked withdrawn, and gets it back as it was if it
    comes to match again. A household is looked at again when a registry event touches it,
    with ages as of that day, and on the day a birthday alone takes one of its residents into
    or out of a live notice's age range, or a guest's stay is over (the Deliverer's birthday
    sweep).

    While a notice's first delivery runs, a household it has yet to reach (after its marker) is
    left to it: one arriving there gets a pending record its batch announces, not a late
    delivery, and a pending record stays pending while its household moves about there. Only
    records the first delivery has passed, or announced, are delivered, moved and withdrawn
    here with counts and events; a pending record whose household leaves is withdrawn
    silently, and one whose household moves where the delivery has passed is delivered late.

    A fetch of registry events is reconciled at once, in a few round trips whatever its size
    (beside the view's writes, a single read when no notice is live), from where its events
    leave each household: the same records, counts and events as reconciling after each event
    in turn. The one difference, a household passing through a notice's unit within one batch
    is neither delivered nor withdrawn, is seen by no one: the batch commits as one
    transaction."""

    def __init__(self, store: NoticeStore, outbox: Outbox, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.outbox = outbox
        self.clock = clock

    async def reconcile(self, deliveries: list[Delivery], session: Session) -> list[Document]:
        """The registry-view consumer's `BatchHandler`."""
        view = self.store.view
        await view.write(
            [change for delivery in deliveries for change in view.changes(delivery.message)],
            session,
        )
        # Each household once, under the batch's last event that touched it.
        last_touch: dict[str, int] = {}
        for index, delivery in enumerate(deliveries):
            for household_id in households_touched(delivery.message):
                if household_id:
                    last_touch[household_id] = index
        outcomes = await self.households_changed(list(last_touch), session) if last_touch else {}
        emitted: list[Document] = []
        by_event: dict[int, list[str]] = {}
        for household_id, index in last_touch.items():
            by_event.setdefault(index, []).append(household_id)
        for index, delivery in enumerate(deliveries):
            # Every event gets its span; what a household's change emits continues the trace of
            # the event that last touched it.
            with delivery.span():
                for household_id in by_event.get(index, ()):
                    for message, notice_id in outcomes.get(household_id, ()):
                        emitted.append(notice_event(self.outbox, message, notice_id))
        return emitted

    async def households_changed(
        self, household_ids: list[str], session: Session
    ) -> dict[str, list[tuple[Message, str]]]:
        """Brings the households' records for live notices in step with the view; returns the
        events each household's changes call for, with their notice."""
        now = self.clock()
        store = self.store
        live_units = await store.live_units(now, session)
        if not live_units:
            return {}
        households = {
            h["_id"]: h
            for h in await store.view.households.find(
                {"_id": {"$in": household_ids}},
                {
                    "unit_id": 1,
                    "residence_kind": 1,
                    "merged_from": 1,
                },
                session=session,
            ).to_list()
        }
        came_from = {g for h in households.values() for g in h.get("merged_from", ())}
        current = await store.deliveries.find(
            {
                "household_id": {"$in": household_ids},
                "withdrawn_at": None,
                "$or": [{"expires_at": None}, {"expires_at": {"$gt": now}}],
            },
            {
                "notice_id": 1,
                "household_id": 1,
                "unit_id": 1,
                "read": 1,
                "acked": 1,
                "resent": 1,
                "pending": 1,
            },
            session=session,
        ).to_list()
        places = {h["unit_id"] for h in households.values() if h.get("unit_id")}
        places |= came_from
        places |= {d["unit_id"] for d in current}
        if not current and not any(
            scope in live_units for unit in places for scope in domain.ancestors(unit)
        ):
            return {}
        # Someone lives there: not only guests whose stay has ended.
        inhabited = await store.inhabited(household_ids, domain.local_day(now), session)
        # Where the groups merged away went, to tell whose households the marked ones still are.
        chains = await store.merge_chains(came_from, session) if came_from else {}
        # The notices of the records too: one to a group merged away is not over the group
        # its households are in now.
        live = await store.live_over(places, now, session, {d["notice_id"] for d in current})
        held = {(d["notice_id"], d["household_id"]): d for d in current}
        changes = _Changes()
        arrivals: list[tuple[Document, str, str]] = []
        for notice in live:
            arriving: list[tuple[str, str]] = []
            staying: list[tuple[Document, str]] = []
            for household_id in household_ids:
                household = households.get(household_id) or {}
                unit_id = household.get("unit_id", "")
                fits = (
                    bool(unit_id)
                    and household_id in inhabited
                    and _reached(notice, household, chains)
                    and _kind_fits(notice, household)
                )
                record = held.get((notice["_id"], household_id))
                if record is None:
                    if fits:
                        arriving.append((household_id, unit_id))
                elif fits:
                    staying.append((record, unit_id))
                else:
                    # Moved out, left without residents, or no longer of its residence kinds.
                    changes.withdrawn(notice, record, now)
            # The members are looked at once for both: whoever holds the notice must still have
            # the member it asks for (who may have died, left or been marked absent).
            holding = [(record["household_id"], unit_id) for record, unit_id in staying]
            matched = set(await self._in_audience(notice, arriving + holding, now, session))
            for record, unit_id in staying:
                if (record["household_id"], unit_id) not in matched:
                    changes.withdrawn(notice, record, now)
                elif record["unit_id"] != unit_id:
                    # Moved between groups the notice reaches: it counts in its new group.
                    changes.moved(notice, record, unit_id, now)
            arrivals += [(notice, h, unit_id) for h, unit_id in arriving if (h, unit_id) in matched]
        await self._deliver(arrivals, changes, now, session)
        await changes.write(store, now, session)
        return changes.events

    async def _in_audience(
        self, notice: Document, arriving: list[tuple[str, str]], now: datetime, session: Session
    ) -> list[tuple[str, str]]:
        """Those of the households (in its unit, of its residence kinds) with a member the
        notice asks for as of today; every one when it asks for none."""
        audience = audience_of(notice)
        if not arriving or not audience.filters_members:
            return arriving
        day = domain.local_day(now)
        ids = [household_id for household_id, _ in arriving]
        members = await self.store.with_members(ids, audience, day, session)
        return [
            (household_id, unit_id) for household_id, unit_id in arriving if household_id in members
        ]

    async def _deliver(
        self,
        arrivals: list[tuple[Document, str, str]],
        changes: _Changes,
        now: datetime,
        session: Session,
    ) -> None:
        """New records: pending ones where the first delivery has yet to come, late ones
        elsewhere; a household moving back in gets its old one back, as it was when withdrawn
        (read or acknowledged, it counts so again)."""
        if not arrivals:
            return
        ids = [domain.delivery_id(notice["_id"], h) for notice, h, _ in arrivals]
        earlier = {
            d["_id"]: d
            for d in await self.store.deliveries.find(
                {"_id": {"$in": ids}}, {"read": 1, "acked": 1, "resent": 1}, session=session
            ).to_list()
        }
        for notice, household_id, unit_id in arrivals:
            record = earlier.get(domain.delivery_id(notice["_id"], household_id))
            if record is None and _ahead(notice, unit_id, household_id):
                changes.ahead(notice, household_id, unit_id, now)
            else:
                changes.delivered(notice, household_id, unit_id, record, now)


def _pending(record: Document) -> bool:
    """Written by the first delivery, which has not yet counted and announced it."""
    return record.get("pending") is True


def _ahead(notice: Document, unit_id: str, household_id: str) -> bool:
    """Where the notice's first delivery, still running, has yet to come: after its marker in
    its (group, household) order."""
    after = notice["fanout"]["after"]
    return bool(notice.get("fanout_pending")) and (unit_id, household_id) > (
        after["unit"],
        after["household"],
    )


def _reached(notice: Document, household: Document, chains: dict[str, tuple[str, ...]]) -> bool:
    """Whether the household is where the notice reaches: in its unit, or still among the
    households of a group of it merged away (`still_merged`, as `MergedAway.households` finds
    them)."""
    places = (household["unit_id"], *still_merged(household, chains))
    return any(unit_within(unit, notice["unit_id"]) for unit in places)


def _kind_fits(notice: Document, household: Document) -> bool:
    kinds = audience_of(notice).residence_kinds
    return not kinds or household.get("residence_kind") in kinds


class _Changes:
    """A batch's reconciling, gathered for a few bulk writes, and the events each household's
    changes emit."""

    def __init__(self) -> None:
        self.records: list[UpdateOne] = []
        self.counts: dict[tuple[str, str], dict[str, int]] = {}
        self.fanout: dict[str, int] = {}
        # Notices whose first delivery has records ahead of its marker changed here: what was
        # done hangs on where the marker is, so the notice is written too ($inc fanout.touched)
        # and a batch moving the marker meanwhile conflicts with this transaction.
        self.touched: set[str] = set()
        self.announced: dict[tuple[int, str], list[str]] = {}
        self.events: dict[str, list[tuple[Message, str]]] = {}

    def delivered(
        self,
        notice: Document,
        household_id: str,
        unit_id: str,
        record: Document | None,
        now: datetime,
    ) -> None:
        """Delivered here, late: a new record, or the household's earlier one (withdrawn when it
        left, or pending where the first delivery has passed) as it is, read or acknowledged.
        Unopened, an emergency is sent again from now."""
        notice_id = notice["_id"]
        if record is None:
            doc = delivery_document(notice, household_id, unit_id, now) | {"late": True}
            write = UpdateOne({"_id": doc.pop("_id")}, {"$setOnInsert": doc}, upsert=True)
        else:
            again = {"unit_id": unit_id, "withdrawn_at": None, "late": True}
            if not record["read"] and record.get("resent", 0) < domain.MAX_RESENDS:
                again |= next_resend(notice, now)
            write = UpdateOne({"_id": record["_id"]}, {"$set": again, "$unset": {"pending": ""}})
        self.records.append(write)
        self._count(notice_id, unit_id, record or {"read": False, "acked": False}, 1)
        self.fanout[notice_id] = self.fanout.get(notice_id, 0) + 1
        self._announce(notices_pb2.NOTICE_CHANGE_DELIVERED, notice_id, household_id)
        message = events_pb2.NoticeDelivered(
            notice_id=notice_id, household_ids=[household_id], late=True
        )
        self.events.setdefault(household_id, []).append((message, notice_id))

    def ahead(self, notice: Document, household_id: str, unit_id: str, now: datetime) -> None:
        """Arrived where the first delivery has yet to come: a pending record, counted and
        announced by the batch that reaches its place (one already past reading households
        finds it so, too)."""
        doc = delivery_document(notice, household_id, unit_id, now, pending=True)
        self.records.append(UpdateOne({"_id": doc.pop("_id")}, {"$setOnInsert": doc}, upsert=True))
        self.touched.add(notice["_id"])

    def moved(self, notice: Document, record: Document, unit_id: str, now: datetime) -> None:
        """Moved between groups of the notice's unit: it counts in its new group."""
        if _pending(record) and not _ahead(notice, unit_id, record["household_id"]):
            # Where the first delivery has passed, which would never announce it.
            self.delivered(notice, record["household_id"], unit_id, record, now)
            return
        self.records.append(UpdateOne({"_id": record["_id"]}, {"$set": {"unit_id": unit_id}}))
        if _pending(record):
            # Still the first delivery's: its batch counts it where it is then.
            self.touched.add(notice["_id"])
        else:
            self._count(notice["_id"], record["unit_id"], record, -1)
            self._count(notice["_id"], unit_id, record, 1)

    def withdrawn(self, notice: Document, record: Document, now: datetime) -> None:
        notice_id, household_id = notice["_id"], record["household_id"]
        self.records.append(
            UpdateOne(
                {"_id": record["_id"]},
                {"$set": {"withdrawn_at": now}, "$unset": {"resend_due": "", "pending": ""}},
            )
        )
        if _pending(record):  # never counted, announced nor opened: withdrawn silently
            return
        self._count(notice_id, record["unit_id"], record, -1)
        self.fanout[notice_id] = self.fanout.get(notice_id, 0) - 1
        self._announce(notices_pb2.NOTICE_CHANGE_WITHDRAWN, notice_id, household_id)
        message = events_pb2.NoticeWithdrawn(notice_id=notice_id, household_id=household_id)
        self.events.setdefault(household_id, []).append((message, notice_id))

    def _count(self, notice_id: str, unit_id: str, record: Document, sign: int) -> None:
        """What a delivery record adds to (or, leaving, takes from) its group's reach."""
        counts = self.counts.setdefault((notice_id, unit_id), {})
        for name, by in (
            ("delivered", 1),
            ("opened", int(record["read"])),
            ("acknowledged", int(record["acked"])),
        ):
            counts[name] = counts.get(name, 0) + sign * by

    def _fanout_change(self, notice_id: str) -> dict[str, int]:
        """What the batch adds to the notice's delivered households, and its touch."""
        inc = {
            "fanout.delivered": self.fanout.get(notice_id, 0),
            "fanout.touched": int(notice_id in self.touched),
        }
        return {name: by for name, by in inc.items() if by}

    def _announce(self, change: int, notice_id: str, household_id: str) -> None:
        self.announced.setdefault((change, notice_id), []).append(household_id)

    async def write(self, store: NoticeStore, now: datetime, session: Session) -> None:
        if self.records:
            await store.deliveries.bulk_write(self.records, ordered=False, session=session)
        await store.count_many(self.counts, session)
        changed = {n: self._fanout_change(n) for n in sorted(self.fanout.keys() | self.touched)}
        notices = [UpdateOne({"_id": n}, {"$inc": inc}) for n, inc in changed.items() if inc]
        if notices:
            await store.notices.bulk_write(notices, ordered=False, session=session)
        await store.announce_all(
            [(change, notice_id, hs) for (change, notice_id), hs in self.announced.items()],
            now,
            session,
        )


def registry_consumer(
    client: AsyncMongoClient[Document],
    store: NoticeStore,
    reconciler: Reconciler,
    outbox: Outbox,
    *,
    registry_group: str,
    instance_id: str,
) -> TopicConsumer:
    return TopicConsumer(
        client,
        store.db,
        topic=REGISTRY_TOPIC,
        group_id=registry_group,
        instance_id=instance_id,
        handle=reconciler.reconcile,
        outbox=outbox,
    )

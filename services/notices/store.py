"""Notices, their delivery records, the change feed residents' apps watch, and the service's own
view of the registry, in MongoDB."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.common.auth import unit_within
from services.common.commands import ensure_command_indexes
from services.common.errors import InvalidArgument
from services.common.mongo import UNIT_ID, Document, Session, in_any_unit, in_unit
from services.common.outbox import ensure_outbox_indexes
from services.common.registry_view import RESIDENT, RegistryView, living
from services.notices import domain
from services.notices.domain import State
from services.notices.records import audience_of

DUPLICATE_KEY = 11000
BIRTHDAYS = "birthdays"
FEED_KEPT = timedelta(days=1)
# The resident's listing: unread first, then newest first.
LISTING_ORDER = [("read", ASCENDING), ("at", DESCENDING), ("_id", DESCENDING)]
# Records residents see, open and are counted by: not pending, i.e. not written by a batch of
# the first delivery that has yet to count and announce them.
SETTLED: Document = {"pending": {"$ne": True}}
NOTICE_ID = re.compile(r"nt-[0-9a-f]{24}")


def new_notice_id() -> str:
    return f"nt-{ObjectId()}"


@dataclass(frozen=True)
class MergedAway:
    """Groups of a notice's unit that were merged into groups outside it: for each, its merge
    chain (`merge_chain`), ending in the group its households are in now."""

    chains: tuple[tuple[str, ...], ...] = ()

    @property
    def into(self) -> tuple[str, ...]:
        """The groups their households are in now."""
        return tuple(sorted({chain[-1] for chain in self.chains}))

    def households(self, unit_id: str) -> Document:
        """The households a notice to `unit_id` reaches: those in it, and those that were in
        one of its groups merged away, where they are now."""
        inside = {"unit_id": in_unit(unit_id)}
        return {"$or": [inside, *self._came()]} if self.chains else inside

    def came(self) -> Document:
        """Households that were in one of the groups and are still where its households went:
        in a group of its chain (`still_merged`). None when there are no groups (a group the
        delivery got to may since have been merged back into the notice's unit), which MongoDB
        will not take as an empty `$or`."""
        return {"$or": self._came()} if self.chains else {"_id": {"$in": []}}

    def _came(self) -> list[Document]:
        return [{"merged_from": chain[0], "unit_id": {"$in": list(chain)}} for chain in self.chains]


def merge_chain(merged: dict[str, str], group: str) -> tuple[str, ...]:
    """The group, then the groups it was merged into in turn (`merged`: a group, the group it
    was merged into), the last the one its households are in now."""
    chain = [group]
    while (target := merged.get(chain[-1])) is not None and target not in chain:
        chain.append(target)
    return tuple(chain)


def still_merged(household: Document, chains: dict[str, tuple[str, ...]]) -> list[str]:
    """The groups merged away the household was in (`merged_from`) whose households it is
    still among: it is in a group of the group's merge chain (`chains`), not moved house out
    of it since. Judged by where the household is, not by which merge's event came last, so
    merges applied in any order (a later one's GroupsMerged before an earlier one's) agree."""
    unit_id = household.get("unit_id")
    return [g for g in household.get("merged_from", ()) if unit_id in chains.get(g, (g,))]


def live(now: datetime) -> Document:
    """Notices published and not expired at `now` (no expiry: live until retracted)."""
    return {
        "state": int(State.PUBLISHED),
        "$or": [{"expires_at": None}, {"expires_at": {"$gt": now}}],
    }


class NoticeStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.db = db
        self.notices = db["notices"]
        # One record per notice and household, _id "<notice>:<household>".
        self.deliveries = db["deliveries"]
        # What residents' apps are told, one entry per change (a batch of households at a time).
        self.feed = db["feed"]
        # Delivered, opened and acknowledged households per notice and group, _id
        # "<notice>:<group>", counted in the transaction of each change they count.
        self.reach_counts = db["reach"]
        # Units, households and residents, projected from civic.registry.v1.
        self.view = RegistryView(db, people=True)
        # The last local day whose birthdays were reconciled with live notices' age ranges.
        self.sweeps = db["sweeps"]

    async def attachments_named(self, keys: list[str]) -> set[str]:
        """Those of the keys a notice's attachment, in any revision, is kept at."""
        wanted = set(keys)
        found = self.notices.find(
            {"revisions.attachments.key": {"$in": keys}}, {"revisions.attachments.key": 1}
        )
        return {
            a["key"]
            async for notice in found
            for revision in notice["revisions"]
            for a in revision.get("attachments", [])
            if a["key"] in wanted
        }

    async def ensure_indexes(self) -> None:
        await self.notices.create_indexes(
            [
                IndexModel([("unit_id", ASCENDING), ("_id", DESCENDING)]),
                IndexModel([("state", ASCENDING), ("unit_id", ASCENDING)]),
                IndexModel([("state", ASCENDING), ("publish_at", ASCENDING)]),
                IndexModel([("state", ASCENDING), ("expires_at", ASCENDING)]),
                IndexModel(
                    [("fanout_pending", ASCENDING), ("priority", DESCENDING), ("_id", ASCENDING)],
                    sparse=True,
                ),
                # The hourly upload sweep asks which notice keeps an attachment.
                IndexModel([("revisions.attachments.key", ASCENDING)], sparse=True),
            ]
        )
        # Kept few: every index costs time on each of a city-wide notice's 300,000 inserts.
        await self.deliveries.create_indexes(
            [
                IndexModel([("household_id", ASCENDING), *LISTING_ORDER]),
                IndexModel(
                    [
                        ("notice_id", ASCENDING),
                        ("read", ASCENDING),
                        ("unit_id", ASCENDING),
                        ("household_id", ASCENDING),
                    ]
                ),
                IndexModel([("resend_due", ASCENDING)], sparse=True),
            ]
        )
        await self.feed.create_index("at", expireAfterSeconds=int(FEED_KEPT.total_seconds()))
        await self.reach_counts.create_index([("notice_id", ASCENDING), ("unit_id", ASCENDING)])
        await self.view.ensure_indexes()
        await ensure_outbox_indexes(self.db)
        await ensure_command_indexes(self.db)
        await self._interrupted_batches_pending()

    async def _interrupted_batches_pending(self) -> None:
        """Before pending marks, a batch's records named the batch by its key, which stayed once
        they were announced. Those of a batch interrupted then (its notice's marker is still
        where it starts) are marked pending, so the batch, run again, announces them."""
        async for notice in self.notices.find({"fanout_pending": True}, {"fanout": 1}):
            await self.deliveries.update_many(
                {
                    "notice_id": notice["_id"],
                    "batch": domain.batch_of(notice["fanout"]["after"]),
                    "withdrawn_at": None,
                    "late": {"$ne": True},
                    "pending": {"$exists": False},
                },
                {"$set": {"pending": True}},
            )

    # ---- notices -----------------------------------------------------------------------------

    async def get(self, notice_id: str, session: Session | None = None) -> Document | None:
        return await self.notices.find_one({"_id": notice_id}, session=session)

    async def update(self, notice_id: str, update: Document, session: Session) -> Document:
        updated = await self.notices.find_one_and_update(
            {"_id": notice_id}, update, session=session, return_document=True
        )
        assert updated is not None
        return updated

    async def in_unit(
        self, unit_id: str, token: str, size: int, merged_in: list[str], from_above: bool = False
    ) -> tuple[list[Document], str]:
        """Notices targeted at the unit or below it, or at one of the groups `merged_in` to it or
        a unit it was in (a ward, in a merge across wards) that does not hold the unit anyway:
        its households keep those, and are the unit's now; `from_above`, also at the units
        above it. Newest first (the token is the last one's id)."""
        query: Document = {"unit_id": in_any_unit([unit_id, *merged_in])}
        above = {
            ancestor
            for group in merged_in
            for ancestor in domain.ancestors(group)[:-1]
            if not unit_within(unit_id, ancestor)
        }
        if from_above:
            above.update(domain.ancestors(unit_id)[:-1])
        if above:
            query = {"$or": [query, {"unit_id": {"$in": sorted(above)}}]}
        if token:
            if not NOTICE_ID.fullmatch(token):
                raise InvalidArgument("page.page_token", "is not a token this service issued")
            query["_id"] = {"$lt": token}
        items = await self.notices.find(query).sort("_id", DESCENDING).limit(size).to_list()
        return items, str(items[-1]["_id"]) if len(items) == size else ""

    async def live_over(
        self,
        unit_ids: set[str],
        now: datetime,
        session: Session | None = None,
        notice_ids: set[str] | None = None,
    ) -> list[Document]:
        """Published, unexpired notices whose unit contains any of `unit_ids`, or among
        `notice_ids`."""
        scopes = {scope for unit_id in unit_ids for scope in domain.ancestors(unit_id)}
        which: list[Document] = [{"unit_id": {"$in": sorted(scopes)}}] if scopes else []
        if notice_ids:
            which.append({"_id": {"$in": sorted(notice_ids)}})
        if not which:
            return []
        return await self.notices.find(
            {"$and": [live(now), {"$or": which}]}, session=session
        ).to_list()

    async def live_units(self, now: datetime, session: Session | None = None) -> set[str]:
        """The units of published, unexpired notices."""
        return set(await self.notices.distinct("unit_id", live(now), session=session))

    async def due_to_publish(self, now: datetime, limit: int = 100) -> list[Document]:
        query = {"state": int(State.SCHEDULED), "publish_at": {"$lte": now}}
        return await self.notices.find(query).sort("publish_at").limit(limit).to_list()

    async def due_to_expire(self, now: datetime, limit: int = 100) -> list[Document]:
        query = {"state": int(State.PUBLISHED), "expires_at": {"$lte": now}}
        return await self.notices.find(query).sort("expires_at").limit(limit).to_list()

    async def next_fanout(self) -> Document | None:
        """The notice to deliver next: emergencies before anything else, then oldest first."""
        return await self.notices.find_one(
            {"fanout_pending": True}, sort=[("priority", DESCENDING), ("_id", ASCENDING)]
        )

    # ---- the audience, from the registry view --------------------------------------------------

    async def merged_away(self, unit_id: str, session: Session | None = None) -> MergedAway:
        """The groups of the unit merged, in turn, into groups outside it (few: merges are
        rare), and where their households are now."""
        merged = await self._merges_on(
            {
                u["_id"]: u["merged_into_id"]
                async for u in self.view.units.find(
                    {"_id": in_unit(unit_id), "merged_into_id": {"$gt": ""}},
                    {"merged_into_id": 1},
                    session=session,
                )
            },
            session,
        )
        chains = [merge_chain(merged, source) for source in sorted(merged)]
        return MergedAway(
            tuple(
                chain
                for chain in chains
                if unit_within(chain[0], unit_id) and not unit_within(chain[-1], unit_id)
            )
        )

    async def merged_in(self, unit_id: str) -> list[str]:
        """The groups outside the unit merged, in turn, into groups of it: their households are
        its residents now."""
        merged: dict[str, str] = {}
        # Back from the unit's groups, through every group merged into one of them...
        query: Document = {"merged_into_id": in_unit(unit_id)}
        while found := {
            u["_id"]: u["merged_into_id"]
            async for u in self.view.units.find(query, {"merged_into_id": 1})
            if u["_id"] not in merged
        }:
            merged |= found
            query = {"merged_into_id": {"$in": sorted(found)}}
        # ...and on from where they went, which may itself have been merged away since.
        merged = await self._merges_on(merged)
        return sorted(
            source
            for source in merged
            if not unit_within(source, unit_id)
            and unit_within(merge_chain(merged, source)[-1], unit_id)
        )

    async def merge_chains(
        self, groups: set[str], session: Session | None = None
    ) -> dict[str, tuple[str, ...]]:
        """Each group's merge chain (`merge_chain`): just the group if it was not merged."""
        merged = await self._merges_on({}, session, groups)
        return {group: merge_chain(merged, group) for group in groups}

    async def _merges_on(
        self, merged: dict[str, str], session: Session | None = None, groups: Iterable[str] = ()
    ) -> dict[str, str]:
        """`merged` (a group: the group it was merged into) with the merges of the groups it
        names, and of `groups`, in turn, to the groups that were not merged away."""
        targets = (set(merged.values()) | set(groups)) - merged.keys()
        while targets:
            further = {
                u["_id"]: u["merged_into_id"]
                async for u in self.view.units.find(
                    {"_id": {"$in": sorted(targets)}, "merged_into_id": {"$gt": ""}},
                    {"merged_into_id": 1},
                    session=session,
                )
            }
            merged = merged | further
            targets = set(further.values()) - merged.keys()
        return merged

    async def households_after(
        self,
        unit_id: str,
        merged: MergedAway,
        audience: domain.Audience,
        after: Document,
        limit: int,
    ) -> list[Document]:
        """The next households the notice reaches with residents, in (group, id) order after
        `after` ({"unit", "household"}), as the (unit_id, _id) index has them; the member filter
        is applied by the caller (`with_members`)."""
        wanted: Document = {"residents": {"$gt": 0}}
        if audience.residence_kinds:
            wanted["residence_kind"] = {"$in": list(audience.residence_kinds)}
        order = [("unit_id", ASCENDING), ("_id", ASCENDING)]
        found: list[Document] = []
        if after["unit"]:
            # The rest of the group the last batch ended in.
            rest = wanted | {"unit_id": after["unit"], "_id": {"$gt": after["household"]}}
            if not unit_within(after["unit"], unit_id):  # one merged groups went into
                rest |= merged.came()
            found = await self._households(rest, order, limit)
        if len(found) < limit:
            following = wanted | merged.households(unit_id)
            if after["unit"]:
                following = {"$and": [following, {"unit_id": {"$gt": after["unit"]}}]}
            found += await self._households(following, order, limit - len(found))
        return found

    async def _households(self, query: Document, order: list[Any], limit: int) -> list[Document]:
        found = self.view.households.find(query, {"unit_id": 1}).sort(order).limit(limit)
        return await found.to_list()

    async def inhabited(
        self, household_ids: list[str], day: date, session: Session | None = None
    ) -> set[str]:
        """Those of the households someone lives in on `day`: one whose only residents are
        guests whose stay has ended is nobody's home now, however many the register still
        names."""
        query = {"household_id": {"$in": household_ids}, **living(day.isoformat())}
        return set(await self.view.persons.distinct("household_id", query, session=session))

    async def reached_on(
        self,
        household_ids: list[str],
        audience: domain.Audience,
        day: date,
        session: Session | None = None,
    ) -> set[str]:
        """Those of the households a notice to the audience reaches on `day` by who lives there:
        with a present resident matching its member bounds, or, when it sets none, with anyone
        living there."""
        if audience.filters_members:
            return await self.with_members(household_ids, audience, day, session)
        return await self.inhabited(household_ids, day, session)

    async def with_members(
        self,
        household_ids: list[str],
        audience: domain.Audience,
        day: date,
        session: Session | None = None,
    ) -> set[str]:
        """Those of the households with a present resident matching the audience's bounds."""
        query: Document = {
            "household_id": {"$in": household_ids},
            **living(day.isoformat()),
            "absent": {"$ne": True},
        }
        born_by, born_after = domain.birth_date_bounds(audience, day)
        born: Document = {}
        if born_by:
            born["$lte"] = born_by
        if born_after:
            born["$gt"] = born_after
        if born:
            query["birth_date"] = born
        if audience.sex:
            query["sex"] = audience.sex
        found = await self.view.persons.distinct("household_id", query, session=session)
        return set(found)

    # ---- birthdays -----------------------------------------------------------------------------

    async def birthdays_swept(self) -> date | None:
        """The last day whose birthdays (and stays ended) were reconciled; None before the first
        sweep."""
        doc = await self.sweeps.find_one({"_id": BIRTHDAYS})
        return date.fromisoformat(doc["day"]) if doc else None

    async def begin_birthdays(self, today: date) -> None:
        """The first sweep: earlier birthdays were seen by each notice's own delivery."""
        with contextlib.suppress(DuplicateKeyError):  # another instance began them first
            await self.sweeps.update_one(
                {"_id": BIRTHDAYS}, {"$setOnInsert": {"day": today.isoformat()}}, upsert=True
            )

    async def claim_birthdays(self, swept: date, today: date, session: Session) -> bool:
        """Moves the sweep on from `swept` to `today`; False when another instance has."""
        result = await self.sweeps.update_one(
            {"_id": BIRTHDAYS, "day": swept.isoformat()},
            {"$set": {"day": today.isoformat()}},
            session=session,
        )
        return result.modified_count == 1

    async def live_age_audiences(self, now: datetime) -> list[domain.Audience]:
        """The audiences of published, unexpired notices that have an age bound."""
        found = self.notices.find(
            {
                "$and": [
                    live(now),
                    {
                        "$or": [
                            {"audience.min_age": {"$gt": 0}},
                            {"audience.under_age": {"$gt": 0}},
                            {"audience.max_age": {"$gt": 0}},  # stored before "under_age"
                        ]
                    },
                ]
            },
            {"audience": 1},
        )
        return [audience_of(notice) async for notice in found]

    async def households_the_days_changed(
        self, born: list[tuple[str, str]], swept: date, today: date
    ) -> list[str]:
        """Households the passing days alone changed since the day `swept`, up to `today`: with a
        resident born in one of the (after, up to] ranges, a guest whose stay's last day was
        from `swept` up to the day before `today` (living there then, no longer today), or one
        whose stay's first day came after `swept`, up to `today` (living there from then)."""
        ended: Document = {"stay_end": {"$gte": swept.isoformat(), "$lt": today.isoformat()}}
        began: Document = {"stay_start": {"$gt": swept.isoformat(), "$lte": today.isoformat()}}
        births = [{"birth_date": {"$gt": after, "$lte": upto}} for after, upto in born]
        query = {"status": RESIDENT, "$or": [ended, began, *births]}
        return sorted(await self.view.persons.distinct("household_id", query))

    # ---- deliveries ---------------------------------------------------------------------------

    async def insert_deliveries(self, docs: list[Document]) -> int:
        """Unordered and idempotent: records already there (from an earlier, interrupted run or a
        household that moved in meanwhile) are left as they are. Returns how many were new."""
        if not docs:
            return 0
        try:
            result = await self.deliveries.insert_many(docs, ordered=False)
            return len(result.inserted_ids)
        except BulkWriteError as error:
            errors = error.details.get("writeErrors", [])
            if any(e.get("code") != DUPLICATE_KEY for e in errors):
                raise
            return int(error.details.get("nInserted", 0))

    async def pending_between(
        self, notice_id: str, after: Document, last: Document | None, session: Session
    ) -> list[Document]:
        """The notice's pending records of households after the marker `after` up to `last`
        (to the end: None), in the first delivery's (group, household) order."""
        query = {"notice_id": notice_id, "pending": True, "withdrawn_at": None}
        return await self.deliveries.find(
            query | _between(after, last), {"household_id": 1, "unit_id": 1}, session=session
        ).to_list()

    async def delivery(
        self, notice_id: str, household_id: str, session: Session | None = None
    ) -> Document | None:
        return await self.deliveries.find_one(
            {"_id": domain.delivery_id(notice_id, household_id)}, session=session
        )

    async def update_delivery(
        self, delivery_id: str, update: Document, session: Session
    ) -> Document:
        updated = await self.deliveries.find_one_and_update(
            {"_id": delivery_id}, update, session=session, return_document=True
        )
        assert updated is not None
        return updated

    async def of_household(
        self, household_id: str, now: datetime, include_expired: bool, token: str, size: int
    ) -> tuple[list[Document], str]:
        """A household's deliveries, unread first, then newest first (keyset paging over that
        order: the token is the last item's read flag, time and id)."""
        query: Document = {"household_id": household_id, "withdrawn_at": None} | SETTLED
        if not include_expired:
            query["$or"] = [{"expires_at": None}, {"expires_at": {"$gt": now}}]
        if token:
            query = {"$and": [query, _after_in_listing(token)]}
        items = await self.deliveries.find(query).sort(LISTING_ORDER).limit(size).to_list()
        return items, _listing_token(items[-1]) if len(items) == size else ""

    async def count(self, notice_id: str, changes: dict[str, Document], session: Session) -> None:
        """Adds to the reach counters of each group: {group: {"delivered": 1, ...}}."""
        await self.count_many(
            {(notice_id, unit_id): by for unit_id, by in changes.items()}, session
        )

    async def count_many(self, changes: dict[tuple[str, str], Document], session: Session) -> None:
        """The same for groups of several notices: {(notice, group): {"delivered": 1, ...}}."""
        writes = [
            UpdateOne(
                {"_id": f"{notice_id}:{unit_id}"},
                {"$inc": by, "$setOnInsert": {"notice_id": notice_id, "unit_id": unit_id}},
                upsert=True,
            )
            for (notice_id, unit_id), by in changes.items()
            if any(by.values())
        ]
        if writes:
            await self.reach_counts.bulk_write(writes, ordered=False, session=session)

    async def reach(self, notice_id: str, unit_ids: list[str] | None) -> list[Document]:
        """Delivered, opened and acknowledged households per group (of `unit_ids`; None: every
        group the notice reached, those its merged-away groups went into too)."""
        query = {"notice_id": notice_id} | _in_area(unit_ids)
        return await self.reach_counts.find(query).sort("unit_id", ASCENDING).to_list()

    async def not_reached(
        self, notice_id: str, unit_ids: list[str] | None, token: str, size: int
    ) -> tuple[list[Document], str]:
        """Households that have not opened the notice, by group then household (the index's
        order), of `unit_ids` as in `reach`; the token is the last one's place in that order, as
        it was listed: one that has moved group since does not take the next page past the
        households between its old and new place."""
        query: Document = (
            {"notice_id": notice_id, "read": False, "withdrawn_at": None}
            | _in_area(unit_ids)
            | SETTLED
        )
        if token:
            unit_id, household_id = _place_in_list(token)
            query["$or"] = [
                {"unit_id": {"$gt": unit_id}},
                {"unit_id": unit_id, "household_id": {"$gt": household_id}},
            ]
        items = (
            await self.deliveries.find(query)
            .sort([("unit_id", ASCENDING), ("household_id", ASCENDING)])
            .limit(size)
            .to_list()
        )
        last = items[-1] if len(items) == size else None
        return items, f"{last['unit_id']}|{last['household_id']}" if last else ""

    async def due_resends(self, now: datetime, limit: int) -> list[Document]:
        return (
            await self.deliveries.find(
                {"resend_due": {"$lte": now}} | SETTLED, {"notice_id": 1, "household_id": 1}
            )
            .sort("resend_due", ASCENDING)
            .limit(limit)
            .to_list()
        )

    # ---- the feed -----------------------------------------------------------------------------

    async def announce(
        self,
        change: int,
        notice_id: str,
        household_ids: list[str] | None,
        now: datetime,
        session: Session,
    ) -> None:
        """Tell watching apps; `household_ids` None means every household of the notice."""
        await self.announce_all([(change, notice_id, household_ids)], now, session)

    async def announce_all(
        self, changes: list[tuple[int, str, list[str] | None]], now: datetime, session: Session
    ) -> None:
        """Several changes at once: (change, notice, households) each."""
        if changes:
            await self.feed.insert_many(
                [
                    {
                        "_id": ObjectId(),
                        "change": change,
                        "notice_id": notice_id,
                        "households": household_ids,
                        "at": now,
                    }
                    for change, notice_id, household_ids in changes
                ],
                session=session,
            )


def _in_area(unit_ids: list[str] | None) -> Document:
    return {} if unit_ids is None else {"unit_id": in_any_unit(unit_ids)}


def _between(after: Document, last: Document | None) -> Document:
    """Records of households after `after` up to `last` ({"unit", "household"}; None: to the
    end) in (group, household) order: the range of a batch of the first delivery."""
    unit, household = after["unit"], after["household"]
    if last is not None and last["unit"] == unit:
        return {"unit_id": unit, "household_id": {"$gt": household, "$lte": last["household"]}}
    ranges: list[Document] = [{"unit_id": unit, "household_id": {"$gt": household}}]
    if last is None:
        ranges.append({"unit_id": {"$gt": unit}})
    else:
        ranges.append({"unit_id": {"$gt": unit, "$lt": last["unit"]}})
        ranges.append({"unit_id": last["unit"], "household_id": {"$lte": last["household"]}})
    return {"$or": ranges}


def _place_in_list(token: str) -> tuple[str, str]:
    """The (group, household) a `not_reached` token names."""
    unit_id, _, household_id = token.partition("|")
    if not (UNIT_ID.fullmatch(unit_id) and household_id and "|" not in household_id):
        raise InvalidArgument("page.page_token", "is not a token this service issued")
    return unit_id, household_id


def _listing_token(doc: Document) -> str:
    return f"{int(doc['read'])}|{doc['at'].isoformat()}|{doc['_id']}"


def _after_in_listing(token: str) -> Document:
    """Items after the token's in the order unread first, newest first, id descending."""
    try:
        read_flag, at_text, last_id = token.split("|", 2)
        if read_flag not in ("0", "1"):
            raise ValueError(read_flag)
        read = read_flag == "1"
        # Its time as this listing wrote it, in UTC; any other must still be a time MongoDB
        # keeps (a year-1 time east of UTC is not).
        at = datetime.fromisoformat(at_text)
        if at.tzinfo is None:
            raise ValueError(at_text)
        at = at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument("page.page_token", "is not a token this listing gave") from None
    later: list[Document] = [
        {"read": read, "at": at, "_id": {"$lt": last_id}},
        {"read": read, "at": {"$lt": at}},
    ]
    if not read:
        later.append({"read": True})
    return {"$or": later}

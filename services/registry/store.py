"""The register in MongoDB. Every write takes the session of the command's transaction."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import quote, unquote

from bson import ObjectId
from civic.registry.v1 import registry_pb2
from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from services.common.batching import Coalescer
from services.common.commands import ensure_command_indexes
from services.common.errors import FailedPrecondition
from services.common.mongo import Document, Session, ensure_indexes, holding_text, in_unit, once
from services.common.outbox import ensure_outbox_indexes
from services.common.paging import UnitListing, next_token, unit_ordered_page
from services.registry.domain import fold

RESIDENT = 1  # PersonStatus.RESIDENT
TEMPORARY = registry_pb2.RESIDENCE_KIND_TEMPORARY
RESIDENTS = "_residents"  # where a read puts a household's residents
SUSPECT_HOUSEHOLD = "_suspect_household"  # where a read puts a person's household, if suspect
BOOK_NUMBER_INDEX = "household_book_number"
OLD_BOOK_NUMBER_INDEX = "unit_id_1_external_ref_1"  # unique per current group, before merges
REFOLDED_ETH = "name_folded_eth"
REFOLDED_APOSTROPHES = "name_folded_apostrophes"
# Searches by name within a unit; and an import finding whom a file brought in before.
PERSON_NAME_INDEX = [("unit_id", ASCENDING), ("name_folded", ASCENDING)]


def stay_ended(today: str) -> Document:
    """Those whose temporary stay's last day is before `today` (ISO): on the register still,
    suspects for the leader to act on, but no longer living here."""
    return {"stay_end": {"$lt": today, "$gt": ""}}


def living_here(today: str) -> Document:
    """Residents who live here on `today`, as the census counts them and searches find them:
    everyone registered as resident but a guest whose stay has ended (a "virtual resident") or
    is yet to begin (registered ahead of arriving)."""
    return {
        "status": RESIDENT,
        "stay_end": {"$not": stay_ended(today)["stay_end"]},
        "stay_start": {"$not": {"$gt": today}},
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{ObjectId()}"


class RegistryStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.db = db
        self.units = db["units"]
        self.households = db["households"]
        self.persons = db["persons"]
        self.access_log = db["access_log"]
        self.history = db["household_history"]
        # Lookups and access-log entries from concurrent requests share round trips.
        self._household_reads = Coalescer(self._households_with_members)
        self._access_writes = Coalescer(self._write_access_entries)

    async def ensure_indexes(self) -> None:
        await self.units.create_index([("parent_id", ASCENDING), ("name", ASCENDING)])
        await self._book_numbers_by_issuing_group()
        await ensure_indexes(
            self.households,
            [
                IndexModel([("unit_id", ASCENDING), ("_id", ASCENDING)]),
                # A household book number is unique in the group that issued it, which a
                # merge does not change: two merged groups may each have had a "HK-1".
                IndexModel(
                    [("ref_unit_id", ASCENDING), ("external_ref", ASCENDING)],
                    unique=True,
                    partialFilterExpression=holding_text("external_ref"),
                    name=BOOK_NUMBER_INDEX,
                ),
                IndexModel([("unit_id", ASCENDING), ("last_verified_at", ASCENDING)]),
            ],
        )
        await ensure_indexes(
            self.persons,
            [
                IndexModel(
                    "cid_hash",
                    unique=True,
                    partialFilterExpression=holding_text("cid_hash"),
                ),
                IndexModel([("household_id", ASCENDING), ("status", ASCENDING)]),
                IndexModel(
                    [("unit_id", ASCENDING), ("status", ASCENDING), ("birth_date", ASCENDING)]
                ),
                IndexModel(PERSON_NAME_INDEX),
                IndexModel([("unit_id", ASCENDING), ("_id", ASCENDING)]),
            ],
        )
        await self.access_log.create_index([("household_id", ASCENDING), ("_id", DESCENDING)])
        # A person's reads follow them to the household they live in now.
        await self.access_log.create_index([("persons.person_id", ASCENDING), ("_id", DESCENDING)])
        await self.history.create_index(
            [("household_id", ASCENDING), ("occurred_at", ASCENDING), ("event_id", ASCENDING)]
        )
        await ensure_outbox_indexes(self.db)
        await ensure_command_indexes(self.db)
        await once(self.db, REFOLDED_ETH, lambda: self._refold("ð"))
        await once(self.db, REFOLDED_APOSTROPHES, lambda: self._refold("[’ʼ]"))

    async def _book_numbers_by_issuing_group(self) -> None:
        """Households written before book numbers were kept per issuing group were unique per
        current group: that group issued them, unless merged since, which the old index made
        impossible for a clashing number anyway. Done once: while the old index is there (a
        start of every instance need not read every household)."""
        if OLD_BOOK_NUMBER_INDEX not in await self.households.index_information():
            return
        await self.households.update_many(
            {"external_ref": {"$type": "string"}, "ref_unit_id": {"$exists": False}},
            [{"$set": {"ref_unit_id": "$unit_id"}}],
        )
        with contextlib.suppress(OperationFailure):  # dropped by an instance starting with us
            await self.households.drop_index(OLD_BOOK_NUMBER_INDEX)

    async def _refold(self, pattern: str) -> None:
        """Names folded before `fold` took a look-alike for the letter or sign it stands for
        (ð, often typed for đ, for d; a curly apostrophe for the straight one) kept it where
        `pattern` finds it: folded again, with the import keys made of them, so that a search
        finds them and a file imported before still matches them."""
        async for person in self.persons.find(
            {"name_folded": {"$regex": pattern}},
            {"full_name": 1, "name_folded": 1, "import_key": 1},
        ):
            old, new = person["name_folded"], fold(person["full_name"])
            fields = {"name_folded": new}
            # unit|book number|folded name|birth date: the book number is the file's own text.
            start, named, end = person.get("import_key", "").rpartition(f"|{old}|")
            if named:
                fields["import_key"] = f"{start}|{new}|{end}"
            await self.persons.update_one({"_id": person["_id"]}, {"$set": fields})

    # ---- units ---------------------------------------------------------------------------

    async def unit(self, unit_id: str, session: Session | None = None) -> Document | None:
        return await self.units.find_one({"_id": unit_id}, session=session)

    async def insert_unit(self, unit: Document, session: Session) -> None:
        await self.units.insert_one(unit, session=session)

    async def set_unit_fields(self, unit_id: str, fields: Document, session: Session) -> Document:
        updated = await self.units.find_one_and_update(
            {"_id": unit_id},
            {"$set": fields},
            session=session,
            return_document=True,
        )
        assert updated is not None
        return updated

    async def child_units(self, unit_id: str, include_inactive: bool) -> list[Document]:
        query: Document = {"parent_id": unit_id}
        if not include_inactive:
            query["active"] = True
        return await self.units.find(query).sort("name", ASCENDING).to_list()

    async def claim_group(self, unit_id: str, session: Session) -> None:
        """Writes the group's own document in the session's transaction, so that a merge of the
        group committing meanwhile conflicts with it: a household is never added to a group
        that a concurrent merge retires (the merge moves only the households it can see)."""
        claimed = await self.units.update_one(
            {"_id": unit_id, "active": True}, {"$inc": {"household_writes": 1}}, session=session
        )
        if not claimed.matched_count:
            await self.require_active_group(unit_id, session)

    async def require_active_group(self, unit_id: str, session: Session) -> None:
        """The group, as the session's transaction sees it, has not been retired by a merge. Only
        a read, so that concurrent import batches into one group do not conflict with each other
        (each conflict re-runs a whole batch); unlike `claim_group`, it misses a merge that
        commits while the batch's own transaction runs."""
        unit = await self.unit(unit_id, session)
        if unit is None or not unit.get("active", True):
            merged_into = unit.get("merged_into_id") if unit else None
            raise FailedPrecondition(f"group {unit_id} was merged into {merged_into}")

    async def move_group(self, source: str, target: str, session: Session) -> list[str]:
        ids = [
            doc["_id"]
            async for doc in self.households.find({"unit_id": source}, {"_id": 1}, session=session)
        ]
        await self.households.update_many(
            {"unit_id": source},
            # Not activity: a merge is the city's act, not a sign that anyone lives there.
            {"$set": {"unit_id": target}},
            session=session,
        )
        await self.persons.update_many(
            {"unit_id": source}, {"$set": {"unit_id": target}}, session=session
        )
        return ids

    # ---- households and persons ----------------------------------------------------------

    async def household(self, household_id: str, session: Session | None = None) -> Document | None:
        return await self.households.find_one({"_id": household_id}, session=session)

    async def household_by_book_number(
        self, ref_unit_id: str, external_ref: str, session: Session
    ) -> Document | None:
        """The household `ref_unit_id` issued this book number to, wherever it is now."""
        return await self.households.find_one(
            {"ref_unit_id": ref_unit_id, "external_ref": external_ref}, session=session
        )

    async def insert_household(self, household: Document, session: Session) -> None:
        await self.households.insert_one(household, session=session)

    async def update_household(
        self, household_id: str, fields: Document, session: Session
    ) -> Document:
        updated = await self.households.find_one_and_update(
            {"_id": household_id}, {"$set": fields}, session=session, return_document=True
        )
        assert updated is not None
        return updated

    async def touch_household(self, household_id: str, now: datetime, session: Session) -> None:
        await self.households.update_one(
            {"_id": household_id}, {"$set": {"last_activity_at": now}}, session=session
        )

    async def household_with_members(
        self, household_id: str
    ) -> tuple[Document | None, list[Document]]:
        """A household and its residents, oldest first, read at once."""
        return await self._household_reads.submit(household_id)

    async def _households_with_members(
        self, household_ids: list[str]
    ) -> list[tuple[Document | None, list[Document]]]:
        # One round trip for the households and their residents.
        found = await (
            await self.households.aggregate(
                [
                    {"$match": {"_id": {"$in": list(set(household_ids))}}},
                    {
                        "$lookup": {
                            "from": self.persons.name,
                            "localField": "_id",
                            "foreignField": "household_id",
                            "pipeline": [
                                {"$match": {"status": RESIDENT}},
                                {"$sort": {"birth_date": ASCENDING}},
                            ],
                            "as": RESIDENTS,
                        }
                    },
                ]
            )
        ).to_list()
        by_id = {household["_id"]: (household, household.pop(RESIDENTS)) for household in found}
        return [by_id.get(household_id, (None, [])) for household_id in household_ids]

    async def households_page(
        self, unit_id: str, listing: UnitListing, size: int, only: Sequence[str] = ()
    ) -> tuple[list[Document], str]:
        """Active households of a unit's subtree (`only` these, if named), in (unit, id) order,
        one page, with their residents (each household's under "residents"), as the register
        was at the first page: a person who moved house between two pages is a resident once."""
        query: Document = {"unit_id": in_unit(unit_id), "active": True}
        if only:
            query["_id"] = {"$in": list(only)}
        households, next_page = await unit_ordered_page(self.households, query, listing, size)
        by_id = {household["_id"]: household for household in households}
        for household in households:
            household["residents"] = []
        if by_id:
            residents = {"household_id": {"$in": list(by_id)}, "status": RESIDENT}
            for person in await listing.find(self.persons, residents):
                by_id[person["household_id"]]["residents"].append(person)
        return households, next_page

    async def person(self, person_id: str, session: Session | None = None) -> Document | None:
        return await self.persons.find_one({"_id": person_id}, session=session)

    async def person_by_cid(self, cid_hash: str, session: Session | None = None) -> Document | None:
        return await self.persons.find_one({"cid_hash": cid_hash}, session=session)

    async def insert_person(self, person: Document, session: Session) -> None:
        await self.persons.insert_one(person, session=session)

    async def replace_person(self, person: Document, session: Session) -> None:
        await self.persons.replace_one({"_id": person["_id"]}, person, session=session)

    async def update_person(self, person_id: str, fields: Document, session: Session) -> Document:
        updated = await self.persons.find_one_and_update(
            {"_id": person_id}, {"$set": fields}, session=session, return_document=True
        )
        assert updated is not None
        return updated

    async def set_residence_kind(self, household_id: str, kind: int, session: Session) -> None:
        """The household's members live as it does now; those on a temporary stay keep theirs."""
        renter = kind == registry_pb2.RESIDENCE_KIND_RENTER
        await self.persons.update_many(
            {"household_id": household_id}, {"$set": {"renter": renter}}, session=session
        )
        await self.persons.update_many(
            {"household_id": household_id, "stay_end": {"$in": ["", None]}},
            {"$set": {"residence_kind": kind}},
            session=session,
        )

    async def search_persons(
        self,
        unit_id: str,
        *,
        name_folded: str,
        born_from: str | None,
        born_to: str | None,
        sex: int,
        today: str,
        listing: UnitListing,
        size: int,
    ) -> tuple[list[Document], str]:
        """Those living in a unit's subtree on `today` matching the search, one page, as the
        register was at the listing's first page."""
        query: Document = {"unit_id": in_unit(unit_id), **living_here(today)}
        if name_folded:
            # Each word of the query, in order, at a word start: "thi be" finds "nguyen thi be".
            words = ".*".join(rf"\b{re.escape(word)}" for word in name_folded.split())
            query["name_folded"] = {"$regex": words}
        birth: Document = {}
        if born_from:
            birth["$gte"] = born_from
        if born_to:
            birth["$lte"] = born_to
        if birth:
            query["birth_date"] = birth
        if sex:
            query["sex"] = sex
        return await unit_ordered_page(self.persons, query, listing, size)

    # ---- counts and data quality ---------------------------------------------------------

    async def counts_by_group(self, unit_id: str, today: str) -> dict[str, Counter[str]]:
        """Per group-level unit: population, households, renters, temporary residents, of those
        living there on `today`. A household counts while someone lives in it: one whose people
        all died or left, or whose guests' stays all ended, is an address, not a household of
        the census."""
        counts: dict[str, Counter[str]] = {}
        temporary = {"$cond": [{"$eq": ["$residence_kind", TEMPORARY]}, 1, 0]}
        rows = await self.persons.aggregate(
            [
                {"$match": {"unit_id": in_unit(unit_id), **living_here(today)}},
                {
                    "$group": {
                        "_id": {"unit": "$unit_id", "household": "$household_id"},
                        "population": {"$sum": 1},
                        "renters": {"$sum": {"$cond": ["$renter", 1, 0]}},
                        "temporary": {"$sum": temporary},
                    }
                },
                {
                    "$group": {
                        "_id": "$_id.unit",
                        "population": {"$sum": "$population"},
                        "households": {"$sum": 1},
                        "renters": {"$sum": "$renters"},
                        "temporary": {"$sum": "$temporary"},
                    }
                },
            ]
        )
        async for row in rows:
            counts.setdefault(row["_id"], Counter()).update(
                population=row["population"],
                households=row["households"],
                renters=row["renters"],
                temporary_residents=row["temporary"],
            )
        return counts

    async def overdue_households(
        self, unit_id: str, verified_before: datetime, listing: UnitListing, size: int
    ) -> tuple[list[Document], str]:
        """Active households of a unit's subtree not verified since `verified_before`, one page,
        as the register was at the listing's first page."""
        overdue: Document = {
            "$or": [
                {"last_verified_at": None},
                {"last_verified_at": {"$lt": verified_before}},
            ]
        }
        return await self._lived_in_page(unit_id, overdue, listing, size)

    async def headless_households(
        self, unit_id: str, listing: UnitListing, size: int
    ) -> tuple[list[Document], str]:
        """Active households of a unit's subtree that someone lives in and that have no head,
        one page, as the register was at the listing's first page."""
        return await self._lived_in_page(
            unit_id, {"head_person_id": {"$in": ["", None]}}, listing, size
        )

    async def _lived_in_page(
        self, unit_id: str, wanted: Document, listing: UnitListing, size: int
    ) -> tuple[list[Document], str]:
        query: Document = {"unit_id": in_unit(unit_id), "active": True} | wanted
        # As in the census, a household counts while someone lives in it: one whose people all
        # died or left has nobody to verify, nor anyone to be its head.
        lived_in: list[Document] = [
            {
                "$lookup": {
                    "from": self.persons.name,
                    "localField": "_id",
                    "foreignField": "household_id",
                    "pipeline": [
                        {"$match": {"status": RESIDENT}},
                        {"$limit": 1},
                        {"$project": {"_id": 1}},
                    ],
                    "as": RESIDENTS,
                }
            },
            {"$match": {RESIDENTS: {"$ne": []}}},
            {"$unset": RESIDENTS},
        ]
        return await unit_ordered_page(self.households, query, listing, size, then=lived_in)

    async def suspects_page(
        self, unit_id: str, inactive_since: datetime, today: str, listing: UnitListing, size: int
    ) -> tuple[list[Document], dict[str, bool], str]:
        """Residents of a unit's subtree suspected of not living there, one page, as the register
        was at the listing's first page (marked absent, on a stay that ended before `today`, or
        in a suspect household), and the page's suspect households: marked absent (True), or
        neither verified nor active since `inactive_since` (False).

        Each person's household is looked up as the page reads them: the area's suspect
        households, a district's tens of thousands, are neither all read nor all sent for every
        page. (MongoDB reads ahead of the lookup a batch, up to 4 MB, of the people in order.)"""
        suspect_household: Document = {
            "unit_id": in_unit(unit_id),
            "active": True,
            "$or": [
                {"marked_absent": True},
                {
                    "$and": [
                        {
                            "$or": [
                                {"last_verified_at": None},
                                {"last_verified_at": {"$lt": inactive_since}},
                            ]
                        },
                        {"last_activity_at": {"$lt": inactive_since}},
                    ]
                },
            ],
        }
        suspected: list[Document] = [
            {
                "$lookup": {
                    "from": self.households.name,
                    "localField": "household_id",
                    "foreignField": "_id",
                    "pipeline": [
                        {"$match": suspect_household},
                        {"$project": {"marked_absent": 1}},
                    ],
                    "as": SUSPECT_HOUSEHOLD,
                }
            },
            {
                "$match": {
                    "$or": [
                        {"marked_absent": True},
                        {SUSPECT_HOUSEHOLD: {"$ne": []}},
                        stay_ended(today),
                    ]
                }
            },
        ]
        query = {"unit_id": in_unit(unit_id), "status": RESIDENT}
        persons, token = await unit_ordered_page(self.persons, query, listing, size, then=suspected)
        households = {
            household["_id"]: bool(household.get("marked_absent"))
            for person in persons
            for household in person.pop(SUSPECT_HOUSEHOLD)
        }
        return persons, households, token

    async def likely_duplicates(
        self, unit_id: str, listing: UnitListing, size: int
    ) -> tuple[list[list[Document]], str]:
        """Residents of a unit's subtree sharing a folded name and birth date, a group each, in
        that order: up to `size` groups after where the listing's token ended, as the register
        was at its first page, and the token of the page after if more follow."""
        pipeline: list[Document] = [
            {"$match": {"unit_id": in_unit(unit_id), "status": RESIDENT}},
            {
                "$group": {
                    "_id": {"name": "$name_folded", "born": "$birth_date"},
                    "persons": {"$push": "$$ROOT"},
                    "n": {"$sum": 1},
                }
            },
            {"$match": {"n": {"$gt": 1}}},
        ]
        if listing.position:
            # A folded name may hold a `|`, which ends a token's part: it is there quoted.
            name, born = unquote(listing.position[0]), listing.position[1]
            after = [{"_id.name": {"$gt": name}}, {"_id.name": name, "_id.born": {"$gt": born}}]
            pipeline.append({"$match": {"$or": after}})
        # One more than the page: a token only where a page follows.
        pipeline += [{"$sort": {"_id.name": 1, "_id.born": 1}}, {"$limit": size + 1}]
        rows = await listing.aggregate(self.persons, pipeline)
        groups = [row["persons"] for row in rows[:size]]
        if len(rows) <= size:
            return groups, ""
        last = rows[size - 1]["_id"]
        return groups, listing.token_at((quote(last["name"], safe=""), last["born"]))

    # ---- privacy ------------------------------------------------------------------------

    async def log_access(self, entries: list[Document]) -> None:
        """Returns once the entries are written: personal data is shown only after its read is
        on record."""
        if entries:
            await self._access_writes.submit(entries)

    async def _write_access_entries(self, batches: list[list[Document]]) -> list[None]:
        await self.access_log.insert_many(
            [entry for entries in batches for entry in entries], ordered=False
        )
        return [None] * len(batches)

    async def access_entries(
        self, household_id: str, person_ids: list[str], token: str, size: int
    ) -> tuple[list[Document], str]:
        """The access-log records, newest first, of reads of the household's own data and of
        these persons' data wherever they lived when it was read."""
        query: Document = {
            "$or": [{"household_id": household_id}, {"persons.person_id": {"$in": person_ids}}]
        }
        if token:
            query["_id"] = {"$lt": ObjectId(token)}
        items = await self.access_log.find(query).sort("_id", DESCENDING).limit(size).to_list()
        return items, next_token(items, size)

    async def person_ids_of(self, household_id: str) -> list[str]:
        """Everyone the household is the last of: living there, or died or left from there."""
        return list(await self.persons.distinct("_id", {"household_id": household_id}))

    # ---- history (projected from the registry's own events) ------------------------------

    async def add_history(self, entries: list[Document], session: Session) -> None:
        if entries:
            await self.history.insert_many(entries, session=session)

    async def history_of(self, household_id: str) -> list[Document]:
        return (
            await self.history.find({"household_id": household_id})
            # Event ids are time-ordered and break ties within one transaction's millisecond.
            .sort([("occurred_at", ASCENDING), ("event_id", ASCENDING)])
            .to_list()
        )


def utcnow() -> datetime:
    return datetime.now(UTC)

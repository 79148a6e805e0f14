"""Tickets, routing rules and the service's own view of the administrative tree in MongoDB."""

from __future__ import annotations

import contextlib
import re
import time
from datetime import datetime

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, GEOSPHERE, IndexModel
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid

from services.common.auth import OFFICIALS, Principal
from services.common.commands import ensure_command_indexes
from services.common.mongo import Document, Session, in_unit
from services.common.outbox import ensure_outbox_indexes
from services.common.paging import after_token
from services.common.registry_view import RegistryView
from services.tickets.domain import EARTH_RADIUS_M, OPEN, Level

OPEN_STATUSES = [int(status) for status in OPEN]
OFFICIAL_ROLES = sorted(role.value for role in OFFICIALS)

RULES_CACHE_SECONDS = 1.0


# A ticket's id, as new_ticket_id makes it; a page token is the last one of the page before.
TICKET_ID = re.compile(r"tk-[0-9a-f]{24}")


def new_ticket_id() -> str:
    return f"tk-{ObjectId()}"


DISTANCE = "_distance_m"  # where a nearby listing puts a ticket's distance
CANDIDATE_FIELDS = dict.fromkeys(
    ("submitted_at", "category", "status", "duplicate_of", "origin_unit_id", "location"), 1
)


class TicketStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.db = db
        self.tickets = db["tickets"]
        self.rules = db["routing_rules"]
        # The units and households, projected from civic.registry.v1.
        self.view = RegistryView(db)
        self._rules_cache: tuple[float, Document | None] | None = None

    async def ensure_indexes(self) -> None:
        # Change streams carry each change's before and after images, so a queue watcher learns
        # of a ticket leaving its queue and sees the ticket exactly as that change left it.
        if "tickets" not in await self.db.list_collection_names():
            with contextlib.suppress(CollectionInvalid):
                await self.db.create_collection("tickets")
        await self.db.command(
            {"collMod": "tickets", "changeStreamPreAndPostImages": {"enabled": True}}
        )
        open_only = {"status": {"$in": OPEN_STATUSES}}
        await self.tickets.create_indexes(
            [
                IndexModel([("photos.key", ASCENDING)], sparse=True),
                IndexModel(
                    [("assigned_unit_id", ASCENDING), ("department", ASCENDING), ("_id", ASCENDING)]
                ),
                # A unit's whole queue, page by page in _id order without sorting it each time.
                IndexModel([("assigned_unit_id", ASCENDING), ("_id", ASCENDING)]),
                IndexModel([("origin_unit_id", ASCENDING), ("category", ASCENDING)]),
                IndexModel([("submitter", ASCENDING), ("_id", DESCENDING)]),
                # A household's tickets filed by officials, beside its residents' own.
                IndexModel([("household_id", ASCENDING), ("_id", DESCENDING)]),
                IndexModel([("next_deadline", ASCENDING)], partialFilterExpression=open_only),
                IndexModel([("location", GEOSPHERE), ("category", ASCENDING)]),
            ]
        )
        await self.rules.create_index([("version", DESCENDING)])
        await self.view.ensure_indexes()
        await ensure_outbox_indexes(self.db)
        await ensure_command_indexes(self.db)

    # ---- tickets ---------------------------------------------------------------------------

    async def get(self, ticket_id: str, session: Session | None = None) -> Document | None:
        return await self.tickets.find_one({"_id": ticket_id}, session=session)

    async def update(
        self,
        ticket_id: str,
        changes: Document,
        session: Session,
        push: Document | None = None,
        pull: Document | None = None,
    ) -> Document:
        update: Document = {"$set": changes}
        if push:
            update["$push"] = push
        if pull:
            update["$pull"] = pull
        updated = await self.tickets.find_one_and_update(
            {"_id": ticket_id}, update, session=session, return_document=True
        )
        assert updated is not None
        return updated

    async def photos_named(self, keys: list[str]) -> set[str]:
        """Those of the keys a ticket's photo is kept at (records from before accepted photos
        were copied to checked/ name the upload itself)."""
        wanted = set(keys)
        found = self.tickets.find({"photos.key": {"$in": keys}}, {"photos.key": 1})
        return {p["key"] async for t in found for p in t["photos"] if p["key"] in wanted}

    async def many(self, ticket_ids: list[str], session: Session) -> dict[str, Document]:
        found = self.tickets.find({"_id": {"$in": ticket_ids}}, session=session)
        return {ticket["_id"]: ticket async for ticket in found}

    async def open_near_any(
        self,
        *,
        points: list[Document],
        meters: float,
        categories: set[str],
        since: datetime,
        session: Session,
    ) -> list[Document]:
        """Open, unlinked tickets of these categories filed since `since` within `meters` of any
        of the points: the candidates `domain.first_open_nearby` chooses from."""
        radians = meters / EARTH_RADIUS_M
        return await self.tickets.find(
            {
                # $geoWithin, unlike $near, is allowed inside transactions.
                "$or": [
                    {"location": {"$geoWithin": {"$centerSphere": [p["coordinates"], radians]}}}
                    for p in points
                ],
                "category": {"$in": sorted(categories)},
                "status": {"$in": OPEN_STATUSES},
                "duplicate_of": None,
                "submitted_at": {"$gte": since},
            },
            # What the choice looks at: not a primary's list of duplicates, its comments or its
            # history, which grow with it and would be read for every ticket filed near it.
            CANDIDATE_FIELDS,
            session=session,
        ).to_list()

    async def of_group(self, unit_id: str, session: Session) -> list[Document]:
        """The tickets filed in the group or assigned to it, with those two units."""
        return await self.tickets.find(
            {"$or": [{"origin_unit_id": unit_id}, {"assigned_unit_id": unit_id}]},
            {"origin_unit_id": 1, "assigned_unit_id": 1},
            session=session,
        ).to_list()

    async def open_near(
        self,
        point: Document,
        *,
        meters: float,
        within: str,
        category: str,
        limit: int,
        doors_of: Principal | None = None,
    ) -> list[Document]:
        """Open tickets that are no one's duplicate, filed in `within` or below it, within
        `meters` of `point`, nearest first, each with its distance in DISTANCE. With
        `doors_of`, a ticket filed at a household's door only if it is theirs."""
        query: Document = {
            "status": {"$in": OPEN_STATUSES},
            "duplicate_of": None,
            "origin_unit_id": in_unit(within, "unit_id"),
        }
        if category:
            query["category"] = category
        if doors_of is not None:
            query["$or"] = [
                {"located_at_home": False},
                # Filed before the flag was kept: any with a household may be at its door.
                {"located_at_home": {"$exists": False}, "household_id": {"$in": ["", None]}},
                {"submitter": doors_of.subject},
                *([{"household_id": doors_of.household_id}] if doors_of.household_id else []),
            ]
        pipeline: list[Document] = [
            {
                # $geoNear, unlike a find with $nearSphere, takes any filter and tells distances.
                "$geoNear": {
                    "near": point,
                    "key": "location",
                    "spherical": True,
                    "maxDistance": meters,
                    "query": query,
                    "distanceField": DISTANCE,
                }
            },
            {"$limit": limit},
        ]
        return await (await self.tickets.aggregate(pipeline)).to_list()

    async def open_of_category(self, category: str, within: str) -> bool:
        """Whether a ticket of the category filed in `within` or below it is open."""
        query = {
            "origin_unit_id": in_unit(within, "unit_id"),
            "category": category,
            "status": {"$in": OPEN_STATUSES},
        }
        return await self.tickets.find_one(query, {"_id": 1}) is not None

    async def linked(self, primary: Document, limit: int) -> list[Document]:
        """The primary's first `limit` duplicates, the first filed first, without their
        comments: found by the ids it lists (by _id: no scan of every ticket for who names it)."""
        if not primary.get("duplicates"):
            return []
        return (
            await self.tickets.find(
                {"_id": {"$in": primary["duplicates"]}, "duplicate_of": primary["_id"]},
                {"comments": 0},
            )
            .sort([("submitted_at", ASCENDING), ("_id", ASCENDING)])
            .limit(limit)
            .to_list()
        )

    async def open_duplicates(self, primary: Document, session: Session) -> list[Document]:
        """The primary's duplicates still open, found by the ids it lists."""
        return await self._duplicates(primary, {"$in": OPEN_STATUSES}, session)

    async def decided_duplicates(self, primary: Document, session: Session) -> list[Document]:
        """The primary's duplicates decided (with it) or closed since."""
        return await self._duplicates(primary, {"$nin": OPEN_STATUSES}, session)

    async def _duplicates(
        self, primary: Document, status: Document, session: Session
    ) -> list[Document]:
        found = self.tickets.find(
            {
                "_id": {"$in": primary.get("duplicates", [])},
                "duplicate_of": primary["_id"],
                "status": status,
            },
            session=session,
        )
        return await found.sort("_id").to_list()

    async def due(self, now: datetime, limit: int = 200) -> list[Document]:
        """Open tickets past their deadline that can still go up: nobody is above the city, so
        a city ticket keeps its deadline (and shows overdue) without being swept again; nor is
        a duplicate, which goes up with its primary (see escalation.escalate)."""
        return (
            await self.tickets.find(
                {
                    "status": {"$in": OPEN_STATUSES},
                    "next_deadline": {"$lt": now},  # passed, as domain.missed counts
                    "assigned_level": {"$ne": int(Level.CITY)},
                    "duplicate_of": None,
                }
            )
            .sort("next_deadline", ASCENDING)
            .limit(limit)
            .to_list()
        )

    # Listings hand out their tickets as read, not as a list: a page ends early once its
    # tickets fill an answer (see TicketsServicer._page), and what follows is not read.

    def of_submitter(
        self, submitter: str, household_id: str, token: str, size: int, scope: str = ""
    ) -> AsyncCursor[Document]:
        """A submitter's tickets and, given a household, those officials filed on its behalf
        (see domain.Submitter): newest first, after the page token's. Given an official's
        `scope`, of those they filed on a household's behalf (which are the household's, not
        theirs) only the ones filed or assigned within it, as domain.may_see lets them see."""
        query: Document = {"submitter": submitter}
        if scope:
            query["$or"] = [
                {"household_id": {"$in": ["", None]}},
                {"submitter_role": {"$nin": OFFICIAL_ROLES}},
                {"origin_unit_id": in_unit(scope)},
                {"assigned_unit_id": in_unit(scope)},
            ]
        if household_id:
            on_behalf = {"household_id": household_id, "submitter_role": {"$in": OFFICIAL_ROLES}}
            query = {"$or": [query, on_behalf]}
        if token:
            query = {"$and": [query, {"_id": {"$lt": token}}]}
        return self.tickets.find(query).sort("_id", DESCENDING).limit(size)

    def queue(self, query: Document, token: str, size: int) -> AsyncCursor[Document]:
        """The tickets `query` finds, oldest first, after the page token's."""
        return self.tickets.find(after_token(query, token)).sort("_id").limit(size)

    async def statistics(self, unit_id: str, now: datetime) -> list[Document]:
        """Per origin unit and category: totals, open, resolved, overdue, resolution times.
        A rejected ticket (closed or not) was decided but not resolved: it counts in neither."""
        resolved = {"$and": [{"$ne": ["$resolved_at", None]}, {"$ne": ["$rejected", True]}]}
        rows = await self.tickets.aggregate(
            [
                # A linked duplicate counts through its primary; one unlinked, on its own.
                {"$match": {"origin_unit_id": in_unit(unit_id), "duplicate_of": None}},
                {
                    "$group": {
                        "_id": {"unit": "$origin_unit_id", "category": "$category"},
                        "total": {"$sum": 1},
                        "open": {"$sum": {"$cond": [{"$in": ["$status", OPEN_STATUSES]}, 1, 0]}},
                        "resolved": {"$sum": {"$cond": [resolved, 1, 0]}},
                        "overdue": {
                            "$sum": {
                                "$cond": [
                                    {
                                        "$and": [
                                            {"$in": ["$status", OPEN_STATUSES]},
                                            # In an expression null sorts below any date: a
                                            # ticket not yet routed has no deadline to miss.
                                            {"$gt": ["$next_deadline", None]},
                                            {"$lt": ["$next_deadline", now]},  # missed
                                        ]
                                    },
                                    1,
                                    0,
                                ]
                            }
                        },
                        "resolution_ms": {
                            "$push": {
                                "$cond": [
                                    resolved,
                                    {"$subtract": ["$resolved_at", "$submitted_at"]},
                                    "$$REMOVE",
                                ]
                            }
                        },
                    }
                },
                {"$sort": {"_id.unit": 1, "_id.category": 1}},
            ]
        )
        return await rows.to_list()

    # ---- routing rules -------------------------------------------------------------------

    async def recent_rules(self) -> Document | None:
        """The rules in force, read at most once a RULES_CACHE_SECONDS: every ticket needs them
        twice and they change rarely (another instance's change shows within that time)."""
        now = time.monotonic()
        if self._rules_cache is None or now - self._rules_cache[0] > RULES_CACHE_SECONDS:
            self._rules_cache = (now, await self.current_rules())
        return self._rules_cache[1]

    def forget_rules(self) -> None:
        self._rules_cache = None

    async def current_rules(self, session: Session | None = None) -> Document | None:
        return await self.rules.find_one({}, sort=[("version", DESCENDING)], session=session)

    async def rules_version(self, version: int, session: Session | None = None) -> Document | None:
        return await self.rules.find_one({"version": version}, session=session)

    async def insert_rules(self, rules: Document, session: Session) -> None:
        await self.rules.insert_one(rules, session=session)

    # ---- the registry's tree, as this service knows it -------------------------------------

    async def unit(self, unit_id: str) -> Document | None:
        return await self.view.unit(unit_id)

    async def household(self, household_id: str) -> Document | None:
        return await self.view.household(household_id)

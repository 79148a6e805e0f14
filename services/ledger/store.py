"""Funds, transactions, balances and campaigns in MongoDB. Transactions are inserted, never
updated; every write takes the session of the command's transaction."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.collation import Collation, CollationStrength
from pymongo.errors import OperationFailure

from services.common.commands import DUPLICATE_KEY, ensure_command_indexes
from services.common.mongo import Document, Session, ensure_indexes, holding_text, in_unit, once
from services.common.outbox import ensure_outbox_indexes
from services.ledger import domain

# A household moved: (household id, the unit it left, the unit it is in now).
Move = tuple[str, str, str]
DUES_APART = "dues_by_household"
POSTED_AT = [("fund_id", ASCENDING), ("posted_at", ASCENDING)]
SEQUENCE = [("fund_id", ASCENDING), ("sequence", ASCENDING)]
DUES_OF_CAMPAIGN = [("campaign_id", ASCENDING), ("household_id", ASCENDING)]
# Receipt numbers compare whatever their capitals: "bl-77", typed so, is the paper receipt
# "BL-77". Their index (RECEIPT_NUMBERS) compares so too, and replaces one that did not.
CASELESS = Collation(locale="en", strength=CollationStrength.SECONDARY)
RECEIPT_NUMBER = "contribution.receipt_number"
RECEIPT_NUMBERS = "fund_receipt_numbers_caseless"
RECEIPT_NUMBERS_BY_CASE = "fund_id_1_contribution.receipt_number_1"
KEYS_BY_FUND = "fund_id_1_request_id_1"
KEYS_WITH_FUND = "request_id_1_fund_id_1"
ONE_FUND_PER_KEY = "one_fund_per_key"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeriodTotals:
    """A statement period's transactions: how many, the first (sequence and time), and the
    money they moved in and out."""

    lines: int = 0
    first: int = 0
    first_at: datetime | None = None
    money_in: int = 0
    money_out: int = 0


def new_id(prefix: str) -> str:
    return f"{prefix}-{ObjectId()}"


class LedgerStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.db = db
        self.funds = db["funds"]
        self.transactions = db["transactions"]
        self.balances = db["balances"]
        self.campaigns = db["campaigns"]
        # Each household's due in each campaign, beside the campaign's own list of them: one
        # household's dues are read without the thousands of others' a campaign lists.
        self.dues = db["dues"]
        # Household names as the register gave them (for dues lists and statements).
        self.households = db["households"]
        # Groups merged away, each with the group it went into (from the registry's events):
        # their own officials no longer keep their books.
        self.merged_groups = db["merged_groups"]

    async def standing_with(
        self, fund_id: str, path: str, value: str, other_than: str, session: Session
    ) -> str | None:
        """The id of another transaction of the fund holding `value` at `path` (an expense's
        receipt image, a contribution's receipt number) and not reversed, if any: a mistaken
        transaction, reversed, frees what it held for the one that corrects it."""
        holding = await self.transactions.distinct(
            "_id",
            {"fund_id": fund_id, path: value, "_id": {"$ne": other_than}},
            session=session,
            collation=CASELESS if path == RECEIPT_NUMBER else None,
        )
        if not holding:
            return None
        undone = await self.transactions.distinct(
            "reverses", {"fund_id": fund_id, "reverses": {"$in": holding}}, session=session
        )
        standing = [
            str(transaction_id) for transaction_id in holding if transaction_id not in undone
        ]
        return standing[0] if standing else None

    async def receipts_named(self, keys: list[str]) -> set[str]:
        """Those of the keys an expense's receipt is kept at."""
        found = self.transactions.find(
            {"expense.receipt_object_key": {"$in": keys}}, {"expense.receipt_object_key": 1}
        )
        return {t["expense"]["receipt_object_key"] async for t in found}

    async def ensure_indexes(self) -> None:
        await self.funds.create_index([("unit_id", ASCENDING), ("_id", ASCENDING)])
        await ensure_indexes(
            self.transactions,
            [
                IndexModel(SEQUENCE, unique=True),
                IndexModel(POSTED_AT),
                IndexModel([("expense.receipt_object_key", ASCENDING)], sparse=True),
                # A receipt number is held by one contribution of the fund until that one is
                # reversed (LedgerServicer checks it with the posting): found by this index.
                IndexModel(
                    [("fund_id", ASCENDING), (RECEIPT_NUMBER, ASCENDING)],
                    name=RECEIPT_NUMBERS,
                    collation=CASELESS,
                    partialFilterExpression=holding_text(RECEIPT_NUMBER),
                ),
                # A transaction is reversed at most once.
                IndexModel(
                    [("fund_id", ASCENDING), ("reverses", ASCENDING)],
                    unique=True,
                    partialFilterExpression=holding_text("reverses"),
                ),
                IndexModel(
                    [("contribution.household_id", ASCENDING), ("fund_id", ASCENDING)],
                    partialFilterExpression=holding_text("contribution.household_id"),
                ),
                IndexModel(
                    [("fund_id", ASCENDING), ("contribution.campaign_id", ASCENDING)],
                    partialFilterExpression=holding_text("contribution.campaign_id"),
                ),
            ],
        )
        # Once their successors are built: the receipt numbers' index that compared capitals,
        # and the keys' that found a key in its fund only.
        existing = await self.transactions.index_information()
        for replaced in (RECEIPT_NUMBERS_BY_CASE, KEYS_BY_FUND):
            if replaced in existing:
                with contextlib.suppress(OperationFailure):  # dropped by another instance already
                    await self.transactions.drop_index(replaced)
        await self.balances.create_index([("fund_id", ASCENDING), ("account", ASCENDING)])
        await self.merged_groups.create_index([("into", ASCENDING)])
        await self.campaigns.create_index([("fund_id", ASCENDING), ("_id", ASCENDING)])
        await self.dues.create_index(
            [("household_id", ASCENDING), ("fund_id", ASCENDING), ("campaign_id", ASCENDING)]
        )
        # A campaign's dues a page at a time, in household order.
        await self.dues.create_index(DUES_OF_CAMPAIGN)
        await ensure_outbox_indexes(self.db)
        await ensure_command_indexes(self.db)
        await once(self.db, DUES_APART, self._keep_dues_apart)
        await once(self.db, ONE_FUND_PER_KEY, self._one_fund_per_key)

    async def _one_fund_per_key(self) -> None:
        """The idempotency key: one transaction per key, for ever, whatever fund it names, so
        that two requests under one key to two funds at once cannot both commit (the second
        collides, and is answered as a key used in another fund). It replaces a key unique
        within its fund. A store that already holds a key in two funds, posted before a key
        was refused in a second fund, keeps that one and says so."""
        try:
            await self.transactions.create_index([("request_id", ASCENDING)], unique=True)
        except OperationFailure as error:
            if error.code != DUPLICATE_KEY:
                raise
            log.warning(
                "transactions hold a request_id in two funds; a key stays unique only within "
                "its fund (%s)",
                error.details and error.details.get("errmsg"),
            )
            await self.transactions.create_index(
                [("request_id", ASCENDING), ("fund_id", ASCENDING)], unique=True
            )
            return
        with contextlib.suppress(OperationFailure):  # dropped by another instance already
            await self.transactions.drop_index(KEYS_WITH_FUND)

    async def _keep_dues_apart(self) -> None:
        """Campaigns declared before each household's due was also kept on its own get theirs
        (upserts: instances starting together, or a start after a crash halfway, do no harm)."""
        async for campaign in self.campaigns.find(
            {}, {"fund_id": 1, "name": 1, "period": 1, "dues": 1}
        ):
            dues = household_dues(campaign)
            if dues:
                await self.dues.bulk_write(
                    [UpdateOne({"_id": d["_id"]}, {"$setOnInsert": d}, upsert=True) for d in dues],
                    ordered=False,
                )

    # ---- funds -------------------------------------------------------------------------------

    async def fund(self, fund_id: str, session: Session | None = None) -> Document | None:
        return await self.funds.find_one({"_id": fund_id}, session=session)

    async def funds_by_id(self, fund_ids: Iterable[str], session: Session) -> dict[str, Document]:
        return {
            fund["_id"]: fund
            async for fund in self.funds.find({"_id": {"$in": list(fund_ids)}}, session=session)
        }

    async def funds_of(self, unit_ids: list[str], below: str | None) -> list[Document]:
        """Funds of these units, and of every unit under `below` if given."""
        # One $in, the subtree's stretch included: the unit index read in stretches, in order.
        units = [*unit_ids, *(in_unit(below)["$in"] if below is not None else [])]
        return (
            await self.funds.find({"unit_id": {"$in": units}})
            .sort([("unit_id", ASCENDING), ("_id", ASCENDING)])
            .to_list()
        )

    async def advance_funds(
        self, heads: dict[str, tuple[int, int, str, datetime]], session: Session
    ) -> None:
        """Moves each fund's chain head from its old sequence to (sequence, hash, time of its
        last posting); the old sequence in the filter makes concurrent writers of one fund
        conflict and retry."""
        await self.funds.bulk_write(
            [
                UpdateOne(
                    {"_id": fund_id, "sequence": old},
                    {"$set": {"sequence": new, "head_hash": head, "last_posted_at": posted_at}},
                )
                for fund_id, (old, new, head, posted_at) in heads.items()
            ],
            ordered=False,
            session=session,
        )

    # ---- transactions ------------------------------------------------------------------------

    async def by_keys(
        self, keys: Iterable[tuple[str, str]], session: Session | None = None
    ) -> dict[str, Document]:
        """Transactions already posted under these (fund_id, request_id) keys, by request_id,
        in whichever fund: a key is one user action's. (Of a key posted in several funds,
        before a key was refused in a fund other than its own, the one in the fund named.)"""
        wanted = {request_id: fund_id for fund_id, request_id in keys}
        if not wanted:
            return {}
        found: dict[str, Document] = {}
        async for doc in self.transactions.find(
            {"request_id": {"$in": list(wanted)}}, session=session
        ):
            key = doc["request_id"]
            if key not in found or doc["fund_id"] == wanted[key]:
                found[key] = doc
        return found

    async def transaction(
        self, fund_id: str, transaction_id: str, session: Session | None = None
    ) -> Document | None:
        return await self.transactions.find_one(
            {"_id": transaction_id, "fund_id": fund_id}, session=session
        )

    async def reversal_of(
        self, fund_id: str, transaction_id: str, session: Session | None = None
    ) -> Document | None:
        return await self.transactions.find_one(
            {"fund_id": fund_id, "reverses": transaction_id}, session=session
        )

    async def campaigns_of_period(
        self, fund_id: str, period: str, session: Session
    ) -> list[Document]:
        """The fund's campaigns of the period, however its capitals were typed."""
        return await self.campaigns.find(
            {"fund_id": fund_id, "period": {"$regex": f"^{re.escape(period)}$", "$options": "i"}},
            {"name": 1, "period": 1, "transaction_id": 1},
            session=session,
        ).to_list()

    async def reversed_ids(
        self, fund_id: str, transaction_ids: list[str], session: Session | None = None
    ) -> dict[str, str]:
        """transaction id -> the id of the reversal that undid it."""
        return {
            doc["reverses"]: doc["_id"]
            async for doc in self.transactions.find(
                {"fund_id": fund_id, "reverses": {"$in": transaction_ids}},
                {"reverses": 1},
                session=session,
            )
        }

    async def other_parts(self, fund_id: str, assessment: Document) -> list[Document]:
        """The campaign's other assessment transactions, in the chain's order: a campaign over
        many households is booked in several."""
        campaign = await self.campaign(
            fund_id, assessment.get("campaign_id") or "", with_dues=False
        )
        ids = (campaign or {}).get("transaction_ids", [])
        others = [i for i in ids if i != assessment["_id"]]
        if not others:
            return []
        return (
            await self.transactions.find({"fund_id": fund_id, "_id": {"$in": others}})
            .sort("sequence", ASCENDING)
            .to_list()
        )

    async def insert_transactions(self, docs: list[Document], session: Session) -> None:
        await self.transactions.insert_many(docs, ordered=True, session=session)

    async def statement_lines(
        self, fund_id: str, period: domain.StatementPeriod, after: int, limit: int
    ) -> list[Document]:
        """Up to `limit` of the fund's transactions of the period after sequence `after`, in
        the chain's order: read on the sequence index from where the last page ended (the
        period's first transaction for the first page), not sorted from the whole period."""
        query: Document = {
            "fund_id": fund_id,
            "sequence": {"$gt": max(after, period.first - 1), "$lte": period.through},
            "posted_at": {"$lt": period.end},
        }
        if period.start is not None:
            query["posted_at"]["$gte"] = period.start
        return (
            await self.transactions.find(query)
            .sort("sequence", ASCENDING)
            .hint(SEQUENCE)
            .limit(limit)
            .to_list()
        )

    async def statement_totals(
        self, fund_id: str, period: domain.StatementPeriod, session: Session
    ) -> PeriodTotals:
        """The fund's transactions of the period: how
        many, the first, and the money they moved into and out of cash and bank, summed in
        MongoDB rather than read here. Sums are decimals: past MAX_BALANCE they are refused,
        never wrapped or rounded."""
        query: Document = {"fund_id": fund_id, "posted_at": {"$lt": period.end}}
        if period.start is not None:
            query["posted_at"]["$gte"] = period.start
        moved = {
            "$sum": {
                "$map": {
                    "input": {
                        "$filter": {
                            "input": "$postings",
                            "cond": {"$in": ["$$this.account", list(domain.MONEY)]},
                        }
                    },
                    "in": "$$this.amount",
                }
            }
        }
        pipeline: list[Document] = [
            {"$match": query | {"sequence": {"$lte": period.through}}},
            {"$project": {"sequence": 1, "posted_at": 1, "moved": moved}},
            {
                "$group": {
                    "_id": None,
                    "lines": {"$sum": 1},
                    "first": {"$min": "$sequence"},
                    "first_at": {"$min": "$posted_at"},
                    "in": {"$sum": {"$toDecimal": {"$max": ["$moved", 0]}}},
                    "out": {"$sum": {"$toDecimal": {"$max": [{"$subtract": [0, "$moved"]}, 0]}}},
                }
            },
        ]
        # The period's stretch of the time index: the sequence bound alone would span every
        # transaction before it.
        rows = await (
            await self.transactions.aggregate(pipeline, session=session, hint=dict(POSTED_AT))
        ).to_list()
        if not rows:
            return PeriodTotals()
        row = rows[0]
        return PeriodTotals(
            lines=row["lines"],
            first=row["first"],
            first_at=row["first_at"],
            money_in=int(row["in"].to_decimal()),
            money_out=int(row["out"].to_decimal()),
        )

    async def sequences(self, fund_id: str, transaction_ids: Iterable[str]) -> dict[str, int]:
        """transaction id -> its place in the fund's chain."""
        ids = list(transaction_ids)
        if not ids:
            return {}
        return {
            doc["_id"]: doc["sequence"]
            async for doc in self.transactions.find(
                {"_id": {"$in": ids}, "fund_id": fund_id}, {"sequence": 1}
            )
        }

    async def contributions_of(
        self, fund_id: str, household_id: str, session: Session | None = None
    ) -> list[Document]:
        return (
            await self.transactions.find(
                {"contribution.household_id": household_id, "fund_id": fund_id}, session=session
            )
            .sort("sequence", ASCENDING)
            .to_list()
        )

    # ---- balances ----------------------------------------------------------------------------

    async def current_balances(
        self, fund_accounts: Iterable[tuple[str, str]], session: Session
    ) -> dict[tuple[str, str], int]:
        ids = [_balance_id(f, a) for f, a in fund_accounts]
        return {
            (doc["fund_id"], doc["account"]): doc["balance"]
            async for doc in self.balances.find({"_id": {"$in": ids}}, session=session)
        }

    async def add_to_balances(self, changes: dict[tuple[str, str], int], session: Session) -> None:
        updates = [
            UpdateOne(
                {"_id": _balance_id(f, a)},
                {"$inc": {"balance": amount}, "$setOnInsert": {"fund_id": f, "account": a}},
                upsert=True,
            )
            for (f, a), amount in changes.items()
        ]
        if updates:
            await self.balances.bulk_write(updates, ordered=False, session=session)

    def snapshot(self) -> Session:
        """A session whose reads all see the books as they stood at its first read: a report
        read in several queries adds up even while postings commit."""
        return self.db.client.start_session(snapshot=True)

    async def hash_at(self, fund_id: str, sequence: int) -> str:
        """The hash of the fund's transaction at `sequence` ("" for none)."""
        found = await self.transactions.find_one(
            {"fund_id": fund_id, "sequence": sequence}, {"hash": 1}
        )
        return str(found["hash"]) if found else ""

    async def statement_balances(
        self, fund_id: str, period: domain.StatementPeriod, session: Session
    ) -> tuple[domain.Standing, domain.Standing]:
        """The fund's books before and after its transactions of the period (before: nothing
        without a start), read in `session`, a snapshot, as a statement's header shows them:
        every account but the households' receivables, and those summed per campaign.

        They are the running balances less what was posted since: reading the transactions of
        the period and after it, never the fund's history before it, which a statement of last
        month would otherwise sum whole. MongoDB sums them: what it answers grows with the
        fund's own accounts and campaigns, not with its households' receivables."""
        since = period.start or period.end
        later: Document = {
            "$or": [
                {"$gte": ["$posted_at", period.end]},
                {"$gt": ["$sequence", period.through]},
            ]
        }
        # Decimal sums throughout: a sum in any order never passes what int64 holds midway.
        amount = {"$toDecimal": "$postings.amount"}
        account = {"$split": ["$_id", "/"]}
        receivable = {"$eq": [{"$first": account}, "receivable"]}

        def owing(balance: str) -> Document:
            return {"$cond": [{"$and": [receivable, {"$ne": [balance, 0]}]}, 1, 0]}

        pipeline: list[Document] = [
            # Each side on its own index: the period and after it, and what was posted after
            # `through` (nothing, unless a page after the first reads it).
            {
                "$match": {
                    "$or": [
                        {"fund_id": fund_id, "posted_at": {"$gte": since}},
                        {"fund_id": fund_id, "sequence": {"$gt": period.through}},
                    ]
                }
            },
            {"$unwind": "$postings"},
            {
                "$project": {
                    "_id": "$postings.account",
                    "closing": {"$cond": [later, {"$subtract": [0, amount]}, 0]},
                    "within": {"$cond": [later, 0, amount]},
                }
            },
            {
                "$unionWith": {
                    "coll": self.balances.name,
                    "pipeline": [
                        {"$match": {"fund_id": fund_id}},
                        {"$project": {"_id": "$account", "closing": {"$toDecimal": "$balance"}}},
                    ],
                }
            },
            {
                "$group": {
                    "_id": "$_id",
                    "closing": {"$sum": "$closing"},
                    "within": {"$sum": "$within"},
                }
            },
            {"$set": {"opening": {"$subtract": ["$closing", "$within"]}}},
            {"$match": {"$or": [{"closing": {"$ne": 0}}, {"opening": {"$ne": 0}}]}},
            # One row for each account but the receivables, one for each campaign's (under
            # "receivable/<campaign>", which no account is: a receivable hand-posted under a
            # campaign named like an account, receivable/cash/x, is not summed with cash).
            {
                "$group": {
                    "_id": {
                        "$cond": [
                            receivable,
                            {"$concat": ["receivable/", {"$arrayElemAt": [account, 1]}]},
                            "$_id",
                        ]
                    },
                    "receivables": {"$max": receivable},
                    "closing": {"$sum": "$closing"},
                    "opening": {"$sum": "$opening"},
                    "owing_at_close": {"$sum": owing("$closing")},
                    "owing_at_open": {"$sum": owing("$opening")},
                }
            },
        ]
        opening, closing = domain.Standing(), domain.Standing()
        async for row in await self.transactions.aggregate(pipeline, session=session):
            for standing, balance, owing_households in (
                (opening, row["opening"], row["owing_at_open"]),
                (closing, row["closing"], row["owing_at_close"]),
            ):
                if not (balance := int(balance.to_decimal())):
                    continue
                if row["receivables"]:
                    campaign_id = row["_id"].removeprefix("receivable/")
                    standing.owed[campaign_id] = domain.Owed(balance, owing_households)
                else:
                    standing.balances[row["_id"]] = balance
        if period.start is None:
            return domain.Standing(), closing
        return opening, closing

    async def last_posted_before(self, fund_id: str, end: datetime, session: Session) -> int:
        """The fund's last transaction posted before `end` (0 for none). None is posted before
        the chain's last one: those before `end` are the chain up to it."""
        last = await self.transactions.find_one(
            {"fund_id": fund_id, "posted_at": {"$lt": end}},
            {"posted_at": 1},
            sort=[("posted_at", DESCENDING)],
            hint=POSTED_AT,
            session=session,
        )
        if last is None:
            return 0
        # A batch's transactions share their time: the last of them in the chain.
        tied = await self.transactions.find_one(
            {"fund_id": fund_id, "posted_at": last["posted_at"]},
            {"sequence": 1},
            sort=[("sequence", DESCENDING)],
            hint=POSTED_AT,
            session=session,
        )
        return int((tied or last)["sequence"])

    async def balances_at(
        self,
        fund_id: str,
        through: int,
        head: int,
        accounts: Document,
        session: Session,
        limit: int = 0,
    ) -> dict[str, int]:
        """The balances other than zero after the fund's transaction `through` (`head`: the
        chain's head as `session`, a snapshot, reads it) of the accounts `accounts` selects (a
        condition on their names, {} for all): in the accounts' order, the first `limit` of
        them (0: all).

        Of a recent moment, they are the maintained balances less what was posted since: the
        transactions after it are read, not the history before it. Of an early one (fewer
        transactions before it than after), they are the history up to it summed."""
        later: dict[str, int] = {}
        if through < head:
            if through < head - through:
                return await self._sums(fund_id, {"$lte": through}, accounts, session, limit)
            later = await self._sums(fund_id, {"$gt": through}, accounts, session)
        query: Document = {"fund_id": fund_id}
        if accounts:
            query["account"] = accounts
        # An account at zero now (a household's paid receivable) is read only when it held
        # something at the moment.
        query["$or"] = [{"balance": {"$ne": 0}}, {"account": {"$in": list(later)}}]
        found: dict[str, int] = {}
        cursor = self.balances.find(
            query, {"account": 1, "balance": 1}, sort=[("account", ASCENDING)], session=session
        )
        try:
            async for doc in cursor:
                if balance := doc["balance"] - later.get(doc["account"], 0):
                    found[doc["account"]] = balance
                    if len(found) == limit:
                        break
        finally:
            await cursor.close()
        return found

    async def _sums(
        self,
        fund_id: str,
        sequences: Document,
        accounts: Document,
        session: Session,
        limit: int = 0,
    ) -> dict[str, int]:
        """What the fund's transactions whose sequence `sequences` selects posted to each
        account `accounts` selects, the accounts summing to zero left out, in the accounts'
        order (the first `limit`, 0: all). Decimal sums: in any order they never pass what
        int64 holds midway."""
        pipeline: list[Document] = [
            {"$match": {"fund_id": fund_id, "sequence": sequences}},
            {"$unwind": "$postings"},
            *([{"$match": {"postings.account": accounts}}] if accounts else []),
            {
                "$group": {
                    "_id": "$postings.account",
                    "sum": {"$sum": {"$toDecimal": "$postings.amount"}},
                }
            },
            {"$match": {"sum": {"$ne": 0}}},
            {"$sort": {"_id": 1}},
            *([{"$limit": limit}] if limit else []),
        ]
        return {
            row["_id"]: int(row["sum"].to_decimal())
            async for row in await self.transactions.aggregate(pipeline, session=session)
        }

    async def balances_as_of(self, fund_id: str, match: Document) -> tuple[int, dict[str, int]]:
        """Balances summed from the transactions matching `match` (a time or sequence bound),
        with the last sequence included."""
        pipeline: list[dict[str, Any]] = [
            {"$match": {"fund_id": fund_id, **match}},
            {"$unwind": "$postings"},
            {
                "$group": {
                    "_id": "$postings.account",
                    "balance": {"$sum": "$postings.amount"},
                    "sequence": {"$max": "$sequence"},
                }
            },
        ]
        sequence, balances = 0, {}
        async for row in await self.transactions.aggregate(pipeline):
            balances[row["_id"]] = row["balance"]
            sequence = max(sequence, row["sequence"])
        return sequence, balances

    # ---- campaigns and households ------------------------------------------------------------

    async def campaign(
        self,
        fund_id: str,
        campaign_id: str,
        session: Session | None = None,
        *,
        with_dues: bool = True,
    ) -> Document | None:
        """The campaign; `with_dues=False` leaves out its list of dues (up to 20,000)."""
        return await self.campaigns.find_one(
            {"_id": campaign_id, "fund_id": fund_id},
            None if with_dues else {"dues": 0},
            session=session,
        )

    async def campaign_names(self, fund_id: str, campaign_ids: Iterable[str]) -> dict[str, str]:
        return {
            doc["_id"]: doc["name"]
            async for doc in self.campaigns.find(
                {"_id": {"$in": list(campaign_ids)}, "fund_id": fund_id}, {"name": 1}
            )
        }

    async def insert_campaign(self, campaign: Document, session: Session) -> None:
        await self.campaigns.insert_one(campaign, session=session)
        if dues := household_dues(campaign):
            await self.dues.insert_many(dues, session=session)

    async def due(self, fund_id: str, campaign_id: str, household_id: str) -> Document | None:
        """The household's due in the campaign, if the campaign lists it."""
        return await self.dues.find_one(
            {"_id": _due_id(campaign_id, household_id), "fund_id": fund_id}
        )

    async def dues_of(
        self, fund_id: str, household_id: str, session: Session | None = None
    ) -> list[Document]:
        """The household's due in each campaign of the fund that lists it, in campaign order."""
        return (
            await self.dues.find(
                {"household_id": household_id, "fund_id": fund_id}, session=session
            )
            .sort("campaign_id", ASCENDING)
            .to_list()
        )

    async def campaign_dues(
        self, fund_id: str, campaign_id: str, after: str, limit: int, session: Session
    ) -> list[Document]:
        """Up to `limit` of the campaign's dues, in household order, after household `after`
        (from the first if empty): one document each, not the campaign's list of thousands."""
        query: Document = {"campaign_id": campaign_id, "fund_id": fund_id}
        if after:
            query["household_id"] = {"$gt": after}
        return (
            await self.dues.find(query, session=session)
            .sort("household_id", ASCENDING)
            .hint(DUES_OF_CAMPAIGN)
            .limit(limit)
            .to_list()
        )

    async def dues_standing(
        self,
        fund_id: str,
        campaign_id: str,
        through: int,
        session: Session,
        households: list[str],
    ) -> dict[str, domain.DueStanding]:
        """What each of these households of the campaign had paid towards its due, and still
        owed, after the fund's transaction `through`, read in `session`, a snapshot."""
        return {
            row["_id"]: domain.DueStanding(
                int(row["paid"].to_decimal()), int(row["outstanding"].to_decimal())
            )
            async for row in await self.dues.aggregate(
                self._standing(fund_id, campaign_id, through, households), session=session
            )
        }

    async def campaign_totals(
        self, fund_id: str, campaign_id: str, through: int, session: Session
    ) -> domain.CampaignTotals:
        """The campaign's households counted by payment status (domain.payment_status), and
        what they had paid and still owed together, after the fund's transaction `through`,
        read in `session`, a snapshot. MongoDB counts and sums them: one row comes back, not
        one per household."""
        exempt = {"$ne": ["$exempt_because", 0]}
        settled = {"$lte": ["$outstanding", 0]}
        paid = {"$and": [{"$not": [exempt]}, settled, {"$gte": ["$paid", "$due"]}]}
        unpaid = {"$and": [{"$not": [exempt]}, {"$not": [settled]}]}
        pipeline = [
            *self._standing(fund_id, campaign_id, through),
            {
                "$group": {
                    "_id": None,
                    "paid": {"$sum": {"$cond": [paid, 1, 0]}},
                    "unpaid": {"$sum": {"$cond": [unpaid, 1, 0]}},
                    "collected": {"$sum": "$paid"},
                    "outstanding": {"$sum": "$outstanding"},
                }
            },
        ]
        async for row in await self.dues.aggregate(pipeline, session=session):
            return domain.CampaignTotals(
                paid=row["paid"],
                unpaid=row["unpaid"],
                collected=int(row["collected"].to_decimal()),
                outstanding=int(row["outstanding"].to_decimal()),
            )
        return domain.CampaignTotals()

    def _standing(
        self, fund_id: str, campaign_id: str, through: int, households: list[str] | None = None
    ) -> list[Document]:
        """A pipeline on the dues of the campaign (of these households, all if None): one row
        per household it lists, with its due, exemption, what it had paid (its contributions
        up to `through` not reversed by then, as domain.paid_towards_dues sums them) and what
        it still owed (its receivable less what was posted after `through`). Decimal sums:
        in any order they never pass what int64 holds midway."""
        prefix = domain.receivable(campaign_id, "")
        receivables: Document = {"$regex": "^" + re.escape(prefix)}
        dues: Document = {"campaign_id": campaign_id, "fund_id": fund_id}
        paying: Document = {"fund_id": fund_id, "contribution.campaign_id": campaign_id}
        if households is not None:
            receivables = {"$in": [prefix + household for household in households]}
            dues["household_id"] = {"$in": households}
            paying["contribution.household_id"] = {"$in": households}
        household = {"$substrCP": ["$account", len(prefix), domain.MAX_ACCOUNT]}
        zero = {"$toDecimal": 0}
        return [
            {"$match": dues},
            {
                "$project": {
                    "_id": "$household_id",
                    "listed": {"$literal": True},
                    "due": "$amount",
                    "exempt_because": "$exempt_because",
                    "paid": zero,
                    "outstanding": zero,
                }
            },
            {
                "$unionWith": {
                    "coll": self.balances.name,
                    "pipeline": [
                        {"$match": {"fund_id": fund_id, "account": receivables}},
                        {
                            "$project": {
                                "_id": household,
                                "outstanding": {"$toDecimal": "$balance"},
                            }
                        },
                    ],
                }
            },
            {
                # Posted after the moment read: taken off the receivables as they stand now.
                "$unionWith": {
                    "coll": self.transactions.name,
                    "pipeline": [
                        {"$match": {"fund_id": fund_id, "sequence": {"$gt": through}}},
                        {"$unwind": "$postings"},
                        {"$replaceWith": "$postings"},
                        {"$match": {"account": receivables}},
                        {
                            "$project": {
                                "_id": household,
                                "outstanding": {"$toDecimal": {"$subtract": [0, "$amount"]}},
                            }
                        },
                    ],
                }
            },
            {
                "$unionWith": {
                    "coll": self.transactions.name,
                    "pipeline": [
                        {"$match": paying | {"sequence": {"$lte": through}}},
                        {
                            "$lookup": {
                                "from": self.transactions.name,
                                "localField": "_id",
                                "foreignField": "reverses",
                                "pipeline": [
                                    {"$match": {"fund_id": fund_id, "sequence": {"$lte": through}}},
                                    {"$project": {"_id": 1}},
                                ],
                                "as": "reversed_by",
                            }
                        },
                        {"$match": {"reversed_by": []}},
                        {"$unwind": "$postings"},
                        {
                            "$match": {
                                "$expr": {
                                    "$eq": [
                                        "$postings.account",
                                        {"$concat": [prefix, "$contribution.household_id"]},
                                    ]
                                }
                            }
                        },
                        {
                            "$project": {
                                "_id": "$contribution.household_id",
                                "paid": {"$toDecimal": {"$subtract": [0, "$postings.amount"]}},
                            }
                        },
                    ],
                }
            },
            {
                "$group": {
                    "_id": "$_id",
                    "listed": {"$max": "$listed"},
                    "due": {"$max": "$due"},
                    "exempt_because": {"$max": "$exempt_because"},
                    "paid": {"$sum": "$paid"},
                    "outstanding": {"$sum": "$outstanding"},
                }
            },
            # A receivable the campaign does not list (posted by hand) counts for no household.
            {"$match": {"listed": True}},
        ]

    async def remember_households(self, households: list[Document]) -> None:
        if households:
            await self.households.bulk_write(
                [UpdateOne({"_id": h["_id"]}, {"$set": h}, upsert=True) for h in households],
                ordered=False,
            )

    async def move_households(self, moves: list[Move], session: Session) -> None:
        """Each move, in order, of a household the ledger has learned. A move from a unit the
        household is not in changes nothing: an old event, arriving after a newer read of the
        register (or, for a merge, after the household's own event of it)."""
        if moves:
            await self.households.bulk_write(
                [
                    UpdateOne({"_id": household_id, "unit_id": old}, {"$set": {"unit_id": new}})
                    for household_id, old, new in moves
                ],
                ordered=True,
                session=session,
            )

    async def record_merges(self, merges: list[tuple[str, str]], session: Session) -> None:
        """Each (merged-away group, group it went into); a merge is never undone."""
        if merges:
            await self.merged_groups.bulk_write(
                [
                    UpdateOne({"_id": source}, {"$setOnInsert": {"into": target}}, upsert=True)
                    for source, target in merges
                ],
                ordered=False,
                session=session,
            )

    async def merged_into_it(self, unit_id: str) -> list[str]:
        """The groups merged into `unit_id`, and those merged into them in turn, as far as the
        ledger has heard of the merges: the group keeps their funds."""
        found: list[str] = []
        into = [unit_id]
        while into:
            into = [
                doc["_id"]
                async for doc in self.merged_groups.find({"into": {"$in": into}}, {"_id": 1})
                if doc["_id"] not in found and doc["_id"] != unit_id
            ]
            found += into
        return found

    async def merged_into(self, unit_id: str) -> str | None:
        """The group `unit_id` was merged into, if the ledger has heard of the merge."""
        found = await self.merged_groups.find_one({"_id": unit_id})
        return None if found is None else str(found["into"])

    async def household_names(self, household_ids: Iterable[str]) -> dict[str, str]:
        ids = list(set(household_ids))
        if not ids:
            return {}
        return {
            doc["_id"]: doc["name"]
            async for doc in self.households.find({"_id": {"$in": ids}}, {"name": 1})
        }

    async def household(self, household_id: str) -> Document | None:
        return await self.households.find_one({"_id": household_id})


def accounts_after(account: str, prefix: str) -> Document:
    """The condition on account names of a page of balances: after `account` (none for a first
    page), beginning with `prefix` (any if empty), read on the (fund_id, account) index."""
    condition: Document = {"$gt": account} if account else {}
    if prefix:
        condition["$regex"] = "^" + re.escape(prefix)
    return condition


def _balance_id(fund_id: str, account: str) -> str:
    return f"{fund_id}|{account}"


def _due_id(campaign_id: str, household_id: str) -> str:
    return f"{campaign_id}|{household_id}"


def household_dues(campaign: Document) -> list[Document]:
    """The campaign's dues, one document each, with what a household's read shows of the
    campaign (which never changes once declared)."""
    return [
        {
            "_id": _due_id(campaign["_id"], due["household_id"]),
            "fund_id": campaign["fund_id"],
            "campaign_id": campaign["_id"],
            "campaign_name": campaign["name"],
            "period": campaign["period"],
            **due,
        }
        for due in campaign["dues"]
    ]

"""Keyset pagination: a page token is the last id of the previous page (or, for a listing of a
unit's subtree, its unit and id, the moment its first page read the database at and, where the
listing's rules read the clock, the clock then)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from bson.timestamp import Timestamp
from google.protobuf.message import Message
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

from services.common.auth import CLOCK_SKEW_SECONDS
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.mongo import (
    INVALID_OPTIONS,
    SNAPSHOT_TOO_OLD,
    SNAPSHOT_UNAVAILABLE,
    Snapshot,
)
from services.common.wire import EPOCH, MICROSECOND

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# What one page's items may take together: a gRPC client's default limit on a message it
# receives (4 MiB), less room for the rest of the answer.
MAX_PAGE_BYTES = 4 * 1024 * 1024 - 64 * 1024

T = TypeVar("T")


def page_size(
    requested: int, *, maximum: int = MAX_PAGE_SIZE, default: int = DEFAULT_PAGE_SIZE
) -> int:
    if requested < 0 or requested > maximum:
        raise InvalidArgument("page.page_size", f"must be between 0 and {maximum}")
    return requested or default


def after_token(query: dict[str, Any], token: str) -> dict[str, Any]:
    """The query narrowed to ids after the token."""
    return {"$and": [query, {"_id": {"$gt": token}}]} if token else query


def next_token(items: list[dict[str, Any]], size: int) -> str:
    return str(items[-1]["_id"]) if len(items) == size else ""


class PageWithin(Generic[T]):
    """A page's items, in order, while they fit in `limit` bytes together: a listing whose
    items vary in size ends a page early, before its answer passes what a client takes, rather
    than failing. The first item always fits: each listing bounds its items well below that."""

    def __init__(self, limit: int = MAX_PAGE_BYTES) -> None:
        self.items: list[T] = []
        self.limit = limit
        self._bytes = 0

    def add(self, item: T, size: int) -> bool:
        """The item added, if the page has room for its `size` bytes; False, the page being
        full, if not (the next page begins with it)."""
        if self.items and self._bytes + size > self.limit:
            return False
        self.items.append(item)
        self._bytes += size
        return True


def message_bytes(message: Message) -> int:
    """A message's size as an item of a repeated field of its answer: its own bytes, its field's
    tag (one or two bytes) and its length (a varint)."""
    size = message.ByteSize()
    return size + 2 + max(1, -(-size.bit_length() // 7))


UNIT_ORDER = [("unit_id", ASCENDING), ("_id", ASCENDING)]
NOT_OURS = "is not a token this listing gave"
# How far the clock of the instance that gave a token may run ahead of the one that reads it:
# the next page may be asked of another instance, whose clock is a little behind.
CLOCK_SKEW = timedelta(seconds=CLOCK_SKEW_SECONDS)


class UnitListing:
    """A listing of a unit's subtree in (unit, id) order, as its page token says it was at its
    first page: the unit and id the last page ended at (`position`), the moment the first page
    read the database at (`snapshot`, fixed by the first read if no token gave it) and, for a
    listing whose rules read the clock, the clock then (`now`): a page that worked out which
    documents are listed from the database or the clock as they are when it is asked for
    would list a document that moved between two pages twice or never, or list what the
    first page did not.

    Tokens: `unit|id|seconds.increment`, and `|microseconds since 1970` where the clock is
    carried; no unit id or record id holds a `|` (unit codes are letters, digits and '-', record
    ids generated). One given before pages were read at their first page's moment (`unit|id`), or
    before the clock was carried, goes on from the database, or the clock, as it is now, and
    the pages after it as that one."""

    def __init__(self, token: str, now: datetime | None = None) -> None:
        """`now`: the clock as it is, for a listing whose rules read it; None for one whose
        rules do not (its tokens carry no clock)."""
        self.snapshot = Snapshot()
        self.position: tuple[str, str] | None = None
        self.now = now
        carried_clock = False
        if token:
            self.position, carried = _read_token(token, self.snapshot, clocked=now is not None)
            if carried is not None:
                carried_clock = True
                # A clock not yet reached, here or on any instance, is none we gave.
                if now is not None and carried > now + CLOCK_SKEW:
                    raise InvalidArgument("page.page_token", NOT_OURS)
                self.now = carried
        self._at_the_tokens_moment = self.snapshot.at is not None
        # Whether the listing reads exactly as the page before it did (its moment, its clock):
        # then the document that page ended at is there again, and a token is known ours.
        self.as_the_page_before = self._at_the_tokens_moment and (now is None or carried_clock)

    async def find(
        self,
        collection: AsyncCollection[dict[str, Any]],
        query: dict[str, Any],
        *,
        sort: dict[str, Any] | None = None,
        limit: int = 0,
    ) -> list[dict[str, Any]]:
        """A read of the database as the listing's first page read it."""
        with self._as_the_tokens_failure():
            return await self.snapshot.find(collection, query, sort=sort, limit=limit)

    async def aggregate(
        self, collection: AsyncCollection[dict[str, Any]], pipeline: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """An aggregation over the database as the listing's first page read it."""
        with self._as_the_tokens_failure():
            return await self.snapshot.aggregate(collection, pipeline)

    def token_after(self, last_one: dict[str, Any]) -> str:
        return self.token_at((str(last_one["unit_id"]), str(last_one["_id"])))

    def token_at(self, position: tuple[str, str]) -> str:
        """The token of the page after `position`: the unit and id the page ended at or, for a
        listing of the subtree in an order of its own, the two texts that say where it ended
        (neither empty nor holding a `|`)."""
        assert self.snapshot.at is not None  # set by the first read, if the token did not
        moment = self.snapshot.at
        token = f"{position[0]}|{position[1]}|{moment.time}.{moment.inc}"
        if self.now is None:
            return token
        return f"{token}|{(self.now - EPOCH) // MICROSECOND}"

    @contextlib.contextmanager
    def _as_the_tokens_failure(self) -> Iterator[None]:
        """The failures of reads at a token's moment that the token caused, as the caller's."""
        try:
            yield
        except OperationFailure as error:
            if not self._at_the_tokens_moment:
                raise
            if error.code in (SNAPSHOT_TOO_OLD, SNAPSHOT_UNAVAILABLE):
                raise FailedPrecondition(
                    "page.page_token: the data as it was at the listing's first page is no "
                    "longer kept (about 5 minutes on); start the listing again from the first page"
                ) from None
            if error.code == INVALID_OPTIONS:  # a moment still to come, or none
                raise InvalidArgument("page.page_token", NOT_OURS) from None
            raise


class ClockedListing(UnitListing):
    """A listing whose rules read the clock: `now` is the clock at its first page."""

    now: datetime

    def __init__(self, token: str, now: datetime) -> None:
        super().__init__(token, now)


async def unit_ordered_page(
    collection: AsyncCollection[dict[str, Any]],
    query: dict[str, Any],
    listing: UnitListing,
    size: int,
    then: Sequence[dict[str, Any]] = (),
) -> tuple[list[dict[str, Any]], str]:
    """One page of what `query` finds in a unit's subtree, in (unit, id) order: the order of the
    (unit_id, _id) index, so a page is read from where the last one ended instead of the whole
    subtree being sorted by id for every page (a prefix match on the unit is a range, after
    which the index is not in id order). `then`: aggregation stages that keep or drop each
    document found, in that order, before the page is counted (a `$lookup` and a `$match`).

    Every page reads the database as the listing's first page did (`listing`'s snapshot, which
    the caller's other reads for the page share): a document that moves to another unit
    between two pages, in a merge of groups, would otherwise cross where the listing is and
    be listed twice or never."""

    async def read(found_by: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        if not then:
            return await listing.find(collection, found_by, sort=dict(UNIT_ORDER), limit=limit)
        pipeline = [{"$match": found_by}, {"$sort": dict(UNIT_ORDER)}, *then, {"$limit": limit}]
        return await listing.aggregate(collection, pipeline)

    found: list[dict[str, Any]] = []
    following = query
    if listing.position:
        unit, last = listing.position
        if listing.as_the_page_before:
            # Read from the document the last page ended at: it is there, as that page found
            # it, unless the token came from another unit's listing, another listing, or was
            # altered, which would otherwise page on from wherever it points, or end at once.
            found = await read(
                {"$and": [query, {"unit_id": unit, "_id": {"$gte": last}}]}, size + 1
            )
            if not found or str(found[0]["_id"]) != last:
                raise InvalidArgument("page.page_token", NOT_OURS)
            found = found[1:]
        else:
            found = await read({"$and": [query, {"unit_id": unit, "_id": {"$gt": last}}]}, size)
        following = {"$and": [query, {"unit_id": {"$gt": unit}}]}
    if len(found) < size:
        found += await read(following, size - len(found))
    return found, listing.token_after(found[-1]) if len(found) == size else ""


def _read_token(
    token: str, snapshot: Snapshot, *, clocked: bool
) -> tuple[tuple[str, str], datetime | None]:
    """The unit and id a token names, and the clock it carries if any; `snapshot` set to its
    moment. Only a listing that reads the clock gave tokens that carry one."""
    try:
        unit, last, *moments = token.split("|")
        if not unit or not last or len(moments) > (2 if clocked else 1):
            raise ValueError(token)
        if moments:
            seconds, increment = (int(part) for part in moments[0].split("."))
            snapshot.at = Timestamp(seconds, increment)  # a ValueError out of range too
        now = EPOCH + int(moments[1]) * MICROSECOND if len(moments) == 2 else None
    except (ValueError, OverflowError):
        raise InvalidArgument("page.page_token", NOT_OURS) from None
    return (unit, last), now

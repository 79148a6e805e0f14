"""Keyset pagination: a page token is the last id of the previous page (or, for a listing of a
unit's subtree, its unit and id, and the moment its first page read the database at)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from bson.timestamp import Timestamp
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import OperationFailure

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.mongo import (
    INVALID_OPTIONS,
    SNAPSHOT_TOO_OLD,
    SNAPSHOT_UNAVAILABLE,
    Snapshot,
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


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


UNIT_ORDER = [("unit_id", ASCENDING), ("_id", ASCENDING)]


async def unit_ordered_page(
    collection: AsyncCollection[dict[str, Any]],
    query: dict[str, Any],
    token: str,
    size: int,
    then: Sequence[dict[str, Any]] = (),
    snapshot: Snapshot | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """One page of what `query` finds in a unit's subtree, in (unit, id) order: the order of the
    (unit_id, _id) index, so a page is read from where the last one ended instead of the whole
    subtree being sorted by id for every page (a prefix match on the unit is a range, after
    which the index is not in id order). `then`: aggregation stages that keep or drop each
    document found, in that order, before the page is counted (a `$lookup` and a `$match`).

    Every page reads the database as the listing's first page did (the token carries that
    moment; `snapshot`, if given, is set to it for the caller's other reads for the page): a
    document that moves to another unit between two pages, in a merge of groups, would
    otherwise cross where the listing is and be listed twice or never."""
    if snapshot is None:
        snapshot = Snapshot()

    async def read(found_by: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        if not then:
            return await snapshot.find(collection, found_by, sort=dict(UNIT_ORDER), limit=limit)
        pipeline = [{"$match": found_by}, {"$sort": dict(UNIT_ORDER)}, *then, {"$limit": limit}]
        return await snapshot.aggregate(collection, pipeline)

    found: list[dict[str, Any]] = []
    following = query
    position = _position(token, snapshot) if token else None
    with _at_the_tokens_moment(snapshot):
        if position:
            unit, last = position
            found = await read({"$and": [query, {"unit_id": unit, "_id": {"$gt": last}}]}, size)
            following = {"$and": [query, {"unit_id": {"$gt": unit}}]}
        if len(found) < size:
            found += await read(following, size - len(found))
    last_one = found[-1] if len(found) == size else None
    if last_one is None:
        return found, ""
    assert snapshot.at is not None  # set by the first read, if the token did not
    return found, f"{last_one['unit_id']}|{last_one['_id']}|{snapshot.at.time}.{snapshot.at.inc}"


NOT_OURS = "is not a token this listing gave"


def _position(token: str, snapshot: Snapshot) -> tuple[str, str]:
    """The unit and id a token names; `snapshot` set to its moment. A token given before pages
    were read at their first page's moment has none: the listing goes on from the database as
    it is now, and the pages after it as that one."""
    try:
        unit, last, *moment = token.split("|")
        if not unit or not last or len(moment) > 1:
            raise ValueError(token)
        if moment:
            seconds, increment = (int(part) for part in moment[0].split("."))
            snapshot.at = Timestamp(seconds, increment)  # a ValueError out of range too
    except ValueError:
        raise InvalidArgument("page.page_token", NOT_OURS) from None
    return unit, last


@contextlib.contextmanager
def _at_the_tokens_moment(snapshot: Snapshot) -> Iterator[None]:
    """The failures of reads at a token's moment that the token caused, as the caller's."""
    given = snapshot.at is not None
    try:
        yield
    except OperationFailure as error:
        if not given:
            raise
        if error.code in (SNAPSHOT_TOO_OLD, SNAPSHOT_UNAVAILABLE):
            raise FailedPrecondition(
                "page.page_token: the data as it was at the listing's first page is no longer "
                "kept (about 5 minutes on); start the listing again from the first page"
            ) from None
        if error.code == INVALID_OPTIONS:  # a moment still to come, or none
            raise InvalidArgument("page.page_token", NOT_OURS) from None
        raise

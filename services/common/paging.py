"""Keyset pagination: a page token is the last id of the previous page (or, for a listing of a
unit's subtree, its unit and id)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from services.common.errors import InvalidArgument

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
) -> tuple[list[dict[str, Any]], str]:
    """One page of what `query` finds in a unit's subtree, in (unit, id) order: the order of the
    (unit_id, _id) index, so a page is read from where the last one ended instead of the whole
    subtree being sorted by id for every page (a prefix match on the unit is a range, after
    which the index is not in id order). `then`: aggregation stages that keep or drop each
    document found, in that order, before the page is counted (a `$lookup` and a `$match`)."""

    async def read(found_by: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        if not then:
            return await collection.find(found_by).sort(UNIT_ORDER).limit(limit).to_list()
        pipeline = [{"$match": found_by}, {"$sort": dict(UNIT_ORDER)}, *then, {"$limit": limit}]
        return await (await collection.aggregate(pipeline)).to_list()

    found: list[dict[str, Any]] = []
    following = query
    if token:
        unit, _, last = token.partition("|")
        if not unit or not last:
            raise InvalidArgument("page.page_token", "is not a token this listing gave")
        found = await read({"$and": [query, {"unit_id": unit, "_id": {"$gt": last}}]}, size)
        following = {"$and": [query, {"unit_id": {"$gt": unit}}]}
    if len(found) < size:
        found += await read(following, size - len(found))
    last_one = found[-1] if len(found) == size else None
    return found, f"{last_one['unit_id']}|{last_one['_id']}" if last_one else ""

"""Keyset pagination: a page token is the last id of the previous page."""

from __future__ import annotations

from typing import Any

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

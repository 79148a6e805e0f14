"""How often MongoDB used an index: to show that a query is served by the index meant for it
(on a city's data, a query an index does not serve reads the whole collection)."""

from __future__ import annotations

from pymongo.asynchronous.collection import AsyncCollection

from services.common.mongo import Document


async def index_uses(collection: AsyncCollection[Document]) -> dict[str, int]:
    """Each index of the collection and the queries that have used it so far."""
    return {
        stats["name"]: int(stats["accesses"]["ops"])
        async for stats in await collection.aggregate([{"$indexStats": {}}])
    }


async def used_since(collection: AsyncCollection[Document], before: dict[str, int]) -> set[str]:
    """The indexes the collection's queries used since `before` was taken."""
    now = await index_uses(collection)
    return {name for name, uses in now.items() if uses > before.get(name, 0)}

"""How often MongoDB used an index: to show that a query is served by the index meant for it
(on a city's data, a query an index does not serve reads the whole collection); and how much
it examined for a call, to show that a read does not grow with data it does not answer with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

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


@dataclass
class Examined:
    """What MongoDB did for a set of operations, as its profiler (and `explain`) counts it."""

    keys: int = 0
    docs: int = 0
    bytes_returned: int = 0
    operations: int = 0


@asynccontextmanager
async def examined(
    db: AsyncDatabase[Document], *mentioning: str, collection: str = ""
) -> AsyncIterator[Examined]:
    """Profiles the database while inside; then sums, over its operations whose command
    mentions any of `mentioning` (an id the test made: the services' own background work, such
    as the outbox relay, is left out), on `collection` if given, the index keys and documents
    examined and the bytes answered."""
    await db.command("profile", 0)
    await db.drop_collection("system.profile")
    await db.command("profile", 2)
    found = Examined()
    try:
        yield found
    finally:
        await db.command("profile", 0)
    async for entry in db["system.profile"].find():
        if not any(text in str(entry) for text in mentioning):
            continue
        if collection and entry.get("ns") != f"{db.name}.{collection}":
            continue
        found.keys += int(entry.get("keysExamined", 0))
        found.docs += int(entry.get("docsExamined", 0))
        found.bytes_returned += int(entry.get("responseLength", 0))
        found.operations += 1

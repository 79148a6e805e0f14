"""MongoDB through PyMongo's asyncio API; every multi-document change runs in a transaction."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from bson.regex import Regex
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from services.common.errors import InvalidArgument

T = TypeVar("T")
# MongoDB's error codes
INVALID_OPTIONS, INDEX_OPTIONS_CONFLICT, INDEX_KEY_SPECS_CONFLICT = 72, 85, 86
SNAPSHOT_TOO_OLD, SNAPSHOT_UNAVAILABLE = 239, 246
Document = dict[str, Any]
Session = AsyncClientSession


# A unit's id is its path of codes from the city down, e.g. "dn.hc.hc1.g17".
UNIT_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}(\.[a-z0-9][a-z0-9-]{0,31})*")


def check_unit_id(unit_id: str, field: str = "unit_id") -> str:
    """A unit id from a request (`field`), refused unless well formed."""
    if not UNIT_ID.fullmatch(unit_id):
        raise InvalidArgument(field, f"{unit_id[:80]!r} is not a unit id")
    return unit_id


def in_unit(unit_id: str, field: str = "unit_id") -> dict[str, Any]:
    """Matches a unit id field at `unit_id` or below it in the tree. `unit_id` comes from a
    request (`field`): only a well-formed id makes a pattern.

    The unit itself, or a plain prefix pattern without options: MongoDB reads only that
    stretch of a unit index for these. A pattern with an alternation such as `(\\.|$)`, or
    with the `u` option PyMongo gives a compiled `re` pattern, makes it read the whole index."""
    return in_any_unit([unit_id], field)


def in_any_unit(unit_ids: list[str], field: str = "unit_id") -> dict[str, Any]:
    """Matches a unit id field at or below any of `unit_ids` (as `in_unit`), in one `$in`: an
    `$or` of subtrees would leave the query planner to weigh every index for each."""
    matches: list[Any] = []
    for unit_id in unit_ids:
        unit_id = check_unit_id(unit_id, field)
        matches += [unit_id, Regex(f"^{re.escape(unit_id)}\\.")]
    return {"$in": matches}


def holding_text(field: str) -> Document:
    """A partial index's filter: documents whose `field` is a non-empty string. Not `$type`: the
    query planner uses a partial index only for queries that imply its filter, and a plain
    equality or `$in` on strings implies `$gt: ""` but never `$type: "string"`."""
    return {field: {"$gt": ""}}


async def ensure_indexes(collection: AsyncCollection[Document], models: list[IndexModel]) -> None:
    """Creates the indexes; one already there under the same name whose partial filter or
    uniqueness changed is dropped and built again (create_indexes alone refuses to change it).
    Instances starting together may race to do so: whichever is second finds the work done."""
    existing = await collection.index_information()
    for model in models:
        wanted = model.document
        found = existing.get(wanted["name"])
        if found is not None and (
            found.get("partialFilterExpression") != wanted.get("partialFilterExpression")
            or bool(found.get("unique")) != bool(wanted.get("unique"))
        ):
            with contextlib.suppress(OperationFailure):  # dropped by another instance already
                await collection.drop_index(wanted["name"])
    try:
        await collection.create_indexes(models)
    except OperationFailure as error:
        if error.code not in (INDEX_OPTIONS_CONFLICT, INDEX_KEY_SPECS_CONFLICT):
            raise
        await collection.create_indexes(models)  # another instance built one meanwhile


MIGRATIONS = "migrations"  # one document for each change of stored data done


async def once(
    db: AsyncDatabase[Document], name: str, change: Callable[[], Awaitable[None]]
) -> None:
    """A change of stored data, done at a start until it is recorded done: a start of every
    instance need not read everything again. `change` must be safe to run again (instances
    starting together, or a start after a crash halfway)."""
    migrations = db[MIGRATIONS]
    if await migrations.find_one({"_id": name}):
        return
    await change()
    await migrations.update_one({"_id": name}, {"$set": {"at": datetime.now(UTC)}}, upsert=True)


def mongo_client(uri: str) -> AsyncMongoClient[Document]:
    return AsyncMongoClient(uri, tz_aware=True, uuidRepresentation="standard")


async def in_transaction(
    client: AsyncMongoClient[Document], work: Callable[[Session], Awaitable[T]]
) -> T:
    """Run `work` in one transaction, retried by the driver on transient errors."""
    async with client.start_session() as session:
        return await session.with_transaction(
            work,
            read_concern=ReadConcern("snapshot"),
            write_concern=WriteConcern("majority"),
        )


class Snapshot:
    """Reads of the database as it was at one moment, `at`, which outlives a request: the first
    read fixes it (the latest majority-committed moment) unless it was given, and a later
    request that gives it back reads as that one did. MongoDB keeps a moment's data for
    minSnapshotHistoryWindowInSeconds (300 s by default): a read at an older one fails with
    SNAPSHOT_TOO_OLD (or SNAPSHOT_UNAVAILABLE where a collection or index changed since), and
    one at a moment still to come with INVALID_OPTIONS."""

    def __init__(self, at: Timestamp | None = None) -> None:
        self.at = at

    async def find(
        self,
        collection: AsyncCollection[Document],
        query: Document,
        *,
        sort: Document | None = None,
        limit: int = 0,
    ) -> list[Document]:
        command: Document = {"find": collection.name, "filter": query}
        if sort:
            command["sort"] = sort
        if limit:
            command |= {"limit": limit, "batchSize": limit}
        return await self._read(collection, command)

    async def aggregate(
        self, collection: AsyncCollection[Document], pipeline: list[Document]
    ) -> list[Document]:
        return await self._read(
            collection, {"aggregate": collection.name, "pipeline": pipeline, "cursor": {}}
        )

    async def _read(
        self, collection: AsyncCollection[Document], command: Document
    ) -> list[Document]:
        # PyMongo's sessions take no moment to read at (a snapshot session learns its own from
        # its first read): a later request states it in the command's read concern.
        database, codecs = collection.database, collection.codec_options
        if self.at is not None:
            read_concern = {"level": "snapshot", "atClusterTime": self.at}
            cursor = await database.cursor_command(
                command | {"readConcern": read_concern}, codec_options=codecs
            )
            return await cursor.to_list()
        async with database.client.start_session(snapshot=True) as session:
            cursor = await database.cursor_command(command, codec_options=codecs, session=session)
            # A snapshot read's operation time is the moment it read at: the command's, before
            # a getMore for the rest of the cursor answers with one of its own.
            self.at = session.operation_time
            return await cursor.to_list()

"""Queries every service builds the same way, on the real MongoDB."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from services.common.config import Settings
from services.common.mongo import Document, in_unit, mongo_client

SUBTREE = ["dn.hc", "dn.hc.hc1", "dn.hc.hc1.t17", "dn.hc.hc2"]
AROUND = ["dn.hc-2", "dn.hc2.x", "dn.hcx", "dn"]  # next to it in the index, not in it


@pytest.fixture
async def households(settings: Settings) -> AsyncIterator[AsyncCollection[Document]]:
    """Ten households in each unit, indexed by (unit_id, _id) as the services index them."""
    client = mongo_client(settings.mongo_uri)
    collection = client[settings.database_for("common")][f"households_{uuid.uuid4().hex[:8]}"]
    await collection.create_index([("unit_id", ASCENDING), ("_id", ASCENDING)])
    await collection.insert_many(
        [{"_id": f"{unit}/{i}", "unit_id": unit} for unit in SUBTREE + AROUND for i in range(10)]
    )
    yield collection
    await collection.drop()
    await client.close()


async def test_a_unit_subtree_is_found_by_reading_only_its_part_of_the_unit_index(
    households: AsyncCollection[Document],
) -> None:
    query: Document = {"unit_id": in_unit("dn.hc")}
    found = await households.find(query).to_list()
    assert sorted({doc["unit_id"] for doc in found}) == SUBTREE
    assert len(found) == 40
    explained = await households.database.command(
        "explain",
        {"find": households.name, "filter": query, "sort": {"unit_id": 1, "_id": 1}},
        verbosity="executionStats",
    )
    stats = explained["executionStats"]
    # The subtree's 40 keys and one past each of its two stretches, not all 80.
    assert stats["totalKeysExamined"] <= 42, stats["totalKeysExamined"]
    assert stats["nReturned"] == 40

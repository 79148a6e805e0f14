"""Page tokens: a listing of a unit's subtree goes on from where its last page ended, as its
first page read the database and the clock, and takes no token it did not give."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from bson.timestamp import Timestamp
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection

from services.common.config import Settings
from services.common.errors import InvalidArgument
from services.common.mongo import Document, in_unit, mongo_client
from services.common.paging import ClockedListing, UnitListing, unit_ordered_page

FIRST_PAGE = datetime(2026, 3, 2, 8, 30, tzinfo=UTC)


def token_given_at(clock: datetime) -> str:
    """The token an instance whose clock read `clock` gives after a first page."""
    first = ClockedListing("", clock)
    first.snapshot.at = Timestamp(1_772_440_200, 3)
    return first.token_at(("dn.hc.hc1.g1", "hh-1"))


def test_the_next_page_is_read_on_an_instance_whose_clock_is_a_little_behind() -> None:
    """Behind a load balancer, the next page may go to another instance: its clock a fraction
    of a second behind is no reason to refuse the token, and the listing keeps the first
    page's clock."""
    token = token_given_at(FIRST_PAGE)
    behind = FIRST_PAGE - timedelta(milliseconds=300)
    listing = ClockedListing(token, behind)
    assert listing.now == FIRST_PAGE
    assert listing.position == ("dn.hc.hc1.g1", "hh-1")


def test_a_token_whose_clock_is_yet_to_come_is_refused_naming_it() -> None:
    token = token_given_at(FIRST_PAGE + timedelta(days=1))
    with pytest.raises(InvalidArgument) as refused:
        ClockedListing(token, FIRST_PAGE)
    assert refused.value.field == "page.page_token"


@pytest.fixture
async def households(settings: Settings) -> AsyncIterator[AsyncCollection[Document]]:
    """Three households in each of four groups of two wards."""
    client = mongo_client(settings.mongo_uri)
    collection = client[settings.database_for("common")][f"paged_{uuid.uuid4().hex[:8]}"]
    await collection.create_index([("unit_id", ASCENDING), ("_id", ASCENDING)])
    await collection.insert_many(
        [{"_id": f"hh-{unit}-{i}", "unit_id": unit} for unit in GROUPS for i in range(3)]
    )
    yield collection
    await collection.drop()
    await client.close()


GROUPS = ["dn.hc.hc1.g1", "dn.hc.hc1.g2", "dn.hc.hc2.g1", "dn.hc.hc2.g2"]


async def page(
    households: AsyncCollection[Document], ward: str, token: str, size: int = 2
) -> tuple[list[str], str]:
    found, token = await unit_ordered_page(
        households, {"unit_id": in_unit(ward)}, UnitListing(token), size
    )
    return [doc["_id"] for doc in found], token


async def test_a_ward_is_listed_page_by_page_each_household_once(
    households: AsyncCollection[Document],
) -> None:
    listed, token = await page(households, "dn.hc.hc1", "")
    while token:
        more, token = await page(households, "dn.hc.hc1", token)
        listed += more
    assert listed == [f"hh-{unit}-{i}" for unit in GROUPS[:2] for i in range(3)]


async def test_a_token_of_another_wards_listing_or_altered_is_refused_naming_it(
    households: AsyncCollection[Document],
) -> None:
    """Not paged on from wherever it points: the other ward's list begun again from its start,
    or ended at once as if nothing were left."""
    _, first_ward = await page(households, "dn.hc.hc1", "")
    _, second_ward = await page(households, "dn.hc.hc2", "")
    unit, last, moment = first_ward.split("|")
    for token, ward in [
        (first_ward, "dn.hc.hc2"),
        (second_ward, "dn.hc.hc1"),
        (f"{unit}|hh-{unit}-9|{moment}", "dn.hc.hc1"),
        (f"{unit}|{last}x|{moment}", "dn.hc.hc1"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            await page(households, ward, token)
        assert refused.value.field == "page.page_token", token


async def test_a_token_given_before_pages_were_read_at_a_moment_still_pages_on(
    households: AsyncCollection[Document],
) -> None:
    listed, _ = await page(households, "dn.hc.hc1", "dn.hc.hc1.g1|hh-dn.hc.hc1.g1-1", 3)
    assert listed == ["hh-dn.hc.hc1.g1-2", "hh-dn.hc.hc1.g2-0", "hh-dn.hc.hc1.g2-1"]

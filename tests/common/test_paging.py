"""Page tokens of listings whose rules read the clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from bson.timestamp import Timestamp

from services.common.errors import InvalidArgument
from services.common.paging import ClockedListing

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

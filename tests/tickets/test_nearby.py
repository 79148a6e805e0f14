"""Open tickets near a place: how a resident finds the ticket to "+1" instead of filing the same
problem again, and how an official sees what is reported around a spot."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.tickets.v1 import tickets_pb2

from services.common.auth import Role
from tests.tickets.conftest import HOME, Pilot, TicketCaller, point_near, rid
from tests.tickets.test_routing import replacing, rule, rules_changed


async def nearby(caller: TicketCaller, **fields: Any) -> list[tickets_pb2.NearbyTicket]:
    response = await caller.ListNearbyTickets(tickets_pb2.ListNearbyTicketsRequest(**fields))
    return list(response.tickets)


def ids(found: list[tickets_pb2.NearbyTicket]) -> list[str]:
    return [each.ticket.ticket_id for each in found]


@pytest.fixture
async def other_household(pilot: Pilot) -> TicketCaller:
    """A resident of another household of the same group (its channel made in the loop)."""
    return pilot.caller(Role.RESIDENT, pilot.city.group, "hh-other", "resident-3")


async def test_a_resident_finds_the_open_tickets_near_a_place_nearest_first_and_supports_one(
    pilot: Pilot, other_household: TicketCaller
) -> None:
    light = await pilot.routed(
        (await pilot.submit("street-light", location=point_near(100))).ticket_id
    )
    flood = await pilot.routed((await pilot.submit("flooding", location=point_near(300))).ticket_id)
    far = await pilot.routed(
        (await pilot.submit("street-light", location=point_near(2000))).ticket_id
    )
    # The same light again, 20 m on: linked to the first, so the cluster shows once.
    again = await pilot.routed(
        (await pilot.submit("street-light", location=point_near(120))).ticket_id
    )
    assert again.duplicate_of == light.ticket_id
    # Withdrawn: no longer open.
    gone = await pilot.routed((await pilot.submit("flooding", location=point_near(200))).ticket_id)
    await pilot.resident.WithdrawTicket(
        tickets_pb2.WithdrawTicketRequest(request_id=rid(), ticket_id=gone.ticket_id)
    )

    found = await nearby(other_household, location=HOME, radius_m=500)

    assert ids(found) == [light.ticket_id, flood.ticket_id]
    assert far.ticket_id not in ids(found)
    assert [round(each.distance_m) for each in found] == [100, 300]
    # Shown as a "+1" shows it: what and where, not what another household wrote or who.
    shown = found[0].ticket
    assert (shown.category, shown.status) == ("street-light", light.status)
    assert (shown.description, shown.submitter, shown.household_id) == ("", "", "")
    assert shown.location.latitude == pytest.approx(point_near(100).latitude)

    supported = await other_household.SupportTicket(
        tickets_pb2.SupportTicketRequest(request_id=rid(), ticket_id=shown.ticket_id)
    )
    assert supported.ticket.supporters == 1
    (after,) = await nearby(other_household, location=HOME, radius_m=150)
    assert after.ticket.supporters == 1

    # Narrowed to one category, or to the nearest one.
    assert ids(await nearby(other_household, location=HOME, radius_m=500, category="flooding")) == [
        flood.ticket_id
    ]
    assert ids(await nearby(other_household, location=HOME, radius_m=500, limit=1)) == [
        light.ticket_id
    ]
    # By default, within the distance duplicates are linked within (150 m here).
    assert ids(await nearby(other_household, location=HOME)) == [light.ticket_id]


async def test_a_ticket_filed_at_a_households_door_is_listed_only_to_that_household(
    pilot: Pilot, other_household: TicketCaller
) -> None:
    """Listed near a point, it would tell other households where its submitter lives."""
    at_home = await pilot.routed((await pilot.submit("flooding")).ticket_id)
    assert at_home.location.latitude == pytest.approx(HOME.latitude)  # its household's place

    assert at_home.ticket_id not in ids(await nearby(other_household, location=HOME))
    # Its household's other resident, asking around home (no point given: their household's).
    mine = await nearby(pilot.neighbour)
    assert ids(mine) == [at_home.ticket_id]
    assert mine[0].distance_m == pytest.approx(0, abs=1)
    # Nor is it listed to an integrator or an auditor, who are not shown where it is.
    for role in (Role.INTEGRATOR, Role.AUDITOR):
        outsider = pilot.caller(role, pilot.city.ward)
        assert at_home.ticket_id not in ids(await nearby(outsider, location=HOME, radius_m=5000))
    # An official in scope sees it, and who filed it.
    (seen,) = await nearby(pilot.ward_officer, location=HOME)
    assert (seen.ticket.ticket_id, seen.ticket.submitter) == (at_home.ticket_id, "resident-1")


async def test_nearby_tickets_stay_within_the_callers_scope(pilot: Pilot) -> None:
    here = await pilot.routed(
        (await pilot.submit("street-light", location=point_near(10))).ticket_id
    )
    elsewhere = pilot.caller(Role.RESIDENT, pilot.city.other_group, "hh-elsewhere", "resident-9")
    leader_elsewhere = pilot.caller(Role.GROUP_LEADER, pilot.city.other_group)

    assert await nearby(elsewhere, location=HOME) == []
    assert await nearby(leader_elsewhere, location=HOME) == []
    assert ids(await nearby(pilot.leader, location=HOME)) == [here.ticket_id]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"location": HOME, "radius_m": -1}, "radius_m"),
        ({"location": HOME, "radius_m": 5_001}, "radius_m"),
        ({"location": HOME, "limit": -1}, "limit"),
        ({"location": HOME, "limit": 101}, "limit"),
        ({"location": HOME, "category": "no-such-thing"}, "category"),
        ({"location": types_pb2.GeoPoint(latitude=91, longitude=108)}, "location"),
        ({}, "location"),  # an official has no household to be answered around
    ],
)
async def test_a_bad_nearby_question_is_refused_naming_the_field(
    pilot: Pilot, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nearby(pilot.ward_officer, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def test_a_resident_whose_household_has_no_place_must_give_one(pilot: Pilot) -> None:
    homeless = pilot.caller(Role.RESIDENT, pilot.city.group, "hh-not-on-the-map", "resident-7")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nearby(homeless)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "location" in (caught.value.details() or "")


async def test_a_role_that_sees_no_tickets_lists_none_nearby(pilot: Pilot) -> None:
    treasurer = pilot.caller(Role.TREASURER, pilot.city.group)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nearby(treasurer, location=HOME)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_tickets_of_a_category_withdrawn_from_the_rules_are_still_found_by_it(
    pilot: Pilot, other_household: TicketCaller
) -> None:
    """A category taken out of the rules takes no new tickets, but those filed before stay open
    where they are: a resident asking for them by their category is shown them to "+1"."""
    stray = rule("test-stray-dogs", tickets_pb2.LEVEL_WARD, "urban-order", 24)
    async with rules_changed(pilot.admin, replacing([stray])):
        filed = await pilot.submit("test-stray-dogs", location=point_near(50))
        await pilot.routed(filed.ticket_id)
    assert ids(await nearby(other_household, location=HOME, category="test-stray-dogs")) == [
        filed.ticket_id
    ]
    # One no open ticket has in scope is still refused, as one never in the rules is.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nearby(
            pilot.caller(Role.RESIDENT, pilot.city.other_group, "hh-far", "resident-8"),
            location=HOME,
            category="test-stray-dogs",
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

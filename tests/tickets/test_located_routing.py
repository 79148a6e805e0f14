"""A ticket that reports a place goes to the group whose boundary holds the place (the GIS
service's LocateUnit), not to the group of the submitter's household: a resident reports the
neighbouring group's broken street light or flooded alley to the leader with authority there,
and still finds the ticket among their own. With no group's boundary at the place, or GIS out
of reach, it goes where it went without a place."""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2
from civic.registry.v1 import registry_pb2
from civic.tickets.v1 import tickets_pb2

from services.common.auth import Role
from services.gis.main import GisService
from services.tickets.main import TicketsService
from tests.gis.conftest import Ward, polygon_feature
from tests.registry_fixtures import create_unit
from tests.tickets.conftest import Link, Pilot, TicketCaller, eventually, rid

# Each test draws its ward somewhere of its own, away from the other tests' points and maps.
_places = itertools.count()


@pytest.fixture
async def mapped(pilot: Pilot, gis_service: GisService) -> Ward:
    """The pilot's ward on the map, 1,200 m by 800 m: its group the west 500 m, the other group
    the east 500 m, and a street 200 m wide between them that is the ward's alone."""
    city = pilot.city

    async def known() -> bool:
        units = (city.ward, city.group, city.other_group)
        return all([await gis_service.store.unit(unit) for unit in units])

    await eventually(known, within=30)
    index = next(_places)
    centre = (106.40 + 0.02 * (index % 10), 10.60 + 0.02 * (index // 10))
    ward = Ward(city, centre, f"127.0.0.1:{gis_service.port}", gis_service)
    done = await ward.import_features(
        gis_pb2.LAYER_BOUNDARY,
        [
            polygon_feature(ward.box(-600, -400, 600, 400), "ward", unit_id=city.ward),
            polygon_feature(ward.box(-600, -400, -100, 400), "west", unit_id=city.group),
            polygon_feature(ward.box(100, -400, 600, 400), "east", unit_id=city.other_group),
        ],
    )
    assert (done.created, list(done.rejected)) == (3, [])
    return ward


def in_the_other_group(ward: Ward) -> types_pb2.GeoPoint:
    return ward.point(300, 0)


async def queue_of(caller: TicketCaller, unit_id: str) -> set[str]:
    queue = await caller.ListQueue(tickets_pb2.ListQueueRequest(unit_id=unit_id))
    return {ticket.ticket_id for ticket in queue.tickets}


async def own_tickets(caller: TicketCaller) -> set[str]:
    mine = await caller.ListMyTickets(tickets_pb2.ListMyTicketsRequest())
    return {ticket.ticket_id for ticket in mine.tickets}


async def found_by(service: TicketsService, ticket_id: str) -> str:
    stored = await service.store.get(ticket_id)
    assert stored is not None
    return str(stored.get("origin_from"))


async def test_a_report_from_the_neighbouring_group_goes_to_its_leader(
    pilot: Pilot, mapped: Ward, tickets_service: TicketsService
) -> None:
    city = pilot.city
    filed = await pilot.submit("sanitation", location=in_the_other_group(mapped))
    assert filed.origin_unit_id == city.other_group
    assert filed.household_id == pilot.household_id  # the resident's own, as before
    routed = await pilot.routed(filed.ticket_id)
    assert routed.assigned_unit_id == city.other_group
    assert await found_by(tickets_service, filed.ticket_id) == "location"

    other_leader = pilot.caller(Role.GROUP_LEADER, city.other_group)
    assert filed.ticket_id in await queue_of(other_leader, city.other_group)
    assert filed.ticket_id not in await queue_of(pilot.leader, city.group)
    with pytest.raises(grpc.aio.AioRpcError) as unseen:
        await pilot.leader.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=filed.ticket_id))
    assert unseen.value.code() == grpc.StatusCode.NOT_FOUND
    # The resident still has it among their own, and follows it as its submitter.
    assert filed.ticket_id in await own_tickets(pilot.resident)
    seen = await pilot.resident.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=filed.ticket_id))
    assert seen.ticket.description

    # A category the ward handles goes to the ward, from the other group all the same.
    lamp = await pilot.submit("street-light", location=in_the_other_group(mapped))
    assert lamp.origin_unit_id == city.other_group
    assert (await pilot.routed(lamp.ticket_id)).assigned_unit_id == city.ward


async def test_an_official_files_for_a_household_in_scope_about_a_place_beyond_it(
    pilot: Pilot, mapped: Ward, tickets_service: TicketsService
) -> None:
    """Scope is checked on the household or group filed for; the place then routes the ticket
    as a resident's own report would be routed."""
    city = pilot.city
    filed = await pilot.submit(
        "sanitation",
        caller=pilot.leader,
        household_id=pilot.household_id,
        location=in_the_other_group(mapped),
    )
    assert (filed.origin_unit_id, filed.household_id) == (city.other_group, pilot.household_id)
    other_leader = pilot.caller(Role.GROUP_LEADER, city.other_group)
    await pilot.routed(filed.ticket_id, other_leader)
    assert filed.ticket_id in await queue_of(other_leader, city.other_group)
    # The household's residents have it among their own.
    assert filed.ticket_id in await own_tickets(pilot.resident)
    # The leader who filed it sees it no more than any ticket of a group beyond their scope:
    # neither asked for by id nor among the tickets they filed.
    with pytest.raises(grpc.aio.AioRpcError) as unseen:
        await pilot.leader.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=filed.ticket_id))
    assert unseen.value.code() == grpc.StatusCode.NOT_FOUND
    assert filed.ticket_id not in await own_tickets(pilot.leader)
    at_home = await pilot.submit("sanitation", caller=pilot.leader, household_id=pilot.household_id)
    assert at_home.ticket_id in await own_tickets(pilot.leader)

    # A place in the leader's own group does not open another group to them.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await pilot.submit(
            "sanitation",
            caller=pilot.leader,
            unit_id=city.other_group,
            location=mapped.point(-300, 0),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_place_in_no_groups_boundary_goes_where_it_went_without_one(
    pilot: Pilot, mapped: Ward, tickets_service: TicketsService
) -> None:
    city = pilot.city
    # Beyond the ward, and on the street between the groups (the ward's, no group's).
    for place in (mapped.point(2_000, 0), mapped.point(0, 0)):
        filed = await pilot.submit("sanitation", location=place)
        assert filed.origin_unit_id == city.group
        assert (await pilot.routed(filed.ticket_id)).assigned_unit_id == city.group
        assert await found_by(tickets_service, filed.ticket_id) == "household"
    named = await pilot.submit(
        "sanitation", caller=pilot.leader, unit_id=city.group, location=mapped.point(2_000, 0)
    )
    assert named.origin_unit_id == city.group
    assert await found_by(tickets_service, named.ticket_id) == "unit"
    await pilot.routed(named.ticket_id, pilot.leader)
    assert named.ticket_id in await queue_of(pilot.leader, city.group)


async def test_with_gis_out_of_reach_a_report_goes_to_the_households_group_at_once(
    pilot: Pilot,
    mapped: Ward,
    gis_link: Link,
    tickets_service: TicketsService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    city = pilot.city
    # A place in no group's outline (the street between the groups) is GIS's to place. It
    # answers first: the outage below is the first since it last did.
    street = mapped.point(0, 0)
    before = await pilot.submit("sanitation", location=street)
    assert before.origin_unit_id == city.group

    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.WARNING, logger="services.tickets.gis"):
        async with gis_link.stalled():
            started = loop.time()
            filed = await pilot.submit("sanitation", location=street)
            took = loop.time() - started
    assert took < 2.0, f"filing waited {took:.1f} s for the map"
    assert filed.origin_unit_id == city.group
    assert await found_by(tickets_service, filed.ticket_id) == "household"
    assert (await pilot.routed(filed.ticket_id)).assigned_unit_id == city.group
    assert filed.ticket_id in await queue_of(pilot.leader, city.group)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("GIS" in r.getMessage() for r in warned), [r.getMessage() for r in warned]

    # Once GIS is reached again, a report goes to the group it is about.
    after = await pilot.submit("sanitation", location=in_the_other_group(mapped))
    assert after.origin_unit_id == city.other_group


async def test_a_place_in_a_group_merged_away_goes_to_the_group_it_joined(
    pilot: Pilot, mapped: Ward, tickets_service: TicketsService
) -> None:
    city = pilot.city
    joined = await create_unit(
        city.admin, city.ward, "g19", "Tổ dân phố 19", registry_pb2.UNIT_KIND_GROUP
    )
    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.other_group, target_unit_id=joined
        )
    )

    async def merged() -> bool:
        unit = await tickets_service.store.unit(city.other_group)
        return bool(unit and unit.get("merged_into_id") == joined)

    await eventually(merged)
    filed = await pilot.submit("sanitation", location=in_the_other_group(mapped))
    assert filed.origin_unit_id == joined
    leader = pilot.caller(Role.GROUP_LEADER, joined)
    assert (await pilot.routed(filed.ticket_id, leader)).assigned_unit_id == joined


async def test_a_place_on_the_map_the_service_holds_is_placed_without_asking_gis(
    pilot: Pilot, mapped: Ward, gis_link: Link, tickets_service: TicketsService
) -> None:
    """The service holds every group's outline (fetched from GIS, and again every minute): a
    place inside one is routed by it even while GIS does not answer; one outside them all is
    GIS's to place, and unanswered goes where it went without a place."""
    city = pilot.city
    await tickets_service.locator.refresh(city.ward.split(".")[0])
    async with gis_link.stalled():
        own = await pilot.submit("sanitation", location=mapped.point(-250, -200))
        assert own.origin_unit_id == city.group
        assert await found_by(tickets_service, own.ticket_id) == "location"
        neighbours = await pilot.submit("sanitation", location=in_the_other_group(mapped))
        assert neighbours.origin_unit_id == city.other_group
        assert await found_by(tickets_service, neighbours.ticket_id) == "location"
        street = await pilot.submit("sanitation", location=mapped.point(0, 0))
        assert street.origin_unit_id == city.group
        assert await found_by(tickets_service, street.ticket_id) == "household"


async def test_a_boundary_redrawn_routes_the_next_report_by_its_new_outline(
    pilot: Pilot, mapped: Ward, tickets_service: TicketsService
) -> None:
    """The service holds the outlines, and hears GIS announce a boundary changed: the groups
    redrawn (the other group takes the street and part of this one), a report from a place
    the other group now holds goes there at once, not when the held map is a minute old."""
    city = pilot.city
    await tickets_service.locator.refresh(city.ward.split(".")[0])
    moved_place = mapped.point(-250, 0)
    before = await pilot.submit("sanitation", location=moved_place)
    assert before.origin_unit_id == city.group

    done = await mapped.import_features(
        gis_pb2.LAYER_BOUNDARY,
        [
            polygon_feature(mapped.box(-600, -400, -300, 400), "west", unit_id=city.group),
            polygon_feature(mapped.box(-300, -400, 600, 400), "east", unit_id=city.other_group),
        ],
    )
    assert (done.updated, list(done.rejected)) == (2, [])

    async def placed_anew() -> bool:
        found = await tickets_service.locator.unit_at(moved_place, near=city.group)
        return found == city.other_group

    await eventually(placed_anew, within=10)
    after = await pilot.submit("sanitation", location=moved_place)
    assert after.origin_unit_id == city.other_group

"""A ward app watching its queue live (a server stream over a MongoDB change stream), and the
city dashboard's figures per unit and category."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import grpc
import pytest
from bson import ObjectId
from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2
from civic.tickets.v1 import tickets_pb2

from services.common.auth import Role, mint_token
from services.tickets import domain
from services.tickets.main import TicketsService
from tests.conftest import TEST_SECRET, Clock
from tests.registry_fixtures import create_unit
from tests.tickets.conftest import Pilot, TicketCaller, eventually, point_near, rid
from tests.tickets.test_outcomes_and_counts import ticket_doc

ROUTED = "civic.tickets.v1.TicketRouted"
ACKNOWLEDGED = "civic.tickets.v1.TicketAcknowledged"
LINKED = "civic.tickets.v1.TicketLinked"


async def change_streams_for(service: TicketsService, unit_id: str) -> int:
    """How many change streams on the tickets collection the server holds open for `unit_id`
    (asked of MongoDB itself: open cursors, idle or waiting for changes)."""
    ops = await (
        await service.client.admin.aggregate(
            [
                {"$currentOp": {"idleCursors": True, "allUsers": True}},
                {"$match": {"ns": f"{service.db.name}.tickets"}},
            ]
        )
    ).to_list()

    def pipeline(op: dict[str, Any]) -> list[Any]:
        command = op.get("cursor", {}).get("originatingCommand") or op.get("command") or {}
        return list(command.get("pipeline", []))

    return sum(
        1
        for op in ops
        if any("$changeStream" in stage for stage in pipeline(op)) and unit_id in repr(pipeline(op))
    )


async def next_update(
    call: Any, ticket_id: str, within: float = 5.0
) -> tickets_pb2.WatchQueueResponse:
    """The stream's next update about `ticket_id` (there are no others in this test's ward)."""

    async def read() -> tickets_pb2.WatchQueueResponse:
        while True:
            update = await call.read()
            assert update is not grpc.aio.EOF, "the stream ended"
            if update.ticket.ticket_id == ticket_id:
                return update  # type: ignore[no-any-return]

    return await asyncio.wait_for(read(), within)


async def test_a_ward_app_watches_its_queue_live(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    ward = pilot.city.ward
    call = pilot.ward_officer.WatchQueue(tickets_pb2.WatchQueueRequest(unit_id=ward))
    # The server has opened its change stream once MongoDB shows it; from then on it misses
    # nothing.
    await eventually(lambda: change_streams_for(tickets_service, ward))

    ticket = await pilot.submit()
    routed = await next_update(call, ticket.ticket_id)
    assert routed.change == ROUTED
    assert routed.ticket.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert routed.ticket.assigned_unit_id == ward
    assert routed.ticket.department == "urban-order"
    assert routed.ticket.description == "Đèn đường hỏng ở kiệt 45"

    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket.ticket_id)
    )
    acknowledged = await next_update(call, ticket.ticket_id)
    assert acknowledged.change == ACKNOWLEDGED
    assert acknowledged.ticket.status == tickets_pb2.TICKET_STATUS_ACKNOWLEDGED

    # A ticket leaving the queue is reported too, as it now stands.
    await pilot.ward_officer.EscalateTicket(
        tickets_pb2.EscalateTicketRequest(
            request_id=rid(), ticket_id=ticket.ticket_id, reason="cần quận xử lý"
        )
    )
    escalated = await next_update(call, ticket.ticket_id)
    assert escalated.change == "civic.tickets.v1.TicketEscalated"
    assert escalated.ticket.assigned_unit_id == pilot.city.district

    # The app closes the stream: the call ends as cancelled and the server lets go of its
    # change stream.
    assert call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    assert call.cancelled()

    async def closed() -> bool:
        return await change_streams_for(tickets_service, ward) == 0

    await eventually(closed, within=5)


async def test_a_watcher_is_told_a_duplicate_was_linked_not_an_old_change_again(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Linking a duplicate changes its primary (one more in `duplicates`): the ward app sees
    that update as TicketLinked, not as the primary's previous change repeated."""
    ward = pilot.city.ward
    call = pilot.ward_officer.WatchQueue(tickets_pb2.WatchQueueRequest(unit_id=ward))
    await eventually(lambda: change_streams_for(tickets_service, ward))
    primary = (await pilot.submit()).ticket_id
    assert (await next_update(call, primary)).change == ROUTED
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=primary)
    )
    assert (await next_update(call, primary)).change == ACKNOWLEDGED

    duplicate = (await pilot.submit(caller=pilot.neighbour, location=point_near(30))).ticket_id

    routed = await next_update(call, duplicate)
    assert (routed.change, routed.ticket.duplicate_of) == (ROUTED, primary)
    linked = await next_update(call, primary)
    assert linked.change == LINKED
    assert list(linked.ticket.duplicates) == [duplicate]
    assert linked.ticket.status == tickets_pb2.TICKET_STATUS_ACKNOWLEDGED
    call.cancel()


async def test_only_officials_of_the_unit_watch_its_queue(pilot: Pilot) -> None:
    admin = pilot.city.as_role(Role.CITY_ADMIN, pilot.city.city)
    other_ward = await create_unit(
        admin, pilot.city.district, "hc2", "Hải Châu 2", registry_pb2.UNIT_KIND_WARD
    )
    refused: list[tuple[TicketCaller, str]] = [
        (pilot.ward_officer, other_ward),
        (pilot.resident, pilot.city.ward),
        (pilot.caller(Role.INTEGRATOR, pilot.city.ward), pilot.city.ward),
    ]
    for caller, unit_id in refused:
        call = caller.WatchQueue(tickets_pb2.WatchQueueRequest(unit_id=unit_id))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(call.read(), 5)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, unit_id


def stats_by_key(
    response: tickets_pb2.GetStatisticsResponse,
) -> dict[tuple[str, str], tickets_pb2.CategoryStatistics]:
    return {(row.unit_id, row.category): row for row in response.statistics}


async def test_statistics_count_and_time_resolutions_per_unit_and_category(
    pilot: Pilot, clock: Clock
) -> None:
    group, other_group, ward = pilot.city.group, pilot.city.other_group, pilot.city.ward
    officer = pilot.ward_officer
    # Four street lights far enough apart not to be one problem, and one that repeats the first.
    lights = [await pilot.submit(location=point_near(400 * i)) for i in range(4)]
    repeat = await pilot.submit(location=point_near(20))
    noise = await pilot.submit("noise")
    elsewhere = await pilot.submit(caller=officer, unit_id=other_group)
    for ticket in [*lights, repeat, noise]:
        await pilot.routed(ticket.ticket_id)
    await pilot.routed(elsewhere.ticket_id, officer)
    assert (await pilot.routed(repeat.ticket_id)).duplicate_of == lights[0].ticket_id

    async def resolve(ticket: tickets_pb2.Ticket) -> None:
        await officer.ResolveTicket(
            tickets_pb2.ResolveTicketRequest(
                request_id=rid(), ticket_id=ticket.ticket_id, resolution="Đã xử lý"
            )
        )

    clock.advance(hours=1)
    await resolve(lights[0])  # and its repeat with it
    clock.advance(hours=1)
    await resolve(lights[1])
    clock.advance(hours=7)
    await resolve(lights[2])
    await resolve(elsewhere)
    await officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(
            request_id=rid(), ticket_id=noise.ticket_id, reason="Không thuộc thẩm quyền"
        )
    )
    # lights[3] stays open.

    response = await officer.GetStatistics(tickets_pb2.GetStatisticsRequest(unit_id=ward))
    rows = stats_by_key(response)
    assert sorted(rows) == [
        (group, "noise"),
        (group, "street-light"),
        (other_group, "street-light"),
    ]

    lights_row = rows[(group, "street-light")]
    # The repeat is the same problem as lights[0]: counted once.
    assert (lights_row.total, lights_row.open, lights_row.resolved) == (4, 1, 3)
    assert lights_row.overdue == 0
    # Resolved after 1 h, 2 h and 9 h: the median is 2 h (the mean would be 4 h).
    median = lights_row.median_resolution_time.ToTimedelta()
    assert timedelta(hours=2) <= median < timedelta(hours=2, seconds=30), median

    other_row = rows[(other_group, "street-light")]
    assert (other_row.total, other_row.open, other_row.resolved) == (1, 0, 1)
    median = other_row.median_resolution_time.ToTimedelta()
    assert timedelta(hours=9) <= median < timedelta(hours=9, seconds=30), median

    # A rejected ticket is decided, not resolved: no resolution, no resolution time.
    noise_row = rows[(group, "noise")]
    assert (noise_row.total, noise_row.open, noise_row.resolved) == (1, 0, 0)
    assert not noise_row.HasField("median_resolution_time")

    # The group's own figures, for its leader; the ward's are beyond the leader's scope.
    own = await pilot.leader.GetStatistics(tickets_pb2.GetStatisticsRequest(unit_id=group))
    assert sorted(stats_by_key(own)) == [(group, "noise"), (group, "street-light")]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pilot.leader.GetStatistics(tickets_pb2.GetStatisticsRequest(unit_id=ward))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pilot.resident.GetStatistics(tickets_pb2.GetStatisticsRequest(unit_id=group))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_queue_watch_ends_when_its_token_expires(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """The token is checked when the stream opens and again before each change it sends."""
    ward = pilot.city.ward
    lifetime = 4
    short = mint_token(
        TEST_SECRET,
        subject="officer-short",
        role=Role.WARD_OFFICER,
        scope=ward,
        ttl_seconds=lifetime,
    )
    officer = TicketCaller(pilot.target, short)
    call = officer.WatchQueue(tickets_pb2.WatchQueueRequest(unit_id=ward))
    await eventually(lambda: change_streams_for(tickets_service, ward))
    first = await pilot.submit()
    assert (await next_update(call, first.ticket_id)).ticket.assigned_unit_id == ward

    await asyncio.sleep(lifetime + 0.5)
    await pilot.submit()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(call.read(), 10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_idle_queue_watch_ends_when_its_token_expires(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Nothing to send is no reason to stay open past the token."""
    ward = pilot.city.ward
    short = mint_token(
        TEST_SECRET, subject="officer-idle", role=Role.WARD_OFFICER, scope=ward, ttl_seconds=3
    )
    opened = time.monotonic()
    officer = TicketCaller(pilot.target, short)
    call = officer.WatchQueue(tickets_pb2.WatchQueueRequest(unit_id=ward))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(call.read(), 15)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - opened > 1.5  # open while the token held


async def test_a_page_of_long_discussions_ends_before_grpcs_limit(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Tickets with their comments in full: a page asked for with room for every one of them
    ends early, before the 4 MiB a gRPC client takes, and the next goes on from there."""
    now = tickets_service.clock()
    category = f"probe-{ObjectId()}"
    submitter = f"resident-{category}"
    # The longest comments in bytes: every character three bytes in UTF-8.
    said = [
        {"author": submitter, "role": "resident", "text": "ặ" * domain.MAX_COMMENT, "at": now}
    ] * domain.MAX_COMMENTS
    crowded = [
        ticket_doc(
            pilot,
            now,
            category=category,
            submitter=submitter,
            status=int(domain.Status.ROUTED),
            assigned_unit_id=pilot.city.ward,
            assigned_level=int(domain.Level.WARD),
            rule_version=1,
            comments=said,
        )
        for _ in range(8)
    ]
    expected = sorted(ticket["_id"] for ticket in crowded)
    await tickets_service.db["tickets"].insert_many(crowded)
    submitter_caller = pilot.caller(Role.RESIDENT, pilot.city.group, pilot.household_id, submitter)

    async def queue(token: str) -> tuple[list[str], str]:
        page = await pilot.ward_officer.ListQueue(
            tickets_pb2.ListQueueRequest(
                unit_id=pilot.city.ward,
                category=category,
                page=types_pb2.PageRequest(page_size=1000, page_token=token),
            )
        )
        return [t.ticket_id for t in page.tickets], page.next_page_token

    async def mine(token: str) -> tuple[list[str], str]:
        page = await submitter_caller.ListMyTickets(
            tickets_pb2.ListMyTicketsRequest(
                page=types_pb2.PageRequest(page_size=1000, page_token=token)
            )
        )
        return [t.ticket_id for t in page.tickets], page.next_page_token

    try:
        for listing, order in ((queue, expected), (mine, expected[::-1])):
            pages: list[list[str]] = []
            token = ""
            while not pages or token:
                ids, token = await listing(token)
                pages.append(ids)
            assert [i for page in pages for i in page] == order
            assert len(pages) > 1
    finally:
        await tickets_service.db["tickets"].delete_many({"category": category})

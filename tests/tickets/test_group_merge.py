"""Groups merge (Vietnam merged many units in 2025): a merged-away group's tickets go with its
households into the group it joined, and go on there."""

from __future__ import annotations

import grpc
import pytest
from civic.registry.v1 import registry_pb2
from civic.tickets.v1 import events_pb2, tickets_pb2

from services.common.auth import Role
from services.tickets.main import TicketsService
from tests.tickets.conftest import Pilot, eventually, rid
from tests.tickets.test_watch_and_stats import change_streams_for, next_update


async def merged_events(
    service: TicketsService, ticket_id: str
) -> list[events_pb2.TicketGroupMerged]:
    entries = await service.db["outbox"].find({"events.key": ticket_id}).sort("_id").to_list()
    return [
        events_pb2.TicketGroupMerged.FromString(bytes(event["data"]))
        for entry in entries
        for event in entry["events"]
        if event["key"] == ticket_id and event["type"].endswith(".TicketGroupMerged")
    ]


async def test_a_merged_groups_open_tickets_go_to_the_group_it_joined(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    city = pilot.city
    # Handled by the group itself, and one sent up to the ward: both filed in the group.
    at_group = await pilot.routed((await pilot.submit("sanitation")).ticket_id)
    at_ward = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    assert at_group.assigned_unit_id == city.group
    assert at_ward.assigned_unit_id == city.ward

    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
        )
    )
    joined = pilot.caller(Role.GROUP_LEADER, city.other_group)

    async def in_joined_queue() -> bool:
        queue = await joined.ListQueue(tickets_pb2.ListQueueRequest(unit_id=city.other_group))
        return at_group.ticket_id in {t.ticket_id for t in queue.tickets}

    await eventually(in_joined_queue)
    moved = (
        await joined.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=at_group.ticket_id))
    ).ticket
    assert (moved.origin_unit_id, moved.assigned_unit_id) == (city.other_group, city.other_group)
    assert moved.status == at_group.status  # it goes on where it stood
    # The ward's ticket stays in the ward's queue; the group it came from is the new one.
    upward = (
        await joined.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=at_ward.ticket_id))
    ).ticket
    assert (upward.origin_unit_id, upward.assigned_unit_id) == (city.other_group, city.ward)
    # The retired group's leader no longer finds it.
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await pilot.leader.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=at_group.ticket_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND

    # The retired group's queue is no more: asked for, it says where its tickets went.
    with pytest.raises(grpc.aio.AioRpcError) as retired:
        await pilot.ward_officer.ListQueue(tickets_pb2.ListQueueRequest(unit_id=city.group))
    assert retired.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"merged into {city.other_group}" in (retired.value.details() or "")
    # Its old leader, whose token still names it, is told so too, not shown an empty queue.
    with pytest.raises(grpc.aio.AioRpcError) as retired:
        await pilot.leader.ListQueue(tickets_pb2.ListQueueRequest())
    assert retired.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"merged into {city.other_group}" in (retired.value.details() or "")

    # Integrators are told, once per ticket.
    (told,) = await merged_events(tickets_service, at_group.ticket_id)
    assert (told.from_unit_id, told.to_unit_id) == (city.group, city.other_group)
    assert (told.origin_unit_id, told.assigned_unit_id) == (city.other_group, city.other_group)
    (told_ward,) = await merged_events(tickets_service, at_ward.ticket_id)
    assert told_ward.assigned_unit_id == city.ward

    # The group's residents, now the joined group's, "+1" it rather than filing it again.
    filed = await pilot.submit("sanitation", caller=pilot.neighbour)
    again = await pilot.routed(filed.ticket_id, pilot.neighbour)
    assert again.origin_unit_id == city.other_group
    assert again.duplicate_of == at_group.ticket_id


async def test_a_queue_watcher_is_told_a_ticket_left_for_a_group_beyond_their_scope(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """The retired group's leader, watching its queue, learns where its tickets went, but no
    more of them than GetTicket now shows them: nothing beyond what integrators are told."""
    city = pilot.city
    ticket = await pilot.routed((await pilot.submit("sanitation")).ticket_id)
    call = pilot.leader.WatchQueue(tickets_pb2.WatchQueueRequest(unit_id=city.group))
    await eventually(lambda: change_streams_for(tickets_service, city.group))

    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
        )
    )

    left = await next_update(call, ticket.ticket_id)
    call.cancel()
    assert left.change == "civic.tickets.v1.TicketGroupMerged"
    assert (left.ticket.origin_unit_id, left.ticket.assigned_unit_id) == (
        city.other_group,
        city.other_group,
    )
    assert (left.ticket.category, left.ticket.status) == (ticket.category, ticket.status)
    assert (left.ticket.description, left.ticket.submitter, left.ticket.household_id) == (
        "",
        "",
        "",
    )
    assert not left.ticket.HasField("location")

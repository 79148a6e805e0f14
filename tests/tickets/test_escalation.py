"""Escalation: a ticket not handled in time climbs one level per missed deadline (missed once it
has passed), driven by the service's running Escalator (sweeping every 0.2 s in tests) and a
clock the test moves forward; duplicates go up with their primary, never alone; officials
escalate by hand and resolve at the level a ticket has reached; the city is the top."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
from civic.tickets.v1 import events_pb2, tickets_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.mongo import Document
from services.tickets.escalation import Escalator
from services.tickets.main import TicketsService
from services.tickets.records import ticket_message
from services.tickets.store import TicketStore
from tests.conftest import Clock
from tests.tickets.conftest import Pilot, TicketCaller, eventually, point_near, rid
from tests.tickets.test_lifecycle import get, refused

# street-light: 24 h to acknowledge, 5 days to resolve, at every level.
ACKNOWLEDGE = timedelta(hours=24)
RESOLVE = timedelta(days=5)


async def reaches(caller: TicketCaller, ticket_id: str, unit_id: str) -> tickets_pb2.Ticket:
    """The ticket once the running Escalator has moved it to `unit_id`."""

    async def probe() -> tickets_pb2.Ticket | None:
        ticket = await get(caller, ticket_id)
        return ticket if ticket.assigned_unit_id == unit_id else None

    ticket: tickets_pb2.Ticket = await eventually(probe)
    return ticket


async def escalations_of(
    service: TicketsService, ticket_id: str
) -> list[events_pb2.TicketEscalated]:
    entries = await service.db["outbox"].find({"events.key": ticket_id}).sort("_id").to_list()
    found = []
    for entry in entries:
        for event in entry["events"]:
            if event["key"] == ticket_id and event["type"].endswith(".TicketEscalated"):
                found.append(events_pb2.TicketEscalated.FromString(bytes(event["data"])))
    return found


async def test_an_escalations_event_carries_the_services_time_past_the_deadline_it_missed(
    pilot: Pilot, clock: Clock, tickets_service: TicketsService
) -> None:
    """ce_time is the service's clock, as the ticket's own times are: an integrator never reads
    of an escalation stamped before the deadline that caused it."""
    routed = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    clock.advance(hours=25)
    await reaches(pilot.resident, routed.ticket_id, pilot.city.district)
    entry = await tickets_service.db["outbox"].find_one(
        {"events": {"$elemMatch": {"key": routed.ticket_id, "type": {"$regex": "Escalated$"}}}}
    )
    assert entry is not None
    stamped = next(e["time"] for e in entry["events"] if e["type"].endswith("TicketEscalated"))
    assert stamped.replace(tzinfo=UTC) > routed.acknowledge_by.ToDatetime(tzinfo=UTC)


async def overdue_at_city(pilot: Pilot) -> set[str]:
    queue = await pilot.admin.ListQueue(tickets_pb2.ListQueueRequest(overdue_only=True))
    return {t.ticket_id for t in queue.tickets}


def left(stamp: Timestamp, clock: Clock) -> timedelta:
    return stamp.ToDatetime(tzinfo=UTC) - clock()


async def test_an_unacknowledged_ticket_climbs_to_the_city_and_stops_there(
    pilot: Pilot, clock: Clock, tickets_service: TicketsService
) -> None:
    city = pilot.city
    ticket_id = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id

    clock.advance(hours=25)
    at_district = await reaches(pilot.resident, ticket_id, city.district)
    assert at_district.assigned_level == tickets_pb2.LEVEL_DISTRICT
    assert at_district.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert at_district.escalations == 1
    assert not at_district.overdue
    # Fresh deadlines at the district, counted from the escalation.
    assert abs(left(at_district.acknowledge_by, clock) - ACKNOWLEDGE) < timedelta(seconds=10)
    assert abs(left(at_district.resolve_by, clock) - RESOLVE) < timedelta(seconds=10)
    # The district has it in its queue; the ward no longer may act on it.
    district_queue = await pilot.district_officer.ListQueue(tickets_pb2.ListQueueRequest())
    assert ticket_id in {t.ticket_id for t in district_queue.tickets}
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        pilot.ward_officer.AcknowledgeTicket(
            tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket_id)
        ),
    )

    clock.advance(hours=25)
    at_city = await reaches(pilot.resident, ticket_id, city.city)
    assert at_city.assigned_level == tickets_pb2.LEVEL_CITY
    assert at_city.escalations == 2
    assert ticket_id not in await overdue_at_city(pilot)

    # Past the city's deadline too: nobody is above, so it stays, marked overdue at the top.
    clock.advance(hours=25)
    assert ticket_id in await eventually(lambda: overdue_at_city(pilot))
    await asyncio.sleep(0.6)  # three more sweeps
    stuck = await get(pilot.admin, ticket_id)
    assert (stuck.assigned_unit_id, stuck.escalations) == (city.city, 2)
    assert stuck.overdue
    assert stuck.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert ticket_id in await overdue_at_city(pilot)
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        pilot.admin.EscalateTicket(
            tickets_pb2.EscalateTicketRequest(
                request_id=rid(), ticket_id=ticket_id, reason="lên nữa"
            )
        ),
    )

    escalated = await escalations_of(tickets_service, ticket_id)
    assert [(e.from_unit_id, e.to_unit_id, e.to_level, e.cause) for e in escalated] == [
        (
            city.ward,
            city.district,
            tickets_pb2.LEVEL_DISTRICT,
            events_pb2.ESCALATION_CAUSE_NOT_ACKNOWLEDGED_IN_TIME,
        ),
        (
            city.district,
            city.city,
            tickets_pb2.LEVEL_CITY,
            events_pb2.ESCALATION_CAUSE_NOT_ACKNOWLEDGED_IN_TIME,
        ),
    ]

    # The city still handles it: resolved there, it leaves the overdue queue.
    await pilot.admin.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=ticket_id, resolution="Thành phố đã xử lý"
        )
    )
    assert ticket_id not in await overdue_at_city(pilot)


async def test_an_acknowledged_ticket_not_resolved_in_time_goes_up(
    pilot: Pilot, clock: Clock, tickets_service: TicketsService
) -> None:
    ticket_id = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket_id)
    )

    clock.advance(days=4)  # past 24 h to acknowledge, but it was acknowledged
    await asyncio.sleep(0.6)
    assert (await get(pilot.resident, ticket_id)).assigned_unit_id == pilot.city.ward

    clock.advance(days=1, hours=1)  # past 5 days to resolve
    moved = await reaches(pilot.resident, ticket_id, pilot.city.district)
    # The district must acknowledge it anew.
    assert moved.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert moved.escalations == 1
    (event,) = await escalations_of(tickets_service, ticket_id)
    assert event.cause == events_pb2.ESCALATION_CAUSE_NOT_RESOLVED_IN_TIME


async def test_duplicates_go_up_with_their_primary_never_on_their_own(
    pilot: Pilot, clock: Clock, tickets_service: TicketsService
) -> None:
    """While the ward works on a ticket, a duplicate nobody acknowledged stays with it, past its
    own deadline; when the ticket goes up, its duplicates go with it."""
    city = pilot.city
    primary = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    filed = await pilot.submit("street-light", caller=pilot.neighbour, location=point_near(30))
    duplicate = await pilot.routed(filed.ticket_id, pilot.neighbour)
    assert duplicate.duplicate_of == primary
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=primary)
    )

    clock.advance(hours=25)  # past the duplicate's 24 h to acknowledge, not the primary's 5 days
    await asyncio.sleep(0.6)  # three sweeps
    assert (await get(pilot.neighbour, duplicate.ticket_id)).assigned_unit_id == city.ward
    assert not await escalations_of(tickets_service, duplicate.ticket_id)

    clock.advance(days=4)  # past the primary's 5 days to resolve
    await reaches(pilot.resident, primary, city.district)
    moved = await get(pilot.neighbour, duplicate.ticket_id)
    assert (moved.assigned_unit_id, moved.status) == (
        city.district,
        tickets_pb2.TICKET_STATUS_ROUTED,
    )
    assert moved.duplicate_of == primary
    (event,) = await escalations_of(tickets_service, duplicate.ticket_id)
    assert (event.from_unit_id, event.to_unit_id, event.cause) == (
        city.ward,
        city.district,
        events_pb2.ESCALATION_CAUSE_WITH_PRIMARY,
    )


async def test_an_official_escalates_by_hand_and_the_level_above_resolves(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    city = pilot.city
    ticket_id = (
        await pilot.routed((await pilot.submit("illegal-construction")).ticket_id)
    ).ticket_id
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket_id)
    )
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        pilot.ward_officer.EscalateTicket(
            tickets_pb2.EscalateTicketRequest(request_id=rid(), ticket_id=ticket_id, reason=" ")
        ),
    )
    escalated = (
        await pilot.ward_officer.EscalateTicket(
            tickets_pb2.EscalateTicketRequest(
                request_id=rid(), ticket_id=ticket_id, reason="Công trình vượt thẩm quyền phường"
            )
        )
    ).ticket
    assert (escalated.assigned_unit_id, escalated.assigned_level) == (
        city.district,
        tickets_pb2.LEVEL_DISTRICT,
    )
    assert escalated.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert escalated.escalations == 1
    assert [(c.author_role, c.text) for c in escalated.comments] == [
        ("ward_officer", "Công trình vượt thẩm quyền phường")
    ]
    (event,) = await escalations_of(tickets_service, ticket_id)
    assert (event.from_unit_id, event.to_unit_id, event.cause) == (
        city.ward,
        city.district,
        events_pb2.ESCALATION_CAUSE_BY_OFFICIAL,
    )

    # The ward still sees the ticket but no longer acts on it.
    assert (await get(pilot.ward_officer, ticket_id)).assigned_unit_id == city.district
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        pilot.ward_officer.ResolveTicket(
            tickets_pb2.ResolveTicketRequest(
                request_id=rid(), ticket_id=ticket_id, resolution="xong"
            )
        ),
    )

    district = pilot.district_officer
    await district.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket_id)
    )
    resolved = (
        await district.ResolveTicket(
            tickets_pb2.ResolveTicketRequest(
                request_id=rid(), ticket_id=ticket_id, resolution="Đã lập biên bản, đình chỉ"
            )
        )
    ).ticket
    assert resolved.status == tickets_pb2.TICKET_STATUS_RESOLVED
    # Resolved at the district, not forwarded further.
    assert (resolved.assigned_unit_id, resolved.escalations) == (city.district, 1)
    assert resolved.resolution == "Đã lập biên bản, đình chỉ"
    outbox = tickets_service.db["outbox"]
    entry = await outbox.find_one(
        {"events.type": "civic.tickets.v1.TicketResolved", "events.key": ticket_id}
    )
    assert entry is not None
    (data,) = [e["data"] for e in entry["events"] if e["key"] == ticket_id]
    event_resolved = events_pb2.TicketResolved.FromString(bytes(data))
    assert (event_resolved.resolved_by_unit_id, event_resolved.level) == (
        city.district,
        tickets_pb2.LEVEL_DISTRICT,
    )


class Offering(TicketStore):
    """The service's tickets, of which the sweep is offered one whatever its deadline: as if
    read as due just before its deadline moved (the sweep decides again in its transaction)."""

    def __init__(self, service: TicketsService, ticket_id: str) -> None:
        super().__init__(service.db)
        self.ticket_id = ticket_id

    async def due(self, now: datetime, limit: int = 200) -> list[Document]:
        ticket = await self.get(self.ticket_id)
        return [ticket] if ticket else []


async def test_a_deadline_is_missed_once_it_has_passed_not_at_its_moment(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """At its deadline to the millisecond a ticket is neither overdue nor due nor escalated; a
    millisecond later it is all three: the sweep and the overdue flag count alike."""
    ticket_id = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    store = tickets_service.store
    ticket = await store.get(ticket_id)
    assert ticket is not None
    deadline = ticket["next_deadline"]

    async def escalates_at(now: datetime) -> bool:
        sweep = Escalator(
            tickets_service.client,
            Offering(tickets_service, ticket_id),
            tickets_service.host.outbox,
            lambda: now,
            interval_seconds=60,
        )
        return await sweep.sweep() == 1

    async def due_at(now: datetime) -> bool:
        return ticket_id in {t["_id"] for t in await store.due(now, limit=100_000)}

    assert not ticket_message(ticket, deadline).overdue
    assert not await due_at(deadline)
    assert not await escalates_at(deadline)

    just_after = deadline + timedelta(milliseconds=1)
    assert ticket_message(ticket, just_after).overdue
    assert await due_at(just_after)
    assert await escalates_at(just_after)
    assert (await get(pilot.resident, ticket_id)).assigned_unit_id == pilot.city.district
